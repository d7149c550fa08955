"""Dividing a network into S narrower ones (pycoe.cotrain.divide) and the regularisation helpers."""

import itertools
import math

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from pycoe.cotrain import (
    DivisionError,
    count_parameters,
    divide_by_factory,
    divide_module,
    round_to_multiple,
    search_width,
)
from pycoe.cotrain.schedule import LinearWarmup, scale_dropout, scale_dropout_modules, scale_weight_decay

pytestmark = pytest.mark.usefixtures("one_thread")


def _ratio(model, num_splits, **kwargs):
    members = divide_module(model, num_splits, **kwargs)
    assert len(members) == num_splits
    counts = {count_parameters(m) for m in members}
    assert len(counts) == 1  # every member has the same architecture
    return counts.pop() / (count_parameters(model) / num_splits), members


# -- generic division: parameter ratios on torchvision models (construction + one small forward each) --------
@pytest.mark.parametrize(
    "name, num_splits, kwargs",
    [
        ("resnet18", 2, {}),
        ("resnet18", 4, {}),
        ("resnet50", 2, {}),
        ("wide_resnet50_2", 2, {}),
        ("resnext50_32x4d", 2, {}),
        ("resnext50_32x4d", 2, {"divide_groups": True}),
        ("resnext50_32x4d", 4, {"divide_groups": True}),
        ("mobilenet_v3_large", 2, {}),
        ("efficientnet_b0", 4, {}),
    ],
)
def test_divided_parameter_ratio(name, num_splits, kwargs):
    model = getattr(tvm, name)(weights=None)
    ratio, members = _ratio(model, num_splits, **kwargs)
    assert 0.9 <= ratio <= 1.1, f"{name} S={num_splits}: {ratio:.3f}"
    first = members[0]
    # input channels and number of classes are kept
    convs = [m for m in first.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 3
    linears = [m for m in first.modules() if isinstance(m, nn.Linear)]
    assert linears[-1].out_features == 1000
    # every divided conv is narrower than the original somewhere, and groups divide
    for conv in convs:
        assert conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0


def test_divide_groups_keeps_width_per_group():
    model = tvm.resnext50_32x4d(weights=None)
    (member,) = divide_module(model, 2, divide_groups=True)[:1]
    conv, ref = member.layer1[0].conv2, model.layer1[0].conv2
    assert conv.groups == ref.groups // 2 == 16
    assert conv.in_channels // conv.groups == ref.in_channels // ref.groups  # 4 channels per group
    assert conv.out_channels == ref.out_channels // 2


def test_default_divide_keeps_groups_and_rounds_to_them():
    model = tvm.resnext50_32x4d(weights=None)
    member = divide_module(model, 2)[0]
    conv = member.layer1[0].conv2
    assert conv.groups == 32 and conv.in_channels % 32 == 0


def test_sqrt_rule_and_depthwise():
    model = tvm.mobilenet_v2(weights=None)
    member = divide_module(model, 4, width_multiplier="sqrt", multiple=8)[0]
    # the first conv 3 -> 32 becomes 3 -> round(32 / 2) = 16
    assert member.features[0][0].out_channels == 16
    for m in member.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels  # depthwise stays depthwise
    x = torch.randn(2, 3, 32, 32)
    assert member.eval()(x).shape == (2, 1000)


def test_divided_resnet_forward_and_residual_widths():
    model = tvm.resnet18(weights=None, num_classes=7)
    members = divide_module(model, 2, width_multiplier="sqrt")
    m = members[0].eval()
    assert m(torch.randn(2, 3, 48, 48)).shape == (2, 7)
    assert m.conv1.out_channels == round_to_multiple(64 / math.sqrt(2), 8) == 48
    assert m.layer4[1].conv2.out_channels == 360  # 512 / sqrt(2) = 362.04 -> 360
    # independent initialisations, same structure
    w0, w1 = members[0].conv1.weight, members[1].conv1.weight
    assert w0.shape == w1.shape and not torch.equal(w0, w1)


def test_identical_init_and_init_fn():
    model = tvm.resnet18(weights=None)
    members = divide_module(model, 2, identical_init=True)
    for a, b in zip(members[0].state_dict().values(), members[1].state_dict().values()):
        assert torch.equal(a, b)

    def zero_bias(module):
        if isinstance(module, nn.Linear):
            nn.init.constant_(module.bias, 3.0)

    member = divide_module(model, 2, init_fn=zero_bias)[0]
    assert torch.all(member.fc.bias == 3.0)


def test_flatten_into_linear_and_layernorm_mlp():
    cnn = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.Flatten(),
        nn.Linear(64 * 14 * 14, 10),
    )
    member = divide_module(cnn, 4, example_input=torch.randn(1, 1, 28, 28), width_multiplier="sqrt")[0]
    assert member[5].in_features == 32 * 14 * 14  # the spatial factor follows the flattened map
    assert member(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    mlp = nn.Sequential(nn.Linear(20, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    member = divide_module(mlp, 4, example_input=torch.randn(2, 20), width_multiplier="sqrt")[0]
    assert [member[0].out_features, member[1].normalized_shape, member[5].out_features] == [32, (32,), 5]


def test_s1_returns_a_copy_and_model_is_untouched():
    model = tvm.resnet18(weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (copy_,) = divide_module(model, 1)
    assert copy_ is not model
    assert all(torch.equal(before[k], v) for k, v in copy_.state_dict().items())
    divide_module(model, 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.fc.in_features == 512


# -- errors ----------------------------------------------------------------------------------------------
class _WithRawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.conv(x) * self.scale[:, None, None]


class _Unreached(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return self.conv(x)


def test_errors():
    model = tvm.resnet18(weights=None)
    with pytest.raises(ValueError, match="num_splits"):
        divide_module(model, 0)
    with pytest.raises(TypeError, match="model"):
        divide_module("resnet", 2)
    with pytest.raises(ValueError, match="width_multiplier"):
        divide_module(model, 2, width_multiplier="cube")
    with pytest.raises(DivisionError, match=r"'<root>' \(_WithRawParameter\)"):
        divide_module(_WithRawParameter(), 2)
    with pytest.raises(DivisionError, match=r"'unused'.*never reaches"):
        divide_module(_Unreached(), 2)
    with pytest.raises(DivisionError, match="groups of 'layer1.0.conv2'"):
        divide_module(tvm.resnext50_32x4d(weights=None), 3, divide_groups=True)  # 32 groups / 3
    with pytest.raises(DivisionError, match="example_input is required"):
        divide_module(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 2)
    with pytest.raises(DivisionError, match="failed on example_input"):
        divide_module(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 2, example_input=torch.randn(2, 5))


# -- splits the widths cannot make: members never wider than the model, S bounded by the widths ----------------
def _widths(model):
    return [
        (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]


def test_no_divided_width_exceeds_the_original():
    # GroupNorm(3, 12) under multiple=8 used to round the width 12 to lcm(8, 3) = 24; a width of 4 below the
    # multiple used to become 8: members larger than the model
    gn = nn.Sequential(
        nn.Conv2d(3, 12, 3),
        nn.GroupNorm(3, 12),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3),
        nn.GroupNorm(3, 12),
        nn.Conv2d(12, 5, 1),
    )
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 3))
    for model, example in ((gn, None), (mlp, torch.randn(2, 32))):
        member = divide_module(model, 2, example_input=example)[0]
        for (cin, cout), (cin0, cout0) in zip(_widths(member), _widths(model)):
            assert cin <= cin0 and cout <= cout0
        assert count_parameters(member) < count_parameters(model)
    member = divide_module(gn, 2)[0]
    assert member[1].num_groups == 3 and member[1].num_channels % 3 == 0 and member[1].num_channels < 12
    assert divide_module(mlp, 2, example_input=torch.randn(2, 32))[0][2].out_features < 4


def test_a_model_whose_widths_cannot_shrink_is_refused():
    at_multiple = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(DivisionError, match=r"244 of the model's 244 parameters.*with multiple=1, num_splits <= 9"):
        divide_module(at_multiple, 2, example_input=torch.randn(2, 16))
    assert len(divide_module(at_multiple, 2, multiple=1, example_input=torch.randn(2, 16))) == 2
    group_norm = nn.Sequential(nn.Conv2d(3, 32, 3), nn.GroupNorm(32, 32), nn.ReLU(), nn.Conv2d(32, 5, 1))
    with pytest.raises(DivisionError, match="too narrow to divide"):
        divide_module(group_norm, 2, multiple=1)
    # an explicit multiplier whose widths round back to the original's: members as large as the model
    wide = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(DivisionError, match="would not be smaller than the model: 340 parameters each"):
        divide_module(wide, 2, width_multiplier=0.9, example_input=torch.randn(2, 16))
    for multiplier in (1.0, 1.5):
        with pytest.raises(ValueError, match="a multiplier >= 1 does not make the members narrower"):
            divide_module(wide, 2, width_multiplier=multiplier, example_input=torch.randn(2, 16))


def test_num_splits_is_bounded_by_the_widths():
    mlp = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    x = torch.randn(2, 20)
    total = count_parameters(mlp)  # 5829
    narrowest = (20 * 8 + 8) + (8 * 8 + 8) + (8 * 5 + 5)  # every divided width at multiple=8: 285
    limit = math.floor(1.1 * total / narrowest)
    assert limit == 22
    members = divide_module(mlp, limit, example_input=x)
    assert len(members) == limit and count_parameters(members[0]) <= 1.1 * total / limit
    with pytest.raises(DivisionError, match=rf"num_splits=23 is more than .* use num_splits <= {limit} \(<= \d+ "):
        divide_module(mlp, limit + 1, example_input=x)
    # refused from the trace alone, before a single member is copied
    with pytest.raises(DivisionError, match=rf"num_splits={10**12} is more than"):
        divide_module(mlp, 10**12, example_input=x)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_splits": "2"}, TypeError, "num_splits must be a positive integer, got str '2'"),
        ({"num_splits": 2.0}, TypeError, "num_splits must be a positive integer, got float 2.0"),
        ({"num_splits": True}, TypeError, "num_splits must be a positive integer, got bool True"),
        ({"multiple": 0}, ValueError, "multiple must be a positive integer"),
        ({"multiple": "8"}, TypeError, "multiple must be a positive integer, got str"),
        ({"divide_groups": 1}, TypeError, "divide_groups must be a bool"),
        ({"identical_init": "yes"}, TypeError, "identical_init must be a bool"),
        ({"width_multiplier": float("inf")}, ValueError, r"width_multiplier must be .* a number in \(0, 1\), got inf"),
        ({"width_multiplier": float("nan")}, ValueError, r"width_multiplier must be .* a number in \(0, 1\), got nan"),
        ({"width_multiplier": 0.0}, ValueError, r"width_multiplier must be .* a number in \(0, 1\), got 0.0"),
        ({"width_multiplier": -0.5}, ValueError, r"width_multiplier must be .* a number in \(0, 1\), got -0.5"),
        ({"width_multiplier": 1.0}, ValueError, r"a number in \(0, 1\) \(a multiplier >= 1 does not make"),
        ({"width_multiplier": [0.5]}, TypeError, "width_multiplier must be 'match', 'sqrt' or a number .*, got list"),
        ({"width_multiplier": True}, TypeError, "width_multiplier must be 'match', 'sqrt' or a number in .*, got bool"),
        ({"width_multiplier": "cube"}, ValueError, "width_multiplier must be one of 'match', 'sqrt', got 'cube'"),
        ({"example_input": "image"}, TypeError, "example_input must be a tensor or a tuple"),
        ({"example_input": (1, 2)}, TypeError, "example_input must be a tensor or a tuple"),
        ({"init_fn": 3}, TypeError, r"init_fn must be callable \(module -> None\) or None, got int 3"),
    ],
)
def test_divide_module_bad_arguments(kwargs, error, message):
    kwargs = {"num_splits": 2, **kwargs}
    with pytest.raises(error, match=message):
        divide_module(_Tiny(), **kwargs)


def test_divide_module_explicit_multiplier_and_tuple_input():
    member = divide_module(_Tiny(), 2, width_multiplier=0.5, example_input=(torch.randn(2, 3, 8, 8),))[0]
    assert member.conv.out_channels == 8 and member.fc.in_features == 8 and member.fc.out_features == 4


def test_round_to_multiple_and_count_parameters_bad_input():
    assert round_to_multiple(11.3, 8) == 8 and round_to_multiple(12.0, 8) == 16 and round_to_multiple(1, 8) == 8
    with pytest.raises(ValueError, match="multiple must be a positive integer"):
        round_to_multiple(10, 0)
    with pytest.raises(TypeError, match="value must be a real number"):
        round_to_multiple("10", 8)
    with pytest.raises(ValueError, match="value must be a finite number"):
        round_to_multiple(float("inf"), 8)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        count_parameters([nn.Linear(2, 2)])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"factory": 3}, TypeError, "factory must be callable"),
        ({"num_splits": 0}, ValueError, "num_splits must be a positive integer"),
        ({"num_splits": 2.5}, TypeError, "num_splits must be a positive integer, got float"),
        ({"base_width": "64"}, TypeError, "base_width must be a real number, got str"),
        ({"base_width": float("inf")}, ValueError, "base_width must be a finite number > 0, got inf"),
        ({"base_width": float("nan")}, ValueError, "base_width must be a finite number > 0, got nan"),
        ({"base_width": 0}, ValueError, "base_width must be a finite number > 0"),
        ({"integer": "yes"}, TypeError, "integer must be a bool"),
        ({"integer": True, "base_width": 64.5}, ValueError, "base_width must be an integer when integer=True"),
        ({"rel_tol": "tight"}, TypeError, "rel_tol must be a real number, got str"),
        ({"rel_tol": 0.0}, ValueError, "rel_tol must be a finite number > 0"),
        ({"rel_tol": float("nan")}, ValueError, "rel_tol must be a finite number > 0"),
        ({"max_iter": 0}, ValueError, "max_iter must be a positive integer"),
        ({"max_iter": 1.5}, TypeError, "max_iter must be a positive integer, got float"),
        ({"candidates": 5}, TypeError, "candidates must be an iterable of widths or None, got int"),
        ({"candidates": "32"}, TypeError, "candidates must be an iterable of widths or None, got str"),
        ({"candidates": []}, ValueError, "candidates must not be empty"),
        ({"factory": lambda w: "net"}, TypeError, "factory must return an nn.Module, got str"),
    ],
)
@pytest.mark.parametrize("fn", [search_width, divide_by_factory])
def test_width_search_bad_arguments(fn, kwargs, error, message):
    kwargs = {"factory": _mlp, "num_splits": 2, "base_width": 64.0, **kwargs}
    with pytest.raises(error, match=message):
        fn(**kwargs)


def test_divide_by_factory_identical_init_must_be_a_bool():
    with pytest.raises(TypeError, match="identical_init must be a bool"):
        divide_by_factory(_mlp, 2, base_width=64.0, identical_init=1)


def test_search_width_ties_and_unreachable_targets():
    # an exactly reachable target: the width with the exact count wins
    res = search_width(_mlp, 2, base_width=64.0, candidates=[30, 40, 50])
    counts = {w: count_parameters(_mlp(w)) for w in (30, 40, 50)}
    assert res.width == min(counts, key=lambda w: abs(counts[w] - res.target)) and res.evaluations == 3
    # S = 1 keeps the base width whatever the candidates
    assert search_width(_mlp, 1, base_width=64.0, candidates=[8]).width == 64.0
    # a count that cannot go below the target: the largest width with the smallest count, not a vanishing one
    flat = search_width(lambda w: nn.Linear(10, 10) if w < 2 else nn.Linear(10, 100), 4, base_width=4.0)
    assert flat.params == 110 and flat.width >= 1.0


# -- division by a width factory ---------------------------------------------------------------------------
def test_search_width_continuous_and_integer():
    res = search_width(lambda w: tvm.mobilenet_v2(width_mult=w), 2)
    assert abs(res.ratio - 1) < 0.05 and 0.3 < res.width < 1.0
    from torchvision.models.resnet import Bottleneck, ResNet

    res = search_width(lambda w: ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=w), 2, 128, integer=True)
    assert isinstance(res.width, int) and abs(res.ratio - 1) < 0.05
    grid = search_width(lambda w: tvm.mobilenet_v2(width_mult=w), 2, candidates=[0.25, 0.5, 0.75, 1.0])
    assert grid.width == 0.5 and grid.evaluations == 4


