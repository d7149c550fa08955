"""The figures of the CoE recipe: accuracy against FLOPs, and the experts' load with the class x expert matrix.

Both read the summary that :func:`examples.imagenet.report.summarise` builds; :func:`place_labels` puts the
labels of crowded points where they overlap neither each other nor the markers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from examples.imagenet.report import threshold_label

__all__ = ["place_labels", "plot_accuracy_flops", "plot_expert_load"]

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
    occupied = _occupied_boxes(ax, renderer, markers, marker_px)
    placed = []
    for it in items:
        chosen = _free_spot(ax, renderer, it, occupied)
        if chosen is None and it.get("required", True):
            text = _annotate(ax, it, *_OFFSETS[0])
            bb = text.get_window_extent(renderer)
            chosen = (text, (bb.x0, bb.y0, bb.x1, bb.y1))
        if chosen is not None:
            occupied.append(chosen[1])
            placed.append(chosen[0])
    return placed


def _occupied_boxes(ax, renderer, markers: list[tuple[float, float]], marker_px: float) -> list[tuple]:
    """The pixel boxes labels must avoid: the legend's and one per marker."""
    occupied = []
    legend = ax.get_legend()
    if legend is not None:
        lb = legend.get_window_extent(renderer)
        occupied.append((lb.x0, lb.y0, lb.x1, lb.y1))
    for mx, my in markers:
        px, py = ax.transData.transform((mx, my))
        occupied.append((px - marker_px, py - marker_px, px + marker_px, py + marker_px))
    return occupied


def _free_spot(ax, renderer, item: dict, occupied: list[tuple]):
    """The label of ``item`` at the first offset where it stays inside the axes and overlaps no occupied box, as
    ``(text, box)``; None when there is none."""
    axes_box = ax.get_window_extent(renderer)
    for dx, dy in _OFFSETS:
        text = _annotate(ax, item, dx, dy)
        bb = text.get_window_extent(renderer)
        box = (bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1)
        inside = axes_box.x0 <= box[0] and box[2] <= axes_box.x1 and axes_box.y0 <= box[1] and box[3] <= axes_box.y1
        if inside and not any(_overlaps(box, o) for o in occupied):
            return text, box
        text.remove()
    return None


def _annotate(ax, item: dict, dx: float, dy: float):
    return ax.annotate(
        item["text"],
        (item["x"], item["y"]),
        textcoords="offset points",
        xytext=(dx, dy),
        ha="left" if dx > 0 else ("right" if dx < 0 else "center"),
        fontsize=7,
        color=item["color"],
        bbox=_LABEL_BOX,
    )


def _overlaps(a: tuple, b: tuple) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_flops(s: dict, path: Path) -> None:
    """Accuracy vs average inference FLOPs on the test set: single networks, the CoE's and the cascade's exit
    curves with their validation-calibrated points, the delegator alone and the oracle."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.4, 4.8), dpi=130)
    markers, labels = _plot_single_networks(ax, s)
    sweep_markers, threshold_labels = _plot_exit_curves(ax, s)
    markers += sweep_markers + _plot_operating_points(ax, s)
    _label_axes(ax, s)
    fig.tight_layout()
    place_labels(ax, labels + threshold_labels, markers)
    fig.savefig(path)
    plt.close(fig)


def _plot_single_networks(ax, s: dict) -> tuple[list[tuple[float, float]], list[dict]]:
    """The single networks as one line; returns their markers and their (always placed) name labels."""
    b = s["baselines"]
    if not b:
        return [], []
    xs, ys = [x["flops"] / 1e6 for x in b], [100 * x["accuracy"] for x in b]
    ax.plot(xs, ys, "o-", color="tab:gray", label="single networks", zorder=3)
    labels = [{"x": x, "y": y, "text": n["name"], "color": "dimgray", "required": True} for x, y, n in zip(xs, ys, b)]
    return list(zip(xs, ys)), labels


def _plot_exit_curves(ax, s: dict) -> tuple[list[tuple[float, float]], list[dict]]:
    """The test curves of the cascade and the CoE over every threshold, and the CoE's labelled thresholds (their
    labels are dropped where they would collide)."""

    def curve(points):
        pts = sorted((p["flops_per_sample"] / 1e6, 100 * p["accuracy"]) for p in points)
        return [x for x, _ in pts], [y for _, y in pts]

    k = s["config"]["num_experts"]
    xs, ys = curve(s["curves"]["cascade"]["test"])
    ax.plot(xs, ys, "--", color="tab:purple", lw=1, label="cascade (rough head + single network), exit sweep")
    xs, ys = curve(s["curves"]["coe"]["test"])
    ax.plot(xs, ys, "-", color="tab:blue", lw=1.2, label=f"CoE K={k}, exit sweep")
    sweep = [p for p in s["sweep"] if p["threshold"] is not None]
    sx, sy = [p["flops_per_sample"] / 1e6 for p in sweep], [100 * p["accuracy"] for p in sweep]
    ax.plot(sx, sy, ".", color="tab:blue", ms=4)
    labels = [
        {"x": x, "y": y, "text": f"{p['threshold']:g}", "color": "tab:blue", "required": False}
        for x, y, p in zip(sx, sy, sweep)
    ]
    return list(zip(sx, sy)), labels


def _plot_operating_points(ax, s: dict) -> list[tuple[float, float]]:
    """The CoE without exit, the CoE's and the cascade's validation-calibrated exits, the delegator alone, and the
    oracle's line; returns the points' markers."""
    k = s["config"]["num_experts"]
    no_exit = (s["coe"]["flops_per_sample"] / 1e6, 100 * s["coe"]["accuracy"])
    ax.plot(*no_exit, "*", ms=12, color="tab:blue", label=f"CoE K={k}, no exit", zorder=4)
    markers = [no_exit]
    for name, ex, color, marker in (
        (f"CoE, exit >= {threshold_label(s['exit']['threshold'])} (val-calibrated)", s["exit"], "tab:red", "D"),
        (
            f"cascade, exit >= {threshold_label(s['cascade']['exit']['threshold'])} (val-calibrated)",
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
    return markers


def _label_axes(ax, s: dict) -> None:
    from matplotlib.ticker import FormatStrFormatter

    ax.set_xscale("log")  # straight segments = the log-FLOPs interpolation used in the table's notes
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("average inference MFLOPs per sample (torch.utils.flop_counter, log scale)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(
        f"CoE on {s['config']['dataset']}: accuracy vs FLOPs ({s['num_test']} test images; thresholds chosen on "
        f"{s['num_val']} validation images)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right")


def plot_expert_load(s: dict, path: Path) -> None:
    """Expert load (bar chart) and the class x expert routing matrix (heat map), on the test set, no exit."""
    plt = _pyplot()

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
