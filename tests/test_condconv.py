"""Tests of pycoe.functional.mixture (mixture_conv2d) and pycoe.layers.condconv (CondConv2d, its router, conversion)."""

from __future__ import annotations

import importlib
import math

import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.mixture import mixture_conv2d_reference
from torch import nn

from pycoe.functional.mixture import (
    COEFFICIENT_NORMALIZATIONS,
    MIXTURE_STRATEGIES,
    choose_mixture_strategy,
    mixture_coefficients,
    mixture_conv2d,
)
from pycoe.layers.condconv import CondConv2d, CondConvRouter, convert_conv2d_to_condconv

STRATEGIES = MIXTURE_STRATEGIES
EXPLICIT = tuple(s for s in STRATEGIES if s != "auto")


def _inputs(batch, channels, out_channels, kernel, groups, kernels, size=(7, 6), bias=True, dtype=torch.float64):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(batch, channels, *size, dtype=dtype, requires_grad=True)
    bank = torch.randn(kernels, out_channels, channels // groups, kh, kw, dtype=dtype, requires_grad=True)
    coef = torch.rand(batch, kernels, dtype=dtype, requires_grad=True)
    bias_bank = torch.randn(kernels, out_channels, dtype=dtype, requires_grad=True) if bias else None
    return x, bank, coef, bias_bank


def _grads(out, tensors, upstream):
    tensors = [t for t in tensors if t is not None]
    # materialize: with an empty batch the reference's output does not depend on its inputs (zero gradients)
    return torch.autograd.grad(out, tensors, upstream, allow_unused=True, materialize_grads=True)


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
    (3, 4, 6, 3, 1, 0, 1, 1, True, (3, 3)),  # a 1x1 output map (output mixing's regime)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_match_reference_forward_and_backward(case, strategy):
    batch, c, o, k, stride, padding, dilation, groups, bias, size = case
    x, bank, coef, bias_bank = _inputs(batch, c, o, k, groups, kernels=3, size=size, bias=bias)
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
    x, bank, coef, bias_bank = _inputs(4, 8, 8, 3, 2, kernels=4, size=(9, 9), dtype=torch.float32)
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
    batch=st.integers(0, 3),
    cpg=st.integers(1, 3),
    groups=st.integers(1, 3),
    opg=st.integers(1, 2),
    kernels=st.integers(1, 4),
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
    batch, cpg, groups, opg, kernels, kh, kw, stride, dilation, padding, bias, channels_last, strategy
):
    c, o = cpg * groups, opg * groups
    x, bank, coef, bias_bank = _inputs(batch, c, o, (kh, kw), groups, kernels, size=(7, 8), bias=bias)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    args = (stride, padding, dilation, groups)
    ref = mixture_conv2d_reference(x, bank, coef, bias_bank, *args)
    out = mixture_conv2d(x, bank, coef, bias_bank, *args, strategy=strategy)
    assert out.shape == ref.shape
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
    x, bank, coef, bias_bank = _inputs(batch, 2, 2, kernel, groups, kernels=2, size=(4, 3))

    def fn(x, bank, coef, bias_bank):
        return mixture_conv2d(x, bank, coef, bias_bank, stride, padding, 1, groups, strategy=strategy)

    assert torch.autograd.gradcheck(fn, (x, bank, coef, bias_bank))


def test_same_padding_conventions():
    x, bank, coef, _ = _inputs(2, 3, 4, 3, 1, kernels=1, size=(8, 8), bias=False)
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
    x, bank, coef, bias_bank = _inputs(3, 8, 8, 3, 1, kernels=4, size=(6, 6), dtype=torch.float32)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last)
    out = mixture_conv2d(x_cl, bank, coef, bias_bank, padding=1, strategy=strategy)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, mixture_conv2d(x.detach(), bank, coef, bias_bank, padding=1, strategy=strategy))


def test_single_kernel_with_unit_coefficient_is_conv2d():
    x, bank, _, bias_bank = _inputs(3, 4, 6, 3, 2, kernels=1)
    coef = torch.ones(3, 1, dtype=x.dtype)
    for strategy in STRATEGIES:
        torch.testing.assert_close(
            mixture_conv2d(x, bank, coef, bias_bank, 2, 1, 1, 2, strategy=strategy),
            F.conv2d(x, bank[0], bias_bank[0], 2, 1, 1, 2),
        )


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("padding", [1, "same", "valid"])
def test_empty_batch_gives_an_empty_batch_like_conv2d(strategy, padding):
    x, bank, coef, bias_bank = _inputs(0, 4, 6, 3, 2, kernels=3, size=(8, 7))
    out = mixture_conv2d(x, bank, coef, bias_bank, 2, padding, 1, 2, strategy=strategy)
    conv = nn.Conv2d(4, 6, 3, stride=1 if padding == "same" else 2, padding=padding, groups=2).double()
    expected_hw = conv(x.detach()).shape[-2:] if padding != "same" else (4, 4)  # "same" at stride 2: ceil(H/2)
    assert out.shape == (0, 6, *expected_hw)
    out.sum().backward()  # gradients of the right (empty or zero) shape, no error
    assert x.grad.shape == x.shape and bank.grad.shape == bank.shape and bool((bank.grad == 0).all())


