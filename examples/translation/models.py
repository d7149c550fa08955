"""The translation example's networks: a small Transformer expert (or a Hugging Face ``MarianMTModel``) and a
bag-of-embeddings delegator backbone.

Legend: b batch, s source length, t target length, d model width, v vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from examples.translation.text import BOS, EOS, PAD


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal position encodings added to [b, t, d] embeddings."""

    def __init__(self, d_model: int, max_len: int = 512):
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[: x.shape[1]]


class Seq2SeqTransformer(nn.Module):
    """An encoder-decoder Transformer: ``forward(src [b, s], tgt_in [b, t]) -> logits [b, t, v]``."""

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        d_model: int = 128,
        heads: int = 4,
        layers: int = 2,
        ff: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.d_model = d_model
        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model, padding_idx=PAD)
        self.pos = PositionalEncoding(d_model)
        self.transformer = nn.Transformer(d_model, heads, layers, layers, ff, dropout, batch_first=True)
        self.out = nn.Linear(d_model, tgt_vocab)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = src == PAD
        memory = self.transformer.encoder(
            self.pos(self.src_embed(src) * math.sqrt(self.d_model)), src_key_padding_mask=mask
        )
        return memory, mask

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        t = tgt_in.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tgt_in.device), diagonal=1)
        h = self.transformer.decoder(
            self.pos(self.tgt_embed(tgt_in) * math.sqrt(self.d_model)),
            memory,
            tgt_mask=causal,
            tgt_key_padding_mask=tgt_in == PAD,
            memory_key_padding_mask=src_mask,
        )
        return self.out(h)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, mask = self.encode(src)
        return self.decode(tgt_in, memory, mask)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int) -> torch.Tensor:
        """Greedy decoding: LongTensor[b, <= max_len] of target ids (without BOS)."""
        memory, mask = self.encode(src)
        ys = torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            nxt = self.decode(ys, memory, mask)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            ys = torch.cat([ys, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if bool(done.all()):
                break
        return ys[:, 1:]


class BagOfEmbeddings(nn.Module):
    """The delegator's backbone: mean of the source token embeddings, then an MLP: [b, s] -> [b, d].

    ``forward(input_ids, attention_mask=None)``: called with the source positionally, or with the keyword inputs
    of a Hugging Face batch; padding is the ``PAD`` id, or ``attention_mask == 0`` when a mask is given.
    """

    def __init__(self, vocab: int, d_model: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model, padding_idx=PAD)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU())
        self.out_features = d_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = (input_ids != PAD) if attention_mask is None else attention_mask != 0
        weight = keep.unsqueeze(-1).float()
        mean = (self.embed(input_ids) * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        return self.mlp(mean)


def marian_expert(
    src_vocab: int, tgt_vocab: int, d_model: int = 128, layers: int = 2, heads: int = 4, ff: int = 256
) -> nn.Module:
    """A small random-init Hugging Face ``MarianMTModel`` (``transformers``' initialisation of a ``MarianConfig``;
    no download): its own source and target vocabularies (``share_encoder_decoder_embeddings=False``), the
    example's special ids (``PAD``, ``BOS`` as the decoder's start, ``EOS``), ``layers`` encoder and decoder layers.
    Called ``model(input_ids=..., attention_mask=..., decoder_input_ids=...)``, it returns ``logits [b, t, v]``."""
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(
        vocab_size=src_vocab,
        decoder_vocab_size=tgt_vocab,
        share_encoder_decoder_embeddings=False,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ff,
        decoder_ffn_dim=ff,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
    )
    return MarianMTModel(config)


@torch.no_grad()
def hf_greedy(model: nn.Module, src: torch.Tensor, max_len: int) -> torch.Tensor:
    """Greedy decoding with a Hugging Face seq2seq model's ``generate``: LongTensor[b, <= max_len] (without BOS)."""
    out = model.generate(  # type: ignore[operator]
        input_ids=src, attention_mask=(src != PAD).long(), max_new_tokens=max_len, do_sample=False, num_beams=1
    )
    return out[:, 1:]  # the decoder's start token
