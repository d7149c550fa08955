"""CoE under DistributedDataParallel (2 gloo ranks): gradients equal one process on the concatenated batch.

With the weighter's global scope, CoELoss normalises by global sums and scales the loss by the world size, so
DDP's gradient averaging gives exactly the single-process gradient, even for uneven per-rank batch sizes. An
expert that receives no sample still takes part in the graph (every expert runs on the whole batch), so DDP
needs no ``find_unused_parameters``.
"""

import pytest
import torch
import torch.distributed as dist
from _distributed import run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pycoe.coe.experts import ExpertPool
from pycoe.coe.loss import CoELoss
from pycoe.coe.model import CoE
from pycoe.routing.labels import LabelGenerator
from pycoe.routing.weighting import BalancedTransportWeighter
from pycoe.twostage.delegator import Delegator

pytestmark = pytest.mark.distributed

K, C = 3, 4
SPLIT = (5, 7)  # uneven per-rank batch sizes of the global batch of 12


class TinyCNN(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, out)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def build():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    delegator = Delegator(backbone, K, num_classes=C, feature_dim=6, classifier=None, zero_init_selection=False)
    experts = ExpertPool.from_template(TinyCNN(C), K, init="reinit")
    return CoE(delegator, experts)


def data(n=None, seed=1):
    n = sum(SPLIT) if n is None else n
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g), torch.randint(0, C, (n,), generator=g)


def criterion(epsilon):
    return CoELoss(BalancedTransportWeighter(K, epsilon=epsilon, scope="global"), LabelGenerator(), balance_weight=0.0)


def one_step(model, x, y, epsilon, wrap=None):
    net = model if wrap is None else wrap(model)
    loss, info = criterion(epsilon)(net(x), y)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, info


def _rank_fn(rank, world_size):
    starts = [0, SPLIT[0]]
    x, y = data()
    sl = slice(starts[rank], starts[rank] + SPLIT[rank])
    results = {}
    for epsilon in (0.0, 0.1):
        model = build().train()
        grads, info = one_step(model, x[sl], y[sl], epsilon, wrap=lambda m: DDP(m))
        results[epsilon] = {"grads": grads, "wgm_load": info["wgm_load"], "loss": info["loss"]}

    # An expert with no sample (global batch 2 < K = 3, epsilon = 0) for two DDP steps: DDP would raise at the
    # second step if a parameter had not taken part in the first one's reduction.
    model = build().train()
    ddp = DDP(model)  # find_unused_parameters=False (the default)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = data(n=2, seed=2)
    empty_grads = []
    for _step in range(2):
        opt.zero_grad()
        loss, info = criterion(0.0)(ddp(xs[rank : rank + 1]), ys[rank : rank + 1])
        loss.backward()
        empty = (info["wgm_load"] == 0).nonzero().flatten().tolist()
        empty_grads.append(
            {
                k: [model.experts[k].conv.weight.grad is not None, float(model.experts[k].conv.weight.grad.abs().sum())]
                for k in empty
            }
        )
        opt.step()
    dist.barrier()
    results["empty"] = {"grads": empty_grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}

    # A rank with a batch of 0 samples: it still takes part in every collective (the weighter's gather, the
    # normalisers' all_reduce, DDP's gradient averaging) and contributes nothing.
    xz, yz = data(n=5, seed=3)
    mine = slice(0, 5) if rank == 0 else slice(0, 0)
    grads, info = one_step(build().train(), xz[mine], yz[mine], 0.1, wrap=lambda m: DDP(m))
    results["zero_rank"] = {"grads": grads, "loss": info["loss"], "wgm_load": info["wgm_load"]}
    return results


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_rank_fn, world_size=2, timeout=180)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_ddp_gradients_equal_single_process_on_the_global_batch(ranks, epsilon):
    x, y = data()
    single_grads, single_info = one_step(build().train(), x, y, epsilon)
    r0, r1 = ranks[0][epsilon], ranks[1][epsilon]
    assert r0["wgm_load"].tolist() == r1["wgm_load"].tolist() == single_info["wgm_load"].tolist()
    for name, g in single_grads.items():
        torch.testing.assert_close(r0["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(r1["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)
    # the per-rank losses are world_size x their share: their mean is the single-process loss
    assert float(r0["loss"] + r1["loss"]) / 2 == pytest.approx(float(single_info["loss"]), rel=1e-5)


def test_ddp_expert_without_samples_needs_no_find_unused_parameters(ranks):
    e0, e1 = ranks[0]["empty"], ranks[1]["empty"]
    for step in range(2):
        assert e0["grads"][step], "the scenario must leave one expert without any sample"
        for _k, (has_grad, total) in e0["grads"][step].items():
            assert has_grad and total == 0.0
    for name, p in e0["params"].items():  # both ranks stayed in sync through the two steps
        torch.testing.assert_close(p, e1["params"][name], msg=name)


def test_a_rank_with_zero_samples_contributes_nothing(ranks):
    xz, yz = data(n=5, seed=3)
    single_grads, single_info = one_step(build().train(), xz, yz, 0.1)
    r0, r1 = ranks[0]["zero_rank"], ranks[1]["zero_rank"]
    assert r0["wgm_load"].tolist() == r1["wgm_load"].tolist() == single_info["wgm_load"].tolist()
    assert r1["loss"] == 0.0
    for name, g in single_grads.items():
        torch.testing.assert_close(r0["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(r1["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)
