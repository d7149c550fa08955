"""A Collaboration of Experts of Hugging Face BERTs: the genre of a Bible verse's book from its English text.

The task: from one verse of the King James Version, predict the genre of its book (law, history, poetry/wisdom,
prophets, gospels/acts, letters, apocalyptic: seven classes). Offline, on the CPU: the verses come from Debian's
SWORD module (:mod:`examples.common.bible`), the tokenizer is a subword vocabulary trained here on the training
split, and every network is a small random-init ``BertForSequenceClassification`` (no download), called
``model(**batch)`` on ``BatchEncoding`` batches with ``labels``, the CoE included.

Protocol (the same as the image example's results):

- whole chapters go to the training, validation and test splits (fixed ``--split-seed``, stratified by genre; see
  :mod:`examples.text_classification.data`); the seeds change the initialisation and the data order only;
- stages (pycoe's recipe): a universal expert (``--epochs-universal``); the delegator, a smaller BERT, trained as
  a genre classifier (``--epochs-delegator``), whose classifier becomes the rough head; K copies of the universal
  expert trained jointly with the delegator by :class:`pycoe.CoELoss` (WGM: balanced-transport loss weights; LGM:
  the delegator's selection targets from the experts' losses; the rough head's cross-entropy) for
  ``--epochs-joint`` epochs;
- baselines, trained with the same epochs and schedules: (a) the single expert, the universal expert continued for
  the joint stage's epochs; (b) a FLOPs-matched single BERT, as deep as an expert and wide enough that its FLOPs
  match the CoE's without exit (delegator plus one expert); (c) the cascade: the delegator's rough head in front
  of the single expert;
- the exit thresholds of the CoE and of the cascade are chosen on the validation split by
  :func:`pycoe.calibrate_exit_threshold` (the lowest-FLOPs threshold within ``--max-accuracy-drop`` of no exit);
  the test split is used for the reported numbers; every seed's numbers, their mean and standard deviation, and
  the paired differences by seed are written to ``results.json`` and ``results.md``.

FLOPs are forward FLOPs per verse (a multiply-add counts 2), each verse run alone at its own length
(:func:`examples.text_classification.models.flops_curve`), averaged over the split.

Run from the repository root: ``python -m examples.text_classification.train`` (3 seeds), ``--jobs 2`` to run two
seeds at a time, ``--smoke`` for a tiny configuration that runs in seconds.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit(
        "run the example as a module from the repository root: python -m examples.text_classification.train"
    )

import argparse
import copy
import json
import math
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

import pycoe
from examples.common.bible import SWORD_ROOT
from examples.common.versification import GENRES
from examples.text_classification import report
from examples.text_classification.data import (
    EncodedSplit,
    encode_split,
    load_verses,
    make_loader,
    split_by_chapter,
    train_tokenizer,
)
from examples.text_classification.models import (
    bert_config,
    flops_curve,
    make_cascade,
    make_delegator,
    matched_hidden,
    new_classifier,
)
from pycoe.coe.loss import scalar_info

#: ``--smoke``: a tiny configuration (about 8% of the chapters, one-layer BERTs of width 16 and 8, one epoch per
#: stage at a learning rate that such tiny models need, two seeds) that exercises every step in seconds; its
#: numbers mean nothing.
SMOKE = {
    "keep_fraction": 0.08,
    "vocab_size": 400,
    "max_length": 64,
    "experts": 3,
    "expert_hidden": 16,
    "expert_layers": 1,
    "heads": 2,
    "delegator_hidden": 8,
    "delegator_layers": 1,
    "epochs_universal": 1,
    "epochs_delegator": 1,
    "epochs_joint": 1,
    "batch_size": 32,
    "lr": 1e-2,
    "seeds": "0,1",
    "threads": 1,
    "out_dir": Path("runs/text_classification_smoke"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.text_classification.train", description=__doc__.split("\n\n")[0]
    )
    add = p.add_argument
    add("--sword-root", type=Path, default=SWORD_ROOT, help="directory holding the SWORD module engKJV2006eb")
    add("--split-seed", type=int, default=0, help="seed of the chapter split (the same for every training seed)")
    add("--val-fraction", type=float, default=0.1, help="fraction of each genre's chapters in the validation split")
    add("--test-fraction", type=float, default=0.1, help="fraction of each genre's chapters in the test split")
    add("--keep-fraction", type=float, default=1.0, help="use this fraction of each genre's chapters (1: all)")
    add("--vocab-size", type=int, default=4000, help="subword vocabulary (an upper bound)")
    add("--max-length", type=int, default=128, help="tokens per verse at most ([CLS] and [SEP] included)")
    add("-K", "--experts", type=int, default=4, help="number of experts")
    add("--expert-hidden", type=int, default=64, help="hidden size of an expert (feed-forward: 4x)")
    add("--expert-layers", type=int, default=2)
    add("--heads", type=int, default=4, help="attention heads of the experts and baselines")
    add("--delegator-hidden", type=int, default=32)
    add("--delegator-layers", type=int, default=1)
    add("--delegator-heads", type=int, default=2)
    add("--dropout", type=float, default=0.1)
    add("--epochs-universal", type=int, default=2)
    add("--epochs-delegator", type=int, default=2)
    add("--epochs-joint", type=int, default=2)
    add("--batch-size", type=int, default=64)
    add("--lr", type=float, default=1e-3, help="AdamW peak learning rate (linear warm-up, then cosine to 0)")
    add("--weight-decay", type=float, default=0.01)
    add("--epsilon", type=float, default=0.2, help="WGM weight of a sample's non-assigned experts")
    add("--lgm", choices=["best", "soft", "balanced"], default="best", help="LGM mode")
    add("--rough-weight", type=float, default=1.0, help="weight of the rough head's loss in the joint stage")
    add("--max-accuracy-drop", type=float, default=0.003, help="exit budget on validation (0.003 = 0.3 points)")
    add("--seeds", default="0,1,2", help="comma-separated training seeds")
    add("--jobs", type=int, default=1, help="seeds run at a time, each in its own process")
    add("--threads", type=int, default=0, help="torch threads per run (0: torch's default; 1 with --jobs > 1)")
    add("--out-dir", type=Path, default=Path("runs/text_classification"))
    add("--smoke", action="store_true", help="a tiny configuration that runs in seconds (see SMOKE)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _parser()
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(**SMOKE)
    a = p.parse_args(argv)
    try:
        a.seed_list = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    if not a.seed_list or len(set(a.seed_list)) != len(a.seed_list):
        p.error(f"--seeds must list distinct integers, got {a.seeds!r}")
    positive = ("vocab_size", "max_length", "experts", "expert_hidden", "expert_layers", "heads", "delegator_hidden")
    for name in (*positive, "delegator_layers", "delegator_heads", "batch_size", "jobs", "epochs_universal"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    for name in ("epochs_delegator", "epochs_joint", "threads"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if a.max_length < 8:
        p.error(f"--max-length must be at least 8, got {a.max_length}")
    if not 0.0 <= a.epsilon <= 1.0:
        p.error(f"--epsilon must be in [0, 1], got {a.epsilon}")
    if not 0.0 <= a.max_accuracy_drop <= 1.0:
        p.error(f"--max-accuracy-drop must be a fraction in [0, 1], got {a.max_accuracy_drop}")
    if a.jobs > 1 and a.threads == 0:
        a.threads = 1
    return a


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def prepare_data(a: argparse.Namespace) -> tuple[Any, dict[str, EncodedSplit], dict[str, Any]]:
    """The tokenizer (trained on the training split) and the three encoded splits, with a description of both."""
    verses = load_verses(a.sword_root)
    splits = split_by_chapter(verses, a.val_fraction, a.test_fraction, a.split_seed, a.keep_fraction)
    tokenizer = train_tokenizer([v.text for v in splits["train"]], a.vocab_size, a.max_length)
    encoded = {name: encode_split(tokenizer, verses) for name, verses in splits.items()}
    info = {
        "verses": {name: len(s) for name, s in splits.items()},
        "chapters": {name: len({v.chapter for v in s}) for name, s in splits.items()},
        "genre_counts": {
            name: [sum(v.label == g for v in s) for g in range(len(GENRES))] for name, s in splits.items()
        },
        "vocab_size": len(tokenizer),
        "mean_tokens": {name: statistics.fmean(e.lengths) for name, e in encoded.items()},
        "truncated": {name: sum(n >= a.max_length for n in e.lengths) for name, e in encoded.items()},
    }
    return tokenizer, encoded, info


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def _optimizer(model: torch.nn.Module, a: argparse.Namespace, steps: int):
    """AdamW, linear warm-up over the first 6% of ``steps``, then a cosine decay to 0 (one schedule per stage)."""
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    warm = max(1, round(0.06 * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(model, step, split: EncodedSplit, tokenizer, a, epochs: int, seed: int, label: str, log) -> list[dict]:
    """``epochs`` epochs of ``step(batch) -> (loss, info)`` on ``split``, one schedule; returns per-epoch means."""
    if epochs == 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    loader = make_loader(split, tokenizer, a.batch_size, gen)
    opt, sched = _optimizer(model, a, epochs * len(loader))
    model.train()
    history = []
    for epoch in range(epochs):
        sums: dict[str, float] = {}
        n = 0
        for batch in loader:
            loss, info = step(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            b = len(batch["labels"])
            n += b
            for k, v in {"loss": float(loss.detach()), **info}.items():
                sums[k] = sums.get(k, 0.0) + v * b
        means = {k: v / n for k, v in sums.items()}
        history.append(means)
        log(f"[{label}] epoch {epoch + 1}/{epochs} " + " ".join(f"{k} {v:.4f}" for k, v in means.items()))
    model.eval()
    return history


def classifier_step(model):
    def step(batch):
        return model(**batch).loss, {}  # labels in the batch: the model's own cross-entropy

    return step


def coe_step(coe: pycoe.CoE, criterion: pycoe.CoELoss):
    def step(batch):
        out = coe(**batch)  # training mode: the delegator and every expert; the labels come back on the output
        loss, info = criterion(out)  # the target: out.labels
        s = scalar_info(info)
        keys = ("expert_loss", "selection_loss", "rough_loss", "agreement", "routed_accuracy", "oracle_accuracy")
        return loss, {k: s[k] for k in keys if k in s}

    return step


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def classifier_logits(model, split: EncodedSplit, tokenizer, a) -> torch.Tensor:
    """Tensor[N, C] in the evaluation order of ``split`` (:attr:`EncodedSplit.order`)."""
    model.eval()
    return torch.cat([model(**batch).logits for batch in make_loader(split, tokenizer, a.batch_size)])


@torch.no_grad()
def coe_dense(coe: pycoe.CoE, split: EncodedSplit, tokenizer, a) -> dict[str, torch.Tensor]:
    """Every part of the CoE on every sample (evaluation order): rough and selection logits, every expert's logits."""
    coe.eval()
    rough, selection, experts = [], [], []
    for batch in make_loader(split, tokenizer, a.batch_size):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        d = coe.delegate(**inputs)
        rough.append(d.rough_logits)
        selection.append(d.selection_logits)
        experts.append(torch.stack([e(**inputs).logits for e in coe.experts]))
    return {"rough": torch.cat(rough), "selection": torch.cat(selection), "experts": torch.cat(experts, dim=1)}


