"""The report of the CoE recipe: the summary of a run, its results table (markdown + JSON) and flat entries.

:func:`summarise` gathers what the final evaluation (:mod:`examples.imagenet.evaluation`) measured into one
dict; :func:`table_markdown` prints it as the results table with notes on the paired comparisons;
:func:`table_entries` flattens its numbers for the multi-seed driver; :func:`write_outputs` writes
``results.md``, ``results.json`` and the figures (:mod:`examples.imagenet.figures`).

Shapes: N test samples, K experts, C classes.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch

from pycoe.coe.calibrate import ExitCalibration

__all__ = [
    "at_threshold",
    "summarise",
    "table_entries",
    "table_markdown",
    "write_outputs",
    "interpolate_baseline",
    "cascade_at_coe_threshold",
    "threshold_label",
]


def at_threshold(calibration: ExitCalibration, threshold: float | None) -> dict[str, Any]:
    """The entry of ``calibration.curve`` at ``threshold`` (which must be one of its candidates)."""
    for p in calibration.curve:
        if p["threshold"] == threshold:
            return p
    raise KeyError(f"threshold {threshold} is not among the calibration's candidates")


def summarise(
    args,
    cache: dict[str, torch.Tensor],
    calibrations: dict[str, dict[str, ExitCalibration]],
    exits: dict[str, dict[str, Any]],
    baselines: list[dict],
    flops: dict[str, float],
    phase_results: dict,
    classes,
    compute_seconds: float,
    world_size: int,
    num_val: int,
    temperature: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the table, the JSON and the figures need.

    Args:
        args: the run's options.
        cache: :func:`~examples.imagenet.evaluation.collect_outputs` of the CoE on the test set.
        calibrations: ``{"coe" | "cascade": {"val" | "test": ExitCalibration}}``.
        exits: ``{"coe" | "cascade": exit report}`` (:func:`~examples.imagenet.evaluation.exit_report`).
        baselines: the single networks' rows (:func:`~examples.imagenet.evaluation.single_networks`).
        flops: ``{"delegator": ..., "expert": ...}`` per sample.
        phase_results: the test numbers measured at the end of the stages.
        classes: the class names.
        compute_seconds: the training time (sum of the epochs).
        world_size: processes that trained.
        num_val: validation samples.
        temperature: ``--fit-temperature``'s report, or None.
    """
    coe_test, cascade_test = calibrations["coe"]["test"], calibrations["cascade"]["test"]
    coe_exit, cascade_exit = exits["coe"], exits["cascade"]
    summary: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "threshold_list"},
        "world_size": world_size,
        "compute_seconds": round(compute_seconds, 1),
        "num_val": num_val,
        "num_test": int(cache["labels"].numel()),
        "flops": {
            "delegator": flops["delegator"],
            "expert": flops["expert"],
            "coe_no_exit": coe_test.no_exit_flops_per_sample,
            "cascade_first_stage": cascade_test.first_stage_flops,
            "cascade_no_exit": cascade_test.no_exit_flops_per_sample,
        },
        "coe": _coe_numbers(cache, calibrations["coe"], len(classes), args.num_experts),
        "exit": coe_exit,
        "cascade": {
            "accuracy": cascade_test.no_exit_accuracy,
            "flops_per_sample": cascade_test.no_exit_flops_per_sample,
            "exit": cascade_exit,
        },
        "sweep": [
            {key: at_threshold(coe_test, t)[key] for key in ("threshold", "accuracy", "exit_rate", "flops_per_sample")}
            for t in [None, *args.threshold_list]
        ],
        "curves": {name: {split: _curve(cal) for split, cal in c.items()} for name, c in calibrations.items()},
        "baselines": baselines,
        "comparison": _comparison(args, baselines, coe_test, coe_exit),
        "phases": phase_results,
        "classes": list(classes),
        "temperature": temperature,
    }
    summary["entries"] = table_entries(summary)
    summary["table_markdown"] = table_markdown(summary)
    return summary