def test_batch_one_is_a_single_convolution_with_the_mixed_kernel(monkeypatch):
    x, bank, coef, bias_bank = _inputs(1, 4, 6, 3, 2, kernels=3)
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    for strategy in ("weight", "bmm", "auto"):
        calls.clear()
        out = mixture_conv2d(x, bank, coef, bias_bank, 1, 1, 1, 2, strategy=strategy)
        assert calls == [(6, 2, 3, 3)]  # one conv, with one [O, C/g, kh, kw] kernel
        mixed = torch.einsum("e,eocij->ocij", coef[0], bank)
        torch.testing.assert_close(out, real(x, mixed, coef[0] @ bias_bank, 1, 1, 1, 2))


# ---------------------------------------------------------------------------------------------- the choice of "auto"
def test_auto_runs_the_strategy_choose_mixture_strategy_names(monkeypatch):
    import pycoe.functional.mixture as mixture

    x, bank, coef, bias_bank = _inputs(2, 4, 4, 3, 1, kernels=3)
    seen = []
    for choice in EXPLICIT:
        monkeypatch.setattr(mixture, "choose_mixture_strategy", lambda *a, choice=choice, **k: seen.append(a) or choice)
        auto = mixture_conv2d(x, bank, coef, bias_bank, padding=1, strategy="auto")
        torch.testing.assert_close(
            auto, mixture_conv2d(x, bank, coef, bias_bank, padding=1, strategy=choice), rtol=0, atol=0
        )
    # (batch, kernel, out_hw, groups): asked on every call, no memo
    assert len(seen) == len(EXPLICIT) and seen[0] == (2, (3, 3), (7, 6), 1)


def test_choose_mixture_strategy_rule():
    # 1. a 1x1 output map (a squeeze-excitation conv): output mixing, at any batch, known or not
    for batch in (2, 64, None):
        assert choose_mixture_strategy(batch, 1, 1) == "output"
    # 2. a dynamic batch while tracing: the batch-independent weight mixing
    assert choose_mixture_strategy(None, 3, 28) == "bmm"
    # 3. a dense 1x1 conv: the batched matmul; 4. otherwise timm's grouped convolution (nothing measured beat it)
    assert choose_mixture_strategy(8, 1, (56, 56)) == "bmm"
    assert choose_mixture_strategy(64, (1, 1), 14) == "bmm"
    assert choose_mixture_strategy(8, 1, 56, groups=2) == "weight"
    assert choose_mixture_strategy(64, 3, 28) == "weight"
    assert choose_mixture_strategy(64, (3, 3), 14, groups=128) == "weight"
    with pytest.raises(TypeError, match="out_hw"):
        choose_mixture_strategy(8, 1, "56")
    with pytest.raises(ValueError, match="out_hw"):
        choose_mixture_strategy(8, 1, (0, 3))
    with pytest.raises(TypeError, match="kernel_size"):
        choose_mixture_strategy(8, 1.0, 3)
    with pytest.raises(ValueError, match="groups"):
        choose_mixture_strategy(8, 1, 3, groups=0)


# ---------------------------------------------------------------------------------------------- router
def test_router_shapes_and_ranges():
    router = CondConvRouter(8, 5)
    w = router(torch.randn(3, 8, 4, 4))
    assert w.shape == (3, 5) and bool(((w > 0) & (w < 1)).all())
    x = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(router(x), torch.sigmoid(x.mean((2, 3)) @ router.fc.weight.T + router.fc.bias))
    norm = CondConvRouter(8, 5, normalization="normalized_sigmoid")
    torch.testing.assert_close(norm(x).sum(1), torch.ones(3))
    assert router(torch.randn(0, 8, 4, 4)).shape == (0, 5)


