"""Router probes (docs/method.md §4): routing records, load metrics, the Lipschitz sandwich and the
perturbation response.  Depends on torch and numpy only (pandas optional for ``rows_to_frame``)."""
from .amplification import KINDS, ROW_KEYS, capture_layer_inputs, perturbation_response, rows_to_frame
from .lipschitz import (ORDER_RTOL, WRT, LipschitzResult, certified_lipschitz, local_lipschitz,
                        local_lipschitz_generic, router_lipschitz, softmax_jacobian)
from .load import (coefficient_of_variation, dead_experts, gini, hard_load, load_entropy, load_metrics,
                   max_mean_share, soft_load, top1_churn)
from .records import RoutingRecorder, record_routing, routed_layers

__all__ = [
    "record_routing", "RoutingRecorder", "routed_layers",
    "soft_load", "hard_load", "gini", "load_entropy", "coefficient_of_variation", "max_mean_share",
    "dead_experts", "top1_churn", "load_metrics",
    "softmax_jacobian", "router_lipschitz", "certified_lipschitz", "local_lipschitz",
    "local_lipschitz_generic", "LipschitzResult", "ORDER_RTOL", "WRT",
    "perturbation_response", "capture_layer_inputs", "rows_to_frame", "KINDS", "ROW_KEYS",
]
