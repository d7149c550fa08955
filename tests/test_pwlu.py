"""Tests of the piecewise linear unit: pycoe.functional.pwlu, pwlu_reference and pycoe.layers.pwlu."""

from __future__ import annotations

import copy
import importlib
import io
import math
import multiprocessing
import threading

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.pwlu import pwlu_reference
from torch import nn

from pycoe.functional import pwlu
from pycoe.layers import PWLU, ConversionReport, convert_activations_to_pwlu, realign_pwlu
from pycoe.layers._pwlu_inits import TIMM_ACTIVATIONS
from pycoe.layers.pwlu import INIT_NAMES

# the eager CPU kernel (its chunk size is patched to make tiny inputs take every kind of piece)
eager = importlib.import_module("pycoe.functional._pwlu_eager")
# the module behind pycoe.functional.pwlu, for its fused kernel
fmod = importlib.import_module("pycoe.functional._pwlu")
F64 = torch.float64


def fused_pwlu(x, *params, channel_dim=1):
    """The kernel that torch.compile and torch.export use (and other devices), called eagerly on the CPU."""
    # sums_op=False: the parameter gradients reduced with index_put, as on devices other than the CPU (the
    # op, used on the CPU, is the eager kernel's reduction)
    return fmod._FusedPWLU.apply(x, *fmod._prepare(x, *params, channel_dim), False)


KERNELS = {"eager": pwlu, "fused": fused_pwlu}


def random_params(rows: int, n: int, dtype=F64, requires_grad=True, gen=None):
    """Random knots, bounds around [-2, 2] and slopes, shapes [rows, n + 1] and [rows]."""
    pts = torch.randn(rows, n + 1, dtype=dtype, generator=gen)
    lb = -2.0 + 0.3 * torch.randn(rows, dtype=dtype, generator=gen)
    rb = 2.0 + 0.3 * torch.randn(rows, dtype=dtype, generator=gen)
    ks = torch.randn(rows, dtype=dtype, generator=gen)
    kr = torch.randn(rows, dtype=dtype, generator=gen)
    params = [pts, lb, rb, ks, kr]
    return [p.requires_grad_(requires_grad) for p in params]


def all_grads(fn, x, params, channel_dim, gout):
    y = fn(x, *params, channel_dim=channel_dim)
    return y, torch.autograd.grad(y, [x, *params], gout)


@pytest.fixture
def small_chunks(monkeypatch):
    """Make the fast path split tiny tensors into many pieces (all three kinds of piece)."""
    monkeypatch.setattr(eager, "CHUNK_BYTES", 8 * 24)


# ------------------------------------------------------------------------------------------------
# functional: gradcheck, reference agreement, continuity, deterministic path


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "rows,shape,channel_dim",
    [(1, (2, 3, 4, 3), 1), (3, (2, 3, 4, 3), 1), (4, (2, 5, 4), -1)],
)
def test_gradcheck_input_and_every_parameter(kernel, rows, shape, channel_dim, small_chunks):
    x = (2.5 * torch.randn(shape, dtype=F64)).requires_grad_()
    params = random_params(rows, 5)
    fn = KERNELS[kernel]
    assert torch.autograd.gradcheck(lambda *a: fn(*a, channel_dim=channel_dim), (x, *params))


def test_gradcheck_deterministic_path():
    x = (2.5 * torch.randn(2, 3, 5, dtype=F64)).requires_grad_()
    params = random_params(3, 4)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.autograd.gradcheck(lambda *a: pwlu(*a, channel_dim=1), (x, *params))
    finally:
        torch.use_deterministic_algorithms(prev)


def test_reference_gradcheck():
    x = (2.5 * torch.randn(2, 3, 4, dtype=F64)).requires_grad_()
    params = random_params(3, 4)
    assert torch.autograd.gradcheck(lambda *a: pwlu_reference(*a, channel_dim=1), (x, *params))


