"""kNN: pure block functions and the sharded Ray stage against single-process faiss."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import faiss
import numpy as np
import pytest
from _data import blobs, write_bin

from ltc_ray.config import KnnConfig
from ltc_ray.graph import read_knn_rows
from ltc_ray.io.features import inspect_features
from ltc_ray.knn import exact_knn, merge_topk, put_self_first, recall_at_k, search_block
from ltc_ray.knn.search import (
    TIE_MARGIN,
    build_index,
    exact_topk,
    rescore,
    score_error_bound,
)
from ltc_ray.pipeline.knn_stage import (
    build_knn_graph,
    knn_graph_keys,
    knn_graph_keys_for,
    plan_knn_layout,
)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _faiss_reference(x: np.ndarray, k: int):
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, ids = index.search(x, k)
    return ids, sims


def _assert_matches_faiss(ids, sims, ref_ids, ref_sims, x, max_tie_share=0.001):
    """Same ids except where similarities tie; sims within 1e-5; self at rank 0."""
    assert ids.shape == ref_ids.shape
    np.testing.assert_array_equal(ids[:, 0], np.arange(len(x)))
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    differ = ids != ref_ids
    if differ.any():
        # a differing id must be a tie: its exact similarity equals the reference's there
        rows, cols = np.nonzero(differ)
        ours = np.einsum("nd,nd->n", x[rows].astype(np.float64), x[ids[rows, cols]])
        theirs = np.einsum("nd,nd->n", x[rows].astype(np.float64), x[ref_ids[rows, cols]])
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert differ.mean() < max_tie_share


def test_merge_topk_is_exact_over_shards():
    rng = np.random.default_rng(0)
    x = _unit(rng.standard_normal((600, 32)))
    q = x[:50]
    full_ids, full_sims = search_block(build_index(x), q, 20)
    parts = [
        search_block(build_index(x[lo:hi]), q, 20, lo) for lo, hi in [(0, 7), (7, 300), (300, 600)]
    ]
    ids, sims = merge_topk(parts, 20)
    np.testing.assert_array_equal(ids, full_ids)
    np.testing.assert_allclose(sims, full_sims, atol=1e-6)


def test_small_shard_pads_with_invalid_ids():
    rng = np.random.default_rng(1)
    x = _unit(rng.standard_normal((5, 8)))
    ids, sims = search_block(build_index(x), x, 10)
    assert ids.shape == (5, 5) and (ids >= 0).all()
    merged_ids, merged_sims = merge_topk(
        [(ids, sims), (np.full((5, 3), -1), np.full((5, 3), -np.inf, np.float32))], 6
    )
    assert (merged_ids[:, :5] >= 0).all() and (merged_ids[:, 5] == -1).all()


def test_rescore_depends_only_on_the_pair():
    """A pair's re-scored similarity has the same bits in any block, shard offset or
    column position, and lies within the float32 error bound of the float64 value."""
    rng = np.random.default_rng(2)
    x = _unit(rng.standard_normal((300, 64)))
    ids = rng.integers(0, 300, (40, 9))
    ids[0, 0] = -1
    got = rescore(x[:40], x, ids)
    want = np.einsum(
        "qd,qkd->qk", x[:40].astype(np.float64), x[np.maximum(ids, 0)].astype(np.float64)
    )
    assert got[0, 0] == -np.inf and got.dtype == np.float32
    assert np.abs(got.ravel()[1:] - want.ravel()[1:]).max() <= score_error_bound(64)
    perm = rng.permutation(9)
    np.testing.assert_array_equal(rescore(x[:40], x, ids[:, perm]), got[:, perm])
    parts = [rescore(x[lo:min(lo + 7, 40)], x, ids[lo:lo + 7]) for lo in range(0, 40, 7)]
    np.testing.assert_array_equal(np.concatenate(parts), got)
    shard = ids >= 150  # the same pairs scored in a shard holding rows 150..299
    in_shard = rescore(x[:40], x[150:], np.where(shard, ids - 150, 0))
    np.testing.assert_array_equal(in_shard[shard], got[shard])
    with pytest.raises(ValueError, match="outside"):
        rescore(x[:1], x[:5], np.array([[0, 5]]))


def _brute_topk(x: np.ndarray, k: int, lo: int = 0, hi: int | None = None):
    """The definition: every row of x[lo:hi] re-scored, ordered by (sim desc, id asc)."""
    hi = len(x) if hi is None else hi
    cand = np.broadcast_to(np.arange(hi - lo), (len(x), hi - lo))
    sims = rescore(x, x[lo:hi], cand)
    return merge_topk([(cand + lo, sims)], k)


def test_exact_topk_certifies_ties_and_equals_the_definition_for_any_sharding():
    """Groups of identical rows larger than the candidate margin tie at rank k: the
    certificate sends those rows to a wider search, and the result is the definition's
    top k (lowest ids among equal similarities) whole or split into shards."""
    rng = np.random.default_rng(8)
    base = _unit(rng.standard_normal((30, 16)))
    x = np.concatenate([np.repeat(base[:3], 12, axis=0), base[3:]])  # 3 groups of 12 copies
    x = _unit(np.concatenate([x, _unit(rng.standard_normal((200, 16)))]))
    x = x[rng.permutation(len(x))]
    k = 6
    want_ids, want_sims = _brute_topk(x, k)
    ids, sims, widened = exact_topk(build_index(x), x, x, k)
    assert widened >= 3 * 12  # every duplicate row tied beyond its first candidates
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(sims, want_sims)
    for bounds in ([0, 100, len(x)], [0, 7, 60, 61, len(x)]):
        parts = [exact_topk(build_index(x[a:b]), x, x[a:b], k, a)[:2]
                 for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        got_ids, got_sims = merge_topk(parts, k)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_sims, want_sims)


def test_put_self_first_moves_or_inserts_self():
    ids = np.array([[3, 0, 5], [7, 8, 9]])
    sims = np.array([[0.99, 0.98, 0.5], [0.9, 0.8, 0.7]], np.float32)
    out_ids, out_sims = put_self_first(np.array([0, 1]), ids, sims, np.array([1.0, 1.0]))
    np.testing.assert_array_equal(out_ids, [[0, 3, 5], [1, 7, 8]])
    np.testing.assert_allclose(out_sims, [[0.98, 0.99, 0.5], [1.0, 0.9, 0.8]])


def test_exact_knn_matches_faiss_with_duplicates():
    rng = np.random.default_rng(3)
    x = _unit(rng.standard_normal((400, 16)))
    x[10] = x[11]  # duplicate rows: self must still be at rank 0
    ids, sims = exact_knn(x, 12)
    ref_ids, ref_sims = _faiss_reference(x, 12)
    assert ids[10, 0] == 10 and ids[11, 0] == 11
    assert set(ids[10, :2]) == {10, 11}
    _assert_matches_faiss(ids, sims, ref_ids, ref_sims, x, max_tie_share=0.01)


def test_recall_at_k():
    exact = np.array([[0, 1, 2, 3], [1, 0, 2, 3]])
    approx = np.array([[0, 1, 9, -1], [1, 0, 2, 3]])
    assert recall_at_k(approx, exact) == pytest.approx(6 / 8)


def test_layout_never_requests_missing_gpus():
    cfg = KnnConfig()
    cpu_only = plan_knn_layout(10_000, 256, cfg, {"CPU": 2.0})
    assert cpu_only.gpus_per_actor == 0 and cpu_only.mode == "replicate"
    assert cpu_only.n_actors * cpu_only.cpus_per_actor <= 2.0
    with_gpus = plan_knn_layout(10_000, 256, cfg, {"CPU": 16.0, "GPU": 4.0})
    assert with_gpus.n_actors == 4 and with_gpus.gpus_per_actor == 1.0
    big = plan_knn_layout(10_000_000, 256, KnnConfig(shard_max_bytes=1e9), {"CPU": 8.0})
    assert big.mode == "shard" and big.n_actors == 11
    assert big.shard_ranges[0][0] == 0 and big.shard_ranges[-1][1] == 10_000_000
    never = plan_knn_layout(10_000, 256, KnnConfig(gpu="never"), {"CPU": 4.0, "GPU": 1.0})
    assert never.gpus_per_actor == 0


def test_layout_replicates_or_shards_by_measured_gpu_memory():
    """5.21M x 256 fp32 = 5.3 GB: replicated on 8 GPUs with 78 GiB free each, sharded
    when a GPU has 8 GB free (0.6 x 8 GB per copy -> 2 shards, then at least one per GPU);
    on a CPU-only cluster the measurement is ignored and never taken."""
    cfg = KnnConfig(shard_max_bytes=1e12)
    roomy = plan_knn_layout(5_206_761, 256, cfg, {"CPU": 64.0, "GPU": 8.0}, 78 * 2**30)
    assert roomy.mode == "replicate" and roomy.n_actors == 8 and roomy.gpus_per_actor == 1.0
    tight = plan_knn_layout(5_206_761, 256, cfg, {"CPU": 16.0, "GPU": 1.0}, 8e9)
    assert tight.mode == "shard" and tight.n_actors == 2 and tight.gpus_per_actor == 0.5
    hypothetical = plan_knn_layout(5_206_761, 256, cfg,
                                   {"CPU": 16.0, "GPU": 1.0, "gpu_free_bytes": 8e9})
    assert hypothetical.shard_ranges == tight.shard_ranges
    cpu = plan_knn_layout(5_206_761, 256, cfg, {"CPU": 16.0}, 1e9)
    assert cpu.mode == "replicate" and cpu.gpus_per_actor == 0
    from ltc_ray.pipeline.knn_stage import measure_gpu_free_bytes

    assert measure_gpu_free_bytes({"CPU": 2.0}) is None  # no GPU task is ever submitted


@pytest.fixture(scope="module")
def knn_data(tmp_path_factory):
    x, labels = blobs(n_per=60, n_clusters=40, dim=48, spread=2.0, seed=7)
    path = tmp_path_factory.mktemp("knn") / "feats.bin"
    write_bin(path, x, labels)
    xn = _unit(x)
    return path, xn


@pytest.mark.parametrize("shards", [1, 2, 5])
def test_sharded_ray_knn_equals_faiss(ray_local, knn_data, tmp_path, shards):
    path, xn = knn_data
    info = inspect_features(str(path), dim=48)
    cfg = KnnConfig(k=30, mode="shard", shards=shards, block_rows=500)
    manifest, stats = build_knn_graph(info, cfg, str(tmp_path / "knn"), {"CPU": 2.0})
    assert stats["n_actors"] == shards and manifest.n_blocks == 5
    ids, sims = read_knn_rows(manifest, 0, len(xn))
    ref_ids, ref_sims = _faiss_reference(xn, 30)
    _assert_matches_faiss(ids.astype(np.int64), sims, ref_ids, ref_sims, xn)
    assert ids.dtype == np.int32 and sims.dtype == np.float32


def test_shard_count_does_not_change_the_graph(ray_local, knn_data, tmp_path):
    path, _ = knn_data
    info = inspect_features(str(path), dim=48)
    graphs = []
    for shards, mode in [(1, "replicate"), (3, "shard")]:
        cfg = KnnConfig(k=25, mode=mode, shards=shards, block_rows=700)
        manifest, stats = build_knn_graph(info, cfg, str(tmp_path / f"knn{shards}"), {"CPU": 2.0})
        # a small replicated base is searched by tasks (even blocks, a multiple of the CPUs)
        assert stats["mode"] == ("tasks" if mode == "replicate" else "shard")
        if mode == "replicate":
            sizes = np.diff(manifest.bounds)
            assert manifest.n_blocks % 2 == 0 and sizes.max() - sizes.min() <= 1
            assert sizes.max() <= 700 and stats["tasks"] == manifest.n_blocks
        graphs.append(read_knn_rows(manifest, 0, info.n_rows))
    np.testing.assert_array_equal(graphs[0][0], graphs[1][0])
    np.testing.assert_array_equal(graphs[0][1], graphs[1][1])  # bitwise: per-pair scores


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_backend_graph_equals_faiss_bitwise(ray_local, knn_data, tmp_path, precision):
    """The torch backend (what GPU workers use; here on CPU, with fp16/bf16 candidates as
    on tensor cores) gives the same graph as faiss, bit for bit, sharded or not."""
    path, _ = knn_data
    info = inspect_features(str(path), dim=48)
    ref, _ = build_knn_graph(info, KnnConfig(k=25, block_rows=700), str(tmp_path / "f"),
                             {"CPU": 2.0})
    cfg = KnnConfig(k=25, mode="shard", shards=2, block_rows=700, backend="torch",
                    precision=precision)
    got, stats = build_knn_graph(info, cfg, str(tmp_path / "t"), {"CPU": 2.0})
    assert stats["backend"] == [f"torch-cpu-{precision}"]
    for a, b in zip(read_knn_rows(ref, 0, info.n_rows), read_knn_rows(got, 0, info.n_rows),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_torch_index_certificate_refines_near_ties():
    """Low-precision candidates are certified against the rounding bound: on data with
    near-duplicate rows bf16 cannot separate, the uncertain rows are searched again in
    fp32 and the top-k equals exact fp32 search."""
    from ltc_ray.knn.torch_index import TorchFlatIndex, error_bound

    rng = np.random.default_rng(5)
    base = _unit(rng.standard_normal((40, 32)).astype(np.float32))
    x = _unit(np.repeat(base, 50, axis=0) + 1e-3 * rng.standard_normal((2000, 32)))
    x = x.astype(np.float32)
    def graph(index):  # what a kNN actor does with any index
        ids, _ = search_block(index, x, 60 + TIE_MARGIN)
        return merge_topk([(ids, rescore(x, x, ids))], 60)

    low = TorchFlatIndex(x, precision="bf16", margin=8, tile_elems=2000 * 300)
    got = graph(low)
    assert low.rows_refined > 0  # the certificate fired
    for a, b in zip(graph(build_index(x, "flat")), got, strict=True):
        np.testing.assert_array_equal(a, b)
    assert error_bound("bf16", 32) > error_bound("fp16", 32) > 0
    with pytest.raises(ValueError):
        TorchFlatIndex(x, precision="fp8")


def test_a_build_always_computes_and_reports_every_files_digest(ray_local, knn_data, tmp_path):
    """Reuse is the stage store's decision (it checks every block's size and sha256), so a
    build never reuses a graph on its own; it hands the store the (bytes, sha256) of each
    file as its writer wrote it, so the stage marker needs no second read of the graph."""
    from ltc_ray.pipeline.stages import graph_artifacts

    path, _ = knn_data
    info = inspect_features(str(path), dim=48)
    for k in (10, 10, 12):  # the same graph twice, then another k in the same directory
        manifest, stats = build_knn_graph(info, KnnConfig(k=k, block_rows=1000),
                                          str(tmp_path / "knn"), {"CPU": 2.0})
        assert "reused" not in stats and manifest.k == k
        digests = stats["block_digests"]
        assert set(digests) == set(graph_artifacts(manifest)) and len(digests) > 2
        for uri, (size, sha) in digests.items():
            data = Path(uri).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha), uri


def test_ivf_reports_measured_recall(ray_local, knn_data, tmp_path):
    path, xn = knn_data
    info = inspect_features(str(path), dim=48)
    cfg = KnnConfig(k=20, index="ivf", nlist=16, nprobe=4, recall_sample=300, block_rows=1000)
    manifest, stats = build_knn_graph(info, cfg, str(tmp_path / "knn"), {"CPU": 2.0}, seed=0)
    ids, _ = read_knn_rows(manifest, 0, info.n_rows)
    ref_ids, _ = _faiss_reference(xn, 20)
    start = None
    recall = stats["recall"]
    assert 0.3 < recall <= 1.0 and manifest.recall == recall
    # the reported number agrees with recall measured here over all rows (within sampling noise)
    overall = recall_at_k(ids.astype(np.int64), ref_ids)
    assert abs(overall - recall) < 0.1, (overall, recall, start)


# ------------------------------------------------------------------ precomputed kNN import


@pytest.fixture(scope="module")
def ltc_files(tmp_path_factory):
    """600 x 32 features and learn-to-cluster kNN files of k = 30 over them: sorted as
    faiss writes them, the same with every row's columns shuffled, and one whose
    "distances" give similarities above 1."""
    from ltc_ray.io.knn_files import write_ltc_knn

    d = tmp_path_factory.mktemp("ltc-import")
    x, labels = blobs(n_per=50, n_clusters=12, dim=32, spread=0.5, seed=3)
    write_bin(d / "f.bin", x, labels)
    xn = _unit(x)
    ids, sims = exact_knn(xn, 30)
    write_ltc_knn(str(d / "sorted.npz"), len(x), 30, [(ids, sims)])
    perm = np.argsort(np.random.default_rng(0).random(ids.shape), axis=1)
    shuffled_ids = np.take_along_axis(ids, perm, axis=1)
    write_ltc_knn(str(d / "shuffled.npz"), len(x), 30,
                  [(shuffled_ids, np.take_along_axis(sims, perm, axis=1))])
    # the shuffle matters: the first 10 columns are not the 10 nearest
    assert (np.sort(shuffled_ids[:, :10]) != np.sort(ids[:, :10])).any(axis=1).mean() > 0.9
    above = sims.copy()
    above[:, 1:] += 0.8
    write_ltc_knn(str(d / "above1.npz"), len(x), 30, [(ids, above)])
    return d, xn


def test_unsorted_ltc_knn_imports_as_the_sorted_one(ray_local, ltc_files, tmp_path):
    """Each row is sorted by similarity before the first k are kept: a file with shuffled
    columns gives the same graph as the sorted file, which is the exact top-k."""
    from ltc_ray.pipeline.knn_stage import import_ltc_knn

    d, xn = ltc_files
    info = inspect_features(str(d / "f.bin"), dim=32)
    cfg = KnnConfig(k=10, block_rows=256)
    graphs = []
    for name in ("sorted", "shuffled"):
        manifest, _ = import_ltc_knn(str(d / f"{name}.npz"), info, cfg, str(tmp_path / name))
        graphs.append(read_knn_rows(manifest, 0, info.n_rows))
    np.testing.assert_array_equal(graphs[0][0], graphs[1][0])
    np.testing.assert_array_equal(graphs[0][1], graphs[1][1])
    ref_ids, ref_sims = exact_knn(xn, 10)
    np.testing.assert_array_equal(graphs[1][0], ref_ids)
    np.testing.assert_allclose(graphs[1][1], ref_sims, atol=1e-6)
    assert (graphs[1][0][:, 0] == np.arange(info.n_rows)).all()


def test_unsorted_ltc_knn_gives_the_clean_files_clusters(ray_local, ltc_files, tmp_path):
    from ltc_ray.cli import main
    from ltc_ray.io.output import read_clusters

    d, _ = ltc_files
    common = ["cluster", "--features", str(d / "f.bin"), "--dim", "32", "--set", "knn.k=10"]
    clusters = []
    for name in ("sorted", "shuffled"):
        out = tmp_path / name
        assert main([*common, "--knn", str(d / f"{name}.npz"), "--output", str(out)]) == 0
        clusters.append(read_clusters(str(out)).column("cluster_id").to_numpy())
    np.testing.assert_array_equal(clusters[0], clusters[1])


def test_ltc_knn_similarities_above_one_exit_2_from_the_ray_worker(
    ray_local, ltc_files, tmp_path, capsys, monkeypatch
):
    """The content check runs where the file is converted, in a Ray task; its InputError
    reaches the CLI through Ray: exit 2, the error line names the file and the row."""
    from ltc_ray.cli import main

    d, _ = ltc_files
    out = tmp_path / "out"
    # the CLI's log handler writes to the stderr of the test that first installed it
    monkeypatch.setattr(logging.getLogger("ltc_ray"), "handlers", [])
    capsys.readouterr()
    code = main(["cluster", "--features", str(d / "f.bin"), "--dim", "32", "--set", "knn.k=10",
                 "--knn", str(d / "above1.npz"), "--output", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-3000:]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {d / 'above1.npz'}: row 0: distance ")
    assert "outside [-1, 1]" in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------ the graph's keys


def test_ivf_keys_follow_the_shard_layout_and_flat_keys_do_not(ray_local, knn_data, tmp_path):
    """An IVF graph trains one index per shard, so 1 vs 2 shards give another graph and
    other keys; an exact graph is the same for any layout, and so are its keys. The keys
    the job can compute before a build are those the build records."""
    path, _ = knn_data
    info = inspect_features(str(path), dim=48)
    resources = {"CPU": 2.0}
    keys, graphs = {}, {}
    for index in ("ivf", "flat"):
        for shards in (1, 2):
            cfg = KnnConfig(k=10, index=index, nlist=16, nprobe=2, mode="shard", shards=shards,
                            recall_sample=0, block_rows=1200)
            manifest, stats = build_knn_graph(info, cfg, str(tmp_path / f"{index}{shards}"),
                                              resources, seed=3)
            assert stats["n_actors"] == shards
            before = knn_graph_keys_for(info, cfg, resources, seed=3)
            recorded = manifest.details["fingerprint"]
            assert {key: recorded[key] for key in before} == before
            keys[index, shards] = before
            graphs[index, shards] = read_knn_rows(manifest, 0, info.n_rows)[0]
    assert keys["ivf", 1] != keys["ivf", 2]
    assert (keys["ivf", 1]["shards"], keys["ivf", 2]["shards"]) == (1, 2)
    assert not np.array_equal(graphs["ivf", 1], graphs["ivf", 2])  # why the keys differ
    assert keys["flat", 1] == keys["flat", 2] == {"k": 10, "index": "flat"}
    np.testing.assert_array_equal(graphs["flat", 1], graphs["flat", 2])
    # a replicated base is one shard: the same keys as one shard
    cfg = KnnConfig(k=10, index="ivf", nlist=16, nprobe=2, mode="replicate", cpus_per_actor=1)
    replicate = plan_knn_layout(info.n_rows, 48, cfg, resources)
    assert replicate.mode == "replicate" and replicate.n_actors == 2
    assert knn_graph_keys(cfg, 3, replicate) == keys["ivf", 1]
