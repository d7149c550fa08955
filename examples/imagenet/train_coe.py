"""Train a Collaboration-of-Experts (CoE) image classifier with pycoe, end to end.

CoE (Zhang, Chen and Zhong, "Collaboration of Experts: Achieving 80% Top-1 Accuracy on ImageNet with 100M
FLOPs", ICML 2022, arXiv:2107.03815) routes every image to one of K expert networks chosen by a small
delegator, which also makes a rough prediction that can end inference early. The paper's method section is
not public: the staged recipe below is **pycoe's formulation** (see the example's README and the guide page
``docs/guide/example_imagenet.rst``), not a claim about the paper's exact schedule:

1. ``universal``: train one expert network on all the training data;
2. copy it into K experts (:meth:`pycoe.coe.experts.ExpertPool.from_template`);
3. ``delegator``: train the delegator (backbone and rough head) on all the training data;
4. ``joint``: train delegator and experts together with WGM
   (:class:`pycoe.routing.weighting.BalancedTransportWeighter`) and LGM
   (:class:`pycoe.routing.labels.LabelGenerator`) through :class:`pycoe.coe.loss.CoELoss`;

then single networks of several widths are trained with the same epochs and schedule as baselines. The early-exit
threshold of the CoE, and of a cascade (the same delegator's rough head in front of a single network of the
expert's architecture), is chosen on a validation split carved out of the training data
(:func:`pycoe.coe.calibrate.calibrate_exit_threshold`); the test set is used once, for the reported numbers. The
results table and figures are written to ``--out-dir``.

Default: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, small CNNs, sized for a 2-core CPU (the
measured wall time is on ``docs/guide/results_imagenet.rst``). ``--dataset imagefolder --data-dir DIR --delegator
mobilenet_v3_small --expert resnet18`` runs the same recipe on ImageNet (``DIR/train``, ``DIR/val``). Runs
unchanged under ``torchrun`` (DDP: gloo on CPU, NCCL on GPU). ``run_seeds`` repeats a configuration over seeds.

The steps live in the modules of this package: ``options`` (the command line), ``data`` (data sets, splits and
batches), ``models`` (networks, baselines, the cascade), ``training`` (stages, optimiser, one epoch), ``kmeans``
(the optional k-means start of the selection head), ``runtime`` (process group, seeds, RNG states),
``evaluation`` (exit calibration, dense pass), ``report`` and ``figures`` (table and plots). This module runs
them in order (:class:`Runner`).

Usage, from the repository root::

    python -m examples.imagenet.train_coe                      # the default (Fashion-MNIST)
    python -m examples.imagenet.train_coe --help
    torchrun --nproc_per_node=2 -m examples.imagenet.train_coe --threads 1
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run the example as a module from the repository root: python -m examples.imagenet.train_coe")

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from examples.common import DataUnavailableError
from examples.imagenet.data import eval_batches, load_data, make_batches
from examples.imagenet.evaluation import final_report
from examples.imagenet.kmeans import kmeans_start
from examples.imagenet.models import Networks
from examples.imagenet.options import build_parser, finalize_args
from examples.imagenet.runtime import (
    Dist,
    barrier,
    broadcast_module,
    derived_seed,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
)
from examples.imagenet.training import (
    Phase,
    accuracy,
    make_criterion,
    make_optimizer,
    plan_phases,
    realign_if_needed,
    train_epoch,
)
from pycoe.checkpoint import load_checkpoint, save_checkpoint
from pycoe.flops import count_flops

__all__ = ["CHECKPOINT_FORMAT", "RESUME_KEYS", "Runner", "main"]

CHECKPOINT_FORMAT = "pycoe-example-imagenet/2"
# Options that must not change between a run and its --resume (they change what is trained).
RESUME_KEYS = (
    "dataset",
    "train_subset",
    "val_size",
    "image_size",
    "expert",
    "delegator",
    "expert_width",
    "delegator_width",
    "num_experts",
    "epochs_universal",
    "epochs_delegator",
    "epochs_joint",
    "baselines",
    "seed",
    "batch_size",
    "lr",
    "pwlu",
    "condconv",
    "epsilon",
    "score",
    "lgm",
    "wgm_scope",
    "match_flops",
    "selection_init",
)


@dataclass
class Stage:
    """One stage of training as it runs: the module trained, its DDP wrapper (the module itself without DDP), the
    joint stage's loss, the optimizer and schedule, and the stage's batches."""

    index: int
    phase: Phase
    module: nn.Module
    wrapped: nn.Module
    criterion: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: Any


class Runner:
    """One run of the recipe: its data and networks, the stages trained in turn with a checkpoint after every
    epoch, then the final evaluation (on rank 0, :func:`~examples.imagenet.evaluation.final_report`).

    ``run()`` does it all; ``build()`` and ``load()`` alone restore a finished run's networks (``models``, by name:
    see :class:`~examples.imagenet.models.Networks`).
    """

    def __init__(self, args, d: Dist, device: torch.device):
        self.args, self.d, self.device = args, d, device
        self.out_dir = Path(args.out_dir)
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        self.log = (lambda s: tqdm.write(s)) if d.main else (lambda s: None)
        self.results: dict[str, Any] = {}  # test numbers measured at the end of the stages
        self.history: list[dict] = []  # one entry per epoch
        self.compute_seconds = 0.0
        self.epochs_run = 0  # in this invocation (for --stop-after-epochs)
        self.universal_snapshot: dict | None = None
        self.calibration: dict[str, Any] | None = None  # the exit thresholds, once chosen

    # ---- the data and the networks -----------------------------------------------------------------------------
    def build(self) -> None:
        """The data, every network (:class:`~examples.imagenet.models.Networks`, made after seeding) and the
        stages."""
        a = self.args
        seed_everything(a.seed)
        self.data = load_data(a)
        self.nets = Networks(a, self.data.num_classes, self.data.in_channels, self.device)
        self.models = self.nets.models
        self.phases = plan_phases(a, list(self.nets.baselines))

    def describe(self) -> str:
        """The data, the two networks' FLOPs and the stages, for the log."""
        a, data = self.args, self.data
        x = torch.zeros(2, data.in_channels, a.image_size, a.image_size, device=self.device)
        fl = {k: count_flops(m, x) / 2 / 1e6 for k, m in self.models.items()}
        expert = a.expert + (f" x{a.expert_width:g}" if a.expert == "cnn" else "")
        delegator = a.delegator + (f" x{a.delegator_width:g}" if a.delegator == "cnn" else "")
        return "\n".join(
            [
                f"data: {a.dataset} ({len(data.train)} train / {len(data.val)} validation / {len(data.test)} test, "
                f"{data.num_classes} classes)  world size {self.d.world_size}  device {self.device}  "
                f"threads {torch.get_num_threads()}",
                f"expert {expert}: {fl['universal']:.2f} MFLOPs; delegator {delegator}: {fl['delegator']:.2f} "
                f"MFLOPs; K={a.num_experts}",
                "stages: " + ", ".join(f"{p.name}({p.epochs})" for p in self.phases),
            ]
        )

    # ---- the run -------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train every stage (from the checkpoint with ``--resume``), then evaluate and report.

        Returns:
            The summary (rank 0; ``{}`` on the other ranks), or ``{"stopped": True, "phase": ..., "epoch": ...}``
            when ``--stop-after-epochs`` ended the invocation early.
        """
        self.build()
        start_phase, start_epoch, ckpt = self.start()
        for pi in range(start_phase, len(self.phases)):
            mid_stage = pi == start_phase and start_epoch > 0
            stopped = self.run_stage(pi, start_epoch if mid_stage else 0, ckpt if mid_stage else None)
            if stopped is not None:
                return stopped
        return self.finish()

    def start(self) -> tuple[int, int, dict | None]:
        """Where the run begins: ``(stage, epoch, checkpoint)`` of the checkpoint with ``--resume``, else the
        beginning."""
        if self.args.resume and self.ckpt_path.is_file():
            ckpt = self.load()
            self.log(f"resumed from {self.ckpt_path}: phase {ckpt['phase_name']}, {ckpt['epoch']} epoch(s) done")
            return ckpt["phase_index"], ckpt["epoch"], ckpt
        if self.args.resume:
            self.log(f"--resume: no checkpoint at {self.ckpt_path} yet, starting fresh")
        self.log(self.describe())
        return 0, 0, None

    def run_stage(self, pi: int, first_epoch: int, ckpt: dict | None) -> dict | None:
        """The epochs of stage ``pi`` from ``first_epoch`` (``ckpt``: resuming in the middle of the stage), each
        followed by a checkpoint. Returns the ``stopped`` result when ``--stop-after-epochs`` is reached."""
        a, phase = self.args, self.phases[pi]
        stage = self.open_stage(pi, ckpt)
        for epoch in range(first_epoch, phase.epochs):
            if a.stop_after_epochs is not None and self.epochs_run >= a.stop_after_epochs:
                self.log(f"stopping after {self.epochs_run} epoch(s) (--stop-after-epochs); resume with --resume")
                barrier(self.d)
                return {"stopped": True, "phase": phase.name, "epoch": epoch}
            self.run_epoch(stage, epoch)
            done = epoch + 1 == phase.epochs
            if done:
                self.finish_phase(phase)
            self.save(pi + 1 if done else pi, 0 if done else epoch + 1, stage.optimizer, stage.scheduler)
        if phase.epochs == 0:
            self.finish_phase(phase)
        barrier(self.d)
        return None

    def open_stage(self, pi: int, ckpt: dict | None) -> Stage:
        """Stage ``pi`` ready to train: its start (:meth:`prepare_phase`, unless resumed in its middle), batches,
        optimizer and schedule (their state from ``ckpt`` when resumed), DDP wrapper and loss."""
        a, phase = self.args, self.phases[pi]
        module = self.nets.coe() if phase.kind == "joint" else self.models[phase.model]
        self.prepare_phase(phase, first_time=ckpt is None)
        batches = make_batches(a, self.data.train, True, self.d, seed=derived_seed(a.seed, pi))
        opt, sched = make_optimizer(a, module, max(1, phase.epochs * len(batches)))
        if ckpt is not None and ckpt["optimizer"] is not None:
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
        criterion = make_criterion(a) if phase.kind == "joint" else None
        return Stage(pi, phase, module, self.wrap(module), criterion, opt, sched, batches)

    def run_epoch(self, stage: Stage, epoch: int) -> None:
        """One epoch of ``stage`` (its randomness seeded by the seed, stage, epoch and rank), then the PWLU
        realignment when due, the log line and the history."""
        a, d, phase = self.args, self.d, stage.phase
        seed_everything(derived_seed(a.seed, stage.index, epoch, d.rank))
        stage.batches.set_epoch(epoch)
        t0 = time.perf_counter()
        desc = f"{phase.name} {epoch + 1}/{phase.epochs}"
        stats = train_epoch(
            a,
            phase,
            stage.module,
            stage.wrapped,
            stage.criterion,
            stage.optimizer,
            stage.scheduler,
            stage.batches,
            self.device,
            d,
            desc=desc,
        )
        n_realigned = realign_if_needed(a, stage.module, phase, epoch + 1)
        if n_realigned and d.active:  # the ranks' statistics differ: take rank 0's realignment
            broadcast_module(stage.module, src=0)
        dt = time.perf_counter() - t0
        self.compute_seconds += dt
        stats.update(phase=phase.name, epoch=epoch + 1, seconds=round(dt, 2))
        self.history.append(stats)
        self.log(
            f"[{phase.name}] epoch {epoch + 1}/{phase.epochs} {dt:6.1f}s  "
            + "  ".join(f"{k}={v:.4f}" for k, v in stats.items() if isinstance(v, float) and k != "seconds")
            + (f"  (PWLU realigned: {n_realigned})" if n_realigned else "")
        )
        self.epochs_run += 1

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel under a process group, else itself."""
        if not self.d.active:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # PWLUs in their collecting phase act as their init function: their parameters get no gradient
        return DDP(module, device_ids=ids, find_unused_parameters=self.args.pwlu)

    def prepare_phase(self, phase: Phase, first_time: bool) -> None:
        """Stage 2 (copy the universal expert into the K experts, the optional k-means start of the selection
        head) before the joint stage, and the start of the expert-architecture baseline from the universal
        expert."""
        if not first_time:
            return
        if phase.kind == "joint":
            if self.universal_snapshot is None:
                raise RuntimeError("the joint stage needs the universal expert (stage 1)")
            # ExpertPool.from_template happened in ensure_coe (a deep copy of the trained universal expert);
            # reload the snapshot anyway so that a resumed run starts from exactly the same weights
            for expert in self.models["coe"].experts:
                expert.load_state_dict(self.universal_snapshot)
            self.log(f"stage 2: universal expert copied into {self.args.num_experts} experts")
            if self.args.selection_init == "kmeans":
                self._kmeans_start()
        if phase.name == "baseline:expert:fine":
            self.models["baseline:expert"].load_state_dict(self.universal_snapshot)

    def _kmeans_start(self) -> None:
        k = self.args.num_experts
        km = kmeans_start(self.args, self.models["delegator"], self.data.train, self.device)
        sizes = torch.bincount(km["assignment"], minlength=k).tolist()
        self.log(
            f"selection head set to a balanced {k}-means of the delegator's features ({len(km['indices'])} "
            f"images, clusters {sizes}, {km['iterations']} iterations, T={km['temperature']:.3g})"
        )

    def finish_phase(self, phase: Phase) -> None:
        """The test numbers at the end of a stage (and, after stage 1, the universal expert's snapshot and the
        CoE built from it)."""
        a = self.args
        tb = eval_batches(a, self.data.test)
        if phase.name == "universal":
            self.universal_snapshot = copy.deepcopy(self.models["universal"].state_dict())
            self.nets.coe()
            self.results["universal"] = {"accuracy": accuracy(self.models["universal"], tb, self.device, a)}
        elif phase.name == "delegator" or phase.kind == "joint":
            rough = accuracy(self.models["delegator"], tb, self.device, a, rough=True)
            self.results[phase.name] = {"rough_accuracy": rough}
        elif phase.name.endswith(":fine"):
            self.results[phase.model] = {"accuracy": accuracy(self.models[phase.model], tb, self.device, a)}
        else:
            return
        numbers = self.results[phase.model if phase.name.endswith(":fine") else phase.name]
        self.log(f"[{phase.name}] test: " + ", ".join(f"{k}={v:.4f}" for k, v in numbers.items()))

    def finish(self) -> dict:
        """Rank 0 evaluates, reports and checkpoints the chosen exit thresholds; the other ranks wait."""
        report: dict = {}
        if self.d.main:
            report, self.calibration = final_report(
                self.args,
                self.nets,
                self.data,
                self.results,
                self.compute_seconds,
                self.d.world_size,
                self.device,
                self.log,
            )
            self.save(len(self.phases), 0, None, None)
        barrier(self.d)
        return report

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def save(self, phase_index: int, epoch: int, opt, sched) -> None:
        """Checkpoint (rank 0, atomically): every network, the stage's optimizer and schedule, the RNG states, the
        stage and epoch to continue from, the results so far and, once chosen, the exit thresholds."""
        if not self.d.main:
            return
        a = self.args
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "config": {k: getattr(a, k) for k in RESUME_KEYS},
            "phase_index": phase_index,
            "phase_name": self.phases[phase_index].name if phase_index < len(self.phases) else "done",
            "epoch": epoch,
            # the delegator is saved inside the CoE once there is one
            "models": {
                k: m.state_dict() for k, m in self.models.items() if k != "delegator" or "coe" not in self.models
            },
            "universal_snapshot": self.universal_snapshot,
            "optimizer": opt.state_dict() if opt is not None else None,
            "scheduler": sched.state_dict() if sched is not None else None,
            "rng": rng_state(),
            "data_order": {
                "seed": a.seed,
                "phase_index": phase_index,
                "next_epoch": epoch,
                "sampler_seed": derived_seed(a.seed, phase_index),
            },
            "results": self.results,
            "history": self.history,
            "compute_seconds": self.compute_seconds,
            "calibration": self.calibration,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ckpt, self.ckpt_path)

    def load(self) -> dict:
        """Restore the checkpoint's networks, results and RNG states; refuses one made with other training
        options (:data:`RESUME_KEYS`). Returns the checkpoint."""
        ckpt = load_checkpoint(self.ckpt_path, map_location="cpu")
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.ckpt_path} is not a checkpoint of this example ({ckpt.get('format')!r})")
        mismatch = {k: (v, getattr(self.args, k)) for k, v in ckpt["config"].items() if getattr(self.args, k) != v}
        if mismatch:
            raise ValueError(
                "--resume with different options than the checkpoint: "
                + ", ".join(f"{k}: checkpoint {old!r} vs now {new!r}" for k, (old, new) in mismatch.items())
            )
        if "coe" in ckpt["models"]:
            self.nets.coe()
        for k, sd in ckpt["models"].items():
            self.models[k].load_state_dict(sd)
        self.universal_snapshot = ckpt["universal_snapshot"]
        self.results, self.history = ckpt["results"], ckpt["history"]
        self.compute_seconds = ckpt["compute_seconds"]
        self.calibration = ckpt.get("calibration")
        set_rng_state(ckpt["rng"])
        return ckpt


def main(argv: list[str] | None = None) -> dict:
    """Parse the options, join the process group under ``torchrun``, run, and print the wall time."""
    args = finalize_args(build_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = setup_distributed(device)
    if d.active:  # DDP's gradient buckets expect the default (contiguous) layout
        args.no_channels_last = True
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = Runner(args, d, device).run()
    except DataUnavailableError as exc:
        if d.main:
            print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if d.initialised_here:
            dist.destroy_process_group()
    if d.main and not result.get("stopped"):
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        result["wall_seconds"], result["cpu_seconds"] = round(wall, 1), round(cpu, 1)
        print(
            f"total wall time {wall:.1f}s (process CPU time {cpu:.1f}s, {torch.get_num_threads()} threads)",
            flush=True,
        )
    return result


if __name__ == "__main__":
    main()
