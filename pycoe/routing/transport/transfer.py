"""Moving the exact solver's data between an accelerator and the host.

Internal module of :mod:`pycoe.routing.transport` (its public API). The exact method runs in NumPy on the CPU, so
scores on a GPU make one round trip per solve: the scores ``[N, K]`` to the host, the assignment ``[N]`` (and the
prices and capacities ``[K]``) back. The copy to the host is the solve's one synchronisation with the device (the
solver needs the values): everything else of a solve, the value checks included, runs on the host copy.

``pinned=True`` stages both copies in page-locked (pinned) host memory, taken from torch's caching host allocator:
the copy back to the device is then asynchronous (the host goes on at once), and the copy to the host runs at
the DMA engine's full speed. For the solver's sizes (a few KB per batch) the difference is microseconds either
way; the GPU suite (``benchmarks/gpu_suite.py``) measures both, and the solver uses ``pinned=False`` until a
measurement says otherwise.
"""

from __future__ import annotations

import torch

__all__: list[str] = []  # internal: see pycoe.routing.transport


def to_host(t: torch.Tensor, *, pinned: bool = False) -> torch.Tensor:
    """``t`` on the CPU (``t`` itself if it is there), the device synchronised: the copy is complete on return.

    Args:
        t: a tensor on any device.
        pinned: stage a CUDA tensor in pinned host memory (ignored for other devices).
    """
    if t.device.type == "cpu":
        return t
    if pinned and t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()  # the solver reads the values next
        return host
    return t.cpu()


def to_device(h: torch.Tensor, device: torch.device, *, pinned: bool = False) -> torch.Tensor:
    """The CPU tensor ``h`` on ``device`` (``h`` itself for the CPU), in stream order on a CUDA device.

    Args:
        h: a CPU tensor (the solver's result).
        device: where the scores came from.
        pinned: copy a pinned copy of ``h`` without blocking the host (CUDA only; the caching host allocator keeps
            the pinned block until the copy has run).
    """
    if device.type == "cpu":
        return h
    if pinned and device.type == "cuda":
        return h.pin_memory().to(device, non_blocking=True)
    return h.to(device)
