"""The piecewise linear unit (PWLU) as a module, and the model-level realignment.

Zhou, Zhu and Zhong, *Learning Specialized Activation Functions with the Piecewise Linear Unit*,
ICCV 2021 (arXiv:2104.03693); granularity per layer or per channel as in the TPAMI 2023 extension.
The CoE paper (Zhang, Chen and Zhong, ICML 2022) combines CoE with PWLU for its 100M-FLOPs model.

The unit has two explicit phases:

1. **collecting** (the initial state): the module computes exactly its init function (ReLU by default)
   and, in training mode, tracks the running mean and variance of its input (:mod:`._pwlu_stats`);
2. **learning**, after :meth:`PWLU.realign`: the bounds become ``mean -/+ bound_std * std``, the knots
   re-sample the init function, the outer slopes take the init function's asymptotic slopes, and from
   then on the unit is the learned piecewise linear function :func:`pycoe.functional.pwlu`.

Converting an existing model's activations is in :mod:`pycoe.layers.pwlu_convert`. Which parts are the
paper's and which are pycoe's choices is listed in the user guide (``docs/guide/pwlu.rst``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pycoe._validation import (
    check_bool,
    check_choice,
    check_finite_float,
    check_int,
    check_module,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_tensor,
)
from pycoe.distributed import all_reduce, is_distributed
from pycoe.functional._pwlu import pwlu
from pycoe.layers._pwlu_inits import INIT_NAMES, get_init
from pycoe.layers._pwlu_stats import batch_moments, pool_over_ranks, realigned_bounds, update_running

__all__ = ["PWLU", "realign_pwlu"]


class PWLU(nn.Module):
    r"""Piecewise linear unit with learnable knots, bounds and outer slopes.

    .. math::

        \mathrm{PWLU}(x) = \begin{cases}
            (x - B_L)\,K_L + Y_P^0 & x < B_L \\
            (x - B_R)\,K_R + Y_P^N & x \ge B_R \\
            (x - B_{i})\,\frac{Y_P^{i+1} - Y_P^{i}}{d} + Y_P^{i} & B_i \le x < B_{i+1}
        \end{cases}
        \qquad d = \frac{B_R - B_L}{N},\; B_i = B_L + i\,d.

    The module starts in the **collecting** phase: its output is exactly ``init(x)`` and, in training
    mode only, it tracks the running mean and variance of its input (per channel for channel
    granularity): ``running = momentum * running + (1 - momentum) * batch``, the first batch
    initialising the statistics. :meth:`realign` then switches it to the **learning** phase (see there).
    The phase is part of the ``state_dict`` (as extra state), so a checkpoint restores it.

    Args:
        num_intervals: N, the number of uniform intervals between the bounds (N + 1 knots).
        init: the function the unit starts as: ``"relu"`` (default), ``"relu6"``, ``"leaky_relu"``
            (with ``negative_slope``), ``"identity"``, ``"silu"`` (alias ``"swish"``), ``"hardswish"``,
            ``"hardsigmoid"``, ``"gelu"``, ``"gelu_tanh"``, ``"tanh"`` or ``"sigmoid"``.
        granularity: ``"layer"`` (one function for every element) or ``"channel"`` (one per channel).
        num_channels: the number of channels; required for ``"channel"``, must be None for ``"layer"``.
        channel_dim: the channel dimension of the input (1 for NCHW images, -1 for (B, T, C)
            sequences); used for channel granularity (statistics and parameters per channel).
        bound_std: realignment half-width in standard deviations (the paper: 3).
        momentum: weight of the old statistics in the running averages (the paper: 0.9).
        left_bound: B_L before realignment (only used if you learn without realigning).
        right_bound: B_R before realignment.
        negative_slope: slope for ``init="leaky_relu"``; ignored otherwise.
        collect: start in the collecting phase (default). ``False`` starts directly in the learning
            phase with the init function sampled on ``[left_bound, right_bound]``.
        device: factory keyword for the parameters and buffers, passed to ``torch.empty``.
        dtype: factory keyword for the parameters and buffers (floating point), passed to ``torch.empty``.

    Attributes:
        points: Parameter Tensor[P, N + 1], the knot values :math:`Y_P` (P = 1 or num_channels).
        left_bound: Parameter Tensor[P], :math:`B_L`.
        right_bound: Parameter Tensor[P], :math:`B_R`.
        left_slope: Parameter Tensor[P], :math:`K_L`.
        right_slope: Parameter Tensor[P], :math:`K_R`.
        running_mean: buffer Tensor[P].
        running_var: buffer Tensor[P] (biased batch variance, averaged).
        num_batches_tracked: buffer, the number of batches seen while collecting in training mode.

    Shape:
        input Tensor[...] with ``num_channels`` along ``channel_dim`` for channel granularity; output of
        the same shape, dtype and memory layout. The unit is never in-place, and its output may be modified
        in place by what follows (``Dropout(inplace=True)``, ``relu_``, ``+=``).
    """

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_intervals: int = 16,
        init: str = "relu",
        granularity: str = "layer",
        num_channels: int | None = None,
        channel_dim: int = 1,
        bound_std: float = 3.0,
        momentum: float = 0.9,
        left_bound: float = -3.0,
        right_bound: float = 3.0,
        negative_slope: float = 0.01,
        collect: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.num_intervals = check_positive_int("num_intervals", num_intervals)
        self.init = check_choice("init", init, INIT_NAMES)
        self.granularity = check_choice("granularity", granularity, ("layer", "channel"))
        if granularity == "channel":
            if num_channels is None:
                raise ValueError("num_channels is required for granularity='channel' (got None)")
            self.num_channels: int | None = check_positive_int("num_channels", num_channels)
        else:
            if num_channels is not None:
                raise ValueError(
                    f"num_channels must be None for granularity='layer', got {num_channels!r} "
                    "(use granularity='channel' for one function per channel)"
                )
            self.num_channels = None
        self.channel_dim = check_int("channel_dim", channel_dim)
        self.bound_std = check_positive_float("bound_std", bound_std)
        self.momentum = check_probability("momentum", momentum)
        lb = check_finite_float("left_bound", left_bound)
        rb = check_finite_float("right_bound", right_bound)
        if not lb < rb:
            raise ValueError(f"left_bound must be smaller than right_bound, got {lb} and {rb}")
        self.initial_bounds = (lb, rb)
        self.negative_slope = check_finite_float("negative_slope", negative_slope)
        self.collect = check_bool("collect", collect)
        self._init_spec = get_init(self.init, self.negative_slope)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        rows = self.num_channels if self.num_channels is not None else 1
        self.points = nn.Parameter(torch.empty(rows, self.num_intervals + 1, **factory))
        self.left_bound = nn.Parameter(torch.empty(rows, **factory))
        self.right_bound = nn.Parameter(torch.empty(rows, **factory))
        self.left_slope = nn.Parameter(torch.empty(rows, **factory))
        self.right_slope = nn.Parameter(torch.empty(rows, **factory))
        self.register_buffer("running_mean", torch.zeros(rows, **factory))
        self.register_buffer("running_var", torch.ones(rows, **factory))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        self._collecting = self.collect
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------------
    # state

    @property
    def collecting(self) -> bool:
        """True in the collecting phase (acts as the init function), False once realigned."""
        return self._collecting

    @property
    def running_std(self) -> Tensor:
        """Tensor[P], the square root of :attr:`running_var`."""
        return self.running_var.sqrt()

    def reset_parameters(self) -> None:
        """Back to the state after construction: the init function sampled on the initial bounds,
        its asymptotic slopes, no statistics, and the collecting phase (unless ``collect=False``)."""
        lb, rb = self.initial_bounds
        with torch.no_grad():
            self.left_bound.fill_(lb)
            self.right_bound.fill_(rb)
            self._resample()
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()
        self._collecting = self.collect

    def reset_running_stats(self) -> None:
        """Forget the collected statistics (the phase is unchanged)."""
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def get_extra_state(self) -> dict[str, bool]:
        return {"collecting": self._collecting}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("collecting"), bool):
            raise ValueError(f"PWLU extra state must be a dict with a bool 'collecting', got {state!r}")
        self._collecting = state["collecting"]

    def _resample(self) -> None:
        """Knots <- init function at ``B_L + j d``; outer slopes <- its asymptotic slopes (no grad)."""
        n = self.num_intervals
        lb = self.left_bound.detach().double()
        rb = self.right_bound.detach().double()
        steps = torch.arange(n + 1, dtype=torch.float64, device=lb.device)
        knots = lb[:, None] + (rb - lb)[:, None] * steps / n  # [P, K]
        knots[:, -1] = rb
        self.points.copy_(self._init_spec.fn(knots))
        self.left_slope.fill_(self._init_spec.left_slope)
        self.right_slope.fill_(self._init_spec.right_slope)

    def init_function(self, x: Tensor) -> Tensor:
        """The init function (what the unit computes while collecting), applied to ``x``."""
        return self._init_spec.fn(x)

    # ------------------------------------------------------------------------------------------------
    # the two phases

    def realign(self) -> None:
        """End the collecting phase: set the bounds from the statistics and start learning.

        ``B_L, B_R = running_mean -/+ bound_std * running_std`` (per channel for channel granularity;
        the std is floored at ``1e-4 * (1 + |mean|)`` so that a constant input still gives a usable
        grid), the knots re-sample the init function on the new grid, the outer slopes become the init
        function's asymptotic slopes (ReLU: 0 and 1) and every parameter then learns. Calling it again
        re-does this from the (frozen) statistics, discarding what was learned.

        Raises:
            RuntimeError: no statistic was collected yet (no forward pass in training mode while
                collecting, or only batches holding NaN or infinite values, which are skipped), or the
                statistics are not finite (e.g. loaded from a corrupt checkpoint).
        """
        if int(self.num_batches_tracked) == 0:
            raise RuntimeError(
                "PWLU.realign() needs input statistics, but none were collected: run forward passes "
                "in training mode while the unit is collecting (PWLU.collecting is True) first "
                "(batches holding NaN or infinite values are skipped)"
            )
        if not bool(torch.isfinite(self.running_mean).all() & torch.isfinite(self.running_var).all()):
            raise RuntimeError(
                "PWLU.realign() needs finite statistics, but running_mean or running_var holds NaN or an "
                "infinite value; call reset_running_stats() and collect again"
            )
        lb, rb = realigned_bounds(self.running_mean, self.running_var, self.bound_std)
        with torch.no_grad():
            self.left_bound.copy_(lb)
            self.right_bound.copy_(rb)
            self._resample()
        self._collecting = False

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[...] -> Tensor[...] (same shape, dtype and layout)."""
        check_tensor("x", x, floating=True)
        if self.num_channels is not None:
            if not -x.dim() <= self.channel_dim < x.dim():
                raise ValueError(f"channel_dim={self.channel_dim} is out of range for input of shape {tuple(x.shape)}")
            if x.shape[self.channel_dim] != self.num_channels:
                raise ValueError(
                    f"PWLU expects {self.num_channels} channels along dim {self.channel_dim}, "
                    f"got input of shape {tuple(x.shape)}"
                )
        if self._collecting:
            if self.training and x.numel() > 0:
                mean, var = batch_moments(x, None if self.num_channels is None else self.channel_dim)
                update_running(self.running_mean, self.running_var, self.num_batches_tracked, mean, var, self.momentum)
            return self._init_spec.fn(x)
        return pwlu(
            x,
            self.points,
            self.left_bound,
            self.right_bound,
            self.left_slope,
            self.right_slope,
            channel_dim=self.channel_dim,
        )

    def extra_repr(self) -> str:
        parts = [f"num_intervals={self.num_intervals}", f"init={self.init!r}", f"granularity={self.granularity!r}"]
        if self.num_channels is not None:
            parts += [f"num_channels={self.num_channels}", f"channel_dim={self.channel_dim}"]
        parts.append(f"collecting={self._collecting}")
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------
# model-level helpers