@settings(max_examples=25)
@given(
    data=st.data(),
    ndim=st.integers(1, 4),
    n=st.integers(1, 9),
    per_channel=st.booleans(),
    chunk_bytes=st.sampled_from([8, 8 * 7, 8 * 40, 1 << 16]),
    kernel=st.sampled_from(sorted(KERNELS)),
    seed=st.integers(0, 2**16),
)
def test_fast_path_agrees_with_reference(data, ndim, n, per_channel, chunk_bytes, kernel, seed):
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    channel_dim = data.draw(st.integers(-ndim, ndim - 1))
    rows = shape[channel_dim] if per_channel else 1
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, dtype=F64, generator=gen)).requires_grad_()
    params = random_params(rows, n, gen=gen)
    gout = torch.randn(shape, dtype=F64, generator=gen)
    old = eager.CHUNK_BYTES
    eager.CHUNK_BYTES = chunk_bytes
    try:
        y, grads = all_grads(KERNELS[kernel], x, params, channel_dim, gout)
    finally:
        eager.CHUNK_BYTES = old
    y_ref, grads_ref = all_grads(pwlu_reference, x, params, channel_dim, gout)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_agrees_with_float64_reference(kernel):
    x = 3 * torch.randn(4, 6, 9, 9)
    params = [p.float() for p in random_params(6, 16, requires_grad=False)]
    params = [p.requires_grad_() for p in params]
    x.requires_grad_()
    gout = torch.randn_like(x)
    y, grads = all_grads(KERNELS[kernel], x, params, 1, gout)
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    y_ref, grads_ref = all_grads(pwlu_reference, x64, p64, 1, gout.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kernel", KERNELS)
def test_deterministic_path_agrees_and_repeats(kernel):
    x = (3 * torch.randn(4, 5, 30, dtype=torch.float32)).requires_grad_()
    params = [p.float().detach().requires_grad_() for p in random_params(5, 16)]
    gout = torch.randn_like(x)
    fn = KERNELS[kernel]
    _, default = all_grads(fn, x, params, 1, gout)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, det1 = all_grads(fn, x, params, 1, gout)
        _, det2 = all_grads(fn, x, params, 1, gout)
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b, c in zip(default, det1, det2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(b, c)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [1, 3])
def test_continuity_and_values_at_every_knot(kernel, rows):
    n = 7
    pts, lb, rb, ks, kr = random_params(rows, n, requires_grad=False)
    j = torch.arange(n + 1, dtype=F64)
    knots = lb[:, None] + (rb - lb)[:, None] * j / n  # [rows, K]
    eps = 1e-9
    for offset in (-eps, 0.0, eps):
        x = (knots + offset).T.contiguous().unsqueeze(0)  # [1, K, rows]: channel_dim=2
        y = KERNELS[kernel](x, pts, lb, rb, ks, kr, channel_dim=2)
        torch.testing.assert_close(y[0].T, pts, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_inputs_exactly_on_the_bounds_and_knots(kernel, dtype):
    """Exactly representable bounds and knots: the value is the knot's, and both sides meet there."""
    n = 8
    pts = torch.randn(1, n + 1, dtype=dtype)
    lb, rb = -2.0, 2.0  # d = 0.5: every knot B_L + j d is exact in binary
    ks, kr = 0.25, 1.5
    knots = torch.linspace(lb, rb, n + 1, dtype=dtype)
    y = KERNELS[kernel](knots, pts, lb, rb, ks, kr)
    torch.testing.assert_close(y, pts[0], rtol=0, atol=2e-6 if dtype == torch.float32 else 1e-12)
    # the one-sided neighbours agree with the reference (which decides the segment by the same rule)
    for side in (-1, 1):
        near = torch.nextafter(knots, torch.full_like(knots, side * math.inf))
        torch.testing.assert_close(
            KERNELS[kernel](near, pts, lb, rb, ks, kr), pwlu_reference(near, pts, lb, rb, ks, kr), rtol=0, atol=1e-5
        )
    # the bounds themselves: B_L is the first knot value, B_R the last, and the rays start there
    x = torch.tensor([lb, rb, lb - 1.0, rb + 1.0], dtype=dtype)
    expected = torch.stack([pts[0, 0], pts[0, n], pts[0, 0] - ks, pts[0, n] + kr])
    torch.testing.assert_close(KERNELS[kernel](x, pts, lb, rb, ks, kr), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_linear_extrapolation_outside_the_bounds(kernel):
    pts, lb, rb, ks, kr = random_params(1, 4, requires_grad=False)
    x = torch.tensor([lb.item() - 5.0, lb.item() - 1.0, rb.item() + 1.0, rb.item() + 7.0], dtype=F64)
    y = KERNELS[kernel](x, pts, lb, rb, ks, kr)
    expected = torch.stack([pts[0, 0] - 5 * ks[0], pts[0, 0] - ks[0], pts[0, -1] + kr[0], pts[0, -1] + 7 * kr[0]])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_nan_inf_and_empty_inputs(kernel):
    fn = KERNELS[kernel]
    pts, lb, rb, ks, kr = random_params(1, 4, requires_grad=False)
    ks.fill_(0.5)
    kr.fill_(2.0)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], dtype=F64)
    y = fn(x, pts, lb, rb, ks, kr)
    assert torch.isnan(y[0]) and y[1] == float("inf") and y[2] == -float("inf") and torch.isfinite(y[3])
    # a batch of 0 samples gives an empty output (like nn.ReLU), forward and backward, both granularities
    for rows, shape in ((1, (0, 3)), (3, (0, 3, 4, 4))):
        params = random_params(rows, 4)
        empty = torch.empty(shape, dtype=F64, requires_grad=True)
        out = fn(empty, *params, channel_dim=1)
        assert out.shape == shape
        grads = torch.autograd.grad(out.sum(), [empty, *params])
        assert grads[0].shape == shape and all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


def test_scalar_parameters_broadcast_over_channels():
    x = torch.randn(2, 3, 4, dtype=F64)
    pts = torch.randn(3, 5, dtype=F64)
    y = pwlu(x, pts, -1.5, 2.0, 0.0, 1.0)
    y_ref = pwlu_reference(
        x,
        pts,
        torch.full((3,), -1.5, dtype=F64),
        torch.full((3,), 2.0, dtype=F64),
        torch.zeros(3, dtype=F64),
        torch.ones(3, dtype=F64),
    )
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("kernel", KERNELS)
def test_channels_last_and_permuted_inputs(kernel):
    fn = KERNELS[kernel]
    x = 2 * torch.randn(3, 6, 5, 4)
    params = [p.float().detach().requires_grad_() for p in random_params(6, 8)]
    gout = torch.randn_like(x)
    xc = x.clone().requires_grad_()
    y, grads = all_grads(fn, xc, params, 1, gout)
    xl = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    yl, grads_l = all_grads(fn, xl, params, 1, gout)
    assert yl.is_contiguous(memory_format=torch.channels_last)
    assert grads_l[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yl, y, rtol=0, atol=0)
    for a, b in zip(grads, grads_l):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    # a non-dense view (a slice with gaps) and a (B, T, C) sequence view made by a transpose
    xs = x[:, ::2]
    ps = [p.detach()[:3] for p in params]
    torch.testing.assert_close(fn(xs, *ps), pwlu_reference(xs, *ps), rtol=1e-6, atol=1e-6)
    xt = x.flatten(2).transpose(1, 2)  # [B, T, C] with C = 6 strided
    pt = [p.detach() for p in params]
    torch.testing.assert_close(fn(xt, *pt, channel_dim=-1), pwlu_reference(xt, *pt, channel_dim=-1))


def test_bfloat16_under_cpu_autocast():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    unit = PWLU(granularity="channel", num_channels=4, collect=False)
    with torch.no_grad():
        unit.points.normal_()
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y = unit(h)
    assert y.dtype == torch.bfloat16
    # computed in float32 from the bfloat16 input, then rounded once to bfloat16
    expected = pwlu_reference(
        h.float(), unit.points, unit.left_bound, unit.right_bound, unit.left_slope, unit.right_slope
    ).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=1.6e-2, atol=1e-2)
    y.float().sum().backward()
    assert unit.points.grad is not None and unit.points.grad.dtype == torch.float32
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def _compiled_matches_eager(backend: str, threads: int) -> None:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows, channel_dim in ((1, 1), (4, 1)):
            x = (2 * torch.randn(2, 4, 5, 5)).requires_grad_()
            params = [p.float().detach().requires_grad_() for p in random_params(rows, 8)]
            gout = torch.randn_like(x)
            y, grads = all_grads(pwlu, x, params, channel_dim, gout)  # the eager kernel
            torch._dynamo.reset()
            compiled = torch.compile(lambda a, *p: pwlu(a, *p, channel_dim=1), backend=backend, fullgraph=True)
            yc = compiled(x, *params)
            grads_c = torch.autograd.grad(yc, [x, *params], gout)
            torch.testing.assert_close(yc, y, rtol=1e-6, atol=1e-6)
            for a, b in zip(grads, grads_c):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_torch_compile_traces_the_fused_kernel_without_graph_breaks(threads):
    # aot_eager traces the autograd.Function through dynamo and AOTAutograd (fullgraph: no graph break)
    # without spending time in inductor's C++ compiler
    _compiled_matches_eager("aot_eager", threads)


