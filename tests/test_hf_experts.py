"""ExpertPool with Hugging Face (and timm) models: the prediction taken from their outputs, and re-initialisation
the way their library initialises a new model."""

import pytest
import torch
from _hf import bert_classifier, bert_config, bert_encoder, gpt2_lm, pad, sentences
from torch import nn
from transformers import BertModel

from pycoe import ExpertPool


def _batch(length: int = 8) -> dict:
    ids, mask = pad(sentences(3, torch.Generator().manual_seed(0)), length)
    return {"input_ids": ids, "attention_mask": mask}


def test_output_key_takes_the_prediction_from_a_model_output():
    batch = _batch()
    pool = ExpertPool.from_template(bert_classifier(), 2).eval()
    with torch.no_grad():
        assert torch.equal(pool(**batch)[1], pool[1](**batch).logits)
        hidden = ExpertPool.from_template(bert_encoder(), 2, output_key="last_hidden_state").eval()
        assert torch.equal(hidden(**batch)[0], hidden[0](**batch).last_hidden_state)
        pooled = ExpertPool(list(hidden.experts), output_key=lambda out: out.pooler_output)
        assert pooled(**batch).shape == (2, 3, 16)
        assert pooled.forward_routed(torch.tensor([1, 0, 1]), **batch).shape == (3, 16)
    with pytest.raises(TypeError, match="output_key must be the key of the prediction"):
        ExpertPool([nn.Linear(2, 2)], output_key=3)
    with pytest.raises(TypeError, match=r"expert 0 \(BertModel\): output_key=<lambda> is a NoneType, not a tensor"):
        ExpertPool([BertModel(bert_config(), add_pooling_layer=False)], output_key=lambda out: out.pooler_output)(
            **batch
        )
    tuple_pool = ExpertPool.from_template(bert_classifier(return_dict=False), 2).eval()
    with torch.no_grad():
        assert tuple_pool(**batch).shape == (2, 3, 3)  # element 0 of the tuple (the logits)


def _linear_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear) and m.weight.numel() >= 256]


def test_reinit_of_a_bert_follows_hugging_face_init():
    """HF initialises BERT's Linear and Embedding weights with std config.initializer_range (0.02); PyTorch's
    reset_parameters would give Linear weights of std about 1/sqrt(3 fan_in) (0.14 here) and embeddings of std 1."""
    template = bert_classifier()
    with torch.no_grad():
        for p in template.parameters():
            p.fill_(0.5)  # a template whose values must not survive
    pool = ExpertPool.from_template(template, 2, init="reinit")
    std = bert_config().initializer_range
    for expert in pool:
        for weight in _linear_weights(expert):
            assert 0.75 * std < float(weight.std()) < 1.25 * std
            assert abs(float(weight.mean())) < 0.25 * std
        words = expert.bert.embeddings.word_embeddings.weight.detach()
        assert 0.75 * std < float(words[1:].std()) < 1.25 * std
        assert torch.equal(words[0], torch.zeros_like(words[0]))  # the padding row, as HF leaves it
        norm = expert.bert.embeddings.LayerNorm
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(
            norm.bias, torch.zeros_like(norm.bias)
        )
        linear = expert.classifier
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    assert not torch.equal(pool[0].classifier.weight, pool[1].classifier.weight)  # each expert its own draw


def test_reinit_keeps_tied_weights_tied():
    pool = ExpertPool.from_template(gpt2_lm(), 2, init="reinit")
    for expert in pool:
        assert expert.lm_head.weight.data_ptr() == expert.transformer.wte.weight.data_ptr()
        assert 0.015 < float(expert.transformer.wte.weight.detach().std()) < 0.025


def test_reinit_of_a_timm_resnet_uses_timms_init_weights():
    import timm

    template = timm.create_model("resnet10t", num_classes=3)
    with torch.no_grad():
        for m in template.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(0.5)
    (expert,) = ExpertPool.from_template(template, 1, init="reinit")
    block = expert.layer1[0]
    assert torch.equal(block.bn2.weight, torch.zeros_like(block.bn2.weight))  # timm's zero_init_last
    assert torch.equal(block.bn1.weight, torch.ones_like(block.bn1.weight))  # reset_parameters
    conv = expert.layer2[0].conv1
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(float(conv.weight.detach().std()) / (2.0 / fan_out) ** 0.5 - 1.0) < 0.15  # kaiming_normal, fan_out


def test_reinit_of_plain_modules_is_reset_parameters():
    template = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    with torch.no_grad():
        template[1].weight.fill_(3.0)
    (expert,) = ExpertPool.from_template(template, 1, init="reinit")
    assert torch.equal(expert[1].weight, torch.ones(64))
    bound = 1 / 64**0.5
    assert float(expert[0].weight.detach().abs().max()) <= bound and not torch.equal(
        expert[0].weight, template[0].weight
    )
