"""BasisNet: a lightweight model previews the input and synthesises a specialist, or exits early.

Zhang, Chu, Zhmoginov, Howard, Jou, Zhu, Zhang, Hwa and Kovashka, "BasisNet: Two-Stage Model Synthesis for
Efficient Inference", CVPR 2021 ECV workshop, arXiv:2105.03014.

Confirmed by the paper's public text: a lightweight model previews the input and generates input-dependent
combination coefficients; they control the synthesis of a specialist model from basis models, which makes the
final prediction; both stages are trained jointly; inference terminates early when the lightweight model's own
prediction is confident enough. **pycoe's formulation** (not confirmed from the paper's text): the coefficients
are ``normalize(logits / temperature)`` with a softmax by default, the lightweight model is a
:class:`~pycoe.twostage.delegator.Delegator` (its selection head with K = N gives the coefficient logits, its rough
head the rough prediction), one coefficient vector per sample is shared by every basis layer, early exit fires
when the rough prediction's maximum softmax probability reaches ``exit_threshold`` (the same rule as
:class:`~pycoe.coe.model.CoE`), and basis dropout is the optional regulariser described below.

Einstein legend: ``b`` batch (B), ``n`` bases (N), ``c`` classes (C).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from pycoe._modules import check_same_dtype_and_device, explain_input_mismatch
from pycoe._validation import (
    check_callable,
    check_choice,
    check_class_targets,
    check_generator,
    check_int_pair,
    check_module,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_tensor,
)
from pycoe.basisnet.specialist import BasisSpecialist
from pycoe.flops import count_flops
from pycoe.functional import COEFFICIENT_NORMALIZATIONS, mixture_coefficients
from pycoe.twostage.delegator import Delegator  # the first stage BasisNet shares with CoE
from pycoe.twostage.model import FirstStage, TwoStageModel

__all__ = [
    "BasisNet",
    "BasisNetOutput",
    "BasisNetTrainOutput",
    "basis_coefficients",
    "basis_dropout",
    "basisnet_loss",
]


def basis_coefficients(logits: torch.Tensor, normalization: str = "softmax", temperature: float = 1.0) -> torch.Tensor:
    """Coefficients from coefficient logits: ``normalize(logits / temperature)``.

    Args:
        logits: ``Tensor[B, N]``.
        normalization: one of :data:`pycoe.functional.COEFFICIENT_NORMALIZATIONS`, the set CondConv's router
            and the conversion use too (:func:`pycoe.functional.mixture_coefficients`): ``"softmax"`` (coefficients
            in (0, 1) summing to 1 per sample: a convex combination of the bases, which keeps a freshly converted
            :class:`BasisSpecialist` equal to its original model), ``"normalized_sigmoid"`` (sigmoids divided by
            their sum: also a convex combination), ``"sigmoid"`` (each in (0, 1), not normalised, as CondConv's
            router) or ``"none"`` (the scaled logits themselves). The paper's choice is not confirmed; softmax is
            pycoe's default.
        temperature: > 0; divides the logits before the normalisation (also for ``"none"``).

    Returns:
        ``Tensor[B, N]``.
    """
    check_tensor("logits", logits, ndim=2, floating=True)
    check_choice("normalization", normalization, COEFFICIENT_NORMALIZATIONS)
    return mixture_coefficients(logits / check_positive_float("temperature", temperature), normalization)


def basis_dropout(
    coefficients: torch.Tensor,
    p: float,
    normalization: str = "softmax",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Drop whole bases per sample (pycoe's formulation of the "basis dropout" regulariser).

    Each coefficient is zeroed independently with probability ``p``; when a sample would lose every basis, one
    basis chosen uniformly at random is kept. The survivors are then rescaled: for coefficients that sum to 1
    (``"softmax"``, ``"normalized_sigmoid"``) they are renormalised to sum to 1 over the kept bases, otherwise
    they are divided by ``1 - p`` (inverted dropout). Gradients flow through the kept coefficients. That BasisNet
    regularises its bases by randomly dropping them is an unverified recollection of the paper (see the guide);
    the rule here is pycoe's.

    Args:
        coefficients: ``Tensor[B, N]``.
        p: drop probability in [0, 1).
        normalization: how the coefficients were normalised (see :func:`basis_coefficients`).
        generator: optional ``torch.Generator`` (on the coefficients' device) for the mask.

    Returns:
        ``Tensor[B, N]``.
    """
    check_tensor("coefficients", coefficients, ndim=2, floating=True)
    p = check_probability("p", p)
    if p == 1.0:
        raise ValueError("p must be in [0, 1), got 1.0 (it would drop every basis)")
    check_choice("normalization", normalization, COEFFICIENT_NORMALIZATIONS)
    check_generator("generator", generator)
    if p == 0.0:
        return coefficients
    batch, num_bases = coefficients.shape
    device = coefficients.device
    keep = torch.rand(batch, num_bases, generator=generator, device=device) >= p  # BoolTensor[B, N]
    rescue = torch.randint(num_bases, (batch,), generator=generator, device=device)
    none_kept = ~keep.any(dim=1)
    keep[none_kept, rescue[none_kept]] = True
    kept = coefficients * keep.to(coefficients.dtype)
    if normalization in ("softmax", "normalized_sigmoid"):
        return kept / kept.sum(dim=1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
    return kept / (1.0 - p)


@dataclass
class BasisNetTrainOutput:
    """What :class:`BasisNet` returns in training mode.

    Attributes:
        output: ``Tensor[B, ...]``, the synthesised specialist's output on every sample (e.g. logits
            ``Tensor[B, C]``).
        coefficients: ``Tensor[B, N]``, the coefficients the specialist used (after basis dropout).
        coefficient_logits: ``Tensor[B, N]``, the lightweight model's coefficient logits.
        rough_logits: ``Tensor[B, C]`` or ``None``, the lightweight model's own prediction.
    """

    output: torch.Tensor
    coefficients: torch.Tensor
    coefficient_logits: torch.Tensor
    rough_logits: torch.Tensor | None


torch.export.register_dataclass(
    BasisNetTrainOutput, serialized_type_name="pycoe.basisnet.BasisNetTrainOutput"
)  # exported models return it too


@dataclass
class BasisNetOutput:
    """What :class:`BasisNet` returns in eval mode.

    Attributes:
        output: ``Tensor[B, ...]``, the specialist's output, or the rough logits for samples that exited early.
        exited: ``BoolTensor[B]``, which samples took the rough prediction and skipped the specialist.
        confidence: ``Tensor[B]``, the rough prediction's maximum softmax probability (``NaN`` without a
            rough head).
        coefficients: ``Tensor[B, N]``, every sample's coefficients (computed for exited samples too).
    """

    output: torch.Tensor
    exited: torch.Tensor
    confidence: torch.Tensor
    coefficients: torch.Tensor


torch.export.register_dataclass(
    BasisNetOutput, serialized_type_name="pycoe.basisnet.BasisNetOutput"
)  # exported models return it too


class BasisNet(TwoStageModel, nn.Module):
    """BasisNet: the lightweight model's coefficients synthesise the specialist; confident samples exit early.

    ``coefficient_logits, rough_logits = lightweight(x)``; ``coefficients = normalize(coefficient_logits /
    temperature)`` (``Tensor[B, N]``); ``output = specialist(x, coefficients)``, where every basis layer of the
    :class:`~pycoe.basisnet.specialist.BasisSpecialist` mixes its N kernels with the sample's coefficients.

    - **Training mode**: the lightweight model and the specialist run on the whole batch; with
      ``basis_dropout > 0`` the coefficients pass through :func:`basis_dropout` first. Returns
      :class:`BasisNetTrainOutput`. Train both stages jointly, e.g. with :func:`basisnet_loss`.
    - **Eval mode**: returns :class:`BasisNetOutput`. Samples whose rough prediction has maximum softmax
      probability ``>= exit_threshold`` take the rough logits and never reach the specialist; the rest run
      the specialist in one batch with their own coefficients. This is :class:`~pycoe.coe.model.CoE`'s rule, of
      :mod:`pycoe.twostage.rule` (``0`` exits every sample whose confidence is a number: a NaN confidence never
      exits; ``1`` only samples predicted with probability 1; ``None`` never exits). Average cost: lightweight +
      (1 - exit rate) x specialist. BasisNet is a :class:`~pycoe.twostage.model.TwoStageModel` (lightweight model,
      then specialist), so :func:`~pycoe.twostage.evaluate.predict`, :func:`~pycoe.twostage.evaluate.threshold_sweep`
      and :func:`~pycoe.twostage.calibrate.calibrate_exit_threshold` take it.

    Args:
        lightweight: a :class:`~pycoe.twostage.delegator.Delegator` built with ``num_experts=num_bases`` (used as is),
            or any backbone, which is wrapped as ``Delegator(lightweight, num_experts=num_bases,
            num_classes=num_classes)`` (its classifier stripped in place; see the Delegator for the options, and
            build one yourself to use them). The Delegator's zero-initialised selection head gives uniform
            coefficients at the start.
        specialist: a :class:`~pycoe.basisnet.specialist.BasisSpecialist` with ``num_bases`` bases, or a plain
            model, converted in place with ``BasisSpecialist(specialist, num_bases)`` (default options).
        num_bases: N >= 1.
        num_classes: C, classes of the rough prediction (default: the Delegator's); ``None`` for no rough head
            (then no early exit).
        temperature: > 0, divides the coefficient logits.
        exit_threshold: early-exit threshold in [0, 1], or ``None`` (never exit).
        normalization: ``"softmax"`` (default), ``"sigmoid"`` or ``"none"``, see :func:`basis_coefficients`.
        basis_dropout: probability in [0, 1) of dropping a basis per sample during training (default 0).
        preview_size: ``None`` (the lightweight model sees ``x`` as is) or an int / ``(h, w)``: ``x`` is resized
            (bilinear, antialiased) to that size for the lightweight model only.

    Attributes:
        lightweight (Delegator), specialist (BasisSpecialist), num_bases, num_classes, temperature,
        normalization, basis_dropout, preview_size, exit_threshold (settable; validated).

    Example:
        >>> import torchvision
        >>> net = BasisNet(torchvision.models.mobilenet_v3_small(), torchvision.models.resnet18(num_classes=10),
        ...                num_bases=4, num_classes=10, exit_threshold=0.9).eval()
        >>> out = net(torch.randn(2, 3, 64, 64))
        >>> out.output.shape, out.coefficients.shape
        (torch.Size([2, 10]), torch.Size([2, 4]))
    """

    first_stage_name = "the lightweight model"
    second_stage_name = "the specialist"
    flops_keys = ("lightweight", "specialist")

    def __init__(
        self,
        lightweight: nn.Module,
        specialist: nn.Module,
        num_bases: int,
        num_classes: int | None = None,
        temperature: float = 1.0,
        exit_threshold: float | None = None,
        normalization: str = "softmax",
        basis_dropout: float = 0.0,
        preview_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        num_bases = check_positive_int("num_bases", num_bases)
        if num_classes is not None:
            num_classes = check_positive_int("num_classes", num_classes)
        self.temperature = check_positive_float("temperature", temperature)
        self.normalization = check_choice("normalization", normalization, COEFFICIENT_NORMALIZATIONS)
        p = check_probability("basis_dropout", basis_dropout)
        if p == 1.0:
            raise ValueError("basis_dropout must be in [0, 1), got 1.0 (it would drop every basis)")
        self.basis_dropout = p
        self.preview_size = None if preview_size is None else check_int_pair("preview_size", preview_size, minimum=1)
        check_module("lightweight", lightweight)
        check_module("specialist", specialist)

        if isinstance(specialist, BasisSpecialist):
            if specialist.num_bases != num_bases:
                raise ValueError(
                    f"the specialist has num_bases={specialist.num_bases} but num_bases={num_bases} was given"
                )
        else:
            specialist = BasisSpecialist(specialist, num_bases)
        if isinstance(lightweight, Delegator):
            if lightweight.num_experts != num_bases:
                raise ValueError(
                    f"the lightweight Delegator has num_experts={lightweight.num_experts} selection outputs but "
                    f"num_bases={num_bases}; build it with num_experts={num_bases}"
                )
            if num_classes is None:
                num_classes = lightweight.num_classes
            elif lightweight.num_classes != num_classes:
                raise ValueError(
                    f"the lightweight Delegator has num_classes={lightweight.num_classes} but "
                    f"num_classes={num_classes} was given"
                )
        else:
            lightweight = Delegator(lightweight, num_experts=num_bases, num_classes=num_classes)
        check_same_dtype_and_device([("the lightweight model", lightweight), ("the specialist", specialist)])
        self.lightweight = lightweight
        self.specialist = specialist
        self.num_bases = num_bases
        self.num_classes = num_classes
        self.exit_threshold = exit_threshold

    @property
    def has_rough_head(self) -> bool:
        """Whether the lightweight model has a rough head (``num_classes`` is not ``None``)."""
        return self.num_classes is not None

    def extra_repr(self) -> str:
        return (
            f"num_bases={self.num_bases}, num_classes={self.num_classes}, temperature={self.temperature}, "
            f"normalization={self.normalization!r}, basis_dropout={self.basis_dropout}, "
            f"preview_size={self.preview_size}, exit_threshold={self.exit_threshold}"
        )

    # ------------------------------------------------------------------ pieces
    def preview(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run the lightweight model (no basis dropout).

        Args:
            x: ``Tensor[B, C_in, H, W]``.

        Returns:
            ``(coefficients Tensor[B, N], coefficient_logits Tensor[B, N], rough_logits Tensor[B, C] or None)``.
        """
        check_tensor("x", x, batch_first=True)
        small = x
        if self.preview_size is not None:
            if x.dim() != 4:
                raise ValueError(f"preview_size needs an image batch x of shape [B, C, H, W], got {tuple(x.shape)}")
            small = F.interpolate(x, size=self.preview_size, mode="bilinear", align_corners=False, antialias=True)
        try:
            d = self.lightweight(small)
        except (RuntimeError, TypeError) as err:
            mismatch = explain_input_mismatch(err, "the lightweight model", self.lightweight, small)
            if mismatch is None:
                raise
            raise mismatch from err
        logits, rough = d.selection_logits, d.rough_logits
        coefficients = basis_coefficients(logits, self.normalization, self.temperature)
        return coefficients, logits, rough

    # ------------------------------------------------------------------ the two-stage protocol
    def _input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The one input ``x`` of ``model(x)`` or ``model(x=x)``."""
        if len(args) + len(kwargs) != 1 or (kwargs and "x" not in kwargs):
            given = [type(a).__name__ for a in args] + [f"{k}=" for k in kwargs]
            raise ValueError(f"a BasisNet takes one input x (model(x) or model(x=x)), got {len(given)}: {given}")
        return args[0] if args else kwargs["x"]

    def run_first_stage(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> FirstStage:
        """The lightweight model (:meth:`preview`): rough logits, and the coefficients as the specialist's plan."""
        coefficients, _, rough = self.preview(self._input(args, kwargs))
        return FirstStage(rough_logits=rough, plan=coefficients)

    def run_second_stage(
        self, first: FirstStage, args: tuple[Any, ...], kwargs: dict[str, Any], keep: torch.Tensor | None
    ) -> torch.Tensor:
        """The specialist on the rows ``keep`` (``None``: all), each with its own coefficients."""
        x, coefficients = self._input(args, kwargs), first.plan
        if keep is None:
            return self.specialist(x, coefficients)
        return self.specialist(x.index_select(0, keep), coefficients.index_select(0, keep))

    def count_stage_flops(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[float, list[float]]:
        """FLOPs of the lightweight model (:meth:`preview`) and of the specialist on these inputs."""
        x = self._input(args, kwargs)
        coefficients = self.preview(x)[0]
        preview = cast(nn.Module, self.preview)  # count_flops takes any callable
        return float(count_flops(preview, x)), [float(count_flops(self.specialist, x, coefficients))]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> BasisNetTrainOutput | BasisNetOutput:
        """Training mode: :class:`BasisNetTrainOutput`; eval mode: :class:`BasisNetOutput` (class docstring)."""
        if self.training:
            return self.forward_train(x)
        return self.forward_eval(x)

    def forward_train(self, x: torch.Tensor) -> BasisNetTrainOutput:
        """Lightweight model and specialist on the whole batch, whatever the module's mode.

        Basis dropout is applied only when the module is in training mode.

        Args:
            x: ``Tensor[B, C_in, H, W]``.

        Returns:
            :class:`BasisNetTrainOutput`.
        """
        coefficients, logits, rough = self.preview(x)
        mixed = coefficients
        if self.training and self.basis_dropout > 0:
            mixed = basis_dropout(coefficients, self.basis_dropout, self.normalization)
        output = self.specialist(x, mixed)
        if isinstance(output, torch.Tensor):
            self._observe_second_stage(tuple(output.shape[1:]), rough)
        return BasisNetTrainOutput(output=output, coefficients=mixed, coefficient_logits=logits, rough_logits=rough)

    def forward_eval(self, x: torch.Tensor, exit_threshold: float | str | None = "default") -> BasisNetOutput:
        """Early exit, then the specialist on the remaining samples in one batch, whatever the module's mode.

        Args:
            x: ``Tensor[B, C_in, H, W]``.
            exit_threshold: overrides ``self.exit_threshold`` for this call (``"default"``: use it).

        Returns:
            :class:`BasisNetOutput`.
        """
        output, exited, confidence, first = self.forward_with_exit((x,), {}, exit_threshold)
        coefficients = first.plan
        return BasisNetOutput(output=output, exited=exited, confidence=confidence, coefficients=coefficients)


def basisnet_loss(
    output: BasisNetTrainOutput,
    target: torch.Tensor,
    rough_weight: float = 1.0,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Joint loss of the two stages: ``criterion(output) + rough_weight * criterion(rough_logits)``.

    The specialist's loss trains the bases and, through the coefficients, the lightweight model's coefficient
    head and backbone; the rough term trains the rough head used for early exit. pycoe's minimal formulation:
    the paper's recipes (e.g. distillation from a teacher) are not confirmed and are left to the user, who can
    pass any ``criterion``.

    Args:
        output: a :class:`BasisNetTrainOutput`.
        target: the targets, e.g. ``LongTensor[B]`` class indices.
        rough_weight: >= 0 weight of the rough term (ignored when there is no rough head).
        criterion: ``(prediction, target) -> scalar``; default ``torch.nn.functional.cross_entropy``.

    Returns:
        ``(loss Tensor[], info)`` with ``info = {"specialist": ..., "rough": ...}`` (detached scalars; "rough"
        only with a rough head). A batch of 0 samples gives a zero loss attached to the graph.
    """
    if not isinstance(output, BasisNetTrainOutput):
        raise TypeError(
            f"output must be a BasisNetTrainOutput (BasisNet in training mode), got {type(output).__name__}"
        )
    check_nonnegative_float("rough_weight", rough_weight)
    check_callable("criterion", criterion, allow_none=True, expected="(prediction, target) -> scalar")
    if criterion is None:
        criterion = F.cross_entropy
        if isinstance(output.output, torch.Tensor) and output.output.dim() == 2:
            check_class_targets("target", target, output.output.shape[0], output.output.shape[1], probabilities=True)

    def scalar(value: Any, what: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"criterion must return a scalar loss tensor, got {shape} for the {what}")
        return value.reshape(())

    if isinstance(output.output, torch.Tensor) and output.output.dim() > 0 and output.output.shape[0] == 0:
        # a batch of 0 samples: a zero loss attached to the graph (a mean over no sample would be NaN)
        loss = output.output.sum() * 0.0
        info = {"specialist": loss.detach()}
        if output.rough_logits is not None:
            loss = loss + output.rough_logits.sum() * 0.0
            info["rough"] = info["specialist"].clone()
        return loss, info
    specialist_loss = scalar(criterion(output.output, target), "specialist's output")
    info = {"specialist": specialist_loss.detach()}
    loss = specialist_loss
    if output.rough_logits is not None:
        rough_loss = scalar(criterion(output.rough_logits, target), "rough logits")
        info["rough"] = rough_loss.detach()
        loss = loss + rough_weight * rough_loss
    return loss, info