@pytest.mark.slow
def test_inductor_compiled_pwlu_gives_the_eager_values_and_gradients():
    _compiled_matches_eager("inductor", torch.get_num_threads())


# ------------------------------------------------------------------------------------------------
# module: phases, statistics, realignment

# (sup |f''| inside the bounds, largest jump of f' at a kink): the interpolation error bound on an
# interval of width d is d^2/8 * sup|f''| + d/4 * jump.
SMOOTHNESS = {
    "identity": (0.0, 0.0),
    "relu": (0.0, 1.0),
    "relu6": (0.0, 1.0),
    "leaky_relu": (0.0, 0.99),
    "silu": (0.5, 0.0),
    "swish": (0.5, 0.0),
    "hardswish": (1 / 3, 0.5),
    "hardsigmoid": (0.0, 1 / 6),
    "gelu": (0.8, 0.0),
    "gelu_tanh": (0.8, 0.0),
    "tanh": (0.77, 0.0),
    "sigmoid": (0.1, 0.0),
}

REFERENCE_FN = {
    "identity": lambda x: x,
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "silu": F.silu,
    "swish": F.silu,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def test_every_init_has_a_tolerance_entry():
    assert set(INIT_NAMES) == set(SMOOTHNESS) == set(REFERENCE_FN)


@pytest.mark.parametrize("init", INIT_NAMES)
@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_collecting_phase_is_exactly_the_init_function(init, granularity):
    nc = 3 if granularity == "channel" else None
    unit = PWLU(init=init, granularity=granularity, num_channels=nc)
    x = 4 * torch.randn(2, 3, 5, 5)
    assert unit.collecting
    for mode in (True, False):
        unit.train(mode)
        assert torch.equal(unit(x), REFERENCE_FN[init](x))


@pytest.mark.parametrize("init", INIT_NAMES)
def test_after_realign_equals_the_init_function_inside_the_bounds(init):
    unit = PWLU(init=init, granularity="channel", num_channels=2, dtype=F64)
    x = torch.randn(64, 2, 3, dtype=F64) * torch.tensor([1.0, 2.5], dtype=F64)[None, :, None]
    x = x + torch.tensor([0.3, -1.0], dtype=F64)[None, :, None]
    unit(x)
    unit.realign()
    assert not unit.collecting
    lb, rb = unit.left_bound.detach(), unit.right_bound.detach()
    d = (rb - lb) / unit.num_intervals
    t = torch.linspace(0, 1, 2001, dtype=F64)[:, None]
    grid = (lb + (rb - lb) * t).unsqueeze(-1)  # [2001, 2, 1], inside the bounds
    y = unit(grid)
    err = (y - REFERENCE_FN[init](grid)).abs()
    c2, jump = SMOOTHNESS[init]
    bound = d**2 / 8 * c2 + d / 4 * jump + 1e-12
    assert (err <= bound[None, :, None]).all()
    if init == "identity":
        torch.testing.assert_close(unit(4 * x), 4 * x, rtol=0, atol=1e-12)  # everywhere


def test_relu_after_realign_is_exact_away_from_the_interval_holding_zero():
    unit = PWLU(dtype=F64)
    unit(torch.randn(1000, dtype=F64) + 0.2)
    unit.realign()
    lb, rb = unit.left_bound.item(), unit.right_bound.item()
    assert lb < 0 < rb
    d = (rb - lb) / unit.num_intervals
    k = math.floor((0 - lb) / d)
    x = torch.linspace(lb - 5, rb + 5, 5001, dtype=F64)
    y = unit(x)
    away = (x < lb + k * d) | (x > lb + (k + 1) * d)
    torch.testing.assert_close(y[away], F.relu(x[away]), rtol=0, atol=1e-12)
    assert ((y - F.relu(x)).abs() <= d / 4 + 1e-12).all()


def test_statistics_momentum_eval_mode_and_realign_bounds():
    unit = PWLU(granularity="channel", num_channels=2, momentum=0.9, bound_std=2.0, dtype=F64)
    a = torch.randn(8, 2, 4, dtype=F64)
    b = 3 + 2 * torch.randn(8, 2, 4, dtype=F64)
    unit(a)
    unit(b)
    unit.eval()
    unit(100 + torch.randn(8, 2, 4, dtype=F64))  # eval mode: no update
    var_a, mean_a = torch.var_mean(a, dim=(0, 2), correction=0)
    var_b, mean_b = torch.var_mean(b, dim=(0, 2), correction=0)
    torch.testing.assert_close(unit.running_mean, 0.9 * mean_a + 0.1 * mean_b)
    torch.testing.assert_close(unit.running_var, 0.9 * var_a + 0.1 * var_b)
    assert int(unit.num_batches_tracked) == 2
    unit.realign()
    std = unit.running_var.sqrt()
    torch.testing.assert_close(unit.left_bound.detach(), unit.running_mean - 2.0 * std)
    torch.testing.assert_close(unit.right_bound.detach(), unit.running_mean + 2.0 * std)
    assert unit.left_slope.tolist() == [0.0, 0.0] and unit.right_slope.tolist() == [1.0, 1.0]


def test_layer_statistics_and_sequence_channel_dim():
    unit = PWLU(granularity="channel", num_channels=5, channel_dim=-1)
    x = torch.randn(3, 7, 5) * torch.arange(1, 6)
    unit(x)
    var, mean = torch.var_mean(x, dim=(0, 1), correction=0)
    torch.testing.assert_close(unit.running_mean, mean)
    torch.testing.assert_close(unit.running_var, var)
    layer = PWLU()
    layer(x)
    var, mean = torch.var_mean(x, correction=0)
    torch.testing.assert_close(layer.running_mean, mean.reshape(1))
    torch.testing.assert_close(layer.running_var, var.reshape(1))


def test_constant_input_gives_a_usable_grid():
    unit = PWLU()
    unit(torch.full((10,), 2.0))
    unit.realign()
    assert (unit.right_bound > unit.left_bound).all()
    y = unit(torch.tensor([2.0, 5.0, -1.0]))
    # ReLU's kink lies left of the tiny grid, so the paper's rule (K_L = 0) makes the left ray flat at
    # f(B_L) ~ 2: exact only on the grid's side of the kink.
    torch.testing.assert_close(y, torch.tensor([2.0, 5.0, 2.0]), rtol=0, atol=1e-3)


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_an_all_zero_dead_channel_still_gets_a_grid(granularity):
    """A dead unit sees only zeros (mean 0, variance 0): the std floor 1e-4 * (1 + |mean|) still separates its
    bounds, B_L = -3e-4 < B_R = 3e-4, and the unit stays the init function around 0."""
    channels = 2 if granularity == "channel" else None
    unit = PWLU(granularity=granularity, num_channels=channels, channel_dim=1)
    x = torch.zeros(8, 2, 3)
    if channels:
        x[:, 1] = 2 * torch.randn(8, 3)  # channel 0 is dead, channel 1 alive
    unit(x)
    unit.realign()
    torch.testing.assert_close(unit.left_bound[0], torch.tensor(-3e-4), rtol=1e-3, atol=0)
    torch.testing.assert_close(unit.right_bound[0], torch.tensor(3e-4), rtol=1e-3, atol=0)
    probe = torch.tensor([-1.0, -1e-4, 0.0, 1e-4, 1.0])
    y = unit(torch.stack([probe, probe], dim=1).unsqueeze(-1))  # [5, 2, 1]: the probe in both channels
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(y[:, 0, 0], F.relu(probe), rtol=0, atol=1e-7)


def test_channel_granularity_equals_layer_units_channel_by_channel():
    torch.manual_seed(1)
    unit = PWLU(num_intervals=6, granularity="channel", num_channels=3, dtype=F64, collect=False)
    with torch.no_grad():
        for p in unit.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = 3 * torch.randn(4, 3, 5, dtype=F64)
    y = unit(x)
    for c in range(3):
        layer = PWLU(num_intervals=6, dtype=F64, collect=False)
        with torch.no_grad():
            for name in ("points", "left_bound", "right_bound", "left_slope", "right_slope"):
                getattr(layer, name).copy_(getattr(unit, name)[c : c + 1])
        torch.testing.assert_close(y[:, c], layer(x[:, c]), rtol=0, atol=0)
    # and the statistics: a channel unit's per-channel stats equal a layer unit's on that channel
    collecting = PWLU(granularity="channel", num_channels=3, dtype=F64)
    collecting(x)
    for c in range(3):
        layer = PWLU(dtype=F64)
        layer(x[:, c])
        torch.testing.assert_close(collecting.running_mean[c : c + 1], layer.running_mean)
        torch.testing.assert_close(collecting.running_var[c : c + 1], layer.running_var)


def test_learning_phase_trains_every_parameter():
    unit = PWLU(num_intervals=8, granularity="channel", num_channels=2)
    x = 2 * torch.randn(16, 2, 6)
    unit(x)
    unit.realign()
    x = 3 * x  # reaches beyond the bounds on both sides
    loss = (unit(x) - torch.sin(x)).pow(2).mean()
    loss.backward()
    for name, p in unit.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_round_trip_keeps_the_phase():
    unit = PWLU(init="silu")
    unit(torch.randn(20))
    unit.realign()
    buf = io.BytesIO()
    torch.save(unit.state_dict(), buf)
    buf.seek(0)
    fresh = PWLU(init="silu")
    assert fresh.collecting
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert not fresh.collecting
    x = torch.randn(50)
    torch.testing.assert_close(fresh(x), unit(x))
    clone = copy.deepcopy(unit)
    torch.testing.assert_close(clone(x), unit(x))
    fresh.reset_parameters()
    assert fresh.collecting and int(fresh.num_batches_tracked) == 0


def test_realign_pwlu_helper():
    model = nn.Sequential(nn.Linear(4, 6), PWLU(), nn.Linear(6, 6), PWLU(init="silu"), PWLU())
    model(torch.randn(5, 4))
    assert realign_pwlu(model) == 3
    assert realign_pwlu(model) == 0  # nothing left collecting
    fresh = nn.Sequential(PWLU(), nn.Linear(2, 2), PWLU())
    fresh[0](torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="2"):
        realign_pwlu(fresh)
    assert fresh[0].collecting  # all-or-nothing


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_non_finite_batches_are_skipped_while_collecting(granularity):
    """A batch holding NaN or an infinity changes neither the statistics nor the batch count."""
    nc = 3 if granularity == "channel" else None
    unit = PWLU(granularity=granularity, num_channels=nc, dtype=F64)
    clean = PWLU(granularity=granularity, num_channels=nc, dtype=F64)
    a = torch.randn(8, 3, 5, dtype=F64)
    b = 2 + 3 * torch.randn(8, 3, 5, dtype=F64)
    bad_nan, bad_inf, bad_big = a.clone(), a.clone(), a.clone()
    bad_nan[0, 1, 2] = float("nan")
    bad_inf[3, 0, 0] = -float("inf")
    bad_big[0, 0, 0] = 1e300  # finite, but its square overflows the variance
    for batch in (bad_nan, a, bad_inf, bad_big, b):
        unit(batch)
    for batch in (a, b):
        clean(batch)
    assert int(unit.num_batches_tracked) == 2
    torch.testing.assert_close(unit.running_mean, clean.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(unit.running_var, clean.running_var, rtol=0, atol=0)
    realign_pwlu(unit)
    clean.realign()
    x = 4 * torch.randn(6, 3, 5, dtype=F64)
    y = unit(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, clean(x), rtol=0, atol=0)


def test_only_non_finite_batches_leave_nothing_to_realign():
    unit = PWLU()
    unit(torch.tensor([1.0, float("nan")]))
    assert int(unit.num_batches_tracked) == 0
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        unit.realign()
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        realign_pwlu(nn.Sequential(unit))
    unit(torch.tensor([1.0, 3.0]))  # the first finite batch initialises the statistics
    assert unit.running_mean.item() == 2.0 and unit.running_var.item() == 1.0


def test_realign_refuses_non_finite_statistics():
    unit = PWLU()
    unit(torch.randn(10))
    state = unit.state_dict()
    state["running_var"] = torch.tensor([float("inf")])
    unit.load_state_dict(state)
    with pytest.raises(RuntimeError, match="finite"):
        unit.realign()
    model = nn.Sequential(nn.Linear(2, 2), unit)
    with pytest.raises(RuntimeError, match="non-finite statistics: 1"):
        realign_pwlu(model)
    assert unit.collecting


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_empty_batches_in_both_phases(granularity):
    nc = 4 if granularity == "channel" else None
    unit = PWLU(granularity=granularity, num_channels=nc)
    empty = torch.empty(0, 4, 3, 3, requires_grad=True)
    out = unit(empty)  # collecting, training mode: nothing to track
    assert out.shape == (0, 4, 3, 3) and int(unit.num_batches_tracked) == 0
    unit(torch.randn(2, 4, 3, 3))
    unit.realign()
    out = unit(empty)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert empty.grad.shape == (0, 4, 3, 3)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in unit.parameters())


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"num_intervals": 0}, ValueError, "num_intervals"),
        ({"num_intervals": -2}, ValueError, "num_intervals"),
        ({"num_intervals": 2.5}, TypeError, "num_intervals"),
        ({"init": "softplus"}, ValueError, "init"),
        ({"granularity": "model"}, ValueError, "granularity"),
        ({"granularity": "channel"}, ValueError, "num_channels"),
        ({"granularity": "channel", "num_channels": 0}, ValueError, "num_channels"),
        ({"num_channels": 4}, ValueError, "num_channels"),
        ({"bound_std": 0.0}, ValueError, "bound_std"),
        ({"bound_std": -1.0}, ValueError, "bound_std"),
        ({"bound_std": float("nan")}, ValueError, "bound_std"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"left_bound": 1.0, "right_bound": 1.0}, ValueError, "left_bound"),
        ({"left_bound": float("inf")}, ValueError, "left_bound"),
        ({"channel_dim": 1.0}, TypeError, "channel_dim"),
        ({"collect": 1}, TypeError, "collect"),
        # factory keywords go to torch.empty, which checks them
        ({"dtype": torch.int32}, RuntimeError, "Only Tensors of floating point"),
        ({"dtype": "float32"}, TypeError, "argument 'dtype' must be torch.dtype"),
        ({"device": "gpu"}, RuntimeError, "device string: gpu"),
        ({"device": 3.5}, TypeError, "argument 'device' must be torch.device"),
        ({"negative_slope": float("nan")}, ValueError, "negative_slope"),
        ({"right_bound": -4.0}, ValueError, "left_bound must be smaller"),
        ({"momentum": "0.9"}, TypeError, "momentum"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PWLU(**kwargs)


def test_bad_forward_inputs_and_realign_before_statistics():
    unit = PWLU(granularity="channel", num_channels=3)
    with pytest.raises(ValueError, match="3 channels"):
        unit(torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        unit(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        unit([1.0, 2.0])
    with pytest.raises(RuntimeError, match="no.*statistics|none were collected"):
        unit.realign()
    unit.eval()
    unit(torch.randn(2, 3))  # eval mode collects nothing
    with pytest.raises(RuntimeError, match="none were collected"):
        unit.realign()
    seq = PWLU(granularity="channel", num_channels=3, channel_dim=2)
    with pytest.raises(ValueError, match="channel_dim"):
        seq(torch.randn(4, 3))


def test_bad_functional_arguments():
    x = torch.randn(2, 3, 4)
    pts = torch.randn(3, 5)
    ok = (torch.zeros(3) - 1, torch.ones(3), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="at least 2 knots"):
        pwlu(x, torch.randn(1, 1), -1.0, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="points has 3 rows"):
        pwlu(torch.randn(2, 4, 4), pts, *ok)
    with pytest.raises(ValueError, match="left_bound"):
        pwlu(x, pts, torch.zeros(2), *ok[1:])
    with pytest.raises(TypeError, match="x must be a floating-point"):
        pwlu(x.long(), pts, *ok)
    with pytest.raises(TypeError, match="points"):
        pwlu(x, pts.long(), *ok)
    with pytest.raises(ValueError, match="channel_dim"):
        pwlu(x, pts, *ok, channel_dim=3)
    with pytest.raises(TypeError, match="right_slope"):
        pwlu(x, pts, *ok[:3], "1")
    with pytest.raises(ValueError, match="points must have 1 or 2 dimensions"):
        pwlu(x, torch.randn(1, 3, 5), *ok)
    with pytest.raises(TypeError, match="points must be a torch.Tensor"):
        pwlu(x, [[0.0, 1.0]], *ok)
    with pytest.raises(TypeError, match="channel_dim must be an int"):
        pwlu(x, pts, *ok, channel_dim=1.0)
    with pytest.raises(TypeError, match="left_bound must be a tensor or a finite number, got bool True"):
        pwlu(x, pts, True, 1.0, 0.0, 1.0)
    with pytest.raises(TypeError, match="left_slope must be a floating-point tensor"):
        pwlu(x, pts, -1.0, 1.0, torch.zeros(3, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="x is on meta but points is on cpu"):
        pwlu(x.to("meta"), pts, *ok)
    with pytest.raises(ValueError, match="right_bound is on meta but points is on cpu"):
        pwlu(x, pts, ok[0], ok[1].to("meta"), *ok[2:])


@pytest.mark.parametrize(
    "bounds_and_slopes,match",
    [
        ((1.0, 1.0, 0.0, 1.0), "left_bound must be smaller than right_bound, got 1.0 and 1.0"),
        ((2.0, -2.0, 0.0, 1.0), "left_bound must be smaller than right_bound"),
        ((float("nan"), 1.0, 0.0, 1.0), "left_bound must be a tensor or a finite number, got nan"),
        ((-1.0, float("inf"), 0.0, 1.0), "right_bound must be a tensor or a finite number, got inf"),
        ((-1.0, 1.0, float("-inf"), 1.0), "left_slope must be a tensor or a finite number, got -inf"),
        ((-1.0, 1.0, 0.0, float("nan")), "right_slope must be a tensor or a finite number, got nan"),
    ],
)
def test_functional_python_number_parameters_are_checked(bounds_and_slopes, match):
    with pytest.raises(ValueError, match=match):
        pwlu(torch.randn(5), torch.randn(1, 4), *bounds_and_slopes)


def test_functional_tensor_parameters_are_checked_on_the_cpu():
    x, pts = torch.randn(2, 3, 4), torch.randn(3, 5)
    lb, rb, ks, kr = -torch.ones(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    rb_bad = rb.clone()
    rb_bad[1] = -1.0  # row 1: B_R == B_L
    with pytest.raises(ValueError, match="row 1 has left_bound=-1.0 and right_bound=-1.0"):
        pwlu(x, pts, lb, rb_bad, ks, kr)
    with pytest.raises(ValueError, match="left_bound must be smaller than right_bound on every row"):
        pwlu(x, pts, torch.tensor(2.0), 1.0, 0.0, 1.0)  # a tensor bound against a number
    pts_bad = pts.clone()
    pts_bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="points must be finite"):
        pwlu(x, pts_bad, lb, rb, ks, kr)
    with pytest.raises(ValueError, match="right_slope must be finite"):
        pwlu(x, pts, lb, rb, ks, torch.full((3,), float("inf")))
    # the module's parameters go through the same check
    unit = PWLU(collect=False)
    with torch.no_grad():
        unit.left_bound.fill_(5.0)
    with pytest.raises(ValueError, match="left_bound must be smaller than right_bound"):
        unit(torch.randn(3))


def test_bad_conversion_arguments():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(ValueError, match="example_inputs"):
        convert_activations_to_pwlu(model, granularity="channel")
    with pytest.raises(TypeError, match="activations"):
        convert_activations_to_pwlu(model, activations=(nn.Linear,))
    with pytest.raises(TypeError, match="model"):
        convert_activations_to_pwlu("not a model")
    with pytest.raises(ValueError, match="granularity"):
        convert_activations_to_pwlu(model, granularity="tensor")
    unreached = nn.ModuleDict({"used": nn.ReLU(), "unused": nn.ReLU()})
    unreached.forward = lambda x: unreached["used"](x)
    with pytest.raises(ValueError, match="did not reach"):
        convert_activations_to_pwlu(unreached, granularity="channel", example_inputs=torch.randn(2, 3))

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 5)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(self.act(x)))

    with pytest.raises(ValueError, match="several"):
        convert_activations_to_pwlu(Shared(), granularity="channel", example_inputs=torch.randn(2, 3))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"activations": nn.ReLU()}, TypeError, "activations must be a sequence"),
        ({"activations": ()}, ValueError, "activations must name at least one"),
        ({"num_intervals": 0}, ValueError, "num_intervals"),
        ({"channel_dim": "1"}, TypeError, "channel_dim"),
        ({"bound_std": -1.0}, ValueError, "bound_std"),
        ({"momentum": 2.0}, ValueError, "momentum"),
        ({"dtype": torch.int64}, RuntimeError, "Only Tensors of floating point"),
        ({"device": "tpu0"}, RuntimeError, "device string: .?tpu0"),
        ({"predicate": "relu"}, TypeError, "predicate"),
        ({"granularity": "channel", "example_inputs": {1: 1}}, TypeError, "example_inputs is a mapping whose keys"),
        ({"granularity": "channel", "example_inputs": "abc"}, TypeError, "example_inputs must be a tensor"),
    ],
)
def test_bad_conversion_options(kwargs, exc, match):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(exc, match=match):
        convert_activations_to_pwlu(model, **kwargs)
    assert isinstance(model[1], nn.ReLU)  # nothing converted


