"""The data of the genre classifier: KJV verses labelled with their book's genre, split by chapter, tokenised with a
subword tokenizer trained on the training split, batched the Hugging Face way.

- :func:`load_verses` reads the English module (:mod:`examples.common.bible`) and labels each verse with the genre
  of its book (:data:`examples.common.versification.GENRES`: law, history, poetry/wisdom, prophets, gospels/acts,
  letters, apocalyptic).
- :func:`split_by_chapter` assigns whole **chapters** to the training, validation and test splits (neighbouring
  verses are often near copies: "And the LORD spake unto Moses, saying", lists of names, parallel lines of a
  psalm), stratified by genre so that every genre has chapters in every split, with a fixed seed. The other
  chapters of a book stay in training: the splits measure generalisation to unseen chapters of known books (whose
  names and places a model may learn), not to unseen books (a split by book would leave the one apocalyptic book
  out of training or out of the test).
- :func:`train_tokenizer` trains a subword vocabulary (sentencepiece unigram) on the training split only and
  makes it a ``transformers.PreTrainedTokenizerFast`` (a ``tokenizers`` ``Unigram`` model, ``[CLS] ... [SEP]``),
  so batches are ``BatchEncoding`` objects with ``input_ids``, ``attention_mask`` and ``labels``, padded on the
  right by ``transformers.DataCollatorWithPadding``.
- :func:`make_loader` batches a split: training batches group verses of similar length (less padding) in a random
  order drawn from a seeded generator; evaluation batches are sorted by length (the order of a split's samples
  is then that of :attr:`EncodedSplit.order`).

``transformers``, ``tokenizers`` and ``sentencepiece`` are imported inside the functions that use them.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from examples.common.bible import ENGLISH, SWORD_ROOT, read_verses
from examples.common.versification import GENRES

__all__ = [
    "SPECIAL_TOKENS",
    "LabelledVerse",
    "EncodedSplit",
    "load_verses",
    "split_by_chapter",
    "train_tokenizer",
    "encode_split",
    "LengthBucketBatches",
    "make_loader",
]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


@dataclass(frozen=True)
class LabelledVerse:
    """A verse, its genre's index in :data:`~examples.common.versification.GENRES`, and its chapter's key."""

    text: str
    label: int
    chapter: tuple[int, int]  # (the book's canonical index, the chapter number)


def load_verses(root: Path | str = SWORD_ROOT, module: str = ENGLISH) -> list[LabelledVerse]:
    """Every non-empty verse of ``module`` with the genre of its book (31,102 verses in the KJV)."""
    return [
        LabelledVerse(v.text, GENRES.index(v.book.genre), (v.book.index, v.chapter))
        for v in read_verses(module, root)
        if v.text
    ]


def split_by_chapter(
    verses: Sequence[LabelledVerse],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    keep_fraction: float = 1.0,
) -> dict[str, list[LabelledVerse]]:
    """Whole chapters to ``"train"``, ``"val"`` and ``"test"``, stratified by genre, with a fixed seed.

    Within each genre the chapters are shuffled (``random.Random(seed)``, genres in canonical order); the first
    ``keep_fraction`` of them are kept (at least 3 per genre: a smaller, still stratified corpus), then
    ``round(val_fraction * n)`` and ``round(test_fraction * n)`` of those (at least one each) go to validation and
    test, the rest to training. Verses keep their canonical order within each split.

    Raises:
        ValueError: a fraction outside its range, or a genre with too few chapters for three splits.
    """
    if not (0.0 < val_fraction < 1.0 and 0.0 < test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got {val_fraction}, {test_fraction}"
        )
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    chapters: dict[int, set[tuple[int, int]]] = {}
    for v in verses:
        chapters.setdefault(v.label, set()).add(v.chapter)
    rng = random.Random(seed)
    where: dict[tuple[int, int], str] = {}
    for label in sorted(chapters):
        keys = sorted(chapters[label])
        rng.shuffle(keys)
        keys = keys[: max(3, round(keep_fraction * len(keys)))]
        if len(keys) < 3:
            raise ValueError(f"genre {GENRES[label]!r} has {len(keys)} chapter(s): three splits need at least 3")
        n_val = max(1, round(val_fraction * len(keys)))
        n_test = max(1, round(test_fraction * len(keys)))
        if n_val + n_test >= len(keys):
            n_val = n_test = 1
        for i, key in enumerate(keys):
            where[key] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    splits: dict[str, list[LabelledVerse]] = {"train": [], "val": [], "test": []}
    for v in verses:
        if v.chapter in where:
            splits[where[v.chapter]].append(v)
    return splits


def train_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int = 128) -> Any:
    """A subword tokenizer trained on ``texts`` (the training split), as a ``transformers.PreTrainedTokenizerFast``.

    The vocabulary is a sentencepiece unigram model (Kudo, 2018) trained with one thread, which makes it
    deterministic (the ``tokenizers`` library's own WordPiece and unigram trainers are not: their merges and pieces
    change from one process to the next); its pieces and scores then become a ``tokenizers`` ``Unigram`` model with
    sentencepiece's whitespace handling (``Metaspace``), wrapped as a fast tokenizer, so batches are the
    ``BatchEncoding`` objects of ``transformers``. Case is kept ("LORD" and "Lord" tell the testaments apart). The
    special tokens are ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3``, with ``[CLS] text [SEP]`` around every verse;
    ``vocab_size`` is an upper bound (a small corpus gets the pieces it supports).
    """
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("the tokenizer needs at least one non-empty training text")
    buffer = io.BytesIO()
    pad, unk, cls, sep = SPECIAL_TOKENS
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buffer,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        normalization_rule_name="identity",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=pad,
        unk_piece=unk,
        bos_piece=cls,
        eos_piece=sep,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(pieces, unk_id=1, byte_fallback=False))
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}", special_tokens=[(cls, 2), (sep, 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        unk_token=unk,
        cls_token=cls,
        sep_token=sep,
        model_max_length=max_length,
        padding_side="right",
    )


@dataclass
class EncodedSplit:
    """A split tokenised once: ``features[i] = {"input_ids": [...], "labels": int}`` (what the collator pads)."""

    features: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]

    @property
    def lengths(self) -> list[int]:
        """Tokens per verse, ``[CLS]`` and ``[SEP]`` included."""
        return [len(f["input_ids"]) for f in self.features]

    @property
    def labels(self) -> torch.Tensor:
        """LongTensor[N] of genre indices."""
        return torch.tensor([f["labels"] for f in self.features], dtype=torch.long)

    @property
    def order(self) -> list[int]:
        """The order of the samples in an evaluation loader (by length, ties by position)."""
        lengths = self.lengths
        return sorted(range(len(lengths)), key=lambda i: (lengths[i], i))


def encode_split(tokenizer: Any, verses: Sequence[LabelledVerse]) -> EncodedSplit:
    """Tokenise a split (truncated to the tokenizer's ``model_max_length``)."""
    ids = tokenizer([v.text for v in verses], truncation=True)["input_ids"]
    return EncodedSplit([{"input_ids": i, "labels": v.label} for i, v in zip(ids, verses)])


class LengthBucketBatches(Sampler[list[int]]):
    """Batches of indices of verses of similar length.

    Training (``generator`` given): each epoch the indices are shuffled, cut into pools of ``50 * batch_size``,
    each pool sorted by length and cut into batches, and the batches shuffled; every sample appears once per
    epoch. Evaluation (``generator=None``): the indices sorted by length, cut into batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.generator = generator

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        n, bs = len(self.lengths), self.batch_size
        if self.generator is None:
            order = sorted(range(n), key=lambda i: (self.lengths[i], i))
            yield from (order[i : i + bs] for i in range(0, n, bs))
            return
        perm = torch.randperm(n, generator=self.generator).tolist()
        batches = []
        pool = 50 * bs
        for start in range(0, n, pool):
            chunk = sorted(perm[start : start + pool], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
        for j in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[j]


def make_loader(
    split: EncodedSplit, tokenizer: Any, batch_size: int, generator: torch.Generator | None = None
) -> DataLoader:
    """A loader of padded ``BatchEncoding`` batches (``input_ids``, ``attention_mask``, ``labels``): shuffled
    length buckets with a ``generator`` (training), else sorted by length (evaluation)."""
    from transformers import DataCollatorWithPadding

    return DataLoader(
        split,  # type: ignore[arg-type]  # a map-style dataset (len and getitem)
        batch_sampler=LengthBucketBatches(split.lengths, batch_size, generator),
        collate_fn=DataCollatorWithPadding(tokenizer, return_tensors="pt"),
    )
