"""realign_pwlu under torch.distributed: every rank realigns from the same pooled statistics."""

import torch
from _distributed import run_distributed

from pycoe import PWLU, realign_pwlu


def _model() -> torch.nn.Sequential:
    return torch.nn.Sequential(PWLU(), PWLU(granularity="channel", num_channels=3))


def _feed(model: torch.nn.Module, rank: int) -> None:
    g = torch.Generator().manual_seed(100 + rank)
    model.train()
    for _ in range(3):
        # each rank sees differently distributed data
        model(torch.randn(16, 3, 4, 4, generator=g) * (1 + rank) + 2 * rank)


def _worker(rank: int, world_size: int) -> dict:
    model = _model()
    _feed(model, rank)
    local = _tensors(model)
    realign_pwlu(model)
    return {"local": local, "after": _tensors(model)}


def _tensors(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _unfed_worker(rank: int, world_size: int) -> str:
    model = _model()
    if rank == 0:
        _feed(model, rank)
    try:
        realign_pwlu(model)
    except RuntimeError as err:
        return str(err)
    return "no error"


def test_realign_pools_statistics_across_ranks():
    res = run_distributed(_worker, world_size=2, timeout=120)
    after0, after1 = res[0]["after"], res[1]["after"]
    for key in after0:
        torch.testing.assert_close(after0[key], after1[key], rtol=0, atol=0)
    # the expected result: a single-process model holding the pooled statistics, realigned locally
    expected = _model()
    state = expected.state_dict()
    for i in ("0", "1"):
        means = torch.stack([res[r]["local"][f"{i}.running_mean"].double() for r in (0, 1)])
        vars_ = torch.stack([res[r]["local"][f"{i}.running_var"].double() for r in (0, 1)])
        pooled_mean = means.mean(0)
        pooled_var = (vars_ + means**2).mean(0) - pooled_mean**2
        state[f"{i}.running_mean"] = pooled_mean.float()
        state[f"{i}.running_var"] = pooled_var.float()
        state[f"{i}.num_batches_tracked"] = res[0]["local"][f"{i}.num_batches_tracked"]
    expected.load_state_dict(state)
    realign_pwlu(expected)
    for key, value in _tensors(expected).items():
        torch.testing.assert_close(after0[key], value)
    # and it differs from what rank 1 would have done alone (the pooling matters)
    alone = _model()
    alone.load_state_dict(res[1]["local"], strict=False)
    realign_pwlu(alone)
    assert not torch.allclose(alone.state_dict()["0.left_bound"], after1["0.left_bound"])


def test_realign_raises_on_every_rank_when_one_rank_has_no_statistics():
    res = run_distributed(_unfed_worker, world_size=2, timeout=120)
    assert all("no statistics" in r and "every rank" in r for r in res)
