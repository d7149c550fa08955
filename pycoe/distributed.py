"""The few ``torch.distributed`` collectives pycoe's routing needs.

The global scope of :class:`pycoe.routing.weighting.BalancedTransportWeighter` (the WGM of CoE,
Zhang, Chen & Zhong, "Collaboration of Experts: Achieving 80% Top-1 Accuracy on ImageNet with 100M
FLOPs", ICML 2022) solves one balanced transportation problem over the batches of all ranks. Ranks may
hold batches of different sizes (the last batch of an epoch, uneven samplers), so the scores are
gathered with :func:`all_gather_variable`, which handles a first dimension that differs by rank.

Every function is a no-op (single-process behaviour) when ``torch.distributed`` is unavailable or its
default process group is not initialised, so library code can call them unconditionally.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from pycoe._validation import check_choice, check_tensor

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "all_gather_variable",
    "all_reduce",
    "broadcast",
    "VariableGather",
]


def is_distributed() -> bool:
    """Return ``True`` if ``torch.distributed`` is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when not distributed)."""
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (1 when not distributed)."""
    return dist.get_world_size(group) if is_distributed() else 1


class VariableGather(NamedTuple):
    """Result of :func:`all_gather_variable`.

    Attributes:
        tensor: Tensor[sum_r N_r, ...], the inputs of all ranks concatenated in rank order.
        local: ``slice`` of ``tensor``'s first dimension holding this rank's own rows.
        sizes: list of every rank's first-dimension size ``N_r``, in rank order.
    """

    tensor: torch.Tensor
    local: slice
    sizes: list[int]


def all_gather_variable(tensor: torch.Tensor, group: Any = None) -> VariableGather:
    """All-gather tensors whose first dimension differs by rank.

    The sizes are gathered first, every rank pads its tensor to the largest size, the padded tensors are
    all-gathered, and the padding is trimmed. The trailing dimensions, dtype and device must agree on all
    ranks. The result carries no autograd history (gather detached values only).

    Args:
        tensor: Tensor[N_r, ...] on this rank (``N_r`` may be 0).
        group: process group (default: the world).

    Returns:
        :class:`VariableGather` ``(tensor [sum_r N_r, ...], local slice, sizes)``. Without an initialised
        process group: ``(tensor, slice(0, N), [N])``.
    """
    check_tensor("tensor", tensor)
    if tensor.dim() == 0:
        raise ValueError("tensor must have at least 1 dimension (the one that varies by rank), got a scalar")
    n = int(tensor.shape[0])
    if not is_distributed():
        return VariableGather(tensor, slice(0, n), [n])
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    size = torch.tensor([n], dtype=torch.long, device=tensor.device)
    all_sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(all_sizes, size, group=group)
    sizes = [int(s.item()) for s in all_sizes]
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[:n] = tensor
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded.contiguous(), group=group)
    gathered = torch.cat([buf[:s] for buf, s in zip(buffers, sizes)], dim=0)
    start = sum(sizes[:rank])
    return VariableGather(gathered, slice(start, start + n), sizes)


def broadcast(tensor: torch.Tensor, src: int = 0, group: Any = None) -> torch.Tensor:
    """Broadcast ``tensor`` from rank ``src`` in place and return it (returned unchanged when not distributed).

    The shape and dtype must already agree on all ranks.
    """
    check_tensor("tensor", tensor)
    if is_distributed():
        dist.broadcast(tensor, src=src, group=group)
    return tensor


_REDUCE_OPS = ("sum", "min", "max")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """Reduce ``tensor`` over all ranks in place and return it (returned unchanged when not distributed).

    Args:
        tensor: the same shape, dtype and device on every rank.
        op: ``"sum"``, ``"min"`` or ``"max"``.
        group: process group (default: the world).
    """
    check_tensor("tensor", tensor)
    check_choice("op", op, _REDUCE_OPS)
    if is_distributed():
        reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(tensor, op=reduce_op, group=group)
    return tensor
