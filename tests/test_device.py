"""Device handling: results on the input's device, host synchronisations, the solver's operator on any device,
and torch's global settings left to the user.

The CPU tests use the ``meta`` device (no data: any read of a value fails), fake CUDA tensors (tracing only) and
:class:`~_host_reads.DeviceValueReads` (which records where a GPU run would wait for the device). The tests
marked ``cuda`` run the same paths on a real GPU and are skipped without one.
"""

from __future__ import annotations

import ast
import copy
import pathlib
import warnings

import pytest
import torch
from _export_models import conv_net
from _host_reads import DeviceValueReads
from torch._subclasses.fake_tensor import FakeTensorMode

import pycoe
from pycoe import BalancedTransportWeighter, CoE, CoELoss, Delegator, ExpertPool, LabelGenerator, balanced_assignment
from pycoe.routing import transport
from pycoe.routing.transport import _solve_balanced_transport as solve_balanced_transport
from pycoe.routing.transport.transfer import to_device, to_host

ROOT = pathlib.Path(__file__).resolve().parents[1]
K = 4


def training_setup(label_mode: str = "best") -> tuple[CoE, CoELoss]:
    torch.manual_seed(0)
    delegator = Delegator(conv_net(), num_experts=K, num_classes=10, classifier="8", zero_init_selection=False)
    model = CoE(delegator, ExpertPool.from_template(conv_net(), K, init="reinit")).train()
    criterion = CoELoss(BalancedTransportWeighter(K), LabelGenerator(label_mode), balance_weight=0.1)
    return model, criterion


def step(model: CoE, criterion: CoELoss, x: torch.Tensor, y: torch.Tensor):
    return criterion(model(x), y)


# ---------------------------------------------------------------------------------------------- the operator
def test_the_solver_operator_keeps_the_meta_device():
    scores = torch.empty(7, 3, device="meta")
    out = balanced_assignment(scores)
    assert out.device.type == "meta" and out.shape == (7,) and out.dtype == torch.long
    out = balanced_assignment(scores, torch.empty(3, dtype=torch.long, device="meta"))
    assert out.device.type == "meta" and out.shape == (7,)


def test_the_solver_operator_traces_cuda_scores_to_a_cuda_result():
    # fake CUDA tensors need no GPU: the dispatcher picks the operator's fake implementation, which must put the
    # result where the scores are
    with FakeTensorMode():
        scores = torch.empty(9, 4, device="cuda")
        for capacities in (None, torch.tensor([3, 2, 2, 2], device="cuda")):
            out = balanced_assignment(scores, capacities)
            assert out.device.type == "cuda" and out.shape == (9,) and out.dtype == torch.long


def test_the_solver_operator_is_registered_for_every_device():
    # one implementation for all dispatch keys (CUDA included) and a fake one for tracing and meta
    table = torch._C._dispatch_dump("pycoe::balanced_assignment")
    assert "CompositeExplicitAutograd" in table and "Meta" in table
    assert "CPU:" not in table and "CUDA:" not in table  # no per-device registration that would shadow it


def test_transfers_leave_cpu_tensors_alone():
    t = torch.randn(5, 3)
    assert to_host(t) is t and to_host(t, pinned=True) is t
    assert to_device(t, torch.device("cpu")) is t and to_device(t, torch.device("cpu"), pinned=True) is t


def test_an_exact_solve_reads_the_device_once(monkeypatch):
    """On a GPU, the exact method copies the scores to the host once and reads nothing else of the device: the
    NaN/inf check runs on the host copy."""
    scores = torch.randn(64, 4).log_softmax(1)
    reads = DeviceValueReads([scores])
    copies = []

    def spy(t, *, pinned=False):
        copies.append(t)
        host = t.detach().clone()  # a new storage: the host copy
        reads.unmark(host)
        return host

    monkeypatch.setattr(transport, "to_host", spy)
    with reads:
        result = solve_balanced_transport(scores)
    assert len(copies) == 1
    assert reads.reads == [], reads.reads
    assert torch.equal(result.assignment, solve_balanced_transport(scores).assignment)