def test_conversion_with_a_wrong_example_names_the_argument():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2), nn.ReLU())
    with pytest.raises(ValueError, match=r"example_inputs do not fit the model.*\(2, 4, 8, 8\)") as info:
        convert_activations_to_pwlu(model, granularity="channel", example_inputs=torch.randn(2, 4, 8, 8))
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error, chained
    with pytest.raises(ValueError, match="example_inputs do not fit the model"):
        convert_activations_to_pwlu(model, granularity="channel", example_inputs=(torch.randn(2, 3, 8, 8), 5))
    assert isinstance(model[1], nn.ReLU) and isinstance(model[4], nn.ReLU)
    # a channel_dim that does not exist in an activation's input is named as such, not as a model error
    with pytest.raises(ValueError, match="channel_dim=3 is out of range for the input of '4'"):
        convert_activations_to_pwlu(model, granularity="channel", channel_dim=3, example_inputs=torch.randn(2, 3, 8, 8))
    names = convert_activations_to_pwlu(model, granularity="channel", example_inputs=[torch.randn(2, 3, 8, 8)])
    assert names == ["1", "4"] and model[1].num_channels == 8 and model[4].num_channels == 2


def test_realign_pwlu_checks_its_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        realign_pwlu([PWLU()])
    with pytest.raises(TypeError, match="synchronize must be a bool"):
        realign_pwlu(PWLU(), synchronize="yes")


