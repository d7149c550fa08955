"""The text-classification example (``python -m examples.text_classification.train``): the chapter split, the
tokenizer and the batches, the FLOPs curves, the cascade, and the ``--smoke`` run end to end on a SWORD module the
tests write (and on the installed KJV module where Debian's package is present)."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import pycoe
from examples.common import bible
from examples.common.versification import BOOKS, GENRES
from examples.text_classification import data, models, report, train

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# A fake English module: every verse slot of the KJV versification, with words that depend on the book's genre
# ---------------------------------------------------------------------------------------------------------------
def _write_ztext(module_dir: Path, testament: str, texts: list[str], per_block: int = 400) -> None:
    """Slot texts in the zText layout: zlib blocks (.bzz), block index (.bzs), verse index (.bzv)."""
    bzs, bzv, bzz = bytearray(), bytearray(), bytearray()
    for b in range(0, len(texts), per_block):
        raw = bytearray()
        for text in texts[b : b + per_block]:
            encoded = text.encode("utf-8")
            bzv += struct.pack("<IIH", b // per_block, len(raw), len(encoded))
            raw += encoded
        comp = zlib.compress(bytes(raw))
        bzs += struct.pack("<III", len(bzz), len(comp), len(raw))
        bzz += comp
    module_dir.mkdir(parents=True, exist_ok=True)
    for ext, content in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
        (module_dir / f"{testament}.{ext}").write_bytes(bytes(content))


def _fake_verse(rng: random.Random, genre: int) -> str:
    """Four to ten words: shared ones, and one or two of the genre's own."""
    shared = ["and", "the", "of", "unto", "said", "him", "them", "which"]
    own = [f"{GENRES[genre].split('/')[0]}{j}" for j in range(6)]
    words = [rng.choice(shared) for _ in range(rng.randint(3, 8))] + rng.sample(own, rng.randint(1, 2))
    rng.shuffle(words)
    return " ".join(words).capitalize() + "."


@pytest.fixture(scope="module")
def sword_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sword")
    rng = random.Random(0)
    for testament in ("ot", "nt"):
        texts = ["", ""]  # the module's and the testament's headings
        for book in BOOKS:
            if book.testament != testament:
                continue
            texts.append("")  # the book's heading
            for count in book.verses:
                texts.append("")  # the chapter's heading
                texts += [_fake_verse(rng, GENRES.index(book.genre)) for _ in range(count)]
        _write_ztext(root / bible.ENGLISH, testament, texts)
    return root


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def test_verses_carry_the_genre_of_their_book(sword_root):
    verses = data.load_verses(sword_root)
    assert len(verses) == 31102
    by_chapter = {v.chapter: v.label for v in verses}
    assert by_chapter[(0, 1)] == GENRES.index("law") and by_chapter[(65, 22)] == GENRES.index("apocalyptic")
    assert verses[0].text.endswith(".") and verses[0].chapter == (0, 1)
    assert {v.label for v in verses} == set(range(len(GENRES)))


def test_split_keeps_chapters_whole_and_every_genre_in_every_split(sword_root):
    verses = data.load_verses(sword_root)
    splits = data.split_by_chapter(verses, 0.1, 0.1, seed=0)
    chapters = {name: {v.chapter for v in s} for name, s in splits.items()}
    assert not (chapters["train"] & chapters["val"] or chapters["train"] & chapters["test"])
    assert not chapters["val"] & chapters["test"]
    assert sum(len(s) for s in splits.values()) == len(verses)  # nothing lost
    for name, s in splits.items():
        assert {v.label for v in s} == set(range(len(GENRES))), name
    assert len(chapters["val"]) == sum(max(1, round(0.1 * n)) for n in _chapters_per_genre())
    # every chapter's verses all in one split, in canonical order
    where = {c: name for name, cs in chapters.items() for c in cs}
    assert all(v in splits[where[v.chapter]] for v in verses[:500])
    assert splits == data.split_by_chapter(verses, 0.1, 0.1, seed=0)  # fixed by the seed
    assert splits["test"] != data.split_by_chapter(verses, 0.1, 0.1, seed=1)["test"]
    small = data.split_by_chapter(verses, 0.1, 0.1, seed=0, keep_fraction=0.1)
    assert sum(len({v.chapter for v in s}) for s in small.values()) == sum(
        max(3, round(0.1 * n)) for n in _chapters_per_genre()
    )
    with pytest.raises(ValueError, match="val_fraction and test_fraction"):
        data.split_by_chapter(verses, 0.6, 0.5)
    with pytest.raises(ValueError, match="keep_fraction"):
        data.split_by_chapter(verses, keep_fraction=0.0)


