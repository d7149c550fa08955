"""The final evaluation of the CoE recipe, once every stage is trained.

The early-exit numbers come from :func:`pycoe.coe.calibrate.calibrate_exit_threshold`: the threshold is chosen on
the validation split (carved out of the training data), and the test set is used once, for the numbers reported
at that threshold (:func:`calibrate_exit`). The same is done for the **cascade** (the same delegator's rough
head in front of a single network of the expert's architecture), the baseline that isolates what the experts add
to the exit. ``--fit-temperature`` repeats both with the rough head's temperature fitted on the validation split
(:func:`temperature_report`).

A dense pass (:func:`collect_outputs`: the delegator and *every* expert on every test image) gives what the
routed inference cannot: the oracle accuracy of the pool (a sample counts as correct when any expert gets it
right: an upper bound on any routing), each expert's accuracy on all images, and the class x expert routing
matrix.

:func:`final_report` runs these steps in order and writes the report (:mod:`examples.imagenet.report`).

Shapes: N test samples, K experts, C classes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from examples.imagenet.data import Splits, eval_batches
from examples.imagenet.models import Networks, baseline_key, fit_rough_temperature, make_cascade, scaled_rough_head
from examples.imagenet.report import at_threshold, summarise, write_outputs
from pycoe.coe.calibrate import DEFAULT_THRESHOLDS, ExitCalibration, calibrate_exit_threshold
from pycoe.coe.model import CoE
from pycoe.flops import count_flops
from pycoe.utils import eval_mode

__all__ = [
    "final_report",
    "calibrate_exit",
    "exit_report",
    "temperature_report",
    "collect_outputs",
    "single_networks",
]


def final_report(
    args, nets: Networks, data: Splits, results: dict, compute_seconds: float, world_size: int, device, log
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The exits of the CoE and of the cascade calibrated on the validation split and measured on the test set,
    the dense test pass, the single networks; then the table and figures, written to ``--out-dir`` and printed.

    Returns:
        ``(summary, calibration)``: everything reported, and the chosen exit thresholds (for the checkpoint).
        The CoE's ``exit_threshold`` is set to the chosen one.
    """
    coe = nets.coe()
    vb, tb = eval_batches(args, data.val), eval_batches(args, data.test)
    x = next(iter(tb))[0][: min(64, args.batch_size)].to(device)
    cascade = make_cascade(nets.models["delegator"], nets.models["baseline:expert"])
    calibrations, exits = {}, {}
    for name, model in (("coe", coe), ("cascade", cascade)):
        calibrations[name], exits[name] = calibrate_exit(args, model, name, vb, tb, device, log)
    temperature = temperature_report(args, coe, cascade, vb, tb, device, log) if args.fit_temperature else None
    coe.exit_threshold = exits["coe"]["threshold"]
    calibration = {
        "exit_threshold": exits["coe"]["threshold"],
        "cascade_exit_threshold": exits["cascade"]["threshold"],
        "rule": exits["coe"]["rule"],
        "num_val": len(data.val),
    }
    flops = {
        "delegator": count_flops(coe.delegator.eval(), x) / x.shape[0],
        "expert": count_flops(coe.experts[0].eval(), x) / x.shape[0],
    }
    cache = collect_outputs(coe, tb, device)
    baselines = single_networks(nets, results, x)
    summary = summarise(
        args,
        cache,
        calibrations,
        exits,
        baselines,
        flops,
        results,
        data.classes,
        compute_seconds,
        world_size,
        len(data.val),
        temperature,
    )
    out_dir = Path(args.out_dir)
    write_outputs(summary, out_dir, figures=not args.no_figures)
    print(summary["table_markdown"], flush=True)
    written = ["results.md", "results.json"] + ([] if args.no_figures else ["accuracy_vs_flops.png", "expert_load.png"])
    print("\nwritten: " + ", ".join(str(out_dir / f) for f in written), flush=True)
    return summary, calibration


def calibrate_exit(
    args, model: CoE, name: str, val_batches, test_batches, device, log: Callable[[str], None]
) -> tuple[dict[str, ExitCalibration], dict[str, Any]]:
    """The exit threshold of ``model`` chosen on the validation split, then its numbers on the test set.

    Returns:
        ``({"val": calibration, "test": calibration}, the exit's report)`` (see :func:`exit_report`).
    """
    budget = (
        {"max_accuracy_drop": args.max_accuracy_drop}
        if args.max_accuracy_drop is not None
        else {"max_flops": args.max_mflops * 1e6}
    )
    given = [] if args.exit_threshold is None else [args.exit_threshold]
    val = calibrate_exit_threshold(
        model, val_batches, **budget, thresholds=[*DEFAULT_THRESHOLDS, *given], device=device
    )
    threshold = val.threshold if args.exit_threshold is None else args.exit_threshold
    rule = val.rule if args.exit_threshold is None else "given by --exit-threshold"
    # the test set: one pass, every candidate of the validation's grid plus the figure's labelled thresholds
    test = calibrate_exit_threshold(
        model, test_batches, **budget, thresholds=[*DEFAULT_THRESHOLDS, *args.threshold_list, *given], device=device
    )
    report = exit_report(val, test, threshold, rule)
    v, t = report["val"], report["test"]
    log(
        f"[{name}] exit threshold {threshold} chosen on {val.num_samples} validation images ({rule}): "
        f"validation {100 * v['accuracy']:.2f}% at {v['flops_per_sample'] / 1e6:.2f} MFLOPs; "
        f"test {100 * t['accuracy']:.2f}% at {t['flops_per_sample'] / 1e6:.2f} MFLOPs "
        f"({100 * t['exit_rate']:.1f}% exit)"
    )
    return {"val": val, "test": test}, report


