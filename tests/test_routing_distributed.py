"""Global-scope WGM and pycoe.distributed under torch.distributed (gloo, 2 CPU processes, unequal batches).

All multi-process checks share one spawned run (process start-up costs seconds).
"""

import pytest
import torch
import torch.nn.functional as F
from _distributed import run_distributed

from pycoe import distributed as pdist
from pycoe.routing.transport import balanced_assignment
from pycoe.routing.weighting import BalancedTransportWeighter

K = 3
# Per-rank batch sizes for the scenarios of the spawned run: unequal, and one with an empty rank.
SCENARIOS = [(5, 9), (0, 7)]
SEED = 1234


def _global_logits(total, seed):
    return torch.randn(total, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def _routing_worker(rank, world_size, scenarios, seed):
    results = {}
    # all_gather_variable on integer tensors with trailing dims: rank r contributes r + 1 rows of value r.
    local = torch.full((rank + 1, 2, 2), rank, dtype=torch.long)
    gathered = pdist.all_gather_variable(local)
    results["gather"] = (gathered.tensor, gathered.local, gathered.sizes)
    results["is_distributed"] = (pdist.is_distributed(), pdist.get_rank(), pdist.get_world_size())
    reduced = {}
    for op in ("sum", "min", "max"):
        t = torch.tensor([rank + 1.0, 10.0 - rank])
        assert pdist.all_reduce(t, op=op) is t  # in place
        reduced[op] = t
    results["all_reduce"] = reduced

    for si, sizes in enumerate(scenarios):
        z = _global_logits(sum(sizes), seed + si)
        start = sum(sizes[:rank])
        mine = z[start : start + sizes[rank]].clone().requires_grad_(True)
        out = BalancedTransportWeighter(K, epsilon=0.1, scope="global")(mine)
        results[("global", si)] = {
            "assignment": out.assignment,
            "weights": out.weights,
            "load": out.load,
            "mean_score": out.mean_score,
            "requires_grad": out.weights.requires_grad,
        }
        if sizes[rank] > 0:
            local_out = BalancedTransportWeighter(K, scope="batch")(mine)
            results[("batch", si)] = {"assignment": local_out.assignment, "load": local_out.load}

    # Failures must raise on every rank rather than leave one waiting in a collective.
    z = torch.randn(4, K)
    if rank == 1:
        z[2, 1] = float("nan")
    try:
        BalancedTransportWeighter(K, scope="global")(z)
        results["nan"] = None
    except ValueError as err:
        results["nan"] = str(err)

    import pycoe.routing.weighting as weighting

    original = weighting.balanced_assignment
    if rank == 0:

        def broken(*args, **kwargs):
            raise ArithmeticError("solver exploded")

        weighting.balanced_assignment = broken
    try:
        BalancedTransportWeighter(K, scope="global")(torch.randn(3, K))
        results["solver_failure"] = None
    except Exception as err:
        results["solver_failure"] = (type(err).__name__, str(err))
    finally:
        weighting.balanced_assignment = original
    return results


@pytest.mark.distributed
def test_global_scope_on_two_gloo_ranks_with_unequal_batches():
    res = run_distributed(_routing_worker, world_size=2, args=(SCENARIOS, SEED), timeout=120)

    # pycoe.distributed primitives
    for rank in range(2):
        assert res[rank]["is_distributed"] == (True, rank, 2)
        tensor, local, sizes = res[rank]["gather"]
        assert sizes == [1, 2]
        assert torch.equal(tensor, torch.tensor([0, 1, 1]).view(3, 1, 1).expand(3, 2, 2))
        assert local == (slice(0, 1) if rank == 0 else slice(1, 3))
        reduced = res[rank]["all_reduce"]
        assert reduced["sum"].tolist() == [3.0, 19.0]
        assert reduced["min"].tolist() == [1.0, 9.0]
        assert reduced["max"].tolist() == [2.0, 10.0]

    # NaN on rank 1 only: both ranks raise, each saying where it was.
    assert "NaN" in res[0]["nan"] and "on another rank" in res[0]["nan"]
    assert "NaN" in res[1]["nan"] and "on this rank" in res[1]["nan"]
    # rank 0's solve fails: rank 0 re-raises it, rank 1 gets a RuntimeError instead of hanging
    assert res[0]["solver_failure"] == ("ArithmeticError", "solver exploded")
    assert res[1]["solver_failure"][0] == "RuntimeError" and "rank 0" in res[1]["solver_failure"][1]

    for si, sizes in enumerate(SCENARIOS):
        z = _global_logits(sum(sizes), SEED + si)
        scores = F.log_softmax(z, dim=1)
        reference = balanced_assignment(scores)  # single-process solve of the concatenated batch
        r0, r1 = res[0][("global", si)], res[1][("global", si)]
        # identical global result on both ranks, equal to the single-process solve
        assert torch.equal(r0["load"], r1["load"])
        assert torch.equal(r0["mean_score"], r1["mean_score"])
        assert torch.equal(torch.cat([r0["assignment"], r1["assignment"]]), reference)
        assert r0["load"].tolist() == torch.bincount(reference, minlength=K).tolist()
        assert r0["mean_score"].item() == pytest.approx(scores[torch.arange(len(z)), reference].mean().item())
        # each rank holds its own slice, with matching weights
        for rank, r in enumerate((r0, r1)):
            start = sum(sizes[:rank])
            expected = reference[start : start + sizes[rank]]
            assert torch.equal(r["assignment"], expected)
            w = torch.full((sizes[rank], K), 0.1, dtype=torch.float64)
            w[torch.arange(sizes[rank]), expected] = 1.0
            assert torch.equal(r["weights"], w)
            assert r["requires_grad"] is False
            # scope "batch" under distributed solves only the local batch
            if sizes[rank] > 0:
                local_ref = balanced_assignment(scores[start : start + sizes[rank]])
                assert torch.equal(res[rank][("batch", si)]["assignment"], local_ref)
                assert res[rank][("batch", si)]["load"].sum().item() == sizes[rank]


def test_distributed_helpers_are_no_ops_without_a_process_group():
    assert not pdist.is_distributed()
    assert pdist.get_rank() == 0 and pdist.get_world_size() == 1
    x = torch.arange(6).view(3, 2)
    out = pdist.all_gather_variable(x)
    assert out.tensor is x and out.local == slice(0, 3) and out.sizes == [3]
    _t, _local, _sizes = out  # a plain tuple too
    assert pdist.broadcast(x) is x
    y = torch.tensor([1.0, 2.0])
    assert pdist.all_reduce(y, op="max") is y and y.tolist() == [1.0, 2.0]


def test_distributed_helpers_bad_input():
    with pytest.raises(TypeError, match="tensor"):
        pdist.all_gather_variable([1, 2])
    with pytest.raises(ValueError, match="at least 1 dimension"):
        pdist.all_gather_variable(torch.tensor(1.0))
    with pytest.raises(TypeError, match="tensor"):
        pdist.broadcast(3)
    with pytest.raises(TypeError, match="tensor"):
        pdist.all_reduce([1.0])
    with pytest.raises(ValueError, match="op must be one of"):
        pdist.all_reduce(torch.ones(2), op="mean")
    with pytest.raises(TypeError, match=r"op must be one of .* \(a str\), got NoneType"):
        pdist.all_reduce(torch.ones(2), op=None)


def test_global_scope_rejects_empty_single_process_batch():
    with pytest.raises(ValueError, match="at least one sample"):
        BalancedTransportWeighter(K, scope="global")(torch.zeros(0, K))
