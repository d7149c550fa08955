#!/usr/bin/env python3
"""Train a Collaboration-of-Experts (CoE) image classifier with pycoe, end to end.

CoE (Zhang, Chen and Zhong, "Collaboration of Experts: Achieving 80% Top-1 Accuracy on ImageNet with 100M
FLOPs", ICML 2022, arXiv:2107.03815) routes every image to one of K expert networks chosen by a small
delegator, which also makes a rough prediction that can end inference early. The paper's method section is
not public: the staged recipe below is **pycoe's formulation** (see the example's README and the guide page
``docs/guide/example_imagenet.rst``), not a claim about the paper's exact schedule:

1. ``universal``: train one expert network on all the data;
2. copy it into K experts (:meth:`pycoe.coe.experts.ExpertPool.from_template`);
3. ``delegator``: train the delegator (backbone and rough head) on all the data;
4. ``joint``: train delegator and experts together with WGM
   (:class:`pycoe.routing.weighting.BalancedTransportWeighter`) and LGM
   (:class:`pycoe.routing.labels.LabelGenerator`) through :class:`pycoe.coe.loss.CoELoss`;

then single networks of several widths are trained with the same epochs and schedule as baselines, and the
results table and figures are written to ``--out-dir``.

Default: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, small CNNs, a CPU budget of about
five minutes on 2 cores. ``--dataset imagefolder --data-dir DIR --delegator mobilenet_v3_small --expert
resnet18`` runs the same recipe on ImageNet (``DIR/train``, ``DIR/val``). Runs unchanged under ``torchrun``
(DDP: gloo on CPU, NCCL on GPU).

Usage::

    python examples/imagenet/train_coe.py                      # the default (Fashion-MNIST, ~5 min on 2 cores)
    python examples/imagenet/train_coe.py --help
    torchrun --nproc_per_node=2 examples/imagenet/train_coe.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import coe_data
import coe_models
import coe_report

from pycoe.checkpoint import load_checkpoint, save_checkpoint
from pycoe.coe.delegator import Delegator
from pycoe.coe.experts import ExpertPool
from pycoe.coe.loss import CoELoss
from pycoe.coe.model import CoE
from pycoe.flops import count_flops
from pycoe.routing.labels import LabelGenerator
from pycoe.routing.weighting import BalancedTransportWeighter

CHECKPOINT_FORMAT = "pycoe-example-imagenet/1"
DEFAULT_THRESHOLDS = "0.5,0.6,0.7,0.8,0.85,0.9,0.95,0.97,0.98,0.99,0.995,0.999"
# Options that must not change between a run and its --resume (they change what is trained).
_RESUME_KEYS = (
    "dataset",
    "train_subset",
    "image_size",
    "expert",
    "delegator",
    "expert_width",
    "delegator_width",
    "num_experts",
    "epochs_universal",
    "epochs_delegator",
    "epochs_joint",
    "baselines",
    "seed",
    "batch_size",
    "lr",
    "pwlu",
    "condconv",
    "epsilon",
    "score",
    "lgm",
    "wgm_scope",
    "match_flops",
    "selection_init",
)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Collaboration of Experts with pycoe: the staged recipe (universal expert -> K copies -> "
        "delegator -> joint WGM + LGM training), baselines, an accuracy-FLOPs table and figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("fashion-mnist", "imagefolder", "synthetic"), default="fashion-mnist")
    g.add_argument(
        "--data-dir",
        default=None,
        help="imagefolder: DIR with train/ and val/; fashion-mnist: a directory with the IDX files or a "
        "torchvision root (default: the Debian package's /usr/share/datasets/fashion-mnist)",
    )
    g.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="use only this many training samples (default: 30000 for fashion-mnist, all otherwise)",
    )
    g.add_argument("--test-subset", type=int, default=None, help="evaluate on only this many test samples")
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="imagefolder crop size (default 224); synthetic image size (default 28)",
    )
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers (imagefolder only)")
    g = p.add_argument_group("models")
    g.add_argument(
        "--expert", default=None, help="'cnn' or a torchvision model name (default: cnn, or resnet18 for imagefolder)"
    )
    g.add_argument(
        "--delegator",
        default=None,
        help="'cnn' or a torchvision model name (default: cnn, or mobilenet_v3_small for imagefolder)",
    )
    g.add_argument("--expert-width", type=float, default=1.0, help="width multiplier of the CNN expert")
    g.add_argument(
        "--delegator-width", type=float, default=None, help="width multiplier of the CNN delegator (default 0.25)"
    )
    g.add_argument("--pwlu", action="store_true", help="PWLU activations in experts, delegator and baselines")
    g.add_argument("--condconv", action="store_true", help="CondConv in the last stage of experts and baselines")
    g.add_argument("--condconv-experts", type=int, default=4, help="kernels per CondConv layer")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout before the classifiers")
    g = p.add_argument_group("CoE recipe")
    g.add_argument("-K", "--num-experts", type=int, default=4)
    g.add_argument("--epochs-universal", type=int, default=3, help="stage 1: universal expert on all data")
    g.add_argument("--epochs-delegator", type=int, default=3, help="stage 3: delegator (backbone + rough head)")
    g.add_argument("--epochs-joint", type=int, default=2, help="stage 4: joint WGM + LGM training")
    g.add_argument(
        "--epsilon",
        type=float,
        default=0.2,
        help="WGM weight of the non-assigned experts (0: hard partition; the library's default is 0, "
        "this example's 0.2 did better in short CPU budgets)",
    )
    g.add_argument(
        "--score",
        choices=("log_softmax", "softmax", "logits"),
        default="log_softmax",
        help="WGM score transform of the selection logits",
    )
    g.add_argument("--wgm-method", choices=("exact", "sinkhorn", "greedy"), default="exact")
    g.add_argument(
        "--wgm-scope",
        choices=("auto", "batch", "global"),
        default="auto",
        help="balanced transport per process batch or over the global batch (auto: global under DDP)",
    )
    g.add_argument("--lgm", choices=("best", "soft", "balanced"), default="best", help="LGM label mode")
    g.add_argument("--lgm-temperature", type=float, default=1.0)
    g.add_argument(
        "--selection-init",
        choices=("zero", "kmeans"),
        default="zero",
        help="start of the delegator's selection head for the joint stage: 'zero' (uniform choice) or "
        "'kmeans' (the nearest-centroid rule of a balanced k-means of the delegator's features, "
        "so the WGM's first partition is one the delegator can already predict)",
    )
    g.add_argument(
        "--kmeans-samples",
        type=int,
        default=30000,
        help="--selection-init kmeans: training samples (a seeded random subset) clustered",
    )
    g.add_argument("--selection-weight", type=float, default=1.0)
    g.add_argument("--rough-weight", type=float, default=1.0)
    g.add_argument(
        "--exit-threshold",
        type=float,
        default=None,
        help="early-exit threshold on the rough prediction's max probability reported in the table "
        "(default: the largest threshold of the sweep costing at most 0.3 points of accuracy)",
    )
    g.add_argument("--thresholds", default=DEFAULT_THRESHOLDS, help="exit thresholds of the sweep")
    g = p.add_argument_group("baselines")
    g.add_argument(
        "--baselines",
        default=None,
        help="comma-separated single networks trained with the same epochs and schedule as the "
        "expert (universal + joint epochs): CNN widths like 0.5 or models like resnet34; the "
        "expert itself is always one. Default: 0.5x and 1.5x the expert width for the CNN, none "
        "for torchvision experts. '' for none",
    )
    g.add_argument(
        "--match-flops",
        action="store_true",
        help="also train a CNN baseline whose FLOPs match the CoE without early exit (delegator + one expert)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=128, help="global batch size (split over DDP ranks)")
    g.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (cosine per stage)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--warmup-steps", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument(
        "--no-channels-last",
        action="store_true",
        help="keep NCHW tensors (channels_last is ~15%% faster for the small CNNs on CPU; off under DDP)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default="runs/coe_example", help="checkpoint, table and figures")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    g.add_argument(
        "--stop-after-epochs",
        type=int,
        default=None,
        help="stop (after checkpointing) once this many epochs ran in this invocation",
    )
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--no-figures", action="store_true", help="skip the matplotlib figures")
    return p


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    folder = args.dataset == "imagefolder"
    if args.expert is None:
        args.expert = "resnet18" if folder else "cnn"
    if args.delegator is None:
        args.delegator = "mobilenet_v3_small" if folder else "cnn"
    if args.delegator_width is None:
        args.delegator_width = 0.25 if args.delegator == "cnn" else 1.0
    for role in ("expert", "delegator"):
        if getattr(args, role) != "cnn" and getattr(args, f"{role}_width") != 1.0:
            raise ValueError(
                f"--{role}-width only applies to the 'cnn' {role}; {getattr(args, role)} is a "
                "torchvision model of fixed width (pick another model name instead)"
            )
    if args.image_size is None:
        args.image_size = 224 if folder else 28
    if args.train_subset is None and args.dataset == "fashion-mnist":
        args.train_subset = 30000  # the default ~5-minute budget on 2 CPU cores; --train-subset 60000 for all
    if args.train_subset is not None and args.train_subset < 1:
        raise ValueError(f"--train-subset must be a positive integer, got {args.train_subset}")
    if args.baselines is None:
        w = args.expert_width
        args.baselines = f"{0.5 * w:g},{1.5 * w:g}" if args.expert == "cnn" else ""
    if args.wgm_scope == "auto":
        args.wgm_scope = "global"  # identical to "batch" without a process group
    for name in ("num_experts", "batch_size", "image_size", "condconv_experts", "kmeans_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("epochs_universal", "epochs_delegator", "epochs_joint"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.epsilon <= 1.0:
        raise ValueError(f"--epsilon must be in [0, 1], got {args.epsilon}")
    if args.exit_threshold is not None and not 0.0 <= args.exit_threshold <= 1.0:
        raise ValueError(f"--exit-threshold must be in [0, 1], got {args.exit_threshold}")
    args.threshold_list = sorted({float(t) for t in args.thresholds.split(",") if t.strip()})
    if any(not 0.0 <= t <= 1.0 for t in args.threshold_list):
        raise ValueError(f"--thresholds must be numbers in [0, 1], got {args.thresholds!r}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: torch.device) -> Dist:
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        return Dist(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), True)
    return Dist()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# RNG state (saved in checkpoints; every epoch also starts from a seed derived from (seed, phase, epoch, rank))
# ---------------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    seed = seed % (2**31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    return hash(tuple(int(p) for p in parts)) % (2**31)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def load_data(args, d: Dist):
    """Returns (train, test, num_classes, in_channels, classes)."""
    if args.dataset == "imagefolder":
        if args.data_dir is None:
            raise ValueError("--dataset imagefolder needs --data-dir DIR (with DIR/train and DIR/val)")
        train, test = coe_data.build_imagefolder(args.data_dir, args.image_size)
        if args.train_subset:
            train = torch.utils.data.Subset(train, range(min(args.train_subset, len(train))))
            train.classes = test.classes  # type: ignore[attr-defined]
        if args.test_subset:
            classes = test.classes
            test = torch.utils.data.Subset(test, range(min(args.test_subset, len(test))))
            test.classes = classes  # type: ignore[attr-defined]
        classes = tuple(test.classes)
        return train, test, len(classes), 3, classes
    if args.dataset == "synthetic":
        train, test = coe_data.make_synthetic(
            num_train=args.train_subset or 512,
            num_test=args.test_subset or 256,
            image_size=args.image_size,
            seed=args.seed,
        )
    else:
        train, test = coe_data.load_fashion_mnist(args.data_dir)
        train = train.subset(args.train_subset, seed=args.seed)
        test = test.subset(args.test_subset, seed=args.seed + 1)
    return train, test, len(train.classes), train.images.shape[1], train.classes


def make_batches(args, dataset, train: bool, d: Dist, seed: int):
    per_rank = max(1, args.batch_size // d.world_size)
    if args.dataset == "imagefolder":
        return coe_data.ImageFolderBatches(dataset, per_rank, train, seed, d.world_size, d.rank, args.workers)
    return coe_data.TensorBatches(dataset, per_rank, train, seed, d.world_size, d.rank)


def eval_batches(args, dataset):
    """The whole test set, in order, on one process (the final evaluation runs on rank 0)."""
    if args.dataset == "imagefolder":
        return coe_data.ImageFolderBatches(dataset, args.batch_size, False, 0, 1, 0, args.workers)
    return coe_data.TensorBatches(dataset, args.batch_size, False, 0, 1, 0)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def parse_baselines(args) -> list[tuple[str, float]]:
    """``[(arch, width)]`` of the extra baselines (the expert itself at width 1 is always a baseline)."""
    out = []
    for item in [s.strip() for s in args.baselines.split(",") if s.strip()]:
        if "@" in item:
            arch, w = item.split("@", 1)
            out.append((arch, float(w)))
        else:
            try:
                out.append(("cnn", float(item)))
            except ValueError:
                out.append((item, 1.0))
    for arch, w in out:
        if (arch, w) == (args.expert, args.expert_width if args.expert == "cnn" else 1.0):
            raise ValueError(f"--baselines: {arch}@{w} is the expert itself, which is always a baseline")
    return out


def baseline_key(arch: str, width: float) -> str:
    return f"{arch}@{width:g}" if arch == "cnn" else arch


def new_network(args, arch: str, width: float, num_classes: int, in_channels: int, role: str) -> nn.Module:
    net = coe_models.build_network(arch, num_classes, width=width, in_channels=in_channels, dropout=args.dropout)
    coe_models.apply_variants(
        net, pwlu=args.pwlu, condconv=args.condconv and role != "delegator", condconv_experts=args.condconv_experts
    )
    if not args.no_channels_last:  # only the 4-d weights (CondConv's kernel banks are 5-d)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.to(memory_format=torch.channels_last)
    return net


def matched_width(args, num_classes: int, in_channels: int, target_flops: float) -> float:
    """The CNN width (to 1/64, in [1/16, 4]) whose FLOPs per sample are closest to ``target_flops``."""
    x = torch.zeros(1, in_channels, args.image_size, args.image_size)
    best, best_gap = 1.0, float("inf")
    for i in range(4, 4 * 64 + 1):
        w = i / 64
        net = coe_models.build_network("cnn", num_classes, width=w, in_channels=in_channels).eval()
        gap = abs(count_flops(net, x) - target_flops)
        if gap < best_gap:
            best, best_gap = w, gap
        elif count_flops(net, x) > target_flops:
            break
    return best


@dataclass
class Phase:
    name: str  # "universal", "delegator", "joint", "baseline:<key>:pre" / ":fine"
    kind: str  # "supervised" | "rough" | "joint"
    model: str  # key in the model registry
    epochs: int


def plan_phases(args, baseline_keys: list[str]) -> list[Phase]:
    phases = [
        Phase("universal", "supervised", "universal", args.epochs_universal),
        Phase("delegator", "rough", "delegator", args.epochs_delegator),
        Phase("joint", "joint", "coe", args.epochs_joint),
        Phase("baseline:expert:fine", "supervised", "baseline:expert", args.epochs_joint),
    ]
    for key in baseline_keys:
        phases.append(Phase(f"baseline:{key}:pre", "supervised", f"baseline:{key}", args.epochs_universal))
        phases.append(Phase(f"baseline:{key}:fine", "supervised", f"baseline:{key}", args.epochs_joint))
    return phases


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def cosine_lambda(total_steps: int, warmup: int):
    warmup = min(warmup, max(total_steps // 5, 0))

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(args, module: nn.Module, steps: int):
    decay, no_decay = [], []
    for _n, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=args.momentum,
        nesterov=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(steps, args.warmup_steps))
    return opt, sched


def realign_if_needed(args, module: nn.Module, phase: Phase, epoch: int) -> int:
    """PWLU phase I -> II after the first epoch of a network's first stage (pycoe's schedule)."""
    if not args.pwlu or epoch != 1 or not (phase.name.endswith(":pre") or phase.name in ("universal", "delegator")):
        return 0
    from pycoe.layers.pwlu import realign_pwlu

    return realign_pwlu(module)


def train_epoch(
    args,
    phase: Phase,
    module: nn.Module,
    wrapped: nn.Module,
    criterion,
    opt,
    sched,
    batches,
    device,
    d: Dist,
    desc: str,
) -> dict:
    module.train()
    bar = tqdm(
        total=len(batches),
        desc=desc,
        disable=args.no_progress or not d.main,
        leave=False,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    sums: dict[str, float] = {}
    count = 0
    for x, y in batches:
        x, y = to_device(x, device, args), y.to(device, non_blocking=True)
        if phase.kind == "supervised":
            logits = wrapped(x)
            loss = F.cross_entropy(logits, y)
            stats = {"loss": loss.item(), "acc": (logits.argmax(1) == y).float().mean().item()}
        elif phase.kind == "rough":
            out = wrapped(x)
            loss = F.cross_entropy(out.rough_logits, y) + 0.0 * out.selection_logits.sum()  # every param used
            stats = {"loss": loss.item(), "acc": (out.rough_logits.argmax(1) == y).float().mean().item()}
        else:
            out = wrapped(x)
            loss, info = criterion(out, y)
            stats = {"loss": loss.item()}
            for k, v in info.items():
                if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1):
                    stats[k] = float(v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        if d.main and not args.no_progress:
            bar.set_postfix({k: f"{sums[k] / count:.3f}" for k in list(sums)[:4]}, refresh=False)
        bar.update(1)
    bar.close()
    return {k: v / max(count, 1) for k, v in sums.items()}


def to_device(x: torch.Tensor, device, args) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if not args.no_channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def balanced_kmeans(z: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 30):
    """K-means whose clusters hold near-equal numbers of points (pycoe's example code).

    k-means++ seeding, then Lloyd iterations whose assignment step is the balanced transportation problem
    (:func:`pycoe.routing.transport.balanced_assignment` on ``-|z_n - c_k|^2``, near-equal capacities) and
    whose update step is the mean of each cluster; stops when the assignment no longer changes.

    Args:
        z: Tensor[N, D] points (N >= k).
        k: number of clusters.
        generator: the random source of the seeding.
        iterations: the most Lloyd iterations.

    Returns:
        ``(centres Tensor[K, D], assignment LongTensor[N], iterations run)``.
    """
    from pycoe.routing.transport import balanced_assignment

    centres = z[torch.randint(len(z), (1,), generator=generator)]
    while len(centres) < k:
        d2 = torch.cdist(z, centres).pow(2).amin(1)
        if float(d2.sum()) <= 0:  # fewer distinct points than clusters: take any point
            pick = torch.randint(len(z), (1,), generator=generator)
        else:
            pick = torch.multinomial(d2 / d2.sum(), 1, generator=generator)
        centres = torch.cat([centres, z[pick]])
    assign, it = None, 0
    for it in range(1, iterations + 1):  # noqa: B007 (the iteration count is returned)
        new = balanced_assignment(-torch.cdist(z, centres).pow(2), method="exact")
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centres = torch.stack([z[assign == j].mean(0) for j in range(k)])
    return centres, assign, it


@torch.no_grad()
def kmeans_selection_init(args, delegator: Delegator, dataset, device) -> dict:
    """Set the selection head to the nearest-centroid rule of a balanced k-means of the delegator's features.

    pycoe's formulation (not from the CoE paper). With a zero selection head the WGM's first partitions are
    arbitrary (every expert scores the same) and the K copies of the universal expert drift apart by chance, so
    the LGM's first labels are mostly noise. Here the delegator's features ``f`` (``Tensor[N, D]``, for a seeded
    random subset of ``--kmeans-samples`` training images, un-augmented, eval mode) are standardised to
    ``z = (f - mu) / sd`` and clustered by :func:`balanced_kmeans` into K groups of near-equal size, and the
    selection logits become ``(2 z.c_k - |c_k|^2) / T``. Their argmax is the nearest centroid, and they are an
    affine function of ``f``, so the head is exactly a ``Linear(D, K)``. ``T`` makes the median gap between
    the nearest and the second-nearest centroid a logit gap of 2. The WGM's first partition is then one that
    the delegator predicts by construction and that groups similar images; WGM and LGM refine it from there.

    Deterministic given ``--seed`` (its own generator; the global RNG is not touched), so every DDP rank
    computes the same head.

    Returns:
        dict with ``centres`` Tensor[K, D], ``mean`` and ``std`` Tensor[D] (of the features), ``temperature``,
        ``assignment`` LongTensor[N] and ``indices`` LongTensor[N] (the clustered training samples),
        ``iterations``.
    """
    k = args.num_experts
    n = len(dataset)
    g = torch.Generator().manual_seed(derived_seed(args.seed, 7919))
    idx = torch.randperm(n, generator=g)[: min(n, max(k, args.kmeans_samples))].sort().values
    if args.dataset == "imagefolder":
        batches = coe_data.ImageFolderBatches(
            torch.utils.data.Subset(dataset, idx.tolist()), args.batch_size, False, 0, 1, 0, args.workers
        )
    else:
        sub = coe_data.InMemoryDataset(
            dataset.images[idx], dataset.labels[idx], dataset.classes, dataset.mean, dataset.std, dataset.source
        )
        batches = coe_data.TensorBatches(sub, 512, False, 0, 1, 0)
    modes = [(m, m.training) for m in delegator.modules()]
    delegator.eval()
    try:
        feats = torch.cat([delegator.features(to_device(x, device, args)).float().cpu() for x, _ in batches])
    finally:
        for m, training in modes:
            m.training = training
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd  # [N, D]
    centres, assign, iterations = balanced_kmeans(z, k, g)
    d2 = torch.cdist(z, centres).pow(2).sort(1).values  # [N, K]
    temperature = float((d2[:, 1] - d2[:, 0]).median().clamp_min(1e-6)) / 2.0 if k > 1 else 1.0
    # logits_k = (2 z.c_k - |c_k|^2) / T with z = (f - mu) / sd, written as W f + b
    weight = 2.0 * centres / sd / temperature  # [K, D]
    bias = (-(centres * centres).sum(1) - 2.0 * (centres * (mu / sd)).sum(1)) / temperature  # [K]
    head = delegator.selection_head  # pycoe's Delegator: nn.Linear(D, K) with a bias
    head.weight.copy_(weight.to(head.weight))
    head.bias.copy_(bias.to(head.bias))
    return {
        "centres": centres,
        "mean": mu,
        "std": sd,
        "temperature": temperature,
        "assignment": assign,
        "indices": idx,
        "iterations": iterations,
    }


@torch.no_grad()
def accuracy(module: nn.Module, batches, device, args, rough: bool = False) -> float:
    module.eval()
    correct = total = 0
    for x, y in batches:
        out = module(to_device(x, device, args))
        logits = out.rough_logits if rough else out
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args, d: Dist, device: torch.device):
        self.args, self.d, self.device = args, d, device
        self.out_dir = Path(args.out_dir)
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        self.log = (lambda s: tqdm.write(s)) if d.main else (lambda s: None)

    # ---- model registry -------------------------------------------------------------------------------------
    def build(self):
        a = self.args
        seed_everything(a.seed)
        self.train_set, self.test_set, self.num_classes, self.in_channels, self.classes = load_data(a, self.d)
        self.models: dict[str, nn.Module] = {}
        mk = lambda arch, w, role: new_network(a, arch, w, self.num_classes, self.in_channels, role)  # noqa: E731
        self.models["universal"] = mk(a.expert, a.expert_width, "expert").to(self.device)
        backbone = mk(a.delegator, a.delegator_width, "delegator")
        self.models["delegator"] = Delegator(backbone, a.num_experts, self.num_classes).to(self.device)
        self.models["baseline:expert"] = mk(a.expert, a.expert_width, "expert").to(self.device)
        self.baselines = {}
        for arch, w in parse_baselines(a):
            key = baseline_key(arch, w)
            self.baselines[key] = (arch, w)
        if a.match_flops and a.expert == "cnn":
            x = torch.zeros(2, self.in_channels, a.image_size, a.image_size, device=self.device)
            target = (count_flops(self.models["delegator"], x) + count_flops(self.models["universal"], x)) / 2
            w = matched_width(a, self.num_classes, self.in_channels, target)
            self.baselines.setdefault(baseline_key("cnn", w), ("cnn", w))
            self.matched_key = baseline_key("cnn", w)
        else:
            self.matched_key = None
        for key, (arch, w) in self.baselines.items():
            self.models[f"baseline:{key}"] = mk(arch, w, "expert").to(self.device)
        self.phases = plan_phases(a, list(self.baselines))
        self.universal_snapshot: dict | None = None

    def ensure_coe(self) -> CoE:
        if "coe" not in self.models:
            pool = ExpertPool.from_template(self.models["universal"], self.args.num_experts)
            self.models["coe"] = CoE(self.models["delegator"], pool).to(self.device)
        return self.models["coe"]

    def module_for(self, phase: Phase) -> nn.Module:
        return self.ensure_coe() if phase.kind == "joint" else self.models[phase.model]

    def make_criterion(self):
        a = self.args
        weighter = BalancedTransportWeighter(
            a.num_experts, epsilon=a.epsilon, score=a.score, method=a.wgm_method, scope=a.wgm_scope
        )
        labeler = LabelGenerator(a.lgm, temperature=a.lgm_temperature)
        return CoELoss(weighter, labeler, selection_weight=a.selection_weight, rough_weight=a.rough_weight)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def state_models(self) -> dict:
        return {k: m.state_dict() for k, m in self.models.items() if k != "delegator" or "coe" not in self.models}

    def save(self, phase_index: int, epoch: int, opt, sched) -> None:
        if not self.d.main:
            return
        a = self.args
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "config": {k: getattr(a, k) for k in _RESUME_KEYS},
            "phase_index": phase_index,
            "phase_name": self.phases[phase_index].name if phase_index < len(self.phases) else "done",
            "epoch": epoch,
            "models": self.state_models(),
            "universal_snapshot": self.universal_snapshot,
            "optimizer": opt.state_dict() if opt is not None else None,
            "scheduler": sched.state_dict() if sched is not None else None,
            "rng": rng_state(),
            "data_order": {
                "seed": a.seed,
                "phase_index": phase_index,
                "next_epoch": epoch,
                "sampler_seed": derived_seed(a.seed, phase_index),
            },
            "results": self.results,
            "history": self.history,
            "compute_seconds": self.compute_seconds,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ckpt, self.ckpt_path)

    def load(self) -> dict:
        ckpt = load_checkpoint(self.ckpt_path, map_location="cpu")
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.ckpt_path} is not a checkpoint of this example ({ckpt.get('format')!r})")
        mismatch = {k: (v, getattr(self.args, k)) for k, v in ckpt["config"].items() if getattr(self.args, k) != v}
        if mismatch:
            raise ValueError(
                "--resume with different options than the checkpoint: "
                + ", ".join(f"{k}: checkpoint {old!r} vs now {new!r}" for k, (old, new) in mismatch.items())
            )
        if "coe" in ckpt["models"]:
            self.ensure_coe()
        for k, sd in ckpt["models"].items():
            self.models[k].load_state_dict(sd)
        self.universal_snapshot = ckpt["universal_snapshot"]
        self.results, self.history = ckpt["results"], ckpt["history"]
        self.compute_seconds = ckpt["compute_seconds"]
        set_rng_state(ckpt["rng"])
        return ckpt

    # ---- the run --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        a, d = self.args, self.d
        self.build()
        self.results: dict[str, Any] = {}
        self.history: list[dict] = []
        self.compute_seconds = 0.0
        start_phase, start_epoch, ckpt = 0, 0, None
        if a.resume:
            if not self.ckpt_path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {self.ckpt_path}")
            ckpt = self.load()
            start_phase, start_epoch = ckpt["phase_index"], ckpt["epoch"]
            self.log(f"resumed from {self.ckpt_path}: phase {ckpt['phase_name']}, {start_epoch} epoch(s) done")
        else:
            self.log(self.describe())
        epochs_run = 0
        for pi in range(start_phase, len(self.phases)):
            phase = self.phases[pi]
            module = self.module_for(phase)
            self.prepare_phase(phase, first_time=not (pi == start_phase and start_epoch > 0))
            batches = make_batches(a, self.train_set, True, d, seed=derived_seed(a.seed, pi))
            steps = max(1, phase.epochs * len(batches))
            opt, sched = make_optimizer(a, module, steps)
            if ckpt is not None and pi == start_phase and start_epoch > 0 and ckpt["optimizer"] is not None:
                opt.load_state_dict(ckpt["optimizer"])
                sched.load_state_dict(ckpt["scheduler"])
            wrapped = self.wrap(module, phase)
            criterion = self.make_criterion() if phase.kind == "joint" else None
            first_epoch = start_epoch if pi == start_phase else 0
            for epoch in range(first_epoch, phase.epochs):
                if a.stop_after_epochs is not None and epochs_run >= a.stop_after_epochs:
                    self.log(f"stopping after {epochs_run} epoch(s) (--stop-after-epochs); resume with --resume")
                    barrier(d)
                    return {"stopped": True, "phase": phase.name, "epoch": epoch}
                seed_everything(derived_seed(a.seed, pi, epoch, d.rank))
                batches.set_epoch(epoch)
                t0 = time.perf_counter()
                stats = train_epoch(
                    a,
                    phase,
                    module,
                    wrapped,
                    criterion,
                    opt,
                    sched,
                    batches,
                    self.device,
                    d,
                    desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
                )
                n_realigned = realign_if_needed(a, module, phase, epoch + 1)
                if n_realigned and d.active:  # the ranks' statistics differ: take rank 0's realignment
                    with torch.no_grad():
                        for t in list(module.parameters()) + list(module.buffers()):
                            dist.broadcast(t.data, src=0)
                dt = time.perf_counter() - t0
                self.compute_seconds += dt
                stats.update(phase=phase.name, epoch=epoch + 1, seconds=round(dt, 2))
                self.history.append(stats)
                self.log(
                    f"[{phase.name}] epoch {epoch + 1}/{phase.epochs} {dt:6.1f}s  "
                    + "  ".join(f"{k}={v:.4f}" for k, v in stats.items() if isinstance(v, float) and k != "seconds")
                    + (f"  (PWLU realigned: {n_realigned})" if n_realigned else "")
                )
                epochs_run += 1
                if epoch + 1 == phase.epochs:
                    self.finish_phase(phase)
                self.save(
                    pi if epoch + 1 < phase.epochs else pi + 1, epoch + 1 if epoch + 1 < phase.epochs else 0, opt, sched
                )
            if phase.epochs == 0:
                self.finish_phase(phase)
            start_epoch = 0
            if d.active:
                barrier(d)
        if d.main:
            report = self.final_report()
        else:
            report = {}
        barrier(d)
        return report

    def describe(self) -> str:
        a = self.args
        x = torch.zeros(2, self.in_channels, a.image_size, a.image_size, device=self.device)
        fl = {k: count_flops(m, x) / 2 / 1e6 for k, m in self.models.items()}
        lines = [
            f"data: {a.dataset} ({len(self.train_set)} train / {len(self.test_set)} test, "
            f"{self.num_classes} classes)  world size {self.d.world_size}  device {self.device}  "
            f"threads {torch.get_num_threads()}",
            f"expert {a.expert}"
            + (f" x{a.expert_width:g}" if a.expert == "cnn" else "")
            + f": {fl['universal']:.2f} MFLOPs; "
            f"delegator {a.delegator}"
            + (f" x{a.delegator_width:g}" if a.delegator == "cnn" else "")
            + f": {fl['delegator']:.2f} MFLOPs; K={a.num_experts}",
            "stages: " + ", ".join(f"{p.name}({p.epochs})" for p in self.phases),
        ]
        return "\n".join(lines)

    def wrap(self, module: nn.Module, phase: Phase) -> nn.Module:
        if not self.d.active:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # PWLUs in their collecting phase act as their init function: their parameters get no gradient
        return DDP(module, device_ids=ids, find_unused_parameters=self.args.pwlu)

    def prepare_phase(self, phase: Phase, first_time: bool) -> None:
        """Stage 2 (copy the universal expert into the K experts) and the 1x baseline's start."""
        if not first_time:
            return
        if phase.kind == "joint":
            if self.universal_snapshot is None:
                raise RuntimeError("the joint stage needs the universal expert (stage 1)")
            # ExpertPool.from_template happened in ensure_coe (a deep copy of the trained universal expert);
            # reload the snapshot anyway so that a resumed run starts from exactly the same weights
            for expert in self.models["coe"].experts:
                expert.load_state_dict(self.universal_snapshot)
            self.log(f"stage 2: universal expert copied into {self.args.num_experts} experts")
            if self.args.selection_init == "kmeans":
                km = kmeans_selection_init(self.args, self.models["delegator"], self.train_set, self.device)
                sizes = torch.bincount(km["assignment"], minlength=self.args.num_experts).tolist()
                self.log(
                    f"selection head set to a balanced {self.args.num_experts}-means of the delegator's "
                    f"features ({len(km['indices'])} images, clusters {sizes}, {km['iterations']} "
                    f"iterations, T={km['temperature']:.3g})"
                )
        if phase.name == "baseline:expert:fine":
            self.models["baseline:expert"].load_state_dict(self.universal_snapshot)

    def finish_phase(self, phase: Phase) -> None:
        a = self.args
        tb = eval_batches(a, self.test_set)
        if phase.name == "universal":
            self.universal_snapshot = copy.deepcopy(self.models["universal"].state_dict())
            self.ensure_coe()
            self.results["universal"] = {"accuracy": accuracy(self.models["universal"], tb, self.device, a)}
        elif phase.name == "delegator":
            self.results["delegator"] = {
                "rough_accuracy": accuracy(self.models["delegator"], tb, self.device, a, rough=True)
            }
        elif phase.kind == "joint":
            self.results["joint"] = {
                "rough_accuracy": accuracy(self.models["delegator"], tb, self.device, a, rough=True)
            }
        elif phase.name.endswith(":fine"):
            key = phase.model
            self.results[key] = {"accuracy": accuracy(self.models[key], tb, self.device, a)}
        else:
            return
        self.log(
            f"[{phase.name}] test: "
            + ", ".join(
                f"{k}={v:.4f}"
                for k, v in self.results[phase.model if phase.name.endswith(":fine") else phase.name].items()
            )
        )

    # ---- final evaluation -----------------------------------------------------------------------------------
    def final_report(self) -> dict:
        a = self.args
        coe = self.ensure_coe()
        tb = eval_batches(a, self.test_set)
        x = next(iter(tb))[0][: min(64, a.batch_size)].to(self.device)
        flops = {
            "delegator": count_flops(coe.delegator.eval(), x) / x.shape[0],
            "expert": count_flops(coe.experts[0].eval(), x) / x.shape[0],
        }
        cache = coe_report.collect_outputs(coe, tb, self.device)
        sweep = coe_report.sweep_from_cache(cache, a.threshold_list, flops["delegator"], flops["expert"])
        checks = coe_report.check_against_library(coe, tb, self.device, cache, a.threshold_list, flops)
        baselines = []
        for key, model in self.models.items():
            if key.startswith("baseline:"):
                name = key.split(":", 1)[1]
                arch, width = (a.expert, a.expert_width) if name == "expert" else self.baselines[name]
                label = baseline_key(arch, width) if arch == "cnn" else arch
                baselines.append(
                    {
                        "name": label,
                        "arch": arch,
                        "width": width,
                        "accuracy": self.results[key]["accuracy"],
                        "flops": count_flops(model.eval(), x) / x.shape[0],
                        "matched": name == self.matched_key,
                    }
                )
        baselines.sort(key=lambda b: b["flops"])
        summary = coe_report.summarise(
            a,
            cache,
            sweep,
            baselines,
            flops,
            self.results,
            self.classes,
            checks,
            self.compute_seconds,
            self.d.world_size,
        )
        coe_report.write_outputs(summary, self.out_dir, figures=not a.no_figures)
        print(summary["table_markdown"], flush=True)
        print(
            f"\nwritten: {self.out_dir / 'results.md'}, {self.out_dir / 'results.json'}"
            + (
                ""
                if a.no_figures
                else f", {self.out_dir / 'accuracy_vs_flops.png'}, {self.out_dir / 'expert_load.png'}"
            ),
            flush=True,
        )
        return summary


def main(argv: list[str] | None = None) -> dict:
    args = finalize_args(build_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = setup_distributed(device)
    if d.active:  # DDP's gradient buckets expect the default (contiguous) layout
        args.no_channels_last = True
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = Runner(args, d, device).run()
    except coe_data.DataUnavailableError as exc:
        if d.main:
            print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if d.initialised_here:
            dist.destroy_process_group()
    if d.main and not result.get("stopped"):
        print(
            f"total wall time {time.perf_counter() - t0:.1f}s (process CPU time {time.process_time() - c0:.1f}s, "
            f"{torch.get_num_threads()} threads)",
            flush=True,
        )
    return result


if __name__ == "__main__":
    main()
