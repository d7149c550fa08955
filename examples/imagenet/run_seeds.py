"""Run one configuration of ``train_coe`` for several seeds and report every table entry as mean +- std.

Each seed runs in its own process (``python -m examples.imagenet.train_coe --seed S --out-dir OUT/seedS
--resume``, so an interrupted driver continues where each run stopped), ``--jobs`` at a time, with its log in
``OUT/seedS/log.txt``. Then ``OUT/aggregate.md`` and ``OUT/aggregate.json`` hold, for every entry of the runs' tables
(``results.json["entries"]``), the mean, the sample standard deviation and the number of seeds, plus the paired
differences of each seed (the ``diff:`` entries: CoE minus the FLOPs-matched single network, CoE minus the
single network of the expert's architecture, CoE minus the cascade), each run's wall and CPU time, and the
machine's load average sampled while the runs went.

Usage, from the repository root (options after ``--`` go to every ``train_coe`` run)::

    python -m examples.imagenet.run_seeds --seeds 0,1,2 --jobs 2 --out-dir runs/seeds_default -- \\
        --match-flops --threads 1
    python -m examples.imagenet.run_seeds --out-dir runs/seeds_default --aggregate-only
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run the example as a module from the repository root: python -m examples.imagenet.run_seeds")

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from examples.imagenet.report import table_entries

# the directory that holds the ``examples`` package: the runs import it from there
REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each with the threads given after --)")
    p.add_argument("--out-dir", required=True, help="one sub-directory per seed, and the aggregate")
    p.add_argument("--aggregate-only", action="store_true", help="only aggregate the runs already in --out-dir")
    args = p.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds must list distinct seeds, got {args.seeds!r}")
    if args.jobs < 1:
        p.error(f"--jobs must be a positive integer, got {args.jobs}")
    for flag in ("--seed", "--out-dir"):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            p.error(f"{flag} is set by the driver; do not pass it after --")
    return args, extra


def run_all(args: argparse.Namespace, extra: list[str]) -> None:
    """Run the seeds, ``--jobs`` at a time; each run's wall time and the load average sampled every 5 s while it
    ran go to ``OUT/seedS/timing.json``."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pending = list(args.seed_list)
    running: dict[int, tuple[subprocess.Popen, float, object]] = {}
    loads: dict[int, list[float]] = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            run_dir = out / f"seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "log.txt", "a")  # noqa: SIM115 (closed when the run ends)
            cmd = [sys.executable, "-m", "examples.imagenet.train_coe", "--seed", str(seed), "--out-dir", str(run_dir)]
            cmd += ["--resume", "--no-progress", *extra]
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            running[seed] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)
            loads[seed] = []
            print(f"seed {seed}: started", flush=True)
        time.sleep(5)
        load = os.getloadavg()[0]
        for seed, (proc, start, log) in list(running.items()):
            loads[seed].append(load)
            if proc.poll() is None:
                continue
            wall = time.time() - start
            log.close()  # type: ignore[attr-defined]
            del running[seed]
            status = "done" if proc.returncode == 0 else f"FAILED (exit code {proc.returncode})"
            print(f"seed {seed}: {status} in {wall:.0f}s, log {out / f'seed{seed}' / 'log.txt'}", flush=True)
            if proc.returncode != 0:
                raise SystemExit(f"seed {seed} failed; see {out / f'seed{seed}' / 'log.txt'}")
            timing = {"wall_seconds": wall, "load_average_samples": loads[seed], "jobs": args.jobs}
            (out / f"seed{seed}" / "timing.json").write_text(json.dumps(timing))


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def aggregate(out_dir: Path, seeds: list[int] | None = None) -> dict:
    """Mean and sample standard deviation of every table entry over the seeds' ``results.json``.

    The entries are recomputed from each run's stored results by :func:`examples.imagenet.report.table_entries`,
    so runs made before an entry was added aggregate with it too.
    """
    runs = {}
    for path in sorted(out_dir.glob("seed*/results.json")):
        seed = int(path.parent.name[4:])
        if seeds is None or seed in seeds:
            runs[seed] = json.loads(path.read_text())
            runs[seed]["entries"] = table_entries(runs[seed])  # from the stored results, with today's entries
    if not runs:
        raise SystemExit(f"no seed*/results.json under {out_dir}")
    configs = {
        json.dumps({k: v for k, v in r["config"].items() if k not in ("seed", "out_dir", "resume")})
        for r in runs.values()
    }
    if len(configs) != 1:
        raise SystemExit(f"the runs under {out_dir} differ in more than their seed; aggregate them separately")
    names = [n for n in next(iter(runs.values()))["entries"] if all(n in r["entries"] for r in runs.values())]
    table = {}
    for name in names:
        values = [runs[s]["entries"][name] for s in sorted(runs)]
        mean, std = _mean_std(values)
        table[name] = {"mean": mean, "std": std, "n": len(values), "values": values}
    timing = {}
    for s in runs:
        path = out_dir / f"seed{s}" / "timing.json"
        if path.is_file():
            timing[s] = json.loads(path.read_text())
    result = {
        "seeds": sorted(runs),
        "config": json.loads(configs.pop()),
        "entries": table,
        "compute_seconds": {s: runs[s]["compute_seconds"] for s in sorted(runs)},
        "wall_seconds": {s: t["wall_seconds"] for s, t in sorted(timing.items())},
        "jobs": sorted({t.get("jobs", 1) for t in timing.values()}),
        "load_average": _load_summary([x for t in timing.values() for x in t["load_average_samples"]]),
    }
    (out_dir / "aggregate.json").write_text(json.dumps(result, indent=1))
    (out_dir / "aggregate.md").write_text(markdown(result))
    return result


