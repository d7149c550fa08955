"""The one parameter-count bisection behind :func:`~pycoe.cotrain.search_width` and ``divide_module``.

Both look for the width (a factory's width argument, or ``divide_module``'s multiplier :math:`\\alpha`) at which
a non-decreasing parameter count is closest to a target. Private to :mod:`pycoe.cotrain`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["bisect_width", "closest_width"]


def closest_width(evaluated: dict[Any, int], target: float) -> Any:
    """The evaluated width whose count is closest to ``target``.

    Ties go to the smaller count, then (among widths with one count) to the larger numeric width, or to the
    first evaluated for widths that are not numbers.
    """
    order = {w: i for i, w in enumerate(evaluated)}

    def key(w: Any) -> tuple[float, int, float]:
        rank = -w if isinstance(w, (int, float)) and not isinstance(w, bool) else order[w]
        return (abs(evaluated[w] - target), evaluated[w], rank)

    return min(evaluated, key=key)


def bisect_width(
    count: Callable[[float], int],
    target: float,
    lo: float,
    hi: float,
    *,
    integer: bool = False,
    max_iter: int = 40,
    rel_tol: float = 0.0,
    max_expand: int = 20,
) -> dict[float, int]:
    """Evaluate ``count`` at the widths of a bisection for ``count(width) == target``; return ``{width: count}``.

    ``count`` is assumed non-decreasing in the width; each width is evaluated once.

    - ``integer=True``: integer widths in ``[lo, hi]``; the bisection runs until the bracket is two adjacent
      integers (``max_iter``, ``rel_tol`` and ``max_expand`` are not used).
    - otherwise: the bracket is first widened (``lo`` halved while ``count(lo) > target``, ``hi`` doubled while
      ``count(hi) < target``, each at most ``max_expand`` times), then bisected at most ``max_iter`` times,
      stopping early when a count is within ``rel_tol * target`` of the target.

    Pick the answer with :func:`closest_width`.
    """
    evaluated: dict[float, int] = {}

    def at(width: float) -> int:
        if width not in evaluated:
            evaluated[width] = count(width)
        return evaluated[width]

    if integer:
        low, high = int(lo), int(hi)
        if at(low) >= target or at(high) <= target:
            return evaluated
        while high - low > 1:  # invariant: count(low) < target < count(high)
            mid = (low + high) // 2
            if at(mid) < target:
                low = mid
            else:
                high = mid
        return evaluated
    for _ in range(max_expand):
        if at(lo) <= target:
            break
        lo /= 2
    for _ in range(max_expand):
        if at(hi) >= target:
            break
        hi *= 2
    for _ in range(max_iter):
        middle = 0.5 * (lo + hi)
        c = at(middle)
        if abs(c - target) <= rel_tol * target:
            break
        if c < target:
            lo = middle
        else:
            hi = middle
    return evaluated