# ------------------------------------------------------------------------------------------------
# conversion of real models


def test_conversion_keeps_init_functions_and_modes():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.GELU(approximate="tanh"), nn.ReLU6(inplace=True), nn.Hardsigmoid()
    ).eval()
    x = 5 * torch.randn(6, 3)
    y0 = model(x)
    names = convert_activations_to_pwlu(model)
    assert names == ["1", "2", "3"]  # the Hardsigmoid gate is not in the default list
    assert [m.init for m in model if isinstance(m, PWLU)] == ["leaky_relu", "gelu_tanh", "relu6"]
    assert model[1].negative_slope == 0.2 and not model[1].training
    assert torch.equal(model(x), y0)
    names = convert_activations_to_pwlu(model, activations=(nn.Hardsigmoid,))
    assert names == ["4"]


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_torchvision_resnet18_and_mobilenet_v3_unchanged_right_after_conversion(granularity):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    for ctor, expected in ((torchvision.models.resnet18, 9), (torchvision.models.mobilenet_v3_small, 33)):
        model = ctor(weights=None).eval()
        with torch.no_grad():
            y0 = model(x)
        names = convert_activations_to_pwlu(model, granularity=granularity, example_inputs=x)
        assert len(names) == expected
        with torch.no_grad():
            assert torch.equal(model(x), y0)
    # mobilenet_v3: the squeeze-excitation ReLU is converted, its Hardsigmoid gate is not
    se = model.features[1].block[1]
    assert isinstance(se.activation, PWLU) and isinstance(se.scale_activation, nn.Hardsigmoid)


