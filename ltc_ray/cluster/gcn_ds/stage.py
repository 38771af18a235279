"""GCN-D/GCN-S on Ray: proposals, proposal scoring on partition actors, de-overlap.

* **Proposals.** Per setting, partition tasks cut their own kNN rows into edges and the
  size-constrained components run over them with the global merge machinery
  (:mod:`ltc_ray.cluster.constrained`): a proposal may span partitions. Iteration-1
  settings build their super vertices' mean features by a shuffle (partial sums per
  node partition, summed per super-vertex range; never the whole matrix in one place),
  a sharded kNN among them (:func:`~ltc_ray.pipeline.knn_stage.build_knn_graph`), then
  the same constrained components. Every setting is written as one Parquet file
  (``proposal_id``, ``setting``, ``sample_id`` = the row), never a file per proposal.
* **Scoring.** A partition actor scores the proposals whose smallest member it owns,
  fetching the members' features and kNN rows from their owners (a halo).
* **De-overlap.** Per node partition, each sample takes its best proposal; one task
  finds each chosen proposal's smallest chooser; every sample's parent is that sample,
  so the global merge yields exactly the chosen proposals as clusters.

Everything equals the single-process definitions of :mod:`.proposals` (tested).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ltc_ray.cluster.constrained import constrained_components_ray
from ltc_ray.cluster.gcn_ds.proposals import (
    fixed_point,
    normalise_rows,
    row_edges,
    table_from_labels,
)
from ltc_ray.cluster.gcn_ds.settings import ProposalSetting
from ltc_ray.errors import WorkFileError
from ltc_ray.graph.knn_graph import KnnManifest, read_knn_rows
from ltc_ray.io.features import (
    FeatureInfo,
    inspect_features,
    read_features,
    write_feature_part,
    write_parts_manifest,
)
from ltc_ray.io.fs import join_uri, open_uri
from ltc_ray.runtime import peak_rss_bytes, ray_get, wait_all

__all__ = ["ProposalRefs", "build_proposals", "deoverlap_parents", "load_proposals",
           "score_proposals", "table_uri"]

log = logging.getLogger("ltc_ray")


@dataclass
class ProposalRefs:
    """Per setting: refs to its ``members`` and ``offsets`` (see :mod:`.proposals`) and
    its proposal count; a proposal's global id is its setting's ``start`` plus its row."""

    settings: list[ProposalSetting]
    members: list
    offsets: list
    counts: list[int]
    stats: dict = field(default_factory=dict)

    @property
    def starts(self) -> list[int]:
        return [int(s) for s in np.r_[0, np.cumsum(self.counts)[:-1]]] if self.counts else []

    @property
    def total(self) -> int:
        return int(sum(self.counts))


def table_uri(directory: str, index: int) -> str:
    return join_uri(directory, f"setting-{index:02d}.parquet")


# ----------------------------------------------------------------- proposals
@ray.remote(num_returns=2, max_retries=3)
def _row_edges(graph: KnnManifest, lo: int, hi: int, so: dict | None, k: int, th: float):
    ids, sims = read_knn_rows(graph, lo, hi, so)
    src, dst, w = row_edges(np.arange(lo, hi, dtype=np.int64), ids, sims, k, th)
    return (src, dst, w), float(w.min()) if len(w) else 1.0


def _labels(graph: KnnManifest, ranges, so, k: int, th: float, max_size: int, step: float):
    outs = [_row_edges.remote(graph, lo, hi, so, k, th) for lo, hi in ranges]
    low = min(ray_get([o[1] for o in outs]))
    return constrained_components_ray(graph.n_rows, [o[0] for o in outs], low, max_size,
                                      step)


@ray.remote(num_returns=3, max_retries=3)
def _table(label: np.ndarray, sizes: tuple[int, int], index: int,
           sv_of: np.ndarray | None = None, sv_label: np.ndarray | None = None,
           sv_sizes: tuple[int, int] | None = None):
    if sv_of is None:
        table = table_from_labels(label, sizes, index)
    else:
        table = table_from_labels(sv_label[sv_of], sizes, index,
                                  count_of=np.bincount(sv_label, minlength=len(sv_label)),
                                  keep_counts=sv_sizes)
    return table.members, table.offsets, len(table)


@ray.remote(num_returns=2, max_retries=3)
def _super_vertices(label: np.ndarray):
    uniq, sv_of = np.unique(label, return_inverse=True)
    return sv_of.reshape(-1).astype(np.int64), len(uniq)


def _sv_bounds(s: int, parts: int) -> np.ndarray:
    return np.linspace(0, s, max(1, min(parts, s)) + 1).round().astype(np.int64)


@ray.remote(max_retries=3)
def _sv_partial(info: FeatureInfo, lo: int, hi: int, sv_of: np.ndarray,
                sv_bounds: np.ndarray):
    """This node range's feature sums per super vertex, one return per super-vertex
    range (``num_returns`` = the ranges)."""
    x = fixed_point(read_features(info, lo, hi))
    sv = sv_of[lo:hi]
    order = np.argsort(sv, kind="stable")
    sv, x = sv[order], x[order]
    starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]]) if len(sv) else np.empty(0, int)
    ids, sums = sv[starts], np.add.reduceat(x, starts, axis=0) if len(sv) else x[:0]
    cuts = np.searchsorted(ids, sv_bounds)
    out = tuple((ids[a:b], sums[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True))
    return out if len(out) > 1 else out[0]


@ray.remote(max_retries=3)
def _sv_part(index: int, a: int, b: int, dim: int, directory: str, so: dict | None,
             *pieces: tuple) -> tuple:
    sums = np.zeros((b - a, dim), dtype=np.int64)
    for ids, part in pieces:
        if len(ids):
            np.add.at(sums, ids - a, part)
    return write_feature_part(directory, index, a, normalise_rows(sums), so)


def _super_vertex_graph(info: FeatureInfo, ranges, label, k: int, knn_cfg, build_graph,
                        directory: str) -> tuple[object, KnnManifest | None, int]:
    """(sv_of ref, the super vertices' kNN graph (None: fewer than two), S)."""
    so = info.storage_options
    sv_of, count = _super_vertices.remote(label)
    s = int(ray_get(count))
    if s < 2:
        return sv_of, None, s
    bounds = _sv_bounds(s, len(ranges))
    parts = len(bounds) - 1
    partial = [_sv_partial.options(num_returns=parts).remote(info, lo, hi, sv_of, bounds)
               for lo, hi in ranges]
    partial = [p if parts > 1 else [p] for p in partial]
    feature_dir = join_uri(directory, "features")
    entries = ray_get([_sv_part.remote(j, int(a), int(b), info.dim, feature_dir, so,
                                       *[p[j] for p in partial])
                       for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))])
    parts_uri = join_uri(feature_dir, "features.parts.json")
    write_parts_manifest(parts_uri, info.dim, entries, so)
    sv_info = inspect_features(parts_uri, storage_options=so, internal_parts=True)
    cfg = dataclasses.replace(knn_cfg, k=min(k, s))
    graph = build_graph(sv_info, cfg, join_uri(directory, f"knn-k{cfg.k}"))
    return sv_of, graph, s


