"""k-reciprocal re-ranking (ltc_ray.graph.rerank) against a literal Python-set reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from ltc_ray.graph.rerank import (
    _argsort,
    _unique_inverse,
    csr_take,
    expanded_sets,
    jaccard_rerank,
    reciprocal_masks,
    rerank_graph,
)


def blob_knn(n: int, k: int, blobs: int, seed: int, pad: bool = False) -> np.ndarray:
    """Exact cosine kNN of points in a few Gaussian blobs (self at rank 0); with ``pad``,
    random rows lose a random tail of slots to -1."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(blobs, 8)) * 3.0
    x = centres[rng.integers(0, blobs, n)] + rng.normal(size=(n, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, np.inf)
    knn = np.argsort(-s, axis=1, kind="stable")[:, :k].astype(np.int32)
    assert np.array_equal(knn[:, 0], np.arange(n))
    if pad:
        cut = rng.integers(1, k + 1, n)
        cut[rng.random(n) < 0.5] = k  # half of the rows keep all slots
        knn[np.arange(k)[None, :] >= cut[:, None]] = -1
    return knn


def reference(knn: np.ndarray, k1: int, k2: int, expand: int, top: int):
    """The definitions, literally, with Python sets."""
    n = len(knn)

    @functools.cache
    def nk(i, k):
        return frozenset(int(x) for x in knn[i, :k] if x >= 0)

    @functools.cache
    def r(i, k):
        return {j for j in nk(i, k) if i in nk(j, k)}

    rstar = []
    for i in range(n):
        r1 = r(i, k1)
        s = set(r1)
        for j in r1:
            r2 = r(j, k2)
            if 3 * len(r2 & r1) >= 2 * len(r2):
                s |= r2
        rstar.append(s)
    ids = np.full((n, top), -1, np.int64)
    sims = np.zeros((n, top), np.float32)
    sizes = []
    for i in range(n):
        cand = set(nk(i, k1))
        for h in nk(i, k1):
            cand |= set(nk(h, expand))
        sizes.append(len(cand))
        score = {
            j: 1.0 if j == i else len(rstar[i] & rstar[j]) / len(rstar[i] | rstar[j])
            for j in cand
        }
        best = sorted(cand, key=lambda j: (j != i, -score[j], j))[:top]
        ids[i, : len(best)] = best
        sims[i, : len(best)] = [score[j] for j in best]
    return ids, sims, np.array(sizes), rstar


CASES = [
    # n, k, blobs, seed, pad, (k1, k2, expand, top)
    (60, 16, 3, 0, False, (10, 5, 3, 10)),
    (120, 24, 4, 1, True, (10, 5, 3, 10)),
    (200, 30, 5, 2, False, (20, 10, 4, 25)),
    (300, 24, 6, 3, True, (16, 8, 3, 40)),
    (150, 12, 2, 4, True, (12, 12, 12, 7)),
]


@pytest.mark.parametrize("n,k,blobs,seed,pad,params", CASES)
def test_matches_set_reference(n, k, blobs, seed, pad, params):
    knn = blob_knn(n, k, blobs, seed, pad)
    k1, k2, expand, top = params
    want_ids, want_sims, _, rstar = reference(knn, k1, k2, expand, top)
    ids, sims = rerank_graph(knn, k1, k2, expand, top)
    assert ids.dtype == np.int64 and sims.dtype == np.float32
    assert ids.shape == sims.shape == (n, top)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(sims, want_sims, atol=1e-6, rtol=0)
    # The graphs are meant to exercise the expansion: R* bigger than R(i, k1) somewhere,
    # and non-trivial similarities below 1.
    sizes = np.array([len(s) for s in rstar])
    assert sizes.max() > 1 and ((sims > 0) & (sims < 1)).any()


def test_default_parameters_match_reference():
    knn = blob_knn(300, 90, 3, 5)
    want_ids, want_sims, _, _ = reference(knn, 80, 40, 10, 80)
    ids, sims = rerank_graph(knn)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(sims, want_sims, atol=1e-6, rtol=0)


def test_phases_match_reference_sets():
    """Phase 1 masks and phase 2 R* sets against the set definitions."""
    knn = blob_knn(120, 20, 3, 6, pad=True)
    k1, k2 = 12, 6
    masks = reciprocal_masks(0, knn, lambda ids: knn[ids], k1, k2)
    assert masks.dtype == np.uint8 and masks.shape == knn.shape
    for i in range(0, 120, 7):
        for c in range(20):
            j = int(knn[i, c])
            in1 = c < k1 and j >= 0 and i in set(knn[j, :k1].tolist())
            in2 = c < k2 and j >= 0 and i in set(knn[j, :k2].tolist())
            assert masks[i, c] == in1 + 2 * in2
    indptr, indices = expanded_sets(0, knn, masks, lambda ids: (knn[ids], masks[ids]))
    _, _, _, rstar = reference(knn, k1, k2, 1, 1)
    for i in range(120):
        row = indices[indptr[i] : indptr[i + 1]]
        assert row.tolist() == sorted(rstar[i])


@pytest.mark.parametrize("pad", [False, True])
def test_partition_and_chunk_invariance(pad):
    knn = blob_knn(250, 20, 4, 7, pad)
    args = (12, 6, 3, 15)
    ids, sims = rerank_graph(knn, *args)
    for bounds in ([0, 83, 170, 250], [0, 1, 30, 31, 90, 200, 201, 250], [0, 0, 125, 250]):
        for chunk in (2048, 17):
            got_ids, got_sims = rerank_graph(knn, *args, bounds=bounds, chunk=chunk)
            np.testing.assert_array_equal(got_ids, ids)
            np.testing.assert_array_equal(got_sims, sims)


def test_callbacks_get_only_halo_ids_sorted_unique():
    """Each phase asks its callbacks only for non-owned ids, as sorted unique int64, at most
    once per chunk; owned rows come from the arguments."""
    knn = blob_knn(200, 16, 3, 8)
    lo, hi = 60, 140
    calls = []

    def check(ids, name):
        assert ids.dtype == np.int64 and ids.ndim == 1
        assert np.all(np.diff(ids) > 0)
        assert not np.any((ids >= lo) & (ids < hi))
        calls.append(name)

    masks_all = reciprocal_masks(0, knn, lambda ids: knn[ids], 10, 5)
    indptr, indices = expanded_sets(0, knn, masks_all, None)  # all owned: no callback
    rows_of = lambda ids: (check(ids, "rows"), knn[ids])[1]  # noqa: E731
    masks = reciprocal_masks(lo, knn[lo:hi], rows_of, 10, 5)
    np.testing.assert_array_equal(masks, masks_all[lo:hi])
    part = expanded_sets(
        lo, knn[lo:hi], masks, lambda ids: (check(ids, "nb"), (knn[ids], masks_all[ids]))[1],
        chunk=32,
    )
    sub = csr_take(indptr, indices, np.arange(lo, hi))
    np.testing.assert_array_equal(part[0], sub[0])
    np.testing.assert_array_equal(part[1], sub[1])
    rstar_of = lambda ids: (check(ids, "rstar"), csr_take(indptr, indices, ids))[1]  # noqa: E731
    ids, sims = jaccard_rerank(lo, knn[lo:hi], part, rows_of, rstar_of, 10, 3, 12, chunk=32)
    want_ids, want_sims = rerank_graph(knn, 10, 5, 3, 12)
    np.testing.assert_array_equal(ids, want_ids[lo:hi])
    np.testing.assert_array_equal(sims, want_sims[lo:hi])
    chunks = -(-(hi - lo) // 32)
    assert 0 < calls.count("rows") <= 1 + chunks and 0 < calls.count("rstar") <= chunks
    assert 0 < calls.count("nb") <= chunks


def test_self_first_and_padding():
    knn = blob_knn(40, 4, 2, 9, pad=True)
    top = 30  # more than any candidate set: 1 + 4 + 4 * 2 < 30
    ids, sims = rerank_graph(knn, 4, 2, 2, top)
    _, _, sizes, _ = reference(knn, 4, 2, 2, top)
    np.testing.assert_array_equal(ids[:, 0], np.arange(40))
    assert np.all(sims[:, 0] == 1.0)
    filled = (ids >= 0).sum(axis=1)
    np.testing.assert_array_equal(filled, sizes)
    slot = np.arange(top)[None, :]
    assert np.all((ids >= 0) == (slot < filled[:, None]))  # -1 only at row ends
    assert np.all(sims[ids < 0] == 0.0)
    assert np.all((sims[:, 1:] >= 0) & (sims[:, 1:] <= 1))


def test_ties_broken_by_smaller_id():
    """A 6-clique whose kNN rows list the others by descending id: every R* is the whole
    clique, so all similarities are 1 and the order after self is by id ascending."""
    n = 6
    knn = np.array([[i] + sorted(set(range(n)) - {i}, reverse=True) for i in range(n)])
    ids, sims = rerank_graph(knn, 6, 4, 2, 6)
    for i in range(n):
        assert ids[i].tolist() == [i] + [j for j in range(n) if j != i]
    assert np.all(sims == 1.0)
    # Two 3-cliques with one-way cross links (0->3, 3->1, 1->4, 4->2, 2->5, 5->0, never
    # reciprocal): R* = own clique, the other clique's candidates all score 0 and come by
    # ascending id, not in kNN order.
    knn = np.array([[0, 2, 1, 3], [1, 2, 0, 4], [2, 1, 0, 5],
                    [3, 5, 4, 1], [4, 5, 3, 2], [5, 4, 3, 0]])
    ids, sims = rerank_graph(knn, 4, 3, 4, 6)
    assert ids[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert sims[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert ids[5].tolist() == [5, 3, 4, 0, 1, 2]
    want_ids, want_sims, _, _ = reference(knn, 4, 3, 4, 6)
    np.testing.assert_array_equal(ids, want_ids)
    # Equal fractional Jaccard values: in a blob graph, many candidates of a row tie at a
    # value strictly between 0 and 1; their ids must ascend.
    knn = blob_knn(200, 30, 5, 2)
    ids, sims = rerank_graph(knn, 20, 10, 4, 25)
    same = (sims[:, 1:-1] == sims[:, 2:]) & (sims[:, 2:] > 0) & (sims[:, 2:] < 1)
    assert same.sum() > 10
    assert np.all(ids[:, 1:-1][same] < ids[:, 2:][same])


def test_parameter_checks():
    knn = blob_knn(30, 8, 2, 10)
    with pytest.raises(ValueError, match="k1"):
        rerank_graph(knn, k1=9, k2=4, expand=2, top=5)
    with pytest.raises(ValueError, match="k1"):
        reciprocal_masks(0, knn, lambda ids: knn[ids], k1=9, k2=4)
    with pytest.raises(ValueError, match="k1"):
        jaccard_rerank(0, knn, (np.zeros(31, np.int64), np.zeros(0, np.int64)),
                       lambda ids: knn[ids], None, k1=9, expand=2, top=5)
    with pytest.raises(ValueError, match="k2"):
        rerank_graph(knn, k1=4, k2=5, expand=2, top=5)
    with pytest.raises(ValueError, match="expand"):
        rerank_graph(knn, k1=4, k2=2, expand=9, top=5)
    with pytest.raises(ValueError, match="bounds"):
        rerank_graph(knn, 4, 2, 2, 5, bounds=[0, 20, 10, 30])


def test_csr_take():
    indptr = np.array([0, 2, 2, 5])
    indices = np.array([1, 4, 0, 2, 3])
    ptr, ind = csr_take(indptr, indices, np.array([2, 0, 1, 2]))
    assert ptr.tolist() == [0, 3, 5, 5, 8]
    assert ind.tolist() == [0, 2, 3, 1, 4, 0, 2, 3]
    ptr, ind = csr_take(indptr, indices, np.zeros(0, np.int64))
    assert ptr.tolist() == [0] and len(ind) == 0


@pytest.mark.parametrize("high", [50, 10**6, 2**61])
def test_sort_helpers(high):
    """Both branches of the fast sort helpers (packed / plain argsort, table / sort)."""
    a = np.random.default_rng(11).integers(0, high, 400)
    a[::7] = a[0]  # repeats, for stability
    np.testing.assert_array_equal(_argsort(a), np.argsort(a, kind="stable"))
    uniq, inverse = _unique_inverse(a)
    want, want_inverse = np.unique(a, return_inverse=True)
    np.testing.assert_array_equal(uniq, want)
    np.testing.assert_array_equal(inverse, want_inverse)


def test_self_first_even_when_missing_from_its_row():
    """Off-convention row (node 0 not in its own row, so not in its own candidates): 0
    still comes first with similarity 1, then the candidates as the reference ranks them."""
    knn = blob_knn(30, 6, 2, 12)
    knn[0] = np.r_[knn[0, 1:], -1]
    ids, sims = rerank_graph(knn, 5, 3, 1, 8)  # expand 1: C(i) = N_k1(i)
    want_ids, want_sims, _, _ = reference(knn, 5, 3, 1, 8)
    assert 0 not in want_ids[0].tolist()
    assert ids[0, 0] == 0 and sims[0, 0] == 1.0
    np.testing.assert_array_equal(ids[0, 1:], want_ids[0, :-1])
    np.testing.assert_allclose(sims[0, 1:], want_sims[0, :-1], atol=1e-6)
    np.testing.assert_array_equal(ids[1:], want_ids[1:])
    # R*(0) empty (0 is in no row's first k1 ids): s(0, 0) is 0/0, still reported as 1.
    knn = np.array([[1, -1], [1, 2], [2, 3], [3, 2]])
    ids, sims = rerank_graph(knn, 2, 1, 1, 3)
    assert ids[0].tolist() == [0, 1, -1] and sims[0].tolist() == [1.0, 0.0, 0.0]
