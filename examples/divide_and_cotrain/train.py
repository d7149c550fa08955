"""Divide-and-Co-training on Fashion-MNIST: S = 1, 2, 4 small CNNs at equal total parameters.

Zhao et al., *Towards Better Accuracy-efficiency Trade-offs: Divide and Co-training*, IEEE TIP 2022
(arXiv 2011.14660). For each S, a CNN of width ``--base-width`` is divided into S CNNs with about 1/S of
its parameters each (:func:`pycoe.cotrain.divide_by_factory`), which are co-trained on S independently
augmented views (:class:`pycoe.cotrain.MultiViewDataset`) with the cross-entropies plus a warmed-up
Jensen-Shannon co-training loss (:class:`pycoe.cotrain.CoTrainingLoss`), and evaluated as a mean-of-logits
ensemble (:class:`pycoe.cotrain.CoTrainingEnsemble`) and member by member.

Offline: reads the IDX files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) with the small reader below; ``--dataset synthetic`` needs no files.

Example::

    python examples/divide_and_cotrain/train.py --splits 1 2 4 --epochs 3 --train-subset 10000 \\
        --out runs/divide_and_cotrain

Writes ``<out>/results.json``, ``<out>/results.md`` and ``<out>/accuracy_vs_splits.png``; checkpoints
every epoch to ``<out>/S<k>/checkpoint.pt`` (atomically); ``--resume`` continues exactly where a run
stopped (same data order, augmentations and weights as an uninterrupted run).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from pycoe.checkpoint import load_checkpoint, save_checkpoint
from pycoe.cotrain.ensemble import CoTrainingEnsemble, CoTrainingLoss
from pycoe.cotrain.schedule import LinearWarmup, scale_weight_decay
from pycoe.cotrain.views import MultiViewDataset, multiview_collate
from pycoe.cotrain.width import count_parameters, divide_by_factory

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed): big-endian magic, dims, then the array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{dtype_code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise ValueError(f"{path}: expected {math.prod(shape)} values for shape {shape}, found {array.size}")
    return array.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(
        f"{stem}[.gz] not found in {directory}; install the Debian package dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or pass --data-dir, or use --dataset synthetic"
    )


class ImageSet(Dataset):
    """Normalised ``Tensor[N, 1, 28, 28]`` images and ``LongTensor[N]`` labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def load_fashion_mnist(directory: str | Path) -> tuple[ImageSet, ImageSet]:
    directory = Path(directory)
    sets = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        x = (torch.from_numpy(images.copy()).float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
        sets.append(ImageSet(x, torch.from_numpy(labels.astype(np.int64))))
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
# Model
# ----------------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """A CPU-sized CNN whose channel widths are ``width``, ``2 width``, ``4 width``."""

    def __init__(self, width: int, num_classes: int = 10) -> None:
        super().__init__()
        w = int(width)
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),  # 14x14
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 7x7
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------------------
# Training one configuration
# ----------------------------------------------------------------------------------------------------------
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


