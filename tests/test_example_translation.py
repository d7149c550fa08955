"""The translation example: its SWORD reader on a module the test writes, sacreBLEU, sentencepiece, the splits and
a short training run with two seeds."""

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


def test_bleu_is_sacrebleu_on_detokenised_text(example):
    bleu = example["text"].bleu
    ref = "En el principio creó Dios los cielos y la tierra."
    score, signature = bleu([ref], [ref])
    assert score == pytest.approx(100.0)
    assert signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    # sacreBLEU's own 13a tokenisation splits the final period: a hypothesis without it loses unigram matches
    import sacrebleu

    hyp = "En el principio creó Dios los cielos y la tierra"
    got, _ = bleu([hyp], [ref])
    assert got == pytest.approx(sacrebleu.corpus_bleu([hyp], [[ref]]).score) and got < 100.0
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        bleu([hyp, hyp], [ref])


def test_subword_tokenizer_round_trip(example):
    text = example["text"]
    train = ["in the beginning god created the heaven and the earth", "and the earth was without form"] * 20
    tok = text.SubwordTokenizer.train(train, vocab_size=40)
    assert 4 < len(tok) <= 40
    ids = tok.encode("and god created the earth")
    assert all(i >= 4 for i in ids)  # no special id inside a sentence
    assert tok.decode(ids) == "and god created the earth"  # detokenised exactly
    assert tok.decode([text.BOS, *ids, text.EOS, ids[0]]) == "and god created the earth"  # stops at EOS
    assert text.UNK in tok.encode("zebra")  # unseen characters
    again = text.SubwordTokenizer.train(train, vocab_size=40)
    assert again.model_proto == tok.model_proto  # deterministic
    with pytest.raises(ValueError, match="at least one non-empty"):
        text.SubwordTokenizer.train(["", "  "])


def test_splits_are_disjoint_and_fixed(example):
    tt = example["train_translation"]
    args = tt.parse_args(["--dataset", "synthetic", "--max-pairs", "100", "--val-size", "10", "--test-size", "15"])
    train, val, test = tt.split_pairs(args)
    assert (len(train), len(val), len(test)) == (75, 10, 15)
    again = tt.split_pairs(
        tt.parse_args(
            ["--dataset", "synthetic", "--max-pairs", "100", "--val-size", "10", "--test-size", "15", "--seeds", "5"]
        )
    )
    assert again == (train, val, test)  # the training seed does not move the split
    with pytest.raises(ValueError, match="leave no training pair"):
        tt.split_pairs(
            tt.parse_args(["--dataset", "synthetic", "--max-pairs", "20", "--val-size", "10", "--test-size", "10"])
        )
    with pytest.raises(SystemExit):
        tt.parse_args(["--seeds", "1,1"])


def test_training_run_on_synthetic_pairs(example, tmp_path):
    out = tmp_path / "run"
    results = example["train_translation"].main(
        [
            "--dataset",
            "synthetic",
            "--max-pairs",
            "160",
            "--val-size",
            "16",
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
            "--seeds",
            "0,1",
            "--threads",
            "1",
            "--out-dir",
            str(out),
        ]
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert results["pairs"] == {"train": 124, "val": 16, "test": 20} and results["experts"] == 2
    assert [r["seed"] for r in results["runs"]] == [0, 1]
    for r in results["runs"]:
        assert sum(r["expert_load_test"]) == 20 and sum(r["expert_load_val"]) == 16
        for key in ("bleu_single_expert_test", "bleu_coe_test", "bleu_oracle_pool_test", "bleu_coe_val"):
            assert 0.0 <= r[key] <= 100.0
    diff = results["summary"]["coe_minus_single_test"]
    assert diff["values"] == [r["bleu_coe_test"] - r["bleu_single_expert_test"] for r in results["runs"]]
    assert diff["mean"] == pytest.approx(sum(diff["values"]) / 2)
    md = (out / "results.md").read_text()
    assert "| CoE, K=2" in md and "sacreBLEU signature: nrefs:1|case:mixed" in md
    assert (out / "spm_en.model").is_file() and (out / "spm_es.model").is_file()
