"""Self-test of tests/_distributed.py (the gloo multi-process harness other tests rely on)."""

import os
import time

import pytest
import torch
import torch.distributed as dist
from _distributed import DistributedTestError, RemoteTraceback, run_distributed

pytestmark = pytest.mark.distributed


def _all_reduce_ranks(rank, world_size, offset):
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item(), "eye": torch.eye(2) * rank}


def _fail_in_rank_1(rank, world_size):
    if rank == 1:
        raise KeyError("boom from rank one")
    dist.barrier()  # rank 0 blocks here: the harness must stop it rather than hang
    return rank


def _die_without_report(rank, world_size):
    os._exit(3)


def _sleep_forever(rank, world_size):
    time.sleep(1000)


def test_all_reduce_and_results_in_rank_order():
    out = run_distributed(_all_reduce_ranks, world_size=2, args=(10,), timeout=120)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["world"] == 2 for o in out)
    assert all(o["sum"] == 10.0 + 11.0 for o in out)
    assert torch.equal(out[1]["eye"], torch.eye(2))


def test_exception_in_rank_1_surfaces_in_parent_with_traceback():
    start = time.monotonic()
    with pytest.raises(KeyError, match="boom from rank one") as info:
        run_distributed(_fail_in_rank_1, world_size=2, timeout=120)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "_fail_in_rank_1" in cause.tb and "KeyError" in cause.tb
    assert any("rank 1" in note for note in getattr(info.value, "__notes__", ["rank 1"]))
    # The blocked rank 0 was stopped, not waited on until the 120 s timeout.
    assert time.monotonic() - start < 100


def test_child_crash_and_timeout_do_not_hang():
    with pytest.raises(DistributedTestError, match="exited with code 3"):
        run_distributed(_die_without_report, world_size=1, timeout=120)
    with pytest.raises(TimeoutError, match="did not finish"):
        run_distributed(_sleep_forever, world_size=1, timeout=3)


@pytest.mark.parametrize("bad", [{"world_size": 0}, {"world_size": 1.5}, {"timeout": 0}, {"timeout": -1}])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        run_distributed(_all_reduce_ranks, **bad)
