"""Process group and random state of the CoE example: DDP setup, barriers, seeds and RNG checkpoints.

The example runs alone or under ``torchrun`` (gloo on CPU, NCCL on GPU). Every epoch starts from a seed derived
from ``(seed, phase, epoch, rank)``, and the checkpoints hold the torch, numpy and python RNG states, so that an
interrupted run continued with ``--resume`` ends with exactly the parameters of an uninterrupted one.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pycoe.distributed import broadcast

__all__ = [
    "Dist",
    "setup_distributed",
    "barrier",
    "broadcast_module",
    "rng_state",
    "set_rng_state",
    "seed_everything",
    "derived_seed",
]


@dataclass
class Dist:
    """This process's place in the process group (world size 1, rank 0 when not distributed)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: torch.device) -> Dist:
    """Join the existing process group, start one when launched by ``torchrun``, or run alone."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        return Dist(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), True)
    return Dist()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of rank ``src`` to the other ranks (a no-op when not distributed)."""
    for t in list(module.parameters()) + list(module.buffers()):
        broadcast(t.data, src=src)


def rng_state() -> dict:
    """The torch, numpy, python (and CUDA) RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    seed = seed % (2**31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A seed for one part of the run (e.g. ``(seed, phase, epoch, rank)``), the same in every process."""
    return hash(tuple(int(p) for p in parts)) % (2**31)
