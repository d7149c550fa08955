"""A CoE of Hugging Face models, called the way their users call them: model(**batch) with a padded batch.

Tiny random-init configs (no download): a BERT encoder classifying sequences, a T5 encoder-decoder and a GPT-2
decoder as experts. Each: a training step with model(**batch) and CoELoss (the labels come with the batch), the
per-sample losses against Hugging Face's own loss of each sample, eval routing against a per-sample reference,
and padding that changes neither the routing nor the outputs.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from _hf import (
    PAD,
    bert_classifier,
    bert_encoder,
    gpt2_encoder,
    gpt2_lm,
    pad,
    sentences,
    t5_seq2seq,
)
from torch import nn
from transformers import T5EncoderModel

from pycoe import BalancedTransportWeighter, CoE, CoELoss, Delegator, ExpertPool, LabelGenerator
from pycoe.functional import per_sample_cross_entropy

K, B = 3, 5


@dataclass
class Case:
    """One architecture: how to build the CoE, a padded batch of the same samples at any length, the per-sample
    loss, and how many positions of the output are real at a given padding (None: one output per sample)."""

    name: str
    build: Callable[[], CoE]
    batch: Callable[[dict, int], dict]
    per_sample_loss: Callable | None
    positions: Callable[[dict], int | None]


def _bert_coe() -> CoE:
    experts = ExpertPool.from_template(bert_classifier(), K, init="reinit")
    delegator = Delegator(bert_encoder(), K, num_classes=3, zero_init_selection=False)
    return CoE(delegator, experts)


def _bert_batch(data: dict, length: int) -> dict:
    ids, mask = pad(data["source"], length)
    return {"input_ids": ids, "attention_mask": mask, "labels": data["label"]}


def _t5_coe() -> CoE:
    template = t5_seq2seq()
    experts = ExpertPool.from_template(template, K, init="reinit")
    delegator = Delegator(T5EncoderModel(template.config).eval(), K, zero_init_selection=False)
    return CoE(delegator, experts, delegator_inputs=["input_ids", "attention_mask"])


def _t5_batch(data: dict, length: int) -> dict:
    ids, mask = pad(data["source"], length)
    labels, label_mask = pad(data["target"], length, value=-100)
    # labels never reach the experts, so the batch carries the decoder's inputs (as DataCollatorForSeq2Seq makes them
    # with the model's prepare_decoder_input_ids_from_labels): the labels shifted right after the start token
    decoder_ids = torch.cat([torch.full_like(labels[:, :1], PAD), labels[:, :-1]], dim=1).masked_fill_(
        labels.roll(1, dims=1) == -100, PAD
    )
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "decoder_input_ids": decoder_ids,
        "decoder_attention_mask": label_mask,
        "labels": labels,
    }


def _gpt2_coe() -> CoE:
    experts = ExpertPool.from_template(gpt2_lm(), K, init="reinit")
    delegator = Delegator(gpt2_encoder(), K, pooling="last", zero_init_selection=False)
    return CoE(delegator, experts)


def _gpt2_batch(data: dict, length: int) -> dict:
    ids, mask = pad(data["source"], length)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


CASES = [
    Case("bert-sequence-classification", _bert_coe, _bert_batch, None, lambda batch: None),
    Case("t5-seq2seq", _t5_coe, _t5_batch, None, lambda batch: batch["decoder_input_ids"].shape[1]),
    Case(
        "gpt2-causal-lm",
        _gpt2_coe,
        _gpt2_batch,
        functools.partial(per_sample_cross_entropy, shift=True),
        lambda batch: batch["input_ids"].shape[1],
    ),
]


def _data(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "source": sentences(B, gen),
        "target": sentences(B, gen),
        "label": torch.randint(0, 3, (B,), generator=gen),
    }


def _without_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _real_length(data: dict) -> int:
    return max(len(s) for s in data["source"] + data["target"])


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request) -> Case:
    return request.param


def test_train_step_with_the_batch_as_it_comes(case):
    """model(**batch) in training: labels go to the loss (CoETrainOutput.labels), never to an expert; the default
    (or shifted) per-sample loss of each sample equals Hugging Face's own loss of that sample alone."""
    torch.manual_seed(0)
    model = case.build().train()
    data = _data()
    batch = case.batch(data, _real_length(data) + 2)
    out = model(**batch)
    assert out.labels is batch["labels"]
    criterion = CoELoss(BalancedTransportWeighter(K), LabelGenerator(), per_sample_loss=case.per_sample_loss)
    loss, info = criterion(out)
    loss.backward()
    for k, expert in enumerate(model.experts):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters()), f"expert {k}"
    assert model.delegator.selection_head.weight.grad.abs().sum() > 0
    assert model.delegator.backbone.get_input_embeddings().weight.grad.abs().sum() > 0
    # each sample alone, through Hugging Face's loss (it averages over the sample's real tokens, shifting for GPT-2)
    model.eval()
    with torch.no_grad():
        for i in range(B):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            for k in range(K):
                hf_loss = model.experts[k](**one).loss
                torch.testing.assert_close(info["per_sample_losses"][i, k], hf_loss, rtol=1e-4, atol=1e-5)


