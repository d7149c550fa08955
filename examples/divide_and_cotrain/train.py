"""Divide-and-Co-training on Fashion-MNIST: S = 1, 2, 4 small CNNs at equal total parameters, over seeds.

Zhao et al., *Towards Better Accuracy-efficiency Trade-offs: Divide and Co-training*, IEEE TIP 2022
(arXiv 2011.14660). For each S, a CNN of width ``--base-width`` is divided into S CNNs with about 1/S of
its parameters each (:func:`pycoe.cotrain.divide_by_factory`), which are co-trained on S independently
augmented views (:class:`pycoe.cotrain.MultiViewDataset`) with the cross-entropies plus a warmed-up
Jensen-Shannon co-training loss (:class:`pycoe.cotrain.CoTrainingLoss`), and evaluated as a mean-of-logits
ensemble (:class:`pycoe.cotrain.CoTrainingEnsemble`) and member by member.

Discipline: ``--val-size`` images are carved out of the training data (a fixed random split, the same for
every seed) and never trained on; the one choice the run makes, which epoch's weights to keep
(``--keep best``: the highest validation ensemble accuracy), is made on them. The test set is used once per
configuration, for the final numbers. ``--seeds 0 1 2`` repeats everything per seed and reports the mean and
standard deviation of every table entry, plus the paired differences S = 2 and S = 4 minus S = 1 per seed.

Offline: reads the IDX files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) with :mod:`examples.common.fashion_mnist`; the network is
:class:`examples.common.cnn.ThreeConvCNN`; ``--dataset synthetic`` needs no files.

Example, from the repository root::

    python -m examples.divide_and_cotrain.train --splits 1 2 4 --epochs 3 --train-subset 20000 \\
        --seeds 0 1 2 --threads 1 --out runs/divide_and_cotrain

Writes ``<out>/results.json``, ``<out>/results.md`` and ``<out>/accuracy_vs_splits.png``; each seed's runs
go to ``<out>/seed<k>/S<s>/`` with a checkpoint per epoch (atomic); ``--resume`` continues exactly where a
run stopped (same data order, augmentations and weights as an uninterrupted run).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit(
        "run the example as a module from the repository root: python -m examples.divide_and_cotrain.train"
    )

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

from examples.common.cnn import ThreeConvCNN
from examples.common.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from pycoe.checkpoint import load_checkpoint, save_checkpoint
from pycoe.cotrain.ensemble import CoTrainingEnsemble, CoTrainingLoss
from pycoe.cotrain.schedule import LinearWarmup, scale_weight_decay
from pycoe.cotrain.views import MultiViewDataset, multiview_collate
from pycoe.cotrain.width import count_parameters, divide_by_factory

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
class ImageSet(Dataset):
    """Normalised ``Tensor[N, 1, 28, 28]`` images and ``LongTensor[N]`` labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def fashion_mnist(data_dir: str | Path | None) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST's ``(train, test)``, normalised with the training set's mean and standard deviation."""
    sets = []
    for split in load_fashion_mnist(data_dir):
        x = split.images.float().div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
        sets.append(ImageSet(x, split.labels))
    return sets[0], sets[1]


def synthetic_data(num_train: int, num_test: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Ten classes, each a fixed random 28x28 template plus noise: learnable, needs no files."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 1, 28, 28, generator=g)

    def make(n: int) -> ImageSet:
        labels = torch.randint(0, 10, (n,), generator=g)
        return ImageSet(templates[labels] + 1.0 * torch.randn(n, 1, 28, 28, generator=g), labels)

    return make(num_train), make(num_test)


def augment(x: torch.Tensor) -> torch.Tensor:
    """One random view of ``Tensor[1, 28, 28]``: 2-pixel-padded random crop and horizontal flip."""
    padded = F.pad(x, (2, 2, 2, 2))
    i, j = torch.randint(0, 5, (2,)).tolist()
    view = padded[:, i : i + 28, j : j + 28]
    if torch.rand(()) < 0.5:
        view = view.flip(-1)
    return view


# ----------------------------------------------------------------------------------------------------------
# Training one configuration
# ----------------------------------------------------------------------------------------------------------
def split_train_val(num_images: int, val_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of ``range(num_images)``: (training indices, validation indices), disjoint."""
    if not 0 <= val_size < num_images:
        raise SystemExit(f"--val-size must be in [0, {num_images}) for {num_images} training images, got {val_size}")
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(split_seed))
    return perm[val_size:], perm[:val_size]


def subset(data: ImageSet, indices: torch.Tensor) -> ImageSet:
    return ImageSet(data.images[indices], data.labels[indices])