def exit_report(val: ExitCalibration, test: ExitCalibration, threshold: float | None, rule: str) -> dict[str, Any]:
    """The exit at ``threshold`` (chosen on ``val``) measured on validation and on test, plus a diagnostic.

    ``test_picked`` is the threshold the same rule would have chosen on the *test* set, with its test numbers:
    not used for anything, reported to show how optimistic a test-set choice is.
    """
    v, t = at_threshold(val, threshold), at_threshold(test, threshold)
    return {
        "threshold": threshold,
        "rule": rule,
        "val": {
            "accuracy": v["accuracy"],
            "exit_rate": v["exit_rate"],
            "flops_per_sample": v["flops_per_sample"],
            "no_exit_accuracy": val.no_exit_accuracy,
            "no_exit_flops_per_sample": val.no_exit_flops_per_sample,
        },
        "test": {
            "accuracy": t["accuracy"],
            "exit_rate": t["exit_rate"],
            "flops_per_sample": t["flops_per_sample"],
            "no_exit_accuracy": test.no_exit_accuracy,
            "no_exit_flops_per_sample": test.no_exit_flops_per_sample,
            "accuracy_drop": test.no_exit_accuracy - t["accuracy"],
            "flops_saving": 1.0 - t["flops_per_sample"] / test.no_exit_flops_per_sample,
        },
        "test_picked": {
            "threshold": test.threshold,
            "accuracy": test.accuracy,
            "exit_rate": test.exit_rate,
            "flops_per_sample": test.flops_per_sample,
        },
        "first_stage_flops": test.first_stage_flops,
    }


def temperature_report(
    args, coe: CoE, cascade: CoE, val_batches, test_batches, device, log: Callable[[str], None]
) -> dict[str, Any]:
    """``--fit-temperature``: T fitted on the validation split's rough logits, then both models calibrated and
    tested again with the rough head scaled by ``1 / T`` (the rough predictions do not change)."""
    delegator = coe.delegator
    with eval_mode(delegator):
        parts = [(delegator(x.to(device)).rough_logits.float().cpu(), y) for x, y in val_batches]
    logits, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    t, before, after = fit_rough_temperature(logits, labels)
    log(f"rough-head temperature fitted on the validation split: T={t:.3f} (cross-entropy {before:.4f} -> {after:.4f})")
    out: dict[str, Any] = {"T": t, "val_cross_entropy": [before, after]}
    with scaled_rough_head(delegator, t):
        for name, model in (("coe", coe), ("cascade", cascade)):
            _, out[name] = calibrate_exit(args, model, f"{name}, T={t:.3f}", val_batches, test_batches, device, log)
    return out


def collect_outputs(coe: CoE, batches, device) -> dict[str, torch.Tensor]:
    """Dense evaluation of the delegator and all experts, in eval mode (every submodule's mode restored).

    Returns:
        dict with ``labels`` LongTensor[N], ``choice`` LongTensor[N] (argmax expert, ties to the lowest index),
        ``rough_pred`` LongTensor[N] and ``expert_pred`` LongTensor[N, K].
    """
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("labels", "choice", "rough_pred", "expert_pred")}
    with eval_mode(coe):
        for x, y in batches:
            x = x.to(device)
            d = coe.delegate(x)
            choice, _, _ = coe.route(d, exit_threshold=None)
            logits = coe.experts(x)  # [K, B, C]
            parts["labels"].append(y.cpu())
            parts["choice"].append(choice.cpu())
            parts["rough_pred"].append(d.rough_logits.argmax(1).cpu())
            parts["expert_pred"].append(logits.argmax(2).T.cpu())  # [B, K]
    return {k: torch.cat(v) for k, v in parts.items()}


def single_networks(nets: Networks, results: dict[str, dict], x: torch.Tensor) -> list[dict[str, Any]]:
    """The baselines' rows, sorted by FLOPs: name, architecture, width, test accuracy, FLOPs per sample of ``x``,
    and whether it is the FLOPs-matched one (``--match-flops``)."""
    rows = []
    for key, model in nets.models.items():
        if not key.startswith("baseline:"):
            continue
        name = key.split(":", 1)[1]
        arch, width = nets.baseline_arch(name)
        rows.append(
            {
                "name": baseline_key(arch, width),
                "arch": arch,
                "width": width,
                "accuracy": results[key]["accuracy"],
                "flops": count_flops(model.eval(), x) / x.shape[0],
                "matched": name == nets.matched_key,
            }
        )
    rows.sort(key=lambda b: b["flops"])
    return rows
