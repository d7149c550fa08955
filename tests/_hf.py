"""Tiny random-init Hugging Face models and padded text batches for the tests (no download: configs only)."""

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB, HIDDEN, LABELS, PAD = 40, 16, 3, 0


def bert_config(**overrides) -> BertConfig:
    options = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=LABELS,
        pad_token_id=PAD,
        hidden_dropout_prob=0.0,  # deterministic in training mode: padding invariance is tested there too
        attention_probs_dropout_prob=0.0,
    )
    options.update(overrides)
    return BertConfig(**options)


def bert_classifier(**overrides) -> BertForSequenceClassification:
    return BertForSequenceClassification(bert_config(**overrides)).eval()


def bert_tagger(**overrides) -> BertForTokenClassification:
    return BertForTokenClassification(bert_config(**overrides)).eval()


def bert_encoder(**overrides) -> BertModel:
    return BertModel(bert_config(**overrides)).eval()


def roberta_classifier() -> RobertaForSequenceClassification:
    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        num_labels=LABELS,
        pad_token_id=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return RobertaForSequenceClassification(config).eval()


def t5_seq2seq() -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=PAD,
        decoder_start_token_id=PAD,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config).eval()


def gpt2_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=1,
        n_head=2,
        n_positions=32,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def gpt2_lm() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(gpt2_config()).eval()


def gpt2_encoder() -> GPT2Model:
    return GPT2Model(gpt2_config()).eval()


def sentences(n: int, generator: torch.Generator, low: int = 2, high: int = 9) -> list[list[int]]:
    """``n`` token sequences of random lengths in ``[low, high)``, tokens in ``[2, VOCAB)`` (0 pads, 1 ends)."""
    lengths = torch.randint(low, high, (n,), generator=generator).tolist()
    return [torch.randint(2, VOCAB, (length,), generator=generator).tolist() for length in lengths]


def pad(rows: list[list[int]], length: int, value: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``LongTensor[B, length]`` and its attention mask."""
    ids = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask
