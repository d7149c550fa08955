"""Names shared by the modules of the balanced-transport solver: the method names, the result and the error.

The public API is :mod:`pycoe.routing.transport`, which re-exports everything listed in ``__all__`` here (the
error); the method names and the result are internal to :mod:`pycoe.routing`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TransportInfeasibleError"]

#: The solver's methods (the one place where their names are written).
METHODS = ("exact", "sinkhorn", "greedy")

#: The keyword options each method takes; any other option passed to a method raises.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "exact": (),
    "sinkhorn": ("entropic_reg", "max_iter"),
    "greedy": (),
}


class TransportInfeasibleError(ValueError):
    """No assignment meets the capacities without using a forbidden (``-inf``) pair."""


@dataclass
class TransportResult:
    """The full solution behind :func:`~pycoe.routing.transport.balanced_assignment` (internal).

    Attributes:
        assignment: LongTensor[N], the expert of every sample.
        objective: total score of the assigned pairs, ``sum_i scores[i, assignment[i]]`` (float64 sum).
        capacities: LongTensor[K], the capacities that were met exactly.
        prices: Tensor[K] (float64) of dual prices, or ``None`` (``"greedy"``). For ``"exact"`` they
            certify optimality: every sample's expert maximises ``scores[i, k] - prices[k]``. For
            ``"sinkhorn"`` they are the entropic dual potentials (``+inf`` for zero-capacity experts).
        method: the method that produced the result.
    """

    assignment: torch.Tensor
    objective: float
    capacities: torch.Tensor
    prices: torch.Tensor | None
    method: str
