"""A CoE against conditional-computation networks at about matched inference FLOPs: the paper's speed claim.

Collaboration of Experts (Zhang, Chen and Zhong, ICML 2022, arXiv:2107.03815) claims to be "3-6x faster than
existing conditional computation approaches": every expert is a static network that the samples routed to it
are batched into, where a CondConv or BasisNet network mixes kernels per sample. This script measures, side by
side in one run, on torchvision mobile backbones at a small resolution (to fit a CPU):

* ``static``: a mobilenet_v2;
* ``coe``: a mobilenet_v3_small delegator + K = 4 mobilenet_v2 experts, routed (no early exit: every sample pays
  for the delegator and one expert); the untrained delegator's routing is spread over the experts on purpose;
* ``condconv``: the static network converted with ``convert_conv2d_to_condconv`` (4 kernels per convolution,
  every convolution but the stem, default strategy ``"auto"``);
* ``basisnet``: a mobilenet_v3_small lightweight model + a mobilenet_v2 specialist with 4 bases (every conv).

For each: forward FLOPs per sample (``count_flops`` at batch 1), parameters, and time per sample at each batch
size, eager (``torch.inference_mode``), ``torch.compile``d (inductor; the CoE through
``pycoe.export.compile_inference``) and, for the CoE and the static network, exported (``pycoe.export.export``)
and in onnxruntime (``pycoe.export.to_onnx``, CPUExecutionProvider, as many intra-op threads as torch). Then the
ratios of the times: CondConv / CoE, BasisNet / CoE (> 1: the CoE is faster) and CoE / static (the CoE's
overhead over a static network with fewer FLOPs). Every time is the median of repeats; the variants are
interleaved within each repeat (the machine is shared and noisy); the thread count and load are printed.

Usage::

    python benchmarks/bench_conditional.py                  # 128x128, batches 1, 8, 64
    python benchmarks/bench_conditional.py --quick          # 64x64, batches 1 and 8, no compile, fewer repeats
    python benchmarks/bench_conditional.py --device cuda    # the same on a GPU (no onnxruntime there)
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from collections.abc import Callable

import torch
import torchvision
from _common import interleaved_medians, load_average, markdown_table, ratio
from torch import nn

from pycoe import CoE, Delegator, ExpertPool
from pycoe.basisnet import BasisNet, BasisSpecialist
from pycoe.export import compile_inference, export, to_onnx
from pycoe.flops import count_flops
from pycoe.layers import convert_conv2d_to_condconv

K = 4


def spread_routing(delegator: Delegator, calib: torch.Tensor) -> None:
    """An untrained delegator sends every sample to one expert: calibrate its BatchNorm statistics on the data
    and scale its selection head so that the routed path really splits the batch (as a trained one does)."""
    for m in delegator.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        delegator.train()(calib)
        delegator.selection_head.weight.mul_(200.0)
    delegator.eval()


class TinyNet(nn.Module):
    """A few-layer stand-in for a torchvision mobile network (``features``, pooling, ``classifier``), for the
    GPU suite's CPU smoke run: the same code paths as the real backbones at a fraction of the cost."""

    def __init__(self, num_classes: int = 1000, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(),
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(),
            nn.Conv2d(width, 2 * width, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU6(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build(classes: int, resolution: int, device: str | torch.device, tiny: bool = False) -> dict[str, nn.Module]:
    """The four networks, in eval mode on ``device``: mobilenet_v2 / mobilenet_v3_small backbones, or
    :class:`TinyNet` for both (``tiny``)."""
    torch.manual_seed(0)
    calib = torch.randn(64, 3, resolution, resolution)
    big: Callable[..., nn.Module] = TinyNet if tiny else torchvision.models.mobilenet_v2
    small: Callable[..., nn.Module] = TinyNet if tiny else torchvision.models.mobilenet_v3_small
    static = big(num_classes=classes)
    delegator = Delegator(small(), num_experts=K, num_classes=classes)
    delegator.reset_selection_head()
    nn.init.normal_(delegator.selection_head.weight, std=0.01)
    spread_routing(delegator, calib)
    coe = CoE(delegator, ExpertPool.from_template(static, K, init="reinit"))
    condconv = copy.deepcopy(static)
    convert_conv2d_to_condconv(condconv, K)
    basisnet = BasisNet(
        small(),
        BasisSpecialist(copy.deepcopy(static), K, init_noise=0.1),
        num_bases=K,
        num_classes=classes,
    )
    models = {"static": static, "coe": coe, "condconv": condconv, "basisnet": basisnet}
    return {name: m.to(device).eval() for name, m in models.items()}


def flops_rows(models: dict[str, nn.Module], resolution: int, device: str | torch.device) -> list[list]:
    """[name, MFLOPs per sample, parameters (M)] of each network."""
    rows = []
    for name, model in models.items():
        flops = count_flops(model, torch.randn(1, 3, resolution, resolution, device=device))
        params = sum(p.numel() for p in model.parameters())
        rows.append([name, flops / 1e6, params / 1e6])
    return rows


def onnx_variant(model: nn.Module, example: torch.Tensor, path: str) -> Callable[[torch.Tensor], object]:
    """``model`` exported to ONNX at ``path``, run by onnxruntime on the CPU (as many intra-op threads as torch)."""
    import onnxruntime

    to_onnx(model, example, path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run_onnx(x: torch.Tensor) -> object:
        return session.run(None, {"input_0": x.numpy()})

    return run_onnx


MODES = ["eager", "compiled", "compiled + CUDA graphs", "exported", "onnxruntime"]


def time_variants(
    variants: dict[tuple[str, str], Callable[[torch.Tensor], object]],
    batches: list[int],
    resolution: int,
    repeats: int,
    device: str | torch.device,
) -> dict[tuple[str, str, int], float]:
    """Seconds per sample of every (model, mode) variant at each batch size: medians of ``repeats`` interleaved
    repeats, under ``torch.inference_mode``, after two untimed calls (warm-up and compilation)."""
    results: dict[tuple[str, str, int], float] = {}
    for batch in batches:
        x = torch.randn(batch, 3, resolution, resolution, device=device)
        calls = {key: (lambda fn=fn: fn(x)) for key, fn in variants.items()}
        with torch.inference_mode():
            med = interleaved_medians(calls, repeats, device=device, warmup=2)
        for key, t in med.items():
            results[(*key, batch)] = t / batch
        print(f"  batch {batch}: done (load {load_average()})", flush=True)
    return results


RATIOS = [
    ("CondConv / CoE", "condconv", "coe"),
    ("BasisNet / CoE", "basisnet", "coe"),
    ("CoE / static", "coe", "static"),
]


def time_and_ratio_tables(results: dict[tuple[str, str, int], float], models: list[str], batches: list[int]) -> str:
    """The Markdown tables of the times per sample (ms) and of their ratios."""
    modes = [m for m in MODES if any(key[1] == m for key in results)]
    headers = [f"batch {b}" for b in batches]
    rows = [
        [name, mode] + [results.get((name, mode, b), float("nan")) * 1e3 for b in batches]
        for mode in modes
        for name in models
        if (name, mode, batches[0]) in results
    ]
    ratio_rows = [
        [label, mode] + [ratio(results.get((a, mode, n)), results.get((b, mode, n))) for n in batches]
        for mode in modes
        for label, a, b in RATIOS
        if (a, mode, batches[0]) in results and (b, mode, batches[0]) in results
    ]
    return "\n".join(
        [
            markdown_table(["model", "mode", *headers], rows),
            "",
            "Ratios of the times per sample, measured side by side (> 1 for CondConv / CoE: the CoE is faster)",
            "",
            markdown_table(["ratio", "mode", *headers], ratio_rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64x64, batches 1 and 8, no compile, 3 repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--no-onnx", action="store_true", help="skip the export and onnxruntime variants")
    args = parser.parse_args()
    if args.quick:
        args.resolution, args.batches, args.repeats, args.no_compile = 64, [1, 8], 3, True
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # untrained networks must not time denormal arithmetic
    device, res = args.device, args.resolution
    use_onnx = not args.no_onnx and device == "cpu"
    print(
        f"torch {torch.__version__}, device {device}, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"resolution {res}x{res}, {args.classes} classes, repeats = {args.repeats}, "
        f"load average (1, 5, 15 min) at start = {load_average()}",
        flush=True,
    )
    models = build(args.classes, res, device)
    example = torch.randn(8, 3, res, res, device=device)

    # ---- FLOPs, parameters, routing
    print()
    rows = flops_rows(models, res, device)
    static_flops = rows[0][1]
    print(markdown_table(["model", "MFLOPs / sample", "params (M)"], rows))
    print()
    print("FLOPs relative to the static network: " + ", ".join(f"{r[0]} {r[1] / static_flops:.2f}x" for r in rows))
    with torch.inference_mode():
        index = models["coe"](torch.randn(64, 3, res, res, device=device)).expert_index
    print(f"CoE routing of a batch of 64: {torch.bincount(index, minlength=K).tolist()} samples per expert")

    # ---- the variants
    variants: dict[tuple[str, str], Callable[[torch.Tensor], object]] = {}
    for name, model in models.items():
        variants[(name, "eager")] = model
    if not args.no_compile:
        print("compiling (inductor; slow on a CPU) ...", flush=True)
        for name, model in models.items():
            if name == "coe":
                variants[(name, "compiled")] = compile_inference(model, example)
            else:  # static shapes: CondConv's "auto" strategy picks per batch size
                variants[(name, "compiled")] = torch.compile(model, dynamic=False)
    if use_onnx:
        tmp = tempfile.mkdtemp(prefix="pycoe-bench-")
        for name in ("static", "coe"):
            variants[(name, "exported")] = export(models[name], example).module()
            variants[(name, "onnxruntime")] = onnx_variant(models[name], example, os.path.join(tmp, f"{name}.onnx"))

    # ---- timing
    results = time_variants(variants, args.batches, res, args.repeats, device)
    print()
    print(f"Time per sample (ms), median of {args.repeats}")
    print()
    print(time_and_ratio_tables(results, list(models), args.batches))
    print()
    print(f"load average (1, 5, 15 min) at the end = {load_average()}")


if __name__ == "__main__":
    main()
