"""The genre classifier's numbers: one seed's test results, their mean and standard deviation over seeds, the paired
differences by seed, and the Markdown table.

Every accuracy is a fraction of the test verses; every FLOPs figure the average over the test verses of the forward
FLOPs of running each verse alone (see :func:`examples.text_classification.models.flops_curve`).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

__all__ = ["MODELS", "DIFFERENCES", "seed_numbers", "summarise", "markdown", "one_line"]

#: The rows of the table: key, description.
MODELS = (
    ("single", "single expert (the expert's architecture, universal + joint epochs)"),
    ("matched", "single model, FLOPs-matched to the CoE without exit"),
    ("delegator", "delegator alone (rough head; every verse exits)"),
    ("coe_no_exit", "CoE, no exit"),
    ("coe_exit", "CoE, exit at its validation-chosen threshold"),
    ("cascade_exit", "cascade (rough head, then the single expert), exit at its validation-chosen threshold"),
    ("cascade_at_coe_threshold", "cascade at the CoE's threshold (the same verses exit)"),
    ("oracle", "oracle of the expert pool (some expert is right)"),
)

#: The paired differences in test accuracy reported per seed: key, (minuend, subtrahend), description.
DIFFERENCES = (
    ("coe_minus_matched", ("coe_no_exit", "matched"), "CoE (no exit) - FLOPs-matched single model"),
    ("coe_minus_single", ("coe_no_exit", "single"), "CoE (no exit) - single expert"),
    ("coe_exit_minus_cascade", ("coe_exit", "cascade_exit"), "CoE (exit) - cascade (exit), own thresholds"),
    (
        "coe_exit_minus_cascade_same_exits",
        ("coe_exit", "cascade_at_coe_threshold"),
        "CoE (exit) - cascade at the CoE's threshold",
    ),
)


def _accuracy(prediction: torch.Tensor, labels: torch.Tensor) -> float:
    return float((prediction == labels).double().mean())


def seed_numbers(
    outputs: dict[str, Any],
    labels: torch.Tensor,
    lengths: torch.Tensor,
    curves: dict[str, Any],
    calibration: dict[str, Any],
    rule_on_test: dict[str, Any],
    num_experts: int,
) -> dict[str, Any]:
    """One seed's test numbers from the models' outputs on the test split (all in its evaluation order).

    Args:
        outputs: ``single``/``matched`` logits ``[N, C]``; ``dense`` (:func:`train.coe_dense`); ``coe_exit``,
            ``coe_no_exit``, ``cascade_exit``, ``cascade_at_coe_threshold`` (:func:`train.deployed`).
        labels: LongTensor[N]; lengths: tokens per verse, LongTensor[N].
        curves: the FLOPs curves ``delegator``, ``rough_stage``, ``expert``, ``single``, ``matched``.
        calibration: the validation calibrations ``coe`` and ``cascade``; rule_on_test: the thresholds the same
            rule picks on the test split (reported for comparison).
    """
    f = {name: curve(lengths) for name, curve in curves.items()}  # Tensor[N] of FLOPs per verse
    models: dict[str, dict[str, Any]] = {}
    for name in ("single", "matched"):
        models[name] = {"accuracy": _accuracy(outputs[name].argmax(1), labels), "flops": float(f[name].mean())}
    dense = outputs["dense"]
    models["delegator"] = {
        "accuracy": _accuracy(dense["rough"].argmax(1), labels),
        "flops": float(f["rough_stage"].mean()),
        "exit_rate": 1.0,
    }
    for name, first, second, cal in (
        ("coe_no_exit", "delegator", "expert", None),
        ("coe_exit", "delegator", "expert", calibration["coe"]),
        ("cascade_exit", "rough_stage", "single", calibration["cascade"]),
        ("cascade_at_coe_threshold", "rough_stage", "single", calibration["coe"]),
    ):
        out = outputs[name]
        stay = (~out["exited"]).double()
        models[name] = {
            "accuracy": _accuracy(out["prediction"], labels),
            "flops": float((f[first] + stay * f[second]).mean()),
            "exit_rate": float(out["exited"].double().mean()),
            "threshold": None if cal is None else cal.threshold,
        }
    right = dense["experts"].argmax(2) == labels  # [K, N]
    models["oracle"] = {"accuracy": float(right.any(0).double().mean())}
    routed = dense["selection"].argmax(1)
    routed_right = right[routed, torch.arange(len(labels))]
    some_right = right.any(0)
    disagree = some_right & ~right.all(0)
    genres = int(dense["rough"].shape[1])
    routing = torch.zeros(genres, num_experts, dtype=torch.long)
    routing.index_put_((labels, routed), torch.ones_like(labels), accumulate=True)
    return {
        "models": models,
        "expert_accuracy": right.double().mean(1).tolist(),
        "expert_load": torch.bincount(routed, minlength=num_experts).tolist(),
        "genre_by_expert": routing.tolist(),
        "routed_right_of_oracle_right": float(routed_right[some_right].double().mean()),
        "disagreeing_verses": float(disagree.double().mean()),
        "routed_right_on_disagreeing": float(routed_right[disagree].double().mean()) if disagree.any() else None,
        "random_expert_right_on_disagreeing": float(right[:, disagree].double().mean()) if disagree.any() else None,
        "threshold_by_rule_on_test": rule_on_test,
        "flops_per_verse": {name: float(v.mean()) for name, v in f.items()},
        "num_test": len(labels),
    }


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "values": values,
    }


def summarise(runs: list[dict]) -> dict[str, Any]:
    """Mean, sample standard deviation and per-seed values of every model's numbers and of the paired differences."""
    out: dict[str, Any] = {"models": {}, "differences": {}}
    for name, _ in MODELS:
        fields = runs[0]["models"][name]
        out["models"][name] = {
            field: _stats([r["models"][name][field] for r in runs])
            for field in ("accuracy", "flops", "exit_rate")
            if field in fields
        }
        if "threshold" in fields:
            out["models"][name]["thresholds"] = [r["models"][name]["threshold"] for r in runs]
    for key, (left, right), _ in DIFFERENCES:
        out["differences"][key] = _stats([r["models"][left]["accuracy"] - r["models"][right]["accuracy"] for r in runs])
    return out