@torch.no_grad()
def deployed(model: pycoe.CoE, split: EncodedSplit, tokenizer, a, threshold: float | None) -> dict[str, torch.Tensor]:
    """The model's own eval forward (early exit, routed experts) at ``threshold``: predictions, exits, experts."""
    model.eval()
    loader = make_loader(split, tokenizer, a.batch_size)
    parts = [model.forward_eval(**batch, exit_threshold=threshold) for batch in loader]  # labels are dropped
    return {
        "prediction": torch.cat([p.output.argmax(1) for p in parts]),
        "exited": torch.cat([p.exited for p in parts]),
        "expert": torch.cat([p.expert_index for p in parts]),
    }


def calibrate(model: pycoe.CoE, split: EncodedSplit, tokenizer, a, flops: dict) -> Any:
    """:func:`pycoe.calibrate_exit_threshold` on ``split``, with the given FLOPs table (means over ``split``).

    The loader's batches are the collator's ``BatchEncoding`` objects: the calibration calls ``model(**batch)`` without
    the ``labels``, which are its targets.
    """
    loader = make_loader(split, tokenizer, a.batch_size)
    return pycoe.calibrate_exit_threshold(model, loader, max_accuracy_drop=a.max_accuracy_drop, flops=flops)


# ---------------------------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------------------------
def train_models(seed: int, a, tokenizer, train: EncodedSplit, log) -> dict[str, Any]:
    """Every model of one seed: the universal expert, the single expert (a), the delegator, the CoE and the
    FLOPs-matched model (b). Each stage draws its initialisation and data order from ``(seed, stage)``."""
    num_labels, vocab = len(GENRES), len(tokenizer)
    expert_cfg = bert_config(vocab, a.expert_hidden, a.expert_layers, a.heads, num_labels, a.max_length, a.dropout)
    del_cfg = bert_config(
        vocab, a.delegator_hidden, a.delegator_layers, a.delegator_heads, num_labels, a.max_length, a.dropout
    )
    history: dict[str, Any] = {}

    def stage(n: int) -> int:
        """Seed torch for stage ``n`` (initialisation, dropout) and return the seed of its data order."""
        torch.manual_seed(1000 * seed + n)
        return 1000 * seed + n

    def train_classifier(model, epochs: int, data_seed: int, label: str) -> list[dict]:
        return fit(model, classifier_step(model), train, tokenizer, a, epochs, data_seed, f"seed {seed} {label}", log)

    s = stage(1)
    universal = new_classifier(expert_cfg)
    history["universal"] = train_classifier(universal, a.epochs_universal, s, "universal expert")
    s = stage(2)
    single = copy.deepcopy(universal)  # (a): the universal expert, trained on for the joint stage's epochs
    history["single"] = train_classifier(single, a.epochs_joint, s, "single expert")
    s = stage(3)
    small = new_classifier(del_cfg)
    history["delegator"] = train_classifier(small, a.epochs_delegator, s, "delegator")
    s = stage(4)
    coe = pycoe.CoE(make_delegator(small, a.experts), pycoe.ExpertPool.from_template(universal, a.experts, init="copy"))
    criterion = pycoe.CoELoss(
        pycoe.BalancedTransportWeighter(a.experts, epsilon=a.epsilon),
        pycoe.LabelGenerator(mode=a.lgm),
        rough_weight=a.rough_weight,
    )
    label = f"seed {seed} CoE joint"
    history["joint"] = fit(coe, coe_step(coe, criterion), train, tokenizer, a, a.epochs_joint, s, label, log)

    # (b) as deep as an expert, as wide as the CoE's FLOPs without exit allow, trained like the single expert
    lengths = train.lengths
    target = flops_curve(coe.delegator).mean(lengths) + flops_curve(universal).mean(lengths)
    hidden, _ = matched_hidden(
        target, lengths, vocab, a.expert_layers, a.heads, num_labels, a.expert_hidden, a.max_length
    )
    s = stage(5)
    matched = new_classifier(bert_config(vocab, hidden, a.expert_layers, a.heads, num_labels, a.max_length, a.dropout))
    history["matched"] = train_classifier(matched, a.epochs_universal, s, f"matched (hidden {hidden}), stage 1")
    s = stage(6)
    history["matched"] += train_classifier(matched, a.epochs_joint, s, f"matched (hidden {hidden}), stage 2")
    return {"single": single, "coe": coe, "matched": matched, "matched_hidden": hidden, "history": history}


