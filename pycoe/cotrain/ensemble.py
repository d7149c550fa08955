"""The co-trained ensemble of Divide-and-Co-training, and the co-training loss.

Zhao et al., *Towards Better Accuracy-efficiency Trade-offs: Divide and Co-training*, IEEE TIP 2022
(arXiv 2011.14660). The S small networks obtained by dividing a large one are trained together, each on
its own view of the data, and ensembled at inference (by default the mean of their logits).

:class:`CoTrainingEnsemble` holds the members. In training mode it takes one input per member and returns
every member's output and the ensemble's (:class:`CoTrainingOutput`); the loss lives outside the model,
in :class:`CoTrainingLoss` (members' cross-entropies plus a weighted co-training term).

With ``concurrent=True`` the members run in a CPU thread pool. PyTorch releases the GIL inside its
operators, so members can overlap, but each operator also uses the intra-op thread pool: with S members in
flight, up to ``S * torch.get_num_threads()`` threads compete for the cores. Whether this pays off depends
on idle cores; ``benchmarks/bench_cotrain.py`` measures it (the docs' benchmarks page has the figures).
Grad mode, inference mode and CPU autocast are thread-local in PyTorch; they are forwarded to the workers.
Results are exactly the sequential ones for deterministic members (tested); with random operations in
training mode (dropout), the order in which the members draw from the shared generator is not fixed.
Under ``torch.export`` / ``torch.compile`` the members always run sequentially (a thread pool cannot be
traced), so an eval-mode ensemble exports with a dynamic batch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import (
    check_bool,
    check_choice,
    check_int,
    check_module,
    check_number,
    check_positive_int,
    check_tensor,
    describe,
)
from ..functional.cotrain import js_divergence, pairwise_kl
from .schedule import LinearWarmup

__all__ = ["CoTrainingEnsemble", "CoTrainingOutput", "CoTrainingLoss", "combine_outputs"]

_COMBINE = ("mean_logits", "mean_probs", "max")
_DIVERGENCES = ("js", "pairwise_kl")


@dataclass
class CoTrainingOutput:
    """What :class:`CoTrainingEnsemble` returns in training mode (or with ``return_members=True``).

    Attributes:
        member_outputs: ``Tensor[S, B, ...]``, every member's output (logits), stacked.
        ensemble: ``Tensor[B, ...]``, the members combined by the ensemble's ``combine`` rule.
    """

    member_outputs: Tensor
    ensemble: Tensor

    @property
    def num_members(self) -> int:
        """S, the number of members."""
        return int(self.member_outputs.shape[0])


# An exported ensemble returns the same dataclass as the eager one.
torch.export.register_dataclass(CoTrainingOutput, serialized_type_name="pycoe.cotrain.CoTrainingOutput")


def _check_combine(combine: Any) -> None:
    if callable(combine):
        return
    if not isinstance(combine, str):
        raise TypeError(
            f"combine must be one of {', '.join(map(repr, _COMBINE))} or a callable, got {describe(combine)}"
        )
    check_choice("combine", combine, _COMBINE)


def combine_outputs(member_outputs: Tensor, combine: str | Callable[[Tensor], Tensor] = "mean_logits") -> Tensor:
    r"""Combine the members' logits ``Tensor[S, B, ..., C]`` into the ensemble's ``Tensor[B, ..., C]``.

    - ``"mean_logits"`` (the paper's default): :math:`\frac1S \sum_i z_i`.
    - ``"mean_probs"``: the log of the mean of the members' softmax probabilities,
      :math:`\log \frac1S \sum_i \operatorname{softmax}(z_i)` (a log-probability, so that softmax / argmax /
      cross-entropy apply to it as to logits).
    - ``"max"``: the element-wise maximum of the members' logits (pycoe's reading of the reference code's
      "max" option).
    - a callable ``Tensor[S, B, ..., C] -> Tensor[B, ..., C]`` (its result is checked to have that shape).
    """
    check_tensor("member_outputs", member_outputs, floating=True)
    if member_outputs.dim() < 2:
        raise ValueError(f"member_outputs must have shape [S, B, ...], got {tuple(member_outputs.shape)}")
    _check_combine(combine)
    if callable(combine):
        combined = combine(member_outputs)
        if not isinstance(combined, Tensor):
            raise TypeError(f"combine must return a Tensor, got {describe(combined)}")
        if combined.shape != member_outputs.shape[1:]:
            raise ValueError(
                f"combine must map Tensor[S, B, ...] to Tensor[B, ...], i.e. shape {tuple(member_outputs.shape[1:])} "
                f"here, but returned {tuple(combined.shape)}"
            )
        return combined
    if combine == "mean_logits":
        return member_outputs.mean(dim=0)
    if combine == "mean_probs":
        log_probs = torch.log_softmax(member_outputs, dim=-1)
        return torch.logsumexp(log_probs, dim=0) - math.log(member_outputs.shape[0])
    return member_outputs.amax(dim=0)


def _check_views(x: Any, num_members: int) -> list[Tensor]:
    """One input for every member: a tensor (shared) or a list/tuple of S tensors of one batch size."""
    if isinstance(x, Tensor):
        views = [x] * num_members
    elif isinstance(x, (list, tuple)):
        if len(x) != num_members:
            raise ValueError(f"x must hold one input per member: expected {num_members} views, got {len(x)}")
        views = list(x)
    else:
        raise TypeError(f"x must be a list of {num_members} tensors (one per member) or one Tensor, got {describe(x)}")
    for i, v in enumerate(views):
        check_tensor(f"x[{i}]", v)
        if v.dim() < 1:
            raise ValueError(f"x[{i}] must have a batch dimension, got a scalar")
        if v.shape[0] != views[0].shape[0]:
            raise ValueError(
                f"every view must have the same batch size; x[0] has {views[0].shape[0]} samples, "
                f"x[{i}] has {v.shape[0]}"
            )
    return views


class CoTrainingEnsemble(nn.Module):
    """S co-trained members and their ensemble.

    Args:
        models: the S >= 1 members (e.g. from :func:`~pycoe.cotrain.divide_module`). Each maps an input
            ``Tensor[B, ...]`` to logits of one common shape ``Tensor[B, ..., C]``.
        combine: how the members' outputs are ensembled, see :func:`combine_outputs`.
        concurrent: run the members in a CPU thread pool; see the module documentation for the thread-count
            interaction (and the benchmark: on a busy 2-core machine it does not pay off). Can be changed
            later via the attribute. Ignored under ``torch.export`` / ``torch.compile``.
        max_workers: threads of the pool (default S).

    Forward:
        ``forward(x, return_members=None)`` where ``x`` is either one ``Tensor[B, ...]`` given to every
        member, or a list/tuple of S tensors with one batch size, one per member (the views of
        :class:`~pycoe.cotrain.MultiViewDataset`). In training mode it returns a :class:`CoTrainingOutput`;
        in eval mode the ensemble's ``Tensor[B, ..., C]`` (or the :class:`CoTrainingOutput` if
        ``return_members=True``). A batch of 0 samples gives an empty output.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        combine: str | Callable[[Tensor], Tensor] = "mean_logits",
        concurrent: bool = False,
        max_workers: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
            raise TypeError("models must be a sequence of nn.Module (one per member), got a single nn.Module")
        if not isinstance(models, (Sequence, nn.ModuleList)):
            raise TypeError(f"models must be a sequence of nn.Module (one per member), got {describe(models)}")
        members = list(models)
        if len(members) < 1:
            raise ValueError("models must hold at least one member, got 0")
        for i, m in enumerate(members):
            check_module(f"models[{i}]", m)
        _check_combine(combine)
        self.members = nn.ModuleList(members)
        self.combine = combine
        self.concurrent = check_bool("concurrent", concurrent)
        if max_workers is None:
            self.max_workers = len(members)
        else:
            self.max_workers = check_positive_int("max_workers", max_workers)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @property
    def num_members(self) -> int:
        """S, the number of members."""
        return len(self.members)

    # -- pickling / deepcopy: the thread pool and its lock are not state --------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_executor"] = None
        state.pop("_executor_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._executor = None
        self._executor_lock = threading.Lock()

    def __del__(self) -> None:  # pragma: no cover - best effort
        executor = self.__dict__.get("_executor")
        if executor is not None:
            executor.shutdown(wait=False)

    def _run_threads(self, inputs: list[Tensor]) -> list[Any]:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="pycoe-member")
            executor = self._executor
        # Thread-local autograd / autocast state of the caller, replayed in each worker.
        grad = torch.is_grad_enabled()
        inference = torch.is_inference_mode_enabled()
        cpu_autocast = torch.is_autocast_enabled("cpu")
        cpu_dtype = torch.get_autocast_dtype("cpu")

        def call(member: nn.Module, inp: Tensor) -> Any:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                with torch.autocast("cpu", dtype=cpu_dtype, enabled=cpu_autocast):
                    return member(inp)

        futures = [executor.submit(call, m, inp) for m, inp in zip(self.members, inputs)]
        return [f.result() for f in futures]

    def run_members(self, x: Tensor | Sequence[Tensor]) -> list[Any]:
        """Run every member on its input (in the thread pool if ``self.concurrent``) and return their outputs.

        Args:
            x: one ``Tensor[B, ...]`` for all members, or a list of S tensors.

        Returns:
            A list of S outputs, in member order.
        """
        inputs = _check_views(x, self.num_members)
        tracing = torch.compiler.is_exporting() or torch.compiler.is_compiling()
        if self.concurrent and self.num_members > 1 and not tracing:
            return self._run_threads(inputs)
        return [member(inp) for member, inp in zip(self.members, inputs)]

    def forward(self, x: Tensor | Sequence[Tensor], return_members: bool | None = None) -> Tensor | CoTrainingOutput:
        if return_members is not None:
            check_bool("return_members", return_members)
        outputs = self.run_members(x)
        for i, out in enumerate(outputs):
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"member {i} returned a {type(out).__name__}; CoTrainingEnsemble needs every member to return "
                    "a logits tensor"
                )
            if out.shape != outputs[0].shape:
                raise ValueError(
                    f"members must return outputs of one shape; member 0 gave {tuple(outputs[0].shape)}, member {i} "
                    f"gave {tuple(out.shape)}"
                )
        device = outputs[0].device
        stacked = torch.stack([out.to(device) for out in outputs], dim=0)  # [S, B, ..., C]
        ensemble = combine_outputs(stacked, self.combine)
        want_members = self.training if return_members is None else return_members
        if want_members:
            return CoTrainingOutput(member_outputs=stacked, ensemble=ensemble)
        return ensemble

    def extra_repr(self) -> str:
        combine = self.combine if isinstance(self.combine, str) else getattr(self.combine, "__name__", "callable")
        return f"num_members={self.num_members}, combine={combine!r}, concurrent={self.concurrent}"