def test_resnet18_close_after_collect_and_realign():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y0 = model(x)
    convert_activations_to_pwlu(model)
    for m in model.modules():
        if isinstance(m, PWLU):
            m.train()  # collect while BatchNorm stays in eval mode
    with torch.no_grad():
        model(x)
        assert realign_pwlu(model) == 9
        y1 = model(x)
    # Documented tolerance (docs/guide/pwlu.rst): with N = 16 each unit differs from ReLU only on the
    # interval holding 0 (by at most d/4) and beyond bounds that do not straddle 0; measured 2.2% here.
    rel = ((y1 - y0).norm() / y0.norm()).item()
    assert 0 < rel < 0.1


def test_mobilenet_v3_small_trains_after_conversion_and_realign():
    """torchvision's classifier runs Dropout(inplace=True) on the output of a converted Hardswish: the PWLU's
    output must take an in-place consumer, in the learning phase too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: intra-op threads only slow it down on a shared machine
    try:
        _train_mobilenet_v3_small_after_realign()
    finally:
        torch.set_num_threads(threads)


def _train_mobilenet_v3_small_after_realign():
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=4)
    assert isinstance(model.classifier[2], nn.Dropout) and model.classifier[2].inplace
    report = convert_activations_to_pwlu(model)
    assert "classifier.1" in report and isinstance(model.classifier[1], PWLU)
    x, target = torch.randn(4, 3, 32, 32), torch.randint(4, (4,))
    with torch.no_grad():
        model(x)  # training mode: every PWLU collects
    assert realign_pwlu(model) == len(report)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert model.classifier[1].points.grad is not None and model.classifier[1].points.grad.abs().sum() > 0


IN_PLACE_CONSUMERS = {
    "relu_": lambda y: y.relu_(),
    "add_": lambda y: y.add_(torch.ones_like(y)),  # a residual sum, out += identity
    "dropout": lambda y: F.dropout(y, 0.5, training=True, inplace=True),
}
OUT_OF_PLACE = {
    "relu_": lambda y: y.relu(),
    "add_": lambda y: y + torch.ones_like(y),
    "dropout": lambda y: F.dropout(y, 0.5, training=True),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("consumer", IN_PLACE_CONSUMERS)
def test_the_output_may_be_modified_in_place(kernel, layout, consumer):
    """Gradients through an in-place consumer of the output equal those through its out-of-place twin."""
    x0 = torch.randn(2, 3, 4, 6, dtype=F64)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x0 = x0[..., ::2]

    def grads(apply):
        x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
        params = random_params(3, 5, gen=torch.Generator().manual_seed(1))
        y = KERNELS[kernel](x, *params, channel_dim=1)
        assert y._base is None and (layout == "strided" or y.stride() == x0.stride())
        torch.manual_seed(2)  # the same dropout mask for both
        out = apply(y)
        torch.autograd.backward(out, torch.cos(out.detach()))
        return [x.grad, *(p.grad for p in params)]

    for a, b in zip(grads(IN_PLACE_CONSUMERS[consumer]), grads(OUT_OF_PLACE[consumer])):
        torch.testing.assert_close(a, b)


def test_convnext_atto_gelus_are_converted():
    """timm's GELU is not nn.GELU: it is recognised as its kind, so a ConvNeXt's activations are converted."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: intra-op threads only slow it down on a shared machine
    try:
        _convert_convnext_atto()
    finally:
        torch.set_num_threads(threads)


