"""Bad input across the CoE and BasisNet API: every case raises a clear error that names the argument.

One table, one row per bad input: the call, the exception type and a regular expression the message must match
(it names the argument or the component and says what was expected). The table is also the audit of the
goal (no silent answer to bad input, and clear errors): a row that stops raising, or raises something unclear,
fails here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pycoe.basisnet import BasisNet, BasisSpecialist, basis_coefficients, basis_dropout, basisnet_loss
from pycoe.coe.experts import ExpertPool
from pycoe.coe.loss import CoELoss
from pycoe.coe.model import CoE, CoETrainOutput
from pycoe.routing.labels import LabelGenerator
from pycoe.routing.weighting import BalancedTransportWeighter
from pycoe.twostage.delegator import Delegator
from pycoe.twostage.evaluate import predict, threshold_sweep
from pycoe.twostage.rule import exit_mask, rough_confidence

D, C, K = 6, 4, 3


def mlp(d_out: int = C) -> nn.Module:
    return nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, d_out))


def backbone() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh())


def delegator(k: int = K, num_classes: int | None = C, **kwargs: Any) -> Delegator:
    return Delegator(backbone(), k, num_classes=num_classes, feature_dim=5, classifier=None, **kwargs)


def coe(k: int = K, num_classes: int | None = C, expert_classes: int = C, exit_threshold=None) -> CoE:
    torch.manual_seed(0)
    pool = ExpertPool.from_template(mlp(expert_classes), k, init="reinit")
    return CoE(delegator(k, num_classes, zero_init_selection=False), pool, exit_threshold=exit_threshold)


def x(b: int = 4) -> torch.Tensor:
    return torch.randn(b, D)


def y(b: int = 4) -> torch.Tensor:
    return torch.randint(0, C, (b,))


def loader(n: int = 2, b: int = 4) -> list:
    return [(x(b), y(b)) for _ in range(n)]


def train_out(b: int = 4) -> CoETrainOutput:
    return coe().train()(x(b))


def loss() -> CoELoss:
    return CoELoss(BalancedTransportWeighter(K), LabelGenerator())


class Conv(nn.Module):
    def __init__(self, num_classes: int = C, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean((2, 3)))


def img(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 6, 6)


def basisnet(num_classes: int = C, specialist_classes: int = C, **kwargs: Any) -> BasisNet:
    torch.manual_seed(0)
    return BasisNet(Conv(num_classes, 3), Conv(specialist_classes), 2, num_classes, **kwargs)


def specialist() -> BasisSpecialist:
    return BasisSpecialist(Conv(), 2).eval()


class Returns(nn.Module):
    """A user delegator returning whatever it is given."""

    def __init__(self, make: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.lin = nn.Linear(D, K)
        self.make = make

    def forward(self, x: torch.Tensor) -> Any:
        return self.make(self.lin(x))


class Obj:
    """An object with some attributes (a wrong weighter / labeler result)."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


def _sweep_with_flops(flops: Any) -> Any:
    return threshold_sweep(coe(), loader(1), [None], flops=flops)


NAN, INF = math.nan, math.inf

