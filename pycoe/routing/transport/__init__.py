r"""Balanced transportation: assign N samples to K experts with fixed capacities, maximising the score.

This is the optimisation problem behind the weight generation module (WGM) of Collaboration of Experts
(Zhang, Chen and Zhong, *Collaboration of Experts: Achieving 80% Top-1 Accuracy on ImageNet with 100M
FLOPs*, ICML 2022, arXiv:2107.03815), whose abstract states that the training data is partitioned "by
solving a balanced transportation problem". The paper's solver and score matrix are not public; the
formulation below (scores ``s[i, k]``, higher is better, expert ``k`` receives exactly ``c[k]`` samples) is
pycoe's formulation.

Einstein legend: ``N`` samples, ``K`` experts; ``s`` scores ``[N, K]``; ``c`` capacities ``[K]``;
``p`` expert prices (dual variables) ``[K]``; ``a`` assignment ``[N]``.

Problem (primal LP; its constraint matrix is the incidence matrix of a bipartite graph, hence totally
unimodular, so an optimal vertex is integral, i.e. a hard assignment)::

    maximise   sum_ik x_ik s_ik
    subject to sum_k x_ik = 1 (every sample),  sum_i x_ik = c_k (every expert),  x >= 0.

Dual::

    minimise   g(p) = sum_i max_k (s_ik - p_k) + sum_k c_k p_k       (u_i = max_k (s_ik - p_k)).

Optimality certificate (complementary slackness): an assignment ``a`` that meets the capacities exactly
and prices ``p`` with ``s[i, a_i] - p[a_i] = max_k (s[i, k] - p[k])`` for every ``i`` are optimal for
the primal and the dual, because then the primal objective equals ``g(p)``.

The package: this module holds the public API and the input normalisation;
:mod:`~pycoe.routing.transport.exact` the exact method (dual warm start, assignment route, certificate),
:mod:`~pycoe.routing.transport.repair` its repair (exchange graph, successive shortest paths),
:mod:`~pycoe.routing.transport.approximate` the approximate methods (Sinkhorn, greedy),
:mod:`~pycoe.routing.transport.transfer` the copies between a device and the host, and
:mod:`~pycoe.routing.transport.common` the names they share.

:func:`balanced_assignment` on a tensor runs as the custom operator ``torch.ops.pycoe.balanced_assignment``,
one opaque node under ``torch.compile`` and ``torch.export`` (its fake implementation only allocates the
LongTensor[N] result); the operator runs the eager solver, which also returns the objective and the prices that
certify it (internal: ``_solve_balanced_transport``, checked by the tests).

**Devices.** The operator has one implementation for every device (scores on a GPU are accepted as they are) and
a fake one for tracing and the ``meta`` device; results come back on the scores' device. The exact method runs
on the host: scores on a GPU are copied there once per solve (its one synchronisation with the device), and the
assignment is copied back. ``"sinkhorn"`` and ``"greedy"`` run in torch on the scores' device but read a few
values on the host per round (convergence checks, capacity counts), so each synchronises several times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pycoe._validation import check_choice, check_nonnegative_int, check_number, check_positive_int, describe
from pycoe.routing.transport.approximate import solve_approximate
from pycoe.routing.transport.common import METHOD_OPTIONS, METHODS, TransportInfeasibleError, TransportResult
from pycoe.routing.transport.exact import solve_exact
from pycoe.routing.transport.transfer import to_device, to_host

# The public names. Internal, for the rest of pycoe.routing: METHODS, METHOD_OPTIONS, check_solver_options and
# the full solution with its certificate (_solve_balanced_transport, TransportResult).
__all__ = ["balanced_assignment", "near_equal_capacities", "TransportInfeasibleError"]


# --------------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------------


def near_equal_capacities(n: int, k: int) -> torch.Tensor:
    """Near-equal capacities: ``n // k`` each, the remainder one by one to the first ``n % k`` experts.

    Args:
        n: number of samples (>= 0).
        k: number of experts (>= 1).

    Returns:
        LongTensor[K] summing to ``n``.

    Example:
        >>> near_equal_capacities(10, 4).tolist()
        [3, 3, 2, 2]
    """
    n = check_nonnegative_int("n", n)
    k = check_positive_int("k", k)
    caps = torch.full((k,), n // k, dtype=torch.long)
    caps[: n % k] += 1
    return caps


def check_solver_options(
    method: str, options: Mapping[str, Any] | None, *, name: str = "solver_options"
) -> dict[str, Any]:
    """Validate the keyword options for ``method`` and return them as a dict (to pass on with ``**``).

    Every option must be one that ``method`` uses (:data:`METHOD_OPTIONS`: ``entropic_reg`` and ``max_iter``
    for ``"sinkhorn"``, none for ``"exact"`` and ``"greedy"``): an option the method would ignore raises.

    Args:
        method: one of :data:`METHODS`.
        options: a mapping of option names to values, or ``None`` (no options).
        name: the argument's name in error messages.

    Returns:
        dict of the validated options (values converted to ``float`` / ``int``).

    Raises:
        TypeError: ``options`` is not a mapping, a key is not a string, or a value has the wrong type.
        ValueError: unknown option, an option ``method`` does not use, or a value out of range.
    """
    method = check_choice("method", method, METHODS)
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"{name} must be a mapping of option names to values, or None, got {describe(options)}")
    out: dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be option names (str), got {key!r}")
        out[key] = _check_option(method, key, value, prefix=f"{name}: ")
    return out


def _check_option(method: str, key: str, value: Any, prefix: str = "") -> float | int:
    """Check one solver option's name against ``method`` and its value; return the value as float / int."""
    known = sorted({o for opts in METHOD_OPTIONS.values() for o in opts})
    if key not in known:
        raise ValueError(f"{prefix}unknown solver option {key!r}; the options are {', '.join(map(repr, known))}")
    if key not in METHOD_OPTIONS[method]:
        users = [m for m, opts in METHOD_OPTIONS.items() if key in opts]
        raise ValueError(
            f"{prefix}{key} is used only by method={' or '.join(map(repr, users))}, not by method={method!r} "
            "(which would ignore it); leave it out"
        )
    if key == "entropic_reg":
        return check_number(prefix + key, value, minimum=0, strict=True)
    return check_positive_int(prefix + key, value)  # max_iter


