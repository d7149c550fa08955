"""Moving the exact solver's data between an accelerator and the host.

Internal module of :mod:`pycoe.routing.transport` (its public API). The exact method runs in NumPy on the CPU, so
scores on a GPU make one round trip per solve: the scores ``[N, K]`` to the host, the assignment ``[N]`` (and the
prices and capacities ``[K]``) back. The copy to the host is the solve's one synchronisation with the device (the
solver needs the values): everything else of a solve, the value checks included, runs on the host copy.

The copies back are issued with ``non_blocking=True``: a blocking ``.to(device)`` makes torch wait for the stream
after each copy (one synchronisation per tensor), a non-blocking one does not. From ordinary (pageable) host
memory CUDA has read the host buffer when the call returns (it stages the data, and its driver may wait for the
stream to do so), so the buffer may be freed at once. ``pinned=True`` stages both directions in page-locked
(pinned) host memory from torch's caching host allocator instead: no staging copy, no wait, the DMA engine's
full speed. For the solver's sizes (a few KB per batch) the difference is microseconds; the GPU suite
(``benchmarks/gpu_suite.py``) measures both, and the solver uses ``pinned=False`` until a measurement says
otherwise.
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
    """The CPU tensor ``h`` on ``device`` (``h`` itself for the CPU), in stream order, without a synchronisation
    of torch's (see the module docstring).

    Args:
        h: a CPU tensor (the solver's result).
        device: where the scores came from.
        pinned: copy from a pinned copy of ``h`` (CUDA only; the caching host allocator keeps the pinned block
            until the copy has run).
    """
    if device.type == "cpu":
        return h
    if device.type != "cuda":
        return h.to(device)
    return (h.pin_memory() if pinned else h).to(device, non_blocking=True)
