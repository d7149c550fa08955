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

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .. import distributed as _dist
from .._validation import check_callable, check_choice, check_class_targets, check_nonnegative_float, check_tensor
from ..routing import metrics as _metrics
from ..routing.labels import LabelGenerator
from ..routing.weighting import BalancedTransportWeighter
from .model import CoETrainOutput

__all__ = ["CoELoss"]


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
        per_sample_loss: ``(expert_output Tensor[B, ...], target) -> Tensor[B]``, lower is better. Default:
            ``F.cross_entropy(output, target, reduction="none")`` for logits ``[B, C]``. For sequence outputs
            ``[B, T, V]`` pass a function that averages the token losses over T (e.g. ignoring padding).
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

    def per_sample_losses(self, expert_outputs: torch.Tensor, target: Any) -> torch.Tensor:
        """Every expert's per-sample loss.

        Args:
            expert_outputs: Tensor[K, B, ...].
            target: the task's target for the batch (batch-first).

        Returns:
            Tensor[B, K] (differentiable with respect to the expert outputs).
        """
        check_tensor("expert_outputs", expert_outputs)
        if expert_outputs.dim() < 2:
            raise ValueError(
                f"expert_outputs must be a Tensor[K, B, ...] (every expert's outputs, stacked), got shape "
                f"{tuple(expert_outputs.shape)}"
            )
        k, batch = expert_outputs.shape[0], expert_outputs.shape[1]
        if self.per_sample_loss is None:
            if expert_outputs.dim() != 3:
                raise ValueError(
                    "the default per_sample_loss is cross-entropy on class logits [B, C], but the experts return "
                    f"per-sample outputs of shape {tuple(expert_outputs.shape[2:])}; pass per_sample_loss="
                    "(output, target) -> Tensor[B] (e.g. token cross-entropy averaged over T for sequences)"
                )
            check_class_targets("target", target, batch, expert_outputs.shape[2], probabilities=True)
            # one call for all experts: rows (k, b) of the flattened [K * B, C] logits
            flat_target = target.repeat(k, *([1] * (target.dim() - 1)))
            flat = F.cross_entropy(rearrange(expert_outputs, "k b c -> (k b) c"), flat_target, reduction="none")
            return rearrange(flat, "(k b) -> b k", k=k)
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

    # ------------------------------------------------------------------ forward
    def forward(
        self, output: CoETrainOutput, target: Any, rough_target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Compute the loss for one batch.

        Args:
            output: the :class:`~pycoe.coe.model.CoETrainOutput` of a CoE in training mode.
            target: the experts' target (for the default loss: class indices LongTensor[B] in [0, C), or class
                probabilities Tensor[B, C]).
            rough_target: the rough head's target (class indices LongTensor[B] in [0, C)); defaults to ``target``.

        Returns:
            ``(loss, info)``: ``loss`` is a 0-dim tensor to call ``backward()`` on. ``info`` holds detached values:
            the weighted components ``expert_loss``, ``selection_loss``, ``rough_loss`` (when computed),
            ``balance_loss`` (when ``balance_weight > 0``) and ``loss`` (floats; under global normalisation, this
            rank's contribution in the units of the loss, so that their mean over ranks is the global value);
            ``expert_losses`` Tensor[K] (each expert's weighted mean loss, before the expert weight);
            ``per_sample_losses`` Tensor[B, K]; routing metrics: ``wgm_load`` LongTensor[K] (the WGM partition,
            global under a global scope), ``load`` LongTensor[K] (samples per expert under the delegator's
            argmax, i.e. the inference routing without exit), ``label_load`` LongTensor[K] (LGM labels per
            expert), ``assignment_entropy`` (float, entropy of ``load`` divided by log K: 1 = balanced),
            ``agreement`` (float, fraction of samples whose argmax expert is the LGM label); and, for class labels
            (logits ``[K, B, C]`` and integer targets ``[B]``), ``oracle_accuracy`` (some expert is right) and
            ``routed_accuracy`` (the argmax expert is right).

        A batch of 0 samples gives a zero loss attached to the graph (``backward()`` gives zero gradients), counts
        of 0 and ``NaN`` rates; under synchronisation such a rank still takes part in every collective.
        """
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
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
        if target.dim() == 0 or target.shape[0] != batch:
            raise ValueError(
                f"target must be batch-first with B={batch} (the batch of the outputs), got shape {tuple(target.shape)}"
            )

        losses = self.per_sample_losses(expert_outputs, target)  # [B, K]
        synchronised = self._synchronised()
        if batch == 0 and not synchronised:
            return self._empty_batch_loss(output, losses)
        wgm = self.weighter(sel.detach())
        if not isinstance(getattr(wgm, "weights", None), torch.Tensor):
            raise TypeError(
                "the weighter must return an object with weights Tensor[B, K] (like BalancedTransportWeighter's "
                f"WeightingOutput), got {type(wgm).__name__}"
            )
        weights = wgm.weights.detach().to(losses.dtype)
        if weights.shape != (batch, k):
            raise ValueError(f"the weighter returned weights of shape {tuple(weights.shape)}, expected [{batch}, {k}]")
        if batch > 0:
            lgm = self.labeler(losses.detach())
            if not isinstance(getattr(lgm, "probs", None), torch.Tensor) or not isinstance(
                getattr(lgm, "index", None), torch.Tensor
            ):
                raise TypeError(
                    "the labeler must return an object with probs Tensor[B, K] and index LongTensor[B] (like "
                    f"LabelGenerator's LabelOutput), got {type(lgm).__name__}"
                )
            probs, label_index = lgm.probs.detach().to(sel.dtype), lgm.index
            if probs.shape != (batch, k):
                raise ValueError(f"the labeler returned probs of shape {tuple(probs.shape)}, expected [{batch}, {k}]")
        else:  # an empty batch on this rank of a synchronised step: nothing to label, but every collective runs
            probs, label_index = sel.detach().new_zeros((0, k)), torch.zeros(0, dtype=torch.long, device=sel.device)

        # normalisers: per-expert weight mass and the number of samples (global under synchronisation)
        norms = torch.cat([weights.sum(dim=0), weights.new_tensor([float(batch)])])  # [K + 1]
        scale = 1.0
        if synchronised:
            _dist.all_reduce(norms)
            scale = float(_dist.get_world_size())
        mass, n_total = norms[:k], norms[k]

        expert_terms = (weights * losses).sum(dim=0) / mass.clamp_min(torch.finfo(mass.dtype).tiny)  # [K]
        expert_loss = expert_terms.sum() if self.expert_reduction == "sum" else expert_terms.sum() / k
        log_p = F.log_softmax(sel, dim=1)
        selection_loss = -(probs * log_p).sum() / n_total
        parts = {
            "expert_loss": self.expert_weight * expert_loss,
            "selection_loss": self.selection_weight * selection_loss,
        }
        if rough is not None and self.rough_weight > 0:
            rt = target if rough_target is None else rough_target
            if (
                not isinstance(rt, torch.Tensor)
                or rt.dim() != 1
                or rt.shape[0] != batch
                or rt.is_floating_point()
                or rt.is_complex()
            ):
                if isinstance(rt, torch.Tensor):
                    what = f"shape {tuple(rt.shape)} and dtype {rt.dtype}"
                else:
                    what = type(rt).__name__
                raise ValueError(
                    f"the rough head needs class indices LongTensor[B={batch}] as rough_target (default: target), "
                    f"got {what}; pass rough_target=... or rough_weight=0"
                )
            check_class_targets("rough_target" if rough_target is not None else "target", rt, batch, rough.shape[1])
            rough_loss = F.cross_entropy(rough, rt, reduction="sum") / n_total
            parts["rough_loss"] = self.rough_weight * rough_loss
        loss = scale * sum(parts.values())
        parts = {name: scale * value for name, value in parts.items()}
        if self.balance_weight > 0:
            balance = self.balance_weight * (_metrics.load_balance_cv2(sel) if batch > 0 else sel.sum() * 0.0)
            loss = loss + balance
            parts["balance_loss"] = balance

        info: dict[str, Any] = {name: float(value.detach()) for name, value in parts.items()}
        info["loss"] = float(loss.detach())
        with torch.no_grad():
            choice = sel.detach().argmax(dim=1)
            info["expert_losses"] = expert_terms.detach()
            info["per_sample_losses"] = losses.detach()
            info["wgm_load"] = (
                wgm.load.detach() if hasattr(wgm, "load") else torch.bincount(weights.argmax(dim=1), minlength=k)
            )
            info["load"] = _metrics.expert_load(choice, k)
            info["label_load"] = _metrics.expert_load(label_index, k)
            if batch == 0:  # rates over no sample
                info["assignment_entropy"] = info["agreement"] = float("nan")
                if expert_outputs.dim() == 3:
                    info["oracle_accuracy"] = info["routed_accuracy"] = float("nan")
            else:
                info["assignment_entropy"] = float(_metrics.assignment_entropy(choice, k, normalize=True))
                info["agreement"] = float(_metrics.agreement(sel.detach(), label_index))
            if batch > 0 and expert_outputs.dim() == 3 and target.dim() == 1 and not target.is_floating_point():
                logits = expert_outputs.detach()
                info["oracle_accuracy"] = float(_metrics.oracle_accuracy(logits.float(), target))
                chosen = logits[choice, torch.arange(batch, device=choice.device)]  # [B, C]
                info["routed_accuracy"] = float((chosen.argmax(dim=1) == target).float().mean())
        return loss, info
