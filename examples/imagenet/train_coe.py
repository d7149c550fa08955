#!/usr/bin/env python3
"""Train a Collaboration-of-Experts (CoE) image classifier with pycoe, end to end.

CoE (Zhang, Chen and Zhong, "Collaboration of Experts: Achieving 80% Top-1 Accuracy on ImageNet with 100M
FLOPs", ICML 2022, arXiv:2107.03815) routes every image to one of K expert networks chosen by a small
delegator, which also makes a rough prediction that can end inference early. The paper's method section is
not public: the staged recipe below is **pycoe's formulation** (see the example's README and the guide page
``docs/guide/example_imagenet.rst``), not a claim about the paper's exact schedule:

1. ``universal``: train one expert network on all the training data;
2. copy it into K experts (:meth:`pycoe.coe.experts.ExpertPool.from_template`);
3. ``delegator``: train the delegator (backbone and rough head) on all the training data;
4. ``joint``: train delegator and experts together with WGM
   (:class:`pycoe.routing.weighting.BalancedTransportWeighter`) and LGM
   (:class:`pycoe.routing.labels.LabelGenerator`) through :class:`pycoe.coe.loss.CoELoss`;

then single networks of several widths are trained with the same epochs and schedule as baselines. The early-exit
threshold of the CoE, and of a cascade (the same delegator's rough head in front of a single network of the
expert's architecture), is chosen on a validation split carved out of the training data
(:func:`pycoe.coe.calibrate.calibrate_exit_threshold`); the test set is used once, for the reported numbers. The
results table and figures are written to ``--out-dir``.

Default: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, small CNNs, sized for a 2-core CPU (the
measured wall time is on ``docs/guide/results_imagenet.rst``). ``--dataset imagefolder --data-dir DIR --delegator
mobilenet_v3_small --expert resnet18`` runs the same recipe on ImageNet (``DIR/train``, ``DIR/val``). Runs
unchanged under ``torchrun`` (DDP: gloo on CPU, NCCL on GPU). ``run_seeds.py`` repeats a configuration over seeds.

Usage::

    python examples/imagenet/train_coe.py                      # the default (Fashion-MNIST)
    python examples/imagenet/train_coe.py --help
    torchrun --nproc_per_node=2 examples/imagenet/train_coe.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import coe_data
import coe_kmeans
import coe_models
import coe_report
from coe_models import baseline_key, matched_width, new_network, parse_baselines
from coe_runtime import (
    Dist,
    barrier,
    broadcast_module,
    derived_seed,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
)
from coe_training import Phase, accuracy, make_optimizer, plan_phases, realign_if_needed, to_device, train_epoch

from pycoe.checkpoint import load_checkpoint, save_checkpoint
from pycoe.coe.delegator import Delegator
from pycoe.coe.experts import ExpertPool
from pycoe.coe.loss import CoELoss
from pycoe.coe.model import CoE
from pycoe.flops import count_flops
from pycoe.routing.labels import LabelGenerator
from pycoe.routing.weighting import BalancedTransportWeighter
from pycoe.twostage.calibrate import DEFAULT_THRESHOLDS, calibrate_exit_threshold
from pycoe.utils import eval_mode

CHECKPOINT_FORMAT = "pycoe-example-imagenet/2"
LABELLED_THRESHOLDS = "0.5,0.6,0.7,0.8,0.85,0.9,0.95,0.97,0.98,0.99,0.995,0.999"
# Options that must not change between a run and its --resume (they change what is trained).
_RESUME_KEYS = (
    "dataset",
    "train_subset",
    "val_size",
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
        help="use only this many training samples, not counting the validation split (default: 30000 for "
        "fashion-mnist, all the rest otherwise)",
    )
    g.add_argument(
        "--val-size",
        type=int,
        default=None,
        help="validation samples carved out of the training data and excluded from training; the early-exit "
        "thresholds are chosen on them (default: 5000 for fashion-mnist, 128 for synthetic, 10%% of the "
        "training folder up to 10000 for imagefolder)",
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
    g.add_argument("--lgm-temperature", type=float, default=None, help="T of --lgm soft (default 1.0; soft only)")
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
    g = p.add_argument_group("early exit (chosen on the validation split, reported on the test set)")
    g.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        help="the exit threshold of the CoE (and of the cascade) is the lowest-FLOPs one whose validation "
        "accuracy is at most this below no exit (a fraction; default 0.003 = 0.3 points unless --max-mflops)",
    )
    g.add_argument(
        "--max-mflops",
        type=float,
        default=None,
        help="instead: the most accurate threshold whose average validation MFLOPs per sample are at most this",
    )
    g.add_argument(
        "--exit-threshold",
        type=float,
        default=None,
        help="use this threshold instead of calibrating one (reported on validation and test alike)",
    )
    g.add_argument(
        "--thresholds", default=LABELLED_THRESHOLDS, help="thresholds labelled in the figure and listed in the sweep"
    )
    g.add_argument(
        "--fit-temperature",
        action="store_true",
        help="also fit a temperature of the rough head on the validation split (minimum cross-entropy) and report "
        "the CoE and the cascade exiting on the temperature-scaled confidence, calibrated the same way",
    )
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
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT_DIR/checkpoint.pt, or start fresh when there is none yet (one command for the "
        "first start and every restart)",
    )
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
    if args.lgm_temperature is not None and args.lgm != "soft":
        raise ValueError(f"--lgm-temperature applies only to --lgm soft, not --lgm {args.lgm}")
    if args.image_size is None:
        args.image_size = 224 if folder else 28
    if args.train_subset is None and args.dataset == "fashion-mnist":
        args.train_subset = 30000  # the default budget on 2 CPU cores; --train-subset 55000 for all the rest
    if args.train_subset is not None and args.train_subset < 1:
        raise ValueError(f"--train-subset must be a positive integer, got {args.train_subset}")
    if args.val_size is None:
        args.val_size = {"fashion-mnist": 5000, "synthetic": 128}.get(args.dataset)  # imagefolder: at loading
    if args.val_size is not None and args.val_size < 1:
        raise ValueError(
            f"--val-size must be a positive integer (the exit threshold is chosen on it), got {args.val_size}"
        )
    if args.dataset == "fashion-mnist" and args.val_size + args.train_subset > 60000:
        raise ValueError(
            f"--train-subset {args.train_subset} plus --val-size {args.val_size} exceed Fashion-MNIST's 60000 "
            "training images"
        )
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
    if args.max_accuracy_drop is not None and args.max_mflops is not None:
        raise ValueError("give at most one of --max-accuracy-drop and --max-mflops")
    if args.max_mflops is None and args.max_accuracy_drop is None:
        args.max_accuracy_drop = 0.003
    if args.max_accuracy_drop is not None and not 0.0 <= args.max_accuracy_drop <= 1.0:
        raise ValueError(f"--max-accuracy-drop must be in [0, 1], got {args.max_accuracy_drop}")
    if args.max_mflops is not None and not args.max_mflops > 0:
        raise ValueError(f"--max-mflops must be > 0, got {args.max_mflops}")
    try:
        args.threshold_list = sorted({float(t) for t in args.thresholds.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--thresholds must be numbers in [0, 1], got {args.thresholds!r}") from None
    if any(not 0.0 <= t <= 1.0 for t in args.threshold_list):
        raise ValueError(f"--thresholds must be numbers in [0, 1], got {args.thresholds!r}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def load_data(args):
    """``(train, val, test, num_classes, in_channels, classes)``; ``val`` is held out of the training data."""
    if args.dataset == "imagefolder":
        if args.data_dir is None:
            raise ValueError("--dataset imagefolder needs --data-dir DIR (with DIR/train and DIR/val)")
        train, train_eval, test = coe_data.build_imagefolder(args.data_dir, args.image_size)
        n = len(train)
        if args.val_size is None:
            args.val_size = max(1, min(10000, n // 10))
        if not 1 <= args.val_size < n:
            raise ValueError(f"--val-size must be in [1, {n - 1}] for {n} training images, got {args.val_size}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
        rest = order[args.val_size :]
        if args.train_subset:
            rest = rest[: args.train_subset]
        classes = tuple(test.classes)
        train = torch.utils.data.Subset(train, sorted(rest))
        val = torch.utils.data.Subset(train_eval, sorted(order[: args.val_size]))
        if args.test_subset:
            test = torch.utils.data.Subset(test, range(min(args.test_subset, len(test))))
        return train, val, test, len(classes), 3, classes
    if args.dataset == "synthetic":
        full, test = coe_data.make_synthetic(
            num_train=(args.train_subset or 512) + args.val_size,
            num_test=args.test_subset or 256,
            image_size=args.image_size,
            seed=args.seed,
        )
    else:
        full, test = coe_data.load_fashion_mnist(args.data_dir)
        test = test.subset(args.test_subset, seed=args.seed + 1)
    if not 1 <= args.val_size < len(full):
        raise ValueError(
            f"--val-size must be in [1, {len(full) - 1}] for {len(full)} training images, got {args.val_size}"
        )
    train, val = full.split(args.val_size, None if args.dataset == "synthetic" else args.train_subset, seed=args.seed)
    return train, val, test, len(train.classes), train.images.shape[1], train.classes


def make_batches(args, dataset, train: bool, d: Dist, seed: int):
    per_rank = max(1, args.batch_size // d.world_size)
    if args.dataset == "imagefolder":
        return coe_data.ImageFolderBatches(dataset, per_rank, train, seed, d.world_size, d.rank, args.workers)
    return coe_data.TensorBatches(dataset, per_rank, train, seed, d.world_size, d.rank)


def eval_batches(args, dataset):
    """A whole evaluation set, in order, on one process (the final evaluation runs on rank 0)."""
    if args.dataset == "imagefolder":
        return coe_data.ImageFolderBatches(dataset, args.batch_size, False, 0, 1, 0, args.workers)
    return coe_data.TensorBatches(dataset, args.batch_size, False, 0, 1, 0)


def kmeans_start(args, delegator: Delegator, dataset, device) -> dict:
    """``--selection-init kmeans``: the delegator's features of a seeded random subset of ``--kmeans-samples``
    training images (un-augmented, eval mode), then :func:`coe_kmeans.kmeans_selection_init`.

    Deterministic given ``--seed`` (its own generator; the global RNG is not touched), so every DDP rank
    computes the same head. Returns the k-means result plus ``indices`` (the clustered training samples).
    """
    k, n = args.num_experts, len(dataset)
    g = torch.Generator().manual_seed(derived_seed(args.seed, 7919))
    idx = torch.randperm(n, generator=g)[: min(n, max(k, args.kmeans_samples))].sort().values
    if args.dataset == "imagefolder":
        batches = coe_data.ImageFolderBatches(
            torch.utils.data.Subset(dataset, idx.tolist()), args.batch_size, False, 0, 1, 0, args.workers
        )
    else:
        batches = coe_data.TensorBatches(dataset.take(idx), 512, False, 0, 1, 0)
    with eval_mode(delegator):
        feats = torch.cat([delegator.features(to_device(x, device, args)).float().cpu() for x, _ in batches])
    return dict(coe_kmeans.kmeans_selection_init(delegator, feats, g), indices=idx)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args, d: Dist, device: torch.device):
        self.args, self.d, self.device = args, d, device
        self.out_dir = Path(args.out_dir)
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        self.log = (lambda s: tqdm.write(s)) if d.main else (lambda s: None)
        self.calibration: dict[str, Any] | None = None

    # ---- model registry -------------------------------------------------------------------------------------
    def build(self):
        a = self.args
        seed_everything(a.seed)
        loaded = load_data(a)
        self.train_set, self.val_set, self.test_set, self.num_classes, self.in_channels, self.classes = loaded
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
            # the exit thresholds chosen on the validation split (set once training is done)
            "calibration": self.calibration,
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
        self.calibration = ckpt.get("calibration")
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
        if a.resume and self.ckpt_path.is_file():
            ckpt = self.load()
            start_phase, start_epoch = ckpt["phase_index"], ckpt["epoch"]
            self.log(f"resumed from {self.ckpt_path}: phase {ckpt['phase_name']}, {start_epoch} epoch(s) done")
        else:
            if a.resume:
                self.log(f"--resume: no checkpoint at {self.ckpt_path} yet, starting fresh")
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
                    broadcast_module(module, src=0)
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
            self.save(len(self.phases), 0, None, None)  # now with the calibrated thresholds
        else:
            report = {}
        barrier(d)
        return report

    def describe(self) -> str:
        a = self.args
        x = torch.zeros(2, self.in_channels, a.image_size, a.image_size, device=self.device)
        fl = {k: count_flops(m, x) / 2 / 1e6 for k, m in self.models.items()}
        lines = [
            f"data: {a.dataset} ({len(self.train_set)} train / {len(self.val_set)} validation / "
            f"{len(self.test_set)} test, {self.num_classes} classes)  world size {self.d.world_size}  "
            f"device {self.device}  threads {torch.get_num_threads()}",
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
                km = kmeans_start(self.args, self.models["delegator"], self.train_set, self.device)
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
    def calibrate(self, model: CoE, name: str, vb, tb) -> tuple[dict, dict]:
        """The exit threshold of ``model`` chosen on the validation split, then its numbers on the test set."""
        a = self.args
        budget = (
            {"max_accuracy_drop": a.max_accuracy_drop}
            if a.max_accuracy_drop is not None
            else {"max_flops": a.max_mflops * 1e6}
        )
        extra = [] if a.exit_threshold is None else [a.exit_threshold]
        val = calibrate_exit_threshold(
            model, vb, **budget, thresholds=[*DEFAULT_THRESHOLDS, *extra], device=self.device
        )
        threshold = val.threshold if a.exit_threshold is None else a.exit_threshold
        rule = val.rule if a.exit_threshold is None else "given by --exit-threshold"
        # the test set: one pass, every candidate of the validation's grid plus the figure's labelled thresholds
        test = calibrate_exit_threshold(
            model, tb, **budget, thresholds=[*DEFAULT_THRESHOLDS, *a.threshold_list, *extra], device=self.device
        )
        report = coe_report.exit_report(val, test, threshold, rule)
        self.log(
            f"[{name}] exit threshold {threshold} chosen on {val.num_samples} validation images ({rule}): "
            f"validation {100 * report['val']['accuracy']:.2f}% at {report['val']['flops_per_sample'] / 1e6:.2f} "
            f"MFLOPs; test {100 * report['test']['accuracy']:.2f}% at "
            f"{report['test']['flops_per_sample'] / 1e6:.2f} MFLOPs ({100 * report['test']['exit_rate']:.1f}% exit)"
        )
        return {"val": val, "test": test}, report

    def temperature_report(self, coe: CoE, cascade: CoE, vb, tb) -> dict:
        """``--fit-temperature``: T fitted on the validation split's rough logits, then both models calibrated and
        tested again with the rough head scaled by ``1 / T`` (the rough predictions do not change)."""
        delegator = self.models["delegator"]
        with eval_mode(delegator):
            parts = [(delegator(x.to(self.device)).rough_logits.float().cpu(), y) for x, y in vb]
        logits, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        t, before, after = coe_models.fit_rough_temperature(logits, labels)
        self.log(
            f"rough-head temperature fitted on the validation split: T={t:.3f} "
            f"(cross-entropy {before:.4f} -> {after:.4f})"
        )
        out: dict[str, Any] = {"T": t, "val_cross_entropy": [before, after]}
        with coe_models.scaled_rough_head(delegator, t):
            for name, model in (("coe", coe), ("cascade", cascade)):
                _, out[name] = self.calibrate(model, f"{name}, T={t:.3f}", vb, tb)
        return out

    def final_report(self) -> dict:
        a = self.args
        coe = self.ensure_coe()
        vb, tb = eval_batches(a, self.val_set), eval_batches(a, self.test_set)
        x = next(iter(tb))[0][: min(64, a.batch_size)].to(self.device)
        cascade = coe_models.make_cascade(self.models["delegator"], self.models["baseline:expert"])
        calibrations, exits = {}, {}
        for name, model in (("coe", coe), ("cascade", cascade)):
            calibrations[name], exits[name] = self.calibrate(model, name, vb, tb)
        temperature = self.temperature_report(coe, cascade, vb, tb) if a.fit_temperature else None
        coe.exit_threshold = exits["coe"]["threshold"]
        self.calibration = {
            "exit_threshold": exits["coe"]["threshold"],
            "cascade_exit_threshold": exits["cascade"]["threshold"],
            "rule": exits["coe"]["rule"],
            "num_val": len(self.val_set),
        }
        flops = {
            "delegator": count_flops(coe.delegator.eval(), x) / x.shape[0],
            "expert": count_flops(coe.experts[0].eval(), x) / x.shape[0],
        }
        cache = coe_report.collect_outputs(coe, tb, self.device)
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
            calibrations,
            exits,
            baselines,
            flops,
            self.results,
            self.classes,
            self.compute_seconds,
            self.d.world_size,
            len(self.val_set),
            temperature,
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
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        result["wall_seconds"], result["cpu_seconds"] = round(wall, 1), round(cpu, 1)
        print(
            f"total wall time {wall:.1f}s (process CPU time {cpu:.1f}s, {torch.get_num_threads()} threads)",
            flush=True,
        )
    return result


if __name__ == "__main__":
    main()
