"""Proposal settings (learn-to-cluster's "N prpsls": N parameter settings, each giving
many proposals) and how their cosine cuts move to another graph, label-free.

An iteration-0 setting takes the size-constrained components
(:mod:`ltc_ray.graph.constrained`) of the kNN edges among the first ``k`` neighbours
with cosine >= ``th``. An iteration-1 setting starts from the components of an
iteration-0 base ``(k, th)``, treats each one as a super vertex (the mean of its
members' features), links every super vertex to its ``sv_k - 1`` nearest super vertices
with cosine >= ``sv_th`` and takes the constrained components of that graph (at most
``sv_max_size`` super vertices); a proposal is the union of their members.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ltc_ray.errors import InputError

__all__ = ["PRESETS", "ProposalSetting", "map_cuts", "settings_from_meta"]


@dataclass(frozen=True)
class ProposalSetting:
    """One proposal setting (the module docstring). Sizes count samples, except
    ``sv_*`` sizes, which count super vertices."""

    k: int = 80  # neighbours of a kNN row used (self included)
    th: float = 0.7  # iteration 0: keep edges with cosine >= th
    max_size: int = 300  # iteration 0: largest component (the cut rises until it fits)
    min_size: int = 3  # smallest proposal (samples)
    step: float = 0.05  # the cut rises by (1 - th) * step per round
    sv_k: int | None = None  # iteration 1: super-vertex kNN size (self included); None: it 0
    sv_th: float = 0.4  # iteration 1: keep super-vertex edges with cosine >= sv_th
    sv_max_size: int = 8  # iteration 1: largest component, in super vertices
    sv_min_size: int = 2  # iteration 1: smallest component, in super vertices
    sv_max_members: int = 500  # iteration 1: largest proposal (samples)

    def __post_init__(self) -> None:
        problems = []
        if self.k < 2:
            problems.append(f"k {self.k} < 2")
        if not -1.0 <= self.th <= 1.0 or not -1.0 <= self.sv_th <= 1.0:
            problems.append("cuts must be cosines in [-1, 1]")
        if self.min_size < 1 or self.max_size < self.min_size:
            problems.append(f"sizes {self.min_size}..{self.max_size}")
        if not 0.0 < self.step <= 1.0:
            problems.append(f"step {self.step} not in (0, 1]")
        if self.sv_k is not None and (self.sv_k < 2 or self.sv_min_size < 1
                                      or self.sv_max_size < self.sv_min_size
                                      or self.sv_max_members < self.min_size):
            problems.append("bad super-vertex sizes")
        if problems:
            raise ValueError(f"bad proposal setting {self}: {'; '.join(problems)}")

    @property
    def iteration(self) -> int:
        return 0 if self.sv_k is None else 1

    @property
    def base(self) -> ProposalSetting:
        """The iteration-0 components this setting starts from (itself at iteration 0)."""
        return ProposalSetting(k=self.k, th=self.th, max_size=self.max_size,
                               min_size=self.min_size, step=self.step)

    def describe(self) -> str:
        head = f"k{self.k} th{self.th:.3f} max{self.max_size}"
        if self.sv_k is None:
            return head
        return f"{head} + sv k{self.sv_k} th{self.sv_th:.3f} max{self.sv_max_size}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _iter1(bases, pairs) -> list[ProposalSetting]:
    return [ProposalSetting(th=th, sv_k=k, sv_max_size=m) for th in bases for k, m in pairs]


# learn-to-cluster's configurations (README "N prpsls"; MS1M cosine scale, k = 80)
PRESETS: dict[str, list[ProposalSetting]] = {
    "2": [ProposalSetting(th=0.7), ProposalSetting(th=0.75)],
    "8": [ProposalSetting(th=0.6), ProposalSetting(th=0.7),
          *_iter1((0.6, 0.7, 0.75), ((2, 8), (3, 5)))],
    "20": [ProposalSetting(th=0.6), ProposalSetting(th=0.7),
           *_iter1((0.6, 0.7, 0.75), ((2, 8), (2, 12), (2, 16), (3, 5), (3, 10), (4, 4)))],
}


def settings_from_meta(entries: list, where: str) -> list[ProposalSetting]:
    """Settings recorded in a model.json (a list of dicts); InputError when malformed."""
    if not isinstance(entries, list) or not entries:
        raise InputError(where, "model.json has no proposal settings")
    out = []
    names = {f.name for f in dataclasses.fields(ProposalSetting)}
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) - names:
            raise InputError(where, f"bad proposal setting in model.json: {entry!r}")
        try:
            out.append(ProposalSetting(**entry))
        except (TypeError, ValueError) as exc:
            raise InputError(where, str(exc)) from None
    return out


def map_cuts(settings: list[ProposalSetting], trained: tuple[float, float],
             current: tuple[float, float]) -> list[ProposalSetting]:
    """The settings with every cosine cut moved from the training graph's anchors
    ``trained = (low, high)`` to this graph's ``current`` ones: a cut keeps its place
    between the anchors (``low + a * (high - low)``), the label-free rule the other
    methods' ``auto`` values follow. Clipped to [-1, 1]."""
    (lo0, hi0), (lo1, hi1) = trained, current
    if not hi0 > lo0:
        return list(settings)
    scale = (hi1 - lo1) / (hi0 - lo0)

    def move(th: float) -> float:
        return round(min(1.0, max(-1.0, lo1 + (th - lo0) * scale)), 4)

    return [dataclasses.replace(s, th=move(s.th), sv_th=move(s.sv_th)) for s in settings]
