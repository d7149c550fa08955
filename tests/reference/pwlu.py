"""The piecewise linear unit as the paper writes it: one masked term per interval, in plain autograd.

Slow (several full-size intermediates per interval) and obviously correct: the tests compare
:func:`pycoe.functional.pwlu` (both its eager kernel and its compiled/exported composite) against it.
Twice differentiable. It validates nothing: it is only called with arguments that ``pwlu`` accepted.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pwlu_reference"]


def _rows(value: Tensor | float, rows: int, like: Tensor) -> Tensor:
    """``value`` as a differentiable Tensor[rows] (one value broadcast, or one per row)."""
    t = value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=like.dtype)
    return t.reshape(-1).expand(rows) if t.numel() == 1 else t.reshape(rows)


def pwlu_reference(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor | float,
    right_bound: Tensor | float,
    left_slope: Tensor | float,
    right_slope: Tensor | float,
    channel_dim: int = 1,
) -> Tensor:
    """Same arguments and result as :func:`pycoe.functional.pwlu` (computed in float32 or float64 alike)."""
    if points.dim() == 1:
        points = points.unsqueeze(0)
    rows, k = points.shape
    n = k - 1
    cdt = torch.float64 if torch.float64 in (x.dtype, points.dtype) else torch.float32
    shape = [1] * x.dim()
    if rows > 1:
        shape[channel_dim] = rows

    def col(t: Tensor) -> Tensor:  # Tensor[P] -> broadcastable against x
        return t.to(cdt).reshape(shape)

    xc = x.to(cdt)
    y = points.to(cdt)
    left, right = col(_rows(left_bound, rows, y)), col(_rows(right_bound, rows, y))
    ks, kr = col(_rows(left_slope, rows, y)), col(_rows(right_slope, rows, y))
    d = (right - left) / n
    zero = torch.zeros_like(xc)
    out = torch.where(xc < left, (xc - left) * ks + col(y[:, 0]), zero)
    out = out + torch.where(xc >= right, (xc - right) * kr + col(y[:, n]), zero)
    for i in range(n):
        b_i = left + i * d
        b_next = left + (i + 1) * d if i < n - 1 else right
        k_i = (col(y[:, i + 1]) - col(y[:, i])) / d
        mask = (xc >= b_i) & (xc < b_next) & (xc >= left) & (xc < right)
        out = out + torch.where(mask, (xc - b_i) * k_i + col(y[:, i]), zero)
    return out.to(x.dtype)