def _mlp(width):
    w = max(1, round(width))
    return nn.Sequential(nn.Linear(10, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 3))


def test_divide_by_factory_builds_s_models():
    models = divide_by_factory(_mlp, 4, base_width=256.0)
    assert len(models) == 4
    ratio = count_parameters(models[0]) / (count_parameters(_mlp(256)) / 4)
    assert 0.98 < ratio < 1.02
    assert not torch.equal(models[0][0].weight, models[1][0].weight)
    same = divide_by_factory(_mlp, 2, base_width=256.0, identical_init=True)
    assert torch.equal(same[0][0].weight, same[1][0].weight)
    with pytest.raises(ValueError, match="num_splits"):
        divide_by_factory(_mlp, 0, base_width=64.0)
    with pytest.raises(TypeError, match="factory must return an nn.Module"):
        divide_by_factory(lambda w: "x", 2, base_width=64.0)
    with pytest.raises(ValueError, match="base_width"):
        divide_by_factory(_mlp, 2, base_width=-1.0)


# -- regularisation helpers and the warm-up -----------------------------------------------------------------
def test_weight_decay_and_dropout_rules():
    assert scale_weight_decay(1e-4, 1) == pytest.approx(1e-4)
    assert scale_weight_decay(1e-4, 2) == pytest.approx(1e-4 * math.exp(-0.5))
    assert scale_weight_decay(5e-4, 4) == pytest.approx(5e-4 * math.exp(0.25 - 1))
    assert scale_dropout(0.2, 4) == pytest.approx(0.05)
    assert scale_dropout(0.2, 4, rule="sqrt") == pytest.approx(0.1)
    assert scale_dropout(0.2, 4, rule="none") == 0.2
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.4), nn.Sequential(nn.Dropout2d(0.2)))
    assert scale_dropout_modules(model, 2) == 2
    assert model[1].p == pytest.approx(0.2) and model[2][0].p == pytest.approx(0.1)
    with pytest.raises(ValueError, match="num_splits"):
        scale_weight_decay(1e-4, 0)
    with pytest.raises(ValueError, match="weight_decay"):
        scale_weight_decay(-1.0, 2)
    with pytest.raises(ValueError, match="rule"):
        scale_dropout(0.1, 2, rule="cube")
    with pytest.raises(ValueError, match="p must"):
        scale_dropout(1.5, 2)
    with pytest.raises(TypeError, match="p must be a real number"):
        scale_dropout("0.1", 2)
    with pytest.raises(TypeError, match="num_splits must be a positive integer, got float"):
        scale_dropout(0.1, 2.0)
    with pytest.raises(TypeError, match="rule must be one of .*, got NoneType"):
        scale_dropout_modules(model, 2, rule=None)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        scale_dropout_modules([nn.Dropout()], 2)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0, got nan"):
        scale_weight_decay(float("nan"), 2)
    with pytest.raises(TypeError, match="weight_decay must be a real number"):
        scale_weight_decay("1e-4", 2)


