"""The benchmarks' shared helpers and the GPU suite's machinery (guarded parts, time budget, report), on the CPU.

The whole suite's smoke mode (``python benchmarks/gpu_suite.py --smoke``) runs in CI's ``.ci/run``; here a
subset of it runs as a subprocess, and the checks are shown to fail on planted bugs.
"""

from __future__ import annotations

import importlib
import json
import math
import pathlib
import subprocess
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    """The benchmark modules, imported as the scripts import each other (``benchmarks/`` on the path, for the
    duration of this module's tests only)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        names = ["_common", "_suite_models", "_suite_checks", "gpu_suite"]
        yield {name: importlib.import_module(name) for name in names}


@pytest.fixture
def ctx(bench):
    m = bench["_suite_models"]
    return m.Context(device=torch.device("cpu"), sizes=m.SMOKE, backend="eager", deadline=time.perf_counter() + 600)


# ---------------------------------------------------------------------------------------------- _common
def test_interleaved_medians_interleaves_and_takes_medians(bench):
    common = bench["_common"]
    calls = []
    clock_values = iter([0.0, 1.0, 10.0, 12.0, 20.0, 23.0, 30.0, 34.0])  # a, b, a, b: durations 1, 2, 3, 4
    med = common.interleaved_medians(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        2,
        warmup=1,
        clock=lambda: next(clock_values),
    )
    assert calls == ["a", "b", "a", "b", "a", "b"]  # one warm-up each, then the repeats in turn
    assert med == {"a": 2.0, "b": 3.0}
    with pytest.raises(ValueError, match="repeats"):
        common.interleaved_medians({"a": lambda: None}, 0)


def test_ratios_tables_and_json(bench, tmp_path):
    common = bench["_common"]
    assert common.ratio(3.0, 2.0) == 1.5
    assert all(math.isnan(common.ratio(a, b)) for a, b in [(None, 1.0), (1.0, 0.0), (math.nan, 1.0)])
    table = common.markdown_table(["a", "b"], [[1234.5, 0.012345], ["x", None]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1234 | 0.0123 |", "| x | - |"]
    md, js = common.write_report(tmp_path / "r", "rep", "# title", {"v": math.nan, "t": (1, torch.float32)})
    assert md.read_text() == "# title\n"
    assert json.loads(js.read_text()) == {"v": None, "t": [1, "torch.float32"]}
    info = common.machine("cpu")
    assert info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()
    assert "device cpu" in common.describe(info)


# ---------------------------------------------------------------------------------------------- the runner
def test_a_part_that_raises_is_reported_and_the_next_one_runs(bench, ctx, monkeypatch):
    suite, models = bench["gpu_suite"], bench["_suite_models"]

    def boom(ctx):
        raise RuntimeError("planted failure\nsecond line")

    def fine(ctx):
        return models.Outcome(True, "fine", "| x |", {"x": 1})

    def wrong(ctx):
        return models.Outcome(False, "a check did not hold")

    for name, fn in [("boom", boom), ("fine", fine), ("wrong", wrong)]:
        monkeypatch.setitem(suite.PARTS, name, ("check", fn))
    records = suite.run_suite(ctx, ["boom", "fine", "wrong"], {})
    assert [r["status"] for r in records] == ["error", "ok", "failed"]
    assert records[0]["summary"] == "RuntimeError: planted failure" and "planted failure" in records[0]["traceback"]
    header = {"date": "d", "command": "c", "mode": "m", "backend": "eager", "total_seconds": 1.0}
    text = suite.report(records, bench["_common"].machine("cpu"), header)
    assert "## boom (error" in text and "Traceback" in text and "## fine (ok" in text and "| x |" in text


def test_parts_that_need_more_time_than_is_left_are_skipped(bench, ctx, monkeypatch):
    suite, models = bench["gpu_suite"], bench["_suite_models"]
    ran = []
    monkeypatch.setitem(suite.PARTS, "slow", ("speed", lambda ctx: ran.append(1) or models.Outcome(True, "ran")))
    ctx.deadline = time.perf_counter() + 5.0
    records = suite.run_suite(ctx, ["slow"], {"slow": 60.0})
    assert ran == [] and records[0]["status"] == "skipped" and "time budget" in records[0]["summary"]
    assert (
        ctx.afford(1.0, "cheap") and not ctx.afford(60.0, "dear") and ctx.notes == ["skipped for the time budget: dear"]
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_the_full_run_refuses_and_points_to_the_smoke_mode(bench, capsys):
    assert bench["gpu_suite"].main([]) == 2
    assert "--smoke" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the checks
def test_the_pwlu_check_fails_on_a_wrong_pwlu(bench, ctx, monkeypatch):
    checks = bench["_suite_checks"]
    assert checks.pwlu_vs_reference(ctx).ok
    right = checks.pwlu
    monkeypatch.setattr(checks, "pwlu", lambda x, *p, **k: right(x, *p, **k) * (1 + 1e-3))
    assert not checks.pwlu_vs_reference(ctx).ok


def test_the_condconv_check_fails_on_a_wrong_layer(bench, ctx, monkeypatch):
    checks = bench["_suite_checks"]
    monkeypatch.setattr(ctx, "sizes", type(ctx.sizes)(**{**vars(ctx.sizes), "condconv_batch": 2}))

    class Off(checks.CondConv2d):
        def forward(self, x, routing):
            return super().forward(x, routing * 1.01)

    monkeypatch.setattr(checks, "CondConv2d", Off)
    outcome = checks.condconv_vs_timm(ctx)
    assert not outcome.ok and outcome.data["worst"] > 1e-3


def test_the_solver_check_fails_when_the_device_result_differs(bench, ctx, monkeypatch):
    checks = bench["_suite_checks"]
    right = checks.solve_balanced_transport

    def reversed_on_repeat(scores, *args, **kwargs):  # a different (still feasible) answer on the second call
        result = right(scores, *args, **kwargs)
        calls.append(1)
        if len(calls) % 2 == 0:
            result.assignment = result.assignment.flip(0)
        return result

    calls = []
    monkeypatch.setattr(checks, "solve_balanced_transport", reversed_on_repeat)
    assert not checks.solver_on_device(ctx).ok


def test_decisions_flipped_by_rounding_are_counted(bench, ctx):
    checks, models = bench["_suite_checks"], bench["_suite_models"]
    _, criterion = models.training_setup(ctx)  # WGM with the exact solver, LGM "best"
    sel = torch.tensor([[5.0, 0.0], [0.0, 5.0], [1.0, 1.001], [1.001, 1.0]])
    losses = torch.tensor([[1.0, 2.0], [2.0, 1.0], [1.5, 1.5001], [0.5, 3.0]])
    assert checks._flips(criterion, sel, sel, losses, losses) == {"wgm_flips": 0, "lgm_flips": 0}
    # moving the near-tied samples 2 and 3 by 0.002 swaps them between the experts of the balanced WGM, and
    # moving sample 2's losses by 0.0002 its LGM label
    sel2 = sel + torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.001, -0.001], [-0.001, 0.001]])
    losses2 = losses + torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0002, -0.0002], [0.0, 0.0]])
    assert checks._flips(criterion, sel, sel2, losses, losses2) == {"wgm_flips": 2, "lgm_flips": 1}


@pytest.mark.slow
def test_the_smoke_run_writes_its_report(tmp_path):
    parts = ["training_step", "pwlu_vs_reference", "solver_on_device", "solver_share"]
    cmd = [sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--smoke", "--only", *parts, "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [p["name"] for p in report["parts"]] == parts
    assert all(p["status"] == "ok" for p in report["parts"]) and report["machine"]["device"] == "cpu"
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert all(f"## {name} (ok" in markdown for name in parts)
