"""Expert-selection targets from the experts' losses: pycoe's formulation of CoE's label generation module (LGM).

Zhang, Chen & Zhong, "Collaboration of Experts: Achieving 80% Top-1 Accuracy on ImageNet with 100M
FLOPs", ICML 2022 (arXiv:2107.03815). The public abstract confirms that the LGM generates the label
that forms the delegator's loss for expert selection; the rule itself is not public. The three rules
here ("best", "soft", "balanced") are **pycoe's formulation**, not a claim about the paper.

Einstein legend: B = samples in the batch, K = experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pycoe._validation import check_choice, check_finite, check_positive_float, check_tensor
from pycoe.routing.transport import METHODS, balanced_assignment, check_solver_options

__all__ = ["LabelGenerator", "LabelOutput", "best_expert"]

LABEL_MODES = ("best", "soft", "balanced")


@dataclass
class LabelOutput:
    """Targets for the delegator's expert-selection head.

    Attributes:
        probs: Tensor[B, K], detached target distribution over experts (one-hot for ``"best"`` and
            ``"balanced"``, a softmax for ``"soft"``).
        index: LongTensor[B], the hard label (for ``"soft"`` the same as ``"best"``: the lowest-loss
            expert, ties to the lowest index).
    """

    probs: torch.Tensor
    index: torch.Tensor


def best_expert(losses: torch.Tensor) -> torch.Tensor:
    """Index of the lowest loss in each row, ties broken to the lowest expert index.

    Args:
        losses: Tensor[B, K] (K >= 1), finite.

    Returns:
        LongTensor[B].
    """
    check_tensor("losses", losses, ndim=2)
    if losses.shape[1] == 0:
        raise ValueError(f"losses must have at least one expert (K >= 1), got shape {tuple(losses.shape)}")
    check_finite("losses", losses)
    return _first_minimum(losses)


def _first_minimum(losses: torch.Tensor) -> torch.Tensor:
    # Tensor[B, K] (checked) -> LongTensor[B]: the lowest index among each row's minima.
    k = losses.shape[1]
    is_min = losses == losses.min(dim=1, keepdim=True).values  # [B, K]
    ks = torch.arange(k, device=losses.device).expand_as(losses)
    return torch.where(is_min, ks, torch.full_like(ks, k)).min(dim=1).values


class LabelGenerator(nn.Module):
    r"""Label generation module (LGM): expert-selection targets from per-sample expert losses.

    Given the losses :math:`L \in \mathbb{R}^{B \times K}` of the K experts on the B samples (lower is
    better), the target for sample :math:`b` is

    - ``"best"``: one-hot at :math:`t_b = \arg\min_k L_{bk}` (ties to the lowest index :math:`k`);
    - ``"soft"``: :math:`q_{bk} = \operatorname{softmax}_k(-L_{bk} / T)` with temperature :math:`T > 0`
      (hard label :math:`t_b` as for ``"best"``);
    - ``"balanced"``: one-hot at the balanced assignment of :math:`-L` (the same transportation problem
      as :class:`~pycoe.routing.weighting.BalancedTransportWeighter`, near-equal capacities), so the
      labels cannot all collapse onto one expert.

    The outputs are detached: the experts get no gradient through the labels. That the LGM produces
    the delegator's expert-selection label is confirmed by the CoE abstract; these rules are pycoe's
    formulation.

    Args:
        mode: ``"best"`` (default), ``"soft"`` or ``"balanced"``.
        temperature: T for ``"soft"``, a positive finite number (default 1.0). Only ``"soft"`` uses it: giving
            it with another mode raises ``ValueError`` instead of being silently ignored.
        method: solver for ``"balanced"`` (see :func:`pycoe.routing.transport.balanced_assignment`; default
            ``"exact"``). Only ``"balanced"`` uses it: giving it with another mode raises ``ValueError``.
        solver_options: keyword options of the solver method for ``"balanced"`` (see
            :func:`pycoe.routing.transport.balanced_assignment`; an option the method does not use raises); any
            other mode raises if they are given.

    Every mode runs inside ``torch.compile`` (``fullgraph=True`` included) without a graph break: ``"balanced"``
    solves through the custom operator ``pycoe::balanced_assignment``, and the NaN/inf check of the losses becomes
    a ``torch._assert_async`` (``RuntimeError`` when the compiled code runs, instead of ``ValueError``).

    Example:
        >>> lgm = LabelGenerator("best")
        >>> lgm(torch.tensor([[0.3, 0.1], [0.2, 0.2]])).index.tolist()
        [1, 0]
    """

    def __init__(
        self,
        mode: str = "best",
        temperature: float | None = None,
        method: str | None = None,
        solver_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.mode = check_choice("mode", mode, LABEL_MODES)
        for name, value, used_by in (
            ("temperature", temperature, "soft"),
            ("method", method, "balanced"),
            ("solver_options", solver_options, "balanced"),
        ):
            if value is not None and self.mode != used_by:
                raise ValueError(
                    f"{name} is used only by mode={used_by!r}, not by mode={self.mode!r} (which would ignore it); "
                    "leave it out"
                )
        self.temperature = check_positive_float("temperature", 1.0 if temperature is None else temperature)
        self.method = check_choice("method", "exact" if method is None else method, METHODS)
        self.solver_options = check_solver_options(self.method, solver_options)

    def extra_repr(self) -> str:
        if self.mode == "soft":
            return f"mode='soft', temperature={self.temperature}"
        if self.mode == "balanced":
            options = f", solver_options={self.solver_options}" if self.solver_options else ""
            return f"mode='balanced', method={self.method!r}{options}"
        return f"mode={self.mode!r}"

    def forward(self, losses: torch.Tensor) -> LabelOutput:
        """Compute the targets.

        Args:
            losses: Tensor[B, K], per-sample loss of each expert (lower is better), finite, B >= 1.

        Returns:
            :class:`LabelOutput` with probs Tensor[B, K] and index LongTensor[B], detached.
        """
        check_tensor("losses", losses, ndim=2, floating=True)
        if losses.shape[0] == 0 or losses.shape[1] == 0:
            raise ValueError(f"losses must have shape [B, K] with B >= 1 and K >= 1, got {tuple(losses.shape)}")
        check_finite("losses", losses)
        with torch.no_grad():
            x = losses.detach()
            k = x.shape[1]
            if self.mode == "balanced":
                index = balanced_assignment(-x, None, self.method, **self.solver_options)  # on x's device
            else:
                index = _first_minimum(x)
            if self.mode == "soft":
                probs = F.softmax(-x / self.temperature, dim=1)
            else:  # one-hot by comparison (F.one_hot's eager range check reads the data)
                probs = (index[:, None] == torch.arange(k, device=x.device)).to(x.dtype)
        return LabelOutput(probs=probs, index=index)
