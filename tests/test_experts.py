"""ExpertPool: construction, dense and routed paths against per-expert / per-sample references, fused path."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from pycoe.coe.experts import ExpertPool


def mlp(d_in=6, d_out=4, hidden=8):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def bn_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


class PairExpert(nn.Module):
    """Two inputs (like a translation expert taking source and target prefix) and a keyword scale."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(5, 4)

    def forward(self, x, y, scale=None):
        out = self.a(x) + self.b(y)
        return out if scale is None else out * scale


class NoReset(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.full((3,), 7.0))
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) + self.p


# ---------------------------------------------------------------- construction
def test_from_template_copy_is_deep_and_identical():
    template = mlp()
    pool = ExpertPool.from_template(template, num_experts=3)
    assert len(pool) == pool.num_experts == 3
    for e in pool:
        assert e is not template
        for p, q in zip(e.parameters(), template.parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    with torch.no_grad():
        pool[0][0].weight.add_(1.0)
    assert not torch.equal(pool[0][0].weight, pool[1][0].weight)
    assert not torch.equal(pool[0][0].weight, template[0].weight)


def test_from_template_reinit_calls_reset_parameters_only_where_defined():
    template = NoReset()
    pool = ExpertPool.from_template(template, num_experts=2, init="reinit")
    assert not torch.equal(pool[0].lin.weight, template.lin.weight)
    assert not torch.equal(pool[0].lin.weight, pool[1].lin.weight)
    for e in pool:  # no reset_parameters on NoReset itself: its own parameter keeps the template's value
        assert torch.equal(e.p, template.p)


def test_state_dict_keys_and_roundtrip_after_fused_call():
    pool = ExpertPool.from_template(mlp(), 2, fused=True)
    pool(torch.randn(3, 6))  # builds the fused template cache, which must not become a submodule
    keys = list(pool.state_dict())
    assert keys[0] == "experts.0.0.weight" and all(k.startswith("experts.") for k in keys)
    other = ExpertPool.from_template(mlp(), 2, init="reinit")
    other.load_state_dict(pool.state_dict())
    x = torch.randn(4, 6)
    torch.testing.assert_close(other(x), pool(x))


# ---------------------------------------------------------------- dense path
def test_forward_stacks_every_expert_heterogeneous():
    experts = [nn.Linear(6, 4), mlp(6, 4), mlp(6, 4, hidden=3)]
    pool = ExpertPool(experts)
    x = torch.randn(5, 6)
    out = pool(x)
    assert out.shape == (3, 5, 4)
    for k, e in enumerate(experts):
        torch.testing.assert_close(out[k], e(x), rtol=0, atol=0)


def test_forward_multiple_inputs_and_kwargs():
    pool = ExpertPool.from_template(PairExpert(), 2, init="reinit")
    x, y = torch.randn(4, 3), torch.randn(4, 5)
    out = pool(x, y, scale=2.0)
    for k in range(2):
        torch.testing.assert_close(out[k], pool[k](x, y) * 2.0)


# ---------------------------------------------------------------- routed path
def _loop_routed(pool, index, *inputs):
    rows = [pool[int(k)](*(v[i : i + 1] for v in inputs)) for i, k in enumerate(index)]
    return torch.cat(rows)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_forward_routed_matches_per_sample_loop(k):
    pool = ExpertPool.from_template(mlp(), k, init="reinit")
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(9, 6, generator=g)
        index = torch.randint(0, k, (9,), generator=g)
        torch.testing.assert_close(pool.forward_routed(index, x), _loop_routed(pool, index, x))


_POOLS = {k: ExpertPool.from_template(mlp(), k, init="reinit") for k in (1, 2, 3, 5)}


@given(
    k=st.sampled_from(sorted(_POOLS)),
    data=st.data(),
)
def test_forward_routed_property_any_routing_equals_loop(k, data):
    b = data.draw(st.integers(1, 12), label="B")
    index = torch.tensor(data.draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b), label="index"))
    x = torch.randn(b, 6, generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        torch.testing.assert_close(_POOLS[k].forward_routed(index, x), _loop_routed(_POOLS[k], index, x))


def test_forward_routed_empty_experts_are_not_called():
    pool = ExpertPool.from_template(mlp(), 4, init="reinit")
    calls = []
    for k, e in enumerate(pool):
        e.register_forward_hook(lambda m, i, o, k=k: calls.append((k, i[0].shape[0])))
    x = torch.randn(6, 6)
    index = torch.tensor([3, 1, 3, 3, 1, 1])
    out = pool.forward_routed(index, x)
    assert sorted(calls) == [(1, 3), (3, 3)]
    torch.testing.assert_close(out, _loop_routed(pool, index, x))
    calls.clear()
    out = pool.forward_routed(torch.full((6,), 2), x)  # everyone to one expert: a single call on the whole batch
    assert calls == [(2, 6)]
    torch.testing.assert_close(out, pool[2](x))


def test_forward_routed_several_inputs_and_unbatched_arguments():
    pool = ExpertPool.from_template(PairExpert(), 3, init="reinit")
    x, y = torch.randn(7, 3), torch.randn(7, 5)
    scale = torch.randn(4)  # first dim != B: passed whole to every expert
    index = torch.tensor([2, 0, 2, 1, 0, 0, 2])
    out = pool.forward_routed(index, x, y, scale=scale)
    ref = torch.cat([pool[int(k)](x[i : i + 1], y[i : i + 1], scale=scale) for i, k in enumerate(index)])
    torch.testing.assert_close(out, ref)
    # a keyword tensor batched on dim 0 is split with the samples
    s = torch.randn(7, 1)
    out = pool.forward_routed(index, x, y, scale=s)
    ref = torch.cat([pool[int(k)](x[i : i + 1], y[i : i + 1], scale=s[i : i + 1]) for i, k in enumerate(index)])
    torch.testing.assert_close(out, ref)


def test_forward_routed_backpropagates_to_the_chosen_experts_only():
    pool = ExpertPool.from_template(mlp(), 3, init="reinit")
    x = torch.randn(5, 6, requires_grad=True)
    index = torch.tensor([0, 2, 0, 2, 2])
    pool.forward_routed(index, x).square().sum().backward()
    assert pool[1][0].weight.grad is None
    assert pool[0][0].weight.grad.abs().sum() > 0 and pool[2][0].weight.grad.abs().sum() > 0
    ref_x = x.detach().clone().requires_grad_(True)
    _loop_routed(pool, index, ref_x).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_forward_routed_empty_batch():
    pool = ExpertPool.from_template(mlp(), 2)
    out = pool.forward_routed(torch.zeros(0, dtype=torch.long), torch.randn(0, 6))
    assert out.shape == (0, 4)


# ---------------------------------------------------------------- fused path
@pytest.mark.parametrize("factory,shape", [(mlp, (6, 6)), (bn_cnn, (6, 3, 5, 5))])
@pytest.mark.parametrize("train", [True, False])
def test_fused_equals_loop_outputs_grads_and_buffers(factory, shape, train):
    loop = ExpertPool.from_template(factory(), 3, init="reinit", fused=False)
    fused = copy.deepcopy(loop)
    fused.fused = True
    loop.train(train)
    fused.train(train)
    x = torch.randn(*shape)
    for step in range(2):  # the second step sees the BatchNorm statistics written back by the first
        out_l, out_f = loop(x + step), fused(x + step)
        torch.testing.assert_close(out_f, out_l, rtol=1e-5, atol=1e-6)
        w = torch.randn_like(out_l)
        (out_l * w).sum().backward()
        (out_f * w).sum().backward()
    for (n, p_l), p_f in zip(loop.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_f.grad, p_l.grad, rtol=1e-5, atol=1e-6, msg=n)
    for (n, b_l), b_f in zip(loop.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b_f, b_l, rtol=1e-5, atol=1e-6, msg=n)
    if train and factory is bn_cnn:
        assert int(fused[0][1].num_batches_tracked) == 2


def test_fused_rebuilds_after_a_change_and_rejects_heterogeneous():
    pool = ExpertPool.from_template(mlp(), 2, fused=True)
    x = torch.randn(3, 6)
    pool(x)
    pool[0][1] = nn.Tanh()
    pool[1][1] = nn.Tanh()
    torch.testing.assert_close(pool(x), torch.stack([pool[0](x), pool[1](x)]))
    pool[1][1] = nn.ReLU()
    with pytest.raises(ValueError, match="identical architecture"):
        pool(x)
    hetero = ExpertPool([nn.Conv2d(3, 3, 3, stride=1), nn.Conv2d(3, 3, 3, stride=2)], fused=True)
    with pytest.raises(ValueError, match="identical architecture"):
        hetero(torch.randn(1, 3, 8, 8))
    assert not hetero.is_homogeneous() and pool.is_homogeneous() is False


def test_default_fused_mode_is_auto_and_runs_the_loop():
    pool = ExpertPool.from_template(mlp(), 2)
    assert pool.fused == "auto"
    torch.testing.assert_close(
        pool(torch.ones(1, 6)), torch.stack([pool[0](torch.ones(1, 6)), pool[1](torch.ones(1, 6))])
    )


# ---------------------------------------------------------------- bad input
def test_bad_construction():
    with pytest.raises(ValueError, match="at least one"):
        ExpertPool([])
    with pytest.raises(TypeError, match=r"experts\[1\]"):
        ExpertPool([nn.Linear(2, 2), "expert"])
    with pytest.raises(TypeError, match="sequence of nn.Module"):
        ExpertPool(nn.Linear(2, 2))
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="distinct"):
        ExpertPool([lin, lin])
    with pytest.raises(ValueError, match="num_experts"):
        ExpertPool.from_template(lin, 0)
    with pytest.raises(ValueError, match="init"):
        ExpertPool.from_template(lin, 2, init="random")
    with pytest.raises(TypeError, match="model"):
        ExpertPool.from_template("lin", 2)
    with pytest.raises(ValueError, match="fused"):
        ExpertPool([lin], fused="yes")


