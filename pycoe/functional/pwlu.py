r"""Piecewise linear unit (PWLU), functional form.

The unit of Zhou, Zhu and Zhong, *Learning Specialized Activation Functions with the Piecewise Linear
Unit*, ICCV 2021 (arXiv:2104.03693): :math:`N` uniform intervals between a left bound :math:`B_L` and a
right bound :math:`B_R`, :math:`N + 1` knot values :math:`Y_P^0, \dots, Y_P^N`, linear interpolation
between the knots and linear extrapolation with slopes :math:`K_L` and :math:`K_R` outside the bounds.

Two implementations are given:

* :func:`pwlu`: the fast path, a custom :class:`torch.autograd.Function` that saves only the input for
  backward, recomputes the segment index there, and reduces the parameter gradients over the batch with
  ``scatter_add_`` (or a deterministic ``index_put_(accumulate=True)`` when
  :func:`torch.are_deterministic_algorithms_enabled`). It works on cache-sized chunks, with scratch
  buffers allocated once per call, so that its intermediates never reach the size of the input; on the
  CPU, with ``torch.get_num_threads() > 1``, the chunks are split between that many threads (each op on
  a chunk is below ATen's parallel grain and would otherwise run on one thread).
* :func:`pwlu_reference`: the paper's per-interval formula with masks, in plain autograd. Slow and
  memory-hungry, obviously correct: the tests compare the fast path against it.

Einstein legend (shapes in this file):

* ``P``: parameter rows, 1 for layer granularity, ``C`` (channels) for channel granularity;
* ``N``: intervals; ``K = N + 1`` knots; ``S = N + 2`` segments (left ray, ``N`` intervals, right ray);
* ``O, I``: the elements before and after the channel dimension, so that ``x`` is seen as ``[O, P, I]``.

Internally every segment ``s`` is a line ``y = alpha[s] + beta[s] * x``; the segment of ``x`` is
``s = clamp(floor((x - B_L) / d) + 1, 0, N + 1)`` with ``d = (B_R - B_L) / N``. The gradients of the
parameters follow from the per-segment sums of ``g`` and ``g * x`` (``g`` the incoming gradient) through
the small ``[P, S]`` tables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor

from pycoe._validation import check_int, check_tensor

__all__ = ["pwlu", "pwlu_reference"]

# Bytes per chunk of the fast path (in the compute dtype): 120 KiB, i.e. 30,720 float32 or 15,360 float64
# elements, just below ATen's intra-op grain (32,768 elements), so that every op on a chunk runs on the
# calling thread (threads are used one level up, see _workers). The scratch buffers of a chunk are
# allocated once per call and reused (``out=`` ops), so a chunk's intermediates stay in the L2 cache and
# no per-chunk allocation reaches malloc. Measured on the project's machine (1 thread): 120 KiB chunks with
# reused buffers are about 1.2x to 1.9x faster than the previous 64 KiB chunks with fresh temporaries;
# larger chunks gain little more with 1 thread and are several times slower with 2 threads on a loaded
# machine (every op then forks an OpenMP team). Any value gives the same result.
_CHUNK_BYTES = 120 << 10
# Chunks accumulated in the compute dtype before the partial parameter gradients are added into
# float64 totals (keeps the float32 reduction error small on large batches).
_FLUSH_EVERY = 8
# Chunks per worker thread below which a call runs on the calling thread only.
_MIN_CHUNKS_PER_WORKER = 4


def _as_param_row(name: str, value: Tensor | float, rows: int, like: Tensor) -> Tensor:
    """Return ``value`` as a tensor of shape ``[rows]`` (broadcasting a single value, differentiably)."""
    if not isinstance(value, Tensor):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a tensor or a float, got {type(value).__name__}")
        value = torch.tensor(float(value), dtype=like.dtype, device=like.device)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.numel() == rows:
        return value.reshape(rows)
    if value.numel() == 1:
        return value.reshape(1).expand(rows)
    raise ValueError(f"{name} must hold 1 value or one per row of points ({rows}), got shape {tuple(value.shape)}")


def _prepare(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor | float,
    right_bound: Tensor | float,
    left_slope: Tensor | float,
    right_slope: Tensor | float,
    channel_dim: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """Validate the arguments; return points ``[P, K]``, the four ``[P]`` rows and the channel dim."""
    check_tensor("x", x, floating=True)
    check_tensor("points", points, ndim=(1, 2), floating=True)
    if points.dim() == 1:
        points = points.unsqueeze(0)
    if points.shape[1] < 2:
        raise ValueError(f"points must hold at least 2 knots (1 interval) per row, got shape {tuple(points.shape)}")
    if points.shape[0] < 1:
        raise ValueError("points must have at least one row")
    rows = points.shape[0]
    lb = _as_param_row("left_bound", left_bound, rows, points)
    rb = _as_param_row("right_bound", right_bound, rows, points)
    ks = _as_param_row("left_slope", left_slope, rows, points)
    kr = _as_param_row("right_slope", right_slope, rows, points)
    for name, t in (("left_bound", lb), ("right_bound", rb), ("left_slope", ks), ("right_slope", kr)):
        if t.device != points.device:
            raise ValueError(f"{name} is on {t.device} but points is on {points.device}")
    if x.device != points.device:
        raise ValueError(f"x is on {x.device} but points is on {points.device}")
    check_int("channel_dim", channel_dim)
    cd = channel_dim
    if rows > 1:
        if not -x.dim() <= channel_dim < x.dim():
            raise ValueError(f"channel_dim={channel_dim} is out of range for x of shape {tuple(x.shape)}")
        cd = channel_dim % x.dim()
        if x.shape[cd] != rows:
            raise ValueError(
                f"x has {x.shape[cd]} channels along channel_dim={channel_dim} (shape {tuple(x.shape)}), "
                f"but points has {rows} rows (one per channel)"
            )
    return points, lb, rb, ks, kr, cd


def _compute_dtype(x: Tensor, points: Tensor) -> torch.dtype:
    """float64 if either operand is float64, float32 otherwise (bfloat16/float16 are upcast)."""
    if torch.float64 in (x.dtype, points.dtype):
        return torch.float64
    return torch.float32


# ----------------------------------------------------------------------------------------------------
# Segment tables and their backward (small [P, S] tensors)
# ----------------------------------------------------------------------------------------------------


def _tables(y: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor) -> dict[str, Tensor]:
    """Lines ``alpha + beta * x`` of the ``S = N + 2`` segments, per row. All inputs in compute dtype.

    Args:
        y: Tensor[P, K] knot values; lb, rb, ks, kr: Tensor[P].

    Returns:
        dict with alpha, beta, anchor (Tensor[P, S]), inner (Tensor[P, N] interval slopes),
        d, scale, shift (Tensor[P]); ``(x * scale + shift)`` is the segment coordinate.
    """
    n = y.shape[1] - 1
    d = (rb - lb) / n  # [P]
    inner = (y[:, 1:] - y[:, :-1]) / d[:, None]  # [P, N]
    beta = torch.cat([ks[:, None], inner, kr[:, None]], dim=1)  # [P, S]
    steps = torch.arange(n, dtype=y.dtype, device=y.device)
    knots = torch.cat([lb[:, None] + steps * d[:, None], rb[:, None]], dim=1)  # [P, K]
    anchor = torch.cat([knots[:, :1], knots], dim=1)  # [P, S]: the point where segment s meets its knot
    base = torch.cat([y[:, :1], y], dim=1)  # [P, S]: the knot value there
    alpha = base - beta * anchor
    scale = 1.0 / d
    shift = 1.0 - lb * scale
    return {"alpha": alpha, "beta": beta, "anchor": anchor, "inner": inner, "d": d, "scale": scale, "shift": shift}


def _tables_backward(tab: dict[str, Tensor], g_alpha: Tensor, g_beta: Tensor) -> tuple[Tensor, ...]:
    """Chain rule from the per-segment sums to the parameters.

    Args:
        tab: the output of :func:`_tables`.
        g_alpha: Tensor[P, S], sum of the incoming gradient over the elements of each segment.
        g_beta: Tensor[P, S], the same sum weighted by ``x``.

    Returns:
        Gradients of (points Tensor[P, K], left_bound, right_bound, left_slope, right_slope Tensor[P]).

    With ``y = base[s] + beta[s] * (x - anchor[s])``: d/d base = g, d/d beta = g * (x - anchor),
    d/d anchor = -beta * g. The knots are ``B_L + j * d`` for ``j < N`` and ``B_R`` for ``j = N``.
    """
    beta, anchor, inner, d = tab["beta"], tab["anchor"], tab["inner"], tab["d"]
    n = inner.shape[1]
    g_beta_total = g_beta - anchor * g_alpha  # [P, S]
    g_anchor = -beta * g_alpha  # [P, S]
    # base = cat(Y_0, Y_0..Y_N); anchor = cat(knot_0, knot_0..knot_N)
    g_points = g_alpha[:, 1:].clone()
    g_points[:, 0] += g_alpha[:, 0]
    g_knots = g_anchor[:, 1:].clone()
    g_knots[:, 0] += g_anchor[:, 0]
    g_ks = g_beta_total[:, 0]
    g_kr = g_beta_total[:, -1]
    g_inner = g_beta_total[:, 1:-1] / d[:, None]  # d/d(Y_{i+1} - Y_i)
    g_points[:, 1:] += g_inner
    g_points[:, :-1] -= g_inner
    g_d = -(g_inner * inner).sum(dim=1)
    steps = torch.arange(n, dtype=d.dtype, device=d.device)
    g_lb = g_knots[:, :n].sum(dim=1)
    g_d = g_d + (g_knots[:, :n] * steps).sum(dim=1)
    g_rb = g_knots[:, n]
    g_lb = g_lb - g_d / n
    g_rb = g_rb + g_d / n
    return g_points, g_lb, g_rb, g_ks, g_kr


# ----------------------------------------------------------------------------------------------------
# Layout and chunking
# ----------------------------------------------------------------------------------------------------


def _dense_permutation(x: Tensor) -> list[int] | None:
    """A permutation ``perm`` with ``x.permute(perm)`` contiguous, or None if ``x`` is not dense."""
    if x.is_contiguous():
        return list(range(x.dim()))
    perm = sorted(range(x.dim()), key=lambda i: (-x.stride(i), i))
    if x.permute(perm).is_contiguous():
        return perm
    return None


def _chunks(outer: int, rows: int, inner: int, chunk: int) -> Iterator[tuple[str, int, int, int]]:
    """Split a contiguous ``[O, P, I]`` tensor into contiguous pieces of about ``chunk`` elements.

    Yields ``(kind, a, b, r)``: ``("outer", o0, o1, 0)`` is ``x3[o0:o1]`` (all rows);
    ``("rows", r0, r1, 0)`` is rows ``r0:r1`` of the ``[O * P, I]`` view;
    ``("inner", i0, i1, r)`` is ``[r, i0:i1]`` of that view.
    """
    if outer * rows * inner == 0:
        return
    if rows * inner <= chunk:
        step = max(1, chunk // (rows * inner))
        for o0 in range(0, outer, step):
            yield "outer", o0, min(o0 + step, outer), 0
    elif inner <= chunk:
        step = max(1, chunk // inner)
        total = outer * rows
        for r0 in range(0, total, step):
            yield "rows", r0, min(r0 + step, total), 0
    else:
        for r in range(outer * rows):
            for i0 in range(0, inner, chunk):
                yield "inner", i0, min(i0 + chunk, inner), r


class _Layout:
    """The canonical contiguous ``[O, P, I]`` view of an input and how to map chunks of it."""

    def __init__(self, x: Tensor, rows: int, channel_dim: int):
        perm = _dense_permutation(x)
        if perm is None:
            x = x.contiguous()
            perm = list(range(x.dim()))
        self.perm = perm
        self.inverse = [perm.index(i) for i in range(len(perm))]
        xp = x.permute(perm)
        self.shape = xp.shape
        if rows > 1:
            cdp = perm.index(channel_dim)
            outer = 1
            for s in xp.shape[:cdp]:
                outer *= s
            inner = 1
            for s in xp.shape[cdp + 1 :]:
                inner *= s
        else:
            outer, inner = 1, xp.numel()
        self.outer, self.rows, self.inner = outer, rows, inner

    def view3(self, t: Tensor) -> Tensor:
        """``t`` (same shape and layout family as x) as a contiguous ``[O, P, I]`` tensor."""
        return t.permute(self.perm).contiguous().view(self.outer, self.rows, self.inner)

    def empty_like3(self, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """A new ``[O, P, I]`` buffer and the same memory seen with ``x``'s shape and strides."""
        buf = torch.empty(self.shape, dtype=dtype, device=x.device)
        return buf.view(self.outer, self.rows, self.inner), buf.permute(self.inverse)

    def pieces(self, chunk: int) -> Iterator[tuple[str, int, int, int]]:
        """The pieces of the ``[O, P, I]`` view, as described in :func:`_chunks`."""
        return _chunks(self.outer, self.rows, self.inner, chunk)