def test_the_four_normalizations_of_router_and_functional():
    logits = torch.randn(3, 5)
    expected = {
        "sigmoid": torch.sigmoid(logits),
        "normalized_sigmoid": torch.sigmoid(logits) / torch.sigmoid(logits).sum(1, keepdim=True),
        "softmax": torch.softmax(logits, 1),
        "none": logits,
    }
    assert set(expected) == set(COEFFICIENT_NORMALIZATIONS)
    x = torch.randn(3, 8, 4, 4)
    for normalization, want in expected.items():
        torch.testing.assert_close(mixture_coefficients(logits, normalization), want)
        router = CondConvRouter(8, 5, normalization=normalization)
        torch.testing.assert_close(router(x), mixture_coefficients(router.fc(x.mean((2, 3))), normalization))
    with pytest.raises(ValueError, match="normalization must be one of 'sigmoid', 'normalized_sigmoid', 'softmax'"):
        mixture_coefficients(logits, "l1")
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        mixture_coefficients(logits[0], "softmax")


def test_shared_router_module_gets_gradients_from_both_layers():
    router = CondConvRouter(4, 3)
    a = CondConv2d(4, 4, 3, padding=1, num_kernels=3, router=router)
    b = CondConv2d(4, 4, 1, num_kernels=3, router=router)
    assert a.router is b.router and "router=given" in repr(a)
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


def test_block_level_coefficients_feed_two_layers():
    router = CondConvRouter(4, 3)
    expand = CondConv2d(4, 8, 1, num_kernels=3, router=False)
    project = CondConv2d(8, 4, 1, num_kernels=3, router=False)
    x = torch.randn(2, 4, 5, 5)
    r = router(x)
    project(expand(x, r), r).sum().backward()
    assert router.fc.weight.grad is not None and router.fc.weight.grad.abs().sum() > 0
    assert expand.weight.grad.abs().sum() > 0 and project.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- the layer
def test_condconv2d_uses_given_weights_or_its_router():
    layer = CondConv2d(4, 6, 3, padding=1, num_kernels=3)
    x = torch.randn(2, 4, 5, 5)
    r = torch.rand(2, 3)
    torch.testing.assert_close(layer(x, r), mixture_conv2d_reference(x, layer.weight, r, layer.bias, 1, 1))
    torch.testing.assert_close(layer(x), layer(x, layer.router(x)))
    text = repr(layer)
    for part in ("4, 6", "kernel_size=(3, 3)", "num_kernels=3", "router=own", "strategy='auto'"):
        assert part in text
    depthwise = CondConv2d(6, 6, 3, stride=2, padding="same", groups=6, bias=False, num_kernels=2)
    y = depthwise(torch.randn(3, 6, 9, 9))
    assert y.shape == (3, 6, 5, 5) and depthwise.weight.shape == (2, 6, 1, 3, 3) and depthwise.bias is None


# (C, O, kernel, stride, padding, dilation, groups, bias, E)
LAYER_CONFIGS = [
    (4, 6, 3, 1, 1, 1, 1, True, 1),  # a single kernel
    (4, 6, 3, 2, "same", 1, 2, True, 3),
    (6, 6, 3, 1, "same", 2, 6, False, 2),  # depthwise, dilated
    (4, 8, 1, 2, 0, 1, 1, True, 4),
    (4, 6, (3, 1), (1, 2), (1, 0), (2, 1), 1, True, 2),
    (4, 4, 2, 1, "same", 1, 1, True, 2),  # even kernel, asymmetric "same"
    (4, 6, 3, 1, "valid", 1, 2, False, 3),
]


