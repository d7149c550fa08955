"""Test harness: run a function on several CPU processes joined by a gloo process group.

``run_distributed(fn, world_size=2, args=(), timeout=120)`` spawns ``world_size`` processes with the
``"spawn"`` start method, initialises ``torch.distributed`` with the gloo backend and a ``file://``
rendezvous in a fresh temporary directory, calls ``fn(rank, world_size, *args)`` in each, and returns
the per-rank return values (index = rank). ``fn`` must be a module-level function (the children import
it by name) and its return value must be picklable (move tensors to CPU).

Failure handling, so that a broken test never hangs the suite:

- an exception in any rank is sent back to the parent, which stops the other ranks (they may be
  blocked in a collective waiting for the failed one) and re-raises it; the child's formatted
  traceback is attached as the ``__cause__`` (a :class:`RemoteTraceback`) and the message names the
  rank. An exception that cannot be pickled is re-raised as a :class:`DistributedTestError`.
- a child that dies without reporting (segfault, ``os._exit``) raises :class:`DistributedTestError`
  with its exit code.
- if not every rank has reported after ``timeout`` seconds, all children are terminated and
  :class:`TimeoutError` is raised. The process-group timeout is set to the same value.

Each child runs with ``torch.set_num_threads(1)`` (the CI machine has few cores).
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_module
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["run_distributed", "RemoteTraceback", "DistributedTestError"]


class RemoteTraceback(Exception):
    """Carries a child process's formatted traceback; attached as ``__cause__`` of the re-raised error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\n--- traceback in the child process ---\n{self.tb}"


class DistributedTestError(RuntimeError):
    """A child process failed in a way that cannot be re-raised as its original exception."""


def _child(
    rank: int,
    world_size: int,
    init_file: str,
    timeout: float,
    fn: Callable[..., Any],
    args: Sequence[Any],
    results: Any,
) -> None:
    # Runs in the spawned process.
    import torch.distributed as dist

    torch.set_num_threads(1)
    status: tuple
    try:
        dist.init_process_group(
            backend="gloo",
            init_method="file://" + init_file,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        value = fn(rank, world_size, *args)
        status = (rank, "ok", pickle.dumps(value))
    except BaseException as exc:
        failed_at = time.time()
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(exc)
            pickle.loads(payload)  # some exceptions pickle but do not unpickle
        except Exception:
            payload = None
        status = (rank, "error", (payload, tb, f"{type(exc).__name__}: {exc}", failed_at))
        # Report before tearing the group down: the teardown makes the other ranks fail too, and their
        # secondary errors must not overtake this one.
        results.put(status)
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    if status[1] == "ok":
        results.put(status)


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout: float = 120,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes and return their results.

    Args:
        fn: a module-level (picklable) function.
        world_size: number of processes (>= 1).
        args: extra positional arguments, picklable.
        timeout: seconds to wait for all ranks before terminating them and raising ``TimeoutError``.

    Returns:
        ``[result_of_rank_0, result_of_rank_1, ...]``.

    Raises:
        The exception of the rank that failed first (the root cause: the other ranks usually fail in
        turn), with the child traceback as ``__cause__``;
        :class:`DistributedTestError` if a child died without reporting or its exception is not
        picklable, ``TimeoutError`` on timeout.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    ctx = mp.get_context("spawn")
    tmpdir = tempfile.mkdtemp(prefix="pycoe_dist_")
    init_file = os.path.join(tmpdir, "rendezvous")
    results = ctx.Queue()
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_child,
                args=(rank, world_size, init_file, float(timeout), fn, tuple(args), results),
                daemon=True,
            )
            p.start()
            procs.append(p)

        collected: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _stop(procs)
                missing = sorted(set(range(world_size)) - set(collected))
                raise TimeoutError(f"run_distributed: ranks {missing} did not finish within {timeout} s")
            try:
                rank, kind, payload = results.get(timeout=min(remaining, 0.5))
            except queue_module.Empty:
                # A child that died without reporting (e.g. a crash) would otherwise stall until timeout.
                for r, p in enumerate(procs):
                    if r not in collected and not p.is_alive() and p.exitcode not in (None, 0):
                        # Give the queue a moment in case the report is in flight.
                        try:
                            rank, kind, payload = results.get(timeout=1.0)
                            break
                        except queue_module.Empty:
                            _stop(procs)
                            raise DistributedTestError(
                                f"run_distributed: rank {r} exited with code {p.exitcode} without reporting a result"
                            ) from None
                else:
                    continue
            if kind == "error":
                # A failing rank makes the others fail too (connection resets, timeouts): collect what
                # arrives shortly after and raise the error that happened first, the root cause.
                errors = [(payload[3], rank, payload)]
                grace = time.monotonic() + 3.0
                while len(collected) + len(errors) < world_size and time.monotonic() < grace:
                    try:
                        r2, kind2, payload2 = results.get(timeout=max(0.05, grace - time.monotonic()))
                    except queue_module.Empty:
                        break
                    if kind2 == "error":
                        errors.append((payload2[3], r2, payload2))
                    else:
                        collected[r2] = None
                _stop(procs)
                _, rank, payload = min(errors, key=lambda e: (e[0], e[1]))
                exc_payload, tb, summary, _ = payload
                remote = RemoteTraceback(tb)
                if exc_payload is not None:
                    exc = pickle.loads(exc_payload)
                    if hasattr(exc, "add_note"):
                        exc.add_note(f"(raised in rank {rank} of {world_size} under run_distributed)")
                    raise exc from remote
                raise DistributedTestError(
                    f"rank {rank} of {world_size} raised an unpicklable exception: {summary}"
                ) from remote
            collected[rank] = pickle.loads(payload)

        for p in procs:
            p.join(timeout=10)
        return [collected[r] for r in range(world_size)]
    finally:
        _stop(procs)
        results.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
