"""The one stage executor: plan -> kNN -> score -> (second graph) -> link + merge.

The clustering job, ``jobs/tune.py``, ``jobs/train.py``'s evaluation and the demo all run
their stages through :class:`Run`. A method's :class:`~ltc_ray.cluster.base.Shape` is
compiled once into the stages below; every stage is resumable through the
:class:`~ltc_ray.pipeline.stages.StageStore` (a fingerprint of what it depends on, a
``_DONE`` marker with the sha256 of every artifact), so a rerun -- or the next tuning
trial -- recomputes only the stages whose keys changed.

==============  ================================================================
stage           what runs (by shape)
==============  ================================================================
plan            every row, label and id checked, in parallel (before the kNN)
knn             the sharded kNN graph (or an imported learn-to-cluster file)
graph_stats     when a parameter is ``auto`` or a model was trained on another graph:
                per-partition similarity histograms, summed (exact for any partition
                count); the label-free rules derive the values from them
score           "rows": a task per partition; "halo": partition actors with the
                one-hop halo (node features written when the shape emits them);
                "rescore": the method's own stage (writes a re-scored graph, and node
                features when the shape emits them)
knn_features    link_graph "node-features" / "input": a second sharded kNN
link + merge    "rows": a task per partition; "halo": link actors serving the
                neighbours' rows (and features); "whole-graph": one task
==============  ================================================================

The driver holds the plan, refs and small summaries, never the feature matrix or the
N*k graph.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import ray

from ltc_ray.cluster.base import ClusterMethod, RescoreContext
from ltc_ray.config import ATTACH_RULE, Config
from ltc_ray.errors import storage_errors
from ltc_ray.graph.knn_graph import KnnManifest, load_manifest
from ltc_ray.graph.similarity_stats import SimilarityStats, combine, derive, shift_report
from ltc_ray.io.features import (
    FeatureInfo,
    check_unique_ids,
    inspect_features,
    read_ids,
    scan_features,
    write_parts_manifest,
)
from ltc_ray.io.fs import file_size, join_uri, uri_exists, url_to_fs
from ltc_ray.io.labels import read_labels
from ltc_ray.params import AUTO, auto_fields, field_autos
from ltc_ray.pipeline.cluster_stage import (
    ClusterRefs,
    attach_singletons,
    histogram_partition,
    link_merge_stage,
    partition_ranges,
    score_stage,
    stage_tools,
)
from ltc_ray.pipeline.knn_stage import build_knn_graph, import_ltc_knn, knn_graph_keys_for
from ltc_ray.pipeline.stages import (
    StageStore,
    fingerprint,
    graph_artifacts,
    load_array,
    load_pair,
    save_concat,
    save_pair,
    slice_rows,
    tree_digest,
)
from ltc_ray.runtime import StageLog, init_ray, peak_rss_bytes, ray_get, wait_all

log = logging.getLogger("ltc_ray")

VALIDATE_CHUNK_ROWS = 262144
# Inputs up to this size are scanned (rows, labels, ids) in the driver before Ray starts:
# milliseconds of reading, where a Ray start costs seconds. Larger ones are scanned in
# parallel by Ray tasks in the plan stage, still before the kNN.
DRIVER_SCAN_MAX_BYTES = 4 * 2**20


@dataclass
class Inputs:
    """What a run reads: features (and their checked header), labels, a precomputed kNN."""

    features: str
    info: FeatureInfo
    labels: str | None = None
    knn: str | None = None  # a learn-to-cluster npz to import when present
    storage_options: dict | None = field(default=None, repr=False)


def driver_scans(inputs: Inputs) -> set[str]:
    """Which full-input checks ("rows", "labels", "ids") are small enough for the driver
    (:data:`DRIVER_SCAN_MAX_BYTES`); :meth:`Run.validate` runs the others on Ray."""
    info, small = inputs.info, set()
    if info.n_rows * info.row_bytes <= DRIVER_SCAN_MAX_BYTES:
        small.add("rows")
    if info.has_ids and 8 * info.n_rows <= DRIVER_SCAN_MAX_BYTES:
        small.add("ids")
    if inputs.labels is not None:
        with storage_errors(inputs.labels):
            if file_size(inputs.labels, inputs.storage_options) <= DRIVER_SCAN_MAX_BYTES:
                small.add("labels")
    return small


def scan_small_inputs(inputs: Inputs) -> None:
    """The full checks of the inputs small enough for the driver (before Ray starts)."""
    small, info = driver_scans(inputs), inputs.info
    with storage_errors(info.uri):
        if "rows" in small:
            scan_features(info, 0, info.n_rows)
        if "ids" in small:
            check_unique_ids(read_ids(info, 0, info.n_rows), info.uri)
    if "labels" in small:
        with storage_errors(inputs.labels):
            read_labels(inputs.labels, expected_rows=info.n_rows,
                        storage_options=inputs.storage_options)


@ray.remote(num_cpus=1, max_retries=3)
def _validate_chunk(info: FeatureInfo, start: int, stop: int) -> int:
    scan_features(info, start, stop)
    return peak_rss_bytes()


@ray.remote(num_cpus=1)
def _validate_labels(uri: str, n_rows: int, so: dict | None) -> int:
    read_labels(uri, expected_rows=n_rows, storage_options=so)
    return peak_rss_bytes()


@ray.remote(num_cpus=1)
def _validate_ids(info: FeatureInfo) -> int:
    ids = read_ids(info, 0, info.n_rows)
    if ids is not None:
        check_unique_ids(ids, info.uri)
    return peak_rss_bytes()


def _method_inputs(method: ClusterMethod, keys: tuple[str, ...] | None,
                   model_digest: str | None) -> dict:
    """What a method stage depends on: the method, the params ``keys`` (None: all) and the
    model's content hash in place of its path."""
    params = dataclasses.asdict(method.params)
    if keys is not None:
        params = {key: params.get(key) for key in keys}
    params.pop("model", None)
    return {"method": method.name, "params": params, "model": model_digest}


