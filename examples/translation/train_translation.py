"""CoE for translation: English -> Spanish Bible verses, offline, on the CPU.

The CoE machinery is task-agnostic: it only needs every expert's per-sample loss ``[B, K]``. Here each
expert is a small encoder-decoder Transformer, the per-sample loss is the mean token cross-entropy of a
sentence, and the delegator reads the source sentence (a bag of embeddings) to pick one expert per sentence.
Translation has no rough prediction, so the delegator has no rough head and there is no early exit.

``--expert-model hf-marian`` makes the experts random-init Hugging Face ``MarianMTModel``s of the same size
(no download): the CoE is then called the Hugging Face way, ``coe(input_ids=..., attention_mask=...,
decoder_input_ids=..., labels=...)`` with padding labelled ``-100``, the delegator reads the source's
``input_ids`` and ``attention_mask`` only (``delegator_inputs``), :class:`pycoe.CoELoss` scores each sentence
with pycoe's per-sample token cross-entropy (its default for token logits ``[B, T, V]``), and the experts
decode with ``generate``.

Stages (pycoe's recipe, not a confirmed reproduction of the CoE paper's translation experiment, whose
dataset, model and schedule are not public):

1. train one universal expert on all the training pairs;
2. copy it into K experts (``ExpertPool.from_template``);
3. train the delegator and the experts jointly with WGM (balanced-transport loss weights) and LGM
   (the delegator's selection targets from the experts' losses);

and, as the baseline at equal inference cost, keep training the universal expert for as many epochs as
stage 3 takes. The pairs are split once (``--split-seed``) into training, validation and test sentences; the
subword tokenizers (sentencepiece) are trained on the training split only; the models are trained anew for
every ``--seeds`` entry, on the same split, so that the CoE and the single expert of one seed form a pair.
Reports sacreBLEU (detokenised output, its signature printed with the scores) on the validation and test
sentences, and the BLEU of the expert pool's oracle (the best expert per sentence, by sentence loss).

Run, from the repository root: ``python -m examples.translation.train_translation`` (needs ``apt-get install -y
--no-install-recommends sword-text-kjv sword-text-sparv``), or ``--dataset synthetic`` anywhere. The verses are
read by :mod:`examples.common.bible`.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit(
        "run the example as a module from the repository root: python -m examples.translation.train_translation"
    )

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pycoe
from examples.translation.models import BagOfEmbeddings, Seq2SeqTransformer, hf_greedy, marian_expert
from examples.translation.text import PAD, SubwordTokenizer, bleu, pad_batch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m examples.translation.train_translation", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--dataset", choices=["bible", "synthetic"], default="bible")
    p.add_argument(
        "--max-words", type=int, default=15, help="keep pairs whose English side has at most this many words"
    )
    p.add_argument("--max-pairs", type=int, default=0, help="use at most this many pairs (0: all)")
    p.add_argument("--val-size", type=int, default=400, help="validation pairs (held out from training)")
    p.add_argument("--test-size", type=int, default=400, help="test pairs (held out, reported once)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation/test split")
    p.add_argument(
        "--vocab-size", type=int, default=2000, help="sentencepiece vocabulary per language (an upper bound)"
    )
    p.add_argument("--experts", type=int, default=4)
    p.add_argument(
        "--expert-model",
        choices=["transformer", "hf-marian"],
        default="transformer",
        help="the experts: the example's own Transformer, or a random-init Hugging Face MarianMTModel of the same "
        "size, which the CoE then calls model(input_ids=..., attention_mask=..., decoder_input_ids=..., labels=...)",
    )
    p.add_argument("--universal-epochs", type=int, default=6)
    p.add_argument("--joint-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--epsilon", type=float, default=0.1, help="WGM weight of a sample's non-assigned experts")
    p.add_argument("--lgm", choices=["best", "soft", "balanced"], default="best")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (each trains every model anew)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/translation"))
    args = p.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds must list distinct integers, got {args.seeds!r}")
    for name in ("max_words", "val_size", "test_size", "vocab_size", "experts", "batch_size", "d_model", "layers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not 0.0 <= args.epsilon <= 1.0:
        p.error(f"--epsilon must be in [0, 1], got {args.epsilon}")
    return args


def synthetic_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """A toy 'language' pair: Spanish-like output is the English words reversed with a suffix."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    pairs = []
    for _ in range(n):
        sent = [rng.choice(words) for _ in range(rng.randint(2, 8))]
        pairs.append((" ".join(sent), " ".join(w + "o" for w in reversed(sent))))
    return pairs


