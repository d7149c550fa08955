"""The piecewise linear unit (PWLU) as a module, and helpers to put it into existing models.

Zhou, Zhu and Zhong, *Learning Specialized Activation Functions with the Piecewise Linear Unit*,
ICCV 2021 (arXiv:2104.03693); granularity per layer or per channel as in the TPAMI 2023 extension.
The CoE paper (Zhang, Chen and Zhong, ICML 2022) combines CoE with PWLU for its 100M-FLOPs model.

The unit has two explicit phases:

1. **collecting** (the initial state): the module computes exactly its init function (ReLU by default)
   and, in training mode, tracks the running mean and variance of its input;
2. **learning**, after :meth:`PWLU.realign`: the bounds become ``mean -/+ bound_std * std``, the knots
   re-sample the init function, the outer slopes take the init function's asymptotic slopes, and from
   then on the unit is the learned piecewise linear function :func:`pycoe.functional.pwlu`.

Which parts are the paper's and which are pycoe's choices is listed in the user guide (``docs/guide/pwlu.rst``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pycoe._modules import replace_modules
from pycoe._validation import (
    check_choice,
    check_finite_float,
    check_int,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_tensor,
)
from pycoe.distributed import is_distributed
from pycoe.functional.pwlu import pwlu
from pycoe.utils import eval_mode

__all__ = ["PWLU", "realign_pwlu", "convert_activations_to_pwlu", "DEFAULT_PWLU_ACTIVATIONS"]


@dataclass(frozen=True)
class _InitFunction:
    """An init function with the outer slopes used at realignment (its slopes at -inf and +inf)."""

    fn: Callable[[Tensor], Tensor]
    left_slope: float
    right_slope: float


def _identity(x: Tensor) -> Tensor:
    return x


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_INITS: dict[str, _InitFunction] = {
    "relu": _InitFunction(F.relu, 0.0, 1.0),
    "relu6": _InitFunction(F.relu6, 0.0, 0.0),
    "identity": _InitFunction(_identity, 1.0, 1.0),
    "silu": _InitFunction(F.silu, 0.0, 1.0),
    "swish": _InitFunction(F.silu, 0.0, 1.0),
    "hardswish": _InitFunction(F.hardswish, 0.0, 1.0),
    "hardsigmoid": _InitFunction(F.hardsigmoid, 0.0, 0.0),
    "gelu": _InitFunction(F.gelu, 0.0, 1.0),
    "gelu_tanh": _InitFunction(_gelu_tanh, 0.0, 1.0),
    "tanh": _InitFunction(torch.tanh, 0.0, 0.0),
    "sigmoid": _InitFunction(torch.sigmoid, 0.0, 0.0),
    # "leaky_relu" depends on negative_slope: built in _init_function().
}
INIT_NAMES: tuple[str, ...] = tuple(sorted([*_INITS, "leaky_relu"]))


class _LeakyReLU:
    """Picklable leaky ReLU with a fixed negative slope."""

    def __init__(self, negative_slope: float):
        self.negative_slope = negative_slope

    def __call__(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.negative_slope)


def _init_function(init: str, negative_slope: float) -> _InitFunction:
    if init == "leaky_relu":
        return _InitFunction(_LeakyReLU(negative_slope), negative_slope, 1.0)
    return _INITS[init]


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
        device: factory keyword for the parameters and buffers.
        dtype: factory keyword for the parameters and buffers (floating point).

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
        the same shape, dtype and memory layout. The unit is never in-place.
    """

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
        if not isinstance(collect, bool):
            raise TypeError(f"collect must be a bool, got {type(collect).__name__}")
        self.collect = collect
        self._init_spec = _init_function(self.init, self.negative_slope)

        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        rows = self.num_channels if self.num_channels is not None else 1
        self.points = nn.Parameter(torch.empty(rows, self.num_intervals + 1, **factory))
        self.left_bound = nn.Parameter(torch.empty(rows, **factory))
        self.right_bound = nn.Parameter(torch.empty(rows, **factory))
        self.left_slope = nn.Parameter(torch.empty(rows, **factory))
        self.right_slope = nn.Parameter(torch.empty(rows, **factory))
        self.register_buffer("running_mean", torch.zeros(rows, **factory))
        self.register_buffer("running_var", torch.ones(rows, **factory))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        self._collecting = collect
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
                collecting).
        """
        if int(self.num_batches_tracked) == 0:
            raise RuntimeError(
                "PWLU.realign() needs input statistics, but none were collected: run forward passes "
                "in training mode while the unit is collecting (PWLU.collecting is True) first"
            )
        with torch.no_grad():
            mean = self.running_mean.double()
            std = self.running_var.double().clamp_min(0).sqrt()
            std = torch.maximum(std, 1e-4 * (1 + mean.abs()))
            self.left_bound.copy_(mean - self.bound_std * std)
            self.right_bound.copy_(mean + self.bound_std * std)
            self._resample()
        self._collecting = False

    @torch.no_grad()
    def _track(self, x: Tensor) -> None:
        x = x.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        if self.num_channels is None:
            var, mean = torch.var_mean(x.reshape(-1), correction=0)
            var, mean = var.reshape(1), mean.reshape(1)
        else:
            cd = self.channel_dim % x.dim()
            dims = [d for d in range(x.dim()) if d != cd]
            if dims:
                var, mean = torch.var_mean(x, dim=dims, correction=0)
            else:
                mean, var = x, torch.zeros_like(x)
        first = self.num_batches_tracked == 0
        m = self.momentum
        mean = mean.to(self.running_mean.dtype)
        var = var.to(self.running_var.dtype)
        self.running_mean.copy_(torch.where(first, mean, m * self.running_mean + (1 - m) * mean))
        self.running_var.copy_(torch.where(first, var, m * self.running_var + (1 - m) * var))
        self.num_batches_tracked.add_(1)

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
                self._track(x)
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
        TypeError: ``model`` is not an ``nn.Module``.
        RuntimeError: a collecting PWLU has seen no training batch yet (on any rank, when synchronising).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    todo = [(name, m) for name, m in model.named_modules() if isinstance(m, PWLU) and m.collecting]
    sync = bool(synchronize) and is_distributed()
    counts = torch.tensor([int(m.num_batches_tracked) for _, m in todo], dtype=torch.long)
    if sync and len(todo):
        dist.all_reduce(counts, op=dist.ReduceOp.MIN)
    empty = [name or "<model>" for (name, _), c in zip(todo, counts.tolist()) if c == 0]
    if empty:
        raise RuntimeError(
            "cannot realign: these PWLU modules have collected no statistics yet (run forward passes in "
            f"training mode first{' on every rank' if sync else ''}): {', '.join(empty)}"
        )
    if sync:
        world = dist.get_world_size()
        with torch.no_grad():
            for _, m in todo:
                mean = m.running_mean.double()
                packed = torch.stack([mean, m.running_var.double() + mean * mean])
                dist.all_reduce(packed)
                packed /= world
                pooled_mean = packed[0]
                pooled_var = (packed[1] - pooled_mean * pooled_mean).clamp_min(0)
                m.running_mean.copy_(pooled_mean.to(m.running_mean.dtype))
                m.running_var.copy_(pooled_var.to(m.running_var.dtype))
    for _, m in todo:
        m.realign()
    return len(todo)


DEFAULT_PWLU_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.Hardswish,
    nn.GELU,
)
"""Activation types that :func:`convert_activations_to_pwlu` replaces by default (the feature
activations; gates such as ``nn.Hardsigmoid``/``nn.Sigmoid`` are left alone unless asked for)."""


def _init_of(module: nn.Module) -> tuple[str, float]:
    """The PWLU ``init`` (and negative slope) that reproduces an activation module exactly."""
    if isinstance(module, nn.ReLU6):
        return "relu6", 0.01
    if isinstance(module, nn.ReLU):
        return "relu", 0.01
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, nn.SiLU):
        return "silu", 0.01
    if isinstance(module, nn.Hardswish):
        return "hardswish", 0.01
    if isinstance(module, nn.Hardsigmoid):
        return "hardsigmoid", 0.01
    if isinstance(module, nn.GELU):
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.01
    if isinstance(module, nn.Tanh):
        return "tanh", 0.01
    if isinstance(module, nn.Sigmoid):
        return "sigmoid", 0.01
    if isinstance(module, nn.Identity):
        return "identity", 0.01
    raise TypeError(f"no PWLU init reproduces {type(module).__name__}")


_CONVERTIBLE = (
    nn.ReLU6,
    nn.ReLU,
    nn.LeakyReLU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
)


def convert_activations_to_pwlu(
    model: nn.Module,
    activations: Sequence[type[nn.Module]] = DEFAULT_PWLU_ACTIVATIONS,
    granularity: str = "layer",
    num_intervals: int = 16,
    channel_dim: int = 1,
    example_inputs: Tensor | Sequence[Any] | None = None,
    predicate: Callable[[str, nn.Module], bool] | None = None,
    bound_std: float = 3.0,
    momentum: float = 0.9,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Replace, in place, the activation modules of ``model`` by collecting PWLUs that reproduce them.

    Each new PWLU's init function is the replaced activation (``nn.LeakyReLU`` keeps its negative
    slope, ``nn.GELU`` its approximation), so the model's outputs are unchanged right after the
    conversion; it then collects statistics in training mode until :func:`realign_pwlu`. Every module
    instance of the listed types is converted, wherever it sits (e.g. the ReLU inside torchvision's
    ``SqueezeExcitation`` too; its ``nn.Hardsigmoid`` gate is not in the default list). Pass
    ``predicate`` to skip some.

    Limits of module surgery: activations applied functionally in ``forward`` (``F.relu(x)``) are not
    seen; a module called at several places (torchvision's ResNet blocks call one ``self.relu`` twice)
    becomes one PWLU shared by those places; ``inplace=True`` is dropped (PWLU is never in-place), which
    only matters for code that ignores an activation's return value. The new modules take the
    training/eval mode of the modules they replace.

    Args:
        model: the model to edit in place.
        activations: the activation types to replace (each must be one that a PWLU init reproduces:
            ReLU, ReLU6, LeakyReLU, SiLU, Hardswish, Hardsigmoid, GELU, Tanh, Sigmoid, Identity).
        granularity: ``"layer"`` or ``"channel"``.
        num_intervals: N for every new PWLU.
        channel_dim: the channel dimension of the activations' inputs (1 for CNNs, -1 for
            transformers).
        example_inputs: required for ``"channel"``: one input (or a tuple of positional inputs) for a dry
            run in eval mode under ``torch.no_grad()`` that records each activation's channel count.
        predicate: optional ``(qualified_name, module) -> bool``; only modules for which it holds are
            converted.
        bound_std: passed to every PWLU.
        momentum: passed to every PWLU.
        device: of the new parameters; default: that of the model's first parameter (CPU if none).
        dtype: of the new parameters; default: that of the model's first floating parameter (float32 if
            none).

    Returns:
        The qualified names of the replaced modules.

    Raises:
        TypeError: a bad ``model`` or ``activations`` entry.
        ValueError: channel granularity without ``example_inputs``, or an activation that the dry run did
            not reach or reached with different channel counts.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(activations, type):
        activations = (activations,)
    activations = tuple(activations)
    if not activations:
        raise ValueError("activations must name at least one activation type")
    for a in activations:
        if not (isinstance(a, type) and issubclass(a, _CONVERTIBLE)):
            raise TypeError(
                "activations must be activation module types among "
                f"{', '.join(c.__name__ for c in _CONVERTIBLE)}, got {a!r}"
            )
    check_choice("granularity", granularity, ("layer", "channel"))
    check_positive_int("num_intervals", num_intervals)
    if predicate is not None and not callable(predicate):
        raise TypeError(f"predicate must be callable or None, got {type(predicate).__name__}")

    def selected(name: str, module: nn.Module) -> bool:
        return isinstance(module, activations) and (predicate is None or bool(predicate(name, module)))

    if device is None or dtype is None:
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        if device is None:
            device = first.device if first is not None else None
        if dtype is None:
            dtype = first.dtype if first is not None else None

    channels: dict[int, int] = {}
    if granularity == "channel":
        if example_inputs is None:
            raise ValueError(
                "granularity='channel' needs example_inputs: a dry run records every activation's channel "
                "count (or use granularity='layer')"
            )
        channels = _record_channels(model, selected, example_inputs, channel_dim)

    def factory(name: str, module: nn.Module) -> nn.Module:
        init, negative_slope = _init_of(module)
        num_channels = None
        if granularity == "channel":
            if id(module) not in channels:
                raise ValueError(f"the dry run with example_inputs did not reach activation {name!r}")
            num_channels = channels[id(module)]
        new = PWLU(
            num_intervals=num_intervals,
            init=init,
            granularity=granularity,
            num_channels=num_channels,
            channel_dim=channel_dim,
            bound_std=bound_std,
            momentum=momentum,
            negative_slope=negative_slope,
            device=device,
            dtype=dtype,
        )
        new.train(module.training)
        return new

    return replace_modules(model, selected, factory)


def _record_channels(
    model: nn.Module,
    selected: Callable[[str, nn.Module], bool],
    example_inputs: Tensor | Sequence[Any],
    channel_dim: int,
) -> dict[int, int]:
    """Run ``model`` once (eval, no grad) and return ``{id(activation): channel count}``."""
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False) if n and selected(n, m)}
    seen: dict[int, int] = {}
    conflicts: dict[int, set[int]] = {}

    def hook(module: nn.Module, args: tuple, _out: Any) -> None:
        if not args or not isinstance(args[0], Tensor):
            return
        x = args[0]
        if not -x.dim() <= channel_dim < x.dim():
            raise ValueError(
                f"channel_dim={channel_dim} is out of range for the input of {names[id(module)]!r} "
                f"(shape {tuple(x.shape)})"
            )
        c = int(x.shape[channel_dim])
        if seen.setdefault(id(module), c) != c:
            conflicts.setdefault(id(module), {seen[id(module)]}).add(c)

    handles = []
    modules = {id(m): m for n, m in model.named_modules(remove_duplicate=False) if id(m) in names}
    for m in modules.values():
        handles.append(m.register_forward_hook(hook))
    try:
        with eval_mode(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    if conflicts:
        desc = "; ".join(f"{names[i]!r}: {sorted(cs)}" for i, cs in conflicts.items())
        raise ValueError(
            "granularity='channel' needs one channel count per activation module, but these are called "
            f"with several (shared modules): {desc}. Use granularity='layer' or exclude them with predicate"
        )
    return seen