def _row_slices(uri: str, ranges: list[tuple[int, int]], so: dict | None,
                sha256: str | None = None) -> list:
    """Refs to the per-partition slices of a stored (N,) array (loaded, and checked
    against the ``sha256`` its stage marker records, by a worker)."""
    full = load_array.remote(uri, so, sha256)
    return [slice_rows.remote(full, lo, hi) for lo, hi in ranges]


@dataclass
class _Scored:
    """The score stage's result: score refs, the graph they were computed on (the input
    graph, or a re-scored one), the node-features parts when emitted, the fingerprint."""

    scores: list
    graph: KnnManifest
    fingerprint: str
    feature_parts: str | None = None  # the parts manifest of emitted node features
    # a "stage" scorer: its directory, meta and its files' sha256 (for the link step)
    stage_dir: str | None = None
    stage_meta: dict = field(default_factory=dict)
    stage_digests: dict = field(default_factory=dict)


class Run:
    """One run over a split: its work area, stage store, Ray resources and stage log.

    ``prepare()`` runs plan + knn; ``cluster(method)`` the method's stages on that graph
    (call it again with another method or params: stages whose keys did not change are
    reused from the store)."""

    def __init__(self, inputs: Inputs, config: Config, work_dir: str,
                 num_cpus: int | None = None, stages: StageLog | None = None):
        self.inputs = inputs
        self.config = config
        self.work_dir = work_dir
        self.so = inputs.storage_options
        self.num_cpus = num_cpus
        self.stages = stages or StageLog()
        self.store = StageStore(work_dir, self.so)
        self.resources: dict = {}
        self.graph: KnnManifest | None = None
        self._similarity: SimilarityStats | None = None
        # "<method>.<param>" -> the value derived for an ``auto`` parameter and its basis
        self.derived: dict[str, dict] = {}
        self.shift_warnings: list[str] = []  # a model run on a graph unlike its training one

    @classmethod
    def on_graph(cls, graph: KnnManifest, info: FeatureInfo, config: Config,
                 work_dir: str) -> Run:
        """A run over an existing graph (benchmarks, tests): no plan or kNN stage; the
        graph's directory and shape stand in for the kNN stage's fingerprint."""
        run = cls(Inputs(info.uri, info, storage_options=info.storage_options), config,
                  work_dir)
        run.resources = init_ray()
        run.graph = graph
        run.store.fingerprints["knn"] = fingerprint(
            {"graph": graph.directory, "n_rows": graph.n_rows, "k": graph.k,
             "bounds": graph.bounds})
        return run

    @property
    def info(self) -> FeatureInfo:
        return self.inputs.info

    # ------------------------------------------------------------ plan and kNN
    def prepare(self) -> KnnManifest:
        """Ray, the parallel validation and the kNN graph."""
        self.resources = init_ray(self.num_cpus)
        self.validate()
        self.graph = self.knn()
        return self.graph

    def validate(self) -> None:
        """Plan stage: scan every row (NaN/Inf/zero norm), labels and ids in parallel, so
        bad input fails before the expensive kNN work; a completed scan of the same input
        versions (content hashes for small files) is reused."""
        info, store, inputs = self.info, self.store, self.inputs
        with self.stages.stage("plan", rows=info.n_rows) as rec:
            rec.extra["resources"] = {k: v for k, v in self.resources.items()
                                      if k in ("CPU", "GPU")}
            keys = {
                "features": info.uri, "version": store.features_version(info),
                "format": info.format, "n_rows": info.n_rows, "dim": info.dim,
                "labels": inputs.labels, "labels_version": store.input_version(inputs.labels),
            }
            fp, marker = store.lookup("plan", keys)
            rec.extra["fingerprint"] = fp
            if marker is not None:
                store.reuse("plan")
                rec.skipped = True
                return
            store.begin("plan")
            in_driver = driver_scans(inputs)  # already checked before Ray started
            rec.extra["checked_in_driver"] = sorted(in_driver)
            checks = []
            if "rows" not in in_driver:
                checks += [
                    _validate_chunk.remote(info, lo, min(lo + VALIDATE_CHUNK_ROWS, info.n_rows))
                    for lo in range(0, info.n_rows, VALIDATE_CHUNK_ROWS)
                ]
            if inputs.labels and "labels" not in in_driver:
                checks.append(_validate_labels.remote(inputs.labels, info.n_rows, self.so))
            if info.has_ids and "ids" not in in_driver:
                checks.append(_validate_ids.remote(info))
            rec.worker_peak_rss_bytes = max(wait_all(checks, "validate", "chunk"), default=0)
            store.finish("plan", fp, keys, {"n_rows": info.n_rows, "dim": info.dim})

    def knn(self) -> KnnManifest:
        """Import a precomputed learn-to-cluster graph when one is given and present, else
        build it on Ray; either way the graph lands in ``<work>/knn``. A completed graph for
        the same features, kNN keys and imported file is reused when its manifest and every
        block file are intact; else (a deleted ``_DONE`` too) it is made again."""
        cfg, info, store, so = self.config, self.info, self.store, self.so
        knn_file = self.inputs.knn
        with self.stages.stage("knn", rows=info.n_rows) as rec:
            knn_dir = join_uri(self.work_dir, "knn")
            use_import = bool(knn_file and cfg.knn.reuse and uri_exists(knn_file, so))
            # the features themselves, not the plan: new labels must not cost the graph
            keys = {"features": [info.uri, store.features_version(info), info.n_rows,
                                 info.dim],
                    **knn_graph_keys_for(info, cfg.knn, self.resources, cfg.seed),
                    "import": [knn_file, store.input_version(knn_file)] if use_import else None}
            fp, marker = store.lookup("knn", keys)
            rec.extra["fingerprint"] = fp
            manifest = load_manifest(knn_dir, so) if marker is not None else None
            if manifest is not None:
                store.reuse("knn")
                rec.skipped = True
                rec.extra["recall"] = manifest.recall
                return manifest
            store.begin("knn")
            if use_import:
                manifest, stats = import_ltc_knn(knn_file, info, cfg.knn, knn_dir)
            else:
                manifest, stats = build_knn_graph(info, cfg.knn, knn_dir, self.resources,
                                                  cfg.seed)
            rec.worker_peak_rss_bytes = stats.pop("worker_peak_rss_bytes", 0)
            block_digests = stats.pop("block_digests", None)  # (bytes, sha256) by block URI
            rec.extra.update(stats)
            store.finish("knn", fp, keys, {"source": manifest.source},
                         artifacts=graph_artifacts(manifest, block_digests))
        return manifest

    # ------------------------------------------------------------ label-free statistics
    def similarity(self) -> SimilarityStats:
        """The input graph's similarity histograms (:mod:`ltc_ray.graph.similarity_stats`),
        one task per partition, summed; computed once per run (one read of the graph)."""
        if self._similarity is not None:
            return self._similarity
        graph = self.graph
        ranges = partition_ranges(graph.n_rows, self.config.cluster, self._cpus())
        with self.stages.stage("graph_stats", rows=graph.n_rows) as rec:
            parts = wait_all([histogram_partition.remote(graph, lo, hi, self.so)
                              for lo, hi in ranges], "graph_stats", "partition")
            self._similarity = combine(graph.k, [counts for counts, _ in parts])
            rec.worker_peak_rss_bytes = max(rss for _, rss in parts)
            rec.extra["partitions"] = len(ranges)
            summary = self._similarity.summary()
            rec.extra["similarity"] = summary
        log.info("kNN similarities: median at rank 1 %.3f, at rank %d %.3f", summary["near"],
                 summary["far_rank"], summary["far"])
        if "warning" in summary:
            log.warning("%s", summary["warning"])
        return self._similarity

    def similarity_summary(self) -> dict | None:
        """The summary of :meth:`similarity` when this run computed it, else None."""
        return None if self._similarity is None else self._similarity.summary()

    def resolve(self, method: ClusterMethod) -> ClusterMethod:
        """``method`` with every ``auto`` parameter replaced by the value its label-free
        rule derives from this graph (logged; recorded in :attr:`derived` and run.json);
        for a learned method, the shift check of its training graph against this one."""
        trained = method.training_graph()
        if trained is not None:
            self.shift_warnings = [
                f"{method.name}: {line}"
                for line in shift_report(trained, self.similarity().summary())]
            autos = sorted(field_autos(type(method.params)))
            hint = (f"re-derive {', '.join(autos)} from this data with --set "
                    f"methods.{method.name}.<param>=auto" if autos else
                    "re-tune the model's threshold on labelled data like this "
                    "(jobs/tune.py --model)")
            for line in self.shift_warnings:
                log.warning("the data looks unlike the model's training data: %s (its "
                            "thresholds may not fit: %s)", line, hint)
        if not auto_fields(method.params):
            return method
        method, record = method.resolved(self.similarity())
        for field_name, entry in record.items():
            key = f"{method.name}.{field_name}"
            self.derived[key] = entry
            log.info("auto %s = %s  (%s; %s)", key, entry["value"], entry["rule"], ", ".join(
                f"{k} = {v}" for k, v in entry.items()
                if k.endswith(("_value", "count", "above_cut", "cut"))))
        return method

    def attach_threshold(self, method: ClusterMethod) -> float | None:
        """The singleton-attach step's cut for ``method`` (None: the step is off):
        ``cluster.attach_singletons`` auto = the method's shape (``attach_singletons``), by
        default on for label-free methods and off for learned ones; an ``auto`` threshold
        is derived like a method's (recorded the same way)."""
        cfg = self.config.cluster
        shape = method.shape
        default = (shape.attach_singletons if shape.attach_singletons is not None
                   else not shape.uses_model)
        on = cfg.attach_singletons == "on" or (cfg.attach_singletons == "auto" and default)
        if not on:
            return None
        if cfg.attach_threshold != AUTO:
            return float(cfg.attach_threshold)
        value, basis = derive(ATTACH_RULE, self.similarity())
        self.derived["cluster.attach_threshold"] = {"value": value, **basis,
                                                    "rule": ATTACH_RULE.describe()}
        log.info("auto cluster.attach_threshold = %.3f  (%s)", value, ATTACH_RULE.describe())
        return value

    # ------------------------------------------------------------ the method's stages
    def cluster(self, method: ClusterMethod) -> ClusterRefs:
        """Score, (second graph), link and merge ``method`` on the prepared graph (its
        ``auto`` parameters derived first: :meth:`resolve`). A work file found damaged
        while a stage reads it is a WorkFileError that drops the marker vouching for it
        (:meth:`StageStore.heals`), so the rerun computes it again."""
        if self.graph is None:
            raise RuntimeError("Run.prepare() must run before Run.cluster()")
        self.derived, self.shift_warnings = {}, []  # this call's, not an earlier trial's
        method = self.resolve(method)
        with self.store.heals():
            model_uri = method.model_uri()
            model_digest = tree_digest(model_uri, self.so) if model_uri else None
            ranges = partition_ranges(self.graph.n_rows, self.config.cluster, self._cpus())
            scored = self._score(method, ranges, model_digest)
            graph, link_info, upstream = self._link_graph(method, scored)
            return self._link(method, ranges, scored, graph, link_info, upstream, model_digest)

    def _cpus(self) -> float:
        return float(self.resources.get("CPU", 1))

    def _gpus(self) -> float:
        return float(self.resources.get("GPU", 0)) if self.config.knn.gpu == "auto" else 0.0

    def _score(self, method: ClusterMethod, ranges: list[tuple[int, int]],
               model_digest: str | None) -> _Scored:
        shape, store, so, stages = method.shape, self.store, self.so, self.stages
        n = self.graph.n_rows
        keys = {"upstream": store.fingerprints.get("knn"),
                **_method_inputs(method, shape.score_params, model_digest)}
        fp, marker = store.lookup("score", keys)
        scores_uri = store.uri("score", "scores.npy")
        rescored_dir = join_uri(self.work_dir, "knn-rescored")
        stage_dir = join_uri(self.work_dir, "score-stage") if shape.score == "stage" else None
        feature_dir = join_uri(self.work_dir, "node-features")
        parts_uri = join_uri(feature_dir, "features.parts.json")
        graph = self.graph
        if marker is not None and shape.score == "rescore":
            graph = load_manifest(rescored_dir, so)
            if graph is None:
                marker = None  # the re-scored graph is gone: score again
        if marker is not None:
            scores = _row_slices(scores_uri, ranges, so, store.sha256(marker, scores_uri))
            if store.loads_intact("score", scores):
                with stages.stage("score", rows=n) as rec:
                    store.reuse("score")
                    rec.skipped = True
                    rec.extra["fingerprint"] = fp
                digests = {uri: entry.get("sha256")
                           for uri, entry in marker.get("artifacts", {}).items()}
                return _Scored(scores, graph, fp,
                               parts_uri if shape.node_features else None, stage_dir,
                               marker["meta"].get("method", {}), digests)
        store.begin("score")
        artifacts: dict = {}
        meta: dict = {"partitions": len(ranges)}
        ctx = RescoreContext(self.info, self.graph, ranges, self._cpus(), self._gpus(),
                             rescored_dir if shape.score == "rescore" else stage_dir,
                             knn_config=self.config.knn, resources=self.resources,
                             seed=int(self.config.seed),
                             tools=stage_tools(so, self.resources, int(self.config.seed)),
                             feature_dir=feature_dir if shape.node_features else None)
        if shape.score in ("rescore", "stage"):
            _remove(ctx.out_dir, so)
            with stages.stage("score", rows=n) as rec:
                if shape.score == "rescore":
                    if shape.node_features:
                        _remove(feature_dir, so)
                    out = method.rescore_graph(ctx)
                    graph = out.graph
                    artifacts.update(graph_artifacts(graph))
                    if shape.node_features:  # the parts manifest and every part file
                        write_parts_manifest(parts_uri, out.feature_width, out.feature_parts,
                                             so)
                        artifacts.update(dict.fromkeys(
                            [parts_uri, *(join_uri(feature_dir, part[2])
                                          for part in out.feature_parts)]))
                else:
                    out = method.stage_scores(ctx)
                    artifacts.update(dict.fromkeys(out.artifacts))
                    meta["method"] = out.meta
                scores = out.scores
                rec.worker_peak_rss_bytes = max(out.stats.get("actor_peak_rss_bytes", [0]))
                rec.extra.update(out.stats, partitions=len(ranges), fingerprint=fp)
        else:
            scores, parts, width = score_stage(method, self.graph, ranges, self._cpus(), so, stages,
                                        info=self.info,
                                        feature_dir=feature_dir if shape.node_features else None,
                                        gpus=self._gpus())
            stages.stages["score"].extra["fingerprint"] = fp
            if shape.node_features:  # the parts manifest and every part file
                write_parts_manifest(parts_uri, width, parts, so)
                artifacts.update(dict.fromkeys(
                    [parts_uri, *(join_uri(feature_dir, part[2]) for part in parts)]))
        artifacts[scores_uri] = ray_get(save_concat.remote(scores_uri, so, *scores))
        store.finish("score", fp, keys, meta, artifacts=artifacts)
        marker = store._read_marker("score") if shape.score == "stage" else None
        digests = {uri: entry.get("sha256")
                   for uri, entry in (marker or {}).get("artifacts", {}).items()}
        return _Scored(scores, graph, fp, parts_uri if shape.node_features else None,
                       stage_dir, meta.get("method", {}), digests)

    def _link_graph(self, method: ClusterMethod, scored: _Scored
                    ) -> tuple[KnnManifest, FeatureInfo | None, str]:
        """The graph the link step reads, the node features' info (when emitted) and the
        fingerprint the link stage hangs on."""
        shape, store, so, info = method.shape, self.store, self.so, self.info
        link_info = None
        if scored.feature_parts is not None:
            link_info = inspect_features(scored.feature_parts, storage_options=so,
                                         internal_parts=True)
        if shape.link_graph == "scored":
            return scored.graph, link_info, scored.fingerprint
        on_input = shape.link_graph == "input"
        knn_cfg = dataclasses.replace(
            self.config.knn, k=min(shape.link_k or self.config.knn.k, info.n_rows - 1))
        graph_dir = join_uri(self.work_dir,
                             f"knn-{'input' if on_input else 'features'}-k{knn_cfg.k}")
        keys = {"upstream": store.fingerprints.get("knn") if on_input else scored.fingerprint,
                "on": "input" if on_input else "features",
                **knn_graph_keys_for(info if on_input else link_info, knn_cfg, self.resources,
                                     self.config.seed)}
        fp, marker = store.lookup("knn_features", keys)
        with self.stages.stage("knn_features", rows=info.n_rows) as rec:
            rec.extra["fingerprint"] = fp
            graph = load_manifest(graph_dir, so) if marker is not None else None
            if graph is not None:
                store.reuse("knn_features")
                rec.skipped = True
            else:
                store.begin("knn_features")
                graph, stats = build_knn_graph(info if on_input else link_info, knn_cfg,
                                               graph_dir, self.resources, self.config.seed)
                rec.worker_peak_rss_bytes = stats.pop("worker_peak_rss_bytes", 0)
                block_digests = stats.pop("block_digests", None)
                rec.extra.update(stats)
                store.finish("knn_features", fp, keys,
                             artifacts=graph_artifacts(graph, block_digests))
        return graph, link_info, fp

    def _link(self, method: ClusterMethod, ranges: list[tuple[int, int]], scored: _Scored,
              graph: KnnManifest, link_info: FeatureInfo | None, upstream: str,
              model_digest: str | None) -> ClusterRefs:
        store, so, n = self.store, self.so, graph.n_rows
        attach = self.attach_threshold(method)
        keys = {"upstream": upstream, **_method_inputs(method, None, model_digest),
                "attach_singletons": attach}
        fp, marker = store.lookup("link", keys)
        names = ("parents.npy", "cluster_id.npy", "sizes.npy", "representatives.npy")
        parents_uri, cid_uri, sizes_uri, reps_uri = (store.uri("link", name) for name in names)
        if marker is not None:
            sha = {uri: store.sha256(marker, uri)
                   for uri in (parents_uri, cid_uri, sizes_uri, reps_uri)}
            refs = ClusterRefs(
                ranges=ranges, scores=scored.scores,
                parents=_row_slices(parents_uri, ranges, so, sha[parents_uri]),
                cluster_id=load_array.remote(cid_uri, so, sha[cid_uri]),
                summary=load_pair.remote(sizes_uri, reps_uri, so, sha[sizes_uri],
                                         sha[reps_uri]),
                n_clusters=int(marker["meta"]["n_clusters"]),
            )
            if store.loads_intact("link", [*refs.parents, refs.cluster_id, refs.summary]):
                with self.stages.stage("link", rows=n) as rec:
                    store.reuse("link")
                    rec.skipped = True
                    rec.extra["fingerprint"] = fp
                return refs
        store.begin("link")
        refs = link_merge_stage(method, graph, ranges, scored.scores, self.config.cluster, so,
                                self.stages, info=link_info, cpus=self._cpus(),
                                features=self.info, gpus=self._gpus(),
                                stage=(scored.stage_dir, scored.stage_meta,
                                       scored.stage_digests))
        if attach is not None:  # on the input graph: the similarity scale the cut is on
            refs = attach_singletons(refs, self.graph, attach, so, self.stages)
        parents_digest, cid_digest, (sizes_digest, reps_digest) = ray_get([
            save_concat.remote(parents_uri, so, *refs.parents),
            save_concat.remote(cid_uri, so, refs.cluster_id),
            save_pair.remote(sizes_uri, reps_uri, so, refs.summary)])
        self.stages.stages["link"].extra["fingerprint"] = fp
        store.finish("link", fp, keys, {"n_clusters": refs.n_clusters},
                     artifacts={parents_uri: parents_digest, cid_uri: cid_digest,
                                sizes_uri: sizes_digest, reps_uri: reps_digest})
        return refs


def _remove(uri: str, so: dict | None) -> None:
    fs, path = url_to_fs(uri, so)
    if fs.exists(path):
        fs.rm(path, recursive=True)