def evaluate_seed(models: dict[str, Any], a, tokenizer, val: EncodedSplit, test: EncodedSplit, log) -> dict:
    """Validation-calibrated thresholds, then every test number of one seed (see :mod:`report` for the keys)."""
    coe, single, matched = models["coe"], models["single"], models["matched"]
    cascade = make_cascade(coe.delegator, single)
    curves = {
        "delegator": flops_curve(coe.delegator),
        "rough_stage": flops_curve(cascade.delegator),
        "expert": flops_curve(coe.experts[0]),
        "single": flops_curve(single),
        "matched": flops_curve(matched),
    }
    k = a.experts

    def table(split: EncodedSplit, first: str, n: int, second: str) -> dict:
        return {"delegator": curves[first].mean(split.lengths), "experts": [curves[second].mean(split.lengths)] * n}

    cal = {
        "coe": calibrate(coe, val, tokenizer, a, table(val, "delegator", k, "expert")),
        "cascade": calibrate(cascade, val, tokenizer, a, table(val, "rough_stage", 1, "single")),
    }
    on_test = {  # the rule applied to the test split: for comparison only, never used
        "coe": calibrate(coe, test, tokenizer, a, table(test, "delegator", k, "expert")).threshold,
        "cascade": calibrate(cascade, test, tokenizer, a, table(test, "rough_stage", 1, "single")).threshold,
    }
    order = test.order
    labels = test.labels[order]
    lengths = torch.tensor(test.lengths)[order]
    outputs = {
        "single": classifier_logits(single, test, tokenizer, a),
        "matched": classifier_logits(matched, test, tokenizer, a),
        "dense": coe_dense(coe, test, tokenizer, a),
        "coe_exit": deployed(coe, test, tokenizer, a, cal["coe"].threshold),
        "coe_no_exit": deployed(coe, test, tokenizer, a, None),
        "cascade_exit": deployed(cascade, test, tokenizer, a, cal["cascade"].threshold),
        "cascade_at_coe_threshold": deployed(cascade, test, tokenizer, a, cal["coe"].threshold),
    }
    result = report.seed_numbers(outputs, labels, lengths, curves, cal, on_test, k)
    result["val"] = {
        name: {
            "threshold": c.threshold,
            "accuracy": c.accuracy,
            "no_exit_accuracy": c.no_exit_accuracy,
            "exit_rate": c.exit_rate,
        }
        for name, c in cal.items()
    }
    log(f"[{models['label']}] " + report.one_line(result))
    return result