@pytest.mark.parametrize("config", LAYER_CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layer_boundary_configurations_match_reference(config, strategy):
    c, o, k, stride, padding, dilation, groups, bias, e = config
    layer = CondConv2d(c, o, k, stride, padding, dilation, groups, bias, num_kernels=e, strategy=strategy).double()
    for batch in (0, 1, 3):
        x = torch.randn(batch, c, 7, 8, dtype=torch.float64)
        routing = layer.router(x)
        ref = mixture_conv2d_reference(x, layer.weight, routing, layer.bias, stride, padding, dilation, groups)
        out = layer(x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        if padding != "same" or stride == 1:  # nn.Conv2d refuses a strided "same"
            conv = nn.Conv2d(c, o, k, stride, padding, dilation, groups, bias)
            assert out.shape == conv(x.float()).shape


def test_empty_batch_through_the_layer_like_conv2d():
    layer = CondConv2d(4, 6, 3, padding=1, num_kernels=3)
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    assert layer(x).shape == nn.Conv2d(4, 6, 3, padding=1)(x).shape == (0, 6, 5, 5)
    out = layer(x, torch.rand(0, 3))
    assert out.shape == (0, 6, 5, 5)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and bool((layer.weight.grad == 0).all())


def test_state_dict_round_trip():
    a, b = CondConv2d(4, 4, 3, num_kernels=2), CondConv2d(4, 4, 3, num_kernels=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(a(x), b(x))


def test_channels_last_model_conversion_keeps_the_kernel_bank_and_the_outputs():
    """model.to(memory_format=torch.channels_last) converts every 4-d and 5-d tensor, and channels_last has no 5-d
    form: the kernel bank keeps its layout, the rest of the model converts, the outputs stay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
    convert_conv2d_to_condconv(model, num_kernels=3, predicate=["3"])
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()  # a gradient on the bank, converted too
    before = model(x)
    bank = model[3].weight
    assert model.to(memory_format=torch.channels_last) is model
    assert model[3].weight is bank and bank.is_contiguous() and bank.grad.is_contiguous()
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, before)
    model.double()
    assert bank.dtype == torch.float64 and bank.shape == (3, 6, 4, 3, 3) and bank.is_contiguous()
    torch.testing.assert_close(model(x.double()), before.double(), rtol=1e-5, atol=1e-6)


def test_channels_last_with_swapped_parameters():
    layer = CondConv2d(4, 4, 3, num_kernels=2)
    saved = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.to(memory_format=torch.channels_last, dtype=torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(saved)
    assert layer.weight.dtype == torch.float64 and layer.weight.is_contiguous()
    assert layer(torch.randn(1, 4, 5, 5, dtype=torch.float64)).shape == (1, 4, 3, 3)


# ---------------------------------------------------------------------------------------------- initialisation
def test_kernels_are_initialised_independently_like_conv2d():
    layer = CondConv2d(64, 64, 3, num_kernels=4).requires_grad_(False)
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
def _compare_after_conversion(model, normalization):
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    names = convert_conv2d_to_condconv(model, num_kernels=4, normalization=normalization)
    with torch.no_grad():
        after = model(x)
    scale = float(before.abs().max())
    assert scale > 0
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * scale)
    return names


@pytest.mark.parametrize("normalization", ["normalized_sigmoid", "sigmoid"])
def test_conversion_keeps_resnet18_outputs(normalization):
    model = torchvision.models.resnet18(weights=None)
    num_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    names = _compare_after_conversion(model, normalization)
    assert "conv1" not in names and "layer1.0.conv1" in names and "layer2.0.downsample.0" in names
    assert len(names) == num_convs - 1
    assert isinstance(model.layer1[0].conv1, CondConv2d) and isinstance(model.conv1, nn.Conv2d)


def test_conversion_keeps_mobilenet_v3_small_outputs():
    model = torchvision.models.mobilenet_v3_small(weights=None)
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        feats = model.features(x)
    names = _compare_after_conversion(model, "normalized_sigmoid")
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), feats, rtol=0, atol=1e-5 * float(feats.abs().max()))
    depthwise = model.features[1].block[0][0]
    assert isinstance(depthwise, CondConv2d) and depthwise.groups == depthwise.in_channels
    assert "features.0.0" not in names


@pytest.mark.parametrize("normalization", COEFFICIENT_NORMALIZATIONS)
def test_conversion_keeps_the_outputs_with_every_normalization(normalization):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Conv2d(6, 5, 1))
    x = torch.randn(3, 3, 9, 9)
    with torch.no_grad():
        before = model(x)
    assert convert_conv2d_to_condconv(model, num_kernels=3, normalization=normalization) == ["2", "3"]
    assert model[2].router.normalization == normalization
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_tf_efficientnet_b0_converts_everything_but_its_conv2dsame_stem():
    """timm's Conv2dSame (TensorFlow's "same" padding) is converted, and the stem that is skipped by default is the
    first convolution, whatever its class: here the Conv2dSame stem, not block 0's depthwise convolution."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: intra-op threads only slow it down on a shared machine
    try:
        _convert_tf_efficientnet_b0()
    finally:
        torch.set_num_threads(threads)


def _convert_tf_efficientnet_b0():
    model = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    assert type(model.conv_stem).__name__ == "Conv2dSame"
    x = torch.randn(1, 3, 33, 33)  # odd: the "same" padding is asymmetric
    with torch.no_grad():
        before = model.forward_features(x)
    report = convert_conv2d_to_condconv(model, num_kernels=2)
    assert "conv_stem" not in report and report.skipped == {
        "conv_stem": "the stem (the first convolution: it sees the raw input); choose it with predicate"
    }
    assert report[0] == "blocks.0.0.conv_dw" and isinstance(model.blocks[0][0].conv_dw, CondConv2d)
    assert len(report) == sum(isinstance(m, nn.Conv2d) for m in timm.create_model("tf_efficientnet_b0").modules()) - 1
    with torch.no_grad():
        after = model.forward_features(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


def test_a_strided_conv2dsame_becomes_a_same_padded_condconv():
    conv2d_same = importlib.import_module("timm.layers.conv2d_same")
    torch.manual_seed(0)
    conv = conv2d_same.Conv2dSame(3, 4, 3, stride=2)
    model = nn.Sequential(conv)
    x = torch.randn(2, 3, 10, 11)
    with torch.no_grad():
        before = model(x)
    assert convert_conv2d_to_condconv(model, num_kernels=3, predicate=["0"]) == ["0"]
    assert model[0].padding == "same" and model[0].stride == (2, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


class _StandardizedConv(nn.Conv2d):
    """A subclass whose forward is not a convolution of its weight (as timm's StdConv2d)."""

    def forward(self, x):
        w = (self.weight - self.weight.mean()) / self.weight.std()
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_conversion_reports_what_it_skipped_and_warns_when_nothing_was_converted():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), _StandardizedConv(4, 4, 1)
    )
    model.append(nn.Conv2d(4, 4, 1))
    model.append(nn.Conv2d(4, 4, 1))
    report = convert_conv2d_to_condconv(model, num_kernels=2, predicate=lambda name, m: name != "4")
    assert report == ["0", "3"]
    assert report.skipped == {
        "1": "padding_mode='reflect': CondConv2d pads with zeros only",
        "2": "_StandardizedConv is a subclass of nn.Conv2d whose forward may differ from a convolution of its "
        "weight (e.g. a standardised weight); only nn.Conv2d and timm's Conv2dSame are converted",
        "4": "predicate returned False",
    }
    with pytest.warns(UserWarning, match="nothing was converted: skipped 0: the stem"):
        assert convert_conv2d_to_condconv(nn.Sequential(nn.Conv2d(3, 3, 1))) == []
    with pytest.warns(UserWarning, match=r"nothing was converted: the model has no convolution \(nn.Conv2d\)"):
        assert convert_conv2d_to_condconv(nn.Linear(3, 3)) == []


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_models_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
    with pytest.raises(TypeError, match=r"model is a TorchScript module \(RecursiveScriptModule\)"):
        convert_conv2d_to_condconv(torch.jit.script(model))
    assert type(model[1]) is nn.Conv2d
    outer = nn.Sequential(nn.Conv2d(3, 4, 1), torch.jit.script(nn.Sequential(nn.Conv2d(4, 4, 1))), nn.Conv2d(4, 4, 1))
    report = convert_conv2d_to_condconv(outer)
    assert report == ["2"] and "1" in report.skipped and "TorchScript" in report.skipped["1"]


def test_conversion_predicates_and_symmetry_breaking():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    names = convert_conv2d_to_condconv(model, num_kernels=3, predicate=lambda n, m: m.kernel_size == (3, 3))
    assert names == ["0", "2"]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
    assert convert_conv2d_to_condconv(model, num_kernels=2, predicate=["1"]) == ["1"]
    # normalization="normalized_sigmoid": the random router makes the identical kernels receive different gradients
    layer = model[1]
    torch.testing.assert_close(layer.weight[0], layer.weight[1])
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    assert not torch.allclose(layer.weight.grad[0], layer.weight.grad[1])


def test_conversion_without_routers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, groups=2))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    assert convert_conv2d_to_condconv(model, num_kernels=3, predicate=["0", "2"], router=False) == ["0", "2"]
    for layer in (model[0], model[2]):
        assert isinstance(layer, CondConv2d) and layer.router is None and "router=none" in repr(layer)
        assert not any("router" in name for name, _ in layer.named_parameters())
    assert torch.equal(model[2].weight[0], model[2].weight[2])  # exact copies, no 2/E scaling
    coef = torch.softmax(torch.randn(2, 3), dim=1)  # any coefficients summing to 1 reproduce the conv
    with torch.no_grad():
        after = model[2](model[1](model[0](x, coef)), coef)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="coefficients must be given"):
        model(x)