def test_a_bad_value_is_found_on_the_host_copy():
    scores = torch.randn(8, 2)
    scores[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        solve_balanced_transport(scores)
    scores[3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"\+inf"):
        balanced_assignment(scores)


# ---------------------------------------------------------------------------------------------- training step
# Where an eager CoE training step waits for the device (file and function of the caller of the shared check): the
# checks at the loss's boundary, each made once. The routing metrics of the loss's info re-check nothing that the
# loss built itself or its WGM and LGM checked already.
EAGER_STEP_READS = [
    "coe/loss.py _default_losses",  # the target's class range (the rough head's too: the same target and C)
    "routing/weighting.py _check_logits",  # NaN/inf in the selection logits (the WGM)
    "routing/labels.py forward",  # NaN/inf in the per-sample losses (the LGM)
]


def _callers(reads: DeviceValueReads) -> list[str]:
    return sorted(f"{r.caller.split(':')[0]} {r.caller.split(' ')[-1]}" for r in reads.reads)


def test_the_eager_training_step_reads_the_device_only_in_the_boundary_checks():
    """Where an eager CoE training step on a GPU waits for the device, besides the solver's copy: only the argument
    checks that need the data (NaN/inf, index ranges), which ``torch.compile`` turns into device-side asserts, and
    each of them once: a check of a tensor the loss built itself, or checked already, would add a wait."""
    model, criterion = training_setup()
    x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 10, (16,))
    reads = DeviceValueReads([x, y, *model.parameters(), *model.buffers()])
    with reads:
        loss, info = step(model, criterion, x, y)
    loss.backward()
    assert {"rough_loss", "balance_loss", "oracle_accuracy", "agreement", "label_load"} <= set(info)
    outside_checks = [r for r in reads.reads if not r.where.startswith("_validation.py")]
    assert outside_checks == [], outside_checks
    assert all(r.op == "__bool__" for r in reads.reads)
    assert _callers(reads) == sorted(EAGER_STEP_READS), reads.reads


def test_custom_components_keep_their_checks_in_the_step():
    """With a WGM and an LGM of the user's, nothing vouches for their outputs: the metrics check them again."""
    model, _ = training_setup()
    wgm, lgm = BalancedTransportWeighter(K), LabelGenerator("best")
    criterion = CoELoss(lambda logits: wgm(logits), lambda losses: lgm(losses), balance_weight=0.1)
    x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 10, (16,))
    reads = DeviceValueReads([x, y, *model.parameters(), *model.buffers()])
    with reads:
        step(model, criterion, x, y)
    callers = _callers(reads)
    assert len(callers) > len(EAGER_STEP_READS)
    assert any(c.startswith("routing/metrics.py") for c in callers), callers


@pytest.mark.slow
def test_the_compiled_training_step_stays_on_the_input_device():
    """The whole compiled step (delegator, experts, WGM with the exact solver, LGM, loss, metrics) on the ``meta``
    device: a tensor created on another device fails (``Tensor on device cpu is not on the expected device
    meta``), and so would any read of a value (meta tensors have none)."""
    model, criterion = training_setup()
    model.to("meta")
    x, y = torch.randn(16, 3, 12, 12, device="meta"), torch.randint(0, 10, (16,), device="meta")
    torch._dynamo.reset()
    loss, info = torch.compile(step, backend="eager", fullgraph=True)(model, criterion, x, y)
    loss.backward()
    assert loss.device.type == "meta"
    assert {name: value.device.type for name, value in info.items()} == dict.fromkeys(info, "meta")
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


# ---------------------------------------------------------------------------------------------- global settings
def _settings() -> dict[str, object]:
    return {
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn.enabled": torch.backends.cudnn.enabled,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cuda.matmul.fp16_reduced": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "cuda.matmul.bf16_reduced": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "mkldnn.enabled": torch.backends.mkldnn.enabled,
        "mha.fastpath": torch.backends.mha.get_fastpath_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "num_threads": torch.get_num_threads(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def test_pycoe_leaves_torch_settings_to_the_user():
    before = _settings()
    model, criterion = training_setup()
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))
    loss, _ = step(model, criterion, x, y)
    loss.backward()
    model.eval()
    with torch.no_grad():
        model(x)
    pycoe.count_flops(model, x)
    assert _settings() == before


# Calls that change torch's process-wide settings; pycoe makes none, except where listed (and restores it there).
_GLOBAL_SETTERS = {
    "set_float32_matmul_precision",
    "use_deterministic_algorithms",
    "set_num_threads",
    "set_num_interop_threads",
    "set_flush_denormal",
    "set_default_dtype",
    "set_default_device",
    "set_fastpath_enabled",
    "set_sync_debug_mode",
}
_ALLOWED = {("flops.py", "set_fastpath_enabled")}  # count_flops: restored in a finally block (tested above)