def test_linear_warmup():
    assert LinearWarmup(10, 0.5)(0) == 0.0
    assert LinearWarmup(10, 0.5)(5) == pytest.approx(0.25)
    assert LinearWarmup(10, 0.5)(10) == 0.5 and LinearWarmup(10, 0.5)(99) == 0.5
    assert LinearWarmup(10, 0.5, min_weight=0.005)(0) == pytest.approx(0.005)
    assert LinearWarmup(0, 0.5)(3) == 0.5
    sched = LinearWarmup(100, 0.5, 0.005)
    assert [sched(t) for t in (0, 50, 1000)] == pytest.approx([0.005, 0.2525, 0.5])
    weights = [sched(t) for t in range(120)]
    assert all(b >= a for a, b in itertools.pairwise(weights))
    assert repr(sched) == "LinearWarmup(warmup_steps=100, max_weight=0.5, min_weight=0.005)"
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        LinearWarmup(10, 0.5)(-1)
    with pytest.raises(ValueError, match="min_weight must be <= max_weight"):
        LinearWarmup(10, 0.5, min_weight=0.9)
    with pytest.raises(TypeError, match="step must be a non-negative integer, got float"):
        LinearWarmup(10, 0.5)(1.5)
    with pytest.raises(TypeError, match="warmup_steps must be a non-negative integer, got str"):
        LinearWarmup("10", 0.5)
    with pytest.raises(ValueError, match="warmup_steps must be a non-negative integer"):
        LinearWarmup(-1, 0.5)
    with pytest.raises(ValueError, match="max_weight must be a finite number >= 0, got inf"):
        LinearWarmup(10, float("inf"))
    with pytest.raises(ValueError, match="max_weight must be a finite number >= 0, got nan"):
        LinearWarmup(10, float("nan"))
    with pytest.raises(TypeError, match="min_weight must be a real number"):
        LinearWarmup(10, 0.5, min_weight="0")
