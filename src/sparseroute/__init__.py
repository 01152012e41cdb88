"""sparseroute: sparse routing mechanisms for PyTorch, and a lab to compare them."""

from sparseroute.registry import Registry
from sparseroute.routing import Routing, apply_capacity, routing_stats

__version__ = "0.1.0"

__all__ = ["Registry", "Routing", "apply_capacity", "routing_stats", "__version__"]
