r"""Piecewise linear unit (PWLU), functional form.

The unit of Zhou, Zhu and Zhong, *Learning Specialized Activation Functions with the Piecewise Linear
Unit*, ICCV 2021 (arXiv:2104.03693): :math:`N` uniform intervals between a left bound :math:`B_L` and a
right bound :math:`B_R`, :math:`N + 1` knot values :math:`Y_P^0, \dots, Y_P^N`, linear interpolation
between the knots and linear extrapolation with slopes :math:`K_L` and :math:`K_R` outside the bounds.

:func:`pwlu` validates its arguments and runs one of two kernels, which compute the same function
(every segment is a line ``alpha[s] + beta[s] * x`` of the tables in :mod:`._pwlu_tables`):

* eager, on the CPU: the chunked kernel of :mod:`._pwlu_eager` (few, cache-resident passes; threads);
* under ``torch.compile`` or ``torch.export``, and eagerly on other devices: :class:`_FusedPWLU`, a
  composite of plain torch ops that inductor fuses into one loop forward and one
  backward, and that ``torch.export`` / ONNX can trace (index arithmetic, ``Gather``, multiply-add).

Both save only the input (and the small parameters) for backward and recompute the segment index there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pycoe._validation import check_finite, check_int, check_number, check_tensor
from pycoe.functional._pwlu_eager import EagerPWLU, eager_tables, segment_sums
from pycoe.functional._pwlu_tables import (
    SegmentTables,
    compute_dtype,
    segment_tables,
    segment_tables_op,
    tables_backward,
    tables_backward_op,
)

__all__ = ["pwlu"]

_PARAM_NAMES = ("left_bound", "right_bound", "left_slope", "right_slope")
_NUMBER = "a tensor or a finite number"


def _as_param_row(name: str, value: Tensor | float, rows: int, like: Tensor) -> Tensor:
    """``value`` as a tensor of shape ``[rows]`` (broadcasting a single value, differentiably)."""
    if not isinstance(value, Tensor):
        number = check_number(name, value, expected=_NUMBER)
        value = torch.tensor(number, dtype=like.dtype, device=like.device)
    check_tensor(name, value, floating=True)
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but points is on {like.device}")
    if value.numel() == rows:
        return value.reshape(rows)
    if value.numel() == 1:
        return value.reshape(1).expand(rows)
    raise ValueError(f"{name} must hold 1 value or one per row of points ({rows}), got shape {tuple(value.shape)}")


def _check_values(tab: SegmentTables, points: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor) -> None:
    """Raise, naming the argument, unless every parameter is finite and ``B_L < B_R`` on every row.

    Checked on the small tables built from the parameters (finite lines, ``d > 0``), one synchronising
    ``bool``; the caller skips it where that would synchronise a device or break a traced graph.
    """
    with torch.no_grad():
        if bool(torch.isfinite(tab.alpha).all() & torch.isfinite(tab.beta).all() & (tab.d > 0).all()):
            return
        named = (("points", points), ("left_bound", lb), ("right_bound", rb), ("left_slope", ks), ("right_slope", kr))
        for name, t in named:
            check_finite(name, t)
        bad = torch.nonzero(lb >= rb)
        if bad.numel():
            row = int(bad[0, 0])
            raise ValueError(
                f"left_bound must be smaller than right_bound on every row, but row {row} has "
                f"left_bound={float(lb[row])} and right_bound={float(rb[row])}"
            )
    raise ValueError(
        "the PWLU parameters are finite with left_bound < right_bound, but the interval width or the segment "
        "lines they imply overflow or underflow (bounds too far apart or too close for the dtype)"
    )


def _prepare(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor | float,
    right_bound: Tensor | float,
    left_slope: Tensor | float,
    right_slope: Tensor | float,
    channel_dim: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """Validate the arguments; return points ``[P, K]``, the four ``[P]`` rows and the channel dim."""
    check_tensor("x", x, floating=True)
    check_tensor("points", points, ndim=(1, 2), floating=True)
    if points.dim() == 1:
        points = points.unsqueeze(0)
    if points.shape[1] < 2:
        raise ValueError(f"points must hold at least 2 knots (1 interval) per row, got shape {tuple(points.shape)}")
    if points.shape[0] < 1:
        raise ValueError("points must have at least one row")
    if x.device != points.device:
        raise ValueError(f"x is on {x.device} but points is on {points.device}")
    if not isinstance(left_bound, Tensor) and not isinstance(right_bound, Tensor):
        low = check_number("left_bound", left_bound, expected=_NUMBER)
        high = check_number("right_bound", right_bound, expected=_NUMBER)
        if not low < high:
            raise ValueError(f"left_bound must be smaller than right_bound, got {low} and {high}")
    rows = points.shape[0]
    lb, rb, ks, kr = (
        _as_param_row(name, value, rows, points)
        for name, value in zip(_PARAM_NAMES, (left_bound, right_bound, left_slope, right_slope))
    )
    channel_dim = check_int("channel_dim", channel_dim)
    cd = channel_dim
    if rows > 1:
        if not -x.dim() <= channel_dim < x.dim():
            raise ValueError(f"channel_dim={channel_dim} is out of range for x of shape {tuple(x.shape)}")
        cd = channel_dim % x.dim()
        if x.shape[cd] != rows:
            raise ValueError(
                f"x has {x.shape[cd]} channels along channel_dim={channel_dim} (shape {tuple(x.shape)}), "
                f"but points has {rows} rows (one per channel)"
            )
    return points, lb, rb, ks, kr, cd


# ----------------------------------------------------------------------------------------------------
# The fused composite (torch.compile, torch.export, devices other than the CPU)


def _flat_index(x: Tensor, tab: SegmentTables, channel_dim: int) -> Tensor:
    """The int64 index of every element of ``x`` into the flattened ``[P * S]`` tables."""
    rows, n = tab.alpha.shape[0], tab.alpha.shape[1] - 2
    shape = [1] * x.dim()
    if rows > 1:
        shape[channel_dim] = rows
    v = x * tab.scale.reshape(shape) + tab.shift.reshape(shape)
    v = torch.where(v == v, v, 0.0).clamp(0, n + 1)  # a NaN input takes segment 0 (its output stays NaN)
    idx = v.to(torch.int64)  # truncation is floor here (v >= 0)
    if rows > 1:
        idx = idx + (torch.arange(rows, device=x.device) * (n + 2)).reshape(shape)
    return idx


def _opaque_tables() -> bool:
    """Under torch.compile (not export), the [P, S]-sized table work runs as opaque ops (see _pwlu_tables)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def _fused_tables(x: Tensor, points: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor) -> SegmentTables:
    cdt = compute_dtype(x, points)
    args = (points.to(cdt), lb.to(cdt), rb.to(cdt), ks.to(cdt), kr.to(cdt))
    if _opaque_tables():
        return SegmentTables(*segment_tables_op(*args))
    return segment_tables(*args)