# ---------------------------------------------------------------------------------------------- export and compile
class _SmallNet(nn.Module):
    """Every regime of the default strategy: dense 3x3, strided depthwise "same", 1x1, a conv on a 1x1 map."""

    def __init__(self) -> None:
        super().__init__()
        self.a = CondConv2d(3, 8, 3, padding=1, num_kernels=4)
        self.b = CondConv2d(8, 8, 3, stride=2, padding="same", groups=8, num_kernels=4)
        self.c = CondConv2d(8, 6, 1, num_kernels=4)
        self.se = CondConv2d(6, 6, 1, num_kernels=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))


BATCHES = (1, 5, 64)


@pytest.mark.slow
def test_torch_export_with_a_dynamic_batch_matches_eager():
    model = _SmallNet().eval()
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    dims.update({2: torch.export.Dim("height", min=8, max=256), 3: torch.export.Dim("width", min=8, max=256)})
    program = torch.export.export(model, (torch.randn(4, 3, 16, 20),), dynamic_shapes={"x": dims})
    exported = program.module()
    sizes = [(b, 16, 16) for b in BATCHES] + [(5, 32, 23), (64, 9, 11)]  # odd sizes: asymmetric strided "same"
    for b, h, w in sizes:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime(tmp_path):
    model = _SmallNet().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        model, (torch.randn(4, 3, 16, 16),), dynamo=True, dynamic_shapes={"x": {0: batch}}, verbose=False
    )
    path = tmp_path / "condconv.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for b in BATCHES:
        x = torch.randn(b, 3, 16, 16)
        with torch.no_grad():
            expected = model(x).numpy()
        (out,) = session.run(None, {name: x.numpy()})
        assert out.shape == expected.shape
        torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_fullgraph_dynamic_batch_values_and_gradients():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _SmallNet()
    counter = CompileCounterWithBackend("aot_eager")  # dynamo and AOT autograd: the parts pycoe's code meets
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for b in (2, 5, 11):  # not 3 or 16: dynamo gives equal sizes one symbol, and the channels are checked
        x = torch.randn(b, 3, 16, 16, requires_grad=True)
        out = compiled(x)
        (grad_c,) = torch.autograd.grad(out.square().sum(), x)
        ref = model(x)
        (grad_e,) = torch.autograd.grad(ref.square().sum(), x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-4, atol=1e-6)
    assert counter.frame_count == 1  # one graph for every batch size: nothing specialised on the batch


