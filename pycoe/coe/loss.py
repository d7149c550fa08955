r"""The CoE training loss: WGM-weighted expert losses, LGM selection targets, rough-head loss.

Collaboration of Experts (CoE; Zhang, Chen and Zhong, ICML 2022, arXiv:2107.03815). Confirmed by the public
abstract: the weight generation module (WGM) partitions the training data among the experts *based on the
delegator* by solving a balanced transportation problem and makes each expert focus on its portion *by
re-weighting the losses*; the label generation module (LGM) generates the label of the delegator's
expert-selection loss; the delegator also outputs a rough prediction. Everything else in this file (the
normalisation of the weighted losses, summing over experts, cross-entropy on the LGM targets, the rough-head
cross-entropy and its weight, the optional load-balance term, the distributed normalisation) is **pycoe's
formulation**; the paper's method section is not public.

Einstein legend: ``b`` sample (B on this rank, N over all ranks), ``k`` expert (K), ``c`` class (C),
``...`` an expert's output dimensions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .. import distributed as _dist
from .._validation import check_callable, check_choice, check_class_targets, check_nonnegative_float, check_tensor
from ..functional.losses import _check_token_labels, _per_sample_cross_entropy
from ..routing import metrics as _metrics
from ..routing.labels import LabelGenerator
from ..routing.weighting import BalancedTransportWeighter
from .model import CoETrainOutput

__all__ = ["CoELoss", "scalar_info"]


class _Checked(NamedTuple):
    """What one step of :class:`CoELoss` has checked already (or built valid), so that the metrics of its ``info``
    do not check it again: each check that reads values makes the host wait for a GPU."""

    selection: bool  # the selection logits are finite (pycoe's WGM checks them)
    labels: bool  # the labels' expert indices lie in [0, K) (pycoe's LGM: the argmin of losses it checks finite)
    targets: bool  # class-index targets lie in [0, C) of the experts' class logits (the default loss checks them)


class CoELoss(nn.Module):
    r"""Task-agnostic CoE loss on every expert's per-sample losses (pycoe's formulation; see the module docstring).

    With :math:`L_{bk}` = ``per_sample_loss(expert_outputs[k], target)[b]`` (``Tensor[B, K]``), WGM weights
    :math:`w = \mathrm{weighter}(z)` from the detached selection logits :math:`z` (``Tensor[B, K]``, 1 for the
    assigned expert and :math:`\epsilon` elsewhere), LGM targets :math:`q = \mathrm{labeler}(L)` (detached,
    ``Tensor[B, K]``) and rough logits :math:`r` (``Tensor[B, C]``):

    .. math::

        \mathcal{L}_\text{expert} = \sum_{k=1}^{K} \frac{\sum_b w_{bk} L_{bk}}{\sum_b w_{bk}}, \qquad
        \mathcal{L}_\text{select} = \frac1B \sum_b \Big(-\sum_k q_{bk} \log \operatorname{softmax}(z_b)_k\Big),
        \qquad
        \mathcal{L}_\text{rough} = \frac1B \sum_b \operatorname{CE}(r_b, y_b),

    .. math::

        \mathcal{L} = \lambda_e \mathcal{L}_\text{expert} + \lambda_s \mathcal{L}_\text{select}
        + \lambda_r \mathcal{L}_\text{rough} + \lambda_b \operatorname{CV}^2(z).

    Each expert's term is its own weighted *mean* loss, and the terms are **summed** over experts
    (``expert_reduction="sum"``), so each expert receives the gradient it would get if trained alone on its
    weighted portion, whatever K is (``"mean"`` divides by K instead). An expert with
    :math:`\sum_b w_{bk} = 0` (no sample, :math:`\epsilon = 0`) contributes 0. The experts get gradient only
    through :math:`\mathcal{L}_\text{expert}`; the delegator only through :math:`\mathcal{L}_\text{select}`,
    :math:`\mathcal{L}_\text{rough}` and the balance term (the weights and labels are detached).

    **Distributed training.** When ``torch.distributed`` is initialised with more than one rank and the weighter
    solves over the global batch (``scope="global"``; or ``sync=True``), the normalisers
    :math:`\sum_b w_{bk}` and B are summed over ranks (one ``all_reduce`` of K + 1 numbers) and the returned loss
    is multiplied by the world size W. Because DistributedDataParallel *averages* gradients over ranks, the
    resulting gradients equal those of the single-process loss on the concatenated global batch, exactly, even
    for uneven batch sizes: call ``loss.backward()`` as usual. The balance term (not a sum over samples) is
    computed on the local batch and averaged by DDP, an approximation. Without a global scope (``sync=False``)
    every rank normalises over its own batch (the usual DDP data-parallel approximation).

    Args:
        weighter: the WGM, e.g. :class:`~pycoe.routing.weighting.BalancedTransportWeighter`; called as
            ``weighter(selection_logits.detach())`` and must return an object with ``weights`` Tensor[B, K].
        labeler: the LGM, e.g. :class:`~pycoe.routing.labels.LabelGenerator`; called as
            ``labeler(losses.detach())`` and must return an object with ``probs`` Tensor[B, K] and ``index``
            LongTensor[B].
        per_sample_loss: ``(expert_output Tensor[B, ...], target) -> Tensor[B]``, lower is better. Default
            (``None``): cross-entropy chosen by the experts' output shape, as
            :func:`~pycoe.functional.per_sample_cross_entropy` computes it: for class logits ``[B, C]``
            (``*ForSequenceClassification``) with class indices ``LongTensor[B]`` in ``[0, C)`` or class
            probabilities ``Tensor[B, C]``; for token logits ``[B, T, V]`` (``*ForTokenClassification``,
            ``*ForSeq2SeqLM``) with labels ``LongTensor[B, T]``, the mean over each sample's real tokens (labels
            ``-100`` are ignored; a sample without a real token gets 0). Causal language models
            (``*ForCausalLM``, whose labels are their input tokens) need the shifted variant:
            ``per_sample_loss=functools.partial(per_sample_cross_entropy, shift=True)``.
        expert_weight: :math:`\lambda_e` (>= 0).
        selection_weight: :math:`\lambda_s` (>= 0).
        rough_weight: :math:`\lambda_r` (>= 0); the rough loss is computed only when the delegator has a rough
            head and :math:`\lambda_r > 0`.
        balance_weight: :math:`\lambda_b` (>= 0) of
            :func:`~pycoe.routing.metrics.load_balance_cv2` on the selection logits (default 0: off).
        expert_reduction: ``"sum"`` (default) or ``"mean"`` of the per-expert normalised losses.
        sync: ``"auto"`` (global normalisation when the weighter's ``scope`` is ``"global"`` and several ranks
            run), ``True`` or ``False``.

    Returns (from ``forward``):
        ``(loss Tensor[], info dict)``; see :meth:`forward`.
    """

    def __init__(
        self,
        weighter: nn.Module,
        labeler: nn.Module,
        per_sample_loss: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        expert_weight: float = 1.0,
        selection_weight: float = 1.0,
        rough_weight: float = 1.0,
        balance_weight: float = 0.0,
        expert_reduction: str = "sum",
        sync: bool | str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(weighter, LabelGenerator) or isinstance(labeler, BalancedTransportWeighter):
            raise TypeError(
                f"weighter and labeler look swapped (got weighter={type(weighter).__name__}, "
                f"labeler={type(labeler).__name__}): CoELoss(weighter=BalancedTransportWeighter(K), "
                "labeler=LabelGenerator())"
            )
        check_callable("weighter", weighter, expected="a BalancedTransportWeighter")
        check_callable("labeler", labeler, expected="a LabelGenerator")
        check_callable("per_sample_loss", per_sample_loss, allow_none=True)
        self.weighter = weighter
        self.labeler = labeler
        self.per_sample_loss = per_sample_loss
        self.expert_weight = check_nonnegative_float("expert_weight", expert_weight)
        self.selection_weight = check_nonnegative_float("selection_weight", selection_weight)
        self.rough_weight = check_nonnegative_float("rough_weight", rough_weight)
        self.balance_weight = check_nonnegative_float("balance_weight", balance_weight)
        self.expert_reduction = check_choice("expert_reduction", expert_reduction, ("sum", "mean"))
        if not (sync is True or sync is False or sync == "auto"):
            raise ValueError(f"sync must be 'auto', True or False, got {sync!r}")
        self.sync = sync

    def extra_repr(self) -> str:
        return (
            f"expert_weight={self.expert_weight}, selection_weight={self.selection_weight}, "
            f"rough_weight={self.rough_weight}, balance_weight={self.balance_weight}, "
            f"expert_reduction={self.expert_reduction!r}, sync={self.sync!r}"
        )

    # ------------------------------------------------------------------ pieces
    def _synchronised(self) -> bool:
        if not _dist.is_distributed() or _dist.get_world_size() == 1:
            return False
        if self.sync == "auto":
            return getattr(self.weighter, "scope", None) == "global"
        return bool(self.sync)

    def per_sample_losses(self, expert_outputs: torch.Tensor, target: Any, name: str = "target") -> torch.Tensor:
        """Every expert's per-sample loss.

        Args:
            expert_outputs: Tensor[K, B, ...].
            target: the task's target for the batch (batch-first).
            name: what to call ``target`` in error messages.

        Returns:
            Tensor[B, K] (differentiable with respect to the expert outputs).
        """
        check_tensor("expert_outputs", expert_outputs)
        if expert_outputs.dim() < 2:
            raise ValueError(
                f"expert_outputs must be a Tensor[K, B, ...] (every expert's outputs, stacked), got shape "
                f"{tuple(expert_outputs.shape)}"
            )
        if self.per_sample_loss is None:
            return _default_losses(expert_outputs, target, name)
        k, batch = expert_outputs.shape[0], expert_outputs.shape[1]
        columns = []
        for j in range(k):
            value = self.per_sample_loss(expert_outputs[j], target)
            if not isinstance(value, torch.Tensor) or value.shape != (batch,):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"per_sample_loss must return a Tensor[B] of per-sample losses (B={batch}), got {shape} for "
                    f"expert {j}; reduce every non-batch dimension (e.g. average token losses over T) and keep "
                    "the batch dimension (reduction='none')"
                )
            columns.append(value)
        return torch.stack(columns, dim=1)

    def _empty_batch_loss(self, output: CoETrainOutput, losses: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """A batch of 0 samples without synchronisation: a zero loss attached to the graph (so ``backward()`` works
        and gives zero gradients), and the usual info keys (counts 0, rates NaN)."""
        sel, rough, expert_outputs = output.selection_logits, output.rough_logits, output.expert_outputs
        k = sel.shape[1]
        loss = sel.sum() * 0.0 + expert_outputs.sum() * 0.0
        parts = ["expert_loss", "selection_loss"]
        if rough is not None and self.rough_weight > 0:
            loss = loss + rough.sum() * 0.0
            parts.append("rough_loss")
        if self.balance_weight > 0:
            parts.append("balance_loss")
        info: dict[str, Any] = {name: 0.0 for name in parts}
        info["loss"] = 0.0
        zeros = torch.zeros(k, dtype=torch.long, device=sel.device)
        info["expert_losses"] = torch.zeros(k, dtype=losses.dtype, device=losses.device)
        info["per_sample_losses"] = losses.detach()
        for name in ("wgm_load", "load", "label_load"):
            info[name] = zeros.clone()
        for name in ("assignment_entropy", "agreement"):
            info[name] = float("nan")
        if expert_outputs.dim() == 3:
            info["oracle_accuracy"] = info["routed_accuracy"] = float("nan")
        return loss, info

    def _weights(self, sel: torch.Tensor, dtype: torch.dtype) -> tuple[Any, torch.Tensor]:
        """The WGM: ``(its output, weights Tensor[B, K])`` from the detached selection logits."""
        wgm = self.weighter(sel.detach())
        if not isinstance(getattr(wgm, "weights", None), torch.Tensor):
            raise TypeError(
                "the weighter must return an object with weights Tensor[B, K] (like BalancedTransportWeighter's "
                f"WeightingOutput), got {type(wgm).__name__}"
            )
        weights = wgm.weights.detach().to(dtype)
        if weights.shape != sel.shape:
            raise ValueError(
                f"the weighter returned weights of shape {tuple(weights.shape)}, expected {list(sel.shape)}"
            )
        return wgm, weights

    def _labels(self, losses: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The LGM: ``(probs Tensor[B, K], index LongTensor[B])`` from the detached per-sample losses."""
        batch, k = sel.shape
        if batch == 0:  # an empty batch on this rank of a synchronised step: nothing to label, every collective runs
            return sel.detach().new_zeros((0, k)), torch.zeros(0, dtype=torch.long, device=sel.device)
        lgm = self.labeler(losses.detach())
        if not isinstance(getattr(lgm, "probs", None), torch.Tensor) or not isinstance(
            getattr(lgm, "index", None), torch.Tensor
        ):
            raise TypeError(
                "the labeler must return an object with probs Tensor[B, K] and index LongTensor[B] (like "
                f"LabelGenerator's LabelOutput), got {type(lgm).__name__}"
            )
        probs = lgm.probs.detach().to(sel.dtype)
        if probs.shape != (batch, k):
            raise ValueError(f"the labeler returned probs of shape {tuple(probs.shape)}, expected [{batch}, {k}]")
        return probs, lgm.index

    def _normalisers(self, weights: torch.Tensor, synchronised: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(weight mass per expert Tensor[K], number of samples, scale)``, summed over ranks when synchronised."""
        k = weights.shape[1]
        norms = torch.cat([weights.sum(dim=0), weights.new_full((1,), weights.shape[0])])  # [K + 1]
        scale = 1.0
        if synchronised:
            _dist.all_reduce(norms)
            scale = float(_dist.get_world_size())
        return norms[:k], norms[k], scale

    def _rough_loss(
        self,
        output: CoETrainOutput,
        target: Any,
        rough_target: Any,
        name: str,
        n_total: torch.Tensor,
        targets_checked: bool,
    ) -> torch.Tensor:
        """The rough head's cross-entropy, summed over this rank's samples and divided by ``n_total``."""
        rough, batch = output.rough_logits, output.selection_logits.shape[0]
        assert rough is not None
        rt = target if rough_target is None else rough_target
        rt_name = "rough_target" if rough_target is not None else name
        if not isinstance(rt, torch.Tensor) or rt.dim() != 1 or rt.shape[0] != batch or not _is_integer(rt):
            what = type(rt).__name__
            if isinstance(rt, torch.Tensor):
                what = f"shape {tuple(rt.shape)} and dtype {rt.dtype}"
            raise ValueError(
                f"the rough head needs class indices LongTensor[B={batch}] as rough_target (default: {name}), "
                f"got {what}; pass rough_target=... or rough_weight=0"
            )
        if rough_target is None:
            _check_same_classes(rough.shape[1], output.expert_outputs)
        if not (rough_target is None and targets_checked):  # else: the experts' default loss checked it, same C
            check_class_targets(rt_name, rt, batch, rough.shape[1])
        return F.cross_entropy(rough, rt, reduction="sum") / n_total

    def _target(self, output: CoETrainOutput, target: Any) -> tuple[Any, str]:
        """The target and its name for messages: ``target`` when given, else the labels on the output."""
        if target is not None:
            return target, "target"
        labels = getattr(output, "labels", None)
        if labels is None:
            raise ValueError(
                "CoELoss needs a target: pass it (criterion(output, target)), or call the CoE with labels among its "
                "keyword inputs (model(**batch) with batch['labels']), which CoETrainOutput.labels then carries"
            )
        return labels, "labels"

    # ------------------------------------------------------------------ forward
    def forward(
        self, output: CoETrainOutput, target: Any = None, rough_target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the loss for one batch.

        Args:
            output: the :class:`~pycoe.coe.model.CoETrainOutput` of a CoE in training mode.
            target: the experts' target (for the default loss: class indices LongTensor[B] in [0, C) or class
                probabilities Tensor[B, C] for class logits; token labels LongTensor[B, T] for token logits).
                Default: ``output.labels`` (the ``labels`` of ``model(**batch)``); neither raises a ``ValueError``.
            rough_target: the rough head's target (class indices LongTensor[B] in [0, C)); defaults to ``target``.
                With the default, the rough head and the experts predict the same classes: a rough head of another
                class count than the experts' class logits raises a ``ValueError``.

        Returns:
            ``(loss, info)``: ``loss`` is a 0-dim tensor to call ``backward()`` on. ``info`` holds detached
            **tensors** (no device synchronisation and nothing that breaks a ``torch.compile`` graph; turn the
            scalars into floats where you log them, e.g. with :func:`scalar_info`): the weighted components
            ``expert_loss``, ``selection_loss``, ``rough_loss`` (when computed), ``balance_loss`` (when
            ``balance_weight > 0``) and ``loss`` (0-dim; under global normalisation, this rank's contribution in
            the units of the loss, so that their mean over ranks is the global value); ``expert_losses``
            Tensor[K] (each expert's weighted mean loss, before the expert weight); ``per_sample_losses``
            Tensor[B, K]; routing metrics: ``wgm_load`` LongTensor[K] (the WGM partition, global under a global
            scope), ``load`` LongTensor[K] (samples per expert under the delegator's argmax, i.e. the inference
            routing without exit), ``label_load`` LongTensor[K] (LGM labels per expert), ``assignment_entropy``
            (0-dim, entropy of ``load`` divided by log K: 1 = balanced), ``agreement`` (0-dim, fraction of samples
            whose argmax expert is the LGM label); and, for class labels (logits ``[K, B, C]`` and integer
            targets ``[B]``), ``oracle_accuracy`` (some expert is right) and ``routed_accuracy`` (the argmax
            expert is right), both 0-dim.

        A batch of 0 samples gives a zero loss attached to the graph (``backward()`` gives zero gradients), counts
        of 0 and ``NaN`` rates; under synchronisation such a rank still takes part in every collective.
        """
        sel, rough, expert_outputs = _check_output(output)
        target, name = self._target(output, target)
        batch, k = sel.shape
        check_tensor(name, target, batch=batch)  # B: the batch of the outputs
        losses = self.per_sample_losses(expert_outputs, target, name)  # [B, K]
        checked = _Checked(
            selection=type(self.weighter) is BalancedTransportWeighter,
            labels=type(self.labeler) is LabelGenerator,
            targets=self.per_sample_loss is None and expert_outputs.dim() == 3 and _is_integer(target),
        )
        synchronised = self._synchronised()
        if batch == 0 and not synchronised:
            return self._empty_batch_loss(output, losses)
        wgm, weights = self._weights(sel, losses.dtype)
        probs, label_index = self._labels(losses, sel)
        mass, n_total, scale = self._normalisers(weights, synchronised)

        expert_terms = (weights * losses).sum(dim=0) / mass.clamp_min(torch.finfo(mass.dtype).tiny)  # [K]
        expert_loss = expert_terms.sum() if self.expert_reduction == "sum" else expert_terms.sum() / k
        selection_loss = -(probs * F.log_softmax(sel, dim=1)).sum() / n_total
        parts = {
            "expert_loss": self.expert_weight * expert_loss,
            "selection_loss": self.selection_weight * selection_loss,
        }
        if rough is not None and self.rough_weight > 0:
            rough_loss = self._rough_loss(output, target, rough_target, name, n_total, checked.targets)
            parts["rough_loss"] = self.rough_weight * rough_loss
        terms = list(parts.values())
        loss = terms[0]
        for term in terms[1:]:
            loss = loss + term
        loss = scale * loss
        parts = {part: scale * value for part, value in parts.items()}
        if self.balance_weight > 0:
            cv2 = _metrics._load_balance_cv2 if checked.selection else _metrics.load_balance_cv2
            balance = self.balance_weight * (cv2(sel) if batch > 0 else sel.sum() * 0.0)
            loss = loss + balance
            parts["balance_loss"] = balance
        info = _info(parts, loss, sel, expert_outputs, target, losses, expert_terms, wgm, weights, label_index, checked)
        return loss, info


# ---------------------------------------------------------------------- steps of CoELoss.forward
def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_output(output: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(selection_logits [B, K], rough_logits [B, C] or None, expert_outputs [K, B, ...])`` of a train output."""
    if not all(hasattr(output, a) for a in ("selection_logits", "rough_logits", "expert_outputs")):
        raise TypeError(
            "output must be a CoETrainOutput (the CoE's output in training mode), got "
            f"{type(output).__name__}; did you call model.eval()?"
        )
    sel, rough, expert_outputs = output.selection_logits, output.rough_logits, output.expert_outputs
    if not isinstance(sel, torch.Tensor) or sel.dim() != 2:
        raise ValueError("output.selection_logits must be a Tensor[B, K]")
    batch, k = sel.shape
    if not isinstance(expert_outputs, torch.Tensor):
        raise TypeError(f"output.expert_outputs must be a Tensor[K, B, ...], got {type(expert_outputs).__name__}")
    if expert_outputs.dim() < 2 or expert_outputs.shape[:2] != (k, batch):
        raise ValueError(
            f"output.expert_outputs must have shape [K={k}, B={batch}, ...], got {tuple(expert_outputs.shape)}"
        )
    if rough is not None and (not isinstance(rough, torch.Tensor) or rough.dim() != 2 or rough.shape[0] != batch):
        shape = tuple(rough.shape) if isinstance(rough, torch.Tensor) else type(rough).__name__
        raise ValueError(f"output.rough_logits must be None or a Tensor[B={batch}, C], got {shape}")
    return sel, rough, expert_outputs


def _default_losses(expert_outputs: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    """Cross-entropy by the outputs' shape (class logits [K, B, C] or token logits [K, B, T, V]) -> Tensor[B, K]."""
    k, batch = expert_outputs.shape[0], expert_outputs.shape[1]
    if expert_outputs.dim() == 2:
        raise ValueError(
            "the default per_sample_loss is cross-entropy on class logits [B, C] or token logits [B, T, V], but the "
            f"experts return one value per sample (outputs {tuple(expert_outputs.shape)}); pass per_sample_loss="
            "(output, target) -> Tensor[B]"
        )
    check_range = True
    if expert_outputs.dim() == 3:  # class logits: class indices [B] or probabilities [B, C]
        if target.dim() >= 2 and _is_integer(target):
            raise ValueError(
                f"{name} has shape {tuple(target.shape)} (labels per token), but the experts return class logits "
                f"[B, C] = {tuple(expert_outputs.shape[1:])}: per-token labels need token logits [B, T, V] (a "
                "*ForTokenClassification or *ForSeq2SeqLM expert); sequence classification needs labels [B]"
            )
        check_class_targets(name, target, batch, expert_outputs.shape[2], probabilities=True)
        check_range = False  # just checked
    else:
        _check_token_labels(expert_outputs[0], target, name)  # (the shapes of one expert, for the message)
    # one call for all experts: rows (k, b) of the flattened [K * B, ...] logits
    flat_target = target.repeat(k, *([1] * (target.dim() - 1)))
    flat = _per_sample_cross_entropy(
        rearrange(expert_outputs, "k b ... -> (k b) ..."),
        flat_target,
        ignore_index=-100,
        shift=False,
        name=name,
        check_range=check_range,
    )
    return rearrange(flat, "(k b) -> b k", k=k)


def _check_same_classes(rough_classes: int, expert_outputs: torch.Tensor) -> None:
    """With one target for both, the rough head and experts returning class logits [K, B, C] need the same C."""
    if expert_outputs.dim() != 3 or expert_outputs.shape[2] == rough_classes:
        return
    expert_classes = expert_outputs.shape[2]
    raise ValueError(
        f"the rough head predicts {rough_classes} classes but the experts return {expert_classes} values per sample, "
        "and both are trained on the same target. Likely causes: the experts were built from a model whose "
        "classifier a Delegator had stripped (ExpertPool.from_template(m) after Delegator(m): they return "
        f"{expert_classes} features instead of class logits; build the experts first, or give the Delegator "
        "copy.deepcopy(m)); or the Delegator's num_classes differs from the experts' number of classes (e.g. a "
        "Hugging Face config's num_labels). If the rough head has its own task, pass rough_target=..."
    )


def _info(
    parts: dict[str, torch.Tensor],
    loss: torch.Tensor,
    sel: torch.Tensor,
    expert_outputs: torch.Tensor,
    target: torch.Tensor,
    losses: torch.Tensor,
    expert_terms: torch.Tensor,
    wgm: Any,
    weights: torch.Tensor,
    label_index: torch.Tensor,
    checked: _Checked,
) -> dict[str, torch.Tensor]:
    """The ``info`` dict of :meth:`CoELoss.forward`: detached tensors (no device synchronisation, nothing that breaks
    a compiled graph). The metrics check only what ``checked`` says was not checked yet (a custom WGM's or LGM's
    outputs, the targets of a custom per-sample loss); the argmax routing is valid by construction."""
    batch, k = sel.shape
    info: dict[str, torch.Tensor] = {name: value.detach() for name, value in parts.items()}
    info["loss"] = loss.detach()
    with torch.no_grad():
        choice = sel.detach().argmax(dim=1)
        info["expert_losses"] = expert_terms.detach()
        info["per_sample_losses"] = losses.detach()
        info["wgm_load"] = (
            wgm.load.detach() if hasattr(wgm, "load") else _metrics._expert_load(weights.argmax(dim=1), k)
        )
        info["load"] = _metrics._expert_load(choice, k)
        info["label_load"] = (_metrics._expert_load if checked.labels else _metrics.expert_load)(label_index, k)
        class_labels = expert_outputs.dim() == 3 and target.dim() == 1 and _is_integer(target)
        if batch == 0:  # rates over no sample
            nan = sel.new_full((), float("nan"))
            info["assignment_entropy"] = info["agreement"] = nan
            if expert_outputs.dim() == 3:
                info["oracle_accuracy"] = info["routed_accuracy"] = nan
            return info
        info["assignment_entropy"] = _metrics._assignment_entropy(choice, k, normalize=True)
        trusted = checked.selection and checked.labels
        info["agreement"] = (_metrics._agreement if trusted else _metrics.agreement)(sel.detach(), label_index)
        if class_labels:
            logits = expert_outputs.detach()
            # finite where it matters: NaN or +inf logits make the default loss non-finite, which the LGM refuses
            trusted = checked.targets and checked.labels
            info["oracle_accuracy"] = (_metrics._oracle_accuracy if trusted else _metrics.oracle_accuracy)(
                logits.float(), target
            )
            chosen = logits[choice, torch.arange(batch, device=choice.device)]  # [B, C]
            info["routed_accuracy"] = (chosen.argmax(dim=1) == target).float().mean()
    return info


def scalar_info(info: Mapping[str, Any]) -> dict[str, float]:
    """The scalar entries of a loss's ``info`` dict as Python floats, for logging.

    :class:`CoELoss` returns its metrics as tensors so that a training step neither waits for the device nor
    breaks a compiled graph; call this where you log them (one synchronisation for all of them).

    Args:
        info: e.g. the ``info`` of :class:`CoELoss`; entries that are numbers or one-element tensors are kept, the
            others (per-expert loads, per-sample losses) are left out.

    Returns:
        ``{name: float}``, in the order of ``info``.

    Example:
        >>> info = {"loss": torch.tensor(2.5), "load": torch.tensor([3, 5]), "agreement": torch.tensor(0.25)}
        >>> scalar_info(info)
        {'loss': 2.5, 'agreement': 0.25}
    """
    if not isinstance(info, Mapping):
        raise TypeError(f"info must be a mapping (the info dict of a loss), got {type(info).__name__}")
    names = [n for n, v in info.items() if isinstance(v, torch.Tensor) and v.numel() == 1]
    values = torch.stack([info[n].detach().reshape(()).double().cpu() for n in names]).tolist() if names else []
    scalars = {n: float(v) for n, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    scalars.update(zip(names, values))
    return {n: scalars[n] for n in info if n in scalars}