@ray.remote(max_retries=3)
def _write_table(uri: str, so: dict | None, members: np.ndarray, offsets: np.ndarray,
                 index: int, start: int) -> int:
    pid = np.repeat(np.arange(start, start + len(offsets) - 1, dtype=np.int64),
                    np.diff(offsets))
    table = pa.table({"proposal_id": pid, "setting": np.full(len(pid), index, np.int16),
                      "sample_id": members.astype(np.int64)})
    with open_uri(uri, "wb", so) as f:
        pq.write_table(table, f)
    return len(pid)


def build_proposals(info: FeatureInfo, graph: KnnManifest, settings: list[ProposalSetting],
                    ranges: list[tuple[int, int]], knn_cfg, build_graph,
                    directory: str) -> ProposalRefs:
    """Every setting's proposals (refs), written as Parquet under ``directory``;
    ``build_graph(info, knn_config, directory)`` builds the super vertices' kNN graphs."""
    so = info.storage_options
    base_labels: dict[ProposalSetting, object] = {}
    sv_graphs: dict[ProposalSetting, tuple] = {}
    members, offsets, counts, stats = [], [], [], {"settings": []}
    for index, setting in enumerate(settings):
        base = setting.base
        if base not in base_labels:
            base_labels[base] = _labels(graph, ranges, so, base.k, base.th, base.max_size,
                                        base.step)
        label, rounds = base_labels[base]
        entry = {"setting": setting.describe(), "rounds": rounds}
        if setting.iteration == 0:
            m, o, c = _table.remote(label, (setting.min_size, setting.max_size), index)
        else:
            if base not in sv_graphs:
                k = max(s.sv_k for s in settings if s.base == base and s.sv_k)
                sv_graphs[base] = _super_vertex_graph(
                    info, ranges, label, k, knn_cfg, build_graph,
                    join_uri(directory, f"super-vertices-{len(sv_graphs):02d}"))
            sv_of, sv_graph, s = sv_graphs[base]
            if sv_graph is None:
                sv_label, sv_rounds = ray.put(np.arange(s, dtype=np.int64)), 0
            else:
                sv_ranges = [(int(a), int(b)) for a, b in
                             zip(*(lambda b: (b[:-1], b[1:]))(_sv_bounds(s, len(ranges))),
                                 strict=True)]
                sv_label, sv_rounds = _labels(sv_graph, sv_ranges, so, setting.sv_k,
                                              setting.sv_th, setting.sv_max_size, setting.step)
            entry.update(super_vertices=s, sv_rounds=sv_rounds)
            m, o, c = _table.remote(None, (setting.min_size, setting.sv_max_members), index,
                                    sv_of, sv_label, (setting.sv_min_size, setting.sv_max_size))
        members.append(m)
        offsets.append(o)
        counts.append(c)
        stats["settings"].append(entry)
    counts = [int(c) for c in ray_get(counts)]
    refs = ProposalRefs(list(settings), members, offsets, counts, stats)
    written = ray_get([_write_table.remote(table_uri(directory, i), so, m, o, i, start)
                       for i, (m, o, start) in enumerate(zip(members, offsets, refs.starts,
                                                             strict=True))])
    for entry, count, rows in zip(stats["settings"], counts, written, strict=True):
        entry.update(proposals=count, members=rows)
    stats["proposals"] = refs.total
    return refs


