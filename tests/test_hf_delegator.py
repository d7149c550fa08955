"""Delegator from Hugging Face models: features from ModelOutputs, pooling with the attention mask, classifiers
found and stripped (BERT's, RoBERTa's and GPT-2's heads), reuse_classifier, feature_dim from the config."""

import pytest
import torch
from _hf import (
    HIDDEN,
    LABELS,
    VOCAB,
    bert_classifier,
    bert_config,
    bert_encoder,
    bert_tagger,
    gpt2_config,
    gpt2_encoder,
    pad,
    roberta_classifier,
    sentences,
)
from transformers import BertModel, GPT2ForSequenceClassification

from pycoe import Delegator


def _batch(length: int, seed: int = 0, n: int = 4) -> dict:
    rows = sentences(n, torch.Generator().manual_seed(seed))
    ids, mask = pad(rows, length)
    return {"input_ids": ids, "attention_mask": mask}


def _features_at(delegator: Delegator, length: int) -> torch.Tensor:
    with torch.no_grad():
        return delegator.eval().features(**_batch(length))


@pytest.mark.parametrize("pooling", ["auto", "pooler", "cls", "mean", "last"])
def test_bert_model_features_by_pooling(pooling):
    backbone = bert_encoder()
    delegator = Delegator(backbone, 3, pooling=pooling)
    assert delegator.feature_dim == HIDDEN and delegator.classifier_path is None  # from config.hidden_size
    batch = _batch(12)
    with torch.no_grad():
        out = backbone(**batch)
        hidden, mask = out.last_hidden_state, batch["attention_mask"]
        lengths = mask.sum(1)
        expected = {
            "auto": out.pooler_output,
            "pooler": out.pooler_output,
            "cls": hidden[:, 0],
            "mean": torch.stack([hidden[i, : lengths[i]].mean(0) for i in range(4)]),
            "last": torch.stack([hidden[i, lengths[i] - 1] for i in range(4)]),
        }[pooling]
        torch.testing.assert_close(delegator.features(**batch), expected)
    # padding never changes the features
    torch.testing.assert_close(_features_at(delegator, 9), _features_at(delegator, 20), rtol=1e-4, atol=1e-5)


def test_without_a_pooler_auto_is_the_masked_mean_of_the_hidden_states():
    backbone = BertModel(bert_config(), add_pooling_layer=False).eval()
    delegator = Delegator(backbone, 2)
    batch = _batch(11)
    with torch.no_grad():
        hidden = backbone(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        torch.testing.assert_close(delegator.features(**batch), (hidden * mask).sum(1) / mask.sum(1))
    torch.testing.assert_close(_features_at(delegator, 9), _features_at(delegator, 16), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"pooling='pooler' takes .* from pooler_output.*fields 'last_hidden_state'"):
        Delegator(BertModel(bert_config(), add_pooling_layer=False), 2, pooling="pooler")(**batch)


def test_sequence_classifiers_are_stripped_and_reused():
    """BERT's classifier (a Linear), RoBERTa's head (dense, dropout, out_proj: its out_proj) and GPT-2's score."""
    for make, path in ((bert_classifier, "classifier"), (roberta_classifier, "classifier.out_proj")):
        original = make()
        batch = _batch(10)
        if path.endswith("out_proj"):
            batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 1)  # RoBERTa pads with 1
        with torch.no_grad():
            logits = original(**batch).logits
        delegator = Delegator(original, 2, reuse_classifier=True).eval()
        assert delegator.classifier_path == path and delegator.num_classes == LABELS
        assert delegator.feature_dim == HIDDEN
        with torch.no_grad():
            torch.testing.assert_close(delegator(**batch).rough_logits, logits)  # the same head on the same features
        assert Delegator(make(), 2, num_classes=5).rough_head.out_features == 5

    config = gpt2_config()
    config.num_labels = LABELS
    gpt2 = GPT2ForSequenceClassification(config).eval()
    batch = _batch(10)
    with torch.no_grad():
        logits = gpt2(**batch).logits
    delegator = Delegator(gpt2, 2, reuse_classifier=True).eval()
    assert delegator.classifier_path == "score"
    with torch.no_grad():
        torch.testing.assert_close(delegator(**batch).rough_logits, logits)
    torch.testing.assert_close(_features_at(delegator, 10), _features_at(delegator, 17), rtol=1e-4, atol=1e-5)


def test_token_classifier_is_stripped_and_its_token_features_pooled():
    tagger = bert_tagger()
    delegator = Delegator(tagger, 2, num_classes=4)
    assert delegator.classifier_path == "classifier"
    batch = _batch(10)
    with torch.no_grad():
        hidden = tagger.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        torch.testing.assert_close(delegator.eval().features(**batch), (hidden * mask).sum(1) / mask.sum(1))


def test_gpt2_last_token_pooling_is_padding_invariant():
    delegator = Delegator(gpt2_encoder(), 2, pooling="last")
    assert delegator.feature_dim == HIDDEN  # from config.n_embd
    torch.testing.assert_close(_features_at(delegator, 9), _features_at(delegator, 25), rtol=1e-4, atol=1e-5)


def test_example_input_as_keyword_inputs_and_tuple_outputs():
    batch = _batch(8)
    delegator = Delegator(bert_encoder(), 2, example_input=batch, pooling="mean")
    assert delegator.feature_dim == HIDDEN
    # a model called with return_dict=False returns a tuple: element 0 (the hidden states) is pooled
    backbone = BertModel(bert_config(return_dict=False), add_pooling_layer=False).eval()
    delegator = Delegator(backbone, 2, example_input=batch)
    with torch.no_grad():
        hidden = backbone(**batch)[0]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(delegator.eval().features(**batch), (hidden * mask).sum(1) / mask.sum(1))
    with pytest.raises(ValueError, match="example_input: the backbone failed on it"):
        Delegator(bert_encoder(), 2, example_input={"input_ids": torch.full((2, 3), VOCAB + 5)})


def test_bad_pooling_and_mask():
    with pytest.raises(ValueError, match="pooling must be one of"):
        Delegator(bert_encoder(), 2, pooling="max")
    with pytest.raises(ValueError, match="pooling='pooler' needs a backbone whose output has pooler_output"):
        Delegator(torch.nn.Linear(4, 8), 2, feature_dim=8, classifier=None, pooling="pooler")(torch.randn(3, 4))

    class IgnoresMask(torch.nn.Module):  # the mask the delegator pools with must fit the hidden states
        def __init__(self):
            super().__init__()
            self.inner = BertModel(bert_config(), add_pooling_layer=False)

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids)

    batch = _batch(8)
    delegator = Delegator(IgnoresMask(), 2, feature_dim=HIDDEN)
    with pytest.raises(ValueError, match=r"attention_mask must be a Tensor\[B, T\] matching the backbone's hidden"):
        delegator(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, :5])