def realign_pwlu(model: nn.Module, synchronize: bool = True) -> int:
    """Realign every PWLU of ``model`` that is still collecting (see :meth:`PWLU.realign`).

    All-or-nothing: if one of them has no statistics, nothing is changed and the error names it.

    Under ``torch.distributed`` (a process group initialised) with ``synchronize=True``, every rank realigns
    from the same pooled statistics, so that the ranks' parameters stay identical: each PWLU's running mean
    becomes the average of the ranks' means, and its running variance the variance of the pooled ranks
    (the average of ``var + mean**2`` minus the squared pooled mean), every rank weighted equally. Every
    rank must call this function (it is a collective).

    Args:
        model: the model whose PWLU modules to realign.
        synchronize: pool the statistics over the ranks of the default process group when one is initialised.

    Returns:
        The number of PWLU modules realigned (a module shared under several names counts once).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``synchronize`` is not a bool.
        RuntimeError: a collecting PWLU has seen no (finite) training batch yet (on any rank, when
            synchronising), or holds non-finite statistics.
    """
    check_module("model", model)
    check_bool("synchronize", synchronize)
    todo = [(name, m) for name, m in model.named_modules() if isinstance(m, PWLU) and m.collecting]
    sync = synchronize and is_distributed()
    # on the units' device: a NCCL process group reduces CUDA tensors only
    device = todo[0][1].num_batches_tracked.device if todo else torch.device("cpu")
    counts = torch.tensor([int(m.num_batches_tracked) for _, m in todo], dtype=torch.long, device=device)
    if sync and todo:
        all_reduce(counts, op="min")
    empty = [name or "<model>" for (name, _), c in zip(todo, counts.tolist()) if c == 0]
    if empty:
        raise RuntimeError(
            "cannot realign: these PWLU modules have collected no statistics yet (run forward passes in "
            f"training mode first{' on every rank' if sync else ''}; batches holding NaN or infinite values "
            f"are skipped): {', '.join(empty)}"
        )
    if sync:
        for _, m in todo:
            mean, var = pool_over_ranks(m.running_mean, m.running_var)
            with torch.no_grad():
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
    bad = [
        name or "<model>"
        for name, m in todo
        if not bool(torch.isfinite(m.running_mean).all() & torch.isfinite(m.running_var).all())
    ]
    if bad:
        raise RuntimeError(f"cannot realign: these PWLU modules hold non-finite statistics: {', '.join(bad)}")
    for _, m in todo:
        m.realign()
    return len(todo)
