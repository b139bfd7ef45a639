"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017), written to read like the
paper, with fastattn's fused ops as switchable layers.

- Inputs: token embeddings scaled by ``sqrt(d_model)`` plus sinusoidal positions, then dropout (section 3.4-3.5).
- Encoder layer: self-attention and a feed-forward network, each as ``LayerNorm(x + Dropout(Sublayer(x)))``
  (post-norm Add & Norm, section 3.1 and 5.4).
- Decoder layer: masked self-attention (position ``i`` sees ``<= i``), encoder-decoder attention over the encoder
  output, feed-forward; each with Add & Norm.
- Padding masks are bool ``(B, L)``, True = padding, as in ``torch.nn.Transformer``.
- Packed batches (no padding at all): ``forward(src, tgt, cu_seqlens_src=..., cu_seqlens_tgt=..., max_seqlen_src=...,
  max_seqlen_tgt=...)`` with ``src (T_src,)`` and ``tgt (T_tgt,)`` the sequences' tokens back to back and int32
  ``(N + 1,)`` offsets; every attention layer runs on the packed rows (``fastattn.varlen_attn`` fused), positions
  restart at each sequence, and the logits are ``(T_tgt, tgt_vocab)``: the padded batch's at its real positions.
- ``generate(src, max_len)``: greedy decoding that keeps each decoder layer's keys and values, so each step runs
  the decoder on one new token (self-attention with ``Lq = 1`` against the cache, lower-right causal) and the
  encoder-decoder attention reuses the memory's keys and values. Fused, the cache is preallocated for ``max_len``
  positions and each step runs ``fastattn.attention_with_kvcache``; eager, the keys are concatenated.

``fused=True`` builds the layers from ``fastattn.nn.LayerNorm`` (one kernel for dropout + add + LayerNorm) and
:class:`~fastattn.models.layers.FusedMultiHeadAttention`; ``fused=False`` from ``torch.nn.LayerNorm`` and
:class:`~fastattn.models.layers.MultiHeadAttention`. Both have the same parameters and ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

import fastattn.nn as fnn
from fastattn.models.layers import (
    FeedForward,
    FusedMultiHeadAttention,
    MultiHeadAttention,
    Varlen,
    packed_positions,
    sinusoidal_positions,
)
from fastattn.nn import add_norm


class _PostNormLayer(nn.Module):
    """Post-norm sublayers, each ``norm(x + dropout(sublayer(x)))``: the attentions named in ``ATTENTION``, then the
    feed-forward, with ``norm1``, ``norm2``, ... in that order."""

    ATTENTION: tuple[str, ...] = ()

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.1, attn_dropout: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 attn_layer: Callable[..., nn.Module] = MultiHeadAttention) -> None:
        super().__init__()
        for i, name in enumerate(self.ATTENTION, 1):
            self.add_module(name, attn_layer(d_model, num_heads, dropout=attn_dropout))
            self.add_module(f"norm{i}", norm_layer(d_model))
        self.ff = FeedForward(d_model, d_ff, activation=nn.ReLU)
        self.add_module(f"norm{len(self.ATTENTION) + 1}", norm_layer(d_model))
        self.dropout = nn.Dropout(dropout)


class EncoderLayer(_PostNormLayer):
    """Self-attention, then feed-forward; each ``norm(x + dropout(sublayer(x)))``."""

    ATTENTION = ("self_attn",)

    def forward(self, x: Tensor, mask: Tensor | None = None, *, varlen: Varlen | None = None) -> Tensor:
        x = add_norm(self.norm1, self.self_attn(x, mask=mask, varlen=varlen), x, self.dropout)   # (B, S, d_model)
        return add_norm(self.norm2, self.ff(x), x, self.dropout)


