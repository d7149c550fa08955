"""pycoe.twostage: one protocol under CoE, BasisNet and the cascade; prediction, the sweep and the calibration on
every kind of batch (tensors, tuples, mappings of keyword inputs); the exit rule on NaN confidences; the merge's
input checks."""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from reference.calibrate import sweep_by_forward
from torch import nn

from pycoe._modules import traceable_paths
from pycoe.basisnet import BasisNet
from pycoe.coe.model import CoE
from pycoe.flops import count_flops
from pycoe.twostage import (
    FirstStage,
    TwoStageModel,
    calibrate_exit_threshold,
    exit_mask,
    predict,
    rough_confidence,
    threshold_sweep,
)
from pycoe.twostage.delegator import Delegator, DelegatorOutput
from pycoe.twostage.model import _merge_early_exit

D, C, K = 6, 4, 3

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# The three models
# ---------------------------------------------------------------------------------------------------------------
def make_coe(seed: int = 0) -> CoE:
    torch.manual_seed(seed)
    delegator = Delegator(
        nn.Sequential(nn.Linear(D, 8), nn.Tanh()), K, num_classes=C, feature_dim=8, classifier=None,
        zero_init_selection=False,
    )  # fmt: skip
    with torch.no_grad():
        delegator.rough_head.weight.mul_(4.0)  # a spread of confidences
    experts = [nn.Linear(D, C), nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C)), nn.Linear(D, C)]
    return CoE(delegator, experts)  # heterogeneous experts: the FLOPs of a sample depend on its expert


class RoughStage(nn.Module):
    """The cascade's first stage: a delegator's rough head and one constant selection column (as the image example
    builds it)."""

    def __init__(self, delegator: Delegator) -> None:
        super().__init__()
        self.delegator = delegator
        self.num_classes, self.num_experts = delegator.num_classes, 1

    def forward(self, x: torch.Tensor) -> DelegatorOutput:
        d = self.delegator
        rough = d.rough_head(d.features(x))
        return DelegatorOutput(rough.new_zeros(rough.shape[0], 1), rough)


def make_cascade(seed: int = 0) -> CoE:
    coe = make_coe(seed)
    return CoE(RoughStage(coe.delegator), [nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))])


class TinyConvNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(width, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def make_basisnet(seed: int = 0) -> BasisNet:
    torch.manual_seed(seed)
    lightweight = Delegator(TinyConvNet(3), num_experts=2, num_classes=C, zero_init_selection=False)
    with torch.no_grad():
        lightweight.rough_head.weight.mul_(8.0)
    return BasisNet(lightweight, TinyConvNet(5), num_bases=2, num_classes=C)


def vector_data(n: int = 40, batch: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def image_data(n: int = 24, batch: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 5, 5, generator=g), torch.randint(0, C, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


MODELS = {
    "coe": (make_coe, vector_data),
    "cascade": (make_cascade, vector_data),
    "basisnet": (make_basisnet, image_data),
}


def median_confidence(model: Any, data: list) -> float:
    confidence = predict(model, data, exit_threshold=None).confidence.sort().values
    i = len(confidence) // 2
    return float((confidence[i - 1] + confidence[i]) / 2)  # between two observed confidences


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_model_is_a_two_stage_model_and_the_sweep_matches_its_own_forward(name):
    """CoE, the cascade and BasisNet run the same sweep: each threshold's numbers equal those of the model's own
    eval forward with that threshold, FLOPs counted on the calls that actually ran (tests/reference/calibrate.py)."""
    make, data_of = MODELS[name]
    model, data = make(), data_of()
    assert isinstance(model, TwoStageModel)
    thresholds = [0.0, median_confidence(model, data), 1.0, None]
    got = threshold_sweep(model, data, thresholds)
    want = sweep_by_forward(model, data, thresholds)
    n = sum(len(y) for _, y in data)
    for g, w in zip(got, want):
        assert g["threshold"] == w["threshold"] and g["num_samples"] == n
        assert g["accuracy"] == w["correct"] / n and g["exit_rate"] == w["exited"] / n
        assert g["flops_per_sample"] == pytest.approx(w["flops_per_sample"], rel=1e-6)
        assert isinstance(g["accuracy"], float) and isinstance(g["exit_rate"], float)
    assert got[0]["exit_rate"] == 1.0 and 0 < got[1]["exit_rate"] < 1 and got[-1]["exit_rate"] == 0.0
    assert ("expert_load" in got[0]) == isinstance(model, CoE)
    # and the calibration, through the same sweep, picks from the same numbers
    result = calibrate_exit_threshold(model, data, max_accuracy_drop=1.0, thresholds=thresholds)
    assert result.exit_rate == 1.0 and result.flops_per_sample == pytest.approx(want[0]["flops_per_sample"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_model_predicts_through_the_protocol(name):
    """``forward_eval`` equals the protocol's two stages run by hand: the rough logits where a sample exits, the
    second stage on that sample alone otherwise."""
    make, data_of = MODELS[name]
    model, data = make().eval(), data_of()
    threshold = median_confidence(model, data)
    out = predict(model, data, exit_threshold=threshold)
    x = torch.cat([b[0] for b in data])
    rows = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            first = model.run_first_stage((x[i : i + 1],), {})
            assert isinstance(first, FirstStage)
            if rough_confidence(first.rough_logits)[0] >= threshold:
                rows.append(first.rough_logits[0])
            else:
                rows.append(model.run_second_stage(first, (x[i : i + 1],), {}, None)[0])
    torch.testing.assert_close(out.output, torch.stack(rows))
    assert 0 < int(out.exited.sum()) < x.shape[0]


def test_per_path_flops_follow_the_routing():
    """The second stage's FLOPs depend on the sample (a CoE's heterogeneous experts): the protocol reports one
    cost per path and the path each sample took."""
    model, data = make_coe(), vector_data()
    first_flops, per_path = model.count_stage_flops((data[0][0][:1],), {})
    assert len(per_path) == K and len(set(per_path)) == 2  # experts 0 and 2 cost the same, expert 1 more
    got = threshold_sweep(model, data, [None])[0]
    load = got["expert_load"]
    assert sum(load) == 40
    assert got["flops_per_sample"] == pytest.approx(first_flops + sum(f * k for f, k in zip(per_path, load)) / 40)


# ---------------------------------------------------------------------------------------------------------------
# Batches: tensors, tuples, mappings (keyword inputs, Hugging Face style)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class KeywordOutput:
    output: torch.Tensor
    exited: torch.Tensor
    confidence: torch.Tensor


class KeywordCascade(TwoStageModel, nn.Module):
    """A tiny model called the Hugging Face way, ``model(input_ids=..., attention_mask=...)``: both stages read the
    masked mean of the token embeddings; the first stage has a rough head, the second an MLP."""

    first_stage_name = "the rough head"
    second_stage_name = "the classifier"

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rough = nn.Linear(dim, C)
        self.classifier = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, C))
        with torch.no_grad():
            self.rough.weight.mul_(6.0)
        self.exit_threshold = None

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        return (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def run_first_stage(self, args, kwargs):
        assert not args, "called with keyword inputs only"
        return FirstStage(self.rough(self.pooled(**kwargs)), plan=None)

    def run_second_stage(self, first, args, kwargs, keep):
        if keep is not None:
            kwargs = {k: v.index_select(0, keep) for k, v in kwargs.items()}
        return self.classifier(self.pooled(**kwargs))

    def count_stage_flops(self, args, kwargs):
        return float(count_flops(self.rough, self.pooled(**kwargs))), [
            float(count_flops(self.classifier, self.pooled(**kwargs)))
        ]

    def forward_eval(self, *args, exit_threshold="default", **kwargs):
        output, exited, confidence, _ = self.forward_with_exit(args, kwargs, exit_threshold)
        return KeywordOutput(output, exited, confidence)

    def forward(self, *args, **kwargs):
        return self.forward_eval(*args, **kwargs)


def token_batches(n_batches: int = 3, batch: int = 8, length: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, 11, (batch, length), generator=g)
        mask = (torch.rand(batch, length, generator=g) > 0.3).long()
        mask[:, 0] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, C, (batch,), generator=g)})
    return out


def keyword_reference(model: KeywordCascade, batches: list[dict[str, Any]], threshold: float | None):
    """Per sample: the rough prediction if its confidence reaches the threshold, else the classifier's."""
    correct = exited = 0
    with torch.no_grad():
        for b in batches:
            for i in range(len(b["labels"])):
                ids, mask = b["input_ids"][i : i + 1], b["attention_mask"][i : i + 1]
                rough = model.rough(model.pooled(ids, mask))
                leave = threshold is not None and float(torch.softmax(rough, 1).max()) >= threshold
                pred = rough if leave else model.classifier(model.pooled(ids, mask))
                correct += int(pred.argmax(1).item() == b["labels"][i].item())
                exited += int(leave)
    return correct, exited


def test_mapping_batches_are_keyword_inputs_with_labels_as_targets():
    model = KeywordCascade()
    batches = token_batches()
    n = sum(len(b["labels"]) for b in batches)
    thresholds = [0.0, 0.5, 0.7, None]
    got = threshold_sweep(model, batches, thresholds, flops=False)
    for point, t in zip(got, thresholds):
        correct, exited = keyword_reference(model, batches, t)
        assert (point["accuracy"], point["exit_rate"]) == (correct / n, exited / n)
    assert 0 < got[1]["exit_rate"] < 1
    # the same data as a Mapping that is not a dict (a tokenizer's BatchEncoding is a UserDict), as
    # ((inputs mapping), labels) pairs, and through a custom unpack returning a mapping: the same numbers
    as_userdict = [collections.UserDict(b) for b in batches]
    pairs = [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in batches]
    nested = [{"inputs": {k: v for k, v in b.items() if k != "labels"}, "y": b["labels"]} for b in batches]
    assert threshold_sweep(model, as_userdict, thresholds, flops=False) == got
    assert threshold_sweep(model, pairs, thresholds, flops=False) == got
    assert threshold_sweep(model, nested, thresholds, flops=False, unpack=lambda b: (b["inputs"], b["y"])) == got
    # predict and calibrate take the same batches
    out = predict(model, as_userdict, exit_threshold=0.5)
    assert isinstance(out, KeywordOutput) and out.output.shape == (n, C)
    assert int(out.exited.sum()) / n == got[1]["exit_rate"]
    result = calibrate_exit_threshold(model, as_userdict, max_accuracy_drop=0.0, thresholds=thresholds)
    assert result.num_samples == n and result.first_stage_flops > 0


def test_basisnet_takes_mapping_batches_too():
    model, data = make_basisnet(), image_data()
    as_mappings = [{"x": x, "labels": y} for x, y in data]
    thresholds = [0.0, 0.6, None]
    assert threshold_sweep(model, as_mappings, thresholds) == threshold_sweep(model, data, thresholds)
    torch.testing.assert_close(predict(model, as_mappings).output, predict(model, data).output)
    with pytest.raises(ValueError, match="one input x"):
        threshold_sweep(model, [{"x": x, "mask": x, "labels": y} for x, y in data], thresholds)


def test_mapping_batches_without_labels_or_with_bad_keys():
    model = KeywordCascade()
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in token_batches()]
    assert predict(model, unlabeled).output.shape == (24, C)  # prediction needs no target
    with pytest.raises(ValueError, match="batch 0 has no targets.*'labels'"):
        threshold_sweep(model, unlabeled, [0.5])
    with pytest.raises(TypeError, match="mapping whose keys are not all strings"):
        threshold_sweep(model, [{1: torch.zeros(2, 3)}], [0.5])
    with pytest.raises(TypeError, match="batch-first tensor"):
        predict(model, [{"input_ids": 3, "labels": torch.zeros(2)}])
    with pytest.raises(TypeError, match=r"unpack must return \(inputs tuple, target\) or \(inputs mapping"):
        threshold_sweep(model, token_batches(), [0.5], unpack=lambda b: (b["input_ids"], b["labels"]))