def _pm(s: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    text = f"{scale * s['mean']:.{digits}f}"
    if s["std"] is not None:
        text += f" ± {scale * s['std']:.{digits}f}"
    return text


def markdown(results: dict[str, Any]) -> str:
    """The results table (test split), the paired differences by seed, and the run's conditions."""
    summary, runs = results["summary"], results["runs"]
    seeds = [r["seed"] for r in runs]
    lines = [
        f"Test accuracy (%), mean ± std over seeds {seeds} (per-seed values in brackets); FLOPs per verse, forward.",
        "",
        "| model | accuracy (%) | MFLOPs / verse | exit rate (%) | thresholds |",
        "|---|---|---|---|---|",
    ]
    for name, label in MODELS:
        s = summary["models"][name]
        per_seed = ", ".join(f"{100 * v:.2f}" for v in s["accuracy"]["values"])
        flops = _pm(s["flops"], 1e-6, 3) if "flops" in s else "-"
        exits = _pm(s["exit_rate"], 100.0, 1) if "exit_rate" in s else "-"
        thresholds = ", ".join("none" if t is None else f"{t:.3g}" for t in s.get("thresholds", [])) or "-"
        lines.append(f"| {label} | {_pm(s['accuracy'])} [{per_seed}] | {flops} | {exits} | {thresholds} |")
    lines += ["", "| paired difference (points) | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines.append("|---|---|" + "---|" * len(seeds))
    for key, _, label in DIFFERENCES:
        d = summary["differences"][key]
        lines.append(f"| {label} | {_pm(d)} | " + " | ".join(f"{100 * v:+.2f}" for v in d["values"]) + " |")
    data, load = results["data"], results["load_average"]
    lines += [
        "",
        f"Verses train/val/test: {data['verses']['train']}/{data['verses']['val']}/{data['verses']['test']} "
        f"(chapters {data['chapters']['train']}/{data['chapters']['val']}/{data['chapters']['test']}); subword "
        f"vocabulary {data['vocab_size']}; FLOPs-matched hidden size per seed "
        f"{[r['matched_hidden'] for r in runs]}.",
        f"Wall time {results['wall_seconds']:.0f} s ({results['config']['jobs']} seed(s) at a time, "
        f"{runs[0]['torch_threads']} torch thread(s) each); CPU time per seed "
        f"{[r['cpu_seconds'] for r in runs]} s; 1-minute load average {load['mean']} "
        f"({load['min']} to {load['max']}) on {results['machine']['cpus']} CPUs.",
    ]
    return "\n".join(lines)


def one_line(result: dict[str, Any]) -> str:
    """A seed's headline numbers, for the log."""
    m = result["models"]
    return ", ".join(
        f"{name} {100 * m[name]['accuracy']:.2f}%"
        + (f" at {m[name]['flops'] / 1e6:.3f} MFLOPs" if "flops" in m[name] else "")
        for name in ("single", "matched", "delegator", "coe_no_exit", "coe_exit", "cascade_exit", "oracle")
    )