def _bar(iterable, enabled: bool, **kwargs):
    if enabled and tqdm is not None:
        return tqdm(iterable, **kwargs)
    return iterable


@torch.no_grad()
def evaluate(ensemble: CoTrainingEnsemble, dataset: ImageSet, batch_size: int, progress: bool) -> dict:
    ensemble.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct_members = torch.zeros(ensemble.num_members, dtype=torch.long)
    correct_ensemble, total = 0, 0
    for x, y in _bar(loader, progress, desc="  eval", leave=False):
        out = ensemble(x, return_members=True)
        correct_members += (out.member_outputs.argmax(-1) == y).sum(dim=1)
        correct_ensemble += int((out.ensemble.argmax(-1) == y).sum())
        total += len(y)
    return {
        "ensemble_acc": correct_ensemble / total,
        "member_accs": (correct_members.double() / total).tolist(),
    }


@dataclass
class Configuration:
    """What one configuration trains: S members divided from the undivided CNN, their ensemble and its loss, the
    optimizer and schedule, and the training set's S-view version."""

    num_splits: int
    seed: int
    members: list
    ensemble: CoTrainingEnsemble
    weight_decay: float
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: CoTrainingLoss
    train_views: MultiViewDataset

    @property
    def width(self) -> int:
        return self.members[0].features[0].out_channels


@dataclass
class Progress:
    """Where training stands: epochs done, optimizer steps, per-epoch history, the training time and (``--keep
    best``) the weights of the best epoch on validation so far; all of it checkpointed."""

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    best: dict | None = None