def split_pairs(args) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, val, test)`` raw sentence pairs: filtered by length, shuffled with ``--split-seed``, split."""
    if args.dataset == "synthetic":
        raw = synthetic_pairs(args.max_pairs or 400, args.split_seed)
    else:
        from examples.common.bible import verse_pairs

        raw = verse_pairs()
    pairs = [(e, s) for e, s in raw if 0 < len(e.split()) <= args.max_words]
    random.Random(args.split_seed).shuffle(pairs)
    if args.max_pairs:
        pairs = pairs[: args.max_pairs]
    held = args.val_size + args.test_size
    if held >= len(pairs):
        raise ValueError(
            f"--val-size {args.val_size} + --test-size {args.test_size} leave no training pair out of {len(pairs)}"
        )
    return pairs[held:], pairs[args.test_size : held], pairs[: args.test_size]


def batches(data, batch_size: int, generator: torch.Generator, shuffle: bool = True):
    order = torch.randperm(len(data), generator=generator).tolist() if shuffle else list(range(len(data)))
    for i in range(0, len(order), batch_size):
        chunk = [data[j] for j in order[i : i + batch_size]]
        src = pad_batch([c[0] for c in chunk])
        tgt = pad_batch([c[1] for c in chunk], bos=True, eos=True)
        yield src, tgt[:, :-1], tgt[:, 1:]


def hf_batch(src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The keyword batch of a Hugging Face seq2seq model: ``input_ids``, ``attention_mask``, ``decoder_input_ids``
    and (given ``tgt_out``) ``labels``, with Hugging Face's ``-100`` where the target is padding."""
    batch = {"input_ids": src, "attention_mask": (src != PAD).long(), "decoder_input_ids": tgt_in}
    if tgt_out is not None:
        batch["labels"] = tgt_out.masked_fill(tgt_out == PAD, -100)
    return batch


def expert_logits(model, src: torch.Tensor, tgt_in: torch.Tensor, args) -> torch.Tensor:
    """An expert's token logits [B, T, V], however it is called."""
    if args.expert_model == "transformer":
        return model(src, tgt_in)
    return model(**hf_batch(src, tgt_in)).logits


def new_expert(src_vocab: int, tgt_vocab: int, args):
    if args.expert_model == "transformer":
        return Seq2SeqTransformer(src_vocab, tgt_vocab, args.d_model, layers=args.layers)
    return marian_expert(src_vocab, tgt_vocab, args.d_model, layers=args.layers, ff=2 * args.d_model)


def greedy(model, src: torch.Tensor, max_len: int, args) -> torch.Tensor:
    if args.expert_model == "transformer":
        return model.greedy(src, max_len=max_len)
    return hf_greedy(model, src, max_len)