@pytest.mark.slow
def test_compile_with_inductor_matches_eager():
    layer = CondConv2d(4, 6, 3, padding=1, num_kernels=3)
    compiled = torch.compile(layer, fullgraph=True)
    for b in (1, 5):
        x = torch.randn(b, 4, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
def _ok():
    return _inputs(2, 4, 6, 3, 2, kernels=3, dtype=torch.float32)


def _mixture_call(**change):
    x, bank, coef, bias_bank = _ok()
    kwargs = dict(x=x, weight_bank=bank, coefficients=coef, bias_bank=bias_bank, groups=2)
    kwargs.update(change)
    return lambda: mixture_conv2d(**kwargs)


_X, _BANK, _COEF, _BIAS = _ok()
MIXTURE_BAD = [
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=_X[0]), ValueError, "x must have 4 dimensions"),
    (dict(x=_X.detach().long()), TypeError, "x must be a floating-point tensor"),
    (dict(weight_bank=_BANK.detach().numpy()), TypeError, "weight_bank must be a torch.Tensor"),
    (dict(weight_bank=_BANK[0]), ValueError, "weight_bank must have 5 dimensions"),
    (dict(weight_bank=_BANK[:0], coefficients=_COEF[:, :0]), ValueError, "at least one kernel"),
    (dict(coefficients=_COEF[0]), ValueError, "coefficients must have 2 dimensions"),
    (dict(coefficients=_COEF[:1]), ValueError, r"coefficients must have shape \[B, E\] = \[2, 3\]"),
    (dict(coefficients=_COEF[:, :2]), ValueError, r"coefficients must have shape \[B, E\] = \[2, 3\]"),
    (dict(coefficients=_COEF.double()), TypeError, "coefficients must have the dtype of x"),
    (dict(coefficients=_COEF.to("meta")), ValueError, "coefficients must be on the device of x"),
    (dict(weight_bank=_BANK.to("meta")), ValueError, "weight_bank must be on the device of x"),
    (dict(bias_bank=_BIAS[:2]), ValueError, r"bias_bank must have shape \[E, O\] = \[3, 6\]"),
    (dict(bias_bank=_BIAS[0]), ValueError, "bias_bank must have 2 dimensions"),
    (dict(bias_bank=[0.0]), TypeError, "bias_bank must be a torch.Tensor"),
    (dict(bias_bank=_BIAS.double()), TypeError, "bias_bank must have the dtype of x"),
    (dict(groups=0), ValueError, "groups must be a positive integer"),
    (dict(groups=2.0), TypeError, "groups must be a positive integer"),
    (dict(groups=True), TypeError, "groups must be a positive integer"),
    (dict(groups=3), ValueError, "not divisible by groups=3"),
    (dict(groups=1), ValueError, "weight_bank must have shape"),
    (dict(weight_bank=_BANK[:, :5], bias_bank=None, groups=2), ValueError, "5 output channels"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(stride=(1, 1, 1)), TypeError, "stride must be an int or a pair"),
    (dict(stride=1.0), TypeError, "stride must be an int or a pair"),
    (dict(stride="2"), TypeError, "stride must be an int or a pair"),
    (dict(padding=-1), ValueError, "padding must be >= 0"),
    (dict(padding="full"), ValueError, "padding must be one of 'same', 'valid'"),
    (dict(padding=1.5), TypeError, "padding must be an int or a pair"),
    (dict(dilation=0), ValueError, "dilation must be >= 1"),
    (dict(dilation=(1,)), TypeError, "dilation must be an int or a pair"),
    (dict(strategy="fast"), ValueError, "strategy must be one of"),
    (dict(strategy=3), TypeError, r"strategy must be one of .* \(a str\), got int 3"),
    (dict(x=_X[..., :1, :1]), ValueError, "too small"),
    (dict(validate_args=1), TypeError, "validate_args must be a bool"),
]


