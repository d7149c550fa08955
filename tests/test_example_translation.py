"""The translation example (``python -m examples.translation.train_translation``): sacreBLEU, sentencepiece, the
splits and a short training run with two seeds. Its Bible reader is tested in ``test_example_common.py``."""

import json

import pytest
import torch

from examples.translation import text, train_translation


def test_bleu_is_sacrebleu_on_detokenised_text():
    bleu = text.bleu
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


def test_subword_tokenizer_round_trip():
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


def test_splits_are_disjoint_and_fixed():
    tt = train_translation
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


def test_training_run_on_synthetic_pairs(tmp_path):
    out = tmp_path / "run"
    results = train_translation.main(
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


@pytest.mark.slow
def test_hugging_face_marian_experts(tmp_path):
    """``--expert-model hf-marian``: random-init MarianMTModel experts, a CoE called with Hugging Face keyword batches
    (labels with -100 at the padding), pycoe's default per-sample token loss, decoding with ``generate``."""
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--max-pairs", "120", "--val-size", "12", "--test-size", "16", "--experts", "2"]
    args += ["--universal-epochs", "1", "--joint-epochs", "1", "--batch-size", "32", "--d-model", "16", "--layers"]
    args += ["1", "--seeds", "0", "--threads", "1", "--expert-model", "hf-marian", "--out-dir", str(out)]
    results = train_translation.main(args)
    assert results["expert_model"] == "hf-marian" and results["config"]["expert_model"] == "hf-marian"
    (run,) = results["runs"]
    assert sum(run["expert_load_test"]) == 16 and sum(run["expert_load_val"]) == 12
    for key in ("bleu_single_expert_test", "bleu_coe_test", "bleu_oracle_pool_test", "bleu_coe_val"):
        assert 0.0 <= run[key] <= 100.0
    assert 0.0 <= run["agreement_per_joint_epoch"][0] <= 1.0


def test_hugging_face_batch_and_loss_agree_with_the_example_loss():
    """The Hugging Face batch's labels mark padding with -100, and CoELoss's default per-sample loss on a CoE of
    Marian experts equals the example's own sentence loss (mean token cross-entropy over the real tokens)."""
    import pycoe
    from examples.translation.models import BagOfEmbeddings, marian_expert

    tt = train_translation
    torch.manual_seed(0)
    src = text.pad_batch([[5, 6, 7], [8, 9]])
    tgt = text.pad_batch([[10, 11], [12, 13, 14, 15]], bos=True, eos=True)
    batch = tt.hf_batch(src, tgt[:, :-1], tgt[:, 1:])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[10, 11, text.EOS, -100, -100], [12, 13, 14, 15, text.EOS]]
    experts = pycoe.ExpertPool([marian_expert(20, 30, d_model=16, layers=1, ff=32) for _ in range(2)])
    delegator = pycoe.Delegator(BagOfEmbeddings(20, 8), num_experts=2, feature_dim=8)
    coe = pycoe.CoE(delegator, experts, delegator_inputs=["input_ids", "attention_mask"])
    out = coe(**batch)
    assert out.expert_outputs.shape == (2, 2, 5, 30) and torch.equal(out.labels, batch["labels"])
    criterion = pycoe.CoELoss(pycoe.BalancedTransportWeighter(2), pycoe.LabelGenerator(), rough_weight=0.0)
    want = torch.stack([tt.sentence_loss(out.expert_outputs[k], tgt[:, 1:]) for k in range(2)], dim=1)
    torch.testing.assert_close(criterion.per_sample_losses(out.expert_outputs, out.labels), want)
    loss, _ = criterion(out)
    loss.backward()
    assert all(p.grad is not None for p in experts[0].parameters() if p.requires_grad)
