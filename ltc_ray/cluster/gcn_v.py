"""``gcn-v``: learn-to-cluster's GCN-V vertex confidence, inferred over partitions with
halos, then linking to the nearest neighbour of higher confidence (cosine > tau)."""

from __future__ import annotations

import numpy as np

from ltc_ray.cluster.base import ClusterMethod, LinkResult, PartitionInput, register
from ltc_ray.cluster.density_peak import link_to_nearest_higher
from ltc_ray.errors import InputError


@register
class GCNV(ClusterMethod):
    """Scores = the model's confidence for each node from ``[x_i ‖ (Â X)_i]``; needs the
    one-hop halo (neighbours' features and reverse edges), fetched by partition actors.

    ``tau`` defaults to the value tuned on the model's training split (carried in the
    model directory), so a model never depends on a test split's labels.
    """

    name = "gcn-v"
    params_key = "gcn_v"
    tunable = ("tau", 0.30, 0.95, 0.01)
    needs_halo = True
    # the model (its content hash is part of every fingerprint) and what the actors emit
    score_params = ("model", "batch_rows", "feature_pass")

    def __init__(self, params, k: int):
        super().__init__(params, k)
        if not params.model:
            raise InputError("--model", "gcn-v needs a model trained by jobs/train.py")
        from ltc_ray.models.store import load_model

        model, meta = load_model(
            params.model, expected_k=k, method="gcn-v", storage_options=self.storage_options
        )
        self.meta = meta
        self.state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
        self.in_dim = int(meta["in_dim"])
        self.hidden = int(meta["hidden"])
        tuned = meta.get("thresholds", {})
        self.tau = _pick(params.tau, tuned.get("tau"), 0.65)
        self.tau2 = _pick(params.tau2, tuned.get("tau2"), 0.8)
        self.feature_pass = bool(params.feature_pass)
        self._model = None

    def check_inputs(self, dim: int, where: str) -> None:
        if dim != self.in_dim:
            raise InputError(
                self.params.model, f"model was trained for dim {self.in_dim}, "
                f"the features ({where}) have {dim}",
            )

    def __getstate__(self):  # ship weights, rebuild the module on the worker
        state = dict(self.__dict__)
        state["_model"] = None
        return state

    def model(self):
        if self._model is None:
            from ltc_ray.models.gcn_v import GCNV as Net

            net = Net(self.in_dim, self.hidden)
            net.load_state_dict(self.state)
            net.eval()
            self._model = net
        return self._model

    def score_halo(self, part):
        """Confidence ``(n,) float32``; with the feature pass also the hidden features
        ``(n, hidden)`` the pipeline writes and builds the second kNN graph from."""
        import torch

        from ltc_ray.models.gcn_v import aggregate, predict

        agg = aggregate(part.adj, part.x_cols)
        # a partition actor sees a GPU only when the pipeline requested one for it
        device = "cuda" if torch.cuda.is_available() else "cpu"
        conf, hidden = predict(self.model(), part.x, agg, batch_rows=self.params.batch_rows,
                               device=device)
        conf = conf.astype(np.float32)
        return (conf, hidden) if self.feature_pass else conf

    def link(self, part: PartitionInput, scores: np.ndarray) -> LinkResult:
        """On the input graph (tau) or, in the feature pass, on the GCN-feature graph (tau2)."""
        return link_to_nearest_higher(part, scores, self.tau2 if self.feature_pass else self.tau)


def _pick(configured, tuned, fallback):
    """A configured value wins, then the value tuned with the model, then the paper's."""
    return configured if configured is not None else tuned if tuned is not None else fallback
