"""Domain-shift settings: labelled embeddings unlike the MS1M-shaped benchmark.

Why: a threshold fitted to one similarity scale does not transfer (issue 15). These
settings move every property a real embedding model changes: how similar the photos
of one person are (mean same-identity cosine from about 0.3 to 0.8), how strong the
look-alike families are, the dimension (128 / 256 / 512), identity sizes (an MS1M-like
long tail; LFW-like 1-20 photos with many singletons; a few very large identities;
many tiny identities), the share of outliers, and inputs that are neither centred nor
unit-norm (a shared offset raises every cosine; row norms vary).

Each setting has a ``train`` and a ``test`` split with disjoint identities drawn from
the same distribution (same look-alike families). Everything is a deterministic
function of ``(setting, seed)``; the identity model is
:func:`ltc_ray.synthetic.generator.identity_samples` with the setting's knobs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ltc_ray.errors import InputError
from ltc_ray.synthetic.generator import SyntheticParams, family_centres, identity_samples

_TAG_SHIFT_SIZES, _TAG_SHIFT_ROWS = 11, 12
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ShiftSetting:
    """One labelled setting. ``sizes``: "long-tail" (log-normal, MS1M-like, >= 2 per
    identity), "lfw" (1..20 photos, about half the identities with one), "giants" (the
    long tail plus ``giants`` identities of ``giant_size`` samples), "tiny" (2..4).
    ``offset``: weight of a direction shared by every row before the row norms are
    applied (cosines rise towards 1 as it grows); ``norm_sigma``: log-normal sigma of
    the row norms (0: unit rows)."""

    name: str
    note: str
    dim: int = 256
    n_ids: int = 120
    sizes: str = "long-tail"
    mean_size: float = 40.0
    giants: int = 0
    giant_size: int = 400
    offset: float = 0.0
    norm_sigma: float = 0.0
    model: SyntheticParams = field(default_factory=SyntheticParams)

    def describe(self) -> dict:
        out = asdict(self)
        out["model"] = asdict(self.model)
        return out


def _p(**kw) -> SyntheticParams:
    return replace(SyntheticParams(), **kw)


SETTINGS: dict[str, ShiftSetting] = {s.name: s for s in [
    ShiftSetting("ms1m-like", "the synthetic benchmark's own model (same-identity cos ~0.6)"),
    ShiftSetting("low-sim", "noisier photos: same-identity cos ~0.4, 256-d (a model trained "
                 "on ms1m-like runs here: the shift check's case)",
                 model=_p(noise_median=1.1)),
    ShiftSetting("very-low-sim", "same-identity cos ~0.3, weak families, 128-d",
                 dim=128, model=_p(noise_median=1.4, family_affinity=(0.3, 0.8))),
    ShiftSetting("high-sim", "clean photos: same-identity cos ~0.8, 128-d",
                 dim=128, model=_p(noise_median=0.4, noise_sigma=0.2)),
    ShiftSetting("lfw-like", "1-20 photos per identity, half of them singletons, 512-d",
                 dim=512, n_ids=700, sizes="lfw", model=_p(noise_median=0.8)),
    ShiftSetting("giants", "long tail plus 4 identities of 600 photos, 256-d",
                 n_ids=100, giants=4, giant_size=600),
    ShiftSetting("look-alikes", "strong look-alike families (cos to family centre 0.8-0.97)",
                 model=_p(family_affinity=(0.8, 0.97), ids_per_family=20.0,
                          noise_median=0.5)),
    ShiftSetting("outliers", "15% very noisy samples, 256-d",
                 model=_p(outlier_rate=0.15)),
    ShiftSetting("offset-norms", "not centred and not unit-norm: a shared offset raises "
                 "every cosine (impostors ~0.5), row norms vary 4x, 512-d",
                 dim=512, offset=1.0, norm_sigma=0.5, model=_p(noise_median=0.8)),
    ShiftSetting("many-tiny", "2-4 photos for each of 1,500 identities, 128-d",
                 dim=128, n_ids=1500, sizes="tiny", model=_p(noise_median=0.7)),
]}


def setting(name: str) -> ShiftSetting:
    """The named setting; an unknown name is an InputError listing them."""
    if name not in SETTINGS:
        raise InputError("--settings", f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    return SETTINGS[name]


def shift_sizes(s: ShiftSetting, split: str, seed: int) -> np.ndarray:
    """Identity sizes of one split, ``(n_ids,) int64``."""
    rng = np.random.default_rng([seed, _TAG_SHIFT_SIZES, SPLITS.index(split)])
    if s.sizes in ("long-tail", "giants"):
        sigma = s.model.size_sigma
        raw = rng.lognormal(np.log(s.mean_size) - sigma**2 / 2, sigma, s.n_ids)
        sizes = np.clip(np.rint(raw), 2, s.model.size_max_factor * s.mean_size).astype(np.int64)
        if s.sizes == "giants":
            sizes[: s.giants] = s.giant_size
        return sizes
    if s.sizes == "lfw":
        # half singletons, the rest geometric-like up to 20
        sizes = np.where(rng.random(s.n_ids) < 0.5, 1, 2 + rng.geometric(0.25, s.n_ids) - 1)
        return np.minimum(sizes, 20).astype(np.int64)
    if s.sizes == "tiny":
        return rng.integers(2, 5, s.n_ids).astype(np.int64)
    raise InputError("sizes", f"unknown size model {s.sizes!r}")


def make_split(s: ShiftSetting, split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(features (n, dim) float32, labels (n,) int64)`` of one split, rows shuffled."""
    if split not in SPLITS:
        raise InputError("split", f"must be one of {SPLITS}, got {split!r}")
    n_families = max(1, int(round(2 * s.n_ids / s.model.ids_per_family)))
    families = family_centres(n_families, s.dim, seed)
    sizes = shift_sizes(s, split, seed)
    first = 0 if split == "train" else 1_000_000
    xs = [identity_samples(first + i, int(n), families, seed, s.model)
          for i, n in enumerate(sizes)]
    x = np.concatenate(xs).astype(np.float64)
    y = np.repeat(first + np.arange(len(sizes), dtype=np.int64), sizes)
    rng = np.random.default_rng([seed, _TAG_SHIFT_ROWS, SPLITS.index(split)])
    if s.offset:
        shared = family_centres(1, s.dim, seed + 7919)[0]
        x = x + s.offset * shared
    if s.norm_sigma:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x *= rng.lognormal(0.0, s.norm_sigma, len(x))[:, None]
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), y[perm]


