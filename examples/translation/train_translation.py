"""CoE for translation: English -> Spanish Bible verses, offline, on the CPU.

The CoE machinery is task-agnostic: it only needs every expert's per-sample loss ``[B, K]``. Here each
expert is a small encoder-decoder Transformer, the per-sample loss is the mean token cross-entropy of a
sentence, and the delegator reads the source sentence (a bag of embeddings) to pick one expert per sentence.
Translation has no rough prediction, so the delegator has no rough head and there is no early exit.

Stages (pycoe's recipe, not a confirmed reproduction of the CoE paper's translation experiment, whose
dataset, model and schedule are not public):

1. train one universal expert on all the training pairs;
2. copy it into K experts (``ExpertPool.from_template``);
3. train the delegator and the experts jointly with WGM (balanced-transport loss weights) and LGM
   (the delegator's selection targets from the experts' losses);

and, as the baseline at equal inference cost, keep training the universal expert for as many epochs as
stage 3 takes. Reports corpus BLEU (this example's own tokenisation) of both on held-out verses, and the
BLEU of the expert pool's oracle (the best expert per sentence, by sentence loss).

Run: ``python examples/translation/train_translation.py`` (needs ``apt-get install -y
--no-install-recommends sword-text-kjv sword-text-sparv``), or ``--dataset synthetic`` anywhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import BagOfEmbeddings, Seq2SeqTransformer
from text import PAD, Vocab, corpus_bleu, pad_batch, tokenize

import pycoe


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["bible", "synthetic"], default="bible")
    p.add_argument(
        "--max-words", type=int, default=15, help="keep pairs whose English side has at most this many words"
    )
    p.add_argument("--max-pairs", type=int, default=0, help="use at most this many pairs (0: all)")
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--universal-epochs", type=int, default=6)
    p.add_argument("--joint-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--epsilon", type=float, default=0.1, help="WGM weight of a sample's non-assigned experts")
    p.add_argument("--lgm", choices=["best", "soft", "balanced"], default="best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/translation"))
    return p.parse_args(argv)


def synthetic_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """A toy 'language' pair: Spanish-like output is the English words reversed with a suffix."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    pairs = []
    for _ in range(n):
        sent = [rng.choice(words) for _ in range(rng.randint(2, 8))]
        pairs.append((" ".join(sent), " ".join(w + "o" for w in reversed(sent))))
    return pairs


def load_pairs(args) -> list[tuple[list[str], list[str]]]:
    if args.dataset == "synthetic":
        raw = synthetic_pairs(args.max_pairs or 400, args.seed)
    else:
        from bible import verse_pairs

        raw = verse_pairs()
    pairs = [(tokenize(e), tokenize(s)) for e, s in raw]
    pairs = [(e, s) for e, s in pairs if 0 < len(e) <= args.max_words and 0 < len(s) <= 2 * args.max_words]
    random.Random(args.seed).shuffle(pairs)
    if args.max_pairs:
        pairs = pairs[: args.max_pairs]
    return pairs


def batches(data, batch_size: int, generator: torch.Generator, shuffle: bool = True):
    order = torch.randperm(len(data), generator=generator).tolist() if shuffle else list(range(len(data)))
    for i in range(0, len(order), batch_size):
        chunk = [data[j] for j in order[i : i + batch_size]]
        src = pad_batch([c[0] for c in chunk])
        tgt = pad_batch([c[1] for c in chunk], bos=True, eos=True)
        yield src, tgt[:, :-1], tgt[:, 1:]


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
            loss = sentence_loss(model(src, tgt_in), tgt_out).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(src)
            n += len(src)
        print(f"[{label}] epoch {epoch + 1}/{epochs} loss {total / n:.3f}", flush=True)
    return model


def train_joint(coe, criterion, data, args, gen):
    opt = torch.optim.Adam(coe.parameters(), lr=args.lr)
    coe.train()
    for epoch in range(args.joint_epochs):
        total, n, agree = 0.0, 0, 0.0
        for src, tgt_in, tgt_out in batches(data, args.batch_size, gen):
            out = coe(src, tgt_in)  # train mode: selection logits + every expert's [K, B, T, V] output
            loss, info = criterion(out, tgt_out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(src)
            n += len(src)
            agree += float(info.get("agreement", 0.0)) * len(src)
        print(
            f"[coe] epoch {epoch + 1}/{args.joint_epochs} loss {total / n:.3f} delegator/LGM agreement {agree / n:.3f}",
            flush=True,
        )


@torch.no_grad()
def evaluate(models, route, data, tgt_vocab, args):
    """BLEU of routed greedy decoding. ``route(src) -> LongTensor[B]`` picks a model per sentence."""
    hyps, refs, used = [], [], torch.zeros(len(models), dtype=torch.long)
    for m in models:
        m.eval()
    gen = torch.Generator().manual_seed(0)
    for src, _, tgt_out in batches(data, args.batch_size, gen, shuffle=False):
        idx = route(src)
        out = [None] * len(src)
        for k in idx.unique().tolist():
            rows = (idx == k).nonzero().flatten()
            dec = models[k].greedy(src[rows], max_len=2 * args.max_words + 2)
            for r, d in zip(rows.tolist(), dec.tolist()):
                out[r] = tgt_vocab.decode(d)
            used[k] += len(rows)
        hyps += out
        refs += [tgt_vocab.decode(t) for t in tgt_out.tolist()]
    return corpus_bleu(hyps, refs), used


@torch.no_grad()
def oracle_route(experts, src, tgt_in, tgt_out):
    losses = torch.stack([sentence_loss(e(src, tgt_in), tgt_out) for e in experts], dim=1)
    return losses.argmin(1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    pairs = load_pairs(args)
    test, train = pairs[: args.test_size], pairs[args.test_size :]
    src_vocab = Vocab.build(e for e, _ in train)
    tgt_vocab = Vocab.build(s for _, s in train)
    encode = lambda ps: [(src_vocab.encode(e), tgt_vocab.encode(s)) for e, s in ps]  # noqa: E731
    train_ids, test_ids = encode(train), encode(test)
    print(
        f"{len(train_ids)} training pairs, {len(test_ids)} test pairs, vocabularies "
        f"{len(src_vocab)} (en) / {len(tgt_vocab)} (es), torch threads {torch.get_num_threads()}",
        flush=True,
    )
    gen = torch.Generator().manual_seed(args.seed)

    # Stage 1: the universal expert.
    universal = Seq2SeqTransformer(len(src_vocab), len(tgt_vocab), args.d_model, layers=args.layers)
    train_universal(universal, train_ids, args, args.universal_epochs, gen, "universal")

    # Stage 2: K copies; stage 3: joint WGM + LGM training with a delegator.
    experts = pycoe.ExpertPool.from_template(universal, args.experts, init="copy")
    delegator = pycoe.Delegator(BagOfEmbeddings(len(src_vocab)), num_experts=args.experts, feature_dim=64)
    coe = pycoe.CoE(delegator, experts)
    criterion = pycoe.CoELoss(
        pycoe.BalancedTransportWeighter(args.experts, epsilon=args.epsilon),
        pycoe.LabelGenerator(mode=args.lgm),
        per_sample_loss=sentence_loss,
        rough_weight=0.0,
    )
    train_joint(coe, criterion, train_ids, args, gen)

    # Baseline at equal inference cost: the universal expert trained for as many more epochs.
    baseline = train_universal(copy.deepcopy(universal), train_ids, args, args.joint_epochs, gen, "baseline")

    coe.eval()
    route_coe = lambda src: coe.delegator(src).selection_logits.argmax(1)  # noqa: E731
    members = list(coe.experts)
    bleu_base, _ = evaluate([baseline], lambda s: torch.zeros(len(s), dtype=torch.long), test_ids, tgt_vocab, args)
    bleu_coe, used = evaluate(members, route_coe, test_ids, tgt_vocab, args)
    oracle_idx = []
    for src, tgt_in, tgt_out in batches(test_ids, args.batch_size, torch.Generator(), shuffle=False):
        oracle_idx.append(oracle_route(members, src, tgt_in, tgt_out))
    oracle_all = torch.cat(oracle_idx)
    pos = {"i": 0}

    def route_oracle(src):
        out = oracle_all[pos["i"] : pos["i"] + len(src)]
        pos["i"] += len(src)
        return out

    bleu_oracle, _ = evaluate(members, route_oracle, test_ids, tgt_vocab, args)
    results = {
        "pairs_train": len(train_ids),
        "pairs_test": len(test_ids),
        "experts": args.experts,
        "bleu_single_expert": round(bleu_base, 2),
        "bleu_coe": round(bleu_coe, 2),
        "bleu_oracle_pool": round(bleu_oracle, 2),
        "expert_load_test": used.tolist(),
        "seconds": round(time.time() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    table = "\n".join(
        [
            "| model | BLEU (held-out) |",
            "|---|---|",
            f"| single expert ({args.universal_epochs + args.joint_epochs} epochs) | {bleu_base:.2f} |",
            f"| CoE, K={args.experts} (delegator routing) | {bleu_coe:.2f} |",
            f"| expert pool oracle (best expert per sentence) | {bleu_oracle:.2f} |",
        ]
    )
    print(table)
    print(json.dumps(results))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (args.out_dir / "results.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    main()
