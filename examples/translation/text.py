"""Subword tokenisation, padding and BLEU for the translation example: the field's standard instruments.

- :class:`SubwordTokenizer`: a sentencepiece unigram model (Kudo, 2018), trained on the **training split only**
  (one per language), with the special ids ``PAD, BOS, EOS, UNK = 0, 1, 2, 3``. Decoding gives back plain text
  (sentencepiece's pieces carry their spaces), so hypotheses are detokenised exactly.
- :func:`bleu`: sacreBLEU's corpus BLEU on the detokenised hypotheses against the raw reference sentences, with
  its default 13a tokenisation, returned with sacreBLEU's signature, printed with every score (Post, 2018,
  "A Call for Clarity in Reporting BLEU Scores"), which makes the numbers comparable outside this example.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import sentencepiece as spm
import torch
from sacrebleu.metrics import BLEU

PAD, BOS, EOS, UNK = 0, 1, 2, 3

__all__ = ["PAD", "BOS", "EOS", "UNK", "SubwordTokenizer", "pad_batch", "bleu"]


class SubwordTokenizer:
    """A sentencepiece model: ``encode(text) -> ids``, ``decode(ids) -> text`` (stops at EOS, skips PAD/BOS)."""

    def __init__(self, model_proto: bytes):
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)

    @classmethod
    def train(cls, sentences: Iterable[str], vocab_size: int = 2000) -> SubwordTokenizer:
        """Train a unigram model on ``sentences`` (deterministic: one thread, every sentence used).

        ``vocab_size`` is an upper bound: a small corpus gets the pieces it supports.
        """
        sentences = [s for s in sentences if s.strip()]
        if not sentences:
            raise ValueError("the tokenizer needs at least one non-empty training sentence")
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buffer,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=PAD,
            bos_id=BOS,
            eos_id=EOS,
            unk_id=UNK,
            num_threads=1,
            minloglevel=2,
        )
        return cls(buffer.getvalue())

    def __len__(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(int(i))
        return str(self.sp.decode(out))

    def save(self, path) -> None:
        with open(path, "wb") as f:
            f.write(self.model_proto)


def pad_batch(sequences: Sequence[Sequence[int]], bos: bool = False, eos: bool = False) -> torch.Tensor:
    """Right-pad id lists into a LongTensor[B, T], optionally adding BOS/EOS."""
    rows = [([BOS] if bos else []) + list(s) + ([EOS] if eos else []) for s in sequences]
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU (0-100) of detokenised hypotheses against one raw reference each, and its signature.

    Returns:
        ``(score, signature)``, the signature being sacreBLEU's description of the settings (e.g.
        ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``), to print with the score.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())
