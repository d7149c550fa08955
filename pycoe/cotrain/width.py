"""Dividing a network built by a width factory: the width at which one model has 1/S of the parameters.

Zhao, Zhou, Wang, Cai, Lam, Xu, *Towards Better Accuracy-efficiency Trade-offs: Divide and Co-training*,
IEEE TIP 2022 (arXiv 2011.14660). The paper divides a wide network M into S small networks M_1..M_S whose
parameter counts add up to about M's; the authors' code does so with hand-written width tables per
architecture. For models built from a width argument (torchvision's ``mobilenet_v2(width_mult=w)``, wide
ResNets' ``width_per_group``, your own), :func:`search_width` finds that width generically, by bisection on
the parameter count (counted on the ``meta`` device), and :func:`divide_by_factory` builds the S models.
For an instantiated model, see :func:`~pycoe.cotrain.divide_module`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._validation import check_bool, check_callable, check_module, check_number, check_positive_int, describe
from ._bisection import bisect_width, closest_width

__all__ = ["WidthSearch", "count_parameters", "search_width", "divide_by_factory"]


def count_parameters(model: nn.Module) -> int:
    """Number of (distinct) parameter elements of ``model``; works for models on the ``meta`` device."""
    return sum(p.numel() for p in check_module("model", model).parameters())


@dataclass
class WidthSearch:
    """The result of :func:`search_width`.

    Attributes:
        width: the width chosen for each of the S divided models.
        params: the parameter count of one model at ``width``.
        target: ``reference_params / S``.
        reference_params: the parameter count at ``base_width``.
        evaluations: how many widths were evaluated.
    """

    width: Any
    params: int
    target: float
    reference_params: int
    evaluations: int

    @property
    def ratio(self) -> float:
        """``params / target`` (1.0 is an exact match)."""
        return self.params / self.target


def _returned_module(model: Any, width: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory must return an nn.Module, got {describe(model)} for width {width!r}")
    return model


def _build(factory: Callable[[Any], nn.Module], width: Any) -> nn.Module:
    return _returned_module(factory(width), width)


def _count_factory(factory: Callable[[Any], nn.Module], width: Any) -> int:
    try:
        with torch.device("meta"):
            model = factory(width)
    except Exception:  # some factories cannot build on the meta device: build for real
        model = factory(width)
    return count_parameters(_returned_module(model, width))


def _check_search(
    factory: Any, num_splits: Any, base_width: Any, integer: Any, candidates: Any, rel_tol: Any, max_iter: Any
) -> tuple[int, float, list[Any] | None]:
    check_callable("factory", factory, expected="width -> nn.Module")
    s = check_positive_int("num_splits", num_splits)
    base = check_number("base_width", base_width, minimum=0, strict=True)
    check_bool("integer", integer)
    if integer and int(base) != base:
        raise ValueError(f"base_width must be an integer when integer=True, got {base_width!r}")
    check_number("rel_tol", rel_tol, minimum=0, strict=True)
    check_positive_int("max_iter", max_iter)
    if candidates is None:
        return s, base, None
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Iterable):
        raise TypeError(f"candidates must be an iterable of widths or None, got {describe(candidates)}")
    widths = list(candidates)
    if not widths:
        raise ValueError("candidates must not be empty")
    return s, base, widths


def search_width(
    factory: Callable[[Any], nn.Module],
    num_splits: int,
    base_width: float = 1.0,
    *,
    integer: bool = False,
    candidates: Iterable[Any] | None = None,
    rel_tol: float = 0.005,
    max_iter: int = 40,
) -> WidthSearch:
    """Find the width at which ``factory(width)`` has about ``1/S`` of the parameters of ``factory(base_width)``.

    The parameter count is assumed non-decreasing in the width. Models are built on the ``meta`` device
    for counting (no memory, no initialisation cost), falling back to the CPU if the factory fails there.

    Args:
        factory: ``width -> nn.Module``.
        num_splits: S >= 1.
        base_width: the width of the undivided model (a finite number > 0).
        integer: search integer widths in ``[1, base_width]`` (e.g. ``width_per_group``).
        candidates: if given, choose among these widths only (the one whose count is closest to the target).
        rel_tol: continuous search: stop when the count is within this relative distance of the target (> 0).
        max_iter: continuous search: at most this many bisection steps.

    Returns:
        A :class:`WidthSearch`; ``width`` is the evaluated width whose count is closest to the target (ties:
        the smaller count).

    Raises:
        TypeError: a wrong type (``factory`` not callable or not returning an ``nn.Module``, a non-integer
            ``num_splits``, a non-numeric width or tolerance ...).
        ValueError: a value out of range (``num_splits < 1``, ``base_width <= 0`` or not finite, empty
            ``candidates`` ...).
    """
    s, base, widths = _check_search(factory, num_splits, base_width, integer, candidates, rel_tol, max_iter)
    evaluated: dict[Any, int] = {}

    def count(width: Any) -> int:
        if width not in evaluated:
            evaluated[width] = _count_factory(factory, width)
        return evaluated[width]

    base_key: Any = int(base) if integer else base_width
    reference = count(base_key)
    target = reference / s
    if s > 1 and widths is not None:
        evaluated.clear()
        for w in widths:
            count(w)
    elif s > 1:
        bisect_width(
            count, target, 1 if integer else base / s, base, integer=integer, max_iter=max_iter, rel_tol=rel_tol
        )
    width = closest_width(evaluated, target)
    return WidthSearch(
        width=width, params=evaluated[width], target=target, reference_params=reference, evaluations=len(evaluated)
    )


def divide_by_factory(
    factory: Callable[[Any], nn.Module],
    num_splits: int,
    base_width: float = 1.0,
    *,
    integer: bool = False,
    candidates: Iterable[Any] | None = None,
    rel_tol: float = 0.005,
    max_iter: int = 40,
    identical_init: bool = False,
) -> list[nn.Module]:
    """Build S models from ``factory`` at the width where each has about 1/S of ``factory(base_width)``'s parameters.

    The width is found by :func:`search_width`; each of the S models is a fresh ``factory(width)`` call
    (independent initialisations unless ``identical_init``).

    Args:
        factory: ``width -> nn.Module``, e.g. ``lambda w: torchvision.models.mobilenet_v2(width_mult=w)`` or
            ``lambda w: torchvision.models.resnet.ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=w)`` with
            ``integer=True``.
        num_splits: S >= 1.
        base_width: the width of the undivided model.
        integer, candidates, rel_tol, max_iter: see :func:`search_width`.
        identical_init: give every model the first model's initial weights (an option of the authors' code).

    Returns:
        A list of S ``nn.Module``.

    Example:
        >>> import torchvision
        >>> nets = divide_by_factory(lambda w: torchvision.models.mobilenet_v2(width_mult=w), 2)
        >>> len(nets)
        2
    """
    check_bool("identical_init", identical_init)
    result = search_width(
        factory, num_splits, base_width, integer=integer, candidates=candidates, rel_tol=rel_tol, max_iter=max_iter
    )
    models = [_build(factory, result.width) for _ in range(num_splits)]
    if identical_init:
        state = models[0].state_dict()
        for m in models[1:]:
            m.load_state_dict(state)
    return models
