"""Tiny untrained models for the learned methods: enough for invariance, determinism and
resume checks (any fixed weights must give the same clusters however the work is split)."""

from __future__ import annotations

from pathlib import Path


def tiny_gcn_v(path: Path, in_dim: int, k: int, seed: int = 0, hidden: int = 16) -> str:
    """A GCN-V model directory with random weights from ``seed`` (tau 0.6)."""
    import torch

    from ltc_ray.models.gcn_v import GCNV
    from ltc_ray.models.store import save_model

    torch.manual_seed(seed)
    save_model(str(path), GCNV(in_dim, hidden), {"k": k, "thresholds": {"tau": 0.6}})
    return str(path)


def tiny_gcn_ve(path: Path, in_dim: int, k: int, feature_k: int, seed: int = 0) -> str:
    """A gcn-ve model directory (``gcn-v/`` + ``gcn-e/``) with random weights."""
    import torch

    from ltc_ray.models.gcn_e import GCNE
    from ltc_ray.models.store import save_gcn_e

    hidden = 16
    tiny_gcn_v(path / "gcn-v", in_dim, k, seed, hidden)
    torch.manual_seed(seed + 1)
    save_gcn_e(
        str(path / "gcn-e"),
        GCNE(hidden, (16, 16, 16, 16)),
        {"k": feature_k, "rho": 0.2, "thresholds": {"tau": 0.6}},
    )
    return str(path)


def tiny_hard_clusters(path: Path, in_dim: int, k: int, seed: int = 0, tau: float = 0.7,
                       method: str = "hard-clusters", thresholds: dict | None = None) -> str:
    """A hard-clusters (or ``method`` map-equation) edge scorer directory with random
    weights (d_model 16) carrying ``thresholds`` (default ``{"tau": tau}``)."""
    import torch

    from ltc_ray.models.edge_scorer import EdgeScorer, ScorerShape
    from ltc_ray.models.store import save_edge_scorer

    torch.manual_seed(seed)
    shape = ScorerShape(in_dim=in_dim, d_model=16, heads=2, ffn=32, k=k, dropout=0.0)
    save_edge_scorer(str(path), EdgeScorer(shape), {"thresholds": thresholds or {"tau": tau}},
                     method=method)
    return str(path)


TINY_PROPOSALS = [
    {"k": 10, "th": 0.4, "max_size": 40, "min_size": 3},
    {"k": 10, "th": 0.5, "max_size": 25, "min_size": 2},
    {"k": 10, "th": 0.5, "max_size": 25, "min_size": 3, "sv_k": 3, "sv_th": 0.3,
     "sv_max_size": 4},
]


def tiny_gcn_d(path: Path, in_dim: int, k: int, seed: int = 0, segments: bool = False) -> str:
    """A gcn-d (or, ``segments``, gcn-ds: ``gcn-d/`` + ``gcn-s/``) model directory with
    random weights and three small proposal settings (one of them iteration 1)."""
    import torch

    from ltc_ray.models.gcn_ds import GCND, GCNS
    from ltc_ray.models.store import save_net

    meta = {"k": k, "adj_k": k, "proposals": TINY_PROPOSALS,
            "anchors": {"low": 0.3, "high": 0.9}}
    torch.manual_seed(seed)
    d_dir = path / "gcn-d" if segments else path
    save_net(str(d_dir), GCND(in_dim, (16, 8)), "gcn-d", meta)
    if segments:
        torch.manual_seed(seed + 1)
        save_net(str(path / "gcn-s"), GCNS(in_dim + 1, (16, 8)), "gcn-s", meta)
    return str(path)


def tiny_lgcn(path: Path, in_dim: int, k: int, seed: int = 0) -> str:
    """An L-GCN model directory with random weights (widths 16, small pivot subgraphs)."""
    import torch

    from ltc_ray.models.lgcn import LGCN
    from ltc_ray.models.store import save_net

    torch.manual_seed(seed)
    save_net(str(path), LGCN(in_dim, (16, 16, 16, 16)), "lgcn",
             {"k": k, "hop1": min(8, k - 1), "hop2": 3, "active": 3,
              "thresholds": {"max_size": 60, "step": 0.02}})
    return str(path)


def tiny_pse_gcn(path: Path, in_dim: int, k: int, seed: int = 0, hidden: int = 16,
                 out: int = 16, like: dict | None = None) -> str:
    """A PSE-GCN model directory with random weights (small subgraphs; ``like``: the
    shapes and tau of another model's model.json)."""
    import torch

    from ltc_ray.models.pse_gcn import PSEGCN
    from ltc_ray.models.store import save_net

    torch.manual_seed(seed)
    meta = {"k": k, "rerank": {"k1": min(10, k), "k2": 5, "expand": 3, "top": 10},
            "hop1": 4, "hop2": 2, "local_k": 4, "thresholds": {"tau": 0.0}}
    if like is not None:
        meta = {key: like[key] for key in ("k", "rerank", "hop1", "hop2", "local_k",
                                           "thresholds")}
    save_net(str(path), PSEGCN(in_dim, (hidden, out)), "pse-gcn", meta)
    return str(path)


def model_flags(method: str, tmp: Path, in_dim: int, k: int) -> list[str]:
    """CLI flags giving ``method`` a tiny model; [] for unsupervised methods. A newly
    registered method that needs a model fails here until it gets a maker."""
    from ltc_ray.cluster import REGISTRY

    if method == "gcn-v":
        return ["--model", tiny_gcn_v(tmp / "gcn-v-model", in_dim, k)]
    if method == "gcn-ve":
        return ["--model", tiny_gcn_ve(tmp / "gcn-ve-model", in_dim, k, feature_k=15)]
    if method == "hard-clusters":
        return ["--model", tiny_hard_clusters(tmp / "hc-model", in_dim, k)]
    if method == "map-equation":  # random p: TPDi < 0.9 keeps the rows' strong overlaps
        return ["--model", tiny_hard_clusters(tmp / "me-model", in_dim, k, method=method,
                                              thresholds={"tau": 0.9, "max_neighbours": 5})]
    if method in ("gcn-d", "gcn-ds"):
        return ["--model", tiny_gcn_d(tmp / f"{method}-model", in_dim, k,
                                      segments=method == "gcn-ds")]
    if method == "lgcn":
        return ["--model", tiny_lgcn(tmp / "lgcn-model", in_dim, k)]
    if method == "pse-gcn":
        return ["--model", tiny_pse_gcn(tmp / "pse-gcn-model", in_dim, k)]
    assert not REGISTRY[method].shape.uses_model, (
        f"add a tiny model maker for {method} in tests/_models.py")
    return []
