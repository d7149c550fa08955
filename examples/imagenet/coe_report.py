"""Final evaluation of the CoE example: the results table (markdown + JSON), the flat table entries and the figures.

The early-exit numbers come from :func:`pycoe.coe.calibrate.calibrate_exit_threshold`: the threshold is chosen on
the validation split (carved out of the training data), and the test set is used once, for the numbers reported
at that threshold. The same is done for the **cascade** (the same delegator's rough head in front of a single
network of the expert's architecture), the baseline that isolates what the experts add to the exit.

A dense pass (:func:`collect_outputs`: the delegator and *every* expert on every test image) gives what the
routed inference cannot: the oracle accuracy of the pool (a sample counts as correct when any expert gets it
right: an upper bound on any routing), each expert's accuracy on all images, and the class x expert routing
matrix.

Shapes: N test samples, K experts, C classes.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch

from pycoe.twostage.calibrate import ExitCalibration
from pycoe.utils import eval_mode

__all__ = [
    "collect_outputs",
    "at_threshold",
    "exit_report",
    "summarise",
    "table_entries",
    "write_outputs",
    "interpolate_baseline",
    "place_labels",
]


def collect_outputs(coe, batches, device) -> dict[str, torch.Tensor]:
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


def at_threshold(calibration: ExitCalibration, threshold: float | None) -> dict[str, Any]:
    """The entry of ``calibration.curve`` at ``threshold`` (which must be one of its candidates)."""
    for p in calibration.curve:
        if p["threshold"] == threshold:
            return p
    raise KeyError(f"threshold {threshold} is not among the calibration's candidates")


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
    """Everything the table, the JSON and the figures need (``temperature``: ``--fit-temperature``'s report)."""
    k = args.num_experts
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
    class_expert = torch.zeros(len(classes), k, dtype=torch.long)
    class_expert.index_put_((y, choice), torch.ones_like(y), accumulate=True)
    coe_test, cascade_test = calibrations["coe"]["test"], calibrations["cascade"]["test"]
    labelled = [None, *args.threshold_list]
    matched = next((b for b in baselines if b.get("matched")), None)
    expert_base = next((b for b in baselines if b["name"] == _expert_name(args)), None)
    coe_exit, cascade_exit = exits["coe"], exits["cascade"]
    summary: dict[str, Any] = {
        "config": {k2: v for k2, v in vars(args).items() if k2 != "threshold_list"},
        "world_size": world_size,
        "compute_seconds": round(compute_seconds, 1),
        "num_val": num_val,
        "num_test": int(y.numel()),
        "flops": {
            "delegator": flops["delegator"],
            "expert": flops["expert"],
            "coe_no_exit": coe_test.no_exit_flops_per_sample,
            "cascade_first_stage": cascade_test.first_stage_flops,
            "cascade_no_exit": cascade_test.no_exit_flops_per_sample,
        },
        "coe": {
            "accuracy": coe_test.no_exit_accuracy,
            "flops_per_sample": coe_test.no_exit_flops_per_sample,
            "val_accuracy": calibrations["coe"]["val"].no_exit_accuracy,
            "oracle_accuracy": float(right.any(1).float().mean()),
            "per_expert_accuracy": right.float().mean(0).tolist(),
            "load": torch.bincount(choice, minlength=k).tolist(),
            "class_expert_counts": class_expert.tolist(),
            "routing": routing,
            "rough_accuracy": float((cache["rough_pred"] == y).float().mean()),
        },
        "exit": coe_exit,
        "cascade": {
            "accuracy": cascade_test.no_exit_accuracy,
            "flops_per_sample": cascade_test.no_exit_flops_per_sample,
            "exit": cascade_exit,
        },
        "sweep": [
            {key: at_threshold(coe_test, t)[key] for key in ("threshold", "accuracy", "exit_rate", "flops_per_sample")}
            for t in labelled
        ],
        "curves": {name: {split: _curve(cal) for split, cal in c.items()} for name, c in calibrations.items()},
        "baselines": baselines,
        "comparison": {
            "baseline_same_schedule_expert": expert_base["accuracy"] if expert_base else None,
            "flops_matched_baseline": matched,
            "baseline_interpolated_at_coe_flops": interpolate_baseline(baselines, coe_test.no_exit_flops_per_sample),
            "baseline_interpolated_at_exit_flops": interpolate_baseline(
                baselines, coe_exit["test"]["flops_per_sample"]
            ),
        },
        "phases": phase_results,
        "classes": list(classes),
        "temperature": temperature,
    }
    summary["entries"] = table_entries(summary)
    summary["table_markdown"] = table_markdown(summary)
    return summary


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
    c = s["comparison"]
    if c["flops_matched_baseline"] is not None:
        e["diff: CoE no exit - FLOPs-matched single"] = 100 * (
            s["coe"]["accuracy"] - c["flops_matched_baseline"]["accuracy"]
        )
    if c["baseline_same_schedule_expert"] is not None:
        e["diff: CoE no exit - single of the expert's architecture"] = 100 * (
            s["coe"]["accuracy"] - c["baseline_same_schedule_expert"]
        )
    e["diff: CoE exit - cascade exit (top-1)"] = 100 * (
        s["exit"]["test"]["accuracy"] - s["cascade"]["exit"]["test"]["accuracy"]
    )
    e["diff: CoE exit - cascade exit (MFLOPs)"] = (
        s["exit"]["test"]["flops_per_sample"] - s["cascade"]["exit"]["test"]["flops_per_sample"]
    ) / 1e6
    same = cascade_at_coe_threshold(s)
    if same is not None:
        e["diff: CoE exit - cascade at the CoE's threshold (top-1)"] = 100 * (
            s["exit"]["test"]["accuracy"] - same["accuracy"]
        )
    return e


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


def _thr(t: float | None) -> str:
    return "never" if t is None else f"{t:.4g}"


def table_markdown(s: dict) -> str:
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
    k = a["num_experts"]
    rows.append(
        (
            f"delegator {a['delegator']} (rough head only)",
            _p(s["coe"]["rough_accuracy"]),
            _m(s["flops"]["delegator"]),
            "100%",
            "every sample exits",
        )
    )
    rows.append(
        (
            f"CoE K={k}, no exit",
            _p(s["coe"]["accuracy"]),
            _m(s["coe"]["flops_per_sample"]),
            "0%",
            "delegator + 1 routed expert",
        )
    )
    for label, ex in ((f"CoE K={k}", s["exit"]), ("cascade", s["cascade"]["exit"])):
        t, v = ex["test"], ex["val"]
        rows.append(
            (
                f"{label}, exit >= {_thr(ex['threshold'])}",
                _p(t["accuracy"]),
                _m(t["flops_per_sample"]),
                f"{100 * t['exit_rate']:.1f}%",
                f"threshold from the validation split ({ex['rule']}); test: -{100 * t['flops_saving']:.1f}% FLOPs, "
                f"{_signed(-100 * t['accuracy_drop'])} pt vs no exit (val: "
                f"{_signed(100 * (v['accuracy'] - v['no_exit_accuracy']))} pt)",
            )
        )
    rows.append(
        (
            "cascade, no exit",
            _p(s["cascade"]["accuracy"]),
            _m(s["cascade"]["flops_per_sample"]),
            "0%",
            f"the delegator's rough head, then the single {expert_name} on every sample",
        )
    )
    rows.append(
        (
            "oracle of the expert pool",
            _p(s["coe"]["oracle_accuracy"]),
            "-",
            "-",
            "any expert right (upper bound of routing)",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    c, e = s["comparison"], s["exit"]
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
    ce = s["cascade"]["exit"]
    notes.append(
        f"CoE with exit vs the cascade with exit (each at its own validation-calibrated threshold): "
        f"{100 * (e['test']['accuracy'] - ce['test']['accuracy']):+.2f} points at "
        f"{_m(e['test']['flops_per_sample'])} vs {_m(ce['test']['flops_per_sample'])} MFLOPs"
    )
    same = cascade_at_coe_threshold(s)
    if same is not None:
        notes.append(
            f"CoE with exit vs the cascade at the same threshold {_thr(e['threshold'])} (the same samples exit; "
            f"{_m(e['test']['flops_per_sample'])} vs {_m(same['flops_per_sample'])} MFLOPs): "
            f"{100 * (e['test']['accuracy'] - same['accuracy']):+.2f} points"
        )
    if c.get("baseline_interpolated_at_exit_flops") is not None:
        notes.append(
            f"CoE with exit vs the single networks interpolated at its average FLOPs: "
            f"{100 * (e['test']['accuracy'] - c['baseline_interpolated_at_exit_flops']):+.2f} points"
        )
    temp = s.get("temperature")
    if temp:
        for label, name in (("CoE", "coe"), ("cascade", "cascade")):
            t = temp[name]["test"]
            notes.append(
                f"{label} with the rough head's temperature T={temp['T']:.3f} fitted on the validation split "
                f"(cross-entropy {temp['val_cross_entropy'][0]:.4f} -> {temp['val_cross_entropy'][1]:.4f}), "
                f"threshold {_thr(temp[name]['threshold'])} chosen the same way: {_p(t['accuracy'])}% at "
                f"{_m(t['flops_per_sample'])} MFLOPs ({100 * t['exit_rate']:.1f}% exit)"
            )
    tp = e["test_picked"]
    notes.append(
        f"for comparison only, the same rule applied to the test set would pick {_thr(tp['threshold'])} "
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
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def write_outputs(summary: dict, out_dir: Path, figures: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text("# CoE example results\n\n" + summary["table_markdown"])
    (out_dir / "results.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k != "table_markdown"}, indent=1, default=float)
    )
    if figures:
        plot_accuracy_flops(summary, out_dir / "accuracy_vs_flops.png")
        plot_expert_load(summary, out_dir / "expert_load.png")


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------
# Offsets (points) tried in turn for a label: right-above, right-below, left-above, left-below, above, below, and
# farther out. The first whose box overlaps no other label, no marker and stays inside the axes wins.
_LABEL_BOX = {"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75}  # lines stay visible below
_OFFSETS = [(6, 5), (6, -12), (-6, 5), (-6, -12), (0, 9), (0, -16), (12, 12), (12, -20), (-12, 12), (-12, -20)]


def place_labels(ax, items: list[dict], markers: list[tuple[float, float]], marker_px: float = 7.0) -> list:
    """Place text labels next to data points so that they overlap neither each other nor the markers.

    Args:
        ax: a matplotlib Axes whose limits are final.
        items: dicts with ``x``, ``y`` (data coordinates), ``text``, ``color``, and ``required`` (True: placed at
            the first offset even when every offset collides; False: dropped then).
        markers: data points whose markers labels must not cover (nor the legend, if any).
        marker_px: half the size of a marker's box, in pixels.

    Returns:
        The matplotlib Text objects placed.
    """
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    axes_box = ax.get_window_extent(renderer)
    occupied = []
    legend = ax.get_legend()
    if legend is not None:
        lb = legend.get_window_extent(renderer)
        occupied.append((lb.x0, lb.y0, lb.x1, lb.y1))
    for mx, my in markers:
        px, py = to_px((mx, my))
        occupied.append((px - marker_px, py - marker_px, px + marker_px, py + marker_px))

    def overlaps(a, b) -> bool:
        return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])

    placed = []
    for it in items:
        chosen = None
        for dx, dy in _OFFSETS:
            text = ax.annotate(
                it["text"],
                (it["x"], it["y"]),
                textcoords="offset points",
                xytext=(dx, dy),
                ha="left" if dx > 0 else ("right" if dx < 0 else "center"),
                fontsize=7,
                color=it["color"],
                bbox=_LABEL_BOX,
            )
            bb = text.get_window_extent(renderer)
            box = (bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1)
            inside = axes_box.x0 <= box[0] and box[2] <= axes_box.x1 and axes_box.y0 <= box[1] and box[3] <= axes_box.y1
            if inside and not any(overlaps(box, o) for o in occupied):
                chosen = (text, box)
                break
            text.remove()
        if chosen is None and it.get("required", True):
            dx, dy = _OFFSETS[0]
            text = ax.annotate(
                it["text"],
                (it["x"], it["y"]),
                textcoords="offset points",
                xytext=(dx, dy),
                fontsize=7,
                color=it["color"],
                bbox=_LABEL_BOX,
            )
            bb = text.get_window_extent(renderer)
            chosen = (text, (bb.x0, bb.y0, bb.x1, bb.y1))
        if chosen is not None:
            occupied.append(chosen[1])
            placed.append(chosen[0])
    return placed


def plot_accuracy_flops(s: dict, path: Path) -> None:
    """Accuracy vs average inference FLOPs on the test set: single networks, the CoE's and the cascade's exit
    curves with their validation-calibrated points, the delegator alone and the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(7.4, 4.8), dpi=130)
    k = s["config"]["num_experts"]
    markers: list[tuple[float, float]] = []
    labels: list[dict] = []

    def curve(points):
        pts = sorted((p["flops_per_sample"] / 1e6, 100 * p["accuracy"]) for p in points)
        return [x for x, _ in pts], [y for _, y in pts]

    b = s["baselines"]
    if b:
        xs, ys = [x["flops"] / 1e6 for x in b], [100 * x["accuracy"] for x in b]
        ax.plot(xs, ys, "o-", color="tab:gray", label="single networks", zorder=3)
        markers += list(zip(xs, ys))
        labels += [
            {"x": x, "y": y, "text": n["name"], "color": "dimgray", "required": True} for x, y, n in zip(xs, ys, b)
        ]
    xs, ys = curve(s["curves"]["cascade"]["test"])
    ax.plot(xs, ys, "--", color="tab:purple", lw=1, label="cascade (rough head + single network), exit sweep")
    xs, ys = curve(s["curves"]["coe"]["test"])
    ax.plot(xs, ys, "-", color="tab:blue", lw=1.2, label=f"CoE K={k}, exit sweep")
    sweep = [p for p in s["sweep"] if p["threshold"] is not None]
    sx, sy = [p["flops_per_sample"] / 1e6 for p in sweep], [100 * p["accuracy"] for p in sweep]
    ax.plot(sx, sy, ".", color="tab:blue", ms=4)
    markers += list(zip(sx, sy))
    # threshold labels: dropped where they would collide (the baselines' labels, placed first, always stay)
    threshold_labels = [
        {"x": x, "y": y, "text": f"{p['threshold']:g}", "color": "tab:blue", "required": False}
        for x, y, p in zip(sx, sy, sweep)
    ]
    no_exit = (s["coe"]["flops_per_sample"] / 1e6, 100 * s["coe"]["accuracy"])
    ax.plot(*no_exit, "*", ms=12, color="tab:blue", label=f"CoE K={k}, no exit", zorder=4)
    markers.append(no_exit)
    for name, ex, color, marker in (
        (f"CoE, exit >= {_thr(s['exit']['threshold'])} (val-calibrated)", s["exit"], "tab:red", "D"),
        (
            f"cascade, exit >= {_thr(s['cascade']['exit']['threshold'])} (val-calibrated)",
            s["cascade"]["exit"],
            "tab:purple",
            "s",
        ),
    ):
        pt = (ex["test"]["flops_per_sample"] / 1e6, 100 * ex["test"]["accuracy"])
        ax.plot(*pt, marker, ms=7, mfc="none", mew=1.5, color=color, label=name, zorder=5)
        markers.append(pt)
    rough = (s["flops"]["delegator"] / 1e6, 100 * s["coe"]["rough_accuracy"])
    ax.plot(*rough, "v", color="tab:green", label="delegator alone (rough head)")
    markers.append(rough)
    ax.axhline(100 * s["coe"]["oracle_accuracy"], ls=":", color="tab:orange", lw=1, label="oracle of the expert pool")
    ax.set_xscale("log")  # straight segments = the log-FLOPs interpolation used in the table's notes
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("average inference MFLOPs per sample (torch.utils.flop_counter, log scale)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ds = s["config"]["dataset"]
    ax.set_title(
        f"CoE on {ds}: accuracy vs FLOPs ({s['num_test']} test images; thresholds chosen on {s['num_val']} "
        "validation images)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    place_labels(ax, labels + threshold_labels, markers)
    fig.savefig(path)
    plt.close(fig)


def plot_expert_load(s: dict, path: Path) -> None:
    """Expert load (bar chart) and the class x expert routing matrix (heat map), on the test set, no exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.tensor(s["coe"]["class_expert_counts"], dtype=torch.float64)  # [C, K]
    c, k = counts.shape
    frac = counts / counts.sum(1, keepdim=True).clamp_min(1)
    fig, (ax0, ax1) = plt.subplots(
        1, 2, figsize=(9.5, max(3.6, 0.32 * c + 1.2)), dpi=130, gridspec_kw={"width_ratios": [1, 1.6]}
    )
    load = s["coe"]["load"]
    total = max(1, sum(load))
    ax0.bar(range(k), [100 * x / total for x in load], color="tab:blue")
    ax0.axhline(100 / k, ls="--", color="k", lw=1, label="balanced (1/K)")
    ax0.set_xticks(range(k))
    ax0.set_xlabel("expert")
    ax0.set_ylabel("share of test samples routed (%)")
    ax0.set_title("expert load (no exit)", fontsize=10)
    ax0.legend(fontsize=7)
    im = ax1.imshow(frac.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax1.set_xticks(range(k))
    ax1.set_xlabel("expert")
    names = s["classes"] if len(s["classes"]) <= 40 else None
    if names:
        ax1.set_yticks(range(c))
        ax1.set_yticklabels(names, fontsize=7)
    ax1.set_ylabel("true class")
    ax1.set_title("which expert serves each class (row-normalised)", fontsize=10)
    if c * k <= 200:
        for i in range(c):
            for j in range(k):
                ax1.text(
                    j,
                    i,
                    f"{frac[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="w" if frac[i, j] < 0.6 else "k",
                )
    fig.colorbar(im, ax=ax1, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