def sentence_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sentence mean token cross-entropy: logits [B, T, V], target [B, T] -> [B]."""
    tok = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=PAD, reduction="none")
    mask = (target != PAD).float()
    return (tok * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def train_universal(model, data, args, epochs, gen, label):
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    for epoch in range(epochs):
        total, n = 0.0, 0
        for src, tgt_in, tgt_out in batches(data, args.batch_size, gen):
            loss = sentence_loss(expert_logits(model, src, tgt_in, args), tgt_out).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(src)
            n += len(src)
        print(f"[{label}] epoch {epoch + 1}/{epochs} loss {total / n:.3f}", flush=True)
    return model


def train_joint(coe, criterion, data, args, gen) -> list[float]:
    opt = torch.optim.Adam(coe.parameters(), lr=args.lr)
    coe.train()
    agreements = []
    for epoch in range(args.joint_epochs):
        total, n, agree = 0.0, 0, 0.0
        for src, tgt_in, tgt_out in batches(data, args.batch_size, gen):
            if args.expert_model == "transformer":
                out = coe(src, tgt_in)  # train mode: selection logits + every expert's [K, B, T, V] output
                loss, info = criterion(out, tgt_out)
            else:  # the Hugging Face way: the labels come back on the output, pycoe's token loss by default
                out = coe(**hf_batch(src, tgt_in, tgt_out))
                loss, info = criterion(out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(src)
            n += len(src)
            agree += float(info.get("agreement", 0.0)) * len(src)
        agreements.append(agree / n)
        print(
            f"[coe] epoch {epoch + 1}/{args.joint_epochs} loss {total / n:.3f} delegator/LGM agreement {agree / n:.3f}",
            flush=True,
        )
    return agreements


@torch.no_grad()
def translate(models, route, data, tgt_tok: SubwordTokenizer, args) -> tuple[list[str], torch.Tensor]:
    """Greedy decoding, each sentence by the model ``route(src, tgt_in, tgt_out) -> LongTensor[B]`` picks.

    Returns the detokenised hypotheses (in the order of ``data``) and how many sentences each model decoded.
    """
    hyps: list[str] = []
    used = torch.zeros(len(models), dtype=torch.long)
    for m in models:
        m.eval()
    for src, tgt_in, tgt_out in batches(data, args.batch_size, torch.Generator(), shuffle=False):
        idx = route(src, tgt_in, tgt_out)
        out: list[str] = [""] * len(src)
        for k in idx.unique().tolist():
            rows = (idx == k).nonzero().flatten()
            dec = greedy(models[k], src[rows], 2 * src.shape[1] + 10, args)
            for r, d in zip(rows.tolist(), dec.tolist()):
                out[r] = tgt_tok.decode(d)
            used[k] += len(rows)
        hyps += out
    return hyps, used


def run_seed(seed: int, args, train_ids, val_ids, test_ids, refs, src_vocab: int, tgt_tok) -> dict:
    """Train the universal expert, the CoE and the single-expert baseline with one seed; BLEU on val and test."""
    start = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # Stage 1: the universal expert.
    universal = new_expert(src_vocab, len(tgt_tok), args)
    train_universal(universal, train_ids, args, args.universal_epochs, gen, "universal")

    # Stage 2: K copies; stage 3: joint WGM + LGM training with a delegator.
    experts = pycoe.ExpertPool.from_template(universal, args.experts, init="copy")
    delegator = pycoe.Delegator(BagOfEmbeddings(src_vocab), num_experts=args.experts, feature_dim=64)
    hf = args.expert_model != "transformer"
    # the delegator reads the source only: input 0 of model(src, tgt_in), or the source's keyword inputs
    coe = pycoe.CoE(delegator, experts, delegator_inputs=["input_ids", "attention_mask"] if hf else [0])
    criterion = pycoe.CoELoss(
        pycoe.BalancedTransportWeighter(args.experts, epsilon=args.epsilon),
        pycoe.LabelGenerator(mode=args.lgm),
        per_sample_loss=None if hf else sentence_loss,  # None: pycoe's per-sample token cross-entropy (-100 ignored)
        rough_weight=0.0,
    )
    agreements = train_joint(coe, criterion, train_ids, args, gen)

    # Baseline at equal inference cost: the universal expert trained for as many more epochs.
    baseline = train_universal(copy.deepcopy(universal), train_ids, args, args.joint_epochs, gen, "baseline")

    coe.eval()
    members = list(coe.experts)

    def route_coe(src, tgt_in, tgt_out):
        d = coe.delegate(**hf_batch(src, tgt_in)) if hf else coe.delegate(src, tgt_in)
        return d.selection_logits.argmax(1)

    def route_single(src, tgt_in, tgt_out):
        return torch.zeros(len(src), dtype=torch.long)

    def route_oracle(src, tgt_in, tgt_out):
        losses = torch.stack([sentence_loss(expert_logits(e, src, tgt_in, args), tgt_out) for e in members], dim=1)
        return losses.argmin(1)

    result: dict = {"seed": seed}
    for split, data in (("val", val_ids), ("test", test_ids)):
        hyps, _ = translate([baseline], route_single, data, tgt_tok, args)
        result[f"bleu_single_expert_{split}"], signature = bleu(hyps, refs[split])
        hyps, used = translate(members, route_coe, data, tgt_tok, args)
        result[f"bleu_coe_{split}"], _ = bleu(hyps, refs[split])
        result[f"expert_load_{split}"] = used.tolist()
    hyps, _ = translate(members, route_oracle, test_ids, tgt_tok, args)
    result["bleu_oracle_pool_test"], _ = bleu(hyps, refs["test"])
    result["agreement_per_joint_epoch"] = [round(a, 3) for a in agreements]
    result["seconds"] = round(time.time() - start, 1)
    result["bleu_signature"] = signature
    return result


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of every BLEU, and the per-seed paired differences."""
    keys = [k for k in runs[0] if k.startswith("bleu_") and k != "bleu_signature"]
    out: dict = {}
    for k in keys:
        values = [r[k] for r in runs]
        out[k] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values,
        }
    for split in ("val", "test"):
        diffs = [r[f"bleu_coe_{split}"] - r[f"bleu_single_expert_{split}"] for r in runs]
        out[f"coe_minus_single_{split}"] = {
            "mean": statistics.fmean(diffs),
            "std": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "values": diffs,
        }
    return out


