"""The small decoder LM of the lab, assembled from a config: dense or with sparseroute MoE FFNs,
dense or block-sparse attention.

``preset("tiny")`` / ``sized(depth)`` -> :class:`LMConfig`; ``TransformerLM(cfg)(ids)`` ->
:class:`LMOutput` (logits, summed auxiliary losses, one Routing per MoE layer, one BlockRouting
per sparse attention layer); :func:`flops_per_token` for compute accounting.
"""

from sparseroute.models.config import PRESETS, LMConfig, preset, sized
from sparseroute.models.flops import (
    flops_per_token,
    forward_backward_flops,
    parameter_counts,
    router_flops_per_token,
)
from sparseroute.models.lm import LMOutput, RMSNorm, TransformerLM, apply_rope, rope_cos_sin

__all__ = [
    "LMConfig",
    "LMOutput",
    "PRESETS",
    "RMSNorm",
    "TransformerLM",
    "apply_rope",
    "flops_per_token",
    "forward_backward_flops",
    "parameter_counts",
    "preset",
    "rope_cos_sin",
    "router_flops_per_token",
    "sized",
]