def test_no_module_of_pycoe_sets_torch_backends():
    found = []
    for path in sorted((ROOT / "pycoe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    text = ast.unparse(target)
                    if text.startswith("torch.backends.") or text.startswith("torch._inductor.config."):
                        found.append(f"{path.name}: {text} = ...")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in _GLOBAL_SETTERS and (path.name, node.func.attr) not in _ALLOWED:
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)}(...)")
    assert found == []


# ---------------------------------------------------------------------------------------------- on a GPU
def _sync_count(fn) -> int:
    """Synchronisations of the host with the current CUDA device during ``fn()`` (torch's sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["exact", "greedy", "sinkhorn"])
def test_cuda_scores_give_a_cuda_assignment_equal_to_the_cpu_one(method):
    scores = torch.randn(256, 8, generator=torch.Generator().manual_seed(1)).log_softmax(1)
    on_cpu = solve_balanced_transport(scores, method=method)
    on_gpu = solve_balanced_transport(scores.cuda(), method=method)
    assert on_gpu.assignment.device.type == "cuda" and on_gpu.capacities.device.type == "cuda"
    assert on_gpu.prices is None or on_gpu.prices.device.type == "cuda"
    if method == "sinkhorn":  # float rounding on another device may flip the rounding of a near-tie
        assert abs(on_gpu.objective - on_cpu.objective) <= 1e-3 * abs(on_cpu.objective)
    else:
        assert torch.equal(on_gpu.assignment.cpu(), on_cpu.assignment)
    op = balanced_assignment(scores.cuda(), torch.full((8,), 32, device="cuda"), method)
    assert op.device.type == "cuda" and torch.bincount(op.cpu(), minlength=8).tolist() == [32] * 8


@pytest.mark.cuda
def test_an_exact_solve_synchronises_once_on_cuda():
    scores = torch.randn(256, 4, device="cuda").log_softmax(1)
    balanced_assignment(scores)  # first call: CUDA context, caches
    assert _sync_count(lambda: balanced_assignment(scores)) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("pinned", [False, True])
def test_transfers_round_trip_on_cuda(pinned):
    t = torch.randn(300, 7, device="cuda")
    host = to_host(t, pinned=pinned)
    assert host.device.type == "cpu" and host.is_pinned() == pinned and torch.equal(host, t.cpu())
    back = to_device(torch.arange(300), t.device, pinned=pinned)
    torch.cuda.synchronize()
    assert back.device == t.device and torch.equal(back.cpu(), torch.arange(300))


@pytest.mark.cuda
def test_the_training_step_on_cuda_matches_the_cpu_and_its_compiled_twin():
    model, criterion = training_setup()
    x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 10, (16,))
    loss, info = step(model, criterion, x, y)
    loss.backward()
    gpu = copy.deepcopy(model).cuda()
    gpu.zero_grad()
    loss_gpu, info_gpu = step(gpu, criterion, x.cuda(), y.cuda())
    loss_gpu.backward()
    assert loss_gpu.device.type == "cuda" and all(v.device.type == "cuda" for v in info_gpu.values())
    torch.testing.assert_close(loss_gpu.cpu(), loss, rtol=1e-4, atol=1e-5)
    for name in info:
        torch.testing.assert_close(info_gpu[name].cpu(), info[name], rtol=1e-4, atol=1e-5, msg=name)
    for (name, p), q in zip(model.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)
    twin = copy.deepcopy(gpu)
    twin.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c, info_c = compiled(twin, criterion, x.cuda(), y.cuda())
    torch.testing.assert_close(loss_c, loss_gpu, rtol=1e-4, atol=1e-5)
    for name in info_gpu:
        torch.testing.assert_close(info_c[name], info_gpu[name], rtol=1e-4, atol=1e-5, msg=name)
    # the compiled step waits for the device only for the solver's copy (checks are device-side asserts)
    assert _sync_count(lambda: compiled(twin, criterion, x.cuda(), y.cuda())) == 1


@pytest.mark.cuda
def test_routed_eval_on_cuda_matches_a_per_sample_loop():
    model, _ = training_setup()
    model = model.cuda().eval()
    model.exit_threshold = 0.5
    x = torch.randn(32, 3, 12, 12, device="cuda")
    with torch.no_grad():
        out = model(x)
        for i in range(x.shape[0]):
            one = model(x[i : i + 1])
            torch.testing.assert_close(one.output[0], out.output[i], rtol=1e-4, atol=1e-5)
            assert one.expert_index.item() == out.expert_index[i].item()
    assert out.output.device.type == "cuda" and out.expert_index.device.type == "cuda"