@pytest.mark.parametrize("change,error,match", MIXTURE_BAD, ids=[m for _, _, m in MIXTURE_BAD])
def test_mixture_conv2d_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        _mixture_call(**change)()


CONSTRUCTOR_BAD = [
    (dict(in_channels=0), ValueError, "in_channels must be a positive integer"),
    (dict(in_channels=4.0), TypeError, "in_channels must be a positive integer"),
    (dict(out_channels=-1), ValueError, "out_channels must be a positive integer"),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
    (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size must be an int or a pair"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(padding="full"), ValueError, "padding must be one of"),
    (dict(padding=(1, -1)), ValueError, "padding must be >= 0"),
    (dict(dilation=1.5), TypeError, "dilation must be an int or a pair"),
    (dict(groups=4), ValueError, "divisible by groups"),
    (dict(out_channels=6, groups=4, in_channels=8), ValueError, "divisible by groups"),
    (dict(groups="2"), TypeError, "groups must be a positive integer"),
    (dict(bias="yes"), TypeError, "bias must be a bool"),
    (dict(num_kernels=0), ValueError, "num_kernels must be a positive integer"),
    (dict(num_kernels=2.5), TypeError, "num_kernels must be a positive integer"),
    (dict(router="theirs"), TypeError, "router must be True, False or an nn.Module"),
    (dict(router=None), TypeError, "router must be True, False or an nn.Module"),
    (dict(strategy="fast"), ValueError, "strategy must be one of"),
    (dict(strategy=None), TypeError, r"strategy must be one of .* \(a str\), got NoneType"),
    # factory keywords go to torch.empty, which checks them
    (dict(dtype=torch.int64), RuntimeError, "Only Tensors of floating point"),
    (dict(dtype="float32"), TypeError, "argument 'dtype' must be torch.dtype"),
    (dict(device=3.0), TypeError, "argument 'device' must be torch.device"),
    (dict(device="nowhere"), RuntimeError, "device string: nowhere"),
]


@pytest.mark.parametrize("change,error,match", CONSTRUCTOR_BAD, ids=[m for _, _, m in CONSTRUCTOR_BAD])
def test_condconv2d_constructor_bad_input(change, error, match):
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=3)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        CondConv2d(**kwargs)


class _WrongRouter(nn.Module):
    def forward(self, x):
        return torch.rand(x.shape[0], 2)


FORWARD_BAD = [
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randn(4, 5, 5)), ValueError, "x must have 4 dimensions"),
    (dict(x=torch.randn(2, 5, 5, 5)), ValueError, "x must have 4 channels"),
    (dict(x=torch.randn(2, 4, 5, 5, dtype=torch.float64)), TypeError, "dtype of the layer's parameters"),
    (dict(x=torch.ones(2, 4, 5, 5, dtype=torch.long)), TypeError, "dtype of the layer's parameters"),
    (dict(x=torch.randn(2, 4, 5, 5, device="meta")), ValueError, "device of the layer's parameters"),
    (dict(x=torch.randn(2, 4, 1, 1)), ValueError, "too small"),
    (dict(coefficients=[[0.5] * 3] * 2), TypeError, "coefficients must be a torch.Tensor"),
    (dict(coefficients=torch.rand(3, 3)), ValueError, r"coefficients must have shape \[B, E\] = \[2, 3\]"),
    (dict(coefficients=torch.rand(2, 4)), ValueError, r"coefficients must have shape \[B, E\] = \[2, 3\]"),
    (dict(coefficients=torch.rand(6)), ValueError, "coefficients must have shape"),
    (dict(coefficients=torch.rand(2, 3, dtype=torch.float64)), TypeError, "coefficients must have the layer"),
    (dict(coefficients=torch.rand(2, 3, device="meta")), ValueError, "coefficients must be on the layer"),
]