def train_config(num_splits: int, args, train_set, test_set, out_dir: Path) -> dict | None:
    run_dir = out_dir / f"S{num_splits}"
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, result_path = run_dir / "checkpoint.pt", run_dir / "result.json"
    if args.resume and result_path.exists():
        result = json.loads(result_path.read_text())
        if result.get("epochs") == args.epochs:
            print(f"S={num_splits}: finished earlier, reusing {result_path}")
            return result

    torch.manual_seed(args.seed + num_splits)
    members = divide_by_factory(SmallCNN, num_splits, base_width=args.base_width, integer=True)
    width = members[0].features[0].out_channels
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
    start_epoch, step, history, train_seconds = 0, 0, [], 0.0
    if args.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        ensemble.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = state["epoch"], state["step"]
        history, train_seconds = state["history"], state["train_seconds"]
        torch.set_rng_state(state["rng"])
        print(f"S={num_splits}: resumed from {ckpt_path} after epoch {start_epoch}")

    print(
        f"S={num_splits}: {num_splits} x SmallCNN(width={width}), {count_parameters(members[0]):,} parameters each, "
        f"weight decay {wd:.2e}"
    )
    for epoch in range(start_epoch, args.epochs):
        ensemble.train()
        # the data order depends only on (seed, epoch), so a resumed run sees the same batches
        sampler = RandomSampler(train_views, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        loader = DataLoader(train_views, batch_size=args.batch_size, sampler=sampler, collate_fn=multiview_collate)
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "ce": 0.0, "cot": 0.0, "correct": 0, "n": 0}
        bar = _bar(loader, args.progress, desc=f"S={num_splits} epoch {epoch + 1}/{args.epochs}", leave=False)
        for views, target in bar:
            out = ensemble(views)
            loss, info = loss_fn(out, target, step=step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            n = len(target)
            sums["loss"] += float(loss.detach()) * n
            sums["ce"] += info["ce"] * n
            sums["cot"] += info["cot"] * n
            sums["correct"] += int((out.ensemble.argmax(-1) == target).sum())
            sums["n"] += n
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", cot=f"{info['cot']:.3f}", w=f"{info['weight']:.2f}")
            if args.max_steps and step >= args.max_steps * (epoch + 1):
                break
        train_seconds += time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "loss": sums["loss"] / sums["n"],
            "ce": sums["ce"] / sums["n"],
            "cot": sums["cot"] / sums["n"],
            "train_acc": sums["correct"] / sums["n"],
        }
        history.append(record)
        print(
            f"S={num_splits} epoch {epoch + 1}: loss {record['loss']:.4f} "
            f"(ce {record['ce']:.4f}, cot {record['cot']:.4f}), "
            f"train ensemble acc {record['train_acc']:.4f}"
        )
        save_checkpoint(
            {
                "model": ensemble.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "history": history,
                "train_seconds": train_seconds,
                "rng": torch.get_rng_state(),
            },
            ckpt_path,
        )
        if args.stop_after_epoch and epoch + 1 >= args.stop_after_epoch and epoch + 1 < args.epochs:
            print(f"S={num_splits}: stopping after epoch {epoch + 1} as asked; continue with --resume")
            return None

    t0 = time.perf_counter()
    metrics = evaluate(ensemble, test_set, args.eval_batch_size, args.progress)
    result = {
        "S": num_splits,
        "width": width,
        "params_per_member": count_parameters(members[0]),
        "params_total": count_parameters(ensemble),
        "weight_decay": wd,
        "epochs": args.epochs,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - t0,
        "history": history,
        **metrics,
    }
    result["mean_member_acc"] = sum(result["member_accs"]) / num_splits
    result_path.write_text(json.dumps(result, indent=2))
    print(
        f"S={num_splits}: test ensemble acc {result['ensemble_acc']:.4f}, members "
        + ", ".join(f"{a:.4f}" for a in result["member_accs"])
    )
    return result


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def markdown_table(results: list[dict]) -> str:
    lines = [
        "| S | width | params / member | total params | ensemble acc | members: mean (min-max) | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        accs = r["member_accs"]
        lines.append(
            f"| {r['S']} | {r['width']} | {r['params_per_member']:,} | {r['params_total']:,} | "
            f"{100 * r['ensemble_acc']:.2f}% | {100 * r['mean_member_acc']:.2f}% "
            f"({100 * min(accs):.2f}-{100 * max(accs):.2f}%) | {r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib not installed: no figure")
        return False
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    splits = [r["S"] for r in results]
    ax.plot(splits, [100 * r["ensemble_acc"] for r in results], "o-", color="C0", label="ensemble")
    for r in results:
        accs = [100 * a for a in r["member_accs"]]
        ax.scatter([r["S"]] * len(accs), accs, marker="x", color="C1", label="members" if r is results[0] else None)
    ax.set_xscale("log", base=2)
    ax.set_xticks(splits, [str(s) for s in splits])
    ax.set_xlabel("S (number of members, equal total parameters)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Divide-and-Co-training, Fashion-MNIST" if results else "")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=["fashion-mnist", "synthetic"], default="fashion-mnist")
    p.add_argument("--data-dir", default=FASHION_DIR)
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4], help="values of S to train")
    p.add_argument("--base-width", type=int, default=32, help="width of the undivided CNN (S = 1)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="of the undivided net; scaled by exp(1/S-1)")
    p.add_argument("--divergence", choices=["js", "pairwise_kl"], default="js", help="the co-training term")
    p.add_argument("--cot-weight", type=float, default=0.5)
    p.add_argument("--cot-warmup-epochs", type=float, default=1.0)
    p.add_argument("--train-subset", type=int, default=0, help="use the first N training images (0: all)")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/divide_and_cotrain")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if any(s < 1 for s in args.splits):
        raise SystemExit(f"--splits must be positive integers, got {args.splits}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.dataset == "synthetic":
        train_set, test_set = synthetic_data(*args.synthetic_size, seed=args.seed)
    else:
        train_set, test_set = load_fashion_mnist(args.data_dir)
    if args.train_subset:
        train_set = ImageSet(train_set.images[: args.train_subset], train_set.labels[: args.train_subset])
    if args.test_subset:
        test_set = ImageSet(test_set.images[: args.test_subset], test_set.labels[: args.test_subset])
    print(f"{args.dataset}: {len(train_set)} training / {len(test_set)} test images; {torch.get_num_threads()} threads")

    start = time.perf_counter()
    results = [train_config(s, args, train_set, test_set, out_dir) for s in args.splits]
    if any(r is None for r in results):
        return {"stopped": True, "results": [r for r in results if r is not None]}
    hardware = (
        f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"
    )
    summary = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "dataset": args.dataset,
        "train_images": len(train_set),
        "test_images": len(test_set),
        "wall_seconds": time.perf_counter() - start,
        "hardware": hardware,
        "results": results,
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    table = markdown_table(results)
    (out_dir / "results.md").write_text(table)
    plot(results, out_dir / "accuracy_vs_splits.png")
    print(table)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'accuracy_vs_splits.png'}")
    return summary


if __name__ == "__main__":
    main()
