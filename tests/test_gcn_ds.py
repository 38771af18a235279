"""GCN-D/GCN-S's proposals and de-overlap: the array code equals straightforward
set-based definitions, the Ray stage equals the array code for 1 and many partitions,
and a new de-overlap setting reuses the proposals and their scores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _data import blobs, write_bin
from test_constrained import reference as constrained_reference

from ltc_ray.cluster.gcn_ds.proposals import (
    ProposalTable,
    deoverlap,
    generate_proposals,
)
from ltc_ray.cluster.gcn_ds.settings import PRESETS, ProposalSetting, map_cuts
from ltc_ray.knn import exact_knn

K = 12
SETTINGS = [
    ProposalSetting(k=K, th=0.55, max_size=25, min_size=3),
    ProposalSetting(k=8, th=0.65, max_size=12, min_size=2, step=0.1),
    ProposalSetting(k=K, th=0.55, max_size=25, sv_k=3, sv_th=0.2, sv_max_size=4),
    ProposalSetting(k=K, th=0.6, max_size=10, sv_k=2, sv_th=0.3, sv_max_size=3,
                    sv_max_members=20),
]


@pytest.fixture(scope="module")
def data():
    x, labels = blobs(n_per=25, n_clusters=16, dim=24, spread=0.7, seed=4)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # what the job reads: unit rows
    ids, sims = exact_knn(x, K)
    return x, labels, ids, sims


def proposals_by_hand(x, ids, sims, setting: ProposalSetting) -> set[frozenset]:
    """One setting straight from the description: edges, the set-based constrained
    components, super vertices as Python groups with a brute-force kNN among them."""
    n = len(x)
    src, dst, w = [], [], []
    for i in range(n):
        for j, s in zip(ids[i, 1 : setting.k], sims[i, 1 : setting.k], strict=True):
            if j >= 0 and j != i and s >= setting.th:
                src.append(i)
                dst.append(int(j))
                w.append(float(s))
    label, _ = constrained_reference(n, np.array(src, int), np.array(dst, int),
                                     np.array(w, np.float32), setting.max_size, setting.step)
    groups: dict[int, set] = {}
    for i, lab in enumerate(label.tolist()):
        groups.setdefault(lab, set()).add(i)
    if setting.sv_k is None:
        return {frozenset(g) for g in groups.values()
                if setting.min_size <= len(g) <= setting.max_size}
    svs = [sorted(g) for _, g in sorted(groups.items())]
    feats = np.array([x[g].astype(np.float64).mean(axis=0) for g in svs])
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    sim = feats @ feats.T
    s_src, s_dst, s_w = [], [], []
    for a in range(len(svs)):
        order = sorted(range(len(svs)), key=lambda b: (-sim[a, b], b))[: setting.sv_k]
        for b in order:
            if b != a and sim[a, b] >= setting.sv_th:
                s_src.append(a)
                s_dst.append(b)
                s_w.append(sim[a, b])
    sv_label, _ = constrained_reference(len(svs), np.array(s_src, int), np.array(s_dst, int),
                                        np.array(s_w, np.float32), setting.sv_max_size,
                                        setting.step)
    out = set()
    for lab in set(sv_label.tolist()):
        parts = [svs[a] for a in range(len(svs)) if sv_label[a] == lab]
        members = frozenset(itertools.chain.from_iterable(parts))
        if (setting.sv_min_size <= len(parts) <= setting.sv_max_size
                and setting.min_size <= len(members) <= setting.sv_max_members):
            out.add(members)
    return out


def as_sets(table: ProposalTable, setting: int) -> set[frozenset]:
    rows = np.flatnonzero(table.setting == setting)
    return {frozenset(table.members[table.offsets[p] : table.offsets[p + 1]].tolist())
            for p in rows}


def test_proposals_equal_the_straightforward_definition(data):
    x, _, ids, sims = data
    table = generate_proposals(x, ids, sims, SETTINGS)
    for index, setting in enumerate(SETTINGS):
        want = proposals_by_hand(x, ids, sims, setting)
        assert want, f"setting {index} makes no proposals: the check would be vacuous"
        assert as_sets(table, index) == want, index
    # the table's own invariants: settings in order, members ascending, by smallest member
    assert np.all(np.diff(table.setting) >= 0)
    for p in range(len(table)):
        m = table.members[table.offsets[p] : table.offsets[p + 1]]
        assert np.all(np.diff(m) > 0)
    for s in range(len(SETTINGS)):
        rows = np.flatnonzero(table.setting == s)
        firsts = table.members[table.offsets[rows]]
        assert np.all(np.diff(firsts) > 0)
        # within a setting proposals are disjoint
        assert len(np.unique(np.concatenate([table.members[table.offsets[p]:
                                                           table.offsets[p + 1]]
                                             for p in rows]))) == table.sizes[rows].sum()


def sequential_deoverlap(table, scores, n, keep=None, keep_threshold=0.5, min_score=-np.inf):
    """learn-to-cluster's loop: proposals by descending score, each takes its members
    that are still free."""
    chosen = np.full(n, -1)
    for p in sorted(range(len(table)), key=lambda p: (-scores[p], p)):
        if scores[p] < min_score:
            continue
        for pos in range(table.offsets[p], table.offsets[p + 1]):
            node = table.members[pos]
            if chosen[node] == -1 and (keep is None or keep[pos] > keep_threshold):
                chosen[node] = p
    return chosen


@pytest.mark.parametrize("seed", [0, 1])
def test_deoverlap_equals_the_sequential_definition(data, seed):
    x, _, ids, sims = data
    table = generate_proposals(x, ids, sims, SETTINGS)
    rng = np.random.default_rng(seed)
    scores = rng.choice([0.2, 0.5, 0.9], len(table)).astype(np.float32)  # many ties
    keep = rng.random(len(table.members)).astype(np.float32)
    for kw in ({}, {"keep": keep}, {"keep": keep, "keep_threshold": 0.3, "min_score": 0.5}):
        want = sequential_deoverlap(table, scores, len(x), **kw)
        np.testing.assert_array_equal(deoverlap(table, scores, len(x), **kw), want)


def test_map_cuts_keeps_a_cut_between_the_anchors():
    moved = map_cuts(PRESETS["2"], (0.2, 0.8), (0.1, 0.4))
    assert [s.th for s in moved] == [pytest.approx(0.1 + 0.5 / 0.6 * 0.3),
                                     pytest.approx(0.1 + 0.55 / 0.6 * 0.3)]
    assert map_cuts(PRESETS["2"], (0.2, 0.8), (0.2, 0.8)) == PRESETS["2"]
    with pytest.raises(ValueError):
        ProposalSetting(th=1.5)
    assert len(PRESETS["8"]) == 8 and len(PRESETS["20"]) == 20


@pytest.fixture(scope="module")
def graph_on_disk(ray_local, data, tmp_path_factory):
    from ltc_ray.config import KnnConfig
    from ltc_ray.io.features import inspect_features
    from ltc_ray.pipeline.knn_stage import build_knn_graph

    x, labels, _, _ = data
    root = tmp_path_factory.mktemp("gcnds")
    write_bin(root / "x.bin", x, labels)
    info = inspect_features(str(root / "x.bin"), dim=x.shape[1])
    cfg = KnnConfig(k=K, block_rows=128)
    graph, _ = build_knn_graph(info, cfg, str(root / "knn"), {"CPU": 2}, 0)
    return root, info, graph, cfg


@pytest.mark.parametrize("parts", [1, 3])
def test_ray_stage_equals_single_process(graph_on_disk, data, parts):
    import ray

    from ltc_ray.cluster.components import merge_edges
    from ltc_ray.cluster.gcn_ds.stage import (
        build_proposals,
        deoverlap_parents,
        load_proposals,
    )
    from ltc_ray.graph.knn_graph import read_knn_rows

    root, info, graph, cfg = graph_on_disk
    x = data[0]
    n = len(x)
    ids, sims = read_knn_rows(graph, 0, n)
    want = generate_proposals(x, ids, sims, SETTINGS)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    ranges = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    out = root / f"props-{parts}"
    from ltc_ray.pipeline.cluster_stage import stage_tools

    tools = stage_tools(None, {"CPU": 2}, 0)
    refs = build_proposals(info, graph, SETTINGS, ranges, cfg, tools.build_graph, str(out))
    assert refs.counts == [int((want.setting == s).sum()) for s in range(len(SETTINGS))]
    got = ProposalTable.stack([
        ProposalTable(np.full(c, s, np.int32), ray.get(o), ray.get(m))
        for s, (m, o, c) in enumerate(zip(refs.members, refs.offsets, refs.counts,
                                          strict=True))])
    np.testing.assert_array_equal(got.members, want.members)
    np.testing.assert_array_equal(got.offsets, want.offsets)
    # what the stage wrote (Parquet, one file per setting) reads back the same
    loaded = load_proposals(str(out), SETTINGS, refs.counts, None)
    for a, b in zip(loaded.members + loaded.offsets, refs.members + refs.offsets, strict=True):
        np.testing.assert_array_equal(ray.get(a), ray.get(b))
    import pyarrow.parquet as pq

    table = pq.read_table(out / "setting-02.parquet")
    assert table.column_names == ["proposal_id", "setting", "sample_id"]
    assert set(table.column("setting").to_numpy()) == {2}
    # de-overlap on Ray = the single-process definition, merged into the same clusters
    rng = np.random.default_rng(parts)
    scores = rng.choice([0.3, 0.6, 0.8], len(want)).astype(np.float32)
    keep = rng.random(len(want.members)).astype(np.float32)
    starts = np.r_[0, np.cumsum(refs.counts)]
    mstarts = want.offsets[starts]
    score_refs = [ray.put(scores[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    keep_refs = [ray.put(keep[a:b]) for a, b in zip(mstarts[:-1], mstarts[1:], strict=True)]
    parents, edges, chosen = deoverlap_parents(refs, score_refs, keep_refs, n, ranges, 0.5, 0.4)
    expect = deoverlap(want, scores, n, keep, 0.5, 0.4)
    np.testing.assert_array_equal(np.concatenate(ray.get(chosen)), expect)
    cid, _, _ = merge_edges(n, ray.get(edges))
    base = np.where(expect >= 0, expect, len(want) + np.arange(n))
    want_cid, _, _ = merge_edges(n, [(np.arange(n)[expect >= 0],
                                      np.array([np.flatnonzero(expect == p).min()
                                                for p in expect[expect >= 0]], int))])
    np.testing.assert_array_equal(cid, want_cid)
    assert len(np.unique(cid)) == len(np.unique(base))


# ----------------------------------------------------------------------------- in the job
def _job(path, model, method, out, work, *sets):
    """One cluster job (one partition actor: the layouts are tested elsewhere)."""
    import json

    from ltc_ray.cli import main

    args = ["cluster", "--features", str(path), "--dim", "24", "--method", method, "--model",
            str(model), "--set", f"knn.k={K}", "--set", "cluster.partitions=1",
            "--output", str(out), "--work-dir", str(work)]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    return json.loads((out / "run.json").read_text())


def test_a_new_deoverlap_setting_reuses_proposals_and_scores(ray_local, data, tmp_path):
    """keep_threshold and min_score are de-overlap settings: a rerun in the same work
    area reuses the proposals and their GCN-D/GCN-S scores and only de-overlaps again;
    a new segmentation range scores again."""
    from _models import tiny_gcn_d

    from ltc_ray.io.output import read_clusters

    x, labels, _, _ = data
    write_bin(tmp_path / "x.bin", x, labels)
    model = tiny_gcn_d(tmp_path / "model", 24, K, segments=True)
    work = tmp_path / "work"
    first = _job(tmp_path / "x.bin", model, "gcn-ds", tmp_path / "a", work,
                 "methods.gcn-ds.segment_low=0", "methods.gcn-ds.segment_high=1")
    assert first["stages"]["score"]["proposals"] > 0
    again = _job(tmp_path / "x.bin", model, "gcn-ds", tmp_path / "b", work,
                 "methods.gcn-ds.segment_low=0", "methods.gcn-ds.segment_high=1",
                 "methods.gcn-ds.keep_threshold=0.99")
    assert {"plan", "knn", "score"} <= set(again["reused_stages"])
    assert "link" not in again["reused_stages"]
    # every member of a segmented proposal below 0.99 leaves it: more, smaller clusters
    assert again["n_clusters"] > first["n_clusters"]
    sizes_a = np.bincount(read_clusters(str(tmp_path / "a")).column("cluster_id").to_numpy())
    sizes_b = np.bincount(read_clusters(str(tmp_path / "b")).column("cluster_id").to_numpy())
    assert sizes_b.max() <= sizes_a.max()
    rescored = _job(tmp_path / "x.bin", model, "gcn-ds", tmp_path / "c", work,
                    "methods.gcn-ds.segment_low=0.5", "methods.gcn-ds.segment_high=1")
    assert "score" not in rescored["reused_stages"] and "knn" in rescored["reused_stages"]


def test_train_job_writes_a_model_the_job_reproduces(ray_local, data, tmp_path):
    """``train --method gcn-ds``: the model directory carries its settings, the training
    graph's anchors and both nets; the job's distributed stages on the training split give
    exactly the clusters the trainer's single-process definitions gave (same F)."""
    import json

    from ltc_ray.cli import main

    x, labels, _, _ = data
    write_bin(tmp_path / "x.bin", x, labels)
    (tmp_path / "x.meta").write_text("\n".join(map(str, labels.tolist())) + "\n")
    model = tmp_path / "model"
    assert main(["train", "--method", "gcn-ds", "--features", str(tmp_path / "x.bin"),
                 "--labels", str(tmp_path / "x.meta"), "--dim", "24", "--set", f"knn.k={K}",
                 "--proposals", "2", "--epochs", "2", "--hidden", "16",
                 "--output", str(model)]) == 0
    d_meta = json.loads((model / "gcn-d" / "model.json").read_text())
    s_meta = json.loads((model / "gcn-s" / "model.json").read_text())
    assert d_meta["method"] == "gcn-d" and s_meta["method"] == "gcn-s"
    assert len(d_meta["proposals"]) == 2 and d_meta["proposals"][0]["k"] == K
    assert d_meta["center"] is True and d_meta["structure"] is True
    assert s_meta["in_dim"] == d_meta["in_dim"] + 1 == 24 + 3 + 1
    assert d_meta["anchors"]["low"] < d_meta["anchors"]["high"]
    assert d_meta["train_config"]["epochs"] == 2 and d_meta["dims"] == [16, 64]
    # what the trainer measured in one process is what the job's stages reproduce
    assert d_meta["job_train_metrics"]["pairwise_f"] == pytest.approx(
        d_meta["train_metrics"]["pairwise_f"], abs=1e-12)
    run = _job(tmp_path / "x.bin", model, "gcn-ds", tmp_path / "out", tmp_path / "work")
    assert run["method"] == "gcn-ds" and run["n_clusters"] < len(x)