def _slice(t3: Tensor, piece: tuple[str, int, int, int]) -> Tensor:
    """The piece of a contiguous ``[O, P, I]`` tensor (a contiguous view)."""
    kind, a, b, r = piece
    if kind == "outer":
        return t3[a:b]
    if kind == "rows":
        return t3.view(-1, t3.shape[2])[a:b]
    return t3.view(-1, t3.shape[2])[r, a:b]


class _RowParams:
    """Per-row vectors ``[P]`` shaped, once, to broadcast against every kind of piece.

    Built completely in the constructor (the pieces may be processed by several threads).
    """

    def __init__(self, vecs: list[Tensor], outer: int, rows: int, kinds: set[str]):
        self.vecs, self.rows = vecs, rows
        self.outer_form = [v.view(1, rows, 1) for v in vecs]
        if rows == 1:
            self.rows_form = [v.view(1, 1) for v in vecs]
        elif "rows" in kinds:  # [O * P, 1]: row r belongs to channel r % P
            self.rows_form = [v.repeat(outer).unsqueeze(1) for v in vecs]
        else:
            self.rows_form = []

    def __call__(self, piece: tuple[str, int, int, int]) -> list[Tensor]:
        kind, a, b, r = piece
        if kind == "outer":
            return self.outer_form
        if kind == "rows":
            if self.rows == 1:
                return self.rows_form
            return [v[a:b] for v in self.rows_form]
        p = r % self.rows
        return [v[p : p + 1] for v in self.vecs]


