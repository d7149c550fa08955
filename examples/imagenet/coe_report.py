"""Final evaluation of the CoE example: the results table (markdown + JSON) and the figures.

Two passes over the test set:

* :func:`pycoe.coe.evaluate.threshold_sweep` (the library's routed inference path: delegator, early exit,
  then one expert per remaining sample) gives accuracy, exit rate and average FLOPs per threshold;
* :func:`collect_outputs` runs the delegator and *every* expert densely (cheap at this scale), from which the
  oracle accuracy of the pool (a sample counts as correct when any expert gets it right: an upper bound on any
  routing), the expert load and the class x expert routing matrix are computed, and the sweep is recomputed as
  an independent check of the library's numbers.

Shapes: N test samples, K experts, C classes.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch

from pycoe.coe.early_exit import exit_mask, rough_confidence

__all__ = [
    "collect_outputs",
    "sweep_from_cache",
    "check_against_library",
    "summarise",
    "write_outputs",
    "interpolate_baseline",
]


@torch.no_grad()
def collect_outputs(coe, batches, device) -> dict[str, torch.Tensor]:
    """Dense evaluation of the delegator and all experts.

    Returns:
        dict with ``labels`` LongTensor[N], ``choice`` LongTensor[N] (argmax expert, ties to the lowest index),
        ``confidence`` Tensor[N] (max softmax of the rough head), ``rough_pred`` LongTensor[N] and
        ``expert_pred`` LongTensor[N, K].
    """
    modes = [(m, m.training) for m in coe.modules()]
    coe.eval()
    parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("labels", "choice", "confidence", "rough_pred", "expert_pred")
    }
    try:
        for x, y in batches:
            x = x.to(device)
            d = coe.delegate(x)
            logits = coe.experts(x)  # [K, B, C]
            parts["labels"].append(y.cpu())
            parts["choice"].append(d.selection_logits.argmax(1).cpu())
            parts["confidence"].append(rough_confidence(d.rough_logits).cpu())
            parts["rough_pred"].append(d.rough_logits.argmax(1).cpu())
            parts["expert_pred"].append(logits.argmax(2).T.cpu())  # [B, K]
    finally:
        for m, training in modes:
            m.training = training
    return {k: torch.cat(v) for k, v in parts.items()}


def sweep_from_cache(
    cache: dict, thresholds: list[float | None], delegator_flops: float, expert_flops: float
) -> list[dict[str, Any]]:
    """The early-exit sweep recomputed from :func:`collect_outputs` (same-architecture experts)."""
    y, choice, conf = cache["labels"], cache["choice"], cache["confidence"]
    expert_ok = cache["expert_pred"].gather(1, choice[:, None]).squeeze(1) == y
    rough_ok = cache["rough_pred"] == y
    out = []
    for t in thresholds:
        exited = exit_mask(conf, t)
        acc = float(torch.where(exited, rough_ok, expert_ok).float().mean())
        rate = float(exited.float().mean())
        out.append(
            {
                "threshold": t,
                "accuracy": acc,
                "exit_rate": rate,
                "flops_per_sample": delegator_flops + (1.0 - rate) * expert_flops,
            }
        )
    return out


def check_against_library(coe, batches, device, cache, thresholds, flops) -> dict[str, Any]:
    """Run :func:`pycoe.coe.evaluate.threshold_sweep` and compare it with the dense recomputation."""
    from pycoe.coe.evaluate import threshold_sweep

    ts = [None] + list(thresholds)
    table = {"delegator": flops["delegator"], "experts": [flops["expert"]] * coe.num_experts}
    lib = threshold_sweep(coe, batches, ts, flops=table, device=device)
    mine = sweep_from_cache(cache, ts, flops["delegator"], flops["expert"])
    worst = max(abs(a["accuracy"] - b["accuracy"]) for a, b in zip(lib, mine))
    worst_rate = max(abs(a["exit_rate"] - b["exit_rate"]) for a, b in zip(lib, mine))
    return {"sweep": lib, "max_accuracy_difference_vs_dense": worst, "max_exit_rate_difference_vs_dense": worst_rate}


def interpolate_baseline(baselines: list[dict], flops: float) -> float | None:
    """Baseline accuracy at ``flops``, linear in log-FLOPs between the two nearest baselines (None outside)."""
    pts = sorted((b["flops"], b["accuracy"]) for b in baselines)
    for (f0, a0), (f1, a1) in itertools.pairwise(pts):
        if f0 <= flops <= f1 and f1 > f0:
            t = (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return a0 + t * (a1 - a0)
    return None


def summarise(
    args, cache, sweep, baselines, flops, phase_results, classes, checks, compute_seconds, world_size
) -> dict[str, Any]:
    """Everything the table, the JSON and the figures need."""
    k = args.num_experts
    y, choice = cache["labels"], cache["choice"]
    lib_sweep = checks["sweep"]
    no_exit = lib_sweep[0]
    oracle = float((cache["expert_pred"] == y[:, None]).any(1).float().mean())
    right = cache["expert_pred"] == y[:, None]  # [N, K]
    per_expert_acc = right.float().mean(0).tolist()
    routed_right = right.gather(1, choice[:, None]).squeeze(1)  # [N]
    disputed = right.any(1) & ~right.all(1)  # some experts right, some wrong: where routing matters
    routing = {
        "routed_correct_given_oracle": float(routed_right[right.any(1)].float().mean()) if right.any() else None,
        "disputed_fraction": float(disputed.float().mean()),
        "routed_correct_when_disputed": float(routed_right[disputed].float().mean()) if disputed.any() else None,
        "random_routing_when_disputed": float(right[disputed].float().mean()) if disputed.any() else None,
    }
    load = torch.bincount(choice, minlength=k)
    class_expert = torch.zeros(len(classes), k, dtype=torch.long)
    class_expert.index_put_((y, choice), torch.ones_like(y), accumulate=True)
    full_flops = flops["delegator"] + flops["expert"]
    curve = [s for s in lib_sweep[1:]]
    if args.exit_threshold is not None:
        chosen = _sweep_at(args, lib_sweep, args.exit_threshold)
        rule = "given by --exit-threshold"
    else:
        ok = [s for s in curve if s["accuracy"] >= no_exit["accuracy"] - 0.003 - 1e-12]
        chosen = min(ok, key=lambda s: s["flops_per_sample"]) if ok else None
        rule = "lowest-FLOPs threshold of the sweep within 0.3 points of no exit, chosen on the test set"
    matched = next((b for b in baselines if b.get("matched")), None)
    interp = interpolate_baseline(baselines, full_flops)
    expert_base = next((b for b in baselines if b["name"] == _expert_name(args)), None)
    summary: dict[str, Any] = {
        "config": {k2: v for k2, v in vars(args).items() if k2 != "threshold_list"},
        "world_size": world_size,
        "compute_seconds": round(compute_seconds, 1),
        "num_test": int(y.numel()),
        "flops": {"delegator": flops["delegator"], "expert": flops["expert"], "coe_no_exit": full_flops},
        "coe": {
            "accuracy": no_exit["accuracy"],
            "flops_per_sample": no_exit["flops_per_sample"],
            "oracle_accuracy": oracle,
            "per_expert_accuracy": per_expert_acc,
            "load": load.tolist(),
            "class_expert_counts": class_expert.tolist(),
            "routing": routing,
            "rough_accuracy": float((cache["rough_pred"] == y).float().mean()),
        },
        "exit": None
        if chosen is None
        else dict(
            chosen,
            rule=rule,
            flops_saving=1.0 - chosen["flops_per_sample"] / full_flops,
            accuracy_drop=no_exit["accuracy"] - chosen["accuracy"],
        ),
        "sweep": lib_sweep,
        "baselines": baselines,
        "comparison": {
            "baseline_same_schedule_expert": expert_base["accuracy"] if expert_base else None,
            "flops_matched_baseline": matched,
            "baseline_interpolated_at_coe_flops": interp,
            "baseline_interpolated_at_exit_flops": None
            if chosen is None
            else interpolate_baseline(baselines, chosen["flops_per_sample"]),
        },
        "phases": phase_results,
        "checks": {k2: v for k2, v in checks.items() if k2 != "sweep"},
        "classes": list(classes),
    }
    summary["table_markdown"] = table_markdown(summary)
    return summary


def _expert_name(args) -> str:
    return f"cnn@{args.expert_width:g}" if args.expert == "cnn" else args.expert


def _sweep_at(args, sweep, threshold):
    for s in sweep:
        if s["threshold"] is not None and abs(s["threshold"] - threshold) < 1e-12:
            return s
    raise ValueError(f"--exit-threshold {threshold} is not among --thresholds")


def _signed(x: float) -> str:
    return f"{x:+.2f}" if round(x, 2) != 0 else "0.00"


def _m(flops: float | None) -> str:
    return "-" if flops is None else f"{flops / 1e6:.2f}"


def _p(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.2f}"


def table_markdown(s: dict) -> str:
    a = s["config"]
    rows = [("model", "top-1 (%)", "MFLOPs / sample", "exit rate", "notes")]
    for b in s["baselines"]:
        note = "single network, same epochs and schedule as the expert"
        if b["name"] == _expert_name(argparse_like(a)):
            note = "the expert architecture alone (universal expert trained on)"
        if b.get("matched"):
            note = "single network with the FLOPs of the CoE without exit"
        rows.append((f"baseline {b['name']}", _p(b["accuracy"]), _m(b["flops"]), "-", note))
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
            f"CoE K={a['num_experts']}, no exit",
            _p(s["coe"]["accuracy"]),
            _m(s["flops"]["coe_no_exit"]),
            "0%",
            "delegator + 1 routed expert",
        )
    )
    e = s["exit"]
    if e is not None:
        rows.append(
            (
                f"CoE K={a['num_experts']}, exit >= {e['threshold']:g}",
                _p(e["accuracy"]),
                _m(e["flops_per_sample"]),
                f"{100 * e['exit_rate']:.1f}%",
                f"-{100 * e['flops_saving']:.1f}% FLOPs, {_signed(-100 * e['accuracy_drop'])} pt vs no exit",
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
    c = s["comparison"]
    notes = []
    ref = c["flops_matched_baseline"]
    if ref is not None:
        notes.append(
            f"CoE (no exit) vs the FLOPs-matched single network {ref['name']}: "
            f"{100 * (s['coe']['accuracy'] - ref['accuracy']):+.2f} points"
        )
    if c["baseline_interpolated_at_coe_flops"] is not None:
        notes.append(
            f"CoE (no exit) vs the baselines interpolated at its FLOPs: "
            f"{100 * (s['coe']['accuracy'] - c['baseline_interpolated_at_coe_flops']):+.2f} points"
        )
    if c["baseline_same_schedule_expert"] is not None:
        notes.append(
            f"CoE (no exit) vs one expert trained on with the same schedule: "
            f"{100 * (s['coe']['accuracy'] - c['baseline_same_schedule_expert']):+.2f} points"
        )
    if e is not None and c.get("baseline_interpolated_at_exit_flops") is not None:
        notes.append(
            f"CoE with exit >= {e['threshold']:g} vs the baselines interpolated at its average FLOPs: "
            f"{100 * (e['accuracy'] - c['baseline_interpolated_at_exit_flops']):+.2f} points"
        )
    if e is not None:
        notes.append(
            f"early exit ({e['rule']}): FLOPs -{100 * e['flops_saving']:.1f}%, accuracy "
            f"{_signed(-100 * e['accuracy_drop'])} points vs no exit"
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
        f"{s['num_test']} test samples; training wall time (sum of the epochs) "
        f"{s['compute_seconds']:.0f}s on "
        f"{s['world_size']} process(es); FLOPs: torch.utils.flop_counter (a multiply-add = 2 FLOPs)"
    )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


class argparse_like:
    def __init__(self, d: dict):
        self.__dict__.update(d)


def write_outputs(summary: dict, out_dir: Path, figures: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text("# CoE example results\n\n" + summary["table_markdown"])
    (out_dir / "results.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k != "table_markdown"}, indent=1, default=float)
    )
    if figures:
        plot_accuracy_flops(summary, out_dir / "accuracy_vs_flops.png")
        plot_expert_load(summary, out_dir / "expert_load.png")


def plot_accuracy_flops(s: dict, path: Path) -> None:
    """Accuracy vs average inference FLOPs: baselines, the CoE's exit sweep, the oracle and the delegator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=130)
    b = s["baselines"]
    if b:
        ax.plot(
            [x["flops"] / 1e6 for x in b],
            [100 * x["accuracy"] for x in b],
            "o-",
            color="tab:gray",
            label="single networks (baselines)",
        )
        for x in b:
            ax.annotate(
                x["name"],
                (x["flops"] / 1e6, 100 * x["accuracy"]),
                textcoords="offset points",
                xytext=(4, -11),
                fontsize=7,
                color="tab:gray",
            )
    sw = [x for x in s["sweep"] if x["threshold"] is not None]
    sw.sort(key=lambda x: x["flops_per_sample"])
    k = s["config"]["num_experts"]
    ax.plot(
        [x["flops_per_sample"] / 1e6 for x in sw],
        [100 * x["accuracy"] for x in sw],
        ".-",
        color="tab:blue",
        label=f"CoE K={k}, early-exit sweep",
    )
    for x in sw[:: max(1, len(sw) // 5)]:
        ax.annotate(
            f"{x['threshold']:g}",
            (x["flops_per_sample"] / 1e6, 100 * x["accuracy"]),
            textcoords="offset points",
            xytext=(-8, 5),
            fontsize=7,
            color="tab:blue",
        )
    ax.plot(
        [s["flops"]["coe_no_exit"] / 1e6],
        [100 * s["coe"]["accuracy"]],
        "*",
        ms=13,
        color="tab:blue",
        label=f"CoE K={k}, no exit",
    )
    if s["exit"] is not None:
        ax.plot(
            [s["exit"]["flops_per_sample"] / 1e6],
            [100 * s["exit"]["accuracy"]],
            "D",
            ms=7,
            mfc="none",
            color="tab:red",
            label=f"CoE, exit >= {s['exit']['threshold']:g}",
        )
    ax.plot(
        [s["flops"]["delegator"] / 1e6],
        [100 * s["coe"]["rough_accuracy"]],
        "v",
        color="tab:green",
        label="delegator alone (rough head)",
    )
    ax.axhline(
        100 * s["coe"]["oracle_accuracy"],
        ls="--",
        color="tab:orange",
        lw=1,
        label="oracle of the expert pool (upper bound)",
    )
    ax.set_xscale("log")  # straight segments = the log-FLOPs interpolation used in the table's notes
    from matplotlib.ticker import FormatStrFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("average inference MFLOPs per sample (torch.utils.flop_counter, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ds = s["config"]["dataset"]
    ax.set_title(f"CoE on {ds}: accuracy vs FLOPs ({s['num_test']} test images)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
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