def _convert_convnext_atto():
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y0 = model(x)
    report = convert_activations_to_pwlu(model)
    expected = [n for n, m in timm.create_model("convnext_atto").named_modules() if type(m).__name__ == "GELU"]
    assert isinstance(report, ConversionReport) and list(report) == expected and len(expected) == 12
    assert all(m.init == "gelu" for m in model.modules() if isinstance(m, PWLU))
    with torch.no_grad():
        assert torch.equal(model(x), y0)


@pytest.mark.parametrize("name", sorted(TIMM_ACTIVATIONS))
def test_every_recognised_timm_activation_is_reproduced(name):
    module = importlib.import_module("timm.layers.activations_me" if name.endswith("Me") else "timm.layers.activations")
    act = getattr(module, name)()
    model = nn.Sequential(act)
    x = 4 * torch.randn(200)
    y0 = act(x.clone())
    kind = {"GELU": nn.GELU, "GELUTanh": nn.GELU, "Swish": nn.SiLU, "SwishMe": nn.SiLU}
    kind.update({"Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh})
    kind.update(dict.fromkeys(["HardSwish", "HardSwishMe"], nn.Hardswish))
    kind.update(dict.fromkeys(["HardSigmoid", "HardSigmoidMe"], nn.Hardsigmoid))
    assert convert_activations_to_pwlu(model, activations=kind[name]) == ["0"]
    assert model[0].init == TIMM_ACTIVATIONS[name]
    torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-6)
    # and a timm class may name the kind itself
    assert convert_activations_to_pwlu(nn.Sequential(getattr(module, name)()), activations=[type(act)]) == ["0"]


def test_conversion_reports_what_it_skipped_and_warns_when_nothing_was_converted():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Hardsigmoid(), nn.Mish(), nn.Identity(), nn.ReLU())
    report = convert_activations_to_pwlu(model, predicate=lambda name, m: name != "5")
    assert report == ["1"]
    assert report.skipped == {
        "2": "Hardsigmoid is not among activations",
        "3": "no PWLU init reproduces Mish",
        "5": "predicate returned False",
    }
    assert "skipped 5: predicate returned False" in report.summary()
    with pytest.warns(UserWarning, match="nothing was converted: skipped 0: no PWLU init reproduces Mish"):
        assert convert_activations_to_pwlu(nn.Sequential(nn.Mish(), nn.Linear(2, 2))) == []
    with pytest.warns(UserWarning, match="nothing was converted: the model has no activation module to convert"):
        assert convert_activations_to_pwlu(nn.Linear(2, 2)) == []


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_torchscript_models_are_refused_and_scripted_parts_left_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    scripted = torch.jit.script(model)
    with pytest.raises(TypeError, match="model is a TorchScript module .*Convert the eager model first"):
        convert_activations_to_pwlu(scripted)
    with pytest.raises(TypeError, match="model is a TorchScript module"):
        convert_activations_to_pwlu(torch.jit.trace(model, torch.randn(2, 3)))
    outer = nn.Sequential(scripted, nn.ReLU())
    report = convert_activations_to_pwlu(outer)
    assert report == ["1"]
    reason = "a TorchScript module: nothing inside it can be converted (convert before scripting)"
    assert report.skipped == {"0": reason}