class _FusedPWLU(torch.autograd.Function):
    """Whole-tensor elementwise ops that a compiler fuses; saves only ``x`` and the parameters.

    A custom function rather than plain autograd so that backward recomputes the index from ``x``: left to
    itself, AOTAutograd's partitioner saves the int64 index (8 bytes per element) for backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        points: Tensor,
        lb: Tensor,
        rb: Tensor,
        ks: Tensor,
        kr: Tensor,
        channel_dim: int,
        sums_op: bool,
    ) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            tab = _fused_tables(x, points, lb, rb, ks, kr)
            xc = x.to(tab.alpha.dtype)
            idx = _flat_index(xc, tab, channel_dim)
            out = torch.addcmul(tab.alpha.reshape(-1)[idx], tab.beta.reshape(-1)[idx], xc).to(x.dtype)
        ctx.save_for_backward(x, points, lb, rb, ks, kr)
        ctx.channel_dim = channel_dim
        ctx.sums_op = sums_op
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, points, lb, rb, ks, kr = ctx.saved_tensors
        need_p = ctx.needs_input_grad[1:6]
        grad_x = None
        grads: tuple[Tensor | None, ...] = (None,) * 5
        with torch.autocast(device_type=x.device.type, enabled=False):
            tab = _fused_tables(x, points, lb, rb, ks, kr)
            cdt = tab.alpha.dtype
            xc, g = x.to(cdt), grad_out.to(cdt)
            idx = _flat_index(xc, tab, ctx.channel_dim)
            if ctx.needs_input_grad[0]:
                grad_x = (tab.beta.reshape(-1)[idx] * g).to(x.dtype)
            if any(need_p):
                # per-segment sums of g and g * x, accumulated in float64
                shape = tab.alpha.shape
                if ctx.sums_op:
                    sums = segment_sums(x, grad_out, points, lb, rb, ks, kr, ctx.channel_dim)
                    s_a, s_b = sums[0], sums[1]
                else:
                    g64 = g.to(torch.float64)
                    zeros = torch.zeros(tab.alpha.numel(), dtype=torch.float64, device=x.device)
                    s_a = zeros.index_put((idx,), g64, accumulate=True)
                    s_b = zeros.index_put((idx,), g64 * xc.to(torch.float64), accumulate=True)
                g_alpha, g_beta = s_a.to(cdt).view(shape), s_b.to(cdt).view(shape)
                if _opaque_tables():
                    cast = [t.to(cdt) for t in (points, lb, rb, ks, kr)]
                    g_all = tuple(tables_backward_op(*cast, g_alpha, g_beta))
                else:
                    g_all = tables_backward(tab, g_alpha, g_beta)
                params = (points, lb, rb, ks, kr)
                grads = tuple(g.to(p.dtype) if need else None for g, p, need in zip(g_all, params, need_p))
        return (grad_x, *grads, None, None)


# ----------------------------------------------------------------------------------------------------
# Public function


def pwlu(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor | float,
    right_bound: Tensor | float,
    left_slope: Tensor | float,
    right_slope: Tensor | float,
    channel_dim: int = 1,
) -> Tensor:
    r"""Piecewise linear unit.

    .. math::

        \mathrm{PWLU}(x) = \begin{cases}
            (x - B_L)\,K_L + Y_P^0 & x < B_L \\
            (x - B_R)\,K_R + Y_P^N & x \ge B_R \\
            (x - B_{i})\,\frac{Y_P^{i+1} - Y_P^{i}}{d} + Y_P^{i} & B_i \le x < B_{i+1}
        \end{cases}
        \qquad d = \frac{B_R - B_L}{N},\; B_i = B_L + i\,d.

    Every argument but ``x`` and ``channel_dim`` is differentiable. Backward saves only ``x`` (and the
    small parameters) and recomputes the segment index; not twice differentiable. Eagerly on the CPU it
    runs a chunked kernel (split between ``torch.get_num_threads()`` threads for large inputs; repeated
    calls are bit-identical, and with :func:`torch.are_deterministic_algorithms_enabled` the parameter
    gradients use a deterministic reduction); under ``torch.compile`` and ``torch.export``, and on other
    devices, a composite of plain torch ops that the compiler fuses and the exporters trace. Both compute
    the same function.

    Numerics: the computation runs in float64 if ``x`` or ``points`` is float64 and in float32 otherwise
    (bfloat16 and float16 inputs are upcast inside, also under autocast); the output has ``x``'s dtype,
    shape and memory layout. Each segment is evaluated as ``alpha + beta * x``, so with bounds far from
    zero the rounding error scales with ``|beta * x|`` rather than with ``|y|``. NaN inputs give NaN
    outputs; an empty ``x`` gives an empty output.

    Checks: Python-number parameters must be finite, with ``left_bound < right_bound`` when both bounds
    are numbers. Tensor parameters on the CPU are checked too (finite, ``B_L < B_R`` on every row), except
    under ``torch.compile`` / ``torch.export``; on other devices they are not checked, since the check would
    synchronise the device (``B_L >= B_R`` there gives a meaningless result, not an error).

    Args:
        x: Tensor[...], any floating dtype and layout.
        points: Tensor[P, N + 1] (or Tensor[N + 1]): the knot values :math:`Y_P`; ``P = 1`` applies one
            function to every element (layer granularity), ``P = C`` one per channel.
        left_bound: Tensor[P] (or one value) :math:`B_L`.
        right_bound: Tensor[P] (or one value) :math:`B_R`.
        left_slope: Tensor[P] (or one value) :math:`K_L`.
        right_slope: Tensor[P] (or one value) :math:`K_R`.
        channel_dim: the dimension of ``x`` that indexes the rows of ``points`` when ``P > 1``
            (1 for NCHW images, -1 for (B, T, C) sequences); ignored when ``P = 1``.

    Returns:
        Tensor[...] of ``x``'s shape, dtype and layout.

    Raises:
        TypeError: a non-tensor or non-floating input, or a parameter that is neither a tensor nor a number.
        ValueError: ``points`` with fewer than 2 knots, parameter rows that do not match, a channel count
            of ``x`` that differs from ``P``, devices that differ, a non-finite parameter, or
            ``left_bound >= right_bound`` (as described under "Checks").
    """
    points, lb, rb, ks, kr, cd = _prepare(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        # on the CPU, backward reduces with the eager kernel's op: inductor's scatter into the P * S bins is
        # atomic across threads (see the benchmarks in the user guide); elsewhere with index_put
        sums_op = x.device.type == "cpu"
        out: Tensor = _FusedPWLU.apply(x, points, lb, rb, ks, kr, cd, sums_op)
        return out
    tab = eager_tables(x, points, lb, rb, ks, kr)
    _check_values(tab, points.detach(), lb.detach(), rb.detach(), ks.detach(), kr.detach())
    out = EagerPWLU.apply(x, points, lb, rb, ks, kr, cd, tab)
    return out