@ray.remote(num_returns=2, max_retries=3)
def _read_table(uri: str, so: dict | None, sha256: str | None):
    import hashlib
    import io

    try:
        with open_uri(uri, "rb", so) as f:
            data = f.read()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("content differs from what the stage wrote")
        table = pq.read_table(io.BytesIO(data), columns=["proposal_id", "sample_id"])
    except Exception as exc:  # a damaged work file: the stage is computed again
        raise WorkFileError(uri, f"unreadable proposals ({exc})") from None
    pid = table.column("proposal_id").to_numpy()
    starts = np.flatnonzero(np.r_[True, pid[1:] != pid[:-1]]) if len(pid) else np.empty(0, int)
    return (table.column("sample_id").to_numpy().astype(np.int64),
            np.r_[starts, len(pid)].astype(np.int64))


def load_proposals(directory: str, settings: list[ProposalSetting], counts: list[int],
                   so: dict | None, digests: dict | None = None) -> ProposalRefs:
    """The proposals a finished stage wrote (refs, loaded by workers; checked against
    the sha256 ``digests`` its marker records)."""
    digests = digests or {}
    outs = [_read_table.remote(table_uri(directory, i), so,
                               digests.get(table_uri(directory, i)))
            for i in range(len(settings))]
    return ProposalRefs(list(settings), [o[0] for o in outs], [o[1] for o in outs],
                        list(counts))


