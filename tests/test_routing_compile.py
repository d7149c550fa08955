"""Routing under torch.compile(fullgraph=True) and torch.export: the custom solver op, WGM, LGM and metrics.

The compiled results must equal the eager ones; the solver is one opaque node (``pycoe::balanced_assignment``).
Compilation costs seconds per graph, so the checks share a few compiled functions.
"""

from __future__ import annotations

import pytest
import torch

import pycoe.routing.weighting as weighting
from pycoe.routing.labels import LabelGenerator
from pycoe.routing.metrics import (
    agreement,
    assignment_entropy,
    expert_load,
    load_balance_cv2,
    mean_selection_entropy,
    oracle_accuracy,
)
from pycoe.routing.transport import balanced_assignment
from pycoe.routing.weighting import BalancedTransportWeighter

K = 3
OP = torch.ops.pycoe.balanced_assignment.default


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(10, K), None, "exact", None, None),
        (torch.randn(10, K, dtype=torch.float64), torch.tensor([5, 0, 5]), "exact", None, None),
        (torch.randn(300, 8), None, "exact", None, None),  # flow route
        (torch.randn(9, K), torch.tensor([3, 3, 3]), "sinkhorn", 0.05, 50),
        (torch.randn(9, K), None, "greedy", None, None),
    ],
)
def test_opcheck(args):
    torch.library.opcheck(OP, args)


def _routing_step(wgms, lgms, logits, losses, expert_logits, target):
    """Everything a CoE loss computes for routing, as one function (one graph when compiled)."""
    out = {}
    for name, wgm in wgms.items():
        w = wgm(logits)
        out[f"{name}_weights"], out[f"{name}_assignment"] = w.weights, w.assignment
        out[f"{name}_load"], out[f"{name}_mean_score"] = w.load, w.mean_score
    for name, lgm in lgms.items():
        labels = lgm(losses)
        out[f"{name}_probs"], out[f"{name}_index"] = labels.probs, labels.index
    choice = logits.argmax(dim=1)
    out["load"] = expert_load(choice, K)
    out["load_fraction"] = expert_load(choice, K, normalize=True)
    out["entropy"] = assignment_entropy(choice, K, normalize=True)
    out["selection_entropy"] = mean_selection_entropy(logits)
    out["agreement"] = agreement(logits, out["best_index"])
    out["oracle"] = oracle_accuracy(expert_logits, target)
    out["cv2"] = load_balance_cv2(logits)
    out["cv2_probs"] = load_balance_cv2(logits.softmax(dim=1), is_probs=True)
    return out


def _inputs(batch, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, K, generator=g, requires_grad=True)
    losses = torch.rand(batch, K, generator=g)
    expert_logits = torch.randn(K, batch, 5, generator=g)
    target = torch.randint(0, 5, (batch,), generator=g)
    return logits, losses, expert_logits, target


def _assert_same(compiled, eager):
    assert compiled.keys() == eager.keys()
    for name in eager:
        c, e = compiled[name], eager[name]
        assert c.dtype == e.dtype and c.shape == e.shape, name
        if e.is_floating_point():
            torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(c, e), name


@pytest.mark.slow
def test_compiled_routing_equals_eager():
    """Every method, score transform and label mode in one compiled graph, at three batch sizes."""
    options = {"entropic_reg": 0.05, "max_iter": 30}
    wgms = {
        "exact": BalancedTransportWeighter(K, epsilon=0.1),
        "sinkhorn": BalancedTransportWeighter(K, score="softmax", method="sinkhorn", solver_options=options),
        "greedy": BalancedTransportWeighter(K, epsilon=0.3, score="logits", method="greedy"),
    }
    lgms = {
        "best": LabelGenerator("best"),
        "soft": LabelGenerator("soft", temperature=0.5),
        "balanced": LabelGenerator("balanced"),
        "balanced_sinkhorn": LabelGenerator("balanced", method="sinkhorn", solver_options=options),
    }
    compiled = torch.compile(_routing_step, fullgraph=True, backend="aot_eager", dynamic=True)
    for batch, seed in ((12, 0), (17, 1), (2, 2)):  # B=2 < K: an expert with capacity 0
        args = _inputs(batch, seed)
        _assert_same(compiled(wgms, lgms, *args), _routing_step(wgms, lgms, *args))


def test_compiled_solver_is_one_opaque_node():
    def f(scores):
        return balanced_assignment(scores.log_softmax(dim=1))

    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(f, tracing_mode="symbolic")(torch.randn(8, K)).graph
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets.count(OP) == 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    s = torch.randn(30, K)
    assert torch.equal(compiled(s), f(s))


def test_compiled_data_checks_raise():
    wgm = BalancedTransportWeighter(K)
    compiled_wgm = torch.compile(wgm, fullgraph=True, backend="aot_eager")
    bad = torch.randn(6, K)
    bad[2, 1] = float("nan")
    with pytest.raises(RuntimeError, match="selection_logits must be finite"):
        compiled_wgm(bad)
    compiled_weights = torch.compile(wgm.weights_for, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled_weights(torch.tensor([0, 2, 1])), wgm.weights_for(torch.tensor([0, 2, 1])))
    with pytest.raises(RuntimeError, match=r"assignment entries must lie in \[0, 3\) \(num_experts=3\)"):
        compiled_weights(torch.tensor([0, 3, 1]))
    compiled_load = torch.compile(expert_load, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="index entries must lie in"):
        compiled_load(torch.tensor([0, -2]), K)


def test_global_scope_says_it_runs_eagerly_only(monkeypatch):
    monkeypatch.setattr(weighting._dist, "is_distributed", lambda: True)
    wgm = BalancedTransportWeighter(K, scope="global")
    with pytest.raises(Exception, match="runs eagerly only"):
        torch.compile(wgm, fullgraph=True, backend="aot_eager")(torch.randn(6, K))


def test_export_keeps_the_solver_as_one_node():
    class Routing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wgm = BalancedTransportWeighter(K, epsilon=0.2)

        def forward(self, logits):
            out = self.wgm(logits)
            return out.weights, out.load

    model = Routing()
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(model, (torch.randn(8, K),), dynamic_shapes=({0: batch},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(OP) == 1
    z = torch.randn(21, K)
    for got, want in zip(ep.module()(z), model(z)):
        assert torch.equal(got, want)


@pytest.mark.slow
def test_inductor_compiled_weighter_and_labeler_equal_eager():
    wgm = BalancedTransportWeighter(K, epsilon=0.1)
    lgms = {"best": LabelGenerator("best"), "balanced": LabelGenerator("balanced")}

    def step(logits, losses):
        w = wgm(logits)
        out = [w.weights, w.assignment, w.load, w.mean_score]
        for lgm in lgms.values():
            labels = lgm(losses)
            out += [labels.probs, labels.index]
        return out

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    logits, losses, _, _ = _inputs(16, 3)
    for got, want in zip(compiled(logits, losses), step(logits, losses)):
        if want.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got, want)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_solver_checks_its_options_when_it_runs(dynamic):
    def f(scores, entropic_reg):
        return balanced_assignment(scores, method="sinkhorn", entropic_reg=entropic_reg, max_iter=0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    with pytest.raises(ValueError, match="max_iter must be a positive integer, got 0"):
        compiled(torch.randn(6, K), 0.05)
