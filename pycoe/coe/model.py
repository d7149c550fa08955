"""The Collaboration of Experts model: a delegator, K experts, and early termination.

Collaboration of Experts (CoE; Zhang, Chen and Zhong, "Collaboration of Experts: Achieving 80% Top-1 Accuracy on
ImageNet with 100M FLOPs", ICML 2022, arXiv:2107.03815). What the public abstract confirms: a delegator selects
one expert per sample and simultaneously outputs a rough prediction that supports early termination; each expert
is an individual network. The early-termination *rule* used here (exit when the rough prediction's maximum
softmax probability reaches ``exit_threshold``) and the dispatch details are **pycoe's formulation**.

Einstein legend: ``b`` sample (B), ``k`` expert (K), ``c`` class (C), ``...`` an expert's output dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._inputs import (
    LABEL_NAMES,
    batch_size,
    batched_names,
    map_batched,
    select_inputs,
    split_labels,
)
from .._modules import check_same_dtype_and_device, explain_call_error
from .._validation import check_module
from ..flops import count_flops
from ..twostage.delegator import DelegatorOutput
from ..twostage.model import FirstStage, TwoStageModel
from ..twostage.rule import exit_decision, resolve_exit_threshold
from .experts import ExpertPool

__all__ = ["CoE", "CoEOutput", "CoETrainOutput"]


@dataclass
class CoETrainOutput:
    """What :class:`CoE` returns in training mode (input of :class:`~pycoe.coe.loss.CoELoss`).

    Attributes:
        selection_logits: Tensor[B, K], the delegator's expert-selection logits.
        rough_logits: Tensor[B, C] or ``None``, the delegator's rough class logits.
        expert_outputs: Tensor[K, B, ...], every expert's output on the whole batch.
        labels: the ``labels`` keyword input of the call (the batch's targets, taken out of the inputs: no model
            receives them), or ``None``; :class:`~pycoe.coe.loss.CoELoss` uses them when it is given no target.
    """

    selection_logits: torch.Tensor
    rough_logits: torch.Tensor | None
    expert_outputs: torch.Tensor
    labels: Any = None


torch.export.register_dataclass(
    CoETrainOutput, serialized_type_name="pycoe.coe.CoETrainOutput"
)  # exported models return it too


@dataclass
class CoEOutput:
    """What :class:`CoE` returns in eval mode.

    Attributes:
        output: Tensor[B, ...], the final prediction: the chosen expert's output, or the rough logits for
            samples that exited early.
        expert_index: LongTensor[B], the expert each sample was sent to, ``-1`` where it exited early.
        exited: BoolTensor[B], which samples took the rough prediction and skipped the experts.
        confidence: Tensor[B], the maximum softmax probability of the rough prediction (``NaN`` when the
            delegator has no rough head).
    """

    output: torch.Tensor
    expert_index: torch.Tensor
    exited: torch.Tensor
    confidence: torch.Tensor


torch.export.register_dataclass(CoEOutput, serialized_type_name="pycoe.coe.CoEOutput")  # exported models return it too


def _as_delegator_output(out: Any) -> DelegatorOutput:
    """Accept a :class:`DelegatorOutput` (or anything with ``selection_logits``), a tensor of selection logits,
    or a ``(selection_logits, rough_logits)`` tuple, so that user-written delegators work too."""
    if isinstance(out, DelegatorOutput):
        return out
    if isinstance(out, torch.Tensor):
        return DelegatorOutput(out, None)
    if hasattr(out, "selection_logits"):
        return DelegatorOutput(out.selection_logits, getattr(out, "rough_logits", None))
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return DelegatorOutput(out[0], out[1])
    raise TypeError(
        "the delegator must return a DelegatorOutput, a Tensor[B, K] of selection logits, or a "
        f"(selection_logits, rough_logits) pair, got {type(out).__name__}"
    )


def _split_labels(kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """``(kwargs without the labels, the labels or None)``."""
    if not any(name in kwargs for name in LABEL_NAMES):
        return kwargs, None
    return split_labels(kwargs)


def _check_delegator_inputs(value: Any) -> list[int | str] | None:
    """``None``, or a non-empty list of positional indices (int) and keyword names (str)."""
    if value is None:
        return None
    if isinstance(value, (str, int)) or not isinstance(value, Sequence):
        raise TypeError(
            "delegator_inputs must be None (the delegator receives every input) or a list of positional indices "
            f"and keyword names, e.g. [0] or ['input_ids', 'attention_mask'], got {value!r}"
        )
    items = list(value)
    if not items:
        raise ValueError("delegator_inputs must name at least one input (or be None for all of them), got []")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise TypeError(
                "delegator_inputs must hold positional indices (int) and keyword names (str), got "
                f"{type(item).__name__} {item!r}"
            )
    return items


def _vocab_size(module: nn.Module) -> int | None:
    """``config.vocab_size`` of a Hugging Face model (duck-typed), else ``None``."""
    size = getattr(getattr(module, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _check_same_vocabulary(delegator: nn.Module, experts: ExpertPool, delegator_inputs: list | None) -> None:
    """A delegator and experts that read the same token ids must share a vocabulary size (Hugging Face configs)."""
    if delegator_inputs is not None and not ({0, "input_ids"} & set(delegator_inputs)):
        return  # the delegator reads its own tokens
    mine = _vocab_size(getattr(delegator, "backbone", delegator))
    if mine is None:
        return
    for k, expert in enumerate(experts):
        theirs = _vocab_size(expert)
        if theirs is not None and theirs != mine:
            raise ValueError(
                f"the delegator's backbone has vocab_size={mine} but experts[{k}] has vocab_size={theirs}: both read "
                "the same input_ids (the tokens of one tokenizer), so their vocabularies must agree. Build both from "
                "configs with the tokenizer's vocab_size, or give the delegator its own inputs (delegator_inputs=...)"
            )


class CoE(TwoStageModel, nn.Module):
    """A Collaboration of Experts: the delegator picks one expert per sample, or exits early.

    - **Training mode** (``model.train()``): the delegator and *every* expert run on the whole batch (the WGM
      weights and LGM labels of :class:`~pycoe.coe.loss.CoELoss` need every expert's loss on every sample);
      returns :class:`CoETrainOutput`.
    - **Eval mode** (``model.eval()``): returns :class:`CoEOutput`. Samples whose rough prediction has maximum
      softmax probability ``>= exit_threshold`` take the rough logits and never reach an expert; the others go
      to their argmax expert, batched by expert (one forward per expert that received samples). Ties in the
      selection logits go to the lowest expert index.

    **Inputs.** A CoE is called the way its experts are: ``model(x)``, ``model(src, tgt_in)``, or ``model(**batch)``
    with a dict or a tokenizer's ``BatchEncoding`` (positional and keyword inputs may be mixed). The batch size B is
    dim 0 of the first tensor of dimension >= 1 among the positional, then the keyword inputs; every positional
    tensor input must be batch-first with that B, and the tensors (positional or keyword) whose dim 0 is B are the
    batched inputs, split with the samples in eval mode (other arguments go unchanged to every expert). A
    ``labels`` keyword input holds the targets: it is taken out of the inputs (no delegator or expert receives it)
    and returned on :class:`CoETrainOutput` in training, so that ``criterion(model(**batch))`` needs no target.
    The experts receive all the other inputs; the delegator too, unless ``delegator_inputs`` selects a subset
    (e.g. ``[0]`` for a translation model whose delegator reads only the source of ``model(src, tgt_in)``, or
    ``["input_ids", "attention_mask"]``). A text delegator needs the attention mask, or padding changes its
    routing.

    **Early exit and output shapes.** Exiting replaces a sample's output by its rough logits ``Tensor[C]``, so it
    needs a delegator with a rough head (``num_classes``) and experts whose per-sample output is also
    ``Tensor[C]`` (classification). For other tasks (e.g. sequence models with outputs ``[B, T, V]``) keep
    ``exit_threshold=None``: the rough head can still be trained as an auxiliary task. With a threshold, the first
    forward (train or eval) raises a ``ValueError`` when the rough head's per-sample shape differs from the
    experts', whether or not a sample exits; in eval mode, if the experts' output shape has not been seen yet,
    expert 0 runs once on one sample to learn it.

    **Two stages.** A CoE is a :class:`~pycoe.twostage.model.TwoStageModel`: the delegator is its first stage, the
    chosen expert its second (each expert a path with its own cost), so :func:`~pycoe.twostage.evaluate.predict`,
    :func:`~pycoe.twostage.evaluate.threshold_sweep` and :func:`~pycoe.twostage.calibrate.calibrate_exit_threshold`
    take it; the cascade baseline is a CoE with one expert.

    **Checks.** The delegator and the experts must share a dtype and device (checked at construction); an input
    of another dtype or device raises a ``TypeError`` naming the component that received it. A batch of 0
    samples returns empty outputs of the right shape in both modes.

    Args:
        delegator: usually a :class:`~pycoe.twostage.delegator.Delegator`; any module returning a
            :class:`~pycoe.twostage.delegator.DelegatorOutput` (or a ``Tensor[B, K]`` of selection logits, or a
            ``(selection_logits, rough_logits)`` pair) works.
        experts: an :class:`~pycoe.coe.experts.ExpertPool`, or a sequence of modules (wrapped in one).
        exit_threshold: early-exit threshold in [0, 1], or ``None`` (default) to never exit. ``0`` exits every
            sample whose confidence is a number (a NaN confidence never exits: :mod:`pycoe.twostage.rule`), ``1``
            exits only samples predicted with probability 1.
        delegator_inputs: which of the call's inputs the delegator receives: ``None`` (default) for all of them
            (labels excepted), or a list of positional indices and keyword names (a name absent from a call is
            skipped, e.g. an optional ``token_type_ids``).

    Attributes:
        delegator (nn.Module): the delegator.
        experts (ExpertPool): the K experts.

    Example:
        >>> import torchvision
        >>> delegator = Delegator(torchvision.models.mobilenet_v3_small(), num_experts=2, num_classes=10)
        >>> experts = ExpertPool.from_template(torchvision.models.resnet18(num_classes=10), num_experts=2)
        >>> model = CoE(delegator, experts, exit_threshold=0.9).eval()
        >>> out = model(torch.randn(3, 3, 64, 64))
        >>> out.output.shape, out.expert_index.shape
        (torch.Size([3, 10]), torch.Size([3]))
    """

    first_stage_name = "the delegator"
    second_stage_name = "the experts"
    path_name = "expert"
    flops_keys = ("delegator", "experts")

    def __init__(
        self,
        delegator: nn.Module,
        experts: ExpertPool | Sequence[nn.Module],
        exit_threshold: float | None = None,
        delegator_inputs: Sequence[int | str] | None = None,
    ) -> None:
        super().__init__()
        check_module("delegator", delegator)
        if not isinstance(experts, ExpertPool):
            experts = ExpertPool(experts)
        k_delegator = getattr(delegator, "num_experts", None)
        if isinstance(k_delegator, int) and k_delegator != experts.num_experts:
            raise ValueError(
                f"the delegator chooses among num_experts={k_delegator} experts but the expert pool holds "
                f"{experts.num_experts}; build the Delegator with num_experts={experts.num_experts}"
            )
        check_same_dtype_and_device(
            [("the delegator", delegator), *((f"experts[{k}]", e) for k, e in enumerate(experts))]
        )
        self.delegator_inputs = _check_delegator_inputs(delegator_inputs)
        _check_same_vocabulary(delegator, experts, self.delegator_inputs)
        self.delegator = delegator
        self.experts = experts
        self.exit_threshold = exit_threshold

    @property
    def num_experts(self) -> int:
        """K, the number of experts."""
        return self.experts.num_experts

    @property
    def num_paths(self) -> int:
        """K: each expert is a second-stage path with its own cost (the two-stage protocol)."""
        return self.experts.num_experts

    @property
    def has_rough_head(self) -> bool:
        """Whether the delegator has a rough head (``True`` for a delegator without a ``num_classes`` attribute)."""
        return getattr(self.delegator, "num_classes", 0) is not None

    def extra_repr(self) -> str:
        extra = "" if self.delegator_inputs is None else f", delegator_inputs={self.delegator_inputs}"
        return f"num_experts={self.num_experts}, exit_threshold={self.exit_threshold}{extra}"

    # ------------------------------------------------------------------ pieces
    def _check_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any, int]:
        """``(kwargs without the labels, the labels or None, B)``; every positional tensor must be batched on B."""
        kwargs, labels = _split_labels(kwargs)
        batch = batch_size(args, kwargs, what="CoE")
        for i, v in enumerate(args):
            if isinstance(v, torch.Tensor) and (v.dim() == 0 or v.shape[0] != batch):
                raise ValueError(
                    f"every positional input must be batch-first with the same batch size: the batch has B={batch} "
                    f"but positional input {i} has shape {tuple(v.shape)}"
                )
        return kwargs, labels, batch

    def delegate(self, *args: Any, **kwargs: Any) -> DelegatorOutput:
        """Run the delegator on the call's inputs (those ``delegator_inputs`` selects) and check its outputs.

        Args:
            *args: the positional inputs of a call of the CoE (``model.delegate(x)``).
            **kwargs: its keyword inputs (``model.delegate(**batch)``); ``labels`` are ignored.

        Returns:
            :class:`~pycoe.twostage.delegator.DelegatorOutput`: selection_logits Tensor[B, K], rough_logits
            Tensor[B, C] or ``None``.
        """
        kwargs, _, batch = self._check_inputs(args, kwargs)
        return self._delegate(args, kwargs, batch)

    def _delegate(self, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int) -> DelegatorOutput:
        d_args, d_kwargs = select_inputs(args, kwargs, self.delegator_inputs)
        if self.delegator_inputs is not None:
            batch_size(d_args, d_kwargs, what=f"the delegator (delegator_inputs={self.delegator_inputs})")
        try:
            raw = self.delegator(*d_args, **d_kwargs)
        except (RuntimeError, TypeError) as err:
            explained = explain_call_error(err, "the delegator", self.delegator, d_args, d_kwargs)
            if explained is None:
                raise
            raise explained from err
        out = _as_delegator_output(raw)
        sel, rough = out.selection_logits, out.rough_logits
        if not isinstance(sel, torch.Tensor) or sel.dim() != 2 or sel.shape != (batch, self.num_experts):
            shape = tuple(sel.shape) if isinstance(sel, torch.Tensor) else type(sel).__name__
            raise ValueError(
                f"the delegator's selection_logits must have shape [B={batch}, K={self.num_experts}] (K = the "
                f"number of experts in the pool), got {shape}"
            )
        if rough is not None and (not isinstance(rough, torch.Tensor) or rough.dim() != 2 or rough.shape[0] != batch):
            shape = tuple(rough.shape) if isinstance(rough, torch.Tensor) else type(rough).__name__
            raise ValueError(f"the delegator's rough_logits must have shape [B={batch}, C], got {shape}")
        return out

    def route(
        self, delegator_output: DelegatorOutput, exit_threshold: float | str | None = "default"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routing decision from a delegator output, without running any expert.

        Args:
            delegator_output: from :meth:`delegate`.
            exit_threshold: a threshold in [0, 1], ``None`` (never exit), or ``"default"`` for
                ``self.exit_threshold``.

        Returns:
            ``(expert_index LongTensor[B] (-1 where exited), exited BoolTensor[B], confidence Tensor[B])``.
        """
        if not isinstance(delegator_output, DelegatorOutput):
            raise TypeError(
                "delegator_output must be a DelegatorOutput (the result of model.delegate(x)), got "
                f"{type(delegator_output).__name__}"
            )
        threshold = resolve_exit_threshold(exit_threshold, self.exit_threshold)
        sel, rough = delegator_output.selection_logits, delegator_output.rough_logits
        choice = sel.argmax(dim=1)
        confidence, exited = exit_decision(rough, threshold, sel.shape[0], sel.device, source="the delegator")
        expert_index = torch.where(exited, torch.full_like(choice, -1), choice)
        return expert_index, exited, confidence

    # ------------------------------------------------------------------ the two-stage protocol
    def run_first_stage(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> FirstStage:
        """The delegator on the inputs it selects: rough logits, and the chosen expert of each sample (its plan and
        its path)."""
        kwargs, _, batch = self._check_inputs(args, kwargs)
        d = self._delegate(args, kwargs, batch)
        choice = d.selection_logits.argmax(dim=1)
        return FirstStage(rough_logits=d.rough_logits, plan=choice, path=choice)

    def run_second_stage(
        self, first: FirstStage, args: tuple[Any, ...], kwargs: dict[str, Any], keep: torch.Tensor | None
    ) -> torch.Tensor:
        """Each sample of the rows ``keep`` (``None``: all) through its chosen expert, batched by expert."""
        if keep is None:
            return self.experts.forward_routed(first.plan, *args, **kwargs)
        names = batched_names(args, kwargs, batch_size(args, kwargs, "the CoE"))
        sub_args, sub_kwargs = map_batched(args, kwargs, lambda t: t.index_select(0, keep), names)
        return self.experts.forward_routed(first.plan.index_select(0, keep), *sub_args, **sub_kwargs)

    def count_stage_flops(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[float, list[float]]:
        """FLOPs of the delegator (on the inputs it selects) and of every expert on these inputs
        (:func:`pycoe.flops.count_flops`)."""
        kwargs, _, _ = self._check_inputs(args, kwargs)
        d_args, d_kwargs = select_inputs(args, kwargs, self.delegator_inputs)
        delegator = float(count_flops(self.delegator, *d_args, **d_kwargs))
        return delegator, [float(count_flops(e, *args, **kwargs)) for e in self.experts]

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> CoETrainOutput | CoEOutput:
        """Training mode: :class:`CoETrainOutput`; eval mode: :class:`CoEOutput` (see the class docstring).

        Args:
            *args: the experts' positional inputs, batch-first (``model(x)``, ``model(src, tgt_in)``).
            **kwargs: their keyword inputs (``model(**batch)``); a ``labels`` keyword input is the batch's targets
                (no model receives it).
        """
        if self.training:
            return self.forward_train(*args, **kwargs)
        return self.forward_eval(*args, **kwargs)

    def forward_train(self, *args: Any, **kwargs: Any) -> CoETrainOutput:
        """Delegator and every expert on the whole batch, whatever the module's mode.

        Returns:
            :class:`CoETrainOutput` with expert_outputs Tensor[K, B, ...] and the call's ``labels``.
        """
        kwargs, labels, batch = self._check_inputs(args, kwargs)
        d = self._delegate(args, kwargs, batch)
        expert_outputs = self.experts(*args, **kwargs)
        if expert_outputs.dim() < 2 or expert_outputs.shape[1] != batch:
            raise ValueError(
                f"the experts must return batch-first outputs [B={batch}, ...], got stacked shape "
                f"{tuple(expert_outputs.shape)}"
            )
        self._observe_second_stage(tuple(expert_outputs.shape[2:]), d.rough_logits)
        return CoETrainOutput(d.selection_logits, d.rough_logits, expert_outputs, labels)

    def forward_eval(self, *args: Any, exit_threshold: float | str | None = "default", **kwargs: Any) -> CoEOutput:
        """Early exit, then one expert per remaining sample, batched by expert, whatever the module's mode.

        Args:
            *args: the experts' positional inputs, as for :meth:`forward`.
            **kwargs: their keyword inputs (``labels`` are dropped).
            exit_threshold: overrides ``self.exit_threshold`` for this call (``"default"``: use it).

        Returns:
            :class:`CoEOutput`.
        """
        kwargs, _, _ = self._check_inputs(args, kwargs)
        output, exited, confidence, first = self.forward_with_exit(args, kwargs, exit_threshold)
        choice = first.plan
        expert_index = torch.where(exited, torch.full_like(choice, -1), choice)
        return CoEOutput(output=output, expert_index=expert_index, exited=exited, confidence=confidence)