def _coe_numbers(
    cache: dict[str, torch.Tensor], calibration: dict[str, ExitCalibration], num_classes: int, k: int
) -> dict[str, Any]:
    """The CoE's numbers without exit: accuracy, FLOPs, the pool's oracle, each expert's accuracy, the load, the
    class x expert routing counts and how often the routed expert is the right one."""
    y, choice = cache["labels"], cache["choice"]
    right = cache["expert_pred"] == y[:, None]  # [N, K]
    routed_right = right.gather(1, choice[:, None]).squeeze(1)  # [N]
    disputed = right.any(1) & ~right.all(1)  # some experts right, some wrong: where routing matters
    routing = {
        "routed_correct_given_oracle": float(routed_right[right.any(1)].float().mean()) if right.any() else None,
        "disputed_fraction": float(disputed.float().mean()),
        "routed_correct_when_disputed": float(routed_right[disputed].float().mean()) if disputed.any() else None,
        "random_routing_when_disputed": float(right[disputed].float().mean()) if disputed.any() else None,
    }
    class_expert = torch.zeros(num_classes, k, dtype=torch.long)
    class_expert.index_put_((y, choice), torch.ones_like(y), accumulate=True)
    return {
        "accuracy": calibration["test"].no_exit_accuracy,
        "flops_per_sample": calibration["test"].no_exit_flops_per_sample,
        "val_accuracy": calibration["val"].no_exit_accuracy,
        "oracle_accuracy": float(right.any(1).float().mean()),
        "per_expert_accuracy": right.float().mean(0).tolist(),
        "load": torch.bincount(choice, minlength=k).tolist(),
        "class_expert_counts": class_expert.tolist(),
        "routing": routing,
        "rough_accuracy": float((cache["rough_pred"] == y).float().mean()),
    }


def _comparison(args, baselines: list[dict], coe_test: ExitCalibration, coe_exit: dict[str, Any]) -> dict[str, Any]:
    """The single networks the CoE is compared with: the expert's architecture, the FLOPs-matched one, and the
    single networks interpolated (in log-FLOPs) at the CoE's FLOPs without and with exit."""
    matched = next((b for b in baselines if b.get("matched")), None)
    expert_base = next((b for b in baselines if b["name"] == _expert_name(args)), None)
    return {
        "baseline_same_schedule_expert": expert_base["accuracy"] if expert_base else None,
        "flops_matched_baseline": matched,
        "baseline_interpolated_at_coe_flops": interpolate_baseline(baselines, coe_test.no_exit_flops_per_sample),
        "baseline_interpolated_at_exit_flops": interpolate_baseline(baselines, coe_exit["test"]["flops_per_sample"]),
    }