def _chapters_per_genre() -> list[int]:
    return [sum(len(b.verses) for b in BOOKS if b.genre == g) for g in GENRES]


def test_tokenizer_and_batches_are_hugging_face_ones():
    from transformers import BatchEncoding, PreTrainedTokenizerFast

    texts = ["In the beginning God created the heaven and the earth.", "And the LORD spake unto Moses, saying,"] * 5
    tok = data.train_tokenizer(texts, vocab_size=60, max_length=16)
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) <= 60
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id] == [0, 1, 2, 3]
    enc = tok("And God created")
    assert enc["input_ids"][0] == tok.cls_token_id and enc["input_ids"][-1] == tok.sep_token_id
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "And God created"
    assert tok.unk_token_id in tok("Zebra")["input_ids"]  # an unseen character
    assert len(tok(" ".join(["God"] * 40), truncation=True)["input_ids"]) == 16  # truncated to max_length
    again = data.train_tokenizer(texts, 60, 16).backend_tokenizer.to_str()
    assert json.loads(again)["model"] == json.loads(tok.backend_tokenizer.to_str())["model"]  # pieces and scores
    with pytest.raises(ValueError, match="non-empty"):
        data.train_tokenizer(["", " "], 100)

    verses = [data.LabelledVerse(t, i % 3, (0, i)) for i, t in enumerate(texts + ["God."])]
    split = data.encode_split(tok, verses)
    assert split.labels.tolist() == [v.label for v in verses]
    batches = list(data.make_loader(split, tok, 4))  # evaluation: sorted by length
    assert all(isinstance(b, BatchEncoding) for b in batches)
    assert set(batches[0]) == {"input_ids", "attention_mask", "labels"}
    assert torch.cat([b["labels"] for b in batches]).tolist() == split.labels[split.order].tolist()
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).tolist()
    assert lengths == sorted(split.lengths)
    for b in batches:  # right padding with [PAD] = 0
        assert torch.equal(b["input_ids"] == 0, b["attention_mask"] == 0)


def test_tokenizer_segments_as_sentencepiece_does(sword_root):
    """The fast tokenizer is sentencepiece's unigram model moved into ``tokenizers``: the same pieces on verses it
    was not trained on (Viterbi over the same scores); and the same vocabulary when another process trains it (the
    ``tokenizers`` library's own trainers fail this: their hash maps' order changes with the process)."""
    import io

    import sentencepiece as spm

    verses = [v.text for v in data.load_verses(sword_root)[::40]]
    tok = data.train_tokenizer(verses[:600], vocab_size=80)
    # the same training in sentencepiece directly
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(verses[:600]),
        model_writer=buffer,
        vocab_size=80,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        normalization_rule_name="identity",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="[PAD]",
        unk_piece="[UNK]",
        bos_piece="[CLS]",
        eos_piece="[SEP]",
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    assert len(tok) == sp.get_piece_size()
    for text in verses[600:]:
        assert tok(text)["input_ids"] == [2, *sp.encode(text), 3]
    # another process (another hash seed) trains the same vocabulary
    code = (
        "import json, sys; from examples.text_classification.data import train_tokenizer; "
        "t = train_tokenizer(json.loads(sys.stdin.read()), 80); print(t.backend_tokenizer.to_str())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(verses[:600]),
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    ).stdout
    assert json.loads(out)["model"] == json.loads(tok.backend_tokenizer.to_str())["model"]


def test_length_buckets_visit_every_sample_once_per_epoch():
    lengths = [random.Random(i).randint(3, 40) for i in range(333)]
    sampler = data.LengthBucketBatches(lengths, 16, torch.Generator().manual_seed(0))
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 21
    assert sorted(i for b in first for i in b) == list(range(333)) == sorted(i for b in second for i in b)
    assert first != second  # a new order every epoch
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first]
    assert sum(spread) / len(spread) < 10  # verses of similar length batched together (random batches: ~28)
    again = list(data.LengthBucketBatches(lengths, 16, torch.Generator().manual_seed(0)))
    assert again == first
    with pytest.raises(ValueError, match="batch_size"):
        data.LengthBucketBatches(lengths, 0)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def _tiny(hidden=16, layers=1, heads=2, vocab=50):
    return models.new_classifier(models.bert_config(vocab, hidden, layers, heads, len(GENRES), max_length=64))


