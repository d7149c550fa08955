"""Routing: the balanced transportation solver, WGM (loss weights), LGM (selection labels) and metrics."""

from pycoe.routing import metrics
from pycoe.routing.labels import LabelGenerator, LabelOutput, best_expert
from pycoe.routing.transport import (
    TransportInfeasibleError,
    TransportResult,
    balanced_assignment,
    near_equal_capacities,
    solve_balanced_transport,
)
from pycoe.routing.weighting import BalancedTransportWeighter, WeightingOutput

__all__ = [
    "balanced_assignment",
    "solve_balanced_transport",
    "near_equal_capacities",
    "TransportResult",
    "TransportInfeasibleError",
    "BalancedTransportWeighter",
    "WeightingOutput",
    "LabelGenerator",
    "LabelOutput",
    "best_expert",
    "metrics",
]