def write_split(s: ShiftSetting, split: str, root: str, seed: int = 0) -> dict:
    """Write ``<root>/<name>/<split>.npy`` and ``<split>.meta``; return paths and stats."""
    x, y = make_split(s, split, seed)
    folder = os.path.join(root, s.name)
    os.makedirs(folder, exist_ok=True)
    features = os.path.join(folder, f"{split}.npy")
    labels = os.path.join(folder, f"{split}.meta")
    np.save(features + ".tmp.npy", x)
    os.replace(features + ".tmp.npy", features)
    with open(labels + ".tmp", "w") as fh:
        fh.write("\n".join(map(str, y.tolist())) + "\n")
    os.replace(labels + ".tmp", labels)
    return {"features": features, "labels": labels, "n_samples": int(len(y)),
            "n_ids": int(len(np.unique(y))), **same_identity_cosine(x, y)}


def same_identity_cosine(x: np.ndarray, y: np.ndarray, pairs: int = 20_000,
                         seed: int = 0) -> dict:
    """Mean cosine of random same-identity pairs and of random pairs (mostly impostors),
    after L2 normalisation: the similarity scale a setting has."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    order = np.argsort(y, kind="stable")
    ys = y[order]
    starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
    counts = np.diff(np.r_[starts, len(ys)])
    multi = np.flatnonzero(counts >= 2)
    g = rng.choice(multi, pairs) if len(multi) else np.empty(0, np.int64)
    a = starts[g] + (rng.random(len(g)) * counts[g]).astype(np.int64)
    b = starts[g] + (rng.random(len(g)) * counts[g]).astype(np.int64)
    ok = a != b
    same = np.einsum("ij,ij->i", u[order[a[ok]]], u[order[b[ok]]])
    i, j = rng.integers(0, len(u), (2, pairs))
    other = np.einsum("ij,ij->i", u[i], u[j])[y[i] != y[j]]
    return {"same_identity_cos": float(same.mean()) if len(same) else float("nan"),
            "impostor_cos": float(other.mean())}