def test_bad_routed_input():
    pool = ExpertPool.from_template(mlp(), 3)
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pool.forward_routed(torch.tensor([0, 1, 3, 0]), x)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pool.forward_routed(torch.tensor([0, -1, 2, 0]), x)
    with pytest.raises(TypeError, match="integer"):
        pool.forward_routed(torch.zeros(4), x)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        pool.forward_routed(torch.zeros(4, 1, dtype=torch.long), x)
    with pytest.raises(ValueError, match="batch size 4"):
        pool.forward_routed(torch.zeros(5, dtype=torch.long), x)
    with pytest.raises(TypeError, match="index"):
        pool.forward_routed([0, 1, 2, 0], x)
    with pytest.raises(TypeError, match="positional tensor"):
        pool.forward_routed(torch.zeros(4, dtype=torch.long))


def test_bad_expert_outputs():
    class TupleOut(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="single tensor"):
        ExpertPool([TupleOut(), TupleOut()])(torch.randn(2, 3))
    pool = ExpertPool([nn.Linear(3, 4), nn.Linear(3, 5)])
    with pytest.raises(ValueError, match="same shape"):
        pool(torch.randn(2, 3))
    with pytest.raises(ValueError, match="per-sample shapes"):
        pool.forward_routed(torch.tensor([0, 1]), torch.randn(2, 3))