# ----------------------------------------------------------------- scoring on actors
def _owned(members: np.ndarray, offsets: np.ndarray, start: int, stop: int):
    """The proposals whose smallest member lies in ``[start, stop)``: (first row, CSR)."""
    first = members[offsets[:-1]]
    a, b = np.searchsorted(first, start), np.searchsorted(first, stop)
    sub = offsets[a : b + 1]
    return a, sub - sub[0], members[sub[0] : sub[-1]]


def _score_job(actor, fetch, method, n_settings: int, *tables):
    """On a partition actor: score (and segment) the proposals it owns, every setting in
    one pass so batches mix settings; returns per setting (scores, keep) and stats."""
    members, offsets = tables[:n_settings], tables[n_settings:]
    owned = [_owned(m, o, actor.start, actor.stop) for m, o in zip(members, offsets,
                                                                   strict=True)]
    sizes = np.concatenate([np.diff(o) for _, o, _ in owned])
    all_members = np.concatenate([m for _, _, m in owned])
    all_offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    needed = np.unique(all_members)
    feats_of, rows_of = fetch(needed)
    scores, keep = method.score_proposals(all_offsets, all_members, feats_of, rows_of)
    out, p, m = [], 0, 0
    for _, o, mem in owned:
        out.append((scores[p : p + len(o) - 1], keep[m : m + len(mem)]))
        p, m = p + len(o) - 1, m + len(mem)
    stats = {"proposals": int(len(sizes)), "members": int(len(all_members)),
             "halo": int(np.count_nonzero((needed < actor.start) | (needed >= actor.stop))),
             "peak_rss": peak_rss_bytes()}
    return out, stats


@ray.remote(num_returns=2, max_retries=3)
def _gather_setting(index: int, *outs):
    return (np.concatenate([o[index][0] for o in outs]).astype(np.float32),
            np.concatenate([o[index][1] for o in outs]).astype(np.float32))


@ray.remote(max_retries=3)
def _node_scores(n: int, n_settings: int, *refs):
    """Per sample, the best score of a proposal holding it (0 when none): the score the
    output's representatives are chosen by."""
    best = np.full(n, -np.inf, dtype=np.float32)
    members, offsets, scores = (refs[i * n_settings:(i + 1) * n_settings] for i in range(3))
    for m, o, s in zip(members, offsets, scores, strict=True):
        np.maximum.at(best, m, np.repeat(s, np.diff(o)))
    return np.where(np.isfinite(best), best, 0.0).astype(np.float32)


def score_proposals(method, info: FeatureInfo, graph: KnnManifest, refs: ProposalRefs,
                    ranges: list[tuple[int, int]], cpus: float, gpus: float, tools
                    ) -> tuple[list, list, list, dict]:
    """(score refs per setting, keep refs per setting, node-score refs per partition,
    stats): the method's ``score_proposals`` on one partition actor per range
    (``tools``: :class:`~ltc_ray.cluster.base.StageTools`)."""
    n_settings = len(refs.settings)
    actors, bounds = tools.start_actors(info, graph, ranges, cpus, gpus)
    method_ref = ray.put(method)
    pairs = [a.run.options(num_returns=2).remote(_score_job, actors, bounds, i, method_ref,
                                                 n_settings, *refs.members, *refs.offsets)
             for i, a in enumerate(actors)]
    stats = wait_all([p[1] for p in pairs], f"score ({method.name})", "partition")
    for actor in actors:
        ray.kill(actor)
    outs = [p[0] for p in pairs]
    gathered = [_gather_setting.remote(i, *outs) for i in range(n_settings)]
    scores, keep = [g[0] for g in gathered], [g[1] for g in gathered]
    node = _node_scores.remote(graph.n_rows, n_settings, *refs.members, *refs.offsets, *scores)
    node_parts = [tools.slice_rows(node, lo, hi) for lo, hi in ranges]
    summary = {"actor_peak_rss_bytes": [s["peak_rss"] for s in stats],
               "halo_rows": sum(s["halo"] for s in stats),
               "scored_proposals": sum(s["proposals"] for s in stats)}
    return scores, keep, node_parts, summary


