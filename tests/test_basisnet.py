"""Tests of pycoe.basisnet: BasisSpecialist (basis layers mixed by one shared coefficient vector) and BasisNet."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference.mixture import mixture_conv2d_reference
from torch import nn

from pycoe.basisnet import (
    BasisNet,
    BasisNetOutput,
    BasisNetTrainOutput,
    BasisSpecialist,
    basis_coefficients,
    basis_dropout,
    basisnet_loss,
)
from pycoe.flops import count_flops, flops_per_sample
from pycoe.layers.condconv import CondConv2d
from pycoe.twostage.delegator import Delegator

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """A small CNN with a stem, a depthwise conv with bias, a 1x1 conv, batch norm and a linear classifier."""

    def __init__(self, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, groups=width),
            nn.ReLU(),
            nn.Conv2d(width, 12, 1),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _tiny(num_classes: int = 5, width: int = 8) -> TinyNet:
    model = TinyNet(num_classes, width).to(DT)
    with torch.no_grad():  # non-trivial running statistics for eval mode
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _x(batch: int = 4, size: int = 10) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, dtype=DT)


def _net(num_bases: int = 3, num_classes: int = 5, init_noise: float = 0.5, **kwargs) -> BasisNet:
    specialist = BasisSpecialist(_tiny(num_classes), num_bases, init_noise=init_noise)
    return BasisNet(_tiny(num_classes, width=4), specialist, num_bases, num_classes, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# BasisSpecialist
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["weight", "output", "auto"])
def test_specialist_equals_original_right_after_conversion(strategy):
    original = _tiny()
    spec = BasisSpecialist(copy.deepcopy(original), num_bases=3, strategy=strategy).eval()
    assert spec.basis_layer_names == ["features.0", "features.3", "features.5"]
    assert all(isinstance(layer, CondConv2d) and layer.router is None for layer in spec.basis_layers())
    x = _x()
    raw = torch.randn(4, 3, dtype=DT)
    cases = {
        "softmax": raw.softmax(dim=1),
        "one-hot": F.one_hot(torch.tensor([0, 1, 2, 1]), 3).to(DT),
        "signed, sum 1": raw / raw.sum(dim=1, keepdim=True),
    }
    with torch.no_grad():
        expected = original(x)
        for name, coefficients in cases.items():
            torch.testing.assert_close(spec(x, coefficients), expected, rtol=1e-10, atol=1e-10, msg=name)
        # coefficients that do not sum to 1 change the function (the test above can fail)
        assert not torch.allclose(spec(x, 2 * cases["softmax"]), expected, atol=1e-3)


def _capture_basis_io(spec: BasisSpecialist):
    records = []
    handles = [
        layer.register_forward_hook(
            lambda m, args, kwargs, out: records.append((m, args[0], kwargs, out)), with_kwargs=True
        )
        for layer in spec.basis_layers()
    ]
    return records, handles


def test_specialist_matches_per_sample_synthesis_and_per_layer_reference():
    spec = BasisSpecialist(_tiny(), num_bases=3, init_noise=0.5).eval()
    x = _x(batch=3)
    coefficients = torch.randn(3, 3, dtype=DT)  # arbitrary real coefficients, not summing to 1
    records, handles = _capture_basis_io(spec)
    with torch.no_grad():
        batched = spec(x, coefficients)
        # slow reference 1: each sample's synthesised plain model (explicit sum of kernels, nn.Conv2d)
        per_sample = torch.cat([spec.synthesize(coefficients[b])(x[b : b + 1]) for b in range(3)])
    for h in handles:
        h.remove()
    torch.testing.assert_close(batched, per_sample, rtol=1e-10, atol=1e-10)
    # slow reference 2: every basis layer received the one shared coefficient vector and computed the loop
    assert [m for m, *_ in records] == spec.basis_layers()
    for layer, inp, kwargs, out in records:
        assert kwargs["coefficients"] is coefficients
        ref = mixture_conv2d_reference(
            inp, layer.weight, coefficients, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
        )
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # the synthesised model is plain: no CondConv2d left, the specialist is untouched
    synth = spec.synthesize(coefficients[0])
    assert not any(isinstance(m, CondConv2d) for m in synth.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in synth.modules()) == 3


def _timm_same_padding_net() -> nn.Sequential:
    """Convolutions with TensorFlow's "same" padding, as timm builds them for its tf_* models: timm's Conv2dSame,
    strided (which nn.Conv2d(padding="same") refuses) and with an even kernel (asymmetric padding)."""
    from timm.layers import create_conv2d

    return nn.Sequential(
        create_conv2d(3, 6, 3, stride=2, padding="same"),
        nn.ReLU(),
        create_conv2d(6, 6, 4, stride=1, padding="same"),
        nn.ReLU(),
        create_conv2d(6, 5, 3, stride=2, padding="same", dilation=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).to(DT)


def test_synthesize_keeps_timm_same_padding_on_strided_convolutions():
    original = _timm_same_padding_net()
    assert [type(m).__name__ for m in original if isinstance(m, nn.Conv2d)] == ["Conv2dSame"] * 3
    generator = torch.Generator().manual_seed(4)
    spec = BasisSpecialist(copy.deepcopy(original), num_bases=3, init_noise=0.3, generator=generator).eval()
    assert len(spec.basis_layers()) == 3 and all(layer.padding == "same" for layer in spec.basis_layers())
    x = torch.randn(2, 3, 11, 13, dtype=DT)  # odd sizes: the padding is asymmetric at every stride
    coefficients = torch.randn(2, 3, dtype=DT)
    with torch.no_grad():
        batched = spec(x, coefficients)
        per_sample = torch.cat([spec.synthesize(coefficients[b])(x[b : b + 1]) for b in range(2)])
        # the bank's mean over the bases is the original kernel (centred noise): timm's own Conv2dSame computes it
        uniform = spec.synthesize(torch.full((3,), 1 / 3, dtype=DT))(x)
        expected = original.eval()(x)
    torch.testing.assert_close(per_sample, batched, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(uniform, expected, rtol=1e-10, atol=1e-10)
    synth = spec.synthesize(coefficients[0])
    assert not any(isinstance(m, CondConv2d) for m in synth.modules())
    assert [m.stride for m in synth.modules() if isinstance(m, nn.Conv2d)] == [(2, 2), (1, 1), (2, 2)]
    # a basis layer with "same" padding that a fixed padding reproduces becomes a plain nn.Conv2d
    odd = BasisSpecialist(nn.Sequential(nn.Conv2d(3, 4, 3, padding="same")), 2)
    plain = odd.synthesize(torch.tensor([0.5, 0.5]))[0]
    assert type(plain) is nn.Conv2d and plain.padding == (1, 1)


def test_init_noise_is_centred_across_bases():
    original = _tiny()
    generator = torch.Generator().manual_seed(1)
    spec = BasisSpecialist(copy.deepcopy(original), num_bases=4, init_noise=0.1, generator=generator)
    spec.eval()
    for name, layer in zip(spec.basis_layer_names, spec.basis_layers()):
        conv = original.get_submodule(name)
        torch.testing.assert_close(layer.weight.mean(dim=0), conv.weight, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(layer.weight[0], layer.weight[1])  # the bases differ
        if conv.bias is not None:
            torch.testing.assert_close(layer.bias, conv.bias.expand(4, -1))  # biases are copies
        spread = (layer.weight - conv.weight).std() / conv.weight.std()
        assert 0.03 < float(spread.detach()) < 0.3  # the relative scale is ~init_noise
    x = _x()
    with torch.no_grad():
        uniform = torch.full((4, 4), 0.25, dtype=DT)
        torch.testing.assert_close(spec(x, uniform), original(x), rtol=1e-10, atol=1e-10)
        assert not torch.allclose(spec(x, torch.eye(4, dtype=DT)), original(x), atol=1e-6)
    # N = 1: centred noise is zero
    single = BasisSpecialist(copy.deepcopy(original), num_bases=1, init_noise=0.5)
    torch.testing.assert_close(single.basis_layers()[0].weight[0], original.features[0].weight)


def test_predicate_names_and_callable_leave_the_rest_alone():
    spec = BasisSpecialist(_tiny(), 2, predicate=["features.5"])
    assert spec.basis_layer_names == ["features.5"]
    assert type(spec.model.features[0]) is nn.Conv2d and isinstance(spec.model.fc, nn.Linear)
    spec = BasisSpecialist(_tiny(), 2, predicate=lambda name, m: m.groups == 1)
    assert spec.basis_layer_names == ["features.0", "features.5"]
    with torch.no_grad():
        assert spec.eval()(_x(2), torch.full((2, 2), 0.5, dtype=DT)).shape == (2, 5)


def test_basis_layer_outside_its_specialist():
    spec = BasisSpecialist(_tiny(), 2).eval()
    x = _x(2)
    with pytest.raises(RuntimeError, match="specialist"):
        spec.model(x)
    layer = spec.basis_layers()[0]  # a direct call with explicit coefficients still works
    assert layer(x, torch.full((2, 2), 0.5, dtype=DT)).shape == (2, 8, 5, 5)
    with torch.no_grad():
        spec(x, torch.full((2, 2), 0.5, dtype=DT))
    with pytest.raises(RuntimeError):  # nothing lingers after a call
        spec.model(x)


def test_specialist_deepcopy_state_dict_and_threads():
    spec = BasisSpecialist(_tiny(), 3, init_noise=0.5).eval()
    x = _x(2)
    coefficient_sets = [torch.randn(2, 3, dtype=DT) for _ in range(4)]
    with torch.no_grad():
        expected = [spec(x, c) for c in coefficient_sets]
        clone = copy.deepcopy(spec)  # hooks are module-level functions: the copy works on its own layers
        torch.testing.assert_close(clone(x, coefficient_sets[0]), expected[0])
        fresh = BasisSpecialist(_tiny(), 3).eval()
        fresh.load_state_dict(spec.state_dict())
        torch.testing.assert_close(fresh(x, coefficient_sets[1]), expected[1])

    results: dict[int, list[torch.Tensor]] = {}

    def work(i: int) -> None:
        with torch.no_grad():
            results[i] = [spec(x, coefficient_sets[i]) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for out in results[i]:
            torch.testing.assert_close(out, expected[i])


def test_nested_specialists_keep_their_own_coefficients():
    inner = BasisSpecialist(_tiny(), 2, init_noise=0.5).eval()

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 3, 1)
            self.inner = inner

        def forward(self, x, inner_coefficients):
            return self.inner(self.stem(x), inner_coefficients)

    outer = BasisSpecialist(Outer().to(DT), 3, predicate=["stem"], init_noise=0.5).eval()
    x, c_outer, c_inner = _x(2), torch.randn(2, 3, dtype=DT), torch.randn(2, 2, dtype=DT)
    with torch.no_grad():
        out = outer(x, c_outer, c_inner)
        stem = outer.basis_layers()[0](x, c_outer)
        torch.testing.assert_close(out, inner(stem, c_inner))


# ----------------------------------------------------------------------------------------------------------------
# coefficients and basis dropout
# ----------------------------------------------------------------------------------------------------------------
def test_basis_coefficients_normalizations():
    logits = torch.randn(5, 4, dtype=DT)
    soft = basis_coefficients(logits, "softmax", temperature=2.0)
    torch.testing.assert_close(soft, torch.softmax(logits / 2, dim=1))
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(5, dtype=DT))
    torch.testing.assert_close(basis_coefficients(logits, "sigmoid", 0.5), torch.sigmoid(logits * 2))
    torch.testing.assert_close(basis_coefficients(logits, "none", 4.0), logits / 4)
    sig = torch.sigmoid(logits / 3)
    torch.testing.assert_close(basis_coefficients(logits, "normalized_sigmoid", 3.0), sig / sig.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="normalization"):
        basis_coefficients(logits, "sum")


def test_basis_dropout():
    c = torch.softmax(torch.randn(2000, 4, dtype=DT), dim=1).requires_grad_()
    g = torch.Generator().manual_seed(0)
    out = basis_dropout(c, 0.5, "softmax", generator=g)
    kept = out != 0
    assert kept.any(dim=1).all()  # every sample keeps at least one basis
    torch.testing.assert_close(out.sum(dim=1), torch.ones(2000, dtype=DT))
    torch.testing.assert_close(out[kept], (c / (c * kept).sum(1, keepdim=True))[kept])
    rate = 1 - kept.to(DT).mean()
    assert 0.40 < float(rate) < 0.50  # 0.5 dropped, minus the rescued all-dropped rows (1/16)
    # gradients flow through the kept coefficients only (out.sum() is constant 1 per row: weight it)
    (out * torch.randn(4, dtype=DT, generator=g)).sum().backward()
    assert (c.grad[~kept] == 0).all() and c.grad[kept].abs().sum() > 0
    s = torch.rand(3000, 4, dtype=DT)
    out = basis_dropout(s, 0.25, "sigmoid", generator=g)
    kept = out != 0
    torch.testing.assert_close(out[kept], (s / 0.75)[kept])
    assert basis_dropout(s, 0.0) is s
    # normalized sigmoid coefficients sum to 1: the kept ones are renormalised, like softmax ones
    n = s / s.sum(dim=1, keepdim=True)
    out = basis_dropout(n, 0.5, "normalized_sigmoid", generator=g)
    kept = out != 0
    torch.testing.assert_close(out.sum(dim=1), torch.ones(3000, dtype=DT))
    torch.testing.assert_close(out[kept], (n / (n * kept).sum(1, keepdim=True))[kept])


def test_train_forward_uses_basis_dropout_only_in_training_mode():
    net = _net(num_bases=4, basis_dropout=0.5).train()
    x = _x(8)
    out = net(x)
    assert isinstance(out, BasisNetTrainOutput)
    assert out.output.shape == (8, 5) and out.rough_logits.shape == (8, 5)
    assert out.coefficients.shape == out.coefficient_logits.shape == (8, 4)
    assert (out.coefficients == 0).any()  # some bases dropped (8 x 4 draws at p = 0.5)
    torch.testing.assert_close(out.coefficients.sum(dim=1), torch.ones(8, dtype=DT))
    net.eval()
    out = net.forward_train(x)
    torch.testing.assert_close(out.coefficients, torch.full((8, 4), 0.25, dtype=DT))  # zero-init head: uniform


# ----------------------------------------------------------------------------------------------------------------
# BasisNet: gradients, early exit, FLOPs
# ----------------------------------------------------------------------------------------------------------------
def test_gradients_reach_the_lightweight_model_through_coefficients_and_rough_head():
    net = _net(num_bases=3, init_noise=0.5).train()
    # the zero-initialised coefficient head passes no gradient to the backbone at the very first step: use a
    # random one, as after one optimiser step
    net.lightweight.selection_head.reset_parameters()
    x, y = _x(6), torch.randint(0, 5, (6,))
    out = net(x)
    loss, info = basisnet_loss(out, y, rough_weight=0.0)  # the specialist's loss only
    assert set(info) == {"specialist", "rough"}
    torch.testing.assert_close(loss, F.cross_entropy(out.output, y))
    loss.backward()
    light = net.lightweight
    assert light.selection_head.weight.grad.abs().sum() > 0  # through the coefficients
    assert light.backbone.features[0].weight.grad.abs().sum() > 0
    assert light.rough_head.weight.grad is None or light.rough_head.weight.grad.abs().sum() == 0
    banks = [layer.weight.grad for layer in net.specialist.basis_layers()]
    assert all(g.abs().sum() > 0 for g in banks)

    net.zero_grad()
    out = net(x)
    loss, info = basisnet_loss(out, y, rough_weight=1.0)
    torch.testing.assert_close(loss, F.cross_entropy(out.output, y) + F.cross_entropy(out.rough_logits, y))
    loss.backward()
    assert light.rough_head.weight.grad.abs().sum() > 0


def test_identical_bases_give_the_softmax_head_no_gradient():
    """The symmetry the docs warn about: exact copies + softmax coefficients -> zero coefficient gradient."""
    net = _net(num_bases=3, init_noise=0.0).train()
    out = net(_x(6))
    F.cross_entropy(out.output, torch.randint(0, 5, (6,))).backward()
    grad = net.lightweight.selection_head.weight.grad
    assert grad.abs().max() < 1e-12
    banks = net.specialist.basis_layers()[0].weight.grad
    torch.testing.assert_close(banks[0], banks[1])  # every basis gets the same gradient


def _count_calls(module: nn.Module) -> list[int]:
    sizes: list[int] = []
    module.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes


def test_early_exit_semantics():
    net = _net(num_bases=3, num_classes=5).eval()
    with torch.no_grad():
        net.lightweight.selection_head.weight.normal_()  # non-uniform coefficients
        net.lightweight.rough_head.weight.mul_(20)  # a spread of confidences
    x = _x(8)
    calls = _count_calls(net.specialist)
    with torch.no_grad():
        coefficients, _, rough = net.preview(x)
        full = net.specialist(x, coefficients)  # the specialist's output for every sample
        confidence = torch.softmax(rough, dim=1).amax(dim=1)
        # a first forward without exit lets the net see the specialist's output shape (otherwise its first forward
        # with a threshold runs the specialist on one sample to check it against the rough head's)
        net.forward_eval(x, exit_threshold=None)
        calls.clear()

        out = net.forward_eval(x, exit_threshold=0.0)
        assert isinstance(out, BasisNetOutput) and out.exited.all() and calls == []
        torch.testing.assert_close(out.output, rough)

        net.exit_threshold = 1.0
        out = net(x)
        assert not out.exited.any() and calls == [8]
        torch.testing.assert_close(out.output, full)

        net.exit_threshold = None
        assert not net(x).exited.any()

        threshold = float(confidence.median())
        net.exit_threshold = threshold
        calls.clear()
        out = net(x)
        exited = confidence >= threshold
        assert torch.equal(out.exited, exited) and 0 < int(exited.sum()) < 8
        assert calls == [8 - int(exited.sum())]  # the rest run in one batch
        torch.testing.assert_close(out.output[exited], rough[exited])
        torch.testing.assert_close(out.output[~exited], full[~exited], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.confidence, confidence.float())
        torch.testing.assert_close(out.coefficients, coefficients)


def test_basisnet_loss_of_an_empty_batch_is_zero_and_differentiable():
    logits = torch.zeros(0, 5, dtype=DT, requires_grad=True)
    rough = torch.zeros(0, 5, dtype=DT, requires_grad=True)
    coefficients = torch.zeros(0, 3, dtype=DT)
    output = BasisNetTrainOutput(logits, coefficients, coefficients, rough)
    loss, info = basisnet_loss(output, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and info["specialist"].item() == 0.0 and info["rough"].item() == 0.0
    assert logits.grad.shape == (0, 5) and rough.grad.shape == (0, 5)


@pytest.mark.parametrize("strategy", ["weight", "output", "auto"])
def test_a_batch_of_zero_samples_runs_in_training_and_evaluation(strategy):
    specialist = BasisSpecialist(_tiny(5), 3, init_noise=0.5, strategy=strategy)
    net = BasisNet(_tiny(5, width=4), specialist, 3, 5)
    empty = _x(0)
    out = net.train()(empty)
    assert out.output.shape == (0, 5) and out.coefficients.shape == (0, 3)
    loss, _ = basisnet_loss(out, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    net.eval()
    with torch.no_grad():
        for threshold in (None, 0.5, None):  # the first eval forward is the empty one
            got = net.forward_eval(empty, exit_threshold=threshold)
            assert got.output.shape == (0, 5) and got.exited.shape == (0,) and got.confidence.shape == (0,)


def test_a_confidence_exactly_on_the_threshold_exits():
    net = _net(num_bases=2, num_classes=4).eval()
    with torch.no_grad():  # a zero rough head: four equal logits, confidence exactly 1/4 for every sample
        net.lightweight.rough_head.weight.zero_()
        net.lightweight.rough_head.bias.zero_()
        x = _x(3)
        above = float(torch.nextafter(torch.tensor(0.25), torch.tensor(1.0)))
        out = net.forward_eval(x, exit_threshold=0.25)
        assert out.exited.tolist() == [True] * 3 and torch.equal(out.confidence, torch.full((3,), 0.25))
        assert not net.forward_eval(x, exit_threshold=above).exited.any()


def test_first_eval_forward_learns_the_specialist_output_shape_once():
    net = _net(exit_threshold=0.0).eval()  # every sample exits
    calls = _count_calls(net.specialist)
    with torch.no_grad():
        net(_x(4))
        assert calls == [1]  # one sample, to check the specialist's output against the rough head
        net(_x(4))
    assert calls == [1]


def test_average_flops_with_early_exit_is_lightweight_plus_kept_fraction_of_specialist():
    specialist = BasisSpecialist(_tiny(), 4, init_noise=0.5, strategy="weight")
    net = BasisNet(_tiny(width=4), specialist, 4, 5).eval()
    with torch.no_grad():
        net.lightweight.rough_head.weight.mul_(20)
    x = _x(8)
    with torch.no_grad():
        coefficients, _, rough = net.preview(x)
        confidence = torch.softmax(rough, dim=1).amax(dim=1)
    net.exit_threshold = float(confidence.median())
    exit_rate = float(net(x).exited.to(DT).mean())
    assert 0 < exit_rate < 1
    average = count_flops(net, x) / 8
    light = flops_per_sample(net.lightweight, x)
    spec = flops_per_sample(net.specialist, x, coefficients)
    assert average == pytest.approx(light + (1 - exit_rate) * spec, rel=1e-12)
    # weight mixing at batch 1: the plain model's FLOPs plus one [1, N] x [N, P] matmul per basis layer (and
    # one [1, N] x [N, O] for its bias)
    plain = count_flops(_tiny(), x[:1])
    mixing = sum(
        2 * 4 * (layer.weight[0].numel() + (0 if layer.bias is None else layer.out_channels))
        for layer in specialist.basis_layers()
    )
    assert count_flops(specialist, x[:1], coefficients[:1]) == plain + mixing


@pytest.mark.parametrize("normalization", ["softmax", "sigmoid", "none"])
def test_the_temperature_divides_the_coefficient_logits_in_every_forward(normalization):
    """``coefficients = normalize(logits / temperature)`` in training and eval forwards, and the specialist uses
    them. The coefficient head is randomised: with the zero-initialised head of a fresh Delegator every logit is 0
    and no temperature could change anything."""
    net = _net(num_bases=3, temperature=4.0, normalization=normalization)
    with torch.no_grad():
        net.lightweight.selection_head.weight.normal_(0.0, 2.0)
        net.lightweight.selection_head.bias.normal_(0.0, 2.0)
    x = _x(5)
    net.eval()
    with torch.no_grad():
        logits = net.lightweight(x).selection_logits
        scaled = {"softmax": torch.softmax, "sigmoid": lambda t, dim: torch.sigmoid(t), "none": lambda t, dim: t}
        want = scaled[normalization](logits / 4.0, dim=1)
        at_t1 = scaled[normalization](logits, dim=1)
        assert not torch.allclose(want, at_t1, rtol=1e-3, atol=1e-3)  # the temperature matters here
        out = net.forward_eval(x, exit_threshold=None)
        torch.testing.assert_close(out.coefficients, want)
        torch.testing.assert_close(out.output, net.specialist(x, want))
        torch.testing.assert_close(net.preview(x)[0], want)
        torch.testing.assert_close(net.forward_train(x).coefficients, want)  # eval mode: no basis dropout
    net.train()  # batch statistics now: other logits, the same rule
    train_out = net(x)
    torch.testing.assert_close(train_out.coefficients, scaled[normalization](train_out.coefficient_logits / 4.0, dim=1))


def test_preview_size_and_sigmoid_normalization():
    net = _net(num_bases=2, preview_size=(6, 5), normalization="sigmoid").eval()
    seen = []
    net.lightweight.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        out = net(_x(3, size=12))
    assert seen == [(3, 3, 6, 5)]
    torch.testing.assert_close(out.coefficients, torch.full((3, 2), 0.5, dtype=DT))  # sigmoid(0)


def test_plain_models_are_wrapped_and_delegators_used_as_is():
    net = BasisNet(_tiny(width=4), _tiny(), num_bases=2, num_classes=5)
    assert isinstance(net.specialist, BasisSpecialist) and isinstance(net.lightweight, Delegator)
    assert net.lightweight.num_experts == 2
    delegator = Delegator(_tiny(width=4), num_experts=2, num_classes=5)
    net = BasisNet(delegator, _tiny(), num_bases=2)
    assert net.lightweight is delegator and net.num_classes == 5


def test_torchvision_mobilenet_lightweight_resnet_specialist():
    import torchvision  # a test dependency (pyproject's "test" extra)

    resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    original = copy.deepcopy(resnet)
    specialist = BasisSpecialist(resnet, num_bases=2)
    assert len(specialist.basis_layer_names) == 20  # every convolution of ResNet-18
    net = BasisNet(torchvision.models.mobilenet_v3_small(weights=None), specialist, num_bases=2, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        coefficients, _, _ = net.preview(x)
        torch.testing.assert_close(coefficients, torch.full((2, 2), 0.5))  # zero-initialised coefficient head
        mixed = net.specialist(x, torch.tensor([[0.3, 0.7], [1.0, 0.0]]))
        torch.testing.assert_close(mixed, original(x), rtol=1e-4, atol=1e-5)
        out = net(x)
    assert out.output.shape == (2, 10) and not out.exited.any()
    torch.testing.assert_close(out.output, original(x), rtol=1e-4, atol=1e-5)
    net.train()
    train_out = net(x)
    loss, _ = basisnet_loss(train_out, torch.tensor([1, 2]))
    loss.backward()
    assert net.lightweight.backbone.features[0][0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_bases", "error"), [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_bad_num_bases(num_bases, error):
    with pytest.raises(error, match="num_bases"):
        BasisSpecialist(_tiny(), num_bases)
    with pytest.raises(error, match="num_bases"):
        BasisNet(_tiny(width=4), _tiny(), num_bases, 5)


def test_bad_specialist_construction():
    with pytest.raises(TypeError, match="model"):
        BasisSpecialist("resnet", 2)
    with pytest.raises(ValueError, match="init_noise"):
        BasisSpecialist(_tiny(), 2, init_noise=-0.1)
    with pytest.raises(ValueError, match="init_noise"):
        BasisSpecialist(_tiny(), 2, init_noise=float("inf"))
    with pytest.raises(ValueError, match="strategy"):
        BasisSpecialist(_tiny(), 2, strategy="fast")
    with pytest.raises(TypeError, match="generator"):
        BasisSpecialist(_tiny(), 2, generator=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one clear error, not the conversion's "nothing was converted" first
        with pytest.raises(ValueError, match=r"no convolution of the model.*skipped .*: predicate returned False"):
            BasisSpecialist(_tiny(), 2, predicate=lambda name, m: False)
        with pytest.raises(ValueError, match="the model has no convolution"):
            BasisSpecialist(nn.Sequential(nn.Linear(2, 2)), 2)
    with pytest.raises(ValueError, match="predicate"):
        BasisSpecialist(_tiny(), 2, predicate=["fc"])
    with pytest.raises(ValueError, match="scale"):
        BasisSpecialist(_tiny(), 2).perturb_bases(-1.0)


def test_bad_coefficients():
    spec = BasisSpecialist(_tiny(), 3).eval()
    x = _x(2)
    with pytest.raises(ValueError, match=r"coefficients must have shape \[B, N\] = \[2, 3\]"):
        spec(x, torch.rand(2, 4, dtype=DT))
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        spec(x, torch.rand(3, 3, dtype=DT))
    with pytest.raises(ValueError, match="coefficients must have 2 dimensions"):
        spec(x, torch.rand(3, dtype=DT))
    with pytest.raises(TypeError, match="coefficients must be a torch.Tensor"):
        spec(x, [[0.5, 0.5, 0.0]] * 2)
    with pytest.raises(TypeError, match="floating"):
        spec(x, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        spec(x, torch.rand(2, 3, dtype=torch.float32))
    with pytest.raises(TypeError, match="x must be"):
        spec("image", torch.rand(2, 3, dtype=DT))
    with pytest.raises(ValueError, match=r"coefficients must have shape \[3\]"):
        spec.synthesize(torch.rand(2, 3, dtype=DT))


@pytest.mark.parametrize(
    ("threshold", "error"), [(-0.1, ValueError), (1.5, ValueError), ("high", TypeError), (True, TypeError)]
)
def test_bad_exit_threshold(threshold, error):
    with pytest.raises(error, match="exit_threshold"):
        _net(exit_threshold=threshold)
    net = _net().eval()
    with pytest.raises(error, match="exit_threshold"):
        net.exit_threshold = threshold
    if not isinstance(threshold, str):
        with pytest.raises(error, match="exit_threshold"):
            net.forward_eval(_x(2), exit_threshold=threshold)


def test_bad_basisnet_construction():
    with pytest.raises(ValueError, match="normalization"):
        _net(normalization="softmin")
    with pytest.raises(ValueError, match="normalization"):
        basis_coefficients(torch.randn(2, 3), "l1")
    with pytest.raises(ValueError, match="normalization"):
        basis_dropout(torch.rand(2, 3), 0.1, "l1")
    for t in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            _net(temperature=t)
    with pytest.raises(ValueError, match="temperature"):
        basis_coefficients(torch.randn(2, 3), temperature=0.0)
    for p in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="basis_dropout"):
            _net(basis_dropout=p)
    with pytest.raises(ValueError, match="p must be"):
        basis_dropout(torch.rand(2, 3), 1.0)
    with pytest.raises(ValueError, match="preview_size must be >= 1"):
        _net(preview_size=(0, 4))
    with pytest.raises(TypeError, match="preview_size must be an int or a pair of ints"):
        _net(preview_size=(4, 4, 4))
    with pytest.raises(ValueError, match="num_bases=3"):
        BasisNet(_tiny(width=4), BasisSpecialist(_tiny(), 2), 3, 5)
    with pytest.raises(ValueError, match="num_experts=2"):
        BasisNet(Delegator(_tiny(width=4), num_experts=2, num_classes=5), _tiny(), 3, 5)
    with pytest.raises(ValueError, match="num_classes"):
        BasisNet(Delegator(_tiny(width=4), num_experts=2, num_classes=5), _tiny(), 2, 7)
    with pytest.raises(ValueError, match="rough head"):
        BasisNet(Delegator(_tiny(width=4), num_experts=2), _tiny(), 2, exit_threshold=0.5)
    with pytest.raises(TypeError, match="lightweight"):
        BasisNet(None, _tiny(), 2, 5)
    with pytest.raises(TypeError, match="specialist"):
        BasisNet(_tiny(width=4), "resnet", 2, 5)
    with pytest.raises(TypeError, match="BasisNetTrainOutput"):
        basisnet_loss(torch.randn(2, 5), torch.tensor([0, 1]))
    out = _net().train()(_x(2))
    with pytest.raises(ValueError, match="rough_weight"):
        basisnet_loss(out, torch.tensor([0, 1]), rough_weight=-1.0)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        basis_coefficients(torch.randn(3))
