"""Balanced-transport loss weighting: pycoe's formulation of CoE's weight generation module (WGM).

Zhang, Chen & Zhong, "Collaboration of Experts: Achieving 80% Top-1 Accuracy on ImageNet with 100M
FLOPs", ICML 2022 (arXiv:2107.03815). What the public abstract confirms: the WGM partitions the training
data into portions *based on the delegator* by solving a *balanced transportation problem*, and makes
each expert focus on its portion by *re-weighting the experts' losses*. The paper's method section is not
public, so everything else here is **pycoe's formulation**, not a claim about the paper: the score
transform (log-softmax by default), the weights (1 for the assigned expert, ``epsilon`` for the others),
solving per mini-batch by default, and the optional global (all-ranks) scope.

Einstein legend: B = samples in this rank's batch, G = samples in the global (all-ranks) batch,
N = samples in a dataset, K = experts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pycoe import distributed as _dist
from pycoe._validation import (
    check_choice,
    check_dtype,
    check_expert_index,
    check_finite,
    check_positive_int,
    check_probability,
    check_tensor,
    describe,
)
from pycoe.routing.transport import METHODS, balanced_assignment, check_solver_options

__all__ = ["BalancedTransportWeighter", "WeightingOutput"]

SCORE_TRANSFORMS = ("log_softmax", "softmax", "logits")
SCOPES = ("batch", "global")


@dataclass
class WeightingOutput:
    """What :class:`BalancedTransportWeighter` returns for one batch.

    Attributes:
        weights: Tensor[B, K], detached per-sample expert-loss weights: 1 where expert k is the one
            assigned to sample b, ``epsilon`` elsewhere. Same dtype and device as the logits.
        assignment: LongTensor[B], the expert assigned to each sample of this rank's batch.
        load: LongTensor[K], how many samples each expert received in the solved problem (the local
            batch for scope ``"batch"``, the global batch for scope ``"global"``).
        mean_score: Tensor[] (detached), the mean transformed score of the assigned (sample, expert)
            pairs over the solved problem, i.e. the optimal objective divided by its number of samples.
    """

    weights: torch.Tensor
    assignment: torch.Tensor
    load: torch.Tensor
    mean_score: torch.Tensor


def _transform(logits: torch.Tensor, score: str) -> torch.Tensor:
    # Tensor[N, K] -> Tensor[N, K]; computed without autograd history.
    with torch.no_grad():
        x = logits.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if score == "log_softmax":
            return F.log_softmax(x, dim=1)
        if score == "softmax":
            return F.softmax(x, dim=1)
        return x


class BalancedTransportWeighter(nn.Module):
    r"""Weight generation module (WGM): balanced assignment of samples to experts, as loss weights.

    From the delegator's selection logits :math:`z \in \mathbb{R}^{B \times K}` it computes scores
    :math:`S = \phi(z)` (``score``: :math:`\log\operatorname{softmax}` by default, softmax probabilities,
    or the raw logits), solves the balanced transportation problem

    .. math::

        \max_{A \in \{0,1\}^{B \times K}} \sum_{b,k} A_{bk} S_{bk}
        \quad\text{s.t.}\quad \sum_k A_{bk} = 1, \quad \sum_b A_{bk} = c_k,

    with near-equal capacities :math:`c_k` (``B // K`` each, the remainder one each to the first
    ``B % K`` experts), and returns the weights :math:`w_{bk} = A_{bk} + \epsilon (1 - A_{bk})`.
    An expert's loss is then :math:`\sum_b w_{bk} \ell_{bk}` (normalised as the caller likes). The
    weights are detached: no gradient flows into the delegator through them.

    That the WGM solves a balanced transportation problem from the delegator's output and re-weights
    the expert losses is confirmed by the CoE abstract; the score transform, the epsilon weights and
    the per-batch default are pycoe's formulation.

    Note:
        ``"log_softmax"`` and ``"logits"`` give the **same assignment** (up to ties): the log-softmax
        differs from the logits by a per-row constant (the log-sum-exp), and every feasible assignment
        takes exactly one entry per row, so the objectives differ by a constant. They differ only in
        ``mean_score``. ``"softmax"`` is a genuinely different objective (sum of probabilities rather
        than of log-probabilities) and can give a different assignment.

    Args:
        num_experts: K, the number of experts (>= 1).
        epsilon: weight of the non-assigned experts, in [0, 1] (0: hard partition; 1: no partition).
        score: ``"log_softmax"`` (default), ``"softmax"`` or ``"logits"``.
        method: solver passed to :func:`pycoe.routing.transport.balanced_assignment`:
            ``"exact"`` (default), ``"sinkhorn"`` or ``"greedy"``.
        scope: ``"batch"`` (default): solve over this process's batch. ``"global"``: when
            ``torch.distributed`` is initialised, gather the scores of all ranks (their batch sizes may
            differ), solve once over the global batch (rank 0 solves and broadcasts the assignment, so it
            is identical on every rank) and keep this rank's slice. Without an initialised process group,
            ``"global"`` behaves exactly like ``"batch"``.
        solver_options: keyword options for the solver method, e.g. ``{"entropic_reg": 0.01, "max_iter":
            500}`` with ``method="sinkhorn"`` (see :func:`pycoe.routing.transport.balanced_assignment`);
            validated here: an option the method does not use raises. Default: none.

    Under ``torch.compile`` (``fullgraph=True`` included) the forward pass with scope ``"batch"`` is one graph:
    the solve is the custom operator ``pycoe::balanced_assignment``, and the NaN/inf check of the logits is a
    ``torch._assert_async`` (a ``RuntimeError`` when the compiled code runs, instead of eager mode's
    ``ValueError``). Scope ``"global"`` under an initialised process group runs eagerly only (its collectives
    and rank-0 error handling are Python control flow): tracing it raises a ``RuntimeError`` that says so (without
    ``fullgraph=True``, Dynamo breaks the graph there and runs it eagerly).

    Example:
        >>> wgm = BalancedTransportWeighter(num_experts=4, epsilon=0.0)
        >>> out = wgm(torch.randn(8, 4))
        >>> out.load.tolist()
        [2, 2, 2, 2]
    """

    def __init__(
        self,
        num_experts: int,
        epsilon: float = 0.0,
        score: str = "log_softmax",
        method: str = "exact",
        scope: str = "batch",
        solver_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.epsilon = check_probability("epsilon", epsilon)
        self.score = check_choice("score", score, SCORE_TRANSFORMS)
        self.method = check_choice("method", method, METHODS)
        self.scope = check_choice("scope", scope, SCOPES)
        self.solver_options = check_solver_options(self.method, solver_options)

    def extra_repr(self) -> str:
        options = f", solver_options={self.solver_options}" if self.solver_options else ""
        return (
            f"num_experts={self.num_experts}, epsilon={self.epsilon}, score={self.score!r}, "
            f"method={self.method!r}, scope={self.scope!r}{options}"
        )

    def _check_logits(self, name: str, logits: Any) -> torch.Tensor:
        check_tensor(name, logits, ndim=2, floating=True)
        if logits.shape[1] != self.num_experts:
            raise ValueError(f"{name} must have shape [B, num_experts={self.num_experts}], got {tuple(logits.shape)}")
        check_finite(name, logits)
        return logits

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the score transform: Tensor[N, K] logits -> Tensor[N, K] scores (detached)."""
        return _transform(self._check_logits("logits", logits), self.score)

    def forward(self, selection_logits: torch.Tensor) -> WeightingOutput:
        """Solve the balanced assignment for one batch and return the expert-loss weights.

        Args:
            selection_logits: Tensor[B, K], the delegator's expert-selection logits (B >= 1 on this
                rank; with scope ``"global"`` a rank may hold B = 0 as long as the global batch is
                non-empty).

        Returns:
            :class:`WeightingOutput` with weights Tensor[B, K], assignment LongTensor[B],
            load LongTensor[K] and mean_score Tensor[].

        Raises:
            TypeError, ValueError: for logits that are not a floating Tensor[B, K] with
                K = ``num_experts``, hold NaN/inf, or (globally) hold no sample. With scope
                ``"global"``, a wrong shape or dtype raises on the offending rank only, whereas NaN/inf
                anywhere raises on every rank, and a failure of rank 0's solve raises there and as a
                ``RuntimeError`` on the other ranks (no rank is left waiting in a collective).
        """
        if self.scope == "global" and _dist.is_distributed():
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "BalancedTransportWeighter(scope='global') under torch.distributed runs eagerly only (its "
                    "collectives and rank-0 error handling are Python control flow): use scope='batch' inside "
                    "torch.compile(fullgraph=True), or call the weighter outside the compiled region"
                )
            return self._forward_global(selection_logits)
        logits = self._check_logits("selection_logits", selection_logits)
        if logits.shape[0] == 0:
            raise ValueError("selection_logits must hold at least one sample, got shape (0, K)")
        scores = _transform(logits, self.score)  # [B, K]
        assignment = balanced_assignment(scores, None, self.method, **self.solver_options)  # on scores' device
        return self._output(logits, assignment, assignment, scores)

    def _forward_global(self, selection_logits: torch.Tensor) -> WeightingOutput:
        # Shape and dtype errors are raised on the offending rank only (a programming error). Non-finite
        # values are checked on the gathered scores, and a failure of rank 0's solve is broadcast as a
        # sentinel, so that every rank raises together instead of waiting in a collective until timeout.
        check_tensor("selection_logits", selection_logits, ndim=2, floating=True)
        if selection_logits.shape[1] != self.num_experts:
            raise ValueError(
                f"selection_logits must have shape [B, num_experts={self.num_experts}], "
                f"got {tuple(selection_logits.shape)}"
            )
        logits = selection_logits
        device = logits.device
        with torch.no_grad():
            raw = logits.detach().float() if logits.dtype in (torch.float16, torch.bfloat16) else logits.detach()
            gathered = _dist.all_gather_variable(raw)  # [G, K]
        g = gathered.tensor.shape[0]
        if g == 0:
            raise ValueError("selection_logits is empty on every rank: the global batch has no samples")
        try:
            check_finite("selection_logits (gathered over all ranks)", gathered.tensor)
        except ValueError as err:
            local = gathered.tensor[gathered.local]
            where = "on this rank" if not bool(torch.isfinite(local).all()) else "on another rank"
            raise ValueError(f"{err} ({where})") from None
        solved_scores = _transform(gathered.tensor, self.score)  # [G, K]
        assignment_all = torch.empty(g, dtype=torch.long, device=device)
        error: Exception | None = None
        if _dist.get_rank() == 0:
            try:
                assignment_all.copy_(balanced_assignment(solved_scores, None, self.method, **self.solver_options))
            except Exception as exc:
                error = exc
                assignment_all.fill_(-1)
        _dist.broadcast(assignment_all, src=0)
        if error is not None:
            raise error
        if int(assignment_all[0]) < 0:
            raise RuntimeError("the global balanced assignment failed on rank 0; see the error raised there")
        assignment = assignment_all[gathered.local]
        return self._output(logits, assignment, assignment_all, solved_scores)

    def weights_for(self, assignment: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert-loss weights for a given assignment: 1 for the assigned expert, ``epsilon`` elsewhere.

        Use it with :meth:`partition_dataset` in the per-epoch variant: look up the stored partition for
        the batch's sample indices and turn it into weights, e.g.
        ``weights = wgm.weights_for(partition[batch_indices])``.

        Args:
            assignment: LongTensor[B], expert per sample, in [0, K-1].
            dtype: floating dtype of the result (default: ``torch.get_default_dtype()``).

        Returns:
            Tensor[B, K] (no autograd history), on ``assignment``'s device.
        """
        check_tensor("assignment", assignment, ndim=1)
        if assignment.dtype != torch.long:
            raise TypeError(f"assignment must be a LongTensor (int64), got dtype {assignment.dtype}")
        check_expert_index("assignment", assignment, self.num_experts)
        return self._weights(assignment, check_dtype("dtype", dtype) or torch.get_default_dtype())

    def _weights(self, assignment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # [B] -> [B, K]: 1 at the assigned expert, epsilon elsewhere (a comparison rather than F.one_hot, whose
        # eager range check reads the data; the indices here are valid by construction).
        experts = torch.arange(self.num_experts, device=assignment.device)
        onehot = (assignment[:, None] == experts).to(dtype)
        return onehot + self.epsilon * (1.0 - onehot)

    def _output(
        self,
        logits: torch.Tensor,
        assignment: torch.Tensor,
        assignment_all: torch.Tensor,
        solved_scores: torch.Tensor,
    ) -> WeightingOutput:
        with torch.no_grad():
            k = self.num_experts
            weights = self._weights(assignment, logits.dtype)  # [B, K]
            # samples per expert (bincount's output size depends on the data; scatter_add's does not)
            load = torch.zeros(k, dtype=torch.long, device=assignment_all.device)
            load.scatter_add_(0, assignment_all, torch.ones_like(assignment_all))
            picked = solved_scores.gather(1, assignment_all[:, None])  # [G, 1]
            mean_score = picked.mean().to(logits.dtype)
        return WeightingOutput(weights=weights, assignment=assignment, load=load, mean_score=mean_score)

    def partition_dataset(
        self,
        scores: torch.Tensor | np.ndarray,
        capacities: int | Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Partition a whole dataset among the experts (the per-epoch variant of the WGM).

        ``scores`` are the delegator's selection logits for every sample of the dataset, computed by
        the caller (for example in one inference pass at the start of an epoch); the weighter's score
        transform is applied to them (with ``score="logits"`` they are used as given), then one balanced
        transportation problem is solved over all N samples. N x K scores must fit in memory
        (1,281,167 x 16 float32 is 82 MB). No collective is used, whatever ``scope`` is: in a
        multi-process run, gather the scores first (e.g. :func:`pycoe.distributed.all_gather_variable`)
        or compute them on every rank, then call this on every rank (the exact solver is deterministic).

        Args:
            scores: Tensor[N, K] or ndarray[N, K] of floats (N >= 1, finite).
            capacities: ``None`` (near-equal), an int, or a length-K sequence summing to N; passed to
                :func:`pycoe.routing.transport.balanced_assignment`.

        Returns:
            LongTensor[N]: the expert of each sample (on the device of a tensor input, CPU for ndarray).
        """
        if isinstance(scores, np.ndarray):
            if not np.issubdtype(scores.dtype, np.floating):
                raise TypeError(f"scores must be a floating-point array, got dtype {scores.dtype}")
            scores = torch.from_numpy(scores)
        elif not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores must be a torch.Tensor or numpy.ndarray, got {describe(scores)}")
        self._check_logits("scores", scores)
        if scores.shape[0] == 0:
            raise ValueError("scores must hold at least one sample, got shape (0, K)")
        return balanced_assignment(_transform(scores, self.score), capacities, self.method, **self.solver_options)