# ----------------------------------------------------------------- de-overlap
@ray.remote(num_returns=3, max_retries=3)
def _by_node(n: int, start: int, members: np.ndarray, offsets: np.ndarray,
             scores: np.ndarray, keep: np.ndarray):
    """One setting's proposal (global id), score and keep probability per sample."""
    sizes = np.diff(offsets)
    pid = np.full(n, -1, dtype=np.int64)
    score = np.full(n, -np.inf, dtype=np.float32)
    kept = np.zeros(n, dtype=np.float32)
    pid[members] = start + np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    score[members] = np.repeat(scores, sizes)
    kept[members] = keep
    return pid, score, kept


def choose(pid: np.ndarray, score: np.ndarray, kept: np.ndarray, keep_threshold: float,
           min_score: float) -> np.ndarray:
    """Per sample (rows) over settings (columns): the proposal with the best score among
    those that keep it (> ``keep_threshold``) and score >= ``min_score``; ties go to the
    lower proposal id; -1 when none."""
    if pid.shape[1] == 0:
        return np.full(len(pid), -1, dtype=np.int64)
    ok = (pid >= 0) & (kept > keep_threshold) & (score >= min_score)
    key = np.where(ok, score.astype(np.float64), -np.inf)
    tied = ok & (key == key.max(axis=1, keepdims=True))
    lowest = np.where(tied, pid, np.iinfo(np.int64).max).min(axis=1)
    return np.where(tied.any(axis=1), lowest, -1).astype(np.int64)


@ray.remote(num_returns=2, max_retries=3)
def _choose_partition(lo: int, hi: int, keep_threshold: float, min_score: float,
                      n_settings: int, *by_node):
    cols = [by_node[3 * i : 3 * i + 3] for i in range(n_settings)]
    pid = np.stack([c[0][lo:hi] for c in cols], axis=1)
    score = np.stack([c[1][lo:hi] for c in cols], axis=1)
    kept = np.stack([c[2][lo:hi] for c in cols], axis=1)
    chosen = choose(pid, score, kept, keep_threshold, min_score).astype(np.int64)
    has = chosen >= 0
    # rows are ascending: the first occurrence of a proposal is its smallest chooser here
    uniq, first = np.unique(chosen[has], return_index=True)
    return chosen, (uniq, np.flatnonzero(has)[first] + lo)


@ray.remote(max_retries=3)
def _first_choosers(total: int, *pairs):
    first = np.full(total, np.iinfo(np.int64).max, dtype=np.int64)
    for uniq, node in pairs:
        np.minimum.at(first, uniq, node)
    return first


@ray.remote(num_returns=2, max_retries=3)
def _parents(lo: int, chosen: np.ndarray, first: np.ndarray):
    node = np.arange(lo, lo + len(chosen), dtype=np.int64)
    target = np.where(chosen >= 0, first[np.maximum(chosen, 0)], node)
    parent = np.where(target != node, target, -1)
    link = parent >= 0
    return parent, (node[link], parent[link])


def deoverlap_parents(refs: ProposalRefs, scores: list, keep: list, n: int,
                      ranges: list[tuple[int, int]], keep_threshold: float,
                      min_score: float) -> tuple[list, list, list]:
    """(parent refs, edge refs, chosen refs) per partition: every sample's parent is the
    smallest sample that chose the same proposal (-1 for that one and the unassigned)."""
    by_node = []
    for m, o, s, k, start in zip(refs.members, refs.offsets, scores, keep, refs.starts,
                                 strict=True):
        by_node.extend(_by_node.remote(n, start, m, o, s, k))
    outs = [_choose_partition.remote(lo, hi, keep_threshold, min_score, len(refs.settings),
                                     *by_node) for lo, hi in ranges]
    first = _first_choosers.remote(max(refs.total, 1), *[o[1] for o in outs])
    linked = [_parents.remote(lo, o[0], first) for (lo, _), o in zip(ranges, outs, strict=True)]
    return [p[0] for p in linked], [p[1] for p in linked], [o[0] for o in outs]
