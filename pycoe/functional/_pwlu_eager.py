"""The eager CPU kernel of :func:`pycoe.functional.pwlu` (private to that module).

Forward and backward each make one pass over the input in cache-sized chunks: per chunk, the segment
index (a multiply, an add, a clamp and a conversion to int32, each an ``out=`` or in-place op on a
reused scratch buffer), two ``index_select`` gathers of the segment lines and one ``addcmul``; backward
recomputes the index from the saved input (so only the input is saved), gathers the slopes for the
input gradient and reduces ``g`` and ``g * x`` per segment with ``scatter_add_`` (or the deterministic
``index_put_(accumulate=True)`` when :func:`torch.are_deterministic_algorithms_enabled`). Chunks keep every
intermediate in the L2 cache and every op below ATen's intra-op grain; with ``torch.get_num_threads() > 1``
the chunks themselves are split between that many threads (the calling thread and a pool of worker threads
kept for the process). The user guide (``docs/guide/pwlu.rst``) has
the measurements behind these choices.

Legend: ``x`` is seen as a contiguous ``[O, P, I]`` tensor (``P`` the parameter rows, ``O`` and ``I`` the
elements before and after the channel dimension); ``N`` intervals, ``S = N + 2`` segments.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import Tensor

from pycoe.functional._pwlu_tables import SegmentTables, compute_dtype, segment_tables, tables_backward

__all__ = ["EagerPWLU", "eager_tables", "segment_sums"]

# Bytes of input (in the compute dtype) per chunk when torch may use several threads: 30,720 float32
# elements, just below ATen's intra-op grain (32,768), so that every op on a chunk runs on the calling
# thread (the chunks are split between threads one level up) and its scratch stays in the L2 cache.
CHUNK_BYTES = 120 << 10
# ... and with torch.get_num_threads() == 1, when no op can fork: larger chunks, fewer calls per element.
# Any value gives the same result.
SERIAL_CHUNK_BYTES = 512 << 10
# Chunks accumulated in the compute dtype before the partial segment sums are added into float64 totals
# (keeps the float32 reduction error small on large batches).
_FLUSH_EVERY = 8
# Chunks per worker thread below which a call runs on the calling thread only.
_MIN_CHUNKS_PER_WORKER = 4

# A piece of the [O, P, I] view: ("outer", o0, o1, 0) is x3[o0:o1] (all rows); ("rows", r0, r1, 0) is rows
# r0:r1 of the [O * P, I] view; ("inner", i0, i1, r) is [r, i0:i1] of that view.
Piece = tuple[str, int, int, int]


def _dense_permutation(x: Tensor) -> list[int] | None:
    """A permutation ``perm`` with ``x.permute(perm)`` contiguous, or None if ``x`` is not dense."""
    if x.is_contiguous():
        return list(range(x.dim()))
    strides = x.stride()
    perm = sorted(range(x.dim()), key=lambda i: (-strides[i], i))
    if x.permute(perm).is_contiguous():
        return perm
    return None


class _Layout:
    """The contiguous ``[O, P, I]`` view of an input in memory order, and its pieces."""

    def __init__(self, x: Tensor, rows: int, channel_dim: int):
        perm = _dense_permutation(x)
        if perm is None:  # a view with gaps: copied once
            x = x.contiguous()
            perm = list(range(x.dim()))
        self.perm = perm
        self.inverse = [perm.index(i) for i in range(len(perm))]
        xp = x.permute(perm)
        self.shape = xp.shape
        outer, inner = 1, xp.numel()
        if rows > 1:
            cdp = perm.index(channel_dim)
            outer = int(torch.Size(xp.shape[:cdp]).numel())
            inner = int(torch.Size(xp.shape[cdp + 1 :]).numel())
        self.outer, self.rows, self.inner = outer, rows, inner

    def view3(self, t: Tensor) -> Tensor:
        """``t`` (x's shape and layout) as a contiguous ``[O, P, I]`` tensor."""
        return t.permute(self.perm).contiguous().view(self.outer, self.rows, self.inner)

    def empty3(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """A new ``[O, P, I]`` buffer of x's dtype, and the same memory seen with x's shape and strides.

        The latter is the allocated tensor itself, not a view of it: the output of an autograd function that is a
        view cannot be modified in place, and consumers such as ``Dropout(inplace=True)`` or ``relu_`` do that.
        """
        strides = [0] * len(self.perm)
        step = 1
        for k in reversed(range(len(self.perm))):  # the contiguous strides of the permuted shape, put back
            strides[self.perm[k]] = step
            step *= max(int(self.shape[k]), 1)
        out = torch.empty_strided(x.shape, strides, dtype=x.dtype, device=x.device)
        return out.permute(self.perm).view(self.outer, self.rows, self.inner), out

    def pieces(self, chunk: int) -> list[Piece]:
        """Contiguous pieces of about ``chunk`` elements covering the ``[O, P, I]`` view."""
        outer, rows, inner = self.outer, self.rows, self.inner
        if outer * rows * inner == 0:
            return []
        if rows * inner <= chunk:
            step = max(1, chunk // (rows * inner))
            return [("outer", o0, min(o0 + step, outer), 0) for o0 in range(0, outer, step)]
        if inner <= chunk:
            step, total = max(1, chunk // inner), outer * rows
            return [("rows", r0, min(r0 + step, total), 0) for r0 in range(0, total, step)]
        return [("inner", i0, min(i0 + chunk, inner), r) for r in range(outer * rows) for i0 in range(0, inner, chunk)]


class _Pieces:
    """A contiguous ``[O, P, I]`` tensor and the views its pieces are cut from (one view op per piece)."""

    def __init__(self, t3: Tensor):
        self.t3, self.t2, self.flat = t3, t3.view(t3.shape[0] * t3.shape[1], t3.shape[2]), t3.view(-1)
        self.inner = t3.shape[2]

    def __getitem__(self, piece: Piece) -> Tensor:
        kind, a, b, r = piece
        if kind == "outer":
            return self.t3[a:b]
        if kind == "rows":
            return self.t2[a:b]
        return self.flat[r * self.inner + a : r * self.inner + b]


class _RowParams:
    """Per-row vectors Tensor[P], shaped once to broadcast against every kind of piece (thread-safe reads)."""

    def __init__(self, vecs: list[Tensor], layout: _Layout, kinds: set[str]):
        rows = layout.rows
        self.vecs, self.rows = vecs, rows
        self.outer_form = [v.view(1, rows, 1) for v in vecs]
        self.rows_form: list[Tensor] = []
        if rows > 1 and "rows" in kinds:  # [O * P, 1]: row r belongs to channel r % P
            self.rows_form = [v.repeat(layout.outer).unsqueeze(1) for v in vecs]

    def __call__(self, piece: Piece) -> list[Tensor]:
        if self.rows == 1:  # a single value broadcasts against any piece
            return self.vecs
        kind, a, b, r = piece
        if kind == "outer":
            return self.outer_form
        if kind == "rows":
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
        self._views: dict[torch.Size, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def views(self, shape: torch.Size) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The flat int32 and int64 index buffers and two float buffers of ``shape``, for a piece of ``shape``.

        Cached: the pieces of a call have at most a few distinct shapes.
        """
        views = self._views.get(shape)
        if views is None:
            numel = shape.numel()
            long_index = self.long_index[:numel] if self.long_index.numel() else self.long_index
            views = (self.index[:numel], long_index, self.v[:numel].view(shape), self.w[:numel].view(shape))
            self._views[shape] = views
        return views


def _segment_index(xc: Tensor, params: list[Tensor], n: int, idx: Tensor, v: Tensor) -> None:
    """Write the flat int32 table index (row offset + segment) of every element of a piece into ``idx``.

    ``params`` is [scale, shift] or [scale, shift, row offset], shaped to broadcast against the piece
    ``xc``; ``v`` (the piece's shape, compute dtype) is scratch and holds the clamped coordinate afterwards.
    """
    torch.mul(xc, params[0], out=v)  # mul + add_: faster than a broadcasting addcmul here
    v.add_(params[1])
    v.clamp_(0, n + 1)
    idx.copy_(v.view(-1))  # truncation is floor here (v >= 0)
    idx.clamp_(0, n + 1)  # a NaN input converts to an arbitrary integer: keep it inside the table
    if len(params) > 2:
        idx.view(v.shape).add_(params[2])


def _row_params(tab: SegmentTables, layout: _Layout, n: int, pieces: list[Piece]) -> _RowParams:
    """scale, shift (and the int32 row offsets ``p * (N + 2)`` when ``P > 1``) for every piece."""
    vecs = [tab.scale, tab.shift]
    if layout.rows > 1:
        vecs.append(torch.arange(layout.rows, dtype=torch.int32, device=tab.scale.device) * (n + 2))
    return _RowParams(vecs, layout, {p[0] for p in pieces})


_T = TypeVar("_T")


def _workers(x: Tensor, num_pieces: int) -> int:
    """Threads for one call: ``torch.get_num_threads()`` when there is enough work, else 1."""
    if torch.are_deterministic_algorithms_enabled():
        return 1
    return max(1, min(torch.get_num_threads(), num_pieces // _MIN_CHUNKS_PER_WORKER))


class _WorkerPool:
    """The worker threads of the eager kernel: one pool for the process, started on first use.

    It grows when ``torch.get_num_threads()`` asks for more workers than it has, and a child process made by
    ``fork`` (a DataLoader worker) starts its own: the parent's threads do not exist there.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._pool, self._size = None, 0

    def get(self, workers: int) -> ThreadPoolExecutor:
        """A pool of at least ``workers`` threads."""
        with self._lock:
            if self._pool is None or self._size < workers:
                old = self._pool
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pycoe-pwlu")
                self._size = workers
                if old is not None:
                    old.shutdown(wait=False)  # its running tasks finish; new ones go to the new pool
            return self._pool


_POOL = _WorkerPool()


def _run_split(pieces: Sequence[Piece], workers: int, task: Callable[[Sequence[Piece]], _T]) -> list[_T]:
    """Run ``task`` on ``workers`` contiguous, near-equal groups of ``pieces``; results in group order.

    The calling thread runs the first group, the threads of the kernel's worker pool the others (ATen ops
    release the GIL; a call only splits when it has several chunks per thread). The split depends only on
    ``len(pieces)`` and ``workers``, so results are reproducible.
    """
    if workers <= 1:
        return [task(pieces)]
    bounds = [len(pieces) * i // workers for i in range(workers + 1)]
    groups = [pieces[bounds[i] : bounds[i + 1]] for i in range(workers)]

    def in_worker(group: Sequence[Piece]) -> _T:
        # grad mode and autocast are thread-local: match the autograd.Function's (both off)
        with torch.no_grad(), torch.autocast(device_type="cpu", enabled=False):
            return task(group)

    pool = _POOL.get(workers - 1)
    futures = [pool.submit(in_worker, g) for g in groups[1:]]
    try:
        first = task(groups[0])
    finally:  # never leave a worker writing into buffers that the caller is about to drop
        errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err
    return [first, *(f.result() for f in futures)]


def _chunk(dtype: torch.dtype) -> int:
    """Elements per chunk (see CHUNK_BYTES and SERIAL_CHUNK_BYTES)."""
    serial = torch.get_num_threads() == 1
    return max(1, (SERIAL_CHUNK_BYTES if serial else CHUNK_BYTES) // dtype.itemsize)


def eager_forward(x: Tensor, tab: SegmentTables, channel_dim: int) -> Tensor:
    """The output for input ``x`` (any dense or strided layout), computed in the tables' dtype."""
    rows, n = tab.alpha.shape[0], tab.alpha.shape[1] - 2
    cdt = tab.alpha.dtype
    alpha, beta = tab.alpha.reshape(-1), tab.beta.reshape(-1)
    layout = _Layout(x, rows, channel_dim)
    x3 = layout.view3(x)
    out3, out = layout.empty3(x)
    xs, outs = _Pieces(x3), _Pieces(out3)
    chunk = _chunk(cdt)
    pieces = layout.pieces(chunk)
    params = _row_params(tab, layout, n, pieces)
    size = min(chunk, max(1, x3.numel()))

    def task(group: Sequence[Piece]) -> None:
        ws = _Workspace(size, cdt, x.device, long_index=False)
        for piece in group:
            xc = xs[piece]
            idx, _, v, w = ws.views(xc.shape)
            _segment_index(xc, params(piece), n, idx, v)
            torch.index_select(alpha, 0, idx, out=w.view(-1))
            torch.index_select(beta, 0, idx, out=v.view(-1))
            torch.addcmul(w, v, xc, out=outs[piece])  # rounded once to x's dtype

    _run_split(pieces, _workers(x, len(pieces)), task)
    return out


def eager_backward(
    x: Tensor, grad: Tensor, tab: SegmentTables, channel_dim: int, need_x: bool, need_sums: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The input gradient (x's dtype and layout) and the per-segment sums Tensor[2, P, S] of ``g``, ``g * x``.

    The sums are float64 (float32 partial sums over at most ``_FLUSH_EVERY`` chunks, then float64).
    """
    rows, n = tab.alpha.shape[0], tab.alpha.shape[1] - 2
    cdt = tab.alpha.dtype
    beta = tab.beta.reshape(-1)
    deterministic = torch.are_deterministic_algorithms_enabled()
    layout = _Layout(x, rows, channel_dim)
    xs, gs = _Pieces(layout.view3(x)), _Pieces(layout.view3(grad))
    gx3, grad_x = layout.empty3(x) if need_x else (None, None)
    gxs = _Pieces(gx3) if gx3 is not None else None
    bins = rows * (n + 2)
    chunk = _chunk(cdt)
    pieces = layout.pieces(chunk)
    params = _row_params(tab, layout, n, pieces)
    size = min(chunk, max(1, xs.flat.numel()))

    def task(group: Sequence[Piece]) -> Tensor | None:
        ws = _Workspace(size, cdt, x.device, long_index=need_sums and not deterministic)
        total = torch.zeros(2, bins, dtype=torch.float64, device=x.device) if need_sums else None
        part_a = torch.zeros(bins, dtype=cdt, device=x.device)
        part_b = torch.zeros(bins, dtype=cdt, device=x.device)
        pending = 0
        for piece in group:
            xc, gc = xs[piece], gs[piece]
            idx, lidx, v, w = ws.views(xc.shape)
            _segment_index(xc, params(piece), n, idx, v)
            if gxs is not None:
                torch.index_select(beta, 0, idx, out=w.view(-1))
                torch.mul(w, gc, out=gxs[piece])  # rounded once to x's dtype
            if total is None:
                continue
            if gc.dtype != cdt:
                w.copy_(gc)
                gc = w
            torch.mul(gc, xc, out=v)
            gf, gxf = gc.reshape(-1), v.view(-1)
            if deterministic:
                part_a.index_put_((idx,), gf, accumulate=True)
                part_b.index_put_((idx,), gxf, accumulate=True)
            else:  # scatter_add_ needs an int64 index; the copy is cheaper than an int64 conversion above
                lidx.copy_(idx)
                part_a.scatter_add_(0, lidx, gf)
                part_b.scatter_add_(0, lidx, gxf)
            pending += 1
            if pending == _FLUSH_EVERY:
                total[0] += part_a
                total[1] += part_b
                part_a.zero_()
                part_b.zero_()
                pending = 0
        if total is not None:
            total[0] += part_a
            total[1] += part_b
        return total

    results = _run_split(pieces, _workers(x, len(pieces)), task)
    sums = None
    if need_sums:
        sums = torch.zeros(2, bins, dtype=torch.float64, device=x.device)
        for part in results:  # in a fixed order: reproducible
            if part is not None:
                sums += part
        sums = sums.view(2, rows, n + 2)
    return grad_x, sums


@torch.library.custom_op("pycoe::pwlu_segment_sums", mutates_args=())
def segment_sums(
    x: Tensor, grad: Tensor, points: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor, channel_dim: int
) -> Tensor:
    """Tensor[2, P, S] float64: the sums of ``grad`` and ``grad * x`` over the elements of each segment.

    The eager kernel's reduction as one opaque op, for the fused kernel's backward on the CPU under
    ``torch.compile`` (inductor's own scatter into ``P * S`` bins is serial per bin, and atomic across
    threads).
    """
    tab = eager_tables(x, points, lb, rb, ks, kr)
    sums = eager_backward(x, grad, tab, channel_dim, need_x=False, need_sums=True)[1]
    assert sums is not None
    return sums


@segment_sums.register_fake
def _(
    x: Tensor, grad: Tensor, points: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor, channel_dim: int
) -> Tensor:
    return x.new_empty((2, points.shape[0], points.shape[1] + 1), dtype=torch.float64)


def eager_tables(x: Tensor, points: Tensor, lb: Tensor, rb: Tensor, ks: Tensor, kr: Tensor) -> SegmentTables:
    """The segment tables in the compute dtype, without autograd (the kernel's chain rule is its own)."""
    cdt = compute_dtype(x, points)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        return segment_tables(points.to(cdt), lb.to(cdt), rb.to(cdt), ks.to(cdt), kr.to(cdt))


class EagerPWLU(torch.autograd.Function):
    """``apply(x, points [P, K], lb, rb, ks, kr [P], channel_dim, tables)``, ``tables`` from :func:`eager_tables`.

    Saves only ``x`` and the parameters (the small tables ride along on ``ctx``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        points: Tensor,
        lb: Tensor,
        rb: Tensor,
        ks: Tensor,
        kr: Tensor,
        channel_dim: int,
        tab: SegmentTables,
    ) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = eager_forward(x, tab, channel_dim)
        ctx.save_for_backward(x, points, lb, rb, ks, kr)
        ctx.channel_dim = channel_dim
        ctx.tab = tab
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, points, lb, rb, ks, kr = ctx.saved_tensors
        tab: SegmentTables = ctx.tab
        need_p = ctx.needs_input_grad[1:6]
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad_x, sums = eager_backward(
                x, grad_out, tab, ctx.channel_dim, need_x=ctx.needs_input_grad[0], need_sums=any(need_p)
            )
            grads: tuple[Tensor | None, ...] = (None,) * 5
            if sums is not None:
                g_all = tables_backward(tab, sums[0].to(tab.alpha.dtype), sums[1].to(tab.alpha.dtype))
                params = (points, lb, rb, ks, kr)
                grads = tuple(g.to(p.dtype) if need else None for g, p, need in zip(g_all, params, need_p))
        return (grad_x, *grads, None, None)
