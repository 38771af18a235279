"""A trained model's untrained twin: the same architecture and ``model.json`` (thresholds
included) at seeded random weights, so a quality test can ask whether training helped on
the same split through the same job, rather than accept a fixed score an untrained model
might reach."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def random_twin(trained: Path, out: Path, seed: int = 0, keep_gcn_v: bool = False) -> str:
    """Write to ``out`` the model in ``trained`` with random weights from ``seed``.

    A gcn-ve directory gets a random GCN-E; its GCN-V is random too unless ``keep_gcn_v``,
    which copies the trained GCN-V so that only what the GCN-E learnt is compared.
    """
    import torch

    from ltc_ray.models.edge_scorer import EdgeScorer, ScorerShape
    from ltc_ray.models.gcn_e import GCNE
    from ltc_ray.models.gcn_v import GCNV
    from ltc_ray.models.store import (
        MODEL_JSON,
        NETS,
        save_edge_scorer,
        save_gcn_e,
        save_model,
        save_net,
    )

    trained, out = Path(trained), Path(out)
    if not (trained / MODEL_JSON).exists() and (trained / "gcn-s").exists():  # gcn-ds
        random_twin(trained / "gcn-d", out / "gcn-d", seed)
        random_twin(trained / "gcn-s", out / "gcn-s", seed + 1)
        return str(out)
    if not (trained / MODEL_JSON).exists():  # gcn-ve: gcn-v/ and gcn-e/
        if keep_gcn_v:
            shutil.copytree(trained / "gcn-v", out / "gcn-v")
        else:
            random_twin(trained / "gcn-v", out / "gcn-v", seed)
        random_twin(trained / "gcn-e", out / "gcn-e", seed + 1)
        return str(out)
    meta = json.loads((trained / MODEL_JSON).read_text())
    meta.pop("versions", None)  # written again from this environment
    torch.manual_seed(seed)
    if meta["method"] == "gcn-v":
        save_model(str(out), GCNV(meta["in_dim"], meta["hidden"]), meta)
    elif meta["method"] == "gcn-e":
        save_gcn_e(str(out), GCNE(meta["in_dim"], meta["dims"]), meta)
    elif meta["method"] in ("hard-clusters", "map-equation"):  # the same edge scorer
        keys = ("in_dim", "d_model", "heads", "ffn", "layers", "k", "dropout")
        save_edge_scorer(str(out), EdgeScorer(ScorerShape(**{k: meta[k] for k in keys})), meta,
                         method=meta["method"])
    elif meta["method"] in NETS:
        import importlib

        module, name = NETS[meta["method"]]
        cls = getattr(importlib.import_module(module), name)
        save_net(str(out), cls(meta["in_dim"], tuple(meta["dims"])), meta["method"], meta)
    else:
        raise AssertionError(f"no random twin for a {meta['method']!r} model")
    return str(out)
