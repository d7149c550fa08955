"""The GPU suite's building blocks: every pycoe name it uses (imported here, and only here), its sizes, its small
models and its comparison helpers. See ``gpu_suite.py``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# ---- the pycoe API the suite uses (root names where there are any)
from pycoe import (
    PWLU,
    BalancedTransportWeighter,
    CoE,
    CoELoss,
    CondConv2d,
    Delegator,
    ExpertPool,
    LabelGenerator,
    balanced_assignment,
    calibrate_exit_threshold,
)
from pycoe.export import compile_inference, export
from pycoe.functional import pwlu
from pycoe.functional.mixture import MIXTURE_STRATEGIES
from pycoe.routing.transport import _solve_balanced_transport as solve_balanced_transport
from pycoe.routing.transport.transfer import to_device, to_host

__all__ = [
    "PWLU",
    "BalancedTransportWeighter",
    "CoE",
    "CoELoss",
    "CondConv2d",
    "Delegator",
    "ExpertPool",
    "LabelGenerator",
    "balanced_assignment",
    "calibrate_exit_threshold",
    "compile_inference",
    "export",
    "pwlu",
    "MIXTURE_STRATEGIES",
    "solve_balanced_transport",
    "to_device",
    "to_host",
    "Sizes",
    "FULL",
    "SMOKE",
    "Context",
    "Outcome",
    "conv_net",
    "training_setup",
    "eval_coe",
    "rel_err",
    "count_syncs",
    "peak_memory",
    "autocast",
]


# ---------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    """Every size the suite uses; :data:`FULL` on a GPU, :data:`SMOKE` for the CPU check that the suite runs."""

    # correctness: a small CNN CoE
    width: int = 16
    resolution: int = 32
    experts: int = 4
    classes: int = 10
    batch: int = 64
    # speed: the bench_conditional networks (mobilenet backbones, or TinyNet)
    tiny_backbones: bool = False
    cond_resolution: int = 224
    cond_classes: int = 1000
    cond_batches: tuple[int, ...] = (1, 8, 64, 256)
    # which of the four networks the exported and compiled modes measure (compilation is what costs)
    exported_models: tuple[str, ...] = ("static", "coe", "condconv", "basisnet")
    compiled_models: tuple[str, ...] = ("static", "coe", "condconv", "basisnet")
    routed_batches: tuple[int, ...] = (32, 256)
    step_resolution: int = 128
    step_batches: tuple[int, ...] = (64, 256)
    transfer_sizes: tuple[tuple[int, int], ...] = ((64, 4), (256, 4), (1024, 16), (4096, 16))
    pwlu_shapes: tuple[tuple[int, ...], ...] = ((32, 64, 28, 28), (64, 64, 56, 56))
    condconv_batch: int = 64
    condconv_shapes: int = 7  # the first n shapes of bench_condconv's main grid
    condconv_hw: int = 14  # largest feature map of the CondConv checks
    repeats: int = 10
    min_time: float = 0.01  # seconds per CondConv timing


FULL = Sizes()
SMOKE = Sizes(
    width=4,
    experts=2,
    resolution=12,
    batch=16,
    tiny_backbones=True,
    cond_resolution=32,
    cond_classes=10,
    cond_batches=(2, 4),
    exported_models=("coe",),
    compiled_models=("static",),
    routed_batches=(4, 8),
    step_resolution=16,
    step_batches=(8,),
    transfer_sizes=((16, 4),),
    pwlu_shapes=((2, 4, 6, 6),),
    condconv_batch=4,
    condconv_shapes=2,
    condconv_hw=4,
    repeats=2,
    min_time=0.0,
)


@dataclass
class Context:
    """What every part receives."""

    device: torch.device
    sizes: Sizes
    backend: str  # torch.compile's backend for the compiled variants
    deadline: float  # time.perf_counter() value after which optional work is skipped
    notes: list[str] = field(default_factory=list)  # what the current part skipped, and why
    cache: dict[str, Any] = field(default_factory=dict)  # what several parts use (built once)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def afford(self, seconds: float, what: str) -> bool:
        """Whether ``seconds`` of optional work fit before the deadline; if not, note what is skipped."""
        if self.time_left() >= seconds:
            return True
        self.notes.append(f"skipped for the time budget: {what}")
        return False


@dataclass
class Outcome:
    """What a part returns: whether its checks passed, a one-line summary, Markdown and data for the report."""

    ok: bool
    summary: str
    markdown: str = ""
    data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- models
def conv_net(classes: int, width: int) -> nn.Sequential:
    """A small CNN with BatchNorm (so that export folds it and training updates running statistics)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def training_setup(ctx: Context, seed: int = 0) -> tuple[CoE, CoELoss]:
    """A small CoE in training mode on the device, with the WGM (exact solver) and the LGM."""
    s = ctx.sizes
    torch.manual_seed(seed)
    delegator = Delegator(
        conv_net(s.classes, s.width),
        num_experts=s.experts,
        num_classes=s.classes,
        classifier="8",
        zero_init_selection=False,
    )
    model = CoE(delegator, ExpertPool.from_template(conv_net(s.classes, s.width), s.experts, init="reinit"))
    criterion = CoELoss(BalancedTransportWeighter(s.experts), LabelGenerator(), balance_weight=0.1)
    return model.to(ctx.device).train(), criterion


def eval_coe(ctx: Context, seed: int = 0) -> CoE:
    """A small eval-mode CoE whose samples spread over early exit and every expert: heads on standardised features,
    random BatchNorm statistics, the exit threshold halfway between two confidences near the median."""
    model, _ = training_setup(ctx, seed)
    s = ctx.sizes
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        model.eval()
        x = torch.randn(256, 3, s.resolution, s.resolution, device=ctx.device)
        features = model.delegator.features(x)
        mean, std = features.mean(0), features.std(0) + 1e-6
        for head in (model.delegator.selection_head, model.delegator.rough_head):
            weight = torch.randn(head.out_features, features.shape[1], device=ctx.device) / std * 2.0
            head.weight.copy_(weight)
            head.bias.copy_(-(weight @ mean))
        conf = model(x, exit_threshold=None).confidence.sort().values
        middle = conf.numel() // 2
        model.exit_threshold = float((conf[middle - 1] + conf[middle]) / 2)
    return model


# ---------------------------------------------------------------------------------------------- helpers
def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``|got - ref| / |ref|`` (Frobenius norms, float64; 0 for two empty or equal tensors)."""
    if got.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} and {tuple(ref.shape)}")
    a, b = got.detach().double().cpu(), ref.detach().double().cpu()
    diff = float((a - b).norm())
    return diff / max(float(b.norm()), 1e-30) if diff else 0.0


def count_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Synchronisations of the host with the CUDA device during ``fn()`` (torch's sync debug mode); ``None`` on
    another device (nothing to count)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def peak_memory(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak GPU memory (MiB) allocated during ``fn()`` above what was allocated before; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


@contextlib.contextmanager
def autocast(ctx: Context, enabled: bool) -> Iterator[None]:
    """bfloat16 autocast on the suite's device, or nothing."""
    with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=enabled):
        yield


def copy_to(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A deep copy of ``model`` on ``device``."""
    return copy.deepcopy(model).to(device)


def geometric_mean(values: list[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan
