"""The two-stage protocol: a first stage that may answer early, a second stage that runs on the samples that remain.

:class:`~pycoe.coe.model.CoE` (delegator, then the chosen expert), :class:`~pycoe.basisnet.model.BasisNet`
(lightweight model, then the synthesised specialist) and the cascade baseline (a rough head, then one network: a
``CoE`` with one expert) have the same shape. A model plugs into it by subclassing :class:`TwoStageModel` (before
``nn.Module``) and implementing three methods:

- :meth:`~TwoStageModel.run_first_stage` ``(args, kwargs) -> FirstStage``: the rough logits ``Tensor[B, C]`` (or
  ``None``), what the second stage needs (CoE: the chosen expert of each sample; BasisNet: the coefficients), and
  which second-stage *path* each sample takes (CoE: its expert; a path has its own cost);
- :meth:`~TwoStageModel.run_second_stage` ``(first, args, kwargs, keep) -> Tensor``: the second stage on the rows
  ``keep`` of the batch (``None``: every row);
- :meth:`~TwoStageModel.count_stage_flops` ``(args, kwargs) -> (first, [second per path])``: FLOPs of the first
  stage and of each path on the given inputs (the evaluation helpers pass one sample).

``args`` and ``kwargs`` are the model's positional and keyword inputs as the user passed them (``model(x)``,
``model(src, tgt_in)``, ``model(**batch)``). On these, :class:`TwoStageModel` writes the rest once: the validated
``exit_threshold`` property, the early-exit forward (:meth:`~TwoStageModel.forward_with_exit`: the exit rule of
:mod:`pycoe.twostage.rule`, the check that both stages predict the same classes, the merge of rough and
second-stage outputs, eager and traceable), and through them :func:`~pycoe.twostage.evaluate.predict`,
:func:`~pycoe.twostage.evaluate.threshold_sweep` and :func:`~pycoe.twostage.calibrate.calibrate_exit_threshold`.
The model also has a ``forward_eval(*args, exit_threshold="default", **kwargs)`` returning a dataclass of batch-first
tensors with at least ``output``, ``exited`` and ``confidence`` (what :func:`~pycoe.twostage.evaluate.predict`
concatenates).

Einstein legend: ``b`` sample (B), ``c`` class (C), ``p`` path of the second stage (P).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from pycoe._inputs import batch_size
from pycoe._modules import traceable
from pycoe._validation import check_probability
from pycoe.twostage.rule import exit_decision, resolve_exit_threshold

__all__ = ["FirstStage", "TwoStageModel", "EarlyExitResult"]


@dataclass
class FirstStage:
    """What the first stage of a :class:`TwoStageModel` hands on.

    Attributes:
        rough_logits: ``Tensor[B, C]``, the first stage's own prediction, on which the exit rule acts; ``None``
            without a rough head (then no sample can exit).
        plan: what the second stage needs, batch-first, in the model's own terms: the chosen expert
            ``LongTensor[B]`` of a CoE, the coefficients ``Tensor[B, N]`` of a BasisNet.
        path: ``LongTensor[B]`` in ``[0, P)``, the second-stage path each sample takes, when the paths differ in
            cost (a CoE's heterogeneous experts: the path is the chosen expert); ``None``: one path (path 0).
    """

    rough_logits: torch.Tensor | None
    plan: Any
    path: torch.Tensor | None = None


class EarlyExitResult(NamedTuple):
    """What :meth:`TwoStageModel.forward_with_exit` returns (each tensor batch-first, ``Tensor[B, ...]``)."""

    output: torch.Tensor
    exited: torch.Tensor
    confidence: torch.Tensor
    first: FirstStage


class TwoStageModel:
    """Base of a two-stage model with early exit: ``class Model(TwoStageModel, nn.Module)`` (see the module doc).

    Class attributes name the parts in messages and results: :attr:`first_stage_name`, :attr:`second_stage_name`,
    :attr:`path_name` (``None`` for one path) and :attr:`flops_keys` (the keys of a user's FLOPs table).
    """

    #: How messages name the first stage, e.g. ``"the delegator"``.
    first_stage_name: ClassVar[str] = "the first stage"
    #: How messages name the second stage, e.g. ``"the experts"``.
    second_stage_name: ClassVar[str] = "the second stage"
    #: What one path of the second stage is (``"expert"``: a FLOPs table lists one cost per expert, the sweep
    #: reports ``expert_load``); ``None`` for a second stage of one path.
    path_name: ClassVar[str | None] = None
    #: The keys of a FLOPs table ``{first: float, second: float, or [float] * P with a path_name}``.
    flops_keys: ClassVar[tuple[str, str]] = ("first_stage", "second_stage")

    _exit_threshold: float | None = None
    # per-sample shape of the second stage's outputs once seen (checked against the rough logits' for early exit)
    _second_stage_sample_shape: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ the protocol
    def run_first_stage(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> FirstStage:
        """The first stage on the inputs ``model(*args, **kwargs)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement run_first_stage")

    def run_second_stage(
        self, first: FirstStage, args: tuple[Any, ...], kwargs: dict[str, Any], keep: torch.Tensor | None
    ) -> torch.Tensor:
        """The second stage on the rows ``keep`` (``LongTensor[B_kept]``; ``None``: all): ``Tensor[B_kept, ...]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement run_second_stage")

    def count_stage_flops(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[float, list[float]]:
        """FLOPs of the first stage and of each second-stage path (one entry per path) on these inputs."""
        raise NotImplementedError(f"{type(self).__name__} must implement count_stage_flops")

    @property
    def num_paths(self) -> int:
        """P, the number of second-stage paths of different cost (1 unless :attr:`path_name` is set)."""
        return 1

    @property
    def has_rough_head(self) -> bool:
        """Whether the first stage produces rough logits (``True`` when it cannot be known in advance)."""
        return True

    # ------------------------------------------------------------------ the exit threshold
    @property
    def exit_threshold(self) -> float | None:
        """The early-exit threshold in [0, 1], or ``None`` (never exit). Settable; validated."""
        return self._exit_threshold

    @exit_threshold.setter
    def exit_threshold(self, value: float | None) -> None:
        threshold = check_probability("exit_threshold", value, allow_none=True)
        if threshold is not None and not self.has_rough_head:
            raise ValueError(
                f"exit_threshold needs a rough prediction, but {self.first_stage_name} has no rough head "
                "(num_classes=None); give it num_classes=C or keep exit_threshold=None"
            )
        self._exit_threshold = threshold

    # ------------------------------------------------------------------ written once
    def forward_with_exit(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], exit_threshold: float | str | None = "default"
    ) -> EarlyExitResult:
        """Early exit, then the second stage on the remaining samples (eager shortcuts, or the traceable path).

        Args:
            args, kwargs: the model's inputs.
            exit_threshold: a threshold in [0, 1], ``None`` (never exit), or ``"default"`` (the model's).

        Returns:
            ``(output Tensor[B, ...], exited BoolTensor[B], confidence Tensor[B], first FirstStage)``.
        """
        threshold = resolve_exit_threshold(exit_threshold, self.exit_threshold)
        first = self.run_first_stage(args, kwargs)
        rough = first.rough_logits
        batch = batch_size(args, kwargs, type(self).__name__)
        device = rough.device if rough is not None else _first_tensor(args, kwargs).device
        confidence, exited = exit_decision(rough, threshold, batch, device, source=self.first_stage_name)
        if threshold is not None and rough is not None:
            if self._second_stage_sample_shape is None and batch > 0:
                with torch.no_grad():  # learn the second stage's output shape once, on the first sample
                    probe = self.run_second_stage(first, args, kwargs, torch.zeros(1, dtype=torch.long, device=device))
                self._second_stage_sample_shape = tuple(probe.shape[1:])
            self._check_exit_shapes(rough, threshold)

        def run(keep: torch.Tensor | None) -> torch.Tensor:
            out = self.run_second_stage(first, args, kwargs, keep)
            self._second_stage_sample_shape = tuple(out.shape[1:])
            return out

        # exited=None when no sample can exit: the traced graph then needs no merge at all
        output = _merge_early_exit(rough, None if threshold is None else exited, run, self.second_stage_name)
        return EarlyExitResult(output, exited, confidence, first)

    def _observe_second_stage(self, sample_shape: tuple[int, ...], rough_logits: torch.Tensor | None) -> None:
        """Record the second stage's per-sample output shape (seen in a training forward) and, with an exit
        threshold, check it against the rough logits'."""
        self._second_stage_sample_shape = tuple(sample_shape)
        if self.exit_threshold is not None and rough_logits is not None:
            self._check_exit_shapes(rough_logits, self.exit_threshold)

    def _check_exit_shapes(self, rough_logits: torch.Tensor, threshold: float) -> None:
        """Raise unless the second stage's per-sample output shape (once known) is the rough logits' ``(C,)``.

        Early exit replaces a sample's output by its rough logits, so the two must predict the same classes; a
        model checks this on its first forward with a threshold, whether or not any sample exits (otherwise a batch
        where every sample exits would return the rough head's shape and another batch would fail).
        """
        shape = self._second_stage_sample_shape
        if shape is not None and tuple(shape) != tuple(rough_logits.shape[1:]):
            raise ValueError(
                f"early exit (exit_threshold={threshold}) replaces a sample's output by {self.first_stage_name}'s "
                f"rough prediction, but the rough head predicts {rough_logits.shape[1]} classes (per-sample shape "
                f"{tuple(rough_logits.shape[1:])}) while {self.second_stage_name} return per-sample shape "
                f"{tuple(shape)}; give the rough head the classes of the second stage (num_classes), or keep "
                "exit_threshold=None (e.g. for sequence outputs)"
            )


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))


def _check_merge_inputs(rough_logits: torch.Tensor | None, exited: torch.Tensor) -> None:
    if not isinstance(exited, torch.Tensor) or exited.dtype != torch.bool:
        what = f"dtype {exited.dtype}" if isinstance(exited, torch.Tensor) else type(exited).__name__
        raise TypeError(f"exited must be a BoolTensor[B] (True where a sample exits), got {what}")
    if exited.dim() != 1:
        raise ValueError(f"exited must be a BoolTensor[B] with one entry per sample, got shape {tuple(exited.shape)}")
    if rough_logits is None:
        return
    if not isinstance(rough_logits, torch.Tensor) or rough_logits.dim() != 2:
        shape = tuple(rough_logits.shape) if isinstance(rough_logits, torch.Tensor) else type(rough_logits).__name__
        raise ValueError(f"rough_logits must be a Tensor[B, C], got {shape}")
    if exited.shape[0] != rough_logits.shape[0]:
        raise ValueError(
            f"exited has {exited.shape[0]} entries but rough_logits hold B={rough_logits.shape[0]} samples: the exit "
            "mask needs one entry per sample"
        )


def _merge_early_exit(
    rough_logits: torch.Tensor | None,
    exited: torch.Tensor | None,
    run: Callable[[torch.Tensor | None], torch.Tensor],
    what: str,
) -> torch.Tensor:
    """Rough logits for the exited samples, the second stage's output for the others, in the input order.

    Under ``torch.compile`` and ``torch.export`` (:func:`pycoe._modules.traceable`) there is no Python branch on how
    many samples exit: the kept samples are ``nonzero(~exited)`` (a data-dependent, possibly empty or full
    selection), ``run`` is always called on them, and its output is written into the rough logits with
    ``index_copy``. Eagerly, the same result takes shortcuts: ``run(None)`` when no sample exits, no call when every
    sample exits.

    Args:
        rough_logits: ``Tensor[B, C]`` (may be ``None`` only when no sample can exit).
        exited: ``BoolTensor[B]``, or ``None`` when no sample can exit (no threshold): then ``run(None)``.
        run: ``keep -> Tensor[B_kept, ...]`` runs the second stage on the samples ``keep`` (``LongTensor[B_kept]``)
            or, when ``keep`` is ``None``, on the whole batch.
        what: names the second stage for the error message (e.g. ``"the experts"``).

    Raises:
        TypeError: ``exited`` is not a bool tensor.
        ValueError: ``exited`` is not one entry per sample of ``rough_logits``; some samples exited and the second
            stage's per-sample shape differs from the rough logits'.
    """
    if exited is None:
        return run(None)
    _check_merge_inputs(rough_logits, exited)
    if traceable():
        if rough_logits is None:  # exit_decision lets no sample exit without rough logits
            return run(None)
        return _merge(rough_logits, (~exited).nonzero().squeeze(1), run, what)
    n_exit = int(exited.sum())
    if n_exit == 0:
        return run(None)
    if rough_logits is None:
        raise ValueError("samples exited but rough_logits is None: early exit needs a rough prediction")
    if n_exit == exited.shape[0]:
        return rough_logits
    return _merge(rough_logits, (~exited).nonzero().squeeze(1), run, what)


def _merge(
    rough_logits: torch.Tensor, keep: torch.Tensor, run: Callable[[torch.Tensor | None], torch.Tensor], what: str
) -> torch.Tensor:
    """``rough_logits`` with the rows ``keep`` (``LongTensor[B_kept]``) replaced by ``run(keep)``."""
    routed = run(keep)
    if routed.shape[1:] != rough_logits.shape[1:]:
        raise ValueError(
            f"early exit mixes rough predictions of per-sample shape {tuple(rough_logits.shape[1:])} with outputs of "
            f"{what} of per-sample shape {tuple(routed.shape[1:])}; early exit needs outputs of {what} of the rough "
            "head's shape [B, C] (use exit_threshold=None for other tasks)"
        )
    return rough_logits.to(routed.dtype).index_copy(0, keep, routed)
