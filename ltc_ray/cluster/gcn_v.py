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

    def __init__(self, params, k: int):
        super().__init__(params, k)
        if not params.model:
            raise InputError("--model", "gcn-v needs a model trained by jobs/train.py")
        from ltc_ray.models.store import load_model

        model, meta = load_model(params.model, expected_k=k, method="gcn-v")
        self.meta = meta
        self.state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
        self.in_dim = int(meta["in_dim"])
        self.hidden = int(meta["hidden"])
        tuned = meta.get("thresholds", {}).get("tau")
        self.tau = float(params.tau if params.tau is not None else tuned if tuned is not None
                         else 0.65)
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

    def score_halo(self, part) -> np.ndarray:
        from ltc_ray.models.gcn_v import aggregate, predict

        agg = aggregate(part.adj, part.x_cols)
        conf, _ = predict(self.model(), part.x, agg, batch_rows=self.params.batch_rows)
        return conf.astype(np.float32)

    def link(self, part: PartitionInput, scores: np.ndarray) -> LinkResult:
        return link_to_nearest_higher(part, scores, self.tau)
