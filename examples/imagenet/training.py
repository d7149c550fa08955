"""The training loop of the CoE example: stages (phases), optimiser and schedule, one epoch, plain accuracy.

Every network of the example is trained by :func:`train_epoch` in one of three kinds of phase: ``supervised``
(cross-entropy of a single network: the universal expert and the baselines), ``rough`` (cross-entropy of the
delegator's rough head) and ``joint`` (:class:`pycoe.coe.loss.CoELoss` on the CoE in training mode: WGM + LGM).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from examples.imagenet.runtime import Dist
from pycoe.coe.loss import CoELoss
from pycoe.routing.labels import LabelGenerator
from pycoe.routing.weighting import BalancedTransportWeighter

__all__ = [
    "Phase",
    "plan_phases",
    "cosine_lambda",
    "make_optimizer",
    "realign_if_needed",
    "make_criterion",
    "step_loss",
    "train_epoch",
    "to_device",
    "accuracy",
]


@dataclass
class Phase:
    name: str  # "universal", "delegator", "joint", "baseline:<key>:pre" / ":fine"
    kind: str  # "supervised" | "rough" | "joint"
    model: str  # key in the model registry
    epochs: int


def plan_phases(args, baseline_keys: list[str]) -> list[Phase]:
    """The stages in order: universal expert, delegator, joint CoE training, then the single-network baselines.

    The expert-architecture baseline continues the universal expert for ``--epochs-joint`` epochs (its
    ``:fine`` phase only); every other baseline gets ``--epochs-universal`` then ``--epochs-joint`` epochs.
    """
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


def cosine_lambda(total_steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 0, as a multiplier of the peak learning rate."""
    warmup = min(warmup, max(total_steps // 5, 0))

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(args, module: nn.Module, steps: int):
    """SGD with Nesterov momentum (no weight decay on biases and norms) and the warm-up + cosine schedule."""
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


def to_device(x: torch.Tensor, device, args) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if not args.no_channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_criterion(args) -> CoELoss:
    """The joint stage's loss: WGM (balanced transport) and LGM (labels from the experts' losses) in CoELoss."""
    weighter = BalancedTransportWeighter(
        args.num_experts, epsilon=args.epsilon, score=args.score, method=args.wgm_method, scope=args.wgm_scope
    )
    labeler = LabelGenerator(args.lgm, temperature=args.lgm_temperature)
    return CoELoss(weighter, labeler, selection_weight=args.selection_weight, rough_weight=args.rough_weight)


def step_loss(phase: Phase, wrapped: nn.Module, criterion, x: torch.Tensor, y: torch.Tensor):
    """The loss of one batch in ``phase`` and its scalar statistics (``loss``, and ``acc`` or CoELoss's parts)."""
    if phase.kind == "supervised":
        logits = wrapped(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.item(), "acc": (logits.argmax(1) == y).float().mean().item()}
    out = wrapped(x)
    if phase.kind == "rough":
        loss = F.cross_entropy(out.rough_logits, y) + 0.0 * out.selection_logits.sum()  # every param used
        return loss, {"loss": loss.item(), "acc": (out.rough_logits.argmax(1) == y).float().mean().item()}
    loss, info = criterion(out, y)
    stats = {"loss": loss.item()}
    for k, v in info.items():
        if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1):
            stats[k] = float(v)
    return loss, stats


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
    """One epoch of ``phase``; returns the epoch means of the loss and of the scalar statistics."""
    module.train()
    show = d.main and not args.no_progress
    bar = tqdm(total=len(batches), desc=desc, disable=not show, leave=False, dynamic_ncols=True, mininterval=1.0)
    sums: dict[str, float] = {}
    count = 0
    for x, y in batches:
        x, y = to_device(x, device, args), y.to(device, non_blocking=True)
        loss, stats = step_loss(phase, wrapped, criterion, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        if show:
            bar.set_postfix({k: f"{sums[k] / count:.3f}" for k in list(sums)[:4]}, refresh=False)
        bar.update(1)
    bar.close()
    return {k: v / max(count, 1) for k, v in sums.items()}


@torch.no_grad()
def accuracy(module: nn.Module, batches, device, args, rough: bool = False) -> float:
    """Top-1 accuracy of a network (or of a delegator's rough head) over ``batches``, in eval mode."""
    module.eval()
    correct = total = 0
    for x, y in batches:
        out = module(to_device(x, device, args))
        logits = out.rough_logits if rough else out
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)
