"""Brute-force oracle of :func:`pycoe.twostage.calibrate.calibrate_exit_threshold`.

One full pass of the model's own eval forward per candidate threshold (``forward_eval(..., exit_threshold=t)``, the
rule as the model applies it at inference), accuracy counted on its outputs, FLOPs counted by
:func:`pycoe.flops.count_flops` on the very calls that ran (the operations actually dispatched, per batch), then
the budget rules applied by their definitions.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pycoe.flops import count_flops


def sweep_by_forward(model, batches, thresholds) -> list[dict[str, Any]]:
    """``[{"threshold", "correct", "exited", "flops_per_sample", "num_samples"}]``, one full pass per threshold."""
    model.eval()
    out = []
    for t in thresholds:
        correct = exited = flops = n = 0
        for x, y in batches:
            with torch.no_grad():
                res = model.forward_eval(x, exit_threshold=t)
            flops += count_flops(lambda inp, t=t: model.forward_eval(inp, exit_threshold=t), x)
            correct += int((res.output.argmax(1) == y).sum())
            exited += int(res.exited.sum())
            n += len(y)
        out.append(
            {"threshold": t, "correct": correct, "exited": exited, "flops_per_sample": flops / n, "num_samples": n}
        )
    return out


def choose(curve, *, max_accuracy_drop=None, max_flops=None) -> dict[str, Any]:
    """The budget rules by their definitions; ties: fewer FLOPs, then the larger threshold (None largest)."""
    no_exit = next(p for p in curve if p["threshold"] is None)
    n = no_exit["num_samples"]

    def larger(p):
        return math.inf if p["threshold"] is None else p["threshold"]

    if max_accuracy_drop is not None:
        ok = [p for p in curve if p["correct"] / n >= no_exit["correct"] / n - max_accuracy_drop - 1e-12]
        best_flops = min(p["flops_per_sample"] for p in ok)
        tied = [p for p in ok if math.isclose(p["flops_per_sample"], best_flops, rel_tol=1e-9)]
        best_correct = max(p["correct"] for p in tied)
        return max((p for p in tied if p["correct"] == best_correct), key=larger)
    ok = [p for p in curve if p["flops_per_sample"] <= max_flops * (1 + 1e-9)]
    best_correct = max(p["correct"] for p in ok)
    tied = [p for p in ok if p["correct"] == best_correct]
    best_flops = min(p["flops_per_sample"] for p in tied)
    return max((p for p in tied if math.isclose(p["flops_per_sample"], best_flops, rel_tol=1e-9)), key=larger)