def build_configuration(num_splits: int, seed: int, args, train_set: ImageSet) -> Configuration:
    """The members (seeded by ``seed`` and S), their ensemble, SGD with the divided weight decay, a cosine schedule
    and the co-training loss with its linear warm-up."""
    torch.manual_seed(1000 * seed + num_splits)
    members = divide_by_factory(ThreeConvCNN, num_splits, base_width=args.base_width, integer=True)
    ensemble = CoTrainingEnsemble(members, combine="mean_logits")
    wd = scale_weight_decay(args.weight_decay, num_splits)
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=wd)
    train_views = MultiViewDataset(train_set, augment, num_views=num_splits)
    steps_per_epoch = math.ceil(len(train_views) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    loss_fn = CoTrainingLoss(
        args.divergence, weight=LinearWarmup(int(args.cot_warmup_epochs * steps_per_epoch), args.cot_weight, 0.0)
    )
    return Configuration(num_splits, seed, members, ensemble, wd, optimizer, scheduler, loss_fn, train_views)


def resume(config: Configuration, ckpt_path: Path) -> Progress:
    """Restore the ensemble, optimizer, schedule, RNG state and progress of the checkpoint at ``ckpt_path``."""
    state = load_checkpoint(ckpt_path)
    config.ensemble.load_state_dict(state["model"])
    config.optimizer.load_state_dict(state["optimizer"])
    config.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return Progress(state["epoch"], state["step"], state["history"], state["train_seconds"], state["best"])


def save(config: Configuration, progress: Progress, ckpt_path: Path) -> None:
    """Checkpoint (atomically) everything :func:`resume` restores."""
    save_checkpoint(
        {
            "model": config.ensemble.state_dict(),
            "optimizer": config.optimizer.state_dict(),
            "scheduler": config.scheduler.state_dict(),
            "epoch": progress.epoch,
            "step": progress.step,
            "history": progress.history,
            "train_seconds": progress.train_seconds,
            "best": progress.best,
            "rng": torch.get_rng_state(),
        },
        ckpt_path,
    )


def train_epoch(config: Configuration, progress: Progress, args, tag: str) -> dict:
    """One epoch of co-training on S views (its data order depends only on the seed and the epoch, so a resumed
    run sees the same batches); returns the epoch's means of the losses and the training ensemble accuracy."""
    ensemble, epoch = config.ensemble, progress.epoch
    ensemble.train()
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    loader = DataLoader(
        config.train_views,
        batch_size=args.batch_size,
        sampler=RandomSampler(config.train_views, generator=generator),
        collate_fn=multiview_collate,
    )
    t0 = time.perf_counter()
    sums = {"loss": 0.0, "ce": 0.0, "cot": 0.0, "correct": 0, "n": 0}
    bar = _bar(loader, args.progress, desc=f"{tag} epoch {epoch + 1}/{args.epochs}", leave=False)
    for views, target in bar:
        out = ensemble(views)
        loss, info = config.loss_fn(out, target, step=progress.step)
        config.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        config.optimizer.step()
        config.scheduler.step()
        progress.step += 1
        n = len(target)
        sums["loss"] += float(loss.detach()) * n
        sums["ce"] += info["ce"] * n
        sums["cot"] += info["cot"] * n
        sums["correct"] += int((out.ensemble.argmax(-1) == target).sum())
        sums["n"] += n
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", cot=f"{info['cot']:.3f}", w=f"{info['weight']:.2f}")
        if args.max_steps and progress.step >= args.max_steps * (epoch + 1):
            break
    progress.train_seconds += time.perf_counter() - t0
    return {
        "epoch": epoch + 1,
        "loss": sums["loss"] / sums["n"],
        "ce": sums["ce"] / sums["n"],
        "cot": sums["cot"] / sums["n"],
        "train_acc": sums["correct"] / sums["n"],
    }


def validate(config: Configuration, progress: Progress, record: dict, val_set: ImageSet, args) -> None:
    """The validation ensemble and member accuracies into ``record``; with ``--keep best``, a copy of the weights
    when this epoch is the best so far."""
    val = evaluate(config.ensemble, val_set, args.eval_batch_size, args.progress)
    record["val_acc"], record["val_member_accs"] = val["ensemble_acc"], val["member_accs"]
    if args.keep == "best" and (progress.best is None or record["val_acc"] > progress.best["val_acc"]):
        weights = {k: v.detach().clone() for k, v in config.ensemble.state_dict().items()}
        progress.best = {"epoch": record["epoch"], "val_acc": record["val_acc"], "model": weights}


def evaluate_kept(config: Configuration, progress: Progress, test_set: ImageSet, args) -> dict:
    """The kept epoch's weights (the best on validation with ``--keep best``, else the last) on the test set."""
    kept_epoch = args.epochs
    if progress.best is not None:
        config.ensemble.load_state_dict(progress.best["model"])
        kept_epoch = progress.best["epoch"]
    t0 = time.perf_counter()
    metrics = evaluate(config.ensemble, test_set, args.eval_batch_size, args.progress)
    accs = metrics["member_accs"]
    return {
        "S": config.num_splits,
        "seed": config.seed,
        "width": config.width,
        "params_per_member": count_parameters(config.members[0]),
        "params_total": count_parameters(config.ensemble),
        "weight_decay": config.weight_decay,
        "epochs": args.epochs,
        "kept_epoch": kept_epoch,
        "val_acc": progress.history[kept_epoch - 1].get("val_acc"),
        "train_seconds": progress.train_seconds,
        "eval_seconds": time.perf_counter() - t0,
        "history": progress.history,
        **metrics,
        "mean_member_acc": sum(accs) / config.num_splits,
        "min_member_acc": min(accs),
        "max_member_acc": max(accs),
    }


def train_config(num_splits: int, seed: int, args, data: dict[str, ImageSet], run_dir: Path) -> dict | None:
    """Train S = ``num_splits`` members with ``seed``; keep the epoch chosen on validation; test once.

    Returns the configuration's result (also written to ``run_dir/result.json``), or None when
    ``--stop-after-epoch`` stopped it (checkpointed, to be continued by ``--resume``).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, result_path = run_dir / "checkpoint.pt", run_dir / "result.json"
    tag = f"seed {seed} S={num_splits}"
    if args.resume and result_path.exists():
        result = json.loads(result_path.read_text())
        if result.get("epochs") == args.epochs:
            print(f"{tag}: finished earlier, reusing {result_path}")
            return result
    config = build_configuration(num_splits, seed, args, data["train"])
    progress = Progress()
    if args.resume and ckpt_path.exists():
        progress = resume(config, ckpt_path)
        print(f"{tag}: resumed from {ckpt_path} after epoch {progress.epoch}")
    print(
        f"{tag}: {num_splits} x ThreeConvCNN(width={config.width}), {count_parameters(config.members[0]):,} "
        f"parameters each, weight decay {config.weight_decay:.2e}"
    )
    while progress.epoch < args.epochs:
        record = train_epoch(config, progress, args, tag)
        if len(data["val"]):
            validate(config, progress, record, data["val"], args)
        progress.history.append(record)
        progress.epoch += 1
        print(
            f"{tag} epoch {progress.epoch}: loss {record['loss']:.4f} (ce {record['ce']:.4f}, "
            f"cot {record['cot']:.4f}), train ensemble acc {record['train_acc']:.4f}"
            + (f", validation ensemble acc {record['val_acc']:.4f}" if "val_acc" in record else "")
        )
        save(config, progress, ckpt_path)
        if args.stop_after_epoch and args.stop_after_epoch <= progress.epoch < args.epochs:
            print(f"{tag}: stopping after epoch {progress.epoch} as asked; continue with --resume")
            return None
    result = evaluate_kept(config, progress, data["test"], args)
    result_path.write_text(json.dumps(result, indent=2))
    print(
        f"{tag}: kept epoch {result['kept_epoch']}; test ensemble acc {result['ensemble_acc']:.4f}, members "
        + ", ".join(f"{a:.4f}" for a in result["member_accs"])
    )
    return result


# ----------------------------------------------------------------------------------------------------------
# Report: mean +- standard deviation over seeds, and paired differences against S = 1
# ----------------------------------------------------------------------------------------------------------
SUMMARISED = (
    "kept_epoch",
    "val_acc",
    "ensemble_acc",
    "mean_member_acc",
    "min_member_acc",
    "max_member_acc",
    "train_seconds",
)


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (``None`` for a single value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std, "n": len(values)}


def aggregate(runs: list[dict]) -> list[dict]:
    """Per S: the architecture, and mean +- std over seeds of every entry in ``SUMMARISED``."""
    rows = []
    for i, first in enumerate(runs[0]["results"]):
        per_seed = [run["results"][i] for run in runs]
        row = {key: first[key] for key in ("S", "width", "params_per_member", "params_total")}
        for key in SUMMARISED:
            values = [r[key] for r in per_seed if r.get(key) is not None]
            row[key] = mean_std(values) if values else None
        rows.append(row)
    return rows


def paired_differences(runs: list[dict]) -> list[dict]:
    """Per S != 1 and seed: ensemble (and mean member) test accuracy of S minus that of S = 1, same seed."""
    out = []
    splits = [r["S"] for r in runs[0]["results"]]
    if 1 not in splits:
        return out
    for s in splits:
        if s == 1:
            continue
        for key in ("ensemble_acc", "mean_member_acc"):
            per_seed = {}
            for run in runs:
                by_s = {r["S"]: r for r in run["results"]}
                per_seed[run["seed"]] = by_s[s][key] - by_s[1][key]
            out.append(
                {
                    "comparison": f"S={s} minus S=1",
                    "metric": key,
                    "per_seed": per_seed,
                    **mean_std(list(per_seed.values())),
                }
            )
    return out


def _pm(stat: dict | None, scale: float = 100.0, digits: int = 2, unit: str = "%") -> str:
    if stat is None:
        return "-"
    text = f"{scale * stat['mean']:.{digits}f}"
    if stat["std"] is not None:
        text += f" ± {scale * stat['std']:.{digits}f}"
    return text + unit


def markdown_report(runs: list[dict], rows: list[dict], diffs: list[dict]) -> str:
    seeds = [run["seed"] for run in runs]
    lines = [
        f"Mean ± sample standard deviation over {len(seeds)} seed(s) {seeds}; test accuracies at the epoch kept on "
        "validation.",
        "",
        "| S | width | params / member | total params | kept epoch | val ensemble acc | test ensemble acc "
        "| test members: mean | worst member | best member | train time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['S']} | {r['width']} | {r['params_per_member']:,} | {r['params_total']:,} "
            f"| {_pm(r['kept_epoch'], 1, 1, '')} | {_pm(r['val_acc'])} | {_pm(r['ensemble_acc'])} "
            f"| {_pm(r['mean_member_acc'])} | {_pm(r['min_member_acc'])} | {_pm(r['max_member_acc'])} "
            f"| {_pm(r['train_seconds'], 1, 0, ' s')} |"
        )
    if diffs:
        lines += [
            "",
            "Paired differences of test accuracy (points), same seed:",
            "",
            "| comparison | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
            "|---|---|" + "---|" * len(seeds) + "---|",
        ]
        for d in diffs:
            cells = " | ".join(f"{100 * d['per_seed'][s]:+.2f}" for s in seeds)
            lines.append(f"| {d['comparison']} | {d['metric']} | {cells} | {_pm(d, unit='')} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib not installed: no figure")
        return False
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    splits = [r["S"] for r in rows]
    means = [100 * r["ensemble_acc"]["mean"] for r in rows]
    stds = [100 * (r["ensemble_acc"]["std"] or 0.0) for r in rows]
    ax.errorbar(splits, means, yerr=stds, fmt="o-", color="C0", capsize=3, label="ensemble (mean ± std)")
    first = True
    for run in runs:
        for r in run["results"]:
            accs = [100 * a for a in r["member_accs"]]
            ax.scatter([r["S"]] * len(accs), accs, marker="x", color="C1", label="members" if first else None)
            first = False
    ax.set_xscale("log", base=2)
    ax.set_xticks(splits, [str(s) for s in splits])
    ax.set_xlabel("S (number of members, equal total parameters)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Divide-and-Co-training, Fashion-MNIST, {len(runs)} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.divide_and_cotrain.train", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=["fashion-mnist", "synthetic"], default="fashion-mnist")
    p.add_argument(
        "--data-dir",
        default=None,
        help="a directory with Fashion-MNIST's four IDX files (default: the Debian package's "
        "/usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4], help="values of S to train")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full run per seed; mean ± std reported")
    p.add_argument("--base-width", type=int, default=32, help="width of the undivided CNN (S = 1)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="of the undivided net; scaled by exp(1/S-1)")
    p.add_argument("--divergence", choices=["js", "pairwise_kl"], default="js", help="the co-training term")
    p.add_argument("--cot-weight", type=float, default=0.5)
    p.add_argument("--cot-warmup-epochs", type=float, default=1.0)
    p.add_argument(
        "--val-size", type=int, default=5000, help="training images held out for validation (never trained on)"
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split (same for all seeds)")
    p.add_argument(
        "--keep",
        choices=["best", "last"],
        default="best",
        help="which epoch's weights are tested: the best on validation, or the last",
    )
    p.add_argument("--train-subset", type=int, default=0, help="train on N of the non-validation images (0: all)")
    p.add_argument("--test-subset", type=int, default=0, help="use the first N test images (0: all)")
    p.add_argument("--synthetic-size", type=int, nargs=2, default=[512, 256], metavar=("TRAIN", "TEST"))
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (smoke tests)")
    p.add_argument(
        "--stop-after-epoch",
        type=int,
        default=0,
        help="stop each configuration after this epoch (checkpointed; as if interrupted), to be continued by --resume",
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--out", default="runs/divide_and_cotrain")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    return p


def load_data(args) -> dict[str, ImageSet]:
    """The training, validation and test sets (the validation set is carved out of the training data)."""
    if args.dataset == "synthetic":
        train_set, test_set = synthetic_data(*args.synthetic_size, seed=args.split_seed)
    else:
        train_set, test_set = fashion_mnist(args.data_dir)
    train_idx, val_idx = split_train_val(len(train_set), args.val_size, args.split_seed)
    if args.train_subset:
        train_idx = train_idx[: args.train_subset]
    if args.test_subset:
        test_set = ImageSet(test_set.images[: args.test_subset], test_set.labels[: args.test_subset])
    return {"train": subset(train_set, train_idx), "val": subset(train_set, val_idx), "test": test_set}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked (``SystemExit`` with the option's name)."""
    args = build_parser().parse_args(argv)
    if any(s < 1 for s in args.splits):
        raise SystemExit(f"--splits must be positive integers, got {args.splits}")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        raise SystemExit(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    if args.keep == "best" and args.val_size == 0:
        raise SystemExit("--keep best chooses the epoch on the validation split: give --val-size > 0 or --keep last")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train every S for every seed, then write the aggregate over seeds (JSON, markdown, figure) and print it."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_data(args)
    print(
        f"{args.dataset}: {len(data['train'])} training / {len(data['val'])} validation / {len(data['test'])} test "
        f"images; {torch.get_num_threads()} threads"
    )

    start, load_start = time.perf_counter(), os.getloadavg()
    runs, stopped = [], False
    for seed in args.seeds:
        results = [train_config(s, seed, args, data, out_dir / f"seed{seed}" / f"S{s}") for s in args.splits]
        stopped = stopped or any(r is None for r in results)
        runs.append({"seed": seed, "results": [r for r in results if r is not None]})
    if stopped:
        return {"stopped": True, "runs": runs}
    hardware = (
        f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"
    )
    rows, diffs = aggregate(runs), paired_differences(runs)
    summary = {
        "command": " ".join(["python -m examples.divide_and_cotrain.train", *(sys.argv[1:] if argv is None else argv)]),
        "dataset": args.dataset,
        "train_images": len(data["train"]),
        "val_images": len(data["val"]),
        "test_images": len(data["test"]),
        "seeds": args.seeds,
        "keep": args.keep,
        "wall_seconds": time.perf_counter() - start,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "hardware": hardware,
        "aggregate": rows,
        "paired_differences": diffs,
        "runs": runs,
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    report = markdown_report(runs, rows, diffs)
    (out_dir / "results.md").write_text(report)
    plot(runs, rows, out_dir / "accuracy_vs_splits.png")
    print(report)
    print(f"wall time {summary['wall_seconds']:.0f} s; load average {load_start} -> {summary['load_average_end']}")
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'accuracy_vs_splits.png'}")
    return summary


if __name__ == "__main__":
    main()
