"""Tests of pycoe.functional.mixture (mixture_conv2d) and pycoe.layers.condconv (CondConv2d, its router, conversion)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pycoe.functional.mixture import (
    choose_mixture_strategy,
    mixture_conv2d,
    mixture_conv2d_reference,
    mixture_costs,
)
from pycoe.layers.condconv import CondConv2d, CondConvRouter, convert_conv2d_to_condconv

STRATEGIES = ("weight", "output", "bmm", "loop", "auto")
EXPLICIT = STRATEGIES[:-1]


def _inputs(batch, channels, out_channels, kernel, groups, experts, size=(7, 6), bias=True, dtype=torch.float64):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(batch, channels, *size, dtype=dtype, requires_grad=True)
    bank = torch.randn(experts, out_channels, channels // groups, kh, kw, dtype=dtype, requires_grad=True)
    coef = torch.rand(batch, experts, dtype=dtype, requires_grad=True)
    bias_bank = torch.randn(experts, out_channels, dtype=dtype, requires_grad=True) if bias else None
    return x, bank, coef, bias_bank


def _grads(out, tensors, upstream):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(out, tensors, upstream)


# (batch, C, O, kernel, stride, padding, dilation, groups, bias, size)
CASES = [
    (1, 4, 6, 3, 1, 0, 1, 1, True, (7, 6)),
    (3, 4, 6, 3, 1, 1, 1, 1, True, (7, 6)),
    (3, 4, 6, 3, 2, 1, 1, 1, False, (7, 6)),
    (2, 4, 4, 1, 1, 0, 1, 1, True, (5, 5)),
    (3, 4, 6, 1, 2, 1, 1, 2, True, (7, 6)),  # 1x1, strided, padded, grouped (bmm's no-im2col path)
    (1, 4, 6, 3, 1, "same", 1, 2, True, (7, 6)),  # batch 1 (the single-convolution path), grouped "same"
    (2, 4, 6, (3, 2), (2, 1), (1, 0), 1, 2, True, (8, 7)),
    (3, 6, 6, 3, 1, 2, 2, 6, True, (7, 7)),  # depthwise, dilated
    (1, 6, 6, 3, 2, 1, 1, 6, False, (8, 8)),  # depthwise, strided, batch 1
    (2, 4, 6, 3, 1, "same", 1, 2, True, (7, 6)),
    (2, 4, 6, 4, 1, "same", 1, 1, True, (7, 6)),  # even kernel: asymmetric "same"
    (3, 4, 6, 3, 2, "same", 1, 1, True, (8, 7)),  # strided "same" (TensorFlow rule)
    (2, 6, 6, 3, 2, "same", 2, 6, True, (9, 8)),  # strided, dilated, depthwise "same"
    (2, 4, 6, 3, 1, "valid", 1, 1, False, (7, 6)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_match_reference_forward_and_backward(case, strategy):
    batch, c, o, k, stride, padding, dilation, groups, bias, size = case
    x, bank, coef, bias_bank = _inputs(batch, c, o, k, groups, experts=3, size=size, bias=bias)
    args = (stride, padding, dilation, groups)
    ref = mixture_conv2d_reference(x, bank, coef, bias_bank, *args)
    out = mixture_conv2d(x, bank, coef, bias_bank, *args, strategy=strategy)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(ref)
    for g_out, g_ref in zip(
        _grads(out, (x, bank, coef, bias_bank), upstream), _grads(ref, (x, bank, coef, bias_bank), upstream)
    ):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float32_matches_reference(strategy):
    x, bank, coef, bias_bank = _inputs(4, 8, 8, 3, 2, experts=4, size=(9, 9), dtype=torch.float32)
    ref = mixture_conv2d_reference(x, bank, coef, bias_bank, 1, 1, 1, 2)
    out = mixture_conv2d(x, bank, coef, bias_bank, 1, 1, 1, 2, strategy=strategy)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(ref)
    for a, b in zip(
        _grads(out, (x, bank, coef, bias_bank), upstream), _grads(ref, (x, bank, coef, bias_bank), upstream)
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@settings(max_examples=20)
@given(
    batch=st.integers(1, 3),
    cpg=st.integers(1, 3),
    groups=st.integers(1, 3),
    opg=st.integers(1, 2),
    experts=st.integers(1, 4),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.one_of(st.sampled_from(["same", "valid"]), st.tuples(st.integers(0, 2), st.integers(0, 2))),
    bias=st.booleans(),
    channels_last=st.booleans(),
    strategy=st.sampled_from(STRATEGIES),
)
def test_random_configurations_match_reference(
    batch, cpg, groups, opg, experts, kh, kw, stride, dilation, padding, bias, channels_last, strategy
):
    c, o = cpg * groups, opg * groups
    x, bank, coef, bias_bank = _inputs(batch, c, o, (kh, kw), groups, experts, size=(7, 8), bias=bias)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    args = (stride, padding, dilation, groups)
    ref = mixture_conv2d_reference(x, bank, coef, bias_bank, *args)
    out = mixture_conv2d(x, bank, coef, bias_bank, *args, strategy=strategy)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(ref)
    for a, b in zip(
        _grads(out, (x, bank, coef, bias_bank), upstream), _grads(ref, (x, bank, coef, bias_bank), upstream)
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("strategy", EXPLICIT)
@pytest.mark.parametrize(
    "config",
    [(2, 3, 1, 1, 1), (2, 3, 2, "same", 2), (2, 1, 2, 1, 2), (1, 3, 1, 1, 1)],
    ids=["plain", "strided-same-grouped", "1x1-strided-padded-grouped", "batch1"],
)
def test_gradcheck_float64(strategy, config):
    batch, kernel, stride, padding, groups = config
    x, bank, coef, bias_bank = _inputs(batch, 2, 2, kernel, groups, experts=2, size=(4, 3))

    def fn(x, bank, coef, bias_bank):
        return mixture_conv2d(x, bank, coef, bias_bank, stride, padding, 1, groups, strategy=strategy)

    assert torch.autograd.gradcheck(fn, (x, bank, coef, bias_bank))


def test_same_padding_conventions():
    x, bank, coef, _ = _inputs(2, 3, 4, 3, 1, experts=1, size=(8, 8), bias=False)
    coef = torch.ones(2, 1, dtype=x.dtype)
    # stride 1: torch's own padding="same"
    for k in (3, 4):
        kernel = torch.randn(1, 4, 3, k, k, dtype=x.dtype)
        for strategy in EXPLICIT:
            torch.testing.assert_close(
                mixture_conv2d(x, kernel, coef, padding="same", strategy=strategy),
                F.conv2d(x, kernel[0], padding="same"),
            )
    # stride 2, 8 pixels, 3x3: total padding 1, all of it after (TensorFlow rule), output ceil(8/2) = 4
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), bank[0], stride=2)
    for strategy in EXPLICIT:
        out = mixture_conv2d(x, bank, coef, stride=2, padding="same", strategy=strategy)
        assert out.shape[-2:] == (4, 4)
        torch.testing.assert_close(out, expected)
    # stride 3 on 7 pixels: output ceil(7/3) = 3
    assert mixture_conv2d(x[..., :7, :7], bank, coef, stride=3, padding="same").shape[-2:] == (3, 3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_channels_last_input(strategy):
    x, bank, coef, bias_bank = _inputs(3, 8, 8, 3, 1, experts=4, size=(6, 6), dtype=torch.float32)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last)
    out = mixture_conv2d(x_cl, bank, coef, bias_bank, padding=1, strategy=strategy)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, mixture_conv2d(x.detach(), bank, coef, bias_bank, padding=1, strategy=strategy))


def test_single_expert_with_unit_coefficient_is_conv2d():
    x, bank, _, bias_bank = _inputs(3, 4, 6, 3, 2, experts=1)
    coef = torch.ones(3, 1, dtype=x.dtype)
    for strategy in STRATEGIES:
        torch.testing.assert_close(
            mixture_conv2d(x, bank, coef, bias_bank, 2, 1, 1, 2, strategy=strategy),
            F.conv2d(x, bank[0], bias_bank[0], 2, 1, 1, 2),
        )


# ---------------------------------------------------------------------------------------------- cost model
def test_auto_uses_the_cost_model_choice(monkeypatch):
    import pycoe.functional.mixture as mixture

    x, bank, coef, bias_bank = _inputs(2, 4, 4, 3, 1, experts=3)
    seen = []
    for choice in EXPLICIT:
        monkeypatch.setattr(mixture, "choose_mixture_strategy", lambda *a, choice=choice, **k: seen.append(k) or choice)
        mixture._cached_choice.cache_clear()  # auto memoises the choice per shape
        auto = mixture_conv2d(x, bank, coef, bias_bank, padding=1, strategy="auto")
        torch.testing.assert_close(
            auto, mixture_conv2d(x, bank, coef, bias_bank, padding=1, strategy=choice), rtol=0, atol=0
        )
    assert seen[0]["batch"] == 2 and seen[0]["num_experts"] == 3 and seen[0]["out_hw"] == (7, 6)
    assert seen[0]["requires_grad"] is True
    with torch.no_grad():
        mixture_conv2d(x, bank, coef, bias_bank, padding=1, strategy="auto")
    assert seen[-1]["requires_grad"] is False
    mixture._cached_choice.cache_clear()


def test_cost_model_decisions():
    # The regimes the calibration measured (benchmarks/bench_condconv.py): a squeeze-excitation conv on a 1x1
    # map at a large batch -> output mixing; depthwise -> the grouped conv; dense 3x3 -> the per-sample loop
    # (CPU grouped convs with groups=B and many channels per group are slow); dense 1x1 with a backward ->
    # the batched matmul without im2col.
    for grad in (False, True):
        assert choose_mixture_strategy(64, 256, 64, 1, 4, 1, requires_grad=grad) == "output"
        assert choose_mixture_strategy(64, 256, 256, 3, 4, 14, groups=256, requires_grad=grad) == "weight"
        assert choose_mixture_strategy(64, 128, 128, 3, 4, 14, requires_grad=grad) == "loop"
    assert choose_mixture_strategy(64, 32, 64, 1, 4, 56, requires_grad=True) == "bmm"
    # im2col + bmm is never the model's pick for a 3x3 kernel with a backward
    costs = mixture_costs(64, 64, 64, 3, 8, 28, requires_grad=True)
    assert costs["bmm"] > min(costs["weight"], costs["loop"])
    costs = mixture_costs(8, 64, 64, 3, 4, 28)
    assert set(costs) == {"weight", "loop", "bmm", "output"} and all(v > 0 for v in costs.values())
    assert choose_mixture_strategy(8, 64, 64, 3, 4, 28) == min(costs, key=costs.get)


def test_batch_one_is_a_single_convolution_with_the_mixed_kernel(monkeypatch):
    x, bank, coef, bias_bank = _inputs(1, 4, 6, 3, 2, experts=3)
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    for strategy in ("weight", "bmm", "loop", "auto"):
        calls.clear()
        out = mixture_conv2d(x, bank, coef, bias_bank, 1, 1, 1, 2, strategy=strategy)
        assert calls == [(6, 2, 3, 3)]  # one conv, with one [O, C/g, kh, kw] kernel
        mixed = torch.einsum("e,eocij->ocij", coef[0], bank)
        torch.testing.assert_close(out, real(x, mixed, coef[0] @ bias_bank, 1, 1, 1, 2))


# ---------------------------------------------------------------------------------------------- router
def test_router_shapes_and_ranges():
    router = CondConvRouter(8, 5)
    w = router(torch.randn(3, 8, 4, 4))
    assert w.shape == (3, 5) and bool(((w > 0) & (w < 1)).all())
    x = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(router(x), torch.sigmoid(x.mean((2, 3)) @ router.fc.weight.T + router.fc.bias))
    norm = CondConvRouter(8, 5, normalize="sum")
    torch.testing.assert_close(norm(x).sum(1), torch.ones(3))


def test_shared_router_module_gets_gradients_from_both_layers():
    router = CondConvRouter(4, 3)
    a = CondConv2d(4, 4, 3, padding=1, num_experts=3, router=router)
    b = CondConv2d(4, 4, 1, num_experts=3, router=router)
    assert a.router is b.router and "shared" in repr(a)
    x = torch.randn(2, 4, 5, 5)

    def grad_of(loss):
        router.zero_grad()
        loss.backward()
        return router.fc.weight.grad.clone()

    g_a = grad_of(a(x).square().sum())
    g_b = grad_of(b(x).square().sum())
    g_both = grad_of(a(x).square().sum() + b(x).square().sum())
    assert g_a.abs().sum() > 0 and g_b.abs().sum() > 0
    torch.testing.assert_close(g_both, g_a + g_b)
    # the shared parameters appear once
    model = nn.ModuleList([a, b])
    own = a.weight.numel() + b.weight.numel() + a.bias.numel() + b.bias.numel()
    assert sum(p.numel() for p in model.parameters()) == own + 4 * 3 + 3


def test_block_level_routing_weights_feed_two_layers():
    router = CondConvRouter(4, 3)
    expand = CondConv2d(4, 8, 1, num_experts=3, router=False)
    project = CondConv2d(8, 4, 1, num_experts=3, router=False)
    x = torch.randn(2, 4, 5, 5)
    r = router(x)
    project(expand(x, r), r).sum().backward()
    assert router.fc.weight.grad is not None and router.fc.weight.grad.abs().sum() > 0
    assert expand.weight.grad.abs().sum() > 0 and project.weight.grad.abs().sum() > 0


def test_condconv2d_uses_given_weights_or_its_router():
    layer = CondConv2d(4, 6, 3, padding=1, num_experts=3)
    x = torch.randn(2, 4, 5, 5)
    r = torch.rand(2, 3)
    torch.testing.assert_close(layer(x, r), mixture_conv2d_reference(x, layer.weight, r, layer.bias, 1, 1))
    torch.testing.assert_close(layer(x), layer(x, layer.router(x)))
    text = repr(layer)
    for part in ("4, 6", "kernel_size=(3, 3)", "num_experts=3", "router=own", "strategy='auto'"):
        assert part in text
    depthwise = CondConv2d(6, 6, 3, stride=2, padding="same", groups=6, bias=False, num_experts=2)
    y = depthwise(torch.randn(3, 6, 9, 9))
    assert y.shape == (3, 6, 5, 5) and depthwise.weight.shape == (2, 6, 1, 3, 3) and depthwise.bias is None


def test_state_dict_round_trip():
    a, b = CondConv2d(4, 4, 3, num_experts=2), CondConv2d(4, 4, 3, num_experts=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(a(x), b(x))


# ---------------------------------------------------------------------------------------------- initialisation
def test_experts_are_initialised_independently_like_conv2d():
    layer = CondConv2d(64, 64, 3, num_experts=4).requires_grad_(False)
    conv = nn.Conv2d(64, 64, 3)
    bound = 1 / math.sqrt(64 * 9)
    for e in range(4):
        w, b = layer.weight[e], layer.bias[e]
        assert float(w.abs().max()) <= bound and float(b.abs().max()) <= bound
        # U(-bound, bound): std bound / sqrt(3), like nn.Conv2d's kernel
        assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.02 * bound
        assert abs(float(w.std()) - float(conv.weight.detach().std())) < 0.02 * bound
        assert float(w.abs().max()) > 0.99 * bound
        for f in range(e):
            assert not torch.equal(layer.weight[e], layer.weight[f])
            assert not torch.equal(layer.bias[e], layer.bias[f])
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)


# ---------------------------------------------------------------------------------------------- conversion
def _compare_after_conversion(model, normalize):
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    names = convert_conv2d_to_condconv(model, num_experts=4, normalize=normalize)
    with torch.no_grad():
        after = model(x)
    scale = float(before.abs().max())
    assert scale > 0
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * scale)
    return names


@pytest.mark.parametrize("normalize", ["sum", None])
def test_conversion_keeps_resnet18_outputs(normalize):
    model = torchvision.models.resnet18(weights=None)
    num_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    names = _compare_after_conversion(model, normalize)
    assert "conv1" not in names and "layer1.0.conv1" in names and "layer2.0.downsample.0" in names
    assert len(names) == num_convs - 1
    assert isinstance(model.layer1[0].conv1, CondConv2d) and isinstance(model.conv1, nn.Conv2d)


def test_conversion_keeps_mobilenet_v3_small_outputs():
    model = torchvision.models.mobilenet_v3_small(weights=None)
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        feats = model.features(x)
    names = _compare_after_conversion(model, "sum")
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), feats, rtol=0, atol=1e-5 * float(feats.abs().max()))
    depthwise = model.features[1].block[0][0]
    assert isinstance(depthwise, CondConv2d) and depthwise.groups == depthwise.in_channels
    assert "features.0.0" not in names


def test_conversion_predicates_and_symmetry_breaking():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    names = convert_conv2d_to_condconv(model, num_experts=3, predicate=lambda n, m: m.kernel_size == (3, 3))
    assert names == ["0", "2"]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
    assert convert_conv2d_to_condconv(model, num_experts=2, predicate=["1"]) == ["1"]
    # normalize="sum": the random router makes the identical experts receive different gradients
    layer = model[1]
    torch.testing.assert_close(layer.weight[0], layer.weight[1])
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    assert not torch.allclose(layer.weight.grad[0], layer.weight.grad[1])


def test_conversion_without_routers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, groups=2))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    assert convert_conv2d_to_condconv(model, num_experts=3, predicate=["0", "2"], router=False) == ["0", "2"]
    for layer in (model[0], model[2]):
        assert isinstance(layer, CondConv2d) and layer.router is None and "router=none" in repr(layer)
        assert not any("router" in name for name, _ in layer.named_parameters())
    assert torch.equal(model[2].weight[0], model[2].weight[2])  # exact copies, no 2/E scaling
    coef = torch.softmax(torch.randn(2, 3), dim=1)  # any coefficients summing to 1 reproduce the conv
    with torch.no_grad():
        after = model[2](model[1](model[0](x, coef)), coef)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="routing_weights must be given"):
        model(x)


def test_conversion_bad_arguments():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding_mode="reflect"))
    with pytest.raises(ValueError, match="predicate"):
        convert_conv2d_to_condconv(model, predicate=["missing"])
    with pytest.raises(ValueError, match="predicate"):
        convert_conv2d_to_condconv(model, predicate=["1"])
    with pytest.raises(ValueError, match="predicate"):
        convert_conv2d_to_condconv(model, predicate=["2"])  # reflect padding is not supported
    with pytest.raises(TypeError, match="predicate"):
        convert_conv2d_to_condconv(model, predicate=3)
    with pytest.raises(ValueError, match="num_experts"):
        convert_conv2d_to_condconv(model, num_experts=0)
    with pytest.raises(ValueError, match="normalize"):
        convert_conv2d_to_condconv(model, normalize="softmax")
    with pytest.raises(TypeError, match="model"):
        convert_conv2d_to_condconv("resnet")
    with pytest.raises(TypeError, match="router"):
        convert_conv2d_to_condconv(model, router="own")
    with pytest.raises(ValueError, match="normalize=None needs a router"):
        convert_conv2d_to_condconv(model, router=False, normalize=None)


# ---------------------------------------------------------------------------------------------- bad input
def _ok():
    return _inputs(2, 4, 6, 3, 2, experts=3, dtype=torch.float32)


def test_error_wrong_coefficients_shape():
    x, bank, coef, bias_bank = _ok()
    with pytest.raises(ValueError, match="coefficients"):
        mixture_conv2d(x, bank, coef[0], bias_bank, groups=2)
    with pytest.raises(ValueError, match=r"coefficients must have shape \[B, E\]"):
        mixture_conv2d(x, bank, coef[:1], bias_bank, groups=2)


def test_error_expert_count_mismatch():
    x, bank, coef, bias_bank = _ok()
    with pytest.raises(ValueError, match="E = weight_bank.shape"):
        mixture_conv2d(x, bank, coef[:, :2], bias_bank, groups=2)
    with pytest.raises(ValueError, match="bias_bank"):
        mixture_conv2d(x, bank, coef, bias_bank[:2], groups=2)


def test_error_x_not_4d():
    x, bank, coef, bias_bank = _ok()
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        mixture_conv2d(x[0], bank, coef, bias_bank, groups=2)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        CondConv2d(4, 6, 3)(x[0].detach())


def test_error_channels_not_divisible_by_groups():
    x, bank, coef, bias_bank = _ok()
    with pytest.raises(ValueError, match="groups=3"):
        mixture_conv2d(x, bank, coef, bias_bank, groups=3)
    with pytest.raises(ValueError, match="weight_bank must have shape"):
        mixture_conv2d(x, bank, coef, bias_bank, groups=1)
    with pytest.raises(ValueError, match="divisible by groups"):
        CondConv2d(6, 4, 3, groups=4)
    with pytest.raises(ValueError, match="divisible by groups"):
        CondConv2d(4, 6, 3, groups=4)


def test_error_unknown_strategy():
    x, bank, coef, bias_bank = _ok()
    with pytest.raises(ValueError, match="strategy"):
        mixture_conv2d(x, bank, coef, bias_bank, groups=2, strategy="fast")
    with pytest.raises(ValueError, match="strategy"):
        CondConv2d(4, 6, 3, strategy="fast")


def test_error_num_experts_below_one():
    with pytest.raises(ValueError, match="num_experts"):
        CondConv2d(4, 6, 3, num_experts=0)
    with pytest.raises(ValueError, match="num_experts"):
        CondConvRouter(4, 0)


def test_error_routing_weights_batch_mismatch():
    layer = CondConv2d(4, 6, 3, num_experts=3)
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="routing_weights must have shape"):
        layer(x, torch.rand(3, 3))
    with pytest.raises(ValueError, match="routing_weights must have shape"):
        layer(x, torch.rand(2, 4))
    with pytest.raises(ValueError, match="routing_weights must be given"):
        CondConv2d(4, 6, 3, router=False)(x)


def test_error_other_arguments():
    x, bank, coef, bias_bank = _ok()
    with pytest.raises(ValueError, match="padding"):
        mixture_conv2d(x, bank, coef, bias_bank, groups=2, padding="full")
    with pytest.raises(ValueError, match="padding"):
        mixture_conv2d(x, bank, coef, bias_bank, groups=2, padding=-1)
    with pytest.raises(ValueError, match="stride"):
        mixture_conv2d(x, bank, coef, bias_bank, groups=2, stride=0)
    with pytest.raises(TypeError, match="dilation"):
        mixture_conv2d(x, bank, coef, bias_bank, groups=2, dilation=(1, 1, 1))
    with pytest.raises(TypeError, match="coefficients"):
        mixture_conv2d(x, bank, coef.double(), bias_bank, groups=2)
    with pytest.raises(TypeError, match="weight_bank"):
        mixture_conv2d(x, bank.detach().numpy(), coef, bias_bank, groups=2)
    with pytest.raises(ValueError, match="too small"):
        mixture_conv2d(x[..., :1, :1], bank, coef, bias_bank, groups=2)
    with pytest.raises(ValueError, match="x must have 5 channels"):
        CondConvRouter(5, 2)(x)
    with pytest.raises(TypeError, match="router"):
        CondConv2d(4, 6, 3, router="theirs")
    with pytest.raises(ValueError, match="normalize"):
        CondConvRouter(4, 2, normalize="softmax")
