"""Measuring trained models: perplexity on held-out text (:func:`evaluate`) and what the routers
do (:mod:`sparseroute.evaluation.diagnostics`: routing profile, halting curves, routing
fluctuation, router-expert coupling, expert specialisation)."""

from sparseroute.evaluation.diagnostics import (
    expert_specialisation,
    halting_curve,
    halting_taus,
    router_expert_coupling,
    routing_fluctuation,
    routing_profile,
    set_halting,
)
from sparseroute.evaluation.evaluate import evaluate

__all__ = [
    "evaluate",
    "expert_specialisation",
    "halting_curve",
    "halting_taus",
    "router_expert_coupling",
    "routing_fluctuation",
    "routing_profile",
    "set_halting",
]