def test_threaded_fast_path_matches_one_thread_and_is_reproducible():
    """Large CPU inputs split their chunks between torch.get_num_threads() threads."""
    x = torch.randn(8, 16, 48, 48, generator=torch.Generator().manual_seed(3))
    points = torch.randn(16, 17, generator=torch.Generator().manual_seed(4))
    bounds = (torch.full((16,), -2.0), torch.full((16,), 2.5), torch.full((16,), 0.1), torch.full((16,), 0.9))
    chunk = eager.CHUNK_BYTES // 4
    pieces = -(-x.numel() // chunk)
    saved = torch.get_num_threads()

    def run(threads, dtype=torch.float32):
        torch.set_num_threads(threads)
        xi = x.to(dtype).clone().requires_grad_()
        params = [points.to(dtype).clone().requires_grad_()] + [b.to(dtype).clone().requires_grad_() for b in bounds]
        y = pwlu(xi, *params, channel_dim=1)
        y.backward(torch.cos(x).to(dtype))
        return [y.detach(), xi.grad] + [p.grad for p in params]

    try:
        torch.set_num_threads(2)
        assert eager._workers(x, pieces) == 2  # the split really happens at this size
        one, two, again = run(1), run(2), run(2)
        exact = run(1, torch.float64)
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(two, again):
        assert torch.equal(a, b)  # bit-identical repeats
    for a, b in zip(one[:2], two[:2]):
        assert torch.equal(a, b)  # elementwise outputs do not depend on the split
    for a, b, ref in zip(one[2:], two[2:], exact[2:]):
        # parameter gradients are sums over the batch: the threaded split only regroups them, so it is as
        # accurate as the serial path (measured against float64)
        err_one = (a.double() - ref).abs().max()
        err_two = (b.double() - ref).abs().max()
        assert err_two <= 2 * err_one + 1e-6 * ref.abs().max()


def _threaded_call_in_child(queue):
    # ATen's own OpenMP ops hang in a child forked after the parent used them (hence DataLoader workers run on
    # one thread): only the PWLU call, whose ops stay below ATen's grain, runs with two threads
    torch.set_num_threads(1)
    x, points = torch.randn(8, 16, 48, 48), torch.randn(1, 9)
    torch.set_num_threads(2)
    y = pwlu(x, points, -1.0, 1.0, 0.0, 1.0)
    torch.set_num_threads(1)
    queue.put(torch.equal(y, pwlu(x, points, -1.0, 1.0, 0.0, 1.0)))


def test_the_worker_threads_are_kept_between_calls_and_restarted_after_fork():
    x = torch.randn(8, 16, 48, 48)
    saved = torch.get_num_threads()

    def workers():
        return {t.ident for t in threading.enumerate() if t.name.startswith("pycoe-pwlu")}

    try:
        torch.set_num_threads(2)
        assert eager._workers(x, -(-x.numel() // (eager.CHUNK_BYTES // 4))) == 2
        xg = x.clone().requires_grad_()
        pwlu(xg, torch.randn(1, 9), -1.0, 1.0, 0.0, 1.0).sum().backward()
        first = workers()
        for _ in range(3):
            pwlu(xg, torch.randn(1, 9), -1.0, 1.0, 0.0, 1.0).sum().backward()
        assert first and workers() == first  # one pool, no new thread per call
        # a forked child (a DataLoader worker) has none of the parent's threads: it must start its own pool
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_threaded_call_in_child, args=(queue,))
        child.start()
        child.join(timeout=60)
        if child.exitcode is None:
            child.kill()  # hung: its pool is the parent's, whose threads do not exist in the child
        assert child.exitcode == 0 and queue.get(timeout=1) is True
    finally:
        torch.set_num_threads(saved)


# ------------------------------------------------------------------------------------------------
# export: torch.export and ONNX (onnxruntime) of a realigned model, dynamic batch


def _realigned_net() -> nn.Module:
    """A small CNN with a channel PWLU and a layer PWLU, statistics collected and realigned, in eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(64, 5)
    )
    convert_activations_to_pwlu(net, predicate=lambda name, m: name == "3")  # layer granularity
    convert_activations_to_pwlu(net, granularity="channel", num_intervals=8, example_inputs=torch.randn(1, 3, 6, 6))
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 3, 6, 6))
    assert realign_pwlu(net) == 2
    with torch.no_grad():  # move the learned function away from its init, as training would
        for m in net.modules():
            if isinstance(m, PWLU):
                m.points.add_(0.1 * torch.randn_like(m.points))
    return net.eval()


@pytest.mark.slow
def test_torch_export_with_a_dynamic_batch_matches_eager():
    net = _realigned_net()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(net, (torch.randn(3, 3, 6, 6),), dynamic_shapes={"input": {0: batch}})
    exported = program.module()
    for b in (1, 5, 64):
        x = 3 * torch.randn(b, 3, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), net(x), rtol=1e-5, atol=1e-5)
    # a unit still collecting exports as its init function
    collecting = nn.Sequential(nn.Linear(4, 4), PWLU(init="silu")).eval()
    program = torch.export.export(collecting, (torch.randn(3, 4),), dynamic_shapes={"input": {0: batch}})
    x = torch.randn(7, 4)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), collecting(x), rtol=0, atol=0)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_and_matches_eager(tmp_path):
    import onnxruntime as ort  # the `deploy` extra (part of `test`)

    net = _realigned_net()
    path = tmp_path / "pwlu.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        net, (torch.randn(3, 3, 6, 6),), str(path), dynamo=True, dynamic_shapes={"input": {0: batch}}, verbose=False
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for b in (1, 5, 64):
        x = 3 * torch.randn(b, 3, 6, 6)
        (out,) = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), net(x), rtol=1e-5, atol=1e-5)