def interpolate_baseline(baselines: list[dict], flops: float) -> float | None:
    """Baseline accuracy at ``flops``, linear in log-FLOPs between the two nearest baselines (None outside)."""
    pts = sorted((b["flops"], b["accuracy"]) for b in baselines)
    for (f0, a0), (f1, a1) in itertools.pairwise(pts):
        if f0 <= flops <= f1 and f1 > f0:
            t = (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return a0 + t * (a1 - a0)
    return None


def _curve(cal: ExitCalibration) -> list[dict[str, Any]]:
    keys = ("threshold", "accuracy", "exit_rate", "flops_per_sample")
    return [{k: p[k] for k in keys} for p in cal.curve]


def table_entries(s: dict[str, Any]) -> dict[str, float]:
    """The numbers of the table as one flat ``{name: value}`` dict (accuracies in %, FLOPs in MFLOPs).

    The multi-seed driver (``run_seeds.py``) averages these over seeds; the ``diff:`` entries are the paired
    differences of one run (CoE minus the FLOPs-matched single network, CoE minus the cascade).
    """
    e: dict[str, float] = {}
    for b in s["baselines"]:
        e[f"single {b['name']}: top-1"] = 100 * b["accuracy"]
        e[f"single {b['name']}: MFLOPs"] = b["flops"] / 1e6
    e["delegator rough head: top-1"] = 100 * s["coe"]["rough_accuracy"]
    e["delegator: MFLOPs"] = s["flops"]["delegator"] / 1e6
    e["CoE no exit: top-1"] = 100 * s["coe"]["accuracy"]
    e["CoE no exit: MFLOPs"] = s["coe"]["flops_per_sample"] / 1e6
    e["oracle of the pool: top-1"] = 100 * s["coe"]["oracle_accuracy"]
    for name, ex in (("CoE", s["exit"]), ("cascade", s["cascade"]["exit"])):
        t = ex["test"]
        e[f"{name} exit: threshold (val)"] = 1.0 if ex["threshold"] is None else ex["threshold"]
        e[f"{name} exit: top-1"] = 100 * t["accuracy"]
        e[f"{name} exit: MFLOPs"] = t["flops_per_sample"] / 1e6
        e[f"{name} exit: exit rate (%)"] = 100 * t["exit_rate"]
        e[f"{name} exit: FLOPs saved (%)"] = 100 * t["flops_saving"]
        e[f"{name} exit: top-1 change vs no exit"] = -100 * t["accuracy_drop"]
    temp = s.get("temperature")
    if temp:
        e["rough-head temperature T (val)"] = temp["T"]
        for name in ("coe", "cascade"):
            t = temp[name]["test"]
            label = "CoE" if name == "coe" else "cascade"
            e[f"{label} exit, T-scaled rough head: top-1"] = 100 * t["accuracy"]
            e[f"{label} exit, T-scaled rough head: MFLOPs"] = t["flops_per_sample"] / 1e6
            e[f"{label} exit, T-scaled rough head: exit rate (%)"] = 100 * t["exit_rate"]
    e["cascade no exit: top-1"] = 100 * s["cascade"]["accuracy"]
    e["cascade no exit: MFLOPs"] = s["cascade"]["flops_per_sample"] / 1e6
    e.update(_paired_differences(s))
    return e


def _paired_differences(s: dict[str, Any]) -> dict[str, float]:
    """The ``diff:`` entries: the CoE minus its baselines, in points (MFLOPs for the exit's cost)."""
    d: dict[str, float] = {}
    c = s["comparison"]
    if c["flops_matched_baseline"] is not None:
        d["diff: CoE no exit - FLOPs-matched single"] = 100 * (
            s["coe"]["accuracy"] - c["flops_matched_baseline"]["accuracy"]
        )
    if c["baseline_same_schedule_expert"] is not None:
        d["diff: CoE no exit - single of the expert's architecture"] = 100 * (
            s["coe"]["accuracy"] - c["baseline_same_schedule_expert"]
        )
    d["diff: CoE exit - cascade exit (top-1)"] = 100 * (
        s["exit"]["test"]["accuracy"] - s["cascade"]["exit"]["test"]["accuracy"]
    )
    d["diff: CoE exit - cascade exit (MFLOPs)"] = (
        s["exit"]["test"]["flops_per_sample"] - s["cascade"]["exit"]["test"]["flops_per_sample"]
    ) / 1e6
    same = cascade_at_coe_threshold(s)
    if same is not None:
        d["diff: CoE exit - cascade at the CoE's threshold (top-1)"] = 100 * (
            s["exit"]["test"]["accuracy"] - same["accuracy"]
        )
    return d


def cascade_at_coe_threshold(s: dict[str, Any]) -> dict[str, Any] | None:
    """The cascade's test numbers at the CoE's own threshold: the same exit decisions (same rough head), so the
    same samples reach the second stage and the FLOPs agree up to the selection head; the accuracy difference is
    what the routed experts add over the single network on the samples that do not exit."""
    t = s["exit"]["threshold"]
    return next((p for p in s["curves"]["cascade"]["test"] if p["threshold"] == t), None)


def _expert_name(args) -> str:
    return f"cnn@{args.expert_width:g}" if args.expert == "cnn" else args.expert


def _signed(x: float) -> str:
    return f"{x:+.2f}" if round(x, 2) != 0 else "0.00"


def _m(flops: float | None) -> str:
    return "-" if flops is None else f"{flops / 1e6:.2f}"


def _p(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.2f}"


def threshold_label(t: float | None) -> str:
    """A threshold as the table prints it (``"never"`` for no exit)."""
    return "never" if t is None else f"{t:.4g}"


def table_markdown(s: dict) -> str:
    """The results table (one row per model) and the notes on the comparisons, in markdown."""
    rows = _table_rows(s)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = _comparison_notes(s) + _run_notes(s)
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _table_rows(s: dict) -> list[tuple[str, ...]]:
    """The header and one row per model: single networks, delegator, CoE and cascade with and without exit,
    oracle."""
    a = s["config"]
    expert_name = f"cnn@{a['expert_width']:g}" if a["expert"] == "cnn" else a["expert"]
    rows = [("model", "test top-1 (%)", "MFLOPs / sample", "exit rate", "notes")]
    for b in s["baselines"]:
        note = "single network, same epochs and schedule as the expert"
        if b["name"] == expert_name:
            note = "the expert's architecture alone (the universal expert trained on)"
        if b.get("matched"):
            note = "single network with the FLOPs of the CoE without exit"
        rows.append((f"single {b['name']}", _p(b["accuracy"]), _m(b["flops"]), "-", note))
    k, coe = a["num_experts"], s["coe"]
    rough = (_p(coe["rough_accuracy"]), _m(s["flops"]["delegator"]), "100%", "every sample exits")
    rows.append((f"delegator {a['delegator']} (rough head only)", *rough))
    rows.append(
        (f"CoE K={k}, no exit", _p(coe["accuracy"]), _m(coe["flops_per_sample"]), "0%", "delegator + 1 routed expert")
    )
    for label, ex in ((f"CoE K={k}", s["exit"]), ("cascade", s["cascade"]["exit"])):
        t, v = ex["test"], ex["val"]
        rows.append(
            (
                f"{label}, exit >= {threshold_label(ex['threshold'])}",
                _p(t["accuracy"]),
                _m(t["flops_per_sample"]),
                f"{100 * t['exit_rate']:.1f}%",
                f"threshold from the validation split ({ex['rule']}); test: -{100 * t['flops_saving']:.1f}% FLOPs, "
                f"{_signed(-100 * t['accuracy_drop'])} pt vs no exit (val: "
                f"{_signed(100 * (v['accuracy'] - v['no_exit_accuracy']))} pt)",
            )
        )
    cascade = (_p(s["cascade"]["accuracy"]), _m(s["cascade"]["flops_per_sample"]), "0%")
    rows.append(
        ("cascade, no exit", *cascade, f"the delegator's rough head, then the single {expert_name} on every sample")
    )
    rows.append(
        ("oracle of the expert pool", _p(coe["oracle_accuracy"]), "-", "-", "any expert right (upper bound of routing)")
    )
    return rows


def _comparison_notes(s: dict) -> list[str]:
    """The paired comparisons of the CoE with the single networks and with the cascade, in points."""
    c, e, ce = s["comparison"], s["exit"], s["cascade"]["exit"]
    notes = []
    ref = c["flops_matched_baseline"]
    if ref is not None:
        notes.append(
            f"CoE (no exit) vs the FLOPs-matched single network {ref['name']}: "
            f"{100 * (s['coe']['accuracy'] - ref['accuracy']):+.2f} points"
        )
    if c["baseline_interpolated_at_coe_flops"] is not None:
        notes.append(
            f"CoE (no exit) vs the single networks interpolated at its FLOPs: "
            f"{100 * (s['coe']['accuracy'] - c['baseline_interpolated_at_coe_flops']):+.2f} points"
        )
    if c["baseline_same_schedule_expert"] is not None:
        notes.append(
            f"CoE (no exit) vs one expert trained on with the same schedule: "
            f"{100 * (s['coe']['accuracy'] - c['baseline_same_schedule_expert']):+.2f} points"
        )
    notes.append(
        f"CoE with exit vs the cascade with exit (each at its own validation-calibrated threshold): "
        f"{100 * (e['test']['accuracy'] - ce['test']['accuracy']):+.2f} points at "
        f"{_m(e['test']['flops_per_sample'])} vs {_m(ce['test']['flops_per_sample'])} MFLOPs"
    )
    same = cascade_at_coe_threshold(s)
    if same is not None:
        notes.append(
            f"CoE with exit vs the cascade at the same threshold {threshold_label(e['threshold'])} (the same "
            f"samples exit; {_m(e['test']['flops_per_sample'])} vs {_m(same['flops_per_sample'])} MFLOPs): "
            f"{100 * (e['test']['accuracy'] - same['accuracy']):+.2f} points"
        )
    if c.get("baseline_interpolated_at_exit_flops") is not None:
        notes.append(
            f"CoE with exit vs the single networks interpolated at its average FLOPs: "
            f"{100 * (e['test']['accuracy'] - c['baseline_interpolated_at_exit_flops']):+.2f} points"
        )
    return notes


def _run_notes(s: dict) -> list[str]:
    """The rest: the temperature-scaled exits, the test-set choice, the load and routing, the data and FLOPs."""
    notes = []
    temp = s.get("temperature")
    if temp:
        for label, name in (("CoE", "coe"), ("cascade", "cascade")):
            t = temp[name]["test"]
            notes.append(
                f"{label} with the rough head's temperature T={temp['T']:.3f} fitted on the validation split "
                f"(cross-entropy {temp['val_cross_entropy'][0]:.4f} -> {temp['val_cross_entropy'][1]:.4f}), "
                f"threshold {threshold_label(temp[name]['threshold'])} chosen the same way: {_p(t['accuracy'])}% "
                f"at {_m(t['flops_per_sample'])} MFLOPs ({100 * t['exit_rate']:.1f}% exit)"
            )
    tp = s["exit"]["test_picked"]
    notes.append(
        f"for comparison only, the same rule applied to the test set would pick {threshold_label(tp['threshold'])} "
        f"({_p(tp['accuracy'])}% at {_m(tp['flops_per_sample'])} MFLOPs); the table uses the validation choice"
    )
    notes.append(
        f"expert load on the test set (no exit): {s['coe']['load']}; per-expert accuracy on all test "
        f"samples: {', '.join(_p(x) for x in s['coe']['per_expert_accuracy'])}"
    )
    r = s["coe"].get("routing")
    if r and r["routed_correct_when_disputed"] is not None:
        notes.append(
            f"routing on the test set: the routed expert is right on {_p(r['routed_correct_given_oracle'])}% "
            f"of the images some expert gets right; on the {_p(r['disputed_fraction'])}% of images where "
            f"the experts disagree it is right {_p(r['routed_correct_when_disputed'])}% of the time "
            f"(a random expert: {_p(r['random_routing_when_disputed'])}%)"
        )
    notes.append(
        f"{s['num_val']} validation samples (held out from training; thresholds chosen there), {s['num_test']} test "
        f"samples; training wall time (sum of the epochs) {s['compute_seconds']:.0f}s on {s['world_size']} "
        "process(es); FLOPs: torch.utils.flop_counter (a multiply-add = 2 FLOPs)"
    )
    return notes


def write_outputs(summary: dict, out_dir: Path, figures: bool = True) -> None:
    """``results.md``, ``results.json`` and (unless ``figures`` is False) the two figures, in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text("# CoE example results\n\n" + summary["table_markdown"])
    (out_dir / "results.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k != "table_markdown"}, indent=1, default=float)
    )
    if figures:
        from examples.imagenet.figures import plot_accuracy_flops, plot_expert_load

        plot_accuracy_flops(summary, out_dir / "accuracy_vs_flops.png")
        plot_expert_load(summary, out_dir / "expert_load.png")
