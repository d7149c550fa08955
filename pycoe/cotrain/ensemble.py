"""The co-trained ensemble of Divide-and-Co-training, with concurrent inference.

Zhao et al., *Towards Better Accuracy-efficiency Trade-offs: Divide and Co-training*, IEEE TIP 2022
(arXiv 2011.14660). The S small networks obtained by dividing a large one are trained together, each on
its own view of the data, and ensembled at inference (by default the mean of their logits). Because they
are independent, they can run concurrently.

:class:`CoTrainingEnsemble` holds the members. In training mode it takes one input per member and returns
every member's output and the ensemble's (:class:`CoTrainingOutput`); the loss lives outside the model,
in :class:`CoTrainingLoss` (members' cross-entropies plus a weighted co-training term).

Concurrency (``concurrent=True``):

- **CPU**: the members run in a thread pool. PyTorch releases the GIL inside its operators, so members can
  overlap, but each operator also uses the intra-op thread pool (``torch.get_num_threads()``): with S
  members in flight, up to ``S * torch.get_num_threads()`` threads compete for the cores. On a small
  machine, set ``torch.set_num_threads(max(1, cores // S))`` or keep ``concurrent=False``; measure (see
  ``benchmarks/bench_cotrain.py``). Grad mode, inference mode and CPU autocast are thread-local in
  PyTorch; they are forwarded to the worker threads.
- **CUDA**: one side stream per member (no threads: kernel launches are asynchronous). Each side stream
  first waits for the current stream (which produced the inputs); inputs are ``record_stream``-ed on the
  side stream and outputs on the current stream, which waits for every side stream before the outputs are
  combined. **This path is untested** (pycoe's CI has no GPU).

Results are exactly the sequential ones for deterministic members (tested on CPU); with random operations
in training mode (dropout), the order in which the members draw from the shared generator is not fixed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._modules import module_device as _module_device
from .._modules import tensors_in as _tensors
from .._validation import check_choice, check_positive_int, check_tensor
from ..functional.cotrain import js_divergence, pairwise_kl
from .schedule import LinearWarmup
from .views import _check_views

__all__ = ["CoTrainingEnsemble", "CoTrainingOutput", "CoTrainingLoss", "combine_outputs"]

_COMBINE = ("mean_logits", "mean_probs", "max")


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


def combine_outputs(member_outputs: Tensor, combine: str | Callable[[Tensor], Tensor] = "mean_logits") -> Tensor:
    r"""Combine the members' logits ``Tensor[S, B, ..., C]`` into the ensemble's ``Tensor[B, ..., C]``.

    - ``"mean_logits"`` (the paper's default): :math:`\frac1S \sum_i z_i`.
    - ``"mean_probs"``: the log of the mean of the members' softmax probabilities,
      :math:`\log \frac1S \sum_i \operatorname{softmax}(z_i)` (a log-probability, so that softmax / argmax /
      cross-entropy apply to it as to logits).
    - ``"max"``: the element-wise maximum of the members' logits (pycoe's reading of the reference code's
      "max" option).
    - a callable ``Tensor[S, B, ..., C] -> Tensor[B, ..., C]``.
    """
    check_tensor("member_outputs", member_outputs, floating=True)
    if member_outputs.dim() < 2:
        raise ValueError(f"member_outputs must have shape [S, B, ...], got {tuple(member_outputs.shape)}")
    if callable(combine):
        return combine(member_outputs)
    check_choice("combine", combine, _COMBINE)
    if combine == "mean_logits":
        return member_outputs.mean(dim=0)
    if combine == "mean_probs":
        num = member_outputs.shape[0]
        return torch.logsumexp(torch.log_softmax(member_outputs, dim=-1), dim=0) - torch.log(
            member_outputs.new_tensor(float(num))
        )
    return member_outputs.amax(dim=0)


class CoTrainingEnsemble(nn.Module):
    """S co-trained members and their ensemble.

    Args:
        models: the S >= 1 members (e.g. from :func:`~pycoe.cotrain.divide_module`). Each maps an input
            ``Tensor[B, ...]`` to logits of one common shape ``Tensor[B, ..., C]``.
        combine: how the members' outputs are ensembled, see :func:`combine_outputs`.
        concurrent: run the members concurrently (thread pool on CPU, streams on CUDA); see the module
            documentation for the thread-count interaction. Can be changed later via the attribute.
        max_workers: threads of the CPU pool (default S).

    Forward:
        ``forward(x, return_members=None)`` where ``x`` is either one ``Tensor[B, ...]`` given to every
        member, or a list/tuple of S tensors, one per member (the views of
        :class:`~pycoe.cotrain.MultiViewDataset`). In training mode it returns a :class:`CoTrainingOutput`;
        in eval mode the ensemble's ``Tensor[B, ..., C]`` (or the :class:`CoTrainingOutput` if
        ``return_members=True``).
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
        models = list(models)
        if len(models) < 1:
            raise ValueError("models must hold at least one member, got 0")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"models[{i}] must be an nn.Module, got {type(m).__name__}")
        if not callable(combine):
            check_choice("combine", combine, _COMBINE)
        if not isinstance(concurrent, bool):
            raise TypeError(f"concurrent must be a bool, got {type(concurrent).__name__}")
        self.members = nn.ModuleList(models)
        self.combine = combine
        self.concurrent = concurrent
        self.max_workers = len(models) if max_workers is None else check_positive_int("max_workers", max_workers)
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

    def _inputs(self, x: Tensor | Sequence[Tensor]) -> list[Tensor]:
        if isinstance(x, Tensor):
            return [x] * self.num_members
        views = _check_views(x, self.num_members, name="x")
        for i, v in enumerate(views):
            if not isinstance(v, Tensor):
                raise TypeError(f"x[{i}] must be a torch.Tensor, got {type(v).__name__}")
        return views

    # -- the three ways of running the members ------------------------------------------------------------
    def _run_sequential(self, inputs: list[Tensor]) -> list[Any]:
        return [member(inp) for member, inp in zip(self.members, inputs)]

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

    def _run_streams(self, inputs: list[Tensor]) -> list[Any]:  # pragma: no cover - needs a GPU
        # UNTESTED (no GPU in CI). One side stream per member; see the module docstring.
        target_device = inputs[0].device
        consumer = torch.cuda.current_stream(target_device)
        pending: list[tuple[torch.cuda.Stream, Any, bool]] = []
        for member, inp in zip(self.members, inputs):
            device = _module_device(member) or inp.device
            same = device == inp.device
            if not same:
                # another GPU: copy with the default semantics, then make the side stream wait for the copy
                inp = inp.to(device, non_blocking=True)
            with torch.cuda.device(device):
                side = torch.cuda.Stream(device=device)
                side.wait_stream(torch.cuda.current_stream(device))  # the inputs were produced there
                with torch.cuda.stream(side):
                    inp.record_stream(side)  # allocated on the current stream, read on the side stream
                    out = member(inp)
            pending.append((side, out, device == target_device))
        outputs: list[Any] = []
        for side, out, on_target in pending:
            if on_target:
                consumer.wait_stream(side)
                for t in _tensors(out):
                    t.record_stream(consumer)  # allocated on the side stream, read on the consumer stream
            else:
                side.synchronize()  # cross-device outputs: simplest safe choice
            outputs.append(out)
        return outputs

    def run_members(self, x: Tensor | Sequence[Tensor]) -> list[Any]:
        """Run every member on its input (concurrently if ``self.concurrent``) and return their outputs.

        Args:
            x: one ``Tensor[B, ...]`` for all members, or a list of S tensors.

        Returns:
            A list of S outputs, in member order.
        """
        inputs = self._inputs(x)
        if not self.concurrent or self.num_members == 1:
            return self._run_sequential(inputs)
        if all(inp.is_cuda for inp in inputs):
            return self._run_streams(inputs)
        return self._run_threads(inputs)

    def forward(self, x: Tensor | Sequence[Tensor], return_members: bool | None = None) -> Tensor | CoTrainingOutput:
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
        want_members = self.training if return_members is None else bool(return_members)
        if want_members:
            return CoTrainingOutput(member_outputs=stacked, ensemble=ensemble)
        return ensemble

    def extra_repr(self) -> str:
        combine = self.combine if isinstance(self.combine, str) else getattr(self.combine, "__name__", "callable")
        return f"num_members={self.num_members}, combine={combine!r}, concurrent={self.concurrent}"


