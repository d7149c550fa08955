r"""The per-segment lines of a PWLU and the chain rule back to its parameters (private to :mod:`._pwlu`).

Both kernels of :func:`pycoe.functional.pwlu` (the chunked eager one and the fused composite for
``torch.compile`` / ``torch.export``) evaluate every segment ``s`` as a line ``y = alpha[s] + beta[s] * x``
taken from the small ``[P, S]`` tables built here, and reduce the incoming gradient over the batch into
per-segment sums, which :func:`tables_backward` turns into the parameter gradients.

Legend: ``P`` parameter rows (1 for layer granularity, ``C`` for channel granularity); ``N`` intervals;
``K = N + 1`` knots; ``S = N + 2`` segments (left ray, ``N`` intervals, right ray). The segment of ``x`` is
``s = clamp(floor(x * scale + shift), 0, N + 1)`` with ``scale = 1 / d``, ``shift = 1 - B_L / d`` and
``d = (B_R - B_L) / N``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "SegmentTables",
    "segment_tables",
    "tables_backward",
    "compute_dtype",
    "segment_tables_op",
    "tables_backward_op",
]


def compute_dtype(x: Tensor, points: Tensor) -> torch.dtype:
    """float64 if either operand is float64, float32 otherwise (bfloat16 and float16 are upcast)."""
    if torch.float64 in (x.dtype, points.dtype):
        return torch.float64
    return torch.float32


class SegmentTables(NamedTuple):
    """The lines of the ``S = N + 2`` segments, per parameter row (all in the compute dtype)."""

    alpha: Tensor  # [P, S] intercepts
    beta: Tensor  # [P, S] slopes
    anchor: Tensor  # [P, S] the abscissa where segment s meets its knot
    inner: Tensor  # [P, N] the slopes of the intervals
    d: Tensor  # [P] interval width
    scale: Tensor  # [P] 1 / d
    shift: Tensor  # [P] 1 - B_L / d: x * scale + shift is the segment coordinate


def segment_tables(y: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor) -> SegmentTables:
    """Build the tables from knots ``y`` Tensor[P, K] and bounds/slopes Tensor[P] (differentiable)."""
    n = y.shape[1] - 1
    d = (rb - lb) / n
    inner = (y[:, 1:] - y[:, :-1]) / d[:, None]
    beta = torch.cat([ks[:, None], inner, kr[:, None]], dim=1)
    steps = torch.arange(n, dtype=y.dtype, device=y.device)
    knots = torch.cat([lb[:, None] + steps * d[:, None], rb[:, None]], dim=1)  # [P, K]
    anchor = torch.cat([knots[:, :1], knots], dim=1)
    base = torch.cat([y[:, :1], y], dim=1)  # [P, S]: the knot value at the anchor
    alpha = base - beta * anchor
    scale = 1.0 / d
    shift = 1.0 - lb * scale
    return SegmentTables(alpha, beta, anchor, inner, d, scale, shift)


def tables_backward(
    tab: SegmentTables, g_alpha: Tensor, g_beta: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Chain rule from the per-segment sums to the parameters.

    Args:
        tab: the output of :func:`segment_tables`.
        g_alpha: Tensor[P, S], the sum of the incoming gradient over the elements of each segment.
        g_beta: Tensor[P, S], the same sum weighted by ``x``.

    Returns:
        The gradients of (points Tensor[P, K], left_bound, right_bound, left_slope, right_slope Tensor[P]).

    With ``y = base[s] + beta[s] * (x - anchor[s])``: d/d base = g, d/d beta = g * (x - anchor),
    d/d anchor = -beta * g. The knots are ``B_L + j * d`` for ``j < N`` and ``B_R`` for ``j = N``.
    """
    beta, anchor, inner, d = tab.beta, tab.anchor, tab.inner, tab.d
    n = inner.shape[1]
    g_beta_total = g_beta - anchor * g_alpha  # [P, S]
    g_anchor = -beta * g_alpha  # [P, S]
    # base = cat(Y_0, Y_0..Y_N) and anchor = cat(knot_0, knot_0..knot_N): fold the duplicated first column
    g_points = torch.cat([(g_alpha[:, 0] + g_alpha[:, 1])[:, None], g_alpha[:, 2:]], dim=1)
    g_knots = torch.cat([(g_anchor[:, 0] + g_anchor[:, 1])[:, None], g_anchor[:, 2:]], dim=1)
    g_inner = g_beta_total[:, 1:-1] / d[:, None]  # d/d (Y_{i+1} - Y_i)
    zero = torch.zeros_like(g_inner[:, :1])
    g_points = g_points + torch.cat([zero, g_inner], dim=1) - torch.cat([g_inner, zero], dim=1)
    steps = torch.arange(n, dtype=d.dtype, device=d.device)
    g_d = (g_knots[:, :n] * steps).sum(dim=1) - (g_inner * inner).sum(dim=1)
    g_lb = g_knots[:, :n].sum(dim=1) - g_d / n
    g_rb = g_knots[:, n] + g_d / n
    return g_points, g_lb, g_rb, g_beta_total[:, 0], g_beta_total[:, -1]


# The same two computations as opaque custom ops, for the fused kernel under torch.compile: inductor
# would otherwise parallelise these [P, S]-sized loops (for P of a few dozen channels and more) with
# OpenMP barriers between them, a fixed cost per call that dominates small inputs when threads must wait.


@torch.library.custom_op("pycoe::pwlu_segment_tables", mutates_args=())
def segment_tables_op(y: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor) -> list[Tensor]:
    """:func:`segment_tables` as one opaque op (its fields as a list, in order)."""
    with torch.no_grad():
        return [t.clone() for t in segment_tables(y, lb, rb, ks, kr)]


@segment_tables_op.register_fake
def _(y: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor) -> list[Tensor]:
    rows, k = y.shape
    table, row = y.new_empty((rows, k + 1)), y.new_empty((rows,))
    return [table, table.clone(), table.clone(), y.new_empty((rows, k - 1)), row, row.clone(), row.clone()]


@torch.library.custom_op("pycoe::pwlu_tables_backward", mutates_args=())
def tables_backward_op(
    y: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor, g_alpha: Tensor, g_beta: Tensor
) -> list[Tensor]:
    """:func:`tables_backward` of the tables of these parameters, as one opaque op."""
    with torch.no_grad():
        return [t.clone() for t in tables_backward(segment_tables(y, lb, rb, ks, kr), g_alpha, g_beta)]


@tables_backward_op.register_fake
def _(y: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor, g_alpha: Tensor, g_beta: Tensor) -> list[Tensor]:
    row = y.new_empty((y.shape[0],))
    return [y.new_empty(y.shape), row, row.clone(), row.clone(), row.clone()]