def _method_options(method: str, entropic_reg: Any, max_iter: Any) -> dict[str, Any]:
    """Validate the keyword options of the solver functions (``None`` means not given)."""
    given = {"entropic_reg": entropic_reg, "max_iter": max_iter}
    if torch.compiler.is_compiling():
        # While tracing, a float option may be symbolic, which the number checks cannot inspect; the operator's
        # eager implementation checks the options when the compiled code runs, with the same errors.
        return {key: value for key, value in given.items() if value is not None}
    return {key: _check_option(method, key, value) for key, value in given.items() if value is not None}


def _check_scores(scores: Any) -> torch.Tensor:
    """Check the type, rank and size of ``scores`` and return it as a tensor (CPU numpy shares memory).

    Needs no data, so it also runs under ``torch.compile``; the values are checked by :func:`_check_values`.
    """
    if isinstance(scores, np.ndarray):
        if scores.dtype == np.bool_ or not (
            np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)
        ):
            raise TypeError(f"scores must hold real numbers, got a numpy array of dtype {scores.dtype}")
        if scores.ndim != 2:
            raise ValueError(f"scores must have 2 dimensions [N, K], got shape {tuple(scores.shape)}")
        if scores.dtype.byteorder not in ("=", "|") or scores.dtype == np.float16:
            scores = scores.astype(np.float64)
        t = torch.from_numpy(scores)
    elif isinstance(scores, torch.Tensor):
        t = scores.detach()
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"scores must hold real numbers, got a tensor of dtype {t.dtype}")
    else:
        raise TypeError(f"scores must be a torch.Tensor or a numpy.ndarray of shape [N, K], got {describe(scores)}")
    if t.dim() != 2:
        raise ValueError(f"scores must have 2 dimensions [N, K], got shape {tuple(t.shape)}")
    n, k = t.shape
    if n == 0:
        raise ValueError(f"scores must have at least one sample (N >= 1), got shape {tuple(t.shape)}")
    if k == 0:
        raise ValueError(f"scores must have at least one expert (K >= 1), got shape {tuple(t.shape)}")
    return t