# (id, call, exception type, regex naming the argument)
CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # ------------------------------------------------------------------------------------------- Delegator
    ("delegator/backbone-str", lambda: Delegator("resnet", K), TypeError, "backbone must be an nn.Module"),
    ("delegator/num_experts-0", lambda: delegator(0), ValueError, "num_experts must be a positive integer"),
    ("delegator/num_experts-float", lambda: delegator(2.0), TypeError, "num_experts must be a positive integer"),
    ("delegator/num_experts-str", lambda: delegator("3"), TypeError, "num_experts must be a positive integer"),
    ("delegator/num_experts-bool", lambda: delegator(True), TypeError, "num_experts must be a positive integer"),
    ("delegator/num_classes-0", lambda: delegator(num_classes=0), ValueError, "num_classes must be a positive"),
    ("delegator/num_classes-str", lambda: delegator(num_classes="4"), TypeError, "num_classes must be a positive"),
    (
        "delegator/feature_dim-0",
        lambda: Delegator(backbone(), K, feature_dim=0, classifier=None),
        ValueError,
        "feature_dim must be a positive",
    ),
    ("delegator/dropout-1", lambda: delegator(dropout=1.0), ValueError, "dropout must be in"),
    ("delegator/dropout-neg", lambda: delegator(dropout=-0.1), ValueError, "dropout must be"),
    ("delegator/dropout-nan", lambda: delegator(dropout=NAN), ValueError, "dropout must be"),
    ("delegator/dropout-str", lambda: delegator(dropout="0.1"), TypeError, "dropout must be"),
    ("delegator/classifier-int", lambda: Delegator(backbone(), K, classifier=3), TypeError, "classifier must be"),
    (
        "delegator/classifier-missing",
        lambda: Delegator(backbone(), K, classifier="head"),
        ValueError,
        "classifier='head'.*no submodule",
    ),
    (
        "delegator/example_input-str",
        lambda: Delegator(backbone(), K, classifier=None, example_input="x"),
        TypeError,
        "example_input must be a torch.Tensor",
    ),
    (
        "delegator/example_input-empty-tuple",
        lambda: Delegator(backbone(), K, classifier=None, example_input=()),
        TypeError,
        "example_input must be",
    ),
    (
        "delegator/example_input-wrong-shape",
        lambda: Delegator(backbone(), K, classifier=None, example_input=torch.randn(2, D + 1)),
        ValueError,
        "example_input.*backbone failed",
    ),
    (
        "delegator/reuse_classifier-str",
        lambda: delegator(reuse_classifier="yes"),
        TypeError,
        "reuse_classifier must be a bool",
    ),
    (
        "delegator/zero_init_selection-str",
        lambda: delegator(zero_init_selection="no"),
        TypeError,
        "zero_init_selection must be a bool",
    ),
    # factory keywords go to torch, which checks them; they must agree with the backbone's parameters
    ("delegator/dtype-str", lambda: delegator(dtype="float32"), TypeError, "argument 'dtype' must be torch.dtype"),
    ("delegator/dtype-int", lambda: delegator(dtype=torch.int64), ValueError, "dtype=torch.int64 disagrees"),
    (
        "delegator/dtype-disagrees-with-backbone",
        lambda: delegator(dtype=torch.float64),
        ValueError,
        "dtype=torch.float64 .*backbone.*float32",
    ),
    ("delegator/device-bad", lambda: delegator(device="gpu0"), RuntimeError, "Invalid device string: 'gpu0'"),
    ("delegator/device-float", lambda: delegator(device=3.0), TypeError, "argument 'device' must be torch.device"),
    (
        "delegator/device-disagrees-with-backbone",
        lambda: delegator(device="meta"),
        ValueError,
        "device=meta .*backbone.*cpu",
    ),
    ("delegator/forward-str", lambda: delegator()("x"), TypeError, "the delegator needs a batch.*got str"),
    (
        "delegator/forward-float64-input",
        lambda: delegator()(x().double()),
        TypeError,
        "delegator.*float64.*float32",
    ),
    # ------------------------------------------------------------------------------------------- ExpertPool
    ("pool/empty", lambda: ExpertPool([]), ValueError, "experts must hold at least one"),
    ("pool/single-module", lambda: ExpertPool(nn.Linear(2, 2)), TypeError, "experts must be a sequence"),
    ("pool/int", lambda: ExpertPool(5), TypeError, "experts must be a sequence"),
    ("pool/str-item", lambda: ExpertPool([mlp(), "mlp"]), TypeError, r"experts\[1\] must be an nn.Module"),
    ("pool/shared", lambda: (lambda m: ExpertPool([m, m]))(mlp()), ValueError, "experts must be distinct"),
    ("pool/template-str", lambda: ExpertPool.from_template("mlp", 2), TypeError, "model must be an nn.Module"),
    ("pool/template-0", lambda: ExpertPool.from_template(mlp(), 0), ValueError, "num_experts must be a positive"),
    ("pool/init", lambda: ExpertPool.from_template(mlp(), 2, init="random"), ValueError, "init must be one of"),
    ("pool/getitem", lambda: ExpertPool.from_template(mlp(), 2)[2], IndexError, r"expert index 2 .*\[0, 2\)"),
    (
        "pool/routed-index-float",
        lambda: ExpertPool.from_template(mlp(), 2).forward_routed(torch.zeros(4), x()),
        TypeError,
        "index must be an integer tensor",
    ),
    (
        "pool/routed-index-range",
        lambda: ExpertPool.from_template(mlp(), 2).forward_routed(torch.tensor([0, 1, 2, 0]), x()),
        ValueError,
        r"index entries must lie in \[0, 2\)",
    ),
    (
        "pool/routed-index-list",
        lambda: ExpertPool.from_template(mlp(), 2).forward_routed([0, 1, 1, 0], x()),
        TypeError,
        "index must be a torch.Tensor",
    ),
    (
        "pool/routed-index-length",
        lambda: ExpertPool.from_template(mlp(), 2).forward_routed(torch.zeros(5, dtype=torch.long), x()),
        ValueError,
        "index has 5 entries but the inputs have batch size 4",
    ),
    (
        "pool/routed-no-input",
        lambda: ExpertPool.from_template(mlp(), 2).forward_routed(torch.zeros(4, dtype=torch.long)),
        TypeError,
        "forward_routed needs a batch.*got no input",
    ),
    (
        "pool/float64-experts-float32-input",
        lambda: ExpertPool.from_template(mlp().double(), 2)(x()),
        TypeError,
        r"experts\[0\].*float32.*float64",
    ),
    (
        "pool/routed-float64-experts-float32-input",
        lambda: ExpertPool.from_template(mlp().double(), 2).forward_routed(torch.zeros(4, dtype=torch.long), x()),
        TypeError,
        r"experts\[0\].*float32.*float64",
    ),
    (
        "pool/tuple-output",
        lambda: ExpertPool([Returns(lambda s: ("s", s))])(x()),
        TypeError,
        r"expert 0 \(Returns\): output\[0\] .* is a str, not a tensor",
    ),
    (
        "pool/different-shapes",
        lambda: ExpertPool([mlp(3), mlp(4)])(x()),
        ValueError,
        "every expert must return a tensor of the same shape",
    ),
    # ------------------------------------------------------------------------------------------- CoE
    ("coe/delegator-str", lambda: CoE("d", [mlp()]), TypeError, "delegator must be an nn.Module"),
    ("coe/experts-str", lambda: CoE(delegator(), "experts"), TypeError, r"experts\[0\] must be an nn.Module"),
    (
        "coe/k-mismatch",
        lambda: CoE(delegator(2), ExpertPool.from_template(mlp(), 3)),
        ValueError,
        "num_experts=2.*holds 3",
    ),
    ("coe/exit_threshold-neg", lambda: coe(exit_threshold=-0.1), ValueError, "exit_threshold must be a number in"),
    ("coe/exit_threshold-big", lambda: coe(exit_threshold=1.5), ValueError, "exit_threshold must be a number in"),
    ("coe/exit_threshold-nan", lambda: coe(exit_threshold=NAN), ValueError, "exit_threshold must be a number in"),
    ("coe/exit_threshold-str", lambda: coe(exit_threshold="high"), TypeError, "exit_threshold must be a number in"),
    ("coe/exit_threshold-bool", lambda: coe(exit_threshold=True), TypeError, "exit_threshold must be a number in"),
    (
        "coe/exit_threshold-without-rough-head",
        lambda: coe(num_classes=None, exit_threshold=0.5),
        ValueError,
        "exit_threshold needs a rough prediction",
    ),
    (
        "coe/dtype-delegator-vs-experts",
        lambda: CoE(delegator(), ExpertPool.from_template(mlp().double(), K)),
        TypeError,
        "delegator.*float32.*experts.*float64",
    ),
    ("coe/no-input", lambda: coe()(), TypeError, "CoE needs a batch: at least one batch-first tensor.*got no input"),
    ("coe/list-input", lambda: coe()([1.0, 2.0]), TypeError, "CoE needs a batch.*got list"),
    (
        "coe/scalar-input",
        lambda: coe()(torch.tensor(1.0)),
        TypeError,
        "CoE needs a batch.*got Tensor",
    ),
    ("coe/batch-mismatch", lambda: coe()(x(4), torch.randn(5, 2)), ValueError, "same batch size"),
    ("coe/eval-batch-mismatch", lambda: coe().eval()(x(4), torch.randn(5, 2)), ValueError, "same batch size"),
    ("coe/float64-input-train", lambda: coe()(x().double()), TypeError, "delegator.*float64.*float32"),
    ("coe/float64-input-eval", lambda: coe().eval()(x().double()), TypeError, "delegator.*float64.*float32"),
    ("coe/int-input", lambda: coe().eval()(torch.ones(4, D, dtype=torch.long)), TypeError, "delegator.*int64"),
    ("coe/route-tensor", lambda: coe().route(torch.randn(4, K)), TypeError, "delegator_output must be a Delegator"),
    (
        "coe/route-threshold",
        lambda: (lambda m: m.route(m.delegate(x()), exit_threshold=2.0))(coe()),
        ValueError,
        "exit_threshold must be",
    ),
    (
        "coe/forward_eval-threshold",
        lambda: coe().forward_eval(x(), exit_threshold="x"),
        TypeError,
        "exit_threshold must be",
    ),
    (
        "coe/rough-classes-vs-expert-classes-all-exit",
        lambda: coe(expert_classes=C + 1, exit_threshold=0.0).eval()(x()),
        ValueError,
        "rough head.*4 classes.*experts.*5",
    ),
    (
        "coe/rough-classes-vs-expert-classes-no-exit",
        lambda: coe(expert_classes=C + 1, exit_threshold=1.0).eval()(x()),
        ValueError,
        "rough head.*4 classes.*experts.*5",
    ),
    (
        "coe/rough-classes-vs-expert-classes-train",
        lambda: coe(expert_classes=C + 1, exit_threshold=0.5).train()(x()),
        ValueError,
        "rough head.*4 classes.*experts.*5",
    ),
    (
        "coe/user-delegator-wrong-k",
        lambda: CoE(Returns(lambda s: s[:, :2]), ExpertPool.from_template(mlp(), K))(x()),
        ValueError,
        r"selection_logits must have shape \[B=4, K=3\]",
    ),
    (
        "coe/user-delegator-dict",
        lambda: CoE(Returns(lambda s: {"sel": s}), ExpertPool.from_template(mlp(), K))(x()),
        TypeError,
        "the delegator must return a DelegatorOutput",
    ),
    (
        "coe/user-delegator-rough-batch",
        lambda: CoE(Returns(lambda s: (s, s[:2])), ExpertPool.from_template(mlp(), K))(x()),
        ValueError,
        r"rough_logits must have shape \[B=4, C\]",
    ),
    (
        "coe/user-delegator-rough-int",
        lambda: CoE(Returns(lambda s: (s, s.long())), ExpertPool.from_template(mlp(), K)).eval()(x()),
        TypeError,
        "rough_logits must be a floating-point",
    ),
    # ------------------------------------------------------------------------------------------- CoELoss
    (
        "loss/swapped",
        lambda: CoELoss(LabelGenerator(), BalancedTransportWeighter(K)),
        TypeError,
        "weighter and labeler.*swapped",
    ),
    ("loss/weighter-str", lambda: CoELoss("wgm", LabelGenerator()), TypeError, "weighter must be callable"),
    ("loss/labeler-int", lambda: CoELoss(BalancedTransportWeighter(K), 5), TypeError, "labeler must be callable"),
    (
        "loss/per_sample_loss-str",
        lambda: CoELoss(BalancedTransportWeighter(K), LabelGenerator(), per_sample_loss="ce"),
        TypeError,
        "per_sample_loss must be callable",
    ),
    (
        "loss/expert_weight-neg",
        lambda: CoELoss(BalancedTransportWeighter(K), LabelGenerator(), expert_weight=-1),
        ValueError,
        "expert_weight must be",
    ),
    (
        "loss/selection_weight-nan",
        lambda: CoELoss(BalancedTransportWeighter(K), LabelGenerator(), selection_weight=NAN),
        ValueError,
        "selection_weight must be",
    ),
    (
        "loss/rough_weight-str",
        lambda: CoELoss(BalancedTransportWeighter(K), LabelGenerator(), rough_weight="1"),
        TypeError,
        "rough_weight must be",
    ),
    (
        "loss/balance_weight-inf",
        lambda: CoELoss(BalancedTransportWeighter(K), LabelGenerator(), balance_weight=INF),
        ValueError,
        "balance_weight must be",
    ),
    (
        "loss/expert_reduction",
        lambda: CoELoss(BalancedTransportWeighter(K), LabelGenerator(), expert_reduction="max"),
        ValueError,
        "expert_reduction must be one of",
    ),
    (
        "loss/sync",
        lambda: CoELoss(BalancedTransportWeighter(K), LabelGenerator(), sync="always"),
        ValueError,
        "sync must be",
    ),
    ("loss/eval-output", lambda: loss()(coe().eval()(x()), y()), TypeError, "output must be a CoETrainOutput"),
    ("loss/target-length", lambda: loss()(train_out(), y(3)), ValueError, "target must be batch-first with B=4"),
    ("loss/target-list", lambda: loss()(train_out(), [0, 1, 2, 3]), TypeError, "target must be a torch.Tensor"),
    (
        "loss/target-out-of-range",
        lambda: loss()(train_out(), torch.tensor([0, 1, 2, C])),
        ValueError,
        r"target must hold class indices in \[0, 4\)",
    ),
    (
        "loss/target-negative",
        lambda: loss()(train_out(), torch.tensor([0, 1, 2, -1])),
        ValueError,
        r"target must hold class indices in \[0, 4\)",
    ),
    (
        "loss/target-float-vector",
        lambda: loss()(train_out(), torch.rand(4)),
        TypeError,
        "target.*class indices.*or class probabilities",
    ),
    (
        "loss/rough_target-float",
        lambda: loss()(train_out(), y(), rough_target=torch.rand(4)),
        ValueError,
        "rough_target",
    ),
    (
        "loss/rough_target-out-of-range",
        lambda: loss()(train_out(), y(), rough_target=torch.tensor([0, 1, 2, 9])),
        ValueError,
        r"rough_target must hold class indices in \[0, 4\)",
    ),
    (
        "loss/per_sample_losses-1d",
        lambda: loss().per_sample_losses(torch.randn(4), y()),
        ValueError,
        r"expert_outputs must be a Tensor\[K, B, ...\]",
    ),
    (
        "loss/per_sample_losses-str",
        lambda: loss().per_sample_losses("outputs", y()),
        TypeError,
        "expert_outputs must be a torch.Tensor",
    ),
    (
        "loss/per_sample_loss-scalar",
        lambda: CoELoss(BalancedTransportWeighter(K), LabelGenerator(), per_sample_loss=lambda o, t: o.sum())(
            train_out(), y()
        ),
        ValueError,
        r"per_sample_loss must return a Tensor\[B\]",
    ),
    (
        "loss/weighter-without-weights",
        lambda: CoELoss(lambda s: Obj(w=s), LabelGenerator())(train_out(), y()),
        TypeError,
        "weighter must return an object with weights",
    ),
    (
        "loss/labeler-without-probs",
        lambda: CoELoss(BalancedTransportWeighter(K), lambda losses: losses)(train_out(), y()),
        TypeError,
        "labeler must return an object with probs",
    ),
    (
        "loss/selection-logits-1d",
        lambda: loss()(CoETrainOutput(torch.randn(4), None, torch.randn(K, 4, C)), y()),
        ValueError,
        r"output.selection_logits must be a Tensor\[B, K\]",
    ),
    (
        "loss/expert-outputs-k",
        lambda: loss()(CoETrainOutput(torch.randn(4, K), None, torch.randn(K - 1, 4, C)), y()),
        ValueError,
        r"output.expert_outputs must have shape \[K=3, B=4",
    ),
    (
        "loss/rough-logits-batch",
        lambda: loss()(CoETrainOutput(torch.randn(4, K), torch.randn(3, C), torch.randn(K, 4, C)), y()),
        ValueError,
        r"output.rough_logits must be None or a Tensor\[B=4, C\]",
    ),
    (
        "loss/nan-selection-logits",
        lambda: loss()(CoETrainOutput(torch.full((4, K), NAN), None, torch.randn(K, 4, C)), y()),
        ValueError,
        "selection_logits.*NaN",
    ),
    # ------------------------------------------------------------------------------------------- predict
    ("predict/model", lambda: predict(nn.Linear(2, 2), loader()), TypeError, "model must be a pycoe CoE"),
    ("predict/empty-loader", lambda: predict(coe(), []), ValueError, "loader produced no batch"),
    ("predict/loader-int", lambda: predict(coe(), 5), TypeError, "loader must be an iterable"),
    ("predict/threshold", lambda: predict(coe(), loader(), exit_threshold=2), ValueError, "exit_threshold must be"),
    ("predict/int-batches", lambda: predict(coe(), [5]), TypeError, "each batch must be a tensor, a tuple.*unpack"),
    (
        "predict/mapping-int-keys",
        lambda: predict(coe(), [{0: x()}]),
        TypeError,
        "mapping whose keys are not all strings",
    ),
    ("predict/unpack-str", lambda: predict(coe(), loader(), unpack="x"), TypeError, "unpack must be callable"),
    (
        "predict/unpack-result",
        lambda: predict(coe(), loader(), unpack=lambda b: b[0]),
        TypeError,
        r"unpack must return \(inputs tuple, target\)",
    ),
    ("predict/device", lambda: predict(coe(), loader(), device="gpu0"), ValueError, "device must be"),
    # ------------------------------------------------------------------------------------------- threshold_sweep
    ("sweep/model", lambda: threshold_sweep(nn.Linear(2, 2), loader(), [0.5]), TypeError, "model must be a pycoe"),
    ("sweep/thresholds-float", lambda: threshold_sweep(coe(), loader(), 0.5), TypeError, "thresholds must be"),
    ("sweep/thresholds-empty", lambda: threshold_sweep(coe(), loader(), []), ValueError, "thresholds must not be"),
    (
        "sweep/thresholds-range",
        lambda: threshold_sweep(coe(), loader(), [0.5, 1.2]),
        ValueError,
        r"thresholds\[1\] must be",
    ),
    ("sweep/thresholds-str", lambda: threshold_sweep(coe(), loader(), "abc"), TypeError, "thresholds must be"),
    ("sweep/flops-str", lambda: _sweep_with_flops("table"), TypeError, "flops must be None, False or a mapping"),
    ("sweep/flops-true", lambda: _sweep_with_flops(True), TypeError, "flops must be None, False or a mapping"),
    ("sweep/flops-missing", lambda: _sweep_with_flops({"delegator": 1.0}), ValueError, "flops must be.*without"),
    (
        "sweep/flops-length",
        lambda: _sweep_with_flops({"delegator": 1.0, "experts": [1.0]}),
        ValueError,
        "one entry per expert",
    ),
    (
        "sweep/flops-negative",
        lambda: _sweep_with_flops({"delegator": 1.0, "experts": [1.0, -2.0, 1.0]}),
        ValueError,
        r"flops\['experts'\]\[1\] must be a finite number >= 0",
    ),
    (
        "sweep/flops-nan",
        lambda: _sweep_with_flops({"delegator": NAN, "experts": [1.0] * K}),
        ValueError,
        r"flops\['delegator'\] must be a finite number >= 0",
    ),
    (
        "sweep/flops-str-entry",
        lambda: _sweep_with_flops({"delegator": "abc", "experts": [1.0] * K}),
        TypeError,
        r"flops\['delegator'\] must be a finite number >= 0",
    ),
    (
        "sweep/flops-unknown-key",
        lambda: _sweep_with_flops({"delegator": 1.0, "experts": [1.0] * K, "expert": 2.0}),
        ValueError,
        r"flops has unknown keys \['expert'\]",
    ),
    (
        "sweep/flops-experts-not-sequence",
        lambda: _sweep_with_flops({"delegator": 1.0, "experts": 5.0}),
        TypeError,
        r"flops\['experts'\] must be a sequence",
    ),
    (
        "sweep/flops-experts-str",
        lambda: _sweep_with_flops({"delegator": 1.0, "experts": "abc"}),
        TypeError,
        r"flops\['experts'\] must be a sequence",
    ),
    (
        "sweep/targets-length",
        lambda: threshold_sweep(coe(), [(x(4), y(1))], [0.5]),
        ValueError,
        r"target.*B=4.*got shape \(1,\)",
    ),
    (
        "sweep/targets-out-of-range",
        lambda: threshold_sweep(coe(), [(x(4), torch.tensor([0, 1, 2, C]))], [0.5]),
        ValueError,
        r"targets must be class indices in \[0, 4\)",
    ),
    (
        "sweep/targets-float",
        lambda: threshold_sweep(coe(), [(x(4), torch.rand(4))], [0.5]),
        ValueError,
        "class-index targets",
    ),
    ("sweep/targets-missing", lambda: threshold_sweep(coe(), [x(4)], [0.5]), ValueError, "class-index targets"),
    (
        "sweep/empty-batches",
        lambda: threshold_sweep(coe(), [(x(0), y(0)), (x(0), y(0))], [0.5]),
        ValueError,
        "loader produced no sample",
    ),
    ("sweep/empty-loader", lambda: threshold_sweep(coe(), [], [0.5]), ValueError, "loader produced no"),
    (
        "sweep/no-rough-head",
        lambda: threshold_sweep(coe(num_classes=None), loader(), [0.5]),
        ValueError,
        "rough head",
    ),
    (
        "sweep/sequence-experts",
        lambda: threshold_sweep(
            CoE(delegator(), [Returns(lambda s: s[:, None, :]) for _ in range(K)]), loader(), [None]
        ),
        ValueError,
        r"needs experts returning class logits \[B, C\]",
    ),
    ("sweep/device", lambda: threshold_sweep(coe(), loader(), [0.5], device=5.0), TypeError, "device must be"),
    # ------------------------------------------------------------------------------------------- early exit
    ("exit/mask-threshold", lambda: exit_mask(torch.rand(3), 1.5), ValueError, "threshold must be a number in"),
    ("exit/mask-2d", lambda: exit_mask(torch.rand(3, 1), 0.5), ValueError, "confidence must have 1 dimensions"),
    ("exit/confidence-1d", lambda: rough_confidence(torch.rand(3)), ValueError, "rough_logits must have 2"),
    (
        "exit/confidence-int",
        lambda: rough_confidence(torch.ones(3, 2, dtype=torch.long)),
        TypeError,
        "rough_logits must be a floating-point",
    ),
    # ------------------------------------------------------------------------------------------- BasisNet
    ("basisnet/lightweight-none", lambda: BasisNet(None, Conv(), 2, C), TypeError, "lightweight must be"),
    ("basisnet/specialist-str", lambda: BasisNet(Conv(), "resnet", 2, C), TypeError, "specialist must be"),
    ("basisnet/num_bases-0", lambda: BasisNet(Conv(), Conv(), 0, C), ValueError, "num_bases must be a positive"),
    ("basisnet/num_bases-str", lambda: BasisNet(Conv(), Conv(), "2", C), TypeError, "num_bases must be a positive"),
    ("basisnet/num_classes-0", lambda: BasisNet(Conv(), Conv(), 2, 0), ValueError, "num_classes must be a positive"),
    ("basisnet/temperature-0", lambda: basisnet(temperature=0), ValueError, "temperature must be"),
    ("basisnet/temperature-str", lambda: basisnet(temperature="1"), TypeError, "temperature must be"),
    ("basisnet/exit_threshold", lambda: basisnet(exit_threshold=2), ValueError, "exit_threshold must be"),
    ("basisnet/normalization", lambda: basisnet(normalization="l1"), ValueError, "normalization must be one of"),
    ("basisnet/basis_dropout-1", lambda: basisnet(basis_dropout=1.0), ValueError, "basis_dropout must be in"),
    ("basisnet/basis_dropout-str", lambda: basisnet(basis_dropout="0.1"), TypeError, "basis_dropout must be"),
    ("basisnet/preview_size-0", lambda: basisnet(preview_size=(0, 4)), ValueError, "preview_size must be"),
    ("basisnet/preview_size-3", lambda: basisnet(preview_size=(4, 4, 4)), TypeError, "preview_size must be"),
    ("basisnet/preview_size-float", lambda: basisnet(preview_size=2.5), TypeError, "preview_size must be"),
    (
        "basisnet/specialist-bases",
        lambda: BasisNet(Conv(), BasisSpecialist(Conv(), 3), 2, C),
        ValueError,
        "specialist has num_bases=3 but num_bases=2",
    ),
    (
        "basisnet/delegator-bases",
        lambda: BasisNet(Delegator(Conv(), 3, num_classes=C), Conv(), 2, C),
        ValueError,
        "lightweight Delegator .*3 .*num_bases=2",
    ),
    (
        "basisnet/delegator-classes",
        lambda: BasisNet(Delegator(Conv(), 2, num_classes=C), Conv(), 2, C + 1),
        ValueError,
        "num_classes=4 but num_classes=5",
    ),
    (
        "basisnet/exit-without-rough-head",
        lambda: BasisNet(Conv(), Conv(), 2, None, exit_threshold=0.5),
        ValueError,
        "exit_threshold needs a rough prediction",
    ),
    ("basisnet/forward-str", lambda: basisnet()("x"), TypeError, "x must be a torch.Tensor, got str 'x'"),
    (
        "basisnet/forward-scalar",
        lambda: basisnet()(torch.tensor(1.0)),
        ValueError,
        r"x must be batch-first, got shape \(\)",
    ),
    (
        "basisnet/preview-needs-images",
        lambda: basisnet(preview_size=4)(torch.randn(2, 3)),
        ValueError,
        "preview_size needs an image batch",
    ),
    (
        "basisnet/float64-input",
        lambda: basisnet().eval()(img().double()),
        TypeError,
        "lightweight model.*float64.*float32",
    ),
    (
        "basisnet/rough-vs-specialist-classes-all-exit",
        lambda: basisnet(specialist_classes=C + 1, exit_threshold=0.0).eval()(img()),
        ValueError,
        "rough head.*4 classes.*specialist.*5",
    ),
    (
        "basisnet/rough-vs-specialist-classes-train",
        lambda: basisnet(specialist_classes=C + 1, exit_threshold=0.5).train()(img()),
        ValueError,
        "rough head.*4 classes.*specialist.*5",
    ),
    (
        "basisnet/forward_eval-threshold",
        lambda: basisnet().forward_eval(img(), exit_threshold=-1),
        ValueError,
        "exit_threshold must be",
    ),
    # ------------------------------------------------------------------------------------------- BasisSpecialist
    ("specialist/model-str", lambda: BasisSpecialist("resnet", 2), TypeError, "model must be an nn.Module"),
    ("specialist/num_bases-0", lambda: BasisSpecialist(Conv(), 0), ValueError, "num_bases must be a positive"),
    ("specialist/init_noise-neg", lambda: BasisSpecialist(Conv(), 2, init_noise=-1), ValueError, "init_noise must"),
    ("specialist/init_noise-str", lambda: BasisSpecialist(Conv(), 2, init_noise="x"), TypeError, "init_noise must"),
    ("specialist/strategy", lambda: BasisSpecialist(Conv(), 2, strategy="fast"), ValueError, "strategy must be"),
    ("specialist/generator", lambda: BasisSpecialist(Conv(), 2, generator=0), TypeError, "generator must be"),
    (
        "specialist/predicate-none-chosen",
        lambda: BasisSpecialist(Conv(), 2, predicate=lambda name, m: False),
        ValueError,
        "predicate chose no convolution",
    ),
    (
        "specialist/coefficients-shape",
        lambda: specialist()(img(), torch.rand(2, 3)),
        ValueError,
        r"coefficients must have shape \[B, N\] = \[2, 2\]",
    ),
    (
        "specialist/coefficients-list",
        lambda: specialist()(img(), [[0.5, 0.5]] * 2),
        TypeError,
        "coefficients must be a torch.Tensor",
    ),
    (
        "specialist/coefficients-int",
        lambda: specialist()(img(), torch.ones(2, 2, dtype=torch.long)),
        TypeError,
        "coefficients must be a floating-point",
    ),
    (
        "specialist/coefficients-dtype",
        lambda: specialist()(img(), torch.rand(2, 2, dtype=torch.float64)),
        TypeError,
        "coefficients must have the dtype of the basis kernels",
    ),
    ("specialist/x-str", lambda: specialist()("x", torch.rand(2, 2)), TypeError, "x must be a torch.Tensor"),
    (
        "specialist/x-scalar",
        lambda: specialist()(torch.tensor(1.0), torch.rand(2, 2)),
        ValueError,
        "x must be batch-first",
    ),
    (
        "specialist/x-float64",
        lambda: specialist()(img().double(), torch.rand(2, 2)),
        TypeError,
        "x has dtype torch.float64.*float32",
    ),
    (
        "specialist/synthesize-shape",
        lambda: specialist().synthesize(torch.rand(3)),
        ValueError,
        r"coefficients must have shape \[2\]",
    ),
    ("specialist/perturb-scale", lambda: specialist().perturb_bases(-1.0), ValueError, "scale must be"),
    (
        "specialist/perturb-generator",
        lambda: specialist().perturb_bases(0.1, generator="g"),
        TypeError,
        "generator must be a torch.Generator",
    ),
    # ------------------------------------------------------------------------------------------- basis_* functions
    ("coefficients/str", lambda: basis_coefficients("logits"), TypeError, "logits must be a torch.Tensor"),
    ("coefficients/1d", lambda: basis_coefficients(torch.randn(3)), ValueError, "logits must have 2 dimensions"),
    (
        "coefficients/int",
        lambda: basis_coefficients(torch.ones(2, 3, dtype=torch.long)),
        TypeError,
        "logits must be a floating-point",
    ),
    ("coefficients/normalization", lambda: basis_coefficients(torch.randn(2, 3), "l2"), ValueError, "normalization"),
    (
        "coefficients/temperature",
        lambda: basis_coefficients(torch.randn(2, 3), temperature=-1),
        ValueError,
        "temperature must be",
    ),
    ("dropout/p-1", lambda: basis_dropout(torch.rand(2, 3), 1.0), ValueError, "p must be in"),
    ("dropout/p-str", lambda: basis_dropout(torch.rand(2, 3), "0.5"), TypeError, "p must be"),
    ("dropout/1d", lambda: basis_dropout(torch.rand(3), 0.5), ValueError, "coefficients must have 2"),
    (
        "dropout/generator",
        lambda: basis_dropout(torch.rand(2, 3), 0.5, generator=1),
        TypeError,
        "generator must be a torch.Generator",
    ),
    ("loss-basisnet/output", lambda: basisnet_loss(torch.randn(2, C), y(2)), TypeError, "BasisNetTrainOutput"),
    (
        "loss-basisnet/rough_weight",
        lambda: basisnet_loss(basisnet().train()(img()), y(2), rough_weight=-1),
        ValueError,
        "rough_weight must be",
    ),
    (
        "loss-basisnet/criterion-str",
        lambda: basisnet_loss(basisnet().train()(img()), y(2), criterion="ce"),
        TypeError,
        "criterion must be callable",
    ),
    (
        "loss-basisnet/target-length",
        lambda: basisnet_loss(basisnet().train()(img()), y(3)),
        ValueError,
        "target must be batch-first with B=2",
    ),
    (
        "loss-basisnet/target-range",
        lambda: basisnet_loss(basisnet().train()(img()), torch.tensor([0, C])),
        ValueError,
        r"target must hold class indices in \[0, 4\)",
    ),
    (
        "loss-basisnet/criterion-vector",
        lambda: basisnet_loss(basisnet().train()(img()), y(2), criterion=lambda p, t: p.sum(1)),
        ValueError,
        "criterion must return a scalar",
    ),
]


@pytest.mark.parametrize("call,exception,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(call, exception, message):
    with pytest.raises(exception, match=message):
        call()


def test_numbers_may_be_numpy_scalars_one_element_tensors_or_arrays():
    assert coe(exit_threshold=np.float32(0.5)).exit_threshold == 0.5
    assert coe(exit_threshold=torch.tensor(0.25)).exit_threshold == 0.25
    assert basisnet(temperature=np.float32(2.0)).temperature == 2.0
    model, data = coe(), loader()
    expected = threshold_sweep(model, data, [0.5, 0.9], flops={"delegator": 1.0, "experts": [1.0, 2.0, 3.0]})
    assert threshold_sweep(model, data, np.array([0.5, 0.9]), flops={"delegator": 1, "experts": [1, 2, 3]}) == expected
    table = {"delegator": torch.tensor(1.0), "experts": torch.tensor([1.0, 2.0, 3.0])}
    assert threshold_sweep(model, data, torch.tensor([0.5, 0.9], dtype=torch.float64), flops=table) == expected
    for bad in (np.bool_(True), torch.tensor(True), torch.tensor([0.5, 0.5])):
        with pytest.raises(TypeError, match="exit_threshold must be a number in"):
            coe(exit_threshold=bad)


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