def test_eval_routing_matches_each_sample_run_alone(case):
    """Routed inference equals, for every sample, its argmax expert run on that sample alone and unpadded."""
    torch.manual_seed(0)
    model = case.build().eval()
    data = _data()
    batch = case.batch(data, _real_length(data) + 3)
    with torch.no_grad():
        out = model(**batch)
        for i in range(B):
            alone = case.batch({key: value[i : i + 1] for key, value in data.items()}, _real_length(data))
            alone = _without_labels(alone)
            real = int(alone["attention_mask"].sum())
            alone = {
                key: (value[:, :real] if key in ("input_ids", "attention_mask") else value)
                for key, value in alone.items()
            }
            selection = model.delegate(**alone).selection_logits
            assert int(out.expert_index[i]) == int(selection.argmax())
            expected = model.experts[int(out.expert_index[i])](**alone).logits[0]
            got = out.output[i] if expected.dim() == 1 else out.output[i, : expected.shape[0]]
            if case.name == "t5-seq2seq":  # the decoder's real positions only
                positions = len(data["target"][i])
                expected, got = expected[:positions], got[:positions]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not out.exited.any() and out.expert_index.shape == (B,)


def test_padding_changes_neither_routing_nor_outputs_nor_losses(case):
    torch.manual_seed(0)
    model = case.build()
    data = _data()
    short, long = case.batch(data, _real_length(data)), case.batch(data, _real_length(data) + 7)
    criterion = CoELoss(BalancedTransportWeighter(K), LabelGenerator(), per_sample_loss=case.per_sample_loss)
    model.eval()
    with torch.no_grad():
        a, b = model(**short), model(**long)
    assert torch.equal(a.expert_index, b.expert_index)
    positions = case.positions(short)
    b_output = b.output if positions is None else b.output[:, :positions]
    if case.name == "t5-seq2seq":  # compare the decoder's real positions
        keep = short["labels"] != -100
        a_output, b_output = a.output[keep], b_output[keep]
    elif positions is not None:
        keep = short["attention_mask"].bool()
        a_output, b_output = a.output[keep], b_output[keep]
    else:
        a_output = a.output
    torch.testing.assert_close(a_output, b_output, rtol=1e-4, atol=1e-5)
    model.train()  # the configs have no dropout: training mode is deterministic too
    _, info_a = criterion(model(**short))
    _, info_b = criterion(model(**long))
    torch.testing.assert_close(info_a["per_sample_losses"], info_b["per_sample_losses"], rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------- the calling convention
def test_positional_keyword_and_mixed_calls_agree():
    torch.manual_seed(0)
    model = _bert_coe().eval()
    data = _data()
    batch = _bert_batch(data, 10)
    with torch.no_grad():
        by_keyword = model(**batch)
        mixed = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        positional = model(batch["input_ids"], batch["attention_mask"])
    for other in (mixed, positional):
        assert torch.equal(other.expert_index, by_keyword.expert_index)
        torch.testing.assert_close(other.output, by_keyword.output)


def test_a_tokenizers_batch_encoding_is_a_batch():
    from transformers import BatchEncoding

    torch.manual_seed(0)
    model = _bert_coe()
    batch = BatchEncoding(_bert_batch(_data(), 10))
    out = model.train()(**batch)
    assert out.expert_outputs.shape == (K, B, 3) and out.labels is batch["labels"]
    assert model.eval()(**batch).output.shape == (B, 3)


def test_the_delegator_sees_the_attention_mask_by_default():
    """By default the delegator receives every input (the mask among them); a subset is chosen by name."""
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = bert_encoder()

        def forward(self, *args, **kwargs):
            seen.append((len(args), sorted(kwargs)))
            return self.inner(*args, **kwargs)

    experts = ExpertPool.from_template(bert_classifier(), 2)
    batch = _bert_batch(_data(), 9)
    CoE(Delegator(Spy(), 2, feature_dim=16), experts).eval()(**batch)
    assert seen[-1] == (0, ["attention_mask", "input_ids"])
    CoE(Delegator(Spy(), 2, feature_dim=16), experts, delegator_inputs=["input_ids"]).eval()(**batch)
    assert seen[-1] == (0, ["input_ids"])
    CoE(Delegator(Spy(), 2, feature_dim=16), experts, delegator_inputs=[0]).eval()(batch["input_ids"])
    assert seen[-1] == (1, [])


# ------------------------------------------------------------------------------------------------ errors
def test_errors_name_what_is_wrong():
    torch.manual_seed(0)
    model = _bert_coe()
    batch = _bert_batch(_data(), 9)
    with pytest.raises(TypeError, match=r"CoE needs a batch.*got input_ids=list"):
        model(input_ids=[[1, 2]], labels=batch["labels"])
    criterion = CoELoss(BalancedTransportWeighter(K), LabelGenerator())
    with pytest.raises(ValueError, match=r"labels has shape \(5, 9\) \(labels per token\), but the experts return"):
        criterion(model.train()(**{**batch, "labels": batch["input_ids"]}))
    # an expert that returns no logits (a base model): the message names output_key and the fields present
    pool = ExpertPool.from_template(bert_encoder(), K)
    with pytest.raises(TypeError, match=r"without 'logits' \(output_key='logits'\); fields present: 'last_hidden"):
        pool(**_without_labels(batch))
    with pytest.raises(TypeError, match=r"delegator_inputs must be None .* got 'input_ids'"):
        CoE(model.delegator, model.experts, delegator_inputs="input_ids")
    with pytest.raises(TypeError, match=r"delegator_inputs must hold positional indices .* got float 1.5"):
        CoE(model.delegator, model.experts, delegator_inputs=[1.5])
    with pytest.raises(ValueError, match=r"delegator_inputs must name at least one input"):
        CoE(model.delegator, model.experts, delegator_inputs=[])
    selective = CoE(model.delegator, model.experts, delegator_inputs=["token_type_ids"])
    with pytest.raises(TypeError, match=r"the delegator \(delegator_inputs=\['token_type_ids'\]\) needs a batch"):
        selective(**batch)


def test_vocabulary_and_class_count_mismatches_between_delegator_and_experts():
    experts = ExpertPool.from_template(bert_classifier(), 2)
    with pytest.raises(ValueError, match=r"vocab_size=50 but experts\[0\] has vocab_size=40"):
        CoE(Delegator(bert_encoder(vocab_size=50), 2), experts)
    CoE(Delegator(bert_encoder(vocab_size=50), 2), experts, delegator_inputs=["other_ids"])  # its own tokens
    model = CoE(Delegator(bert_encoder(), 2, num_classes=5), experts).train()  # 5 rough classes, 3 labels
    batch = _bert_batch(_data(), 9)
    with pytest.raises(ValueError, match=r"the rough head predicts 5 classes but the experts return 3 values.*num_lab"):
        CoELoss(BalancedTransportWeighter(2), LabelGenerator())(model(**batch))


def test_labels_reaching_a_model_that_does_not_take_them():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.EmbeddingBag(40, 3)

        def forward(self, input_ids):
            return self.emb(input_ids)

    pool = ExpertPool([Plain(), Plain()])
    ids = torch.randint(0, 40, (4, 6))
    with pytest.raises(TypeError, match=r"experts\[0\] \(Plain\) does not take the keyword input 'labels': labels"):
        pool(input_ids=ids, labels=torch.zeros(4, dtype=torch.long))
    # through the CoE the labels never reach it
    model = CoE(Delegator(Plain(), 2, feature_dim=3), pool)
    out = model(input_ids=ids, labels=torch.zeros(4, dtype=torch.long))
    assert out.expert_outputs.shape == (2, 4, 3)
    with pytest.raises(TypeError, match=r"does not take the keyword input 'mask'.*delegator_inputs"):
        model(input_ids=ids, mask=torch.ones(4, 6))


def test_early_exit_with_keyword_inputs():
    """Samples whose rough confidence reaches the threshold take the rough logits; the others their expert's."""
    torch.manual_seed(0)
    model = _bert_coe().eval()
    batch = _bert_batch(_data(), 10)
    with torch.no_grad():
        rough = model.delegate(**batch).rough_logits
        confidence = rough.softmax(dim=1).amax(dim=1)
        threshold = float(confidence.median())
        out = model(**batch, exit_threshold=threshold)
        assert torch.equal(out.exited, confidence >= threshold) and 0 < int(out.exited.sum()) < B
        routed = model(**batch, exit_threshold=None)
    torch.testing.assert_close(out.output[out.exited], rough[out.exited])
    torch.testing.assert_close(out.output[~out.exited], routed.output[~out.exited])
    assert torch.equal(out.expert_index[out.exited], torch.full_like(out.expert_index[out.exited], -1))