def _check_values(t: torch.Tensor) -> None:
    """Raise on NaN / +inf scores (``-inf`` is allowed: a forbidden pair)."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return
    if bool(torch.isnan(t).any()):
        raise ValueError("scores must not contain NaN")
    if bool(torch.isposinf(t).any()):
        raise ValueError("scores must not contain +inf (only -inf is allowed, meaning a forbidden pair)")


def _check_capacities(capacities: Any, n: int, k: int) -> np.ndarray:
    """Return the capacities as int64[K] summing to ``n``, or raise."""
    if capacities is None:
        return near_equal_capacities(n, k).numpy()
    if isinstance(capacities, bool):
        raise TypeError("capacities must be None, an int or a length-K sequence of ints, got a bool")
    if isinstance(capacities, (int, np.integer)):
        c = int(capacities)
        if c < 0:
            raise ValueError(f"capacities must be non-negative, got {c}")
        if c * k != n:
            raise ValueError(
                f"capacities={c} for each of K={k} experts gives {c * k} slots, but there are N={n} samples "
                "(an int capacity needs capacities * K == N; pass a sequence or None for near-equal)"
            )
        return np.full(k, c, dtype=np.int64)
    if isinstance(capacities, torch.Tensor):
        _check_capacity_dtype(capacities)
        arr = capacities.detach().cpu().numpy()
    elif isinstance(capacities, np.ndarray):
        if not np.issubdtype(capacities.dtype, np.integer):
            raise TypeError(f"capacities must hold integers, got a numpy array of dtype {capacities.dtype}")
        arr = capacities
    elif isinstance(capacities, Sequence) and not isinstance(capacities, (str, bytes)):
        for v in capacities:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"capacities must hold integers, got {describe(v)}")
        arr = np.asarray([int(v) for v in capacities], dtype=np.int64)
    else:
        raise TypeError(f"capacities must be None, an int or a length-K sequence of ints, got {describe(capacities)}")
    arr = np.asarray(arr, dtype=np.int64).reshape(-1) if np.ndim(arr) == 1 else np.asarray(arr)
    if arr.ndim != 1 or arr.shape[0] != k:
        raise ValueError(f"capacities must have length K={k}, got shape {tuple(arr.shape)}")
    if (arr < 0).any():
        raise ValueError(f"capacities must be non-negative, got {arr.tolist()}")
    if int(arr.sum()) != n:
        raise ValueError(f"capacities must sum to N={n}, got sum {int(arr.sum())}")
    return arr.astype(np.int64, copy=True)


def _check_capacity_dtype(capacities: torch.Tensor) -> None:
    if capacities.is_floating_point() or capacities.is_complex() or capacities.dtype == torch.bool:
        raise TypeError(f"capacities must hold integers, got a tensor of dtype {capacities.dtype}")


# --------------------------------------------------------------------------------------------------
# The solver and its public form
# --------------------------------------------------------------------------------------------------


def _solve_balanced_transport(
    scores: Any,
    capacities: Any = None,
    method: str = "exact",
    *,
    entropic_reg: float | None = None,
    max_iter: int | None = None,
) -> TransportResult:
    r"""The solution of :func:`balanced_assignment` with its objective and its certificate (dual prices).

    Internal: the eager solver behind the operator of :func:`balanced_assignment` (the public name, with the same
    arguments, checks and errors), also used by the tests and benchmarks, which check the certificate and the
    objective.

    Returns:
        TransportResult: assignment LongTensor[N] (on the scores' device for a tensor input, CPU
        otherwise), objective, capacities LongTensor[K], prices Tensor[K] or None, method.
    """
    check_choice("method", method, METHODS)
    options = _method_options(method, entropic_reg, max_iter)
    t = _check_scores(scores)
    N, K = t.shape
    caps = _check_capacities(capacities, N, K)
    device = t.device
    prices: torch.Tensor | None
    if method == "exact":
        # The scores go to the host once (the solve's one synchronisation with a device); the value checks and
        # the solve read that copy, and the results go back to the scores' device.
        host = to_host(t)
        _check_values(host)
        a_np, p_np, obj = solve_exact(host, caps)
        assignment = to_device(torch.from_numpy(a_np), device)
        prices = to_device(torch.from_numpy(p_np), device)
    else:
        _check_values(t)
        X = t if t.dtype in (torch.float32, torch.float64) else t.float()
        assignment, prices = solve_approximate(X, to_device(torch.from_numpy(caps), device), method, **options)
        chosen = torch.gather(X, 1, assignment[:, None])
        if bool(torch.isneginf(chosen).any()):
            # Infeasible only if the LP is: decide that exactly (raises TransportInfeasibleError if so).
            solve_exact(torch.where(torch.isneginf(X), -math.inf, 0.0), caps)
            raise RuntimeError(
                f"method={method!r} rounded onto a forbidden (-inf) pair although an assignment avoiding every "
                "forbidden pair exists; method='exact' finds the best one"
            )
        obj = float(chosen.double().sum()) if device.type != "mps" else float(chosen.sum())
    return TransportResult(
        assignment=assignment,
        objective=obj,
        capacities=to_device(torch.from_numpy(caps), device),
        prices=prices,
        method=method,
    )


def balanced_assignment(
    scores: Any,
    capacities: Any = None,
    method: str = "exact",
    *,
    entropic_reg: float | None = None,
    max_iter: int | None = None,
) -> torch.Tensor:
    r"""Each sample's expert under exact capacities, maximising the total score.

    Maximises the total score :math:`\sum_i s_{i, a_i}` (higher is better); see the module docstring and the user
    guide (*Balanced transport*) for the formulation and the algorithms. Computed by the custom operator
    ``torch.ops.pycoe.balanced_assignment``: under ``torch.compile`` (``fullgraph=True`` included) and
    ``torch.export`` the solve is one opaque node. There, pass ``capacities`` as ``None`` or a tensor (a tensor's
    values are checked when the operator runs).

    Args:
        scores: Tensor[N, K] or ndarray[N, K] of real scores, higher is better. ``-inf`` marks a forbidden
            pair (infeasibility raises :class:`TransportInfeasibleError`); NaN and ``+inf`` raise.
        capacities: ``None`` for :func:`near_equal_capacities` (``N // K`` each, the remainder one by one
            to the first ``N % K`` experts); an int ``c`` (every expert ``c``, needs ``c * K == N``); or a
            length-K sequence / array / tensor of non-negative ints summing to ``N``.
        method: ``"exact"`` (default; provably optimal, NumPy float64 on the CPU), ``"sinkhorn"``
            (entropic regularisation + greedy rounding in torch on the scores' device; approximate) or
            ``"greedy"`` (greedy capacity fill by score; approximate).
        entropic_reg: ``"sinkhorn"`` only: entropic regularisation strength in score units, a finite
            number > 0 (default ``0.05 * std(scores)``).
        max_iter: ``"sinkhorn"`` only: maximum number of Sinkhorn iterations, an int >= 1 (default 200).

    Returns:
        LongTensor[N]: expert index per sample, on the scores' device (CPU for a numpy input).

    Raises:
        TypeError: scores, capacities or an option of a wrong type.
        ValueError: bad shape, NaN/+inf scores, bad capacities or method, an option out of range or one
            that ``method`` does not use (e.g. ``entropic_reg`` with ``method="exact"``).
        TransportInfeasibleError: (a ValueError) the forbidden pairs make the capacities unreachable.
        RuntimeError: ``"greedy"`` or ``"sinkhorn"`` rounded onto a forbidden pair although a feasible
            assignment exists (``"exact"`` finds one).

    Example:
        >>> import torch
        >>> s = torch.tensor([[3.0, 1.0], [2.0, 0.0], [0.0, 5.0], [1.0, 0.5]])
        >>> balanced_assignment(s).tolist()
        [0, 0, 1, 1]
    """
    check_choice("method", method, METHODS)
    options = _method_options(method, entropic_reg, max_iter)
    t = _check_scores(scores)
    n, k = t.shape
    caps: torch.Tensor | None
    if capacities is None:
        caps = None
    elif isinstance(capacities, torch.Tensor):
        _check_capacity_dtype(capacities)
        caps = capacities.detach()  # its values are checked where the operator runs
    else:
        caps = torch.from_numpy(_check_capacities(capacities, n, k))
    return _balanced_assignment_op(t, caps, method, options.get("entropic_reg"), options.get("max_iter"))


@torch.library.custom_op("pycoe::balanced_assignment", mutates_args=())
def _balanced_assignment_op(
    scores: torch.Tensor,
    capacities: torch.Tensor | None,
    method: str,
    entropic_reg: float | None,
    max_iter: int | None,
) -> torch.Tensor:
    # The operator's real implementation: the eager solver, on concrete tensors (validates the values too).
    result = _solve_balanced_transport(scores, capacities, method, entropic_reg=entropic_reg, max_iter=max_iter)
    return result.assignment


@_balanced_assignment_op.register_fake
def _balanced_assignment_fake(
    scores: torch.Tensor,
    capacities: torch.Tensor | None,
    method: str,
    entropic_reg: float | None,
    max_iter: int | None,
) -> torch.Tensor:
    # Under tracing only the result's shape, dtype and device are needed: LongTensor[N] on the scores' device.
    return scores.new_empty((scores.shape[0],), dtype=torch.long)