def test_flops_curve_is_the_count_at_every_length():
    for net in (_tiny(16, 2, 4), models.make_delegator(_tiny(8, 1, 2), 3)):
        curve = models.flops_curve(net)
        for n in (1, 5, 17, 63):
            ids = torch.full((1, n), 7)
            assert float(curve([n])[0]) == pycoe.count_flops(net.eval(), input_ids=ids, attention_mask=ids > 0)
        assert curve.mean([5, 17]) == pytest.approx((float(curve([5])[0]) + float(curve([17])[0])) / 2)
        assert curve.c > 0  # attention: quadratic in the number of tokens
    with pytest.raises(ValueError, match="multiple of heads"):
        models.bert_config(50, 10, 1, 4, 7)


def test_matched_hidden_is_the_closest_width():
    lengths = [10, 20, 30]
    target = models.flops_curve(_tiny(16)).mean(lengths) + models.flops_curve(_tiny(8)).mean(lengths)
    hidden, flops = models.matched_hidden(target, lengths, 50, 1, 2, len(GENRES), start=16, max_length=64)
    assert hidden > 16 and hidden % 2 == 0
    for other in (hidden - 2, hidden + 2):
        assert abs(models.flops_curve(_tiny(other)).mean(lengths) - target) >= abs(flops - target)


def test_cascade_exits_exactly_where_the_coe_does():
    delegator = models.make_delegator(_tiny(8), 3)
    assert delegator.classifier_path == "classifier" and delegator.rough_head is not None  # the reused classifier
    coe = pycoe.CoE(delegator, pycoe.ExpertPool.from_template(_tiny(16), 3, init="copy")).eval()
    cascade = models.make_cascade(delegator, _tiny(16)).eval()
    ids = torch.randint(4, 50, (9, 12))
    mask = torch.ones_like(ids)
    mask[:4, 7:] = 0
    with torch.no_grad():
        stage = cascade.delegator(input_ids=ids, attention_mask=mask)
        assert torch.equal(stage.rough_logits, delegator(input_ids=ids, attention_mask=mask).rough_logits)
        assert stage.selection_logits.shape == (9, 1)
        threshold = float(torch.softmax(stage.rough_logits, 1).amax(1).median())
        a = coe.forward_eval(input_ids=ids, attention_mask=mask, exit_threshold=threshold)
        b = cascade.forward_eval(input_ids=ids, attention_mask=mask, exit_threshold=threshold)
    assert torch.equal(a.exited, b.exited) and 0 < int(a.exited.sum()) < 9
    assert torch.equal(a.output[a.exited], b.output[b.exited])  # the same rough logits where they exit
    with pytest.raises(ValueError, match="rough head"):
        models.RoughStage(pycoe.Delegator(_tiny(8), num_experts=2))


