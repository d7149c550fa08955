"""The translation example: its SWORD reader on a module the test writes, BLEU, and a short training run."""

import importlib
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "translation"


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLE))
    try:
        yield {name: importlib.import_module(name) for name in ("bible", "text", "train_translation")}
    finally:
        sys.path.remove(str(EXAMPLE))


def _write_ztext(module_dir: Path, testament: str, verses: list[str], per_block: int = 2) -> None:
    """Write verses in the zText layout: zlib blocks (.bzz), block index (.bzs), verse index (.bzv)."""
    bzs, bzv, bzz = bytearray(), bytearray(), bytearray()
    for b in range(0, len(verses), per_block):
        raw = bytearray()
        for v in verses[b : b + per_block]:
            data = v.encode("utf-8")
            bzv += struct.pack("<IIH", b // per_block, len(raw), len(data))
            raw += data
        comp = zlib.compress(bytes(raw))
        bzs += struct.pack("<III", len(bzz), len(comp), len(raw))
        bzz += comp
    module_dir.mkdir(parents=True, exist_ok=True)
    (module_dir / f"{testament}.bzs").write_bytes(bytes(bzs))
    (module_dir / f"{testament}.bzv").write_bytes(bytes(bzv))
    (module_dir / f"{testament}.bzz").write_bytes(bytes(bzz))


def test_sword_reader_aligns_and_strips_markup(example, tmp_path):
    bible = example["bible"]
    en = [
        'In the <w lemma="strong:H1">beginning</w>.<note placement="foot">a note</note>',
        "",
        "Light &amp; dark\u00b6",
        "<title>Psalm</title>Praise ye.",
    ]
    es = ["En el principio.", "Vacío.", "Luz y tinieblas", "Alabad."]
    for name, verses in ((bible.ENGLISH, en), (bible.SPANISH, es)):
        _write_ztext(tmp_path / name, "ot", verses[:3])
        _write_ztext(tmp_path / name, "nt", verses[3:])
    pairs = bible.verse_pairs(tmp_path)
    assert pairs == [
        ("In the beginning.", "En el principio."),  # the empty English verse drops its pair
        ("Light & dark", "Luz y tinieblas"),
        ("Praise ye.", "Alabad."),
    ]


def test_sword_reader_missing_module_says_what_to_install(example, tmp_path):
    with pytest.raises(FileNotFoundError, match="sword-text-kjv"):
        example["bible"].read_module("engKJV2006eb", tmp_path)


def test_bleu_matches_hand_computed_values(example):
    bleu = example["text"].corpus_bleu
    ref = ["the", "cat", "sat", "on", "the", "mat"]
    assert bleu([ref], [ref]) == pytest.approx(100.0)
    assert bleu([["dog"]], [ref]) == 0.0
    # equal lengths (no brevity penalty); clipped n-gram precisions 5/6, 3/5, 2/4, 1/3
    expected = 100.0 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu([["the", "cat", "sat", "on", "a", "mat"]], [ref]) == pytest.approx(expected)
    # no matching 4-gram -> 0 (corpus BLEU without smoothing)
    assert bleu([["the", "cat", "sat", "on"][::-1] + ["mat"]], [ref]) == 0.0
    # a correct 4-token prefix: every precision is 1, brevity penalty exp(1 - 6/4)
    import math

    assert bleu([ref[:4]], [ref]) == pytest.approx(100.0 * math.exp(1 - 6 / 4))


def test_vocab_round_trip(example):
    text = example["text"]
    vocab = text.Vocab.build([["a", "b", "b"], ["c"]])
    ids = vocab.encode(["b", "a", "zzz"])
    assert ids[2] == text.UNK
    assert vocab.decode(ids + [text.EOS, 5]) == ["b", "a", "<unk>"]


def test_training_run_on_synthetic_pairs(example, tmp_path):
    out = tmp_path / "run"
    results = example["train_translation"].main(
        [
            "--dataset",
            "synthetic",
            "--max-pairs",
            "160",
            "--test-size",
            "20",
            "--experts",
            "2",
            "--universal-epochs",
            "1",
            "--joint-epochs",
            "1",
            "--batch-size",
            "32",
            "--d-model",
            "32",
            "--layers",
            "1",
            "--out-dir",
            str(out),
        ]
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    assert results["pairs_test"] == 20 and results["experts"] == 2
    assert sum(results["expert_load_test"]) == 20
    for key in ("bleu_single_expert", "bleu_coe", "bleu_oracle_pool"):
        assert 0.0 <= results[key] <= 100.0
    assert "| CoE, K=2" in (out / "results.md").read_text()