def run_seed(seed: int, a, tokenizer, encoded: dict[str, EncodedSplit]) -> dict:
    """Train and evaluate every model of one seed; returns its numbers, wall and CPU time."""
    if a.threads:
        torch.set_num_threads(a.threads)
    wall, cpu = time.time(), time.process_time()

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    models = train_models(seed, a, tokenizer, encoded["train"], log)
    models["label"] = f"seed {seed}"
    result = evaluate_seed(models, a, tokenizer, encoded["val"], encoded["test"], log)
    result.update(
        seed=seed,
        matched_hidden=models["matched_hidden"],
        history=models["history"],
        wall_seconds=round(time.time() - wall, 1),
        cpu_seconds=round(time.process_time() - cpu, 1),
        torch_threads=torch.get_num_threads(),
    )
    return result


def _run_seed_in_process(seed: int, a, tokenizer, encoded) -> dict:
    return run_seed(seed, a, tokenizer, encoded)


class LoadSampler:
    """The 1-minute load average, sampled every ``period`` seconds in a background thread."""

    def __init__(self, period: float = 5.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(period):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": round(statistics.fmean(s), 2), "min": round(min(s), 2), "max": round(max(s), 2)}


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    start = time.time()
    with LoadSampler() as load:
        tokenizer, encoded, data_info = prepare_data(a)
        print(
            f"verses train/val/test {data_info['verses']} in chapters {data_info['chapters']}; subword vocabulary "
            f"{data_info['vocab_size']} (trained on the training split); seeds {a.seed_list}, {a.jobs} at a time",
            flush=True,
        )
        if a.jobs > 1 and len(a.seed_list) > 1:
            with ProcessPoolExecutor(min(a.jobs, len(a.seed_list)), mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(_run_seed_in_process, s, a, tokenizer, encoded) for s in a.seed_list]
                runs = [f.result() for f in futures]
        else:
            runs = [run_seed(s, a, tokenizer, encoded) for s in a.seed_list]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    results = {
        "config": config,
        "data": data_info,
        "genres": list(GENRES),
        "runs": runs,
        "summary": report.summarise(runs),
        "wall_seconds": round(time.time() - start, 1),
        "load_average": load.summary(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    a.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(a.out_dir / "tokenizer")
    table = report.markdown(results)
    (a.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (a.out_dir / "results.md").write_text(table + "\n")
    print(table, flush=True)
    return results


if __name__ == "__main__":
    main()
