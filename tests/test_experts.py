"""ExpertPool: construction, dense and routed paths against per-expert / per-sample references."""

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


def test_state_dict_keys_and_roundtrip():
    pool = ExpertPool.from_template(mlp(), 2)
    pool(torch.randn(3, 6))
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


def test_dense_training_step_updates_each_experts_own_batchnorm_statistics():
    pool = ExpertPool.from_template(bn_cnn(), 3, init="reinit").train()
    copies = [copy.deepcopy(e) for e in pool]
    x = torch.randn(6, 3, 5, 5)
    for step in range(2):
        out = pool(x + step)
        torch.testing.assert_close(out, torch.stack([e(x + step) for e in copies]), rtol=0, atol=0)
    for e, ref in zip(pool, copies):
        for b, b_ref in zip(e.buffers(), ref.buffers()):
            assert torch.equal(b, b_ref)
        assert int(e[1].num_batches_tracked) == 2


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


def test_bad_routed_input():
    pool = ExpertPool.from_template(mlp(), 3)
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pool.forward_routed(torch.tensor([0, 1, 3, 0]), x)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pool.forward_routed(torch.tensor([0, -1, 2, 0]), x)
    with pytest.raises(TypeError, match="integer"):
        pool.forward_routed(torch.zeros(4), x)
    with pytest.raises(ValueError, match="index must have 1 dimensions"):
        pool.forward_routed(torch.zeros(4, 1, dtype=torch.long), x)
    with pytest.raises(ValueError, match="batch size 4"):
        pool.forward_routed(torch.zeros(5, dtype=torch.long), x)
    with pytest.raises(TypeError, match="index"):
        pool.forward_routed([0, 1, 2, 0], x)
    with pytest.raises(TypeError, match="forward_routed needs a batch.*got no input"):
        pool.forward_routed(torch.zeros(4, dtype=torch.long))


def test_bad_expert_outputs():
    class NoneOut(nn.Module):
        def forward(self, x):
            return None

    with pytest.raises(TypeError, match=r"expert 0 \(NoneOut\): the output is a NoneType, not a tensor"):
        ExpertPool([NoneOut(), NoneOut()])(torch.randn(2, 3))
    pool = ExpertPool([nn.Linear(3, 4), nn.Linear(3, 5)])
    with pytest.raises(ValueError, match="same shape"):
        pool(torch.randn(2, 3))
    with pytest.raises(ValueError, match="per-sample shapes"):
        pool.forward_routed(torch.tensor([0, 1]), torch.randn(2, 3))


def test_dtype_diagnosis_names_the_expert_and_only_fires_for_a_real_mismatch():
    x = torch.randn(4, 6)
    with pytest.raises(TypeError, match=r"experts\[1\] \(Sequential\) got an input of dtype torch.float32, but its"):
        ExpertPool([mlp(), mlp().double()])(x)

    class Converts(nn.Module):  # converts its input itself: never refused up front
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 4).double()

        def forward(self, x):
            return self.lin(x.double()).float()

    assert ExpertPool([Converts(), Converts()])(x).shape == (2, 4, 4)

    class Tokens(nn.Module):  # integer inputs are normal here; a shape error must stay the model's own error
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lin = nn.Linear(3, 4)

        def forward(self, tokens):
            return self.lin(self.emb(tokens).mean(1))

    tokens = torch.randint(0, 10, (4, 5))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        ExpertPool([Tokens()])(tokens)
    assert not isinstance(info.value, TypeError)