def _check_target(target: Any, logits: Tensor) -> None:
    """Class indices ``[B, ...]`` in ``[0, C)``, or class probabilities ``[B, ..., C]``, as ``F.cross_entropy``."""
    check_tensor("target", target)
    classes = logits.shape[-1]
    if target.is_floating_point():
        if target.shape != logits.shape[1:]:
            raise ValueError(
                f"target of class probabilities must have shape {tuple(logits.shape[1:])} (the members' [B, ..., C]), "
                f"got {tuple(target.shape)}"
            )
        return
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"target must hold integer class indices or float class probabilities, got dtype {target.dtype}"
        )
    if target.shape != logits.shape[1:-1]:
        raise ValueError(
            f"target must have shape {tuple(logits.shape[1:-1])} (one class index per sample of the members' "
            f"[B, ..., C] outputs), got {tuple(target.shape)}"
        )
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= classes:
        raise ValueError(f"target must hold class indices in [0, {classes}), got values in [{low}, {high}]")


class CoTrainingLoss(nn.Module):
    r"""The co-training objective: the members' cross-entropies plus a weighted co-training term.

    .. math::
        L = \sum_{i=1}^S \mathrm{CE}(z_i, y) + \lambda(t)\, L_{\mathrm{cot}}(z_1, \dots, z_S),

    with :math:`L_{\mathrm{cot}}` the Jensen-Shannon divergence (:func:`~pycoe.functional.js_divergence`,
    the paper's default) or the pairwise KL against detached peers (:func:`~pycoe.functional.pairwise_kl`),
    and :math:`\lambda(t)` constant or a schedule such as :class:`~pycoe.cotrain.LinearWarmup`.

    Args:
        divergence: the co-training term, ``"js"`` or ``"pairwise_kl"``.
        weight: :math:`\lambda`: a finite number >= 0, or a callable ``step -> weight`` (then pass ``step``
            to ``forward``; a weight it returns that is not a finite number >= 0 raises, naming the schedule).
        label_smoothing: in [0, 1], passed to ``F.cross_entropy``.

    Forward:
        ``forward(output: CoTrainingOutput | Tensor[S, B, ..., C], target, step=None)`` with ``target`` the class
        indices ``LongTensor[B, ...]`` (in ``[0, C)``) or class probabilities ``Tensor[B, ..., C]``; returns
        ``(loss Tensor[], info dict)``; ``info`` holds floats ``"ce"`` (sum over members of the mean CE),
        ``"cot"`` (the co-training term) and ``"weight"`` (:math:`\lambda` used). An empty batch raises.
    """

    def __init__(
        self,
        divergence: str = "js",
        weight: float | Callable[[int], float] | LinearWarmup = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.divergence = check_choice("divergence", divergence, _DIVERGENCES)
        want = "a finite number >= 0 or a callable step -> weight"
        self.weight = weight if callable(weight) else check_number("weight", weight, minimum=0, expected=want)
        self.label_smoothing = check_number("label_smoothing", label_smoothing, minimum=0, maximum=1)

    def current_weight(self, step: int | None = None) -> float:
        """:math:`\\lambda` at ``step`` (a constant weight ignores ``step``)."""
        if not callable(self.weight):
            return float(self.weight)
        if step is None:
            raise ValueError("step must be given when the co-training weight is a schedule")
        check_int("step", step)
        value = self.weight(step)
        try:
            return check_number("weight", value, minimum=0)
        except (TypeError, ValueError):  # the schedule's fault, not the caller's argument: name the schedule
            raise ValueError(
                f"the co-training weight schedule {self.weight!r} returned {value!r} at step {step}; "
                "a weight must be a finite number >= 0"
            ) from None

    def forward(
        self, output: CoTrainingOutput | Tensor, target: Tensor, step: int | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        logits = output.member_outputs if isinstance(output, CoTrainingOutput) else output
        check_tensor("output", logits, floating=True)
        if logits.dim() < 3:
            raise ValueError(f"member outputs must have shape [S, B, ..., C], got {tuple(logits.shape)}")
        if logits.shape[1] == 0:
            raise ValueError("the batch is empty (0 samples): the co-training loss of no sample is undefined")
        _check_target(target, logits)
        lam = self.current_weight(step)
        # F.cross_entropy wants the classes in dim 1: [B, C, ...] for each member, [B, C, ...] for probabilities
        per_member = logits.movedim(-1, 2).unbind(0)
        goal = target.movedim(-1, 1) if target.is_floating_point() else target
        ce = torch.stack([F.cross_entropy(z, goal, label_smoothing=self.label_smoothing) for z in per_member]).sum()
        cot = js_divergence(logits) if self.divergence == "js" else pairwise_kl(logits)
        loss = ce + lam * cot
        return loss, {"ce": float(ce.detach()), "cot": float(cot.detach()), "weight": lam}

    def extra_repr(self) -> str:
        return f"divergence={self.divergence!r}, weight={self.weight!r}, label_smoothing={self.label_smoothing}"
