"""What the benchmark scripts share: timing, ratios, tables and the description of the machine.

* timing: :func:`timed` (one call, the device synchronised before and after), :func:`interleaved_medians` (the
  median of repeats of several variants, interleaved within each repeat so that they all see the same load) and
  :func:`median_time` (one variant);
* :func:`ratio` of two times (NaN when either is missing);
* :func:`markdown_table` and :func:`write_report` (a Markdown file and a JSON file of the same results);
* :func:`machine` (torch, threads, CPU count, load average and, on CUDA, the GPU, CUDA and cuDNN versions and
  the TF32 settings in force) and :func:`describe` (the same on one line).

The scripts import this module as a sibling (``from _common import ...``): run them as
``python benchmarks/<script>.py``, which puts ``benchmarks/`` on the import path.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "load_average",
    "machine",
    "describe",
    "synchronize",
    "timed",
    "interleaved_medians",
    "median_time",
    "ratio",
    "fmt",
    "markdown_table",
    "to_json",
    "write_report",
]


# ---------------------------------------------------------------------------------------------- the machine
def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``"0.52, 0.61, 0.70"`` (``"unknown"`` where the OS has none)."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What a benchmark's figures depend on: versions, threads, load and, on a CUDA device, the GPU."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "device": str(device),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            gpu=torch.cuda.get_device_name(index),
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(index))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            # the user's settings, left as torch sets them by default (pycoe changes none of them)
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            float32_matmul_precision=torch.get_float32_matmul_precision(),
        )
    return info


def describe(info: Mapping[str, Any]) -> str:
    """:func:`machine`'s dict on one line."""
    parts = [f"torch {info['torch']}", f"torch.get_num_threads() = {info['torch_threads']}"]
    parts.append(f"{info['cpu_count']} CPUs, load average {info['load_average']}")
    if "gpu" in info:
        parts.append(
            f"{info['gpu']} (sm {info['gpu_capability']}, {info['gpu_memory_gib']} GiB), CUDA {info['cuda']}, "
            f"cuDNN {info['cudnn']}, TF32 matmul {info['matmul_allow_tf32']} / cuDNN {info['cudnn_allow_tf32']}, "
            f"cudnn.benchmark {info['cudnn_benchmark']}"
        )
    else:
        parts.append(f"device {info['device']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- timing
def synchronize(device: str | torch.device | None) -> None:
    """Wait for the device's queued work (CUDA); nothing to do on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], object], device: str | torch.device | None = None, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Seconds of one call of ``fn``, the device synchronised before and after (so queued work is counted)."""
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def interleaved_medians(
    variants: Mapping[str, Callable[[], object]],
    repeats: int,
    *,
    device: str | torch.device | None = None,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each variant: every repeat runs every variant once, in turn.

    Interleaving makes the variants share the machine's load (these machines are shared and noisy), so that
    their ratios are meaningful even where the absolute times are not. ``warmup`` untimed calls of each variant
    come first (compilation, caches, the allocator).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device, clock))
    return {name: statistics.median(t) for name, t in times.items()}


def median_time(
    fn: Callable[[], object],
    repeats: int,
    *,
    device: str | torch.device | None = None,
    warmup: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median seconds per call of one function (see :func:`interleaved_medians`)."""
    return interleaved_medians({"fn": fn}, repeats, device=device, warmup=warmup, clock=clock)["fn"]


def ratio(a: float | None, b: float | None) -> float:
    """``a / b``, or NaN when either is missing (``None`` or NaN) or ``b`` is 0."""
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


# ---------------------------------------------------------------------------------------------- tables
def fmt(value: Any) -> str:
    """A table cell: floats with 3 significant digits (whole numbers from 100 on), ``-`` for ``None``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cell: Callable[[Any], str] = fmt) -> str:
    """A Markdown table: ``headers``, then one line per row (cells formatted by ``cell``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def to_json(value: Any) -> Any:
    """``value`` with what JSON cannot hold made plain: NaN and infinities become ``None``, tuples lists, torch
    dtypes, devices and other objects their ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return to_json(value.item())
    return str(value)


def write_report(out_dir: str | Path, stem: str, markdown: str, data: Any) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` into ``out_dir`` (created if needed); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    js.write_text(json.dumps(to_json(data), indent=1) + "\n")
    return md, js
