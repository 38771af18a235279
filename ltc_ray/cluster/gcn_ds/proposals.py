"""Super-vertex proposals and de-overlap, as single-process array code: the definition
the distributed stage (:mod:`.stage`) is tested against, and what the trainer runs on a
training split held in one worker.

Within one setting the proposals are disjoint (components), so a setting's proposals
are a CSR table: ``offsets (P+1,)`` into ``members (M,)``, each proposal's members
ascending, proposals ordered by their smallest member. Settings are stacked in order;
a proposal's global id is its row in the stacked table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltc_ray.cluster.gcn_ds.settings import ProposalSetting
from ltc_ray.graph.constrained import constrained_components

__all__ = [
    "ProposalTable",
    "deoverlap",
    "generate_proposals",
    "row_edges",
    "super_vertex_features",
    "table_from_labels",
]


@dataclass
class ProposalTable:
    """Proposals of one or more settings: ``setting (P,)``, ``offsets (P+1,)``,
    ``members (M,)`` (see the module docstring)."""

    setting: np.ndarray
    offsets: np.ndarray
    members: np.ndarray

    def __len__(self) -> int:
        return len(self.setting)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @staticmethod
    def stack(tables: list[ProposalTable]) -> ProposalTable:
        if not tables:
            return ProposalTable(np.empty(0, np.int32), np.zeros(1, np.int64),
                                 np.empty(0, np.int64))
        shift = np.cumsum([0] + [len(t.members) for t in tables[:-1]])
        offsets = np.concatenate([tables[0].offsets[:1]] + [
            t.offsets[1:] + s for t, s in zip(tables, shift, strict=True)])
        return ProposalTable(np.concatenate([t.setting for t in tables]).astype(np.int32),
                             offsets.astype(np.int64),
                             np.concatenate([t.members for t in tables]).astype(np.int64))


def table_from_labels(label: np.ndarray, keep_sizes: tuple[int, int], setting: int,
                      count_of: np.ndarray | None = None,
                      keep_counts: tuple[int, int] | None = None) -> ProposalTable:
    """The components ``label (N,)`` (any ids) whose sample count is within
    ``keep_sizes`` (and, with ``count_of`` per label id, whose count is within
    ``keep_counts``: super vertices per component) as one setting's table."""
    n = len(label)
    order = np.lexsort((np.arange(n), label))
    sorted_label = label[order]
    starts = np.flatnonzero(np.r_[True, sorted_label[1:] != sorted_label[:-1]]) if n else \
        np.empty(0, np.int64)
    sizes = np.diff(np.r_[starts, n])
    ok = (sizes >= keep_sizes[0]) & (sizes <= keep_sizes[1])
    if count_of is not None:
        counts = count_of[sorted_label[starts]]
        ok &= (counts >= keep_counts[0]) & (counts <= keep_counts[1])
    starts, sizes = starts[ok], sizes[ok]
    # proposals by smallest member: members are id-sorted inside a label run
    by_first = np.argsort(order[starts], kind="stable")
    starts, sizes = starts[by_first], sizes[by_first]
    take = np.repeat(starts - np.r_[0, np.cumsum(sizes)[:-1]], sizes) + np.arange(sizes.sum())
    members = order[take].astype(np.int64)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    return ProposalTable(np.full(len(sizes), setting, np.int32), offsets, members)


def row_edges(node_ids: np.ndarray, knn_ids: np.ndarray, knn_sims: np.ndarray, k: int,
              th: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges ``(src, dst, weight)`` from kNN rows: the first ``k`` columns (self at rank
    0 and missing neighbours dropped) with cosine >= ``th``."""
    ids = knn_ids[:, :k].astype(np.int64)
    sims = knn_sims[:, :k]
    src = np.broadcast_to(node_ids[:, None], ids.shape)
    keep = (ids >= 0) & (ids != src) & (sims >= th)
    return src[keep], ids[keep], sims[keep].astype(np.float32)


FIXED_POINT = 2.0**30  # feature sums in int64 fixed point: exact, so order-free


def fixed_point(x: np.ndarray) -> np.ndarray:
    """Features as int64 multiples of 2^-30: sums of them are exact, so a super vertex's
    mean is the same bits whichever partitions its members' sums come from (float sums
    round differently per order and could move a kNN tie or a cut)."""
    return np.rint(x.astype(np.float64) * FIXED_POINT).astype(np.int64)


def super_vertex_features(x: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sv_of (N,) int64, features (S, d) float32)``: each component of ``label`` as a
    super vertex (ids by smallest member) with the L2-normalised mean of its members."""
    uniq, sv_of = np.unique(label, return_inverse=True)
    sv_of = sv_of.reshape(-1).astype(np.int64)
    sums = np.zeros((len(uniq), x.shape[1]), dtype=np.int64)
    np.add.at(sums, sv_of, fixed_point(x))
    return sv_of, normalise_rows(sums)


def normalise_rows(sums: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; a zero row (members cancelling out) becomes the first
    axis, so every super vertex is a valid feature."""
    sums = sums.astype(np.float64)
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    out = np.where(norm > 0, sums / np.where(norm > 0, norm, 1.0), 0.0)
    out[(norm[:, 0] == 0), 0] = 1.0
    return out.astype(np.float32)


def _base_labels(n: int, knn_ids: np.ndarray, knn_sims: np.ndarray,
                 base: ProposalSetting) -> np.ndarray:
    src, dst, w = row_edges(np.arange(n), knn_ids, knn_sims, base.k, base.th)
    label, _ = constrained_components(n, src, dst, w, base.max_size, base.step)
    return label


def iteration1_labels(sv_of: np.ndarray, sv_ids: np.ndarray, sv_sims: np.ndarray,
                      setting: ProposalSetting) -> tuple[np.ndarray, np.ndarray]:
    """``(label (N,), sv_count per label id)``: each sample's iteration-1 component (the
    smallest super vertex of its super vertex's component) and each component's number
    of super vertices."""
    s = len(sv_ids)
    src, dst, w = row_edges(np.arange(s), sv_ids, sv_sims, setting.sv_k, setting.sv_th)
    sv_label, _ = constrained_components(s, src, dst, w, setting.sv_max_size, setting.step)
    return sv_label[sv_of], np.bincount(sv_label, minlength=s)


def iteration1_table(label: np.ndarray, sv_count: np.ndarray, setting: ProposalSetting,
                     index: int) -> ProposalTable:
    return table_from_labels(label, (setting.min_size, setting.sv_max_members), index,
                             count_of=sv_count,
                             keep_counts=(setting.sv_min_size, setting.sv_max_size))


def generate_proposals(x: np.ndarray, knn_ids: np.ndarray, knn_sims: np.ndarray,
                       settings: list[ProposalSetting]) -> ProposalTable:
    """Every setting's proposals over a whole split in one process (kNN rows sorted by
    similarity, self first; ``x`` L2-normalised features)."""
    from ltc_ray.knn import exact_knn

    n = len(knn_ids)
    labels: dict[ProposalSetting, np.ndarray] = {}
    sv_graphs: dict[ProposalSetting, tuple] = {}
    tables = []
    for index, setting in enumerate(settings):
        base = setting.base
        if base not in labels:
            labels[base] = _base_labels(n, knn_ids, knn_sims, base)
        if setting.iteration == 0:
            tables.append(table_from_labels(labels[base], (setting.min_size, setting.max_size),
                                            index))
            continue
        if base not in sv_graphs:
            sv_of, feats = super_vertex_features(x, labels[base])
            k = min(max(s.sv_k for s in settings if s.base == base and s.sv_k), len(feats))
            sv_graphs[base] = (sv_of, *exact_knn(feats, k))
        sv_of, sv_ids, sv_sims = sv_graphs[base]
        label, sv_count = iteration1_labels(sv_of, sv_ids, sv_sims, setting)
        tables.append(iteration1_table(label, sv_count, setting, index))
    return ProposalTable.stack(tables)


def deoverlap(table: ProposalTable, scores: np.ndarray, n: int,
              keep: np.ndarray | None = None, keep_threshold: float = 0.5,
              min_score: float = -np.inf) -> np.ndarray:
    """Each sample joins its best-scored proposal (ties: the lower proposal id) among the
    proposals that keep it (``keep (M,)``, per member, > ``keep_threshold``) and score at
    least ``min_score``; samples without one stay alone. Returns the chosen proposal per
    sample (-1: none), the same as taking proposals by descending score and giving each
    its members not taken yet (learn-to-cluster's de-overlap, NMS off)."""
    pid = np.repeat(np.arange(len(table)), table.sizes)
    ok = scores[pid] >= min_score
    if keep is not None:
        ok &= keep > keep_threshold
    member, pid = table.members[ok], pid[ok]
    # best first: score descending, then proposal id; the first entry per sample wins
    order = np.lexsort((pid, -scores[pid].astype(np.float64), member))
    member, pid = member[order], pid[order]
    first = np.r_[True, member[1:] != member[:-1]] if len(member) else np.empty(0, bool)
    chosen = np.full(n, -1, dtype=np.int64)
    chosen[member[first]] = pid[first]
    return chosen
