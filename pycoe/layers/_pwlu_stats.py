"""Input statistics of a collecting PWLU and the realignment they lead to (private to :mod:`pycoe.layers.pwlu`).

A collecting :class:`~pycoe.layers.pwlu.PWLU` keeps a running mean and (biased) variance of its input, per
channel for channel granularity: ``running = momentum * running + (1 - momentum) * batch``, the first batch
initialising them. A batch whose statistics are not finite (an input holding NaN or an infinity, or finite
values whose variance overflows) is skipped: it changes neither the statistics nor the batch count, without a
device synchronisation. Realignment puts the bounds at ``mean -/+ bound_std * std``; under
``torch.distributed`` the ranks' statistics are pooled first (:func:`pool_over_ranks`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pycoe.distributed import all_reduce, get_world_size

__all__ = ["batch_moments", "update_running", "pool_over_ranks", "realigned_bounds", "STD_FLOOR"]

STD_FLOOR = 1e-4
"""The standard deviation used at realignment is at least ``STD_FLOOR * (1 + |mean|)``, so that a constant
input still gives a usable grid."""


def batch_moments(x: Tensor, channel_dim: int | None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance Tensor[P] of ``x`` (non-empty): over every element, or per channel."""
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if channel_dim is None:
        var, mean = torch.var_mean(x.reshape(-1), correction=0)
        return mean.reshape(1), var.reshape(1)
    cd = channel_dim % x.dim()
    dims = [d for d in range(x.dim()) if d != cd]
    if not dims:  # x holds only the channel dimension: one sample per channel
        return x, torch.zeros_like(x)
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var


@torch.no_grad()
def update_running(
    running_mean: Tensor, running_var: Tensor, count: Tensor, mean: Tensor, var: Tensor, momentum: float
) -> None:
    """Fold one batch's ``mean``/``var`` into the running statistics and ``count``, in place.

    The first counted batch initialises them; a batch with a non-finite statistic is skipped (no sync).
    """
    mean = mean.to(running_mean.dtype)
    var = var.to(running_var.dtype)
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    first = count == 0
    new_mean = torch.where(first, mean, momentum * running_mean + (1 - momentum) * mean)
    new_var = torch.where(first, var, momentum * running_var + (1 - momentum) * var)
    running_mean.copy_(torch.where(finite, new_mean, running_mean))
    running_var.copy_(torch.where(finite, new_var, running_var))
    count.add_(finite.to(count.dtype))


@torch.no_grad()
def pool_over_ranks(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """The mean and variance of the pooled ranks (every rank weighted equally), in float64.

    A collective (every rank must call it); without a process group it returns the inputs in float64.
    """
    mean = mean.double()
    packed = torch.stack([mean, var.double() + mean * mean])
    packed = all_reduce(packed) / get_world_size()
    pooled_mean = packed[0]
    return pooled_mean, (packed[1] - pooled_mean * pooled_mean).clamp_min(0)


@torch.no_grad()
def realigned_bounds(mean: Tensor, var: Tensor, bound_std: float) -> tuple[Tensor, Tensor]:
    """``(B_L, B_R) = mean -/+ bound_std * std`` in float64, with the std floored (see :data:`STD_FLOOR`)."""
    mean = mean.double()
    std = var.double().clamp_min(0).sqrt()
    std = torch.maximum(std, STD_FLOOR * (1 + mean.abs()))
    return mean - bound_std * std, mean + bound_std * std