class CoTrainingLoss(nn.Module):
    r"""The co-training objective: the members' cross-entropies plus a weighted co-training term.

    .. math::
        L = \sum_{i=1}^S \mathrm{CE}(z_i, y) + \lambda(t)\, L_{\mathrm{cot}}(z_1, \dots, z_S),

    with :math:`L_{\mathrm{cot}}` the Jensen-Shannon divergence (:func:`~pycoe.functional.js_divergence`,
    the paper's default) or the pairwise KL against detached peers (:func:`~pycoe.functional.pairwise_kl`),
    and :math:`\lambda(t)` constant or a schedule such as :class:`~pycoe.cotrain.LinearWarmup`.

    Args:
        cotrain: ``"js"`` or ``"pairwise_kl"``.
        weight: :math:`\lambda`: a float, or a callable ``step -> float`` (then pass ``step`` to ``forward``).
        label_smoothing: passed to ``F.cross_entropy``.

    Forward:
        ``forward(output: CoTrainingOutput | Tensor[S, B, C], target: LongTensor[B], step=None)`` returns
        ``(loss Tensor[], info dict)``; ``info`` holds floats ``"ce"`` (sum over members of the mean CE),
        ``"cot"`` (the co-training term) and ``"weight"`` (:math:`\lambda` used).
    """

    def __init__(
        self,
        cotrain: str = "js",
        weight: float | Callable[[int], float] | LinearWarmup = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.cotrain = check_choice("cotrain", cotrain, ("js", "pairwise_kl"))
        if not callable(weight) and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0):
            raise ValueError(f"weight must be a number >= 0 or a callable step -> weight, got {weight!r}")
        self.weight = weight
        self.label_smoothing = float(label_smoothing)

    def forward(
        self, output: CoTrainingOutput | Tensor, target: Tensor, step: int | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        logits = output.member_outputs if isinstance(output, CoTrainingOutput) else output
        check_tensor("output", logits, floating=True)
        if logits.dim() < 3:
            raise ValueError(f"member outputs must have shape [S, B, C], got {tuple(logits.shape)}")
        num = logits.shape[0]
        if callable(self.weight):
            if step is None:
                raise ValueError("step must be given when the co-training weight is a schedule")
            lam = float(self.weight(step))
        else:
            lam = float(self.weight)
        ce = sum(F.cross_entropy(logits[i], target, label_smoothing=self.label_smoothing) for i in range(num))
        if self.cotrain == "js":
            cot = js_divergence(logits)
        else:
            cot = pairwise_kl(logits)
        loss = ce + lam * cot
        return loss, {"ce": float(ce.detach()), "cot": float(cot.detach()), "weight": lam}