@pytest.mark.parametrize("change,error,match", FORWARD_BAD, ids=[m for _, _, m in FORWARD_BAD])
def test_condconv2d_forward_bad_input(change, error, match):
    layer = CondConv2d(4, 6, 3, num_kernels=3)  # with its own router: x is checked before the router runs
    kwargs = dict(x=torch.randn(2, 4, 5, 5))
    kwargs.update(change)
    with pytest.raises(error, match=match):
        layer(**kwargs)


def test_condconv2d_forward_needs_coefficients_or_a_router_with_the_right_output():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="coefficients must be given"):
        CondConv2d(4, 6, 3, num_kernels=3, router=False)(x)
    with pytest.raises(ValueError, match=r"the output of the router \(_WrongRouter\) must have shape"):
        CondConv2d(4, 6, 3, num_kernels=3, router=_WrongRouter())(x)


ROUTER_BAD = [
    (dict(in_channels=0), ValueError, "in_channels must be a positive integer"),
    (dict(num_kernels="4"), TypeError, "num_kernels must be a positive integer"),
    (dict(normalization="l1"), ValueError, "normalization must be one of 'sigmoid', 'normalized_sigmoid', 'softmax'"),
    (dict(normalization=None), TypeError, r"normalization must be one of .* \(a str\)"),
    (dict(bias=1), TypeError, "bias must be a bool"),
    (dict(dtype=torch.int32), RuntimeError, "Only Tensors of floating point"),
]


@pytest.mark.parametrize("change,error,match", ROUTER_BAD, ids=[m for _, _, m in ROUTER_BAD])
def test_router_constructor_bad_input(change, error, match):
    kwargs = dict(in_channels=4, num_kernels=3)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        CondConvRouter(**kwargs)


@pytest.mark.parametrize(
    "x,error,match",
    [
        ("image", TypeError, "x must be a torch.Tensor"),
        (torch.randn(2, 4), ValueError, "x must have 4 dimensions"),
        (torch.randn(2, 5, 3, 3), ValueError, "x must have 4 channels"),
        (torch.randn(2, 4, 3, 3, dtype=torch.float64), TypeError, "dtype of the router's parameters"),
        (torch.randn(2, 4, 0, 3), ValueError, "non-empty spatial size"),
    ],
    ids=["type", "ndim", "channels", "dtype", "empty-spatial"],
)
def test_router_forward_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        CondConvRouter(4, 3)(x)


def _convertible_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding_mode="reflect"))


CONVERT_BAD = [
    (dict(model="resnet"), TypeError, "model must be an nn.Module"),
    (dict(num_kernels=0), ValueError, "num_kernels must be a positive integer"),
    (dict(num_kernels=2.0), TypeError, "num_kernels must be a positive integer"),
    (dict(predicate=3), TypeError, "predicate must be None, a callable or a collection"),
    (dict(predicate="0"), TypeError, "predicate must be None, a callable or a collection"),
    (dict(predicate=[0]), TypeError, "predicate must hold qualified names"),
    (dict(predicate=["missing"]), ValueError, "predicate names 'missing', which is not a submodule"),
    (dict(predicate=["1"]), ValueError, "predicate names '1', a ReLU, which cannot be converted: not an nn.Conv2d"),
    (dict(predicate=["2"]), ValueError, "cannot be converted: padding_mode='reflect': CondConv2d pads with zeros only"),
    (dict(normalization="l1"), ValueError, "normalization must be one of"),
    (dict(normalization=None), TypeError, r"normalization must be one of .* \(a str\)"),
    (dict(strategy="fast"), ValueError, "strategy must be one of"),
    (dict(router="own"), TypeError, "router must be a bool, got str 'own'"),
    (dict(router=False, normalization="sigmoid"), ValueError, "normalization='sigmoid' needs a router"),
]


@pytest.mark.parametrize("change,error,match", CONVERT_BAD, ids=[m for _, _, m in CONVERT_BAD])
def test_conversion_bad_input(change, error, match):
    kwargs = dict(model=_convertible_model())
    kwargs.update(change)
    with pytest.raises(error, match=match):
        convert_conv2d_to_condconv(**kwargs)