class DecoderLayer(_PostNormLayer):
    """Masked self-attention, encoder-decoder attention, feed-forward; each ``norm(x + dropout(sublayer(x)))``."""

    ATTENTION = ("self_attn", "cross_attn")

    def forward(self, x: Tensor, memory: Tensor, self_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                cache: dict | None = None, *, varlen_self: Varlen | None = None,
                varlen_cross: Varlen | None = None) -> Tensor:
        """``self_mask=None`` means causal; otherwise it is the whole bool self-attention mask (True = attend).
        ``varlen_self`` / ``varlen_cross``: packed rows (the targets' offsets; the targets' against the sources')."""
        causal = self_mask is None
        sa = self.self_attn(x, mask=self_mask, is_causal=causal, cache=None if cache is None else cache["self"],
                            varlen=varlen_self)
        x = add_norm(self.norm1, sa, x, self.dropout)                               # (B, T, d_model)
        ca = self.cross_attn(x, memory, mask=memory_mask, cache=None if cache is None else cache["cross"],
                             varlen=varlen_cross)
        x = add_norm(self.norm2, ca, x, self.dropout)
        return add_norm(self.norm3, self.ff(x), x, self.dropout)


class Transformer(nn.Module):
    """Encoder-decoder Transformer (base model: ``d_model=512, num_heads=8, 6 + 6 layers, d_ff=2048``).

    ``forward(src, tgt, src_padding_mask=None, tgt_padding_mask=None)`` returns the next-token logits
    ``(B, T, tgt_vocab)`` for every target position (teacher forcing: ``tgt`` starts with BOS).
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int = 512, num_heads: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, d_ff: int = 2048, dropout: float = 0.1,
                 attn_dropout: float = 0.0, max_len: int = 1024, fused: bool = True,
                 norm_layer: Callable[[int], nn.Module] | None = None,
                 attn_layer: Callable[..., nn.Module] | None = None,
                 encoder_layer: Callable[..., nn.Module] = EncoderLayer,
                 decoder_layer: Callable[..., nn.Module] = DecoderLayer) -> None:
        super().__init__()
        norm_layer = norm_layer or (fnn.LayerNorm if fused else nn.LayerNorm)
        attn_layer = attn_layer or (FusedMultiHeadAttention if fused else MultiHeadAttention)
        self.d_model = d_model
        self.src_embed = nn.Embedding(src_vocab, d_model)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model)
        self.register_buffer("pos_encoding", sinusoidal_positions(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        layer_args = (d_model, num_heads, d_ff, dropout, attn_dropout, norm_layer, attn_layer)
        self.encoder = nn.ModuleList([encoder_layer(*layer_args) for _ in range(num_encoder_layers)])
        self.decoder = nn.ModuleList([decoder_layer(*layer_args) for _ in range(num_decoder_layers)])
        self.generator = nn.Linear(d_model, tgt_vocab)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def embed(self, tokens: Tensor, table: nn.Embedding, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """``(B, L)`` tokens at positions ``offset ...``, or packed ``(T,)`` tokens at their ``positions``."""
        if positions is None:
            positions = torch.arange(offset, offset + tokens.size(1), device=tokens.device)
        pe = self.pos_encoding[positions].to(table.weight.dtype)
        return self.dropout(table(tokens) * math.sqrt(self.d_model) + pe)            # (B, L, d_model) or (T, ...)

    @staticmethod
    def padding_to_attend(padding_mask: Tensor | None) -> Tensor | None:
        """(B, S) bool, True = padding -> (B, 1, 1, S) bool, True = may attend."""
        return None if padding_mask is None else ~padding_mask[:, None, None, :]

    def encode(self, src: Tensor, src_padding_mask: Tensor | None = None, *, varlen: Varlen | None = None) -> Tensor:
        positions = packed_positions(varlen.cu_q, src.size(0)) if varlen is not None else None
        x = self.embed(src, self.src_embed, positions=positions)
        mask = self.padding_to_attend(src_padding_mask)
        for layer in self.encoder:
            x = layer(x, mask, varlen=varlen)
        return x                                                                      # (B, S, d_model)

    def decode(self, tgt: Tensor, memory: Tensor, src_padding_mask: Tensor | None = None,
               tgt_padding_mask: Tensor | None = None, *, varlen_self: Varlen | None = None,
               varlen_cross: Varlen | None = None) -> Tensor:
        if varlen_self is not None:  # packed: causal per sequence, cross attention within each pair
            x = self.embed(tgt, self.tgt_embed, positions=packed_positions(varlen_self.cu_q, tgt.size(0)))
            for layer in self.decoder:
                x = layer(x, memory, varlen_self=varlen_self, varlen_cross=varlen_cross)
            return self.generator(x)                                                  # (T, tgt_vocab)
        x = self.embed(tgt, self.tgt_embed)
        self_mask = None                                                              # causal
        if tgt_padding_mask is not None:  # causal and not padding, (B, 1, T, T)
            T = tgt.size(1)
            causal = torch.ones(T, T, dtype=torch.bool, device=tgt.device).tril()
            self_mask = causal & self.padding_to_attend(tgt_padding_mask)
        memory_mask = self.padding_to_attend(src_padding_mask)
        for layer in self.decoder:
            x = layer(x, memory, self_mask, memory_mask)
        return self.generator(x)                                                      # (B, T, tgt_vocab)

    def forward(self, src: Tensor, tgt: Tensor, src_padding_mask: Tensor | None = None,
                tgt_padding_mask: Tensor | None = None, *, cu_seqlens_src: Tensor | None = None,
                cu_seqlens_tgt: Tensor | None = None, max_seqlen_src: int | None = None,
                max_seqlen_tgt: int | None = None) -> Tensor:
        """Padded ``(B, S)`` / ``(B, T)`` tokens with padding masks, or packed ``(T_src,)`` / ``(T_tgt,)`` tokens
        with their int32 ``(N + 1,)`` offsets and longest lengths (the module docstring)."""
        if cu_seqlens_src is None and cu_seqlens_tgt is None:
            return self.decode(tgt, self.encode(src, src_padding_mask), src_padding_mask, tgt_padding_mask)
        if (cu_seqlens_src is None or cu_seqlens_tgt is None or max_seqlen_src is None or max_seqlen_tgt is None
                or src_padding_mask is not None or tgt_padding_mask is not None):
            raise ValueError("Transformer: a packed batch takes cu_seqlens_src, cu_seqlens_tgt, max_seqlen_src and "
                             "max_seqlen_tgt together, and no padding masks")
        enc = Varlen(cu_seqlens_src, cu_seqlens_src, max_seqlen_src, max_seqlen_src)
        memory = self.encode(src, varlen=enc)                                         # (T_src, d_model)
        return self.decode(tgt, memory, varlen_self=Varlen(cu_seqlens_tgt, cu_seqlens_tgt, max_seqlen_tgt,
                                                           max_seqlen_tgt),
                           varlen_cross=Varlen(cu_seqlens_tgt, cu_seqlens_src, max_seqlen_tgt, max_seqlen_src))

    @torch.no_grad()
    def generate(self, src: Tensor, max_len: int, bos_id: int = 1, eos_id: int | None = None,
                 src_padding_mask: Tensor | None = None) -> Tensor:
        """Greedy decoding: ``(B, <= max_len)`` tokens starting with ``bos_id``.

        Each step embeds only the newest token and runs the decoder layers on it with their key/value caches.
        With ``eos_id``, a sequence that has produced it keeps producing it, and decoding stops once all have.
        """
        B = src.size(0)
        memory = self.encode(src, src_padding_mask)
        memory_mask = self.padding_to_attend(src_padding_mask)
        caches = [{"self": layer.self_attn.init_cache(max_len) if hasattr(layer.self_attn, "init_cache") else {},
                   "cross": {}} for layer in self.decoder]
        ys = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for step in range(max_len - 1):
            x = self.embed(ys[:, -1:], self.tgt_embed, offset=step)                   # (B, 1, d_model)
            for layer, cache in zip(self.decoder, caches):
                x = layer(x, memory, None, memory_mask, cache=cache)
            nxt = self.generator(x[:, -1]).argmax(-1)                                 # (B,)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            ys = torch.cat([ys, nxt[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return ys