def test_calibration_sees_what_the_keyword_call_computes():
    """The calibration calls the models with the collator's batches; on padded batches its no-exit and all-exit
    accuracies are those of ``model.forward_eval(**batch)``, for the CoE and for the cascade."""
    texts = [f"And the LORD spake unto Moses {'and Aaron ' * (i % 5)}saying" for i in range(40)]
    tok = data.train_tokenizer(texts, vocab_size=40, max_length=64)
    split = data.encode_split(tok, [data.LabelledVerse(t, i % 7, (0, i)) for i, t in enumerate(texts)])
    vocab = len(tok)
    torch.manual_seed(0)
    delegator = models.make_delegator(_tiny(8, vocab=vocab), 2)
    coe = pycoe.CoE(delegator, pycoe.ExpertPool([_tiny(16, vocab=vocab) for _ in range(2)]))
    a = train.parse_args(["--smoke", "--batch-size", "16"])
    labels = split.labels[split.order]
    for model in (coe, models.make_cascade(delegator, _tiny(16, vocab=vocab))):
        cal = train.calibrate(model, split, tok, a, {"delegator": 1.0, "experts": [2.0] * model.num_experts})
        for threshold, want in ((None, cal.no_exit_accuracy), (0.0, cal.curve[0]["accuracy"])):
            out = train.deployed(model, split, tok, a, threshold)
            assert float((out["prediction"] == labels).double().mean()) == pytest.approx(want)
        assert cal.curve[0]["threshold"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------------------
def test_options_are_checked():
    a = train.parse_args(["--smoke", "--experts", "2"])
    assert a.experts == 2 and a.expert_hidden == train.SMOKE["expert_hidden"]  # explicit options win over --smoke
    assert train.parse_args(["--jobs", "2"]).threads == 1
    for bad in (["--seeds", "1,1"], ["--seeds", "x"], ["--experts", "0"], ["--epsilon", "2"], ["--max-length", "4"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


def _check_results(results: dict, out: Path, seeds: list[int]) -> None:
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    runs, summary = results["runs"], results["summary"]
    assert [r["seed"] for r in runs] == seeds
    n_test = results["data"]["verses"]["test"]
    for r in runs:
        m, f = r["models"], r["flops_per_verse"]
        assert r["num_test"] == n_test and sum(r["expert_load"]) == n_test
        assert sum(map(sum, r["genre_by_expert"])) == n_test
        assert [sum(row) for row in r["genre_by_expert"]] == results["data"]["genre_counts"]["test"]
        for name, _ in report.MODELS:
            assert 0.0 <= m[name]["accuracy"] <= 1.0
        assert (
            m["oracle"]["accuracy"] >= max(r["expert_accuracy"])
            and m["oracle"]["accuracy"] >= m["coe_no_exit"]["accuracy"] - 1e-12
        )
        # FLOPs: the CoE without exit runs the delegator and one expert; with exit, the delegator and the rest
        assert m["coe_no_exit"]["flops"] == pytest.approx(f["delegator"] + f["expert"])
        assert m["coe_no_exit"]["exit_rate"] == 0.0 and m["delegator"]["exit_rate"] == 1.0
        assert f["delegator"] <= m["coe_exit"]["flops"] <= m["coe_no_exit"]["flops"] + 1e-6
        assert m["single"]["flops"] == pytest.approx(f["expert"])  # the expert's architecture
        assert abs(m["matched"]["flops"] / m["coe_no_exit"]["flops"] - 1) < 0.2
        assert m["cascade_at_coe_threshold"]["exit_rate"] == m["coe_exit"]["exit_rate"]  # the same verses exit
        assert r["val"]["coe"]["threshold"] == m["coe_exit"]["threshold"]
        assert (
            r["val"]["coe"]["accuracy"]
            >= r["val"]["coe"]["no_exit_accuracy"] - results["config"]["max_accuracy_drop"] - 1e-12
        )  # the budget, met on the validation split
    for key, (left, right), _ in report.DIFFERENCES:
        values = [r["models"][left]["accuracy"] - r["models"][right]["accuracy"] for r in runs]
        assert summary["differences"][key]["values"] == values
        assert summary["differences"][key]["mean"] == pytest.approx(sum(values) / len(values))
    md = (out / "results.md").read_text()
    assert "| CoE, no exit |" in md and "FLOPs-matched" in md and "load average" in md


@pytest.mark.slow
def test_smoke_run_on_a_written_module(sword_root, tmp_path):
    out = tmp_path / "run"
    results = train.main(["--smoke", "--sword-root", str(sword_root), "--out-dir", str(out), "--jobs", "2"])
    _check_results(results, out, [0, 1])
    # the written module's genres are told apart by their own words: the models learn them
    majority = max(results["data"]["genre_counts"]["test"]) / results["data"]["verses"]["test"]
    for r in results["runs"]:
        assert r["models"]["single"]["accuracy"] > majority + 0.15


INSTALLED = (bible.SWORD_ROOT / bible.ENGLISH).is_dir()


@pytest.mark.slow
@pytest.mark.skipif(not INSTALLED, reason="Debian's sword-text-kjv is not installed")
def test_smoke_run_on_the_installed_kjv(tmp_path):
    out = tmp_path / "run"
    results = train.main(["--smoke", "--seeds", "0", "--out-dir", str(out)])
    _check_results(results, out, [0])
    assert results["data"]["verses"]["train"] > 1000