def _load_summary(samples: list[float]) -> dict | None:
    if not samples:
        return None
    return {"mean": statistics.fmean(samples), "min": min(samples), "max": max(samples), "samples": len(samples)}


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = [
        f"# {len(seeds)} seeds ({', '.join(map(str, seeds))}): mean +- sample standard deviation",
        "",
        "| entry | mean +- std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for name, e in result["entries"].items():
        if name.startswith("diff:"):
            continue
        lines.append(
            f"| {name} | {e['mean']:.2f} +- {e['std']:.2f} | " + " | ".join(f"{v:.2f}" for v in e["values"]) + " |"
        )
    lines += ["", "## Paired differences (per seed, same seed on both sides)", ""]
    lines += ["| difference | mean +- std | mean / std | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines += ["|---|---|---|" + "---|" * len(seeds)]
    for name, e in result["entries"].items():
        if name.startswith("diff:"):
            ratio = e["mean"] / e["std"] if e["std"] and not math.isnan(e["std"]) else math.nan
            lines.append(
                f"| {name[6:]} | {e['mean']:+.2f} +- {e['std']:.2f} | {ratio:+.2f} | "
                + " | ".join(f"{v:+.2f}" for v in e["values"])
                + " |"
            )
    lines.append("")
    comp = result["compute_seconds"]
    lines.append("training time (sum of the epochs) per seed: " + ", ".join(f"{comp[s]:.0f}s" for s in seeds))
    if result["wall_seconds"]:
        lines.append(
            "wall time per run: "
            + ", ".join(f"seed {s}: {w:.0f}s" for s, w in sorted(result["wall_seconds"].items()))
            + f" ({'/'.join(map(str, result['jobs']))} run(s) at a time)"
        )
    if result["load_average"]:
        la = result["load_average"]
        lines.append(
            f"1-minute load average while running: mean {la['mean']:.1f}, min {la['min']:.1f}, max {la['max']:.1f}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args, extra = parse_args(argv)
    if not args.aggregate_only:
        run_all(args, extra)
    result = aggregate(Path(args.out_dir), None if args.aggregate_only else args.seed_list)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
