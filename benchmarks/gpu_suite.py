"""pycoe on one CUDA GPU in one command: correctness on the device, the speed figures, one report.

Correctness (each path on the GPU against its reference):

* ``training_step`` / ``training_step_bf16``: a CoE training step (WGM with the exact solver + LGM) eagerly and
  ``torch.compile(fullgraph=True)``: loss, info and every gradient within tolerance; in float32 and under
  bfloat16 autocast; the host synchronisations per step counted (torch's CUDA sync debug mode);
* ``routed_eval``: the eval CoE (early exit, experts batched) against a per-sample loop;
* ``export``: ``pycoe.export.export`` on the GPU against the eager model, at several batch sizes;
* ``calibrate``: ``calibrate_exit_threshold`` on the GPU against the CPU;
* ``condconv_vs_timm``: CondConv2d (every strategy) against timm's CondConv2d, outputs and gradients;
* ``pwlu_vs_reference``: PWLU against a plain autograd PWLU, outputs and gradients;
* ``solver_on_device``: the balanced-transport solver fed GPU scores (results on the GPU, the CPU's assignment).

Speed (medians of interleaved repeats, ratios measured side by side):

* ``solver_share``: the WGM's exact solve as a share of a GPU training step, host round trip included, fp32 and
  bf16; the solver's copies through pageable against pinned host memory;
* ``pwlu_speed``: PWLU forward + backward, eager and compiled, against ReLU and a compiled ReLU;
* ``condconv_speed``: CondConv2d against timm's at batch 64 (bench_condconv's shapes);
* ``routed_vs_ideal``: the routed CoE against the delegator + one expert on the whole batch, batches 32 and 256;
* ``conditional``: bench_conditional's table (static, CoE, CondConv, BasisNet at about matched FLOPs; eager,
  exported, compiled, compiled with CUDA graphs where they apply; batches 1, 8, 64, 256), memory peaks.

Every part is guarded: an exception is reported with its traceback and the next part runs. Parts that would
overrun the time budget (``--budget``, 450 s by default, compilation included) are skipped and reported as such.
The report (the GPU, torch/CUDA versions, each part's status, wall time, summary and tables) is printed and,
with ``--out DIR``, written to ``DIR/gpu_suite.md`` and ``DIR/gpu_suite.json``. The exit status is 1 when a
check failed or a part raised.

Usage::

    python benchmarks/gpu_suite.py --out gpu-report        # on a machine with a CUDA GPU (about 8 minutes)
    python benchmarks/gpu_suite.py --smoke --out /tmp/r    # every part on the CPU with tiny sizes (under a minute)
    python benchmarks/gpu_suite.py --only conditional      # one part (see --list)

``--smoke`` is what CI runs, so that the suite keeps working between the occasions a GPU is at hand: on the
CPU, with tiny models, and ``torch.compile`` with the ``eager`` backend (Dynamo's full-graph capture, without
inductor's compilation), it checks that every part runs and that every check passes.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the run's wall time counts the imports (torch, torchvision, Dynamo: seconds)

import argparse
import datetime
import shlex
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict

import torch
from _common import describe, machine, markdown_table, write_report
from _suite_checks import CHECKS
from _suite_models import FULL, SMOKE, Context, Outcome
from _suite_speed import SPEED

PARTS: dict[str, tuple[str, Callable[[Context], Outcome]]] = {
    **{name: ("check", fn) for name, fn in CHECKS.items()},
    **{name: ("speed", fn) for name, fn in SPEED.items()},
}
# The least time (s) each speed part needs on a GPU, compilation included; a part is skipped when less is left.
MIN_SECONDS = {"solver_share": 20, "pwlu_speed": 30, "condconv_speed": 15, "routed_vs_ideal": 10, "conditional": 40}


def run_part(name: str, fn: Callable[[Context], Outcome], ctx: Context) -> dict:
    """Run one part, whatever happens: its status (``ok``, ``failed``: a check did not hold, ``error``: it raised,
    ``skipped``), wall time, summary, Markdown, data and notes."""
    ctx.notes = []
    start = time.perf_counter()
    record: dict = {"name": name, "kind": PARTS[name][0] if name in PARTS else "check"}
    try:
        outcome = fn(ctx)
        record.update(status="ok" if outcome.ok else "failed", summary=outcome.summary)
        record.update(markdown=outcome.markdown, data=outcome.data)
    except Exception as error:  # reported, and the next part runs
        record.update(status="error", summary=f"{type(error).__name__}: {error}".splitlines()[0][:300])
        record.update(markdown="", data={}, traceback=traceback.format_exc())
    finally:
        if ctx.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    record.update(seconds=time.perf_counter() - start, notes=list(ctx.notes))
    return record


def run_suite(ctx: Context, names: list[str], min_seconds: dict[str, float] | None = None) -> list[dict]:
    """Run the parts in order, printing one line per part; speed parts that need more than is left are skipped."""
    min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
    records = []
    for name in names:
        kind, fn = PARTS[name]
        need = min_seconds.get(name, 0.0)
        if ctx.time_left() < need:
            record = {"name": name, "kind": kind, "status": "skipped", "seconds": 0.0, "markdown": "", "data": {}}
            record.update(summary=f"time budget: {ctx.time_left():.0f} s left, needs at least {need:.0f} s", notes=[])
        else:
            record = run_part(name, fn, ctx)
        records.append(record)
        print(f"[{record['status']:>7}] {name} ({record['seconds']:.1f} s): {record['summary']}", flush=True)
    return records


def report(records: list[dict], info: dict, header: dict) -> str:
    """The Markdown report: what ran where, a table of the parts, then each part's section."""
    lines = [
        "# pycoe GPU suite",
        "",
        f"{header['date']}, command `{header['command']}`, {header['total_seconds']:.0f} s in all "
        f"({header['mode']}; torch.compile backend `{header['backend']}`).",
        "",
        describe(info),
        "",
        markdown_table(
            ["part", "kind", "status", "seconds", "summary"],
            [[r["name"], r["kind"], r["status"], f"{r['seconds']:.1f}", r["summary"]] for r in records],
            cell=lambda v: str(v).replace("|", "/"),
        ),
    ]
    for r in records:
        lines += ["", f"## {r['name']} ({r['status']}, {r['seconds']:.1f} s)", "", r["summary"]]
        if r["markdown"]:
            lines += ["", r["markdown"]]
        lines += [f"- {note}" for note in ([""] if r["notes"] else []) + r["notes"] if note]
        if "traceback" in r:
            lines += ["", "```", r["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write gpu_suite.md and gpu_suite.json into this folder")
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU with tiny sizes (what CI runs)")
    parser.add_argument("--only", nargs="+", choices=list(PARTS), default=None, help="run only these parts")
    parser.add_argument("--skip", nargs="+", choices=list(PARTS), default=[], help="leave these parts out")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; smoke: eager)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's; smoke: 1)")
    parser.add_argument("--list", action="store_true", help="list the parts and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (kind, fn) in PARTS.items():
            print(f"{name:20} {kind:6} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    start = _START
    if not args.smoke and not torch.cuda.is_available():
        print("error: torch sees no CUDA device; run with --smoke for the CPU check of the suite", file=sys.stderr)
        return 2
    threads = args.threads or (1 if args.smoke else None)  # one thread: tiny models on busy shared cores
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device("cpu" if args.smoke else "cuda")
    backend = args.backend or ("eager" if args.smoke else "inductor")
    sizes = SMOKE if args.smoke else FULL
    ctx = Context(device=device, sizes=sizes, backend=backend, deadline=start + args.budget)
    info = machine(device)
    print(describe(info), flush=True)
    torch.manual_seed(0)
    names = [n for n in (args.only or PARTS) if n not in args.skip]
    records = run_suite(ctx, names, {} if args.smoke else MIN_SECONDS)
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/gpu_suite.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "mode": "smoke run on the CPU, tiny sizes" if args.smoke else f"full run, budget {args.budget:.0f} s",
        "backend": backend,
        "total_seconds": time.perf_counter() - start,
    }
    text = report(records, info, header)
    print()
    print(text)
    if args.out:
        data = {**header, "machine": info, "sizes": asdict(sizes), "parts": records}
        md, js = write_report(args.out, "gpu_suite", text, data)
        print(f"report written to {md} and {js}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