class _Workspace:
    """Scratch buffers of one chunk, allocated once per call (per thread) and reused by every piece."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device, long_index: bool):
        self.v = torch.empty(size, dtype=dtype, device=device)
        self.w = torch.empty(size, dtype=dtype, device=device)
        self.index = torch.empty(size, dtype=torch.int32, device=device)
        self.long_index = torch.empty(size if long_index else 0, dtype=torch.int64, device=device)

    def views(self, shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
        """The flat int32 index buffer and two float buffers of ``shape``, for a piece of ``shape``."""
        numel = shape.numel()
        return self.index[:numel], self.v[:numel].view(shape), self.w[:numel].view(shape)


def _segment_index(xc: Tensor, params: list[Tensor], n: int, idx: Tensor, v: Tensor) -> None:
    """Write the flat int32 table index (row offset + segment) of every element of a piece into ``idx``.

    Args:
        xc: Tensor[piece] the input piece; params: [scale, shift] or [scale, shift, offset] shaped to
            broadcast against it; idx: Tensor[piece.numel()] int32 output; v: Tensor[piece] scratch in
            the compute dtype (holds the clamped segment coordinate afterwards).
    """
    # (x - B_L) / d + 1; mul + add_ is measured 3x faster than a broadcasting addcmul on CPU
    torch.mul(xc, params[0], out=v)
    v.add_(params[1])
    v.clamp_(0, n + 1)
    idx.copy_(v.view(-1))  # truncation is floor here (v >= 0)
    idx.clamp_(0, n + 1)  # NaN inputs convert to an arbitrary integer; keep them inside the table
    if len(params) > 2:
        idx.view(v.shape).add_(params[2])


_T = TypeVar("_T")


def _workers(x: Tensor, num_pieces: int) -> int:
    """Threads for one call: ``torch.get_num_threads()`` on the CPU when there is enough work, else 1."""
    if x.device.type != "cpu" or _compiling() or torch.are_deterministic_algorithms_enabled():
        return 1
    return max(1, min(torch.get_num_threads(), num_pieces // _MIN_CHUNKS_PER_WORKER))


def _run_split(pieces: Sequence[_T], workers: int, task: Callable[[Sequence[_T]], object], device: str) -> list:
    """Run ``task`` on ``workers`` contiguous, near-equal groups of ``pieces``; results in group order.

    The calling thread runs the first group, worker threads of a pool made for this call the others (ATen
    ops release the GIL; a call only splits when it has several large chunks per thread, so starting the
    threads costs little next to the work, and no thread outlives the call or survives a fork). The split
    depends only on ``len(pieces)`` and ``workers``, so results are reproducible.
    """
    if workers <= 1:
        return [task(pieces)]
    bounds = [len(pieces) * i // workers for i in range(workers + 1)]
    groups = [pieces[bounds[i] : bounds[i + 1]] for i in range(workers)]

    def in_worker(group: Sequence[_T]) -> object:
        # grad mode and autocast are thread-local: match the autograd.Function's (off)
        with torch.no_grad(), torch.autocast(device_type=device, enabled=False):
            return task(group)

    with ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="pycoe-pwlu") as pool:
        futures = [pool.submit(in_worker, g) for g in groups[1:]]
        try:
            first = task(groups[0])
        finally:  # never leave a worker writing into buffers that the caller is about to drop
            results = [f.exception() or f.result() for f in futures]
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [first, *results]


# ----------------------------------------------------------------------------------------------------
# The autograd function
# ----------------------------------------------------------------------------------------------------


class _PWLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, points, lb, rb, ks, kr, channel_dim):  # type: ignore[override]
        cdt = _compute_dtype(x, points)
        rows, k = points.shape
        n = k - 1
        with torch.autocast(device_type=x.device.type, enabled=False):
            tab = _tables(points.to(cdt), lb.to(cdt), rb.to(cdt), ks.to(cdt), kr.to(cdt))
            alpha = tab["alpha"].reshape(-1)
            beta = tab["beta"].reshape(-1)
            layout = _Layout(x, rows, channel_dim)
            x3 = layout.view3(x)
            out3, out = layout.empty_like3(x, x.dtype)
            chunk = max(1, x3.numel()) if _compiling() else max(1, _CHUNK_BYTES // cdt.itemsize)
            pieces = list(layout.pieces(chunk))
            row_params = _row_params(tab, layout, rows, n, pieces, x.device)
            size = min(chunk, max(1, x3.numel()))

            def task(group: Sequence[tuple[str, int, int, int]]) -> None:
                ws = _Workspace(size, cdt, x.device, long_index=False)
                for piece in group:
                    xc = _slice(x3, piece)
                    idx, v, w = ws.views(xc.shape)
                    _segment_index(xc, row_params(piece), n, idx, v)
                    torch.index_select(alpha, 0, idx, out=w.view(-1))
                    torch.index_select(beta, 0, idx, out=v.view(-1))
                    # computed in the compute dtype, rounded once to x's dtype
                    torch.addcmul(w, v, xc, out=_slice(out3, piece))

            _run_split(pieces, _workers(x, len(pieces)), task, x.device.type)
        ctx.save_for_backward(x, points, lb, rb, ks, kr)
        ctx.channel_dim = channel_dim
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, points, lb, rb, ks, kr = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        need_p = any(ctx.needs_input_grad[1:6])
        cdt = _compute_dtype(x, points)
        rows, k = points.shape
        n = k - 1
        deterministic = torch.are_deterministic_algorithms_enabled()
        grad_x = None
        with torch.autocast(device_type=x.device.type, enabled=False):
            tab = _tables(points.to(cdt), lb.to(cdt), rb.to(cdt), ks.to(cdt), kr.to(cdt))
            beta = tab["beta"].reshape(-1)
            layout = _Layout(x, rows, ctx.channel_dim)
            x3 = layout.view3(x)
            g3 = layout.view3(grad_out)
            if need_x:
                gx3, grad_x = layout.empty_like3(x, x.dtype)
            bins = rows * (n + 2)
            chunk = max(1, x3.numel()) if _compiling() else max(1, _CHUNK_BYTES // cdt.itemsize)
            pieces = list(layout.pieces(chunk))
            row_params = _row_params(tab, layout, rows, n, pieces, x.device)
            size = min(chunk, max(1, x3.numel()))

            def task(group: Sequence[tuple[str, int, int, int]]) -> tuple[Tensor, Tensor] | None:
                ws = _Workspace(size, cdt, x.device, long_index=need_p and not deterministic)
                if need_p:
                    total_a = torch.zeros(bins, dtype=torch.float64, device=x.device)
                    total_b = torch.zeros(bins, dtype=torch.float64, device=x.device)
                    part_a = torch.zeros(bins, dtype=cdt, device=x.device)
                    part_b = torch.zeros(bins, dtype=cdt, device=x.device)
                pending = 0
                for piece in group:
                    xc = _slice(x3, piece)
                    gc = _slice(g3, piece)
                    idx, v, w = ws.views(xc.shape)
                    _segment_index(xc, row_params(piece), n, idx, v)
                    if need_x:
                        torch.index_select(beta, 0, idx, out=w.view(-1))
                        # computed in the compute dtype, rounded once to x's dtype
                        torch.mul(w, gc, out=_slice(gx3, piece))
                    if not need_p:
                        continue
                    if gc.dtype != cdt:
                        w.copy_(gc)
                        gc = w
                    torch.mul(gc, xc, out=v)
                    gcf, gxf = gc.reshape(-1), v.view(-1)
                    if deterministic:
                        part_a.index_put_((idx,), gcf, accumulate=True)
                        part_b.index_put_((idx,), gxf, accumulate=True)
                    else:  # measured faster than index_add_ (int32) and bincount, int64 copy included
                        lidx = ws.long_index[: idx.numel()]
                        lidx.copy_(idx)
                        part_a.scatter_add_(0, lidx, gcf)
                        part_b.scatter_add_(0, lidx, gxf)
                    pending += 1
                    if pending == _FLUSH_EVERY:
                        total_a += part_a
                        total_b += part_b
                        part_a.zero_()
                        part_b.zero_()
                        pending = 0
                if not need_p:
                    return None
                total_a += part_a
                total_b += part_b
                return total_a, total_b

            results = _run_split(pieces, _workers(x, len(pieces)), task, x.device.type)
            grads: tuple = (None,) * 5
            if need_p:
                total_a, total_b = results[0]
                for part_a, part_b in results[1:]:  # fixed order: reproducible
                    total_a += part_a
                    total_b += part_b
                g_alpha = total_a.to(cdt).view(rows, n + 2)
                g_beta = total_b.to(cdt).view(rows, n + 2)
                grads = _tables_backward(tab, g_alpha, g_beta)
                grads = tuple(
                    g.to(p.dtype) if need else None
                    for g, p, need in zip(grads, (points, lb, rb, ks, kr), ctx.needs_input_grad[1:6])
                )
        return (grad_x, *grads, None)


def _row_params(
    tab: dict[str, Tensor], layout: _Layout, rows: int, n: int, pieces: list, device: torch.device
) -> _RowParams:
    """scale, shift (and the int32 row offsets ``p * (N + 2)`` when ``P > 1``) for every piece."""
    vecs = [tab["scale"], tab["shift"]]
    if rows > 1:
        vecs.append(torch.arange(rows, dtype=torch.int32, device=device) * (n + 2))
    return _RowParams(vecs, layout.outer, rows, {p[0] for p in pieces})


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


def pwlu(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor | float,
    right_bound: Tensor | float,
    left_slope: Tensor | float,
    right_slope: Tensor | float,
    channel_dim: int = 1,
) -> Tensor:
    r"""Piecewise linear unit (fast path).

    .. math::

        \mathrm{PWLU}(x) = \begin{cases}
            (x - B_L)\,K_L + Y_P^0 & x < B_L \\
            (x - B_R)\,K_R + Y_P^N & x \ge B_R \\
            (x - B_{i})\,\frac{Y_P^{i+1} - Y_P^{i}}{d} + Y_P^{i} & B_i \le x < B_{i+1}
        \end{cases}
        \qquad d = \frac{B_R - B_L}{N},\; B_i = B_L + i\,d.

    Every argument but ``x`` and ``channel_dim`` is differentiable. The backward saves only ``x`` (and
    the small parameters) and recomputes the segment index; parameter gradients are reduced over the
    batch with ``scatter_add_``, or with ``index_put_(accumulate=True)`` (deterministic) when
    :func:`torch.are_deterministic_algorithms_enabled`. Not twice differentiable. On the CPU the work
    is split between ``torch.get_num_threads()`` threads when the input is large enough (at least 4
    chunks of 120 KiB per thread); the split depends only on the input's size and the thread count, so
    repeated calls give identical results, and the parameter gradients of different thread counts
    differ by float rounding only (summation order).

    Numerics: the computation runs in float64 if ``x`` or ``points`` is float64 and in float32 otherwise
    (bfloat16 and float16 inputs are upcast inside, also under autocast); the output has ``x``'s dtype,
    shape and memory layout (contiguous, channels_last, any dense permutation). Each segment is
    evaluated as ``alpha + beta * x``, so with bounds far from zero the rounding error scales with
    ``|beta * x|`` rather than with ``|y|``. ``B_R > B_L`` is required and not checked (it would cost a
    device synchronisation); NaN inputs give NaN outputs.

    Args:
        x: Tensor[...], any floating dtype and layout.
        points: Tensor[P, N + 1] (or Tensor[N + 1]): the knot values :math:`Y_P`; ``P = 1`` applies one
            function to every element (layer granularity), ``P = C`` one per channel.
        left_bound: Tensor[P] (or one value) :math:`B_L`.
        right_bound: Tensor[P] (or one value) :math:`B_R`.
        left_slope: Tensor[P] (or one value) :math:`K_L`.
        right_slope: Tensor[P] (or one value) :math:`K_R`.
        channel_dim: the dimension of ``x`` that indexes the rows of ``points`` when ``P > 1``
            (1 for NCHW images, -1 for (B, T, C) sequences); ignored when ``P = 1``.

    Returns:
        Tensor[...] of ``x``'s shape, dtype and layout.

    Raises:
        TypeError: a non-tensor or non-floating input.
        ValueError: ``points`` with fewer than 2 knots, parameter rows that do not match, a channel
            count of ``x`` that differs from ``P``, or devices that differ.
    """
    points, lb, rb, ks, kr, cd = _prepare(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)
    return _PWLUFunction.apply(x, points, lb, rb, ks, kr, cd)


def pwlu_reference(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor | float,
    right_bound: Tensor | float,
    left_slope: Tensor | float,
    right_slope: Tensor | float,
    channel_dim: int = 1,
) -> Tensor:
    """The same function as :func:`pwlu`, written as the paper's per-interval formula with masks.

    Plain autograd, one masked term per interval; several full-size intermediates per interval, so it
    is slow and memory-hungry. It exists to check :func:`pwlu` (the tests compare the two). Same
    arguments, dtypes and output as :func:`pwlu`; twice differentiable.
    """
    points, lb, rb, ks, kr, cd = _prepare(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)
    cdt = _compute_dtype(x, points)
    rows, k = points.shape
    n = k - 1
    shape = [1] * x.dim()
    if rows > 1:
        shape[cd] = rows

    def col(t: Tensor) -> Tensor:  # [P] -> broadcastable against x
        return t.to(cdt).reshape(shape)

    xc = x.to(cdt)
    y_pts = points.to(cdt)
    left, right = col(lb), col(rb)
    d = (right - left) / n
    out = torch.where(xc < left, (xc - left) * col(ks) + col(y_pts[:, 0]), torch.zeros_like(xc))
    out = out + torch.where(xc >= right, (xc - right) * col(kr) + col(y_pts[:, n]), torch.zeros_like(xc))
    for i in range(n):
        b_i = left + i * d
        b_next = left + (i + 1) * d if i < n - 1 else right
        k_i = (col(y_pts[:, i + 1]) - col(y_pts[:, i])) / d
        mask = (xc >= b_i) & (xc < b_next) & (xc >= left) & (xc < right)
        out = out + torch.where(mask, (xc - b_i) * k_i + col(y_pts[:, i]), torch.zeros_like(xc))
    return out.to(x.dtype)