def test_a_model_outside_the_protocol_is_refused():
    with pytest.raises(TypeError, match="must be a pycoe CoE or BasisNet"):
        threshold_sweep(nn.Linear(D, C), vector_data(), [0.5])

    class Unfinished(TwoStageModel, nn.Module):
        pass

    with pytest.raises(NotImplementedError, match="Unfinished must implement run_first_stage"):
        Unfinished().forward_with_exit((torch.zeros(2, D),), {}, None)


# ---------------------------------------------------------------------------------------------------------------
# NaN confidence: never exits, at any threshold, eagerly and on the traceable path
# ---------------------------------------------------------------------------------------------------------------
class ExactDelegator(nn.Module):
    """Reads its outputs off the input: selection logits x[:, :K], rough logits x[:, K:K + C]."""

    num_experts, num_classes = K, C

    def forward(self, x: torch.Tensor) -> DelegatorOutput:
        return DelegatorOutput(x[:, :K], x[:, K : K + C])


class SelectionReader(nn.Module):
    """An expert that reads only the selection part x[:, :K] of ExactDelegator's inputs (so that it stays finite
    where the rough part holds a NaN)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(K, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[:, :K])


def nan_coe(exit_threshold: float | None = None) -> CoE:
    return CoE(ExactDelegator(), [SelectionReader() for _ in range(K)], exit_threshold=exit_threshold).eval()


def nan_inputs() -> torch.Tensor:
    torch.manual_seed(3)
    rough = torch.randn(6, C) * 3
    rough[1, 2] = math.nan  # NaN logit: NaN confidence
    rough[4, 0] = math.inf  # +inf logit: the softmax is NaN too
    rough[5] = 0.0  # confidence exactly 1/C: exits at any threshold <= 0.25
    return torch.cat([torch.randn(6, K), rough], dim=1)


THRESHOLDS = [0.0, 1e-6, 0.25, 0.5, 0.99, 1.0, None]


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traceable"])
def test_nan_confidence_never_exits_at_any_threshold(traced):
    model = nan_coe()
    x = nan_inputs()
    nan = torch.tensor([False, True, False, False, True, False])
    with torch.no_grad():
        confidence = rough_confidence(x[:, K:])
        assert torch.equal(torch.isnan(confidence), nan)
        experts = torch.cat([model.experts[int(k)](x[i : i + 1]) for i, k in enumerate(x[:, :K].argmax(1))])
        for t in THRESHOLDS:
            with traceable_paths() if traced else torch.no_grad():
                out = model.forward_eval(x, exit_threshold=t)
            want = exit_mask(confidence, t)
            assert torch.equal(out.exited, want), t
            assert not out.exited[nan].any(), t  # NaN never exits, also at threshold 0
            if t is not None and t <= 0.25:
                assert out.exited[~nan].all()  # every sample with a number for a confidence exits at 0
            # the NaN samples get their expert's (finite) answer
            torch.testing.assert_close(out.output[nan], experts[nan])
            assert torch.isfinite(out.output[nan]).all()


def test_the_sweep_applies_the_same_nan_rule():
    model = nan_coe()
    data = [(nan_inputs(), torch.tensor([0, 1, 2, 3, 0, 1]))]
    got = threshold_sweep(model, data, [0.0, 0.25, None], flops={"delegator": 1.0, "experts": [10.0] * K})
    assert [p["exit_rate"] for p in got] == [4 / 6, 4 / 6, 0.0]  # the two NaN samples stay
    assert got[0]["flops_per_sample"] == 1.0 + 10.0 * 2 / 6
    assert exit_mask(torch.tensor([math.nan, 0.5]), 0.0).tolist() == [False, True]


def test_nan_confidence_never_exits_in_the_exported_program():
    from pycoe.export import export

    model = nan_coe(exit_threshold=0.0)
    x = nan_inputs()
    program = export(model, (x,), prepare=False)
    with torch.no_grad():
        eager, exported = model(x), program.module()(x)
    assert exported.exited.tolist() == eager.exited.tolist() == [True, False, True, True, False, True]
    torch.testing.assert_close(exported.output, eager.output)


# ---------------------------------------------------------------------------------------------------------------
# The merge of rough and second-stage outputs checks its inputs
# ---------------------------------------------------------------------------------------------------------------
def test_merge_refuses_a_float_or_short_exit_mask():
    rough = torch.randn(4, C)

    def run(keep):
        return torch.zeros(4 if keep is None else len(keep), C)

    with pytest.raises(TypeError, match=r"exited must be a BoolTensor\[B\].*got dtype torch.float32"):
        _merge_early_exit(rough, torch.tensor([1.0, 0.0, 1.0, 0.0]), run, "the experts")
    with pytest.raises(TypeError, match=r"exited must be a BoolTensor\[B\].*got list"):
        _merge_early_exit(rough, [True, False, True, False], run, "the experts")
    with pytest.raises(ValueError, match="exited has 3 entries but rough_logits hold B=4"):
        _merge_early_exit(rough, torch.tensor([True, False, True]), run, "the experts")
    with pytest.raises(ValueError, match="exited has 5 entries"):
        with traceable_paths():  # the traceable path checks too
            _merge_early_exit(rough, torch.ones(5, dtype=torch.bool), run, "the experts")
    with pytest.raises(ValueError, match="one entry per sample"):
        _merge_early_exit(rough, torch.ones(4, 1, dtype=torch.bool), run, "the experts")
    with pytest.raises(ValueError, match=r"rough_logits must be a Tensor\[B, C\]"):
        _merge_early_exit(rough[:, None], torch.ones(4, dtype=torch.bool), run, "the experts")
    # the correct call still works, exited and kept rows in place
    exited = torch.tensor([True, False, True, False])
    merged = _merge_early_exit(rough, exited, run, "the experts")
    torch.testing.assert_close(merged[exited], rough[exited])
    assert not merged[~exited].any()


# ---------------------------------------------------------------------------------------------------------------
# The calibration's accuracy budget is a fraction
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop", [3, 1.5, 100.0])
def test_an_accuracy_budget_in_points_is_refused(drop):
    with pytest.raises(ValueError, match=r"max_accuracy_drop is a fraction .* 0\.3 points.*pass"):
        calibrate_exit_threshold(make_coe(), vector_data(), max_accuracy_drop=drop)
    # 1, the largest fraction, is accepted
    assert calibrate_exit_threshold(make_coe(), vector_data(), max_accuracy_drop=1).exit_rate == 1.0


class _BagOfTokens(nn.Module):
    """Keyword inputs only: the masked mean of token embeddings, then an optional linear head."""

    def __init__(self, out: int | None, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, out) if out is not None else nn.Identity()

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0))


def test_a_coe_called_with_keyword_inputs_takes_mapping_batches():
    """A CoE whose delegator and experts take keyword inputs only: the sweep over mapping batches (labels as
    targets) equals a full keyword forward per threshold, FLOPs included; predict and the calibration agree."""
    torch.manual_seed(0)
    delegator = Delegator(_BagOfTokens(None), num_experts=3, num_classes=C, feature_dim=8, zero_init_selection=False)
    with torch.no_grad():
        delegator.rough_head.weight.mul_(6.0)
        delegator.selection_head.weight.mul_(10.0)
    model = CoE(delegator, [_BagOfTokens(C) for _ in range(3)]).eval()
    batches = token_batches()
    thresholds = [0.0, 0.5, 0.7, None]
    got = threshold_sweep(model, batches, thresholds)
    n = sum(len(b["labels"]) for b in batches)
    for point, t in zip(got, thresholds):
        correct = exited = 0
        flops = 0.0
        for b in batches:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            with torch.no_grad():
                res = model.forward_eval(**inputs, exit_threshold=t)
            correct += int((res.output.argmax(1) == b["labels"]).sum())
            exited += int(res.exited.sum())
            flops += count_flops(lambda t=t, **kw: model.forward_eval(**kw, exit_threshold=t), **inputs)
        assert (point["accuracy"], point["exit_rate"]) == (correct / n, exited / n)
        assert point["flops_per_sample"] == pytest.approx(flops / n, rel=1e-9)
    assert 0 < got[1]["exit_rate"] < 1
    assert len(set(model(**batches[0]).expert_index.tolist())) > 1  # labels in the call are dropped
    out = predict(model, batches, exit_threshold=0.5)
    assert out.output.shape == (n, C) and int(out.exited.sum()) / n == got[1]["exit_rate"]
    result = calibrate_exit_threshold(model, batches, max_accuracy_drop=0.0, thresholds=thresholds)
    assert result.num_samples == n and result.first_stage_flops > 0
