"""calibrate_exit_threshold: against a brute-force oracle, its budget rules, boundaries, and every bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from reference.calibrate import choose, sweep_by_forward
from torch import nn

from pycoe.basisnet import BasisNet
from pycoe.coe.experts import ExpertPool
from pycoe.coe.model import CoE
from pycoe.flops import count_flops
from pycoe.twostage.calibrate import DEFAULT_THRESHOLDS, ExitCalibration, calibrate_exit_threshold
from pycoe.twostage.delegator import Delegator
from pycoe.twostage.evaluate import predict

D_IN, C, K = 8, 4, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def make_coe(seed: int = 0, rough: bool = True, sharp: float = 3.0) -> CoE:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh())
    delegator = Delegator(
        backbone, K, num_classes=C if rough else None, feature_dim=16, classifier=None, zero_init_selection=False
    )
    if rough:
        with torch.no_grad():
            delegator.rough_head.weight.mul_(sharp)  # a spread of confidences from about 1/C to near 1
    experts = ExpertPool.from_template(
        nn.Sequential(nn.Linear(D_IN, 12), nn.ReLU(), nn.Linear(12, C)), K, init="reinit"
    )
    return CoE(delegator, experts)


def make_data(n: int = 96, batch: int = 32, seed: int = 1, labels: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    y = torch.randint(0, C, (n,), generator=g) if labels is None else labels
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def observed_confidences(model, data) -> list[float]:
    """The rough confidences as the batched eval forward computes them (exact candidate thresholds)."""
    return sorted(set(predict(model, data, exit_threshold=None).confidence.tolist()))


def candidates_for(model, data) -> list[float]:
    """A coarse grid plus every observed confidence, so that samples sit exactly on candidate thresholds."""
    return sorted({i / 10 for i in range(11)} | set(observed_confidences(model, data)))


# ---------------------------------------------------------------------------------------------------------------
# Against the oracle
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.slow
def test_coe_matches_brute_force(seed):
    model = make_coe(seed)
    data = make_data(seed=seed + 10)
    cands = candidates_for(model, data)
    oracle = sweep_by_forward(model, data, [*sorted(set(cands) | {0.0}), None])
    no_exit = oracle[-1]
    first = oracle[0]["flops_per_sample"]
    assert oracle[0]["exited"] == 96 and no_exit["exited"] == 0
    for drop in (0.0, 0.02, 0.05, 0.1, 0.5):
        got = calibrate_exit_threshold(model, data, max_accuracy_drop=drop, thresholds=cands)
        want = choose(oracle, max_accuracy_drop=drop)
        assert got.threshold == want["threshold"], drop
        assert got.accuracy == pytest.approx(want["correct"] / 96, abs=1e-9)
        assert got.exit_rate == pytest.approx(want["exited"] / 96, abs=1e-9)
        assert got.flops_per_sample == pytest.approx(want["flops_per_sample"], rel=1e-9)
        assert got.no_exit_accuracy == pytest.approx(no_exit["correct"] / 96, abs=1e-9)
        assert got.no_exit_flops_per_sample == pytest.approx(no_exit["flops_per_sample"], rel=1e-9)
        assert got.first_stage_flops == pytest.approx(first, rel=1e-9)
        assert got.num_samples == 96 and got.rule == f"max_accuracy_drop={drop:g}"
    for frac in (0.0, 0.3, 0.6, 0.9, 1.0, 1.5):
        budget = first + frac * (no_exit["flops_per_sample"] - first)
        got = calibrate_exit_threshold(model, data, max_flops=budget, thresholds=cands)
        want = choose(oracle, max_flops=budget)
        assert got.threshold == want["threshold"], frac
        assert got.accuracy == pytest.approx(want["correct"] / 96, abs=1e-9)
        assert got.flops_per_sample <= budget * (1 + 1e-12)


def test_curve_covers_every_candidate_in_order():
    model = make_coe()
    data = make_data()
    got = calibrate_exit_threshold(model, data, max_accuracy_drop=0.01)
    assert [p["threshold"] for p in got.curve] == [*DEFAULT_THRESHOLDS, None]
    assert DEFAULT_THRESHOLDS[0] == 0.0 and DEFAULT_THRESHOLDS[-1] == 1.0
    assert all(a < b for a, b in itertools.pairwise(DEFAULT_THRESHOLDS))
    # exit rates fall as the threshold rises; no exit last
    rates = [p["exit_rate"] for p in got.curve]
    assert all(a >= b for a, b in itertools.pairwise(rates))
    assert got.curve[0]["exit_rate"] == 1.0 and got.curve[-1]["exit_rate"] == 0.0
    # given thresholds: 0 and None are added, duplicates removed, the order is ascending
    got = calibrate_exit_threshold(model, data, max_accuracy_drop=0.01, thresholds=[0.9, 0.5, 0.9, None])
    assert [p["threshold"] for p in got.curve] == [0.0, 0.5, 0.9, None]


# ---------------------------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------------------------
def agreeing_coe(seed: int = 0) -> CoE:
    """A CoE whose rough head is the experts' classifier plus noise: the rough prediction is often the final one."""
    torch.manual_seed(seed)
    delegator = Delegator(nn.Identity(), K, num_classes=C, feature_dim=D_IN, classifier=None, zero_init_selection=False)
    expert = nn.Linear(D_IN, C)
    with torch.no_grad():
        delegator.rough_head.weight.copy_(3 * expert.weight + 0.2 * torch.randn(C, D_IN))
        delegator.rough_head.bias.copy_(3 * expert.bias)
    return CoE(delegator, ExpertPool.from_template(expert, K, init="copy"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_own_predictions_and_zero_drop_keep_every_answer(seed):
    model = agreeing_coe(seed)
    data = make_data(n=200, seed=seed)
    own = predict(model, data, exit_threshold=None).output.argmax(1)  # the model's no-exit predictions
    data = make_data(n=200, seed=seed, labels=own)
    got = calibrate_exit_threshold(model, data, max_accuracy_drop=0.0)
    assert got.no_exit_accuracy == 1.0
    assert got.accuracy == 1.0
    assert got.exit_rate > 0.1  # not vacuous: many samples exit, all of them with the right answer
    # and the chosen threshold keeps every answer when the model runs with it
    assert bool((predict(model, data, exit_threshold=got.threshold).output.argmax(1) == own).all())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_larger_drop_never_exits_fewer_samples(seed):
    model = make_coe(seed)
    data = make_data(n=160, seed=seed + 5)
    results = [
        calibrate_exit_threshold(model, data, max_accuracy_drop=d)
        for d in (0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 1.0)
    ]
    for a, b in itertools.pairwise(results):
        assert b.exit_rate >= a.exit_rate
        assert b.flops_per_sample <= a.flops_per_sample
        assert b.accuracy >= b.no_exit_accuracy - 0.3 - 1e-12 or b.rule == "max_accuracy_drop=1"
    # any drop allowed: every sample exits (at the largest threshold that still exits every sample)
    assert results[-1].exit_rate == 1.0 and results[-1].flops_per_sample == results[-1].first_stage_flops
    assert results[-1].threshold == max(p["threshold"] for p in results[-1].curve[:-1] if p["exit_rate"] == 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_max_flops_is_honoured_and_most_accurate(seed):
    model = make_coe(seed)
    data = make_data(n=128, seed=seed)
    full = calibrate_exit_threshold(model, data, max_accuracy_drop=0.0)
    first, top = full.first_stage_flops, full.no_exit_flops_per_sample
    assert 0 < first < top
    previous = -1.0
    for frac in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
        budget = first + frac * (top - first)
        got = calibrate_exit_threshold(model, data, max_flops=budget)
        assert got.flops_per_sample <= budget * (1 + 1e-12)
        feasible = [p for p in got.curve if p["flops_per_sample"] <= budget * (1 + 1e-12)]
        assert got.accuracy == max(p["accuracy"] for p in feasible)
        assert got.accuracy >= previous  # a larger budget is never less accurate
        previous = got.accuracy
    # the budget of the first stage alone: every sample exits
    got = calibrate_exit_threshold(model, data, max_flops=first)
    assert got.exit_rate == 1.0 and got.flops_per_sample == pytest.approx(first)


def test_flops_table_is_used():
    model = make_coe()
    data = make_data()
    table = {"delegator": 100.0, "experts": [1000.0, 2000.0, 4000.0]}
    got = calibrate_exit_threshold(model, data, max_accuracy_drop=0.05, flops=table)
    assert got.first_stage_flops == 100.0
    load = next(p for p in got.curve if p["threshold"] is None)["expert_load"]
    assert got.no_exit_flops_per_sample == pytest.approx(
        100.0 + (1000 * load[0] + 2000 * load[1] + 4000 * load[2]) / 96
    )
    # counted FLOPs: delegator and expert FLOPs of this model, per sample
    got = calibrate_exit_threshold(model, data, max_accuracy_drop=0.05)
    assert got.first_stage_flops == count_flops(model.delegator, data[0][0][:1])
    assert got.no_exit_flops_per_sample == pytest.approx(
        got.first_stage_flops + count_flops(model.experts[0], data[0][0][:1])
    )


class ConstantRough(nn.Module):
    """A delegator whose rough logits are all zero: every confidence is exactly 1/C."""

    num_classes = C

    def __init__(self) -> None:
        super().__init__()
        self.selection = nn.Linear(D_IN, K)

    def forward(self, x):
        from pycoe.twostage.delegator import DelegatorOutput

        return DelegatorOutput(self.selection(x), torch.zeros(x.shape[0], C))


def test_confidence_exactly_on_a_candidate_exits():
    model = CoE(ConstantRough(), [nn.Linear(D_IN, C) for _ in range(K)])
    data = make_data()
    assert 1 / C in DEFAULT_THRESHOLDS  # 0.25 is on the grid
    got = calibrate_exit_threshold(model, data, max_accuracy_drop=1.0)
    at = {p["threshold"]: p for p in got.curve}
    assert at[0.25]["exit_rate"] == 1.0  # confidence 0.25 >= 0.25: exits
    assert at[0.255]["exit_rate"] == 0.0
    # every sample exits at 0 and at 0.25 at the same cost: the tie goes to the larger threshold
    assert got.threshold == 0.25
    got = calibrate_exit_threshold(model, data, max_flops=got.first_stage_flops, thresholds=[0.1, 0.25, 0.3])
    assert got.threshold == 0.25 and got.exit_rate == 1.0


def test_never_exit_wins_a_tie_with_a_threshold_nobody_reaches():
    model = CoE(ConstantRough(), [nn.Linear(D_IN, C) for _ in range(K)])
    got = calibrate_exit_threshold(model, make_data(), max_accuracy_drop=0.0, thresholds=[0.5, 0.9])
    # 0.5 and 0.9 exit nobody, like None; the rough head (accuracy ~1/C) loses against the experts or ties
    assert got.exit_rate == 0.0 or got.threshold in (0.0, 0.25)
    if got.exit_rate == 0.0:
        assert got.threshold is None


def test_custom_unpack_gives_the_same_result():
    model = make_coe()
    data = make_data()
    as_dicts = [{"image": x, "label": y} for x, y in data]
    a = calibrate_exit_threshold(model, data, max_accuracy_drop=0.02)
    b = calibrate_exit_threshold(model, as_dicts, max_accuracy_drop=0.02, unpack=lambda b: ((b["image"],), b["label"]))
    assert (a.threshold, a.accuracy, a.exit_rate, a.flops_per_sample) == (
        b.threshold,
        b.accuracy,
        b.exit_rate,
        b.flops_per_sample,
    )


def test_generator_data_and_empty_batches_are_fine():
    model = make_coe()
    data = make_data()
    empty = (torch.zeros(0, D_IN), torch.zeros(0, dtype=torch.long))
    a = calibrate_exit_threshold(model, data, max_accuracy_drop=0.02)
    b = calibrate_exit_threshold(model, (b for b in [empty, *data, empty]), max_accuracy_drop=0.02)
    assert (a.threshold, a.accuracy, a.num_samples) == (b.threshold, b.accuracy, b.num_samples)


def test_modes_and_threshold_are_left_alone():
    model = make_coe()
    model.exit_threshold = 0.7
    model.train()
    model.delegator.backbone[0].eval()
    calibrate_exit_threshold(model, make_data(), max_accuracy_drop=0.01)
    assert model.exit_threshold == 0.7 and model.training and not model.delegator.backbone[0].training


def test_result_properties():
    got = calibrate_exit_threshold(make_coe(), make_data(), max_accuracy_drop=0.05)
    assert isinstance(got, ExitCalibration)
    assert got.accuracy_drop == pytest.approx(got.no_exit_accuracy - got.accuracy)
    assert got.flops_saving == pytest.approx(1 - got.flops_per_sample / got.no_exit_flops_per_sample)
    assert "curve" not in repr(got)


# ---------------------------------------------------------------------------------------------------------------
# BasisNet
# ---------------------------------------------------------------------------------------------------------------
class TinyConvNet(nn.Module):
    def __init__(self, num_classes: int = C, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def make_basisnet(seed: int = 0, rough: bool = True) -> BasisNet:
    torch.manual_seed(seed)
    lightweight = Delegator(TinyConvNet(width=3), num_experts=2, num_classes=C if rough else None)
    if rough:
        with torch.no_grad():
            lightweight.rough_head.weight.mul_(8.0)
    return BasisNet(lightweight, TinyConvNet(width=6), num_bases=2, num_classes=C if rough else None)


def image_data(n: int = 48, batch: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.slow
def test_basisnet_matches_brute_force(seed):
    model = make_basisnet(seed).eval()
    data = image_data(seed=seed)
    with torch.no_grad():
        conf = sorted({float(c) for x, _ in data for c in model.forward_eval(x, exit_threshold=None).confidence})
    cands = sorted({i / 10 for i in range(11)} | set(conf))
    assert len(conf) > 10
    oracle = sweep_by_forward(model, data, [*cands, None])
    for drop in (0.0, 0.05, 0.2):
        got = calibrate_exit_threshold(model, data, max_accuracy_drop=drop, thresholds=cands)
        want = choose(oracle, max_accuracy_drop=drop)
        assert got.threshold == want["threshold"]
        assert got.accuracy == pytest.approx(want["correct"] / 48, abs=1e-9)
        assert got.exit_rate == pytest.approx(want["exited"] / 48, abs=1e-9)
        assert got.flops_per_sample == pytest.approx(want["flops_per_sample"], rel=1e-6)
    first = oracle[0]["flops_per_sample"]
    budget = first + 0.5 * (oracle[-1]["flops_per_sample"] - first)
    got = calibrate_exit_threshold(model, data, max_flops=budget, thresholds=cands)
    assert got.threshold == choose(oracle, max_flops=budget)["threshold"]
    got = calibrate_exit_threshold(model, data, max_flops=budget, flops={"lightweight": 10, "specialist": 100})
    assert got.first_stage_flops == 10 and got.no_exit_flops_per_sample == 110


def test_basisnet_errors():
    with pytest.raises(ValueError, match="no rough head"):
        calibrate_exit_threshold(make_basisnet(rough=False), image_data(), max_accuracy_drop=0.0)
    two_inputs = [(x, x, y) for x, y in image_data()]
    with pytest.raises(ValueError, match="one input"):
        calibrate_exit_threshold(make_basisnet(), two_inputs, max_accuracy_drop=0.0)
    with pytest.raises(ValueError, match="lightweight"):
        calibrate_exit_threshold(make_basisnet(), image_data(), max_flops=1.0, flops={"delegator": 1, "experts": [1]})
    with pytest.raises(ValueError, match="below the lightweight model's own cost"):
        calibrate_exit_threshold(make_basisnet(), image_data(), max_flops=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({}, ValueError, "exactly one budget"),
        ({"max_accuracy_drop": 0.01, "max_flops": 1e6}, ValueError, "exactly one budget"),
        ({"max_accuracy_drop": -0.01}, ValueError, "max_accuracy_drop must be a finite number >= 0"),
        ({"max_accuracy_drop": math.nan}, ValueError, "max_accuracy_drop must be a finite number >= 0"),
        ({"max_accuracy_drop": "0.1"}, TypeError, "max_accuracy_drop must be a finite number >= 0"),
        ({"max_flops": 0}, ValueError, "max_flops must be a finite number > 0"),
        ({"max_flops": math.inf}, ValueError, "max_flops must be a finite number > 0"),
        ({"max_accuracy_drop": 0.0, "thresholds": [0.5, 1.5]}, ValueError, r"thresholds\[1\] must be a number"),
        ({"max_accuracy_drop": 0.0, "thresholds": 0.5}, TypeError, "thresholds must be a sequence"),
        ({"max_accuracy_drop": 0.0, "flops": {"delegator": 1.0}}, ValueError, "flops must be None"),
        (
            {"max_accuracy_drop": 0.0, "flops": {"delegator": -1.0, "experts": [1, 1, 1]}},
            ValueError,
            r"flops\['delegator'\] must be a finite number >= 0",
        ),
        (
            {"max_accuracy_drop": 0.0, "flops": {"delegator": 1.0, "experts": [1, math.nan, 1]}},
            ValueError,
            r"flops\['experts'\]\[1\] must be a finite number >= 0",
        ),
        (
            {"max_accuracy_drop": 0.0, "flops": {"delegator": 1.0, "experts": [1, 1]}},
            ValueError,
            r"flops\['experts'\] must be a sequence of 3 numbers",
        ),
        (
            {"max_flops": 50.0, "flops": {"delegator": 100.0, "experts": [1, 1, 1]}},
            ValueError,
            "below the delegator's own cost of 100",
        ),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        calibrate_exit_threshold(make_coe(), make_data(), **kwargs)


def test_budget_below_the_counted_delegator_cost():
    model = make_coe()
    delegator = count_flops(model.delegator, torch.zeros(1, D_IN))
    with pytest.raises(ValueError, match=f"below the delegator's own cost of {delegator:g}"):
        calibrate_exit_threshold(model, make_data(), max_flops=delegator - 1)
    calibrate_exit_threshold(model, make_data(), max_flops=delegator)  # exactly the cost is fine


def test_bad_models():
    with pytest.raises(TypeError, match="CoE or BasisNet"):
        calibrate_exit_threshold(nn.Linear(D_IN, C), make_data(), max_accuracy_drop=0.0)
    with pytest.raises(ValueError, match="no rough head"):
        calibrate_exit_threshold(make_coe(rough=False), make_data(), max_accuracy_drop=0.0)


def x_y(n, labels):
    return [(torch.randn(n, D_IN), labels)]


@pytest.mark.parametrize(
    "data,error,message",
    [
        ([], ValueError, "no sample"),
        ([(torch.zeros(0, D_IN), torch.zeros(0, dtype=torch.long))], ValueError, "no sample"),
        (iter(()), ValueError, "no sample"),
        (x_y(4, torch.tensor([0, 1, 2])), ValueError, "have 3 entries, but its inputs hold B=4"),
        (x_y(4, torch.tensor([1])), ValueError, "have 1 entries, but its inputs hold B=4"),
        (x_y(3, torch.tensor([0, 1, C])), ValueError, rf"class indices in \[0, {C}\).*got {C}"),
        (x_y(3, torch.tensor([0, -1, 2])), ValueError, r"class indices in \[0, 4\).*got -1"),
        (x_y(2, torch.tensor([0.0, 1.0])), ValueError, "must be class indices LongTensor"),
        (x_y(2, torch.tensor([[0], [1]])), ValueError, "must be class indices LongTensor"),
        (x_y(2, torch.tensor([True, False])), ValueError, "must be class indices LongTensor"),
        (x_y(2, [0, 1]), ValueError, "must be class indices LongTensor"),
        ([torch.randn(4, D_IN)], ValueError, "has no targets"),
        (torch.randn(4, D_IN), TypeError, "data must be an iterable of"),
        (5, TypeError, "data must be an iterable of"),
    ],
)
def test_bad_data(data, error, message):
    with pytest.raises(error, match=message):
        calibrate_exit_threshold(make_coe(), data, max_accuracy_drop=0.0)


def test_a_bad_batch_after_good_ones_is_named():
    data = [*make_data(), (torch.randn(2, D_IN), torch.tensor([0, 9]))]
    with pytest.raises(ValueError, match="targets of batch 3"):
        calibrate_exit_threshold(make_coe(), data, max_accuracy_drop=0.0)


def test_bad_unpack():
    with pytest.raises(TypeError, match="unpack must return"):
        calibrate_exit_threshold(make_coe(), make_data(), max_accuracy_drop=0.0, unpack=lambda b: b[0])