def _ms(e: dict) -> str:
    return f"{e['mean']:.2f}" + ("" if e["std"] is None else f" +- {e['std']:.2f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    train, val, test = split_pairs(args)
    src_tok = SubwordTokenizer.train((e for e, _ in train), args.vocab_size)
    tgt_tok = SubwordTokenizer.train((s for _, s in train), args.vocab_size)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    src_tok.save(args.out_dir / "spm_en.model")
    tgt_tok.save(args.out_dir / "spm_es.model")

    def encode(pairs):
        return [(src_tok.encode(e), tgt_tok.encode(s)) for e, s in pairs]

    train_ids, val_ids, test_ids = encode(train), encode(val), encode(test)
    refs = {"val": [s for _, s in val], "test": [s for _, s in test]}
    print(
        f"{len(train_ids)} training, {len(val_ids)} validation, {len(test_ids)} test pairs; sentencepiece "
        f"vocabularies {len(src_tok)} (en) / {len(tgt_tok)} (es), trained on the training split; "
        f"torch threads {torch.get_num_threads()}; seeds {args.seed_list}",
        flush=True,
    )
    runs = []
    for seed in args.seed_list:
        r = run_seed(seed, args, train_ids, val_ids, test_ids, refs, len(src_tok), tgt_tok)
        print(json.dumps(r), flush=True)
        runs.append(r)
    summary = summarise(runs)
    signature = runs[0]["bleu_signature"]
    results = {
        "pairs": {"train": len(train_ids), "val": len(val_ids), "test": len(test_ids)},
        "vocab": {"en": len(src_tok), "es": len(tgt_tok)},
        "experts": args.experts,
        "expert_model": args.expert_model,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "bleu_signature": signature,
        "runs": runs,
        "summary": summary,
        "seconds": round(time.time() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    n = len(runs)
    table = "\n".join(
        [
            f"| model | BLEU validation | BLEU test | (mean +- std over {n} seed(s)) |",
            "|---|---|---|---|",
            f"| single expert ({args.universal_epochs + args.joint_epochs} epochs) | "
            f"{_ms(summary['bleu_single_expert_val'])} | {_ms(summary['bleu_single_expert_test'])} | |",
            f"| CoE, K={args.experts} (delegator routing) | {_ms(summary['bleu_coe_val'])} | "
            f"{_ms(summary['bleu_coe_test'])} | |",
            f"| CoE minus single expert, paired by seed | {_ms(summary['coe_minus_single_val'])} | "
            f"{_ms(summary['coe_minus_single_test'])} | per seed (test): "
            + ", ".join(f"{d:+.2f}" for d in summary["coe_minus_single_test"]["values"])
            + " |",
            f"| expert pool oracle (best expert per sentence, by loss) | - | "
            f"{_ms(summary['bleu_oracle_pool_test'])} | |",
            "",
            f"sacreBLEU signature: {signature}",
        ]
    )
    print(table)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (args.out_dir / "results.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    main()
