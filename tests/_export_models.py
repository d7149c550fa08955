"""Small models with known routing for the export and compile tests (BatchNorm to fold, spread routing, exits)."""

from __future__ import annotations

import torch
from torch import nn

from pycoe.coe import CoE, CoEOutput, Delegator, ExpertPool

K = 3
RES = 12


def conv_net(classes: int = 10, width: int = 6) -> nn.Sequential:
    """A small CNN with BatchNorm (foldable into the convolutions)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, stride=2),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


def randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so that folding them is tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)


def spread_heads(delegator: Delegator, scale: float = 2.0) -> None:
    """Heads on standardised features: the argmax expert and the confidence vary from sample to sample."""
    with torch.no_grad():
        features = delegator.features(torch.randn(256, 3, RES, RES))
        mean, std = features.mean(0), features.std(0) + 1e-6
        for head in (delegator.selection_head, delegator.rough_head):
            weight = torch.randn(head.out_features, features.shape[1]) / std * scale
            head.weight.copy_(weight)
            head.bias.copy_(-(weight @ mean))


def make_coe(exit_threshold: float | None = 0.5) -> CoE:
    delegator = Delegator(conv_net(), num_experts=K, num_classes=10, classifier="8", zero_init_selection=False)
    model = CoE(delegator, ExpertPool.from_template(conv_net(), K, init="reinit"))
    randomise_batchnorm(model)
    model.eval()
    spread_heads(delegator)
    if exit_threshold is not None:
        # the median confidence of a calibration batch: about half of the samples exit
        with torch.no_grad():
            conf = model(torch.randn(256, 3, RES, RES), exit_threshold=None).confidence
        model.exit_threshold = float(conf.median())
    return model


class SamplePool:
    """Inputs with known routing, to build batches of a given exit / expert pattern."""

    def __init__(self, model: CoE, n: int = 512) -> None:
        self.x = torch.randn(n, 3, RES, RES)
        with torch.no_grad():
            out = model(self.x)
        self.exited = out.exited
        self.expert = out.expert_index

    def batch(self, pattern: str, size: int) -> torch.Tensor:
        if pattern == "mixed":
            rows = torch.arange(size)
        elif pattern == "all_exit":
            rows = self.exited.nonzero().squeeze(1)[:size]
        elif pattern == "none_exit":
            rows = (~self.exited).nonzero().squeeze(1)[:size]
        elif pattern == "one_expert":  # expert 0 and exits only: experts 1.. receive no sample
            rows = ((self.expert == 0) | self.exited).nonzero().squeeze(1)[:size]
        else:
            raise AssertionError(pattern)
        assert rows.numel() == size, f"the sample pool has too few samples of pattern {pattern!r}"
        return self.x[rows]


def spread_coe_and_pool() -> tuple[CoE, SamplePool]:
    """A CoE whose samples spread over early exit and every expert, with its sample pool."""
    torch.manual_seed(0)
    model = make_coe()
    pool = SamplePool(model)
    counts = torch.bincount(pool.expert + 1, minlength=K + 1)
    assert counts.min() > 20, f"the test CoE must spread its samples over exit and every expert, got {counts}"
    return model, pool


def assert_same_coe_output(got: CoEOutput, ref: CoEOutput) -> None:
    assert isinstance(got, CoEOutput)
    torch.testing.assert_close(got.output, ref.output, rtol=1e-4, atol=1e-4)  # BatchNorm folding rounds
    assert torch.equal(got.expert_index, ref.expert_index)
    assert torch.equal(got.exited, ref.exited)
    torch.testing.assert_close(got.confidence, ref.confidence, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- Hugging Face models
# Tiny random-init configurations (no download): one layer, width 16, a vocabulary of 60 shared by the delegator
# and the experts. transformers is imported inside the builders, so the vision tests do not need it.
VOCAB, TEXT_CLASSES, TEXT_K = 60, 3, 2


def hf_expert(kind: str, attn_implementation: str = "sdpa") -> nn.Module:
    """A tiny Hugging Face model of ``kind``: ``bert`` classifies sequences (logits ``[B, 3]``), ``gpt2`` is a
    causal LM, ``bart`` / ``marian`` / ``t5`` are encoder-decoder LMs (logits ``[B, T, V]``)."""
    import transformers as hf

    small = {"vocab_size": VOCAB, "attn_implementation": attn_implementation}
    seq2seq = {
        "d_model": 16,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
        "decoder_ffn_dim": 32,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "decoder_start_token_id": 0,
    }
    if kind == "bert":
        config = hf.BertConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            num_labels=TEXT_CLASSES,
            **small,
        )
        return hf.BertForSequenceClassification(config).eval()
    if kind == "gpt2":
        return hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=64, **small)).eval()
    if kind == "bart":
        return hf.BartForConditionalGeneration(hf.BartConfig(**seq2seq, **small)).eval()
    if kind == "marian":
        return hf.MarianMTModel(hf.MarianConfig(**seq2seq, **small)).eval()
    if kind == "t5":
        config = hf.T5Config(
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            pad_token_id=0,
            decoder_start_token_id=0,
            **small,
        )
        return hf.T5ForConditionalGeneration(config).eval()
    raise AssertionError(kind)


def text_batch(b: int, length: int, padded: bool = True, decoder: int | None = None) -> dict[str, torch.Tensor]:
    """A tokenizer-like batch: ``input_ids`` (0 is padding) and ``attention_mask``, with random real lengths from 1
    to ``length`` when ``padded``; ``decoder_input_ids`` of length ``decoder`` for an encoder-decoder."""
    ids = torch.randint(1, VOCAB, (b, length))
    mask = torch.ones(b, length, dtype=torch.long)
    if padded:
        real = torch.randint(1, length + 1, (b,))
        mask = (torch.arange(length) < real[:, None]).long()
        ids = ids * mask
    batch = {"input_ids": ids, "attention_mask": mask}
    if decoder is not None:
        batch["decoder_input_ids"] = torch.randint(1, VOCAB, (b, decoder))
    return batch


def hf_coe(kind: str, attn_implementation: str = "sdpa") -> CoE:
    """A CoE of ``TEXT_K`` tiny ``kind`` experts with a text delegator (a BERT encoder, mean-pooled over the real
    tokens; for GPT-2 experts a GPT-2 body, pooled at the last real token), eval mode. Its selection spreads the
    samples over the experts; a classification CoE has a rough head and exits about half of the samples."""
    import transformers as hf

    classify = kind == "bert"
    if kind == "gpt2":
        backbone = hf.GPT2Model(hf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64))
        pooling = "last"
    else:
        config = hf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
        backbone, pooling = hf.BertModel(config), "mean"
    delegator = Delegator(
        backbone,
        num_experts=TEXT_K,
        num_classes=TEXT_CLASSES if classify else None,
        zero_init_selection=False,
        pooling=pooling,
    )
    experts = ExpertPool([hf_expert(kind, attn_implementation) for _ in range(TEXT_K)])
    model = CoE(delegator, experts, delegator_inputs=["input_ids", "attention_mask"]).eval()
    calibration = text_batch(256, 12)
    with torch.no_grad():
        features = delegator.features(**calibration)
        mean, std = features.mean(0), features.std(0) + 1e-6
        for head in (delegator.selection_head, delegator.rough_head):
            if head is not None:
                weight = torch.randn(head.out_features, features.shape[1]) / std * 2.0
                head.weight.copy_(weight)
                head.bias.copy_(-(weight @ mean))
        if classify:
            model.exit_threshold = float(model(**calibration, exit_threshold=None).confidence.median())
    return model


def text_cases(kind: str) -> list[dict[str, torch.Tensor]]:
    """Batches of 1, 5 and 33 samples, of several lengths, padded and not (an encoder-decoder gets decoder inputs
    of another length)."""
    seq2seq = kind in ("bart", "marian", "t5")
    cases = []
    for b, length in [(1, 3), (1, 12), (5, 2), (5, 17), (33, 9), (33, 40)]:
        for padded in (False, True):
            cases.append(text_batch(b, length, padded, decoder=length // 2 + 2 if seq2seq else None))
    return cases


def example_text_batch(kind: str) -> dict[str, torch.Tensor]:
    return text_batch(4, 10, decoder=7 if kind in ("bart", "marian", "t5") else None)
