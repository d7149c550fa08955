"""torch.compile of the CoE: the eval forward (routing and early exit) and the training step, against eager.

Compilation is slow on these CPUs (seconds per graph): the tests are few, use ``backend="aot_eager"`` where
inductor adds nothing to what they check, and the inductor ones are marked slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from _export_models import RES, K, assert_same_coe_output, conv_net, spread_coe_and_pool

from pycoe.coe import CoE, CoELoss, Delegator, ExpertPool
from pycoe.export import compile_inference, prepare_for_export
from pycoe.routing import BalancedTransportWeighter, LabelGenerator

PATTERNS = [("mixed", 16), ("mixed", 5), ("all_exit", 3), ("none_exit", 7), ("one_expert", 9), ("mixed", 1)]


@pytest.fixture(scope="module")
def coe_and_pool():
    return spread_coe_and_pool()


def test_compiled_inference_is_one_graph(coe_and_pool):
    model, pool = coe_and_pool
    x = pool.batch("mixed", 8)
    prepared = prepare_for_export(model, x)
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explanation = torch._dynamo.explain(prepared)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


@pytest.mark.slow
def test_compiled_inference_matches_eager(coe_and_pool):
    model, pool = coe_and_pool
    compiled = compile_inference(model, pool.batch("mixed", 8), backend="aot_eager")
    for pattern, size in PATTERNS:
        x = pool.batch(pattern, size)
        with torch.no_grad():
            assert_same_coe_output(compiled(x), model(x))


@pytest.mark.slow
def test_compiled_inference_with_inductor_matches_eager(coe_and_pool):
    model, pool = coe_and_pool
    compiled = compile_inference(model, pool.batch("mixed", 8))
    for pattern, size in [("mixed", 20), ("one_expert", 17), ("all_exit", 16)]:
        x = pool.batch(pattern, size)
        with torch.no_grad():
            assert_same_coe_output(compiled(x), model(x))


@pytest.mark.slow
def test_plain_torch_compile_of_the_eval_coe_breaks_only_at_data_dependent_sizes(coe_and_pool):
    """Without capture_dynamic_output_shape_ops, dynamo ends a graph at each nonzero (the kept samples, then each
    expert's rows) and resumes after it: K + 1 breaks, the result unchanged."""
    model, pool = coe_and_pool
    x = pool.batch("mixed", 12)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count >= K + 1
    assert all("nonzero" in reason.reason for reason in explanation.break_reasons), [
        r.reason.splitlines()[0] for r in explanation.break_reasons
    ]
    compiled = torch.compile(model, backend="aot_eager")
    for pattern, size in [("mixed", 12), ("one_expert", 6)]:
        x = pool.batch(pattern, size)
        with torch.no_grad():
            ref, got = model(x), compiled(x)
        torch.testing.assert_close(got.output, ref.output)
        assert torch.equal(got.expert_index, ref.expert_index) and torch.equal(got.exited, ref.exited)


# ---------------------------------------------------------------------------------------------- training step
def training_setup():
    torch.manual_seed(3)
    delegator = Delegator(conv_net(), num_experts=K, num_classes=10, classifier="8", zero_init_selection=False)
    model = CoE(delegator, ExpertPool.from_template(conv_net(), K, init="reinit"))
    criterion = CoELoss(BalancedTransportWeighter(num_experts=K), LabelGenerator(), balance_weight=0.1)
    return model.train(), criterion


def loss_of(model, criterion, x, y):
    return criterion(model(x), y)


def check_step_matches_eager(backend: str, batches: list[int]) -> None:
    model, criterion = training_setup()
    twin = copy.deepcopy(model)
    step = torch.compile(loss_of, fullgraph=True, backend=backend)
    for batch in batches:
        x, y = torch.randn(batch, 3, RES, RES), torch.randint(0, 10, (batch,))
        loss, info = loss_of(model, criterion, x, y)
        loss.backward()
        compiled_loss, compiled_info = step(twin, criterion, x, y)
        compiled_loss.backward()  # the backward graph AOTAutograd compiled with the forward
        torch.testing.assert_close(compiled_loss, loss)
        assert compiled_info.keys() == info.keys()
        for name in info:
            torch.testing.assert_close(compiled_info[name], info[name], msg=name)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        for (name, b), c in zip(model.named_buffers(), twin.buffers()):  # BatchNorm running statistics
            torch.testing.assert_close(c, b, msg=name)
        model.zero_grad()
        twin.zero_grad()


def test_training_step_is_one_graph():
    model, criterion = training_setup()
    x, y = torch.randn(12, 3, RES, RES), torch.randint(0, 10, (12,))
    explanation = torch._dynamo.explain(loss_of)(model, criterion, x, y)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, [
        r.reason.splitlines()[0] for r in explanation.break_reasons
    ]


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    check_step_matches_eager("aot_eager", [12, 9, 16])


@pytest.mark.slow
def test_compiled_training_step_with_inductor_matches_eager():
    check_step_matches_eager("inductor", [12])
