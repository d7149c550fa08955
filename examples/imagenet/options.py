"""The command line of ``train_coe.py``: the options, their defaults that depend on each other, their checks.

Each option group has its function; :func:`finalize_args` fills the defaults that depend on the data set and the
networks (``resnet18`` and ``mobilenet_v3_small`` for ImageFolder, small CNNs otherwise, ...) and refuses values
that could only fail later, with the option's name in the message.
"""

from __future__ import annotations

import argparse

__all__ = ["LABELLED_THRESHOLDS", "build_parser", "finalize_args"]

LABELLED_THRESHOLDS = "0.5,0.6,0.7,0.8,0.85,0.9,0.95,0.97,0.98,0.99,0.995,0.999"


def build_parser() -> argparse.ArgumentParser:
    """The options of ``train_coe.py``, in groups (``--help`` lists them with their defaults)."""
    p = argparse.ArgumentParser(
        prog="python -m examples.imagenet.train_coe",
        description="Collaboration of Experts with pycoe: the staged recipe (universal expert -> K copies -> "
        "delegator -> joint WGM + LGM training), baselines, an accuracy-FLOPs table and figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_options(p.add_argument_group("data"))
    _models_options(p.add_argument_group("models"))
    _recipe_options(p.add_argument_group("CoE recipe"))
    _early_exit_options(p.add_argument_group("early exit (chosen on the validation split, reported on the test set)"))
    _baselines_options(p.add_argument_group("baselines"))
    _optimisation_options(p.add_argument_group("optimisation"))
    _run_options(p.add_argument_group("run"))
    return p


def _data_options(g: argparse._ArgumentGroup) -> None:
    """Which data set, where, and how much of it: the training subset, the validation split, the test subset."""
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


def _models_options(g: argparse._ArgumentGroup) -> None:
    """The expert's and the delegator's networks, and their PWLU / CondConv variants."""
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


def _recipe_options(g: argparse._ArgumentGroup) -> None:
    """The stages' epochs and the joint stage's WGM and LGM."""
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


def _early_exit_options(g: argparse._ArgumentGroup) -> None:
    """How the exit threshold is chosen on the validation split."""
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


def _baselines_options(g: argparse._ArgumentGroup) -> None:
    """The single networks trained beside the CoE."""
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


def _optimisation_options(g: argparse._ArgumentGroup) -> None:
    """SGD, its schedule, the seed and the hardware."""
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


def _run_options(g: argparse._ArgumentGroup) -> None:
    """Outputs, checkpoints and resuming."""
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


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other options and check every value (``ValueError`` naming the option).

    Also sets ``args.threshold_list`` (the parsed ``--thresholds``). Returns ``args``.
    """
    _network_defaults(args)
    _data_defaults(args)
    if args.baselines is None:
        w = args.expert_width
        args.baselines = f"{0.5 * w:g},{1.5 * w:g}" if args.expert == "cnn" else ""
    if args.wgm_scope == "auto":
        args.wgm_scope = "global"  # identical to "batch" without a process group
    _check_recipe(args)
    _exit_budget(args)
    args.threshold_list = _parse_thresholds(args.thresholds)
    return args


def _network_defaults(args: argparse.Namespace) -> None:
    """torchvision's resnet18 expert and mobilenet_v3_small delegator for ImageFolder, the small CNNs otherwise."""
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


def _data_defaults(args: argparse.Namespace) -> None:
    """Image size, training subset and validation split per data set (ImageFolder's validation size is set when
    its folder is read)."""
    if args.image_size is None:
        args.image_size = 224 if args.dataset == "imagefolder" else 28
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


def _check_recipe(args: argparse.Namespace) -> None:
    """Counts are positive, epochs non-negative, ``--epsilon`` and ``--exit-threshold`` in [0, 1]."""
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


def _exit_budget(args: argparse.Namespace) -> None:
    """One budget for the exit threshold: ``--max-accuracy-drop`` (a fraction, 0.003 by default) or
    ``--max-mflops``."""
    if args.max_accuracy_drop is not None and args.max_mflops is not None:
        raise ValueError("give at most one of --max-accuracy-drop and --max-mflops")
    if args.max_mflops is None and args.max_accuracy_drop is None:
        args.max_accuracy_drop = 0.003
    if args.max_accuracy_drop is not None and not 0.0 <= args.max_accuracy_drop <= 1.0:
        raise ValueError(f"--max-accuracy-drop must be in [0, 1], got {args.max_accuracy_drop}")
    if args.max_mflops is not None and not args.max_mflops > 0:
        raise ValueError(f"--max-mflops must be > 0, got {args.max_mflops}")


def _parse_thresholds(text: str) -> list[float]:
    """``--thresholds``: comma-separated numbers in [0, 1], returned sorted without repeats."""
    try:
        thresholds = sorted({float(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--thresholds must be numbers in [0, 1], got {text!r}") from None
    if any(not 0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"--thresholds must be numbers in [0, 1], got {text!r}")
    return thresholds
