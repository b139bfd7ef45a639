"""Layers shared by the reference models.

The fused ops are switchable *layers*: each block is written once against the helpers of :mod:`fastattn.nn`
(``add_norm``, ``add_then_norm``, ``bn_relu``) and runs the fused kernels when its layers are fastattn's and torch's
ops when they are torch's.

- ``MultiHeadAttention`` calls ``torch.nn.functional.scaled_dot_product_attention``; ``FusedMultiHeadAttention``
  (the same module, same parameters) calls ``fastattn.scaled_dot_product_attention``, and when decoding with a cache
  from its ``init_cache`` it writes each step's keys into a preallocated cache with
  ``fastattn.attention_with_kvcache`` instead of concatenating them.
- Both take packed batches: ``forward(x, ..., varlen=Varlen(cu_q, cu_k, max_q, max_k))`` with ``x (T, dim)``, the
  sequences back to back (no padding); each sequence attends to its own keys only, through
  ``fastattn.varlen_attn`` (fused) or its eager reference.

Fused dropout draws its mask inside the kernel from its own random stream, so a fused and an eager model with
dropout > 0 are equal in distribution, not bit for bit; compare them with dropout 0 or in eval mode.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

import fastattn
from fastattn import reference


class Varlen(NamedTuple):
    """Packed sequences for an attention layer: queries ``x[cu_q[b]:cu_q[b + 1]]`` of sequence b attend to keys
    ``context[cu_k[b]:cu_k[b + 1]]`` (int32 ``(N + 1,)`` offsets); ``max_q``/``max_k``: the longest lengths."""

    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int


def packed_positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """Each of ``total`` packed rows' position inside its sequence (``cu_seqlens`` int32 ``(N + 1,)``), computed on
    the device: no host sync."""
    t = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), t, right=True).clamp(max=max(cu_seqlens.numel() - 2, 0))
    return t - cu_seqlens.long()[seq]


class MultiHeadAttention(nn.Module):
    """Multi-head attention: ``h`` heads of ``softmax(Q K^T / sqrt(d_k)) V``, concatenated, then ``W^O``.

    ``forward(x)`` is self-attention; ``forward(x, context)`` attends from ``x`` to ``context`` (encoder-decoder
    attention). ``mask`` is a bool tensor, True = may attend (SDPA's convention), broadcastable to
    ``(B, heads, Lq, Lk)``; ``is_causal=True`` lets position ``i`` see positions ``<= i``.

    ``cache`` (a dict, for incremental decoding; :meth:`init_cache` makes an empty one): self-attention appends
    this call's keys and values to it and attends from the new queries, which are the *last* positions, to all of
    them (lower-right causal alignment); cross-attention computes the context's keys and values on the first call
    and reuses them.

    ``varlen`` (a :class:`Varlen`): packed sequences, ``x (T_q, dim)`` and ``context (T_k, dim)`` (or ``x``) with
    the sequences back to back; ``is_causal`` is then causal per sequence, bottom-right aligned. ``mask`` and
    ``cache`` do not apply.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"MultiHeadAttention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def init_cache(self, max_len: int) -> dict:
        """An empty self-attention cache for decoding up to ``max_len`` positions: here a dict the keys and values
        are concatenated into, step by step."""
        return {}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask, is_causal: bool) -> Tensor:
        """``(B, H, Lq, D)`` attention output of ``(B, H, Lq, D)`` queries and ``(B, H, Lk, D)`` keys / values."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=self.dropout if self.training else 0.0)

    def attend_varlen(self, q: Tensor, k: Tensor, v: Tensor, varlen: Varlen, is_causal: bool) -> Tensor:
        """``(T_q, H, D)`` attention output of packed ``(T_q, H, D)`` queries and ``(T_k, H, D)`` keys / values."""
        return reference.varlen_attn(q, k, v, *varlen, window_size=(-1, 0) if is_causal else (-1, -1),
                                     dropout_p=self.dropout if self.training else 0.0)

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, L, H*D) -> (B, H, L, D)

    def _forward_varlen(self, x: Tensor, context: Tensor | None, mask, is_causal: bool, cache,
                        varlen: Varlen) -> Tensor:
        if mask is not None or cache is not None:
            raise ValueError(f"{type(self).__name__}: packed sequences (varlen) take no mask and no cache")
        context = x if context is None else context
        q, k, v = (proj(t).unflatten(-1, (self.num_heads, self.head_dim))  # (T, H, D)
                   for proj, t in ((self.q_proj, x), (self.k_proj, context), (self.v_proj, context)))
        return self.out_proj(self.attend_varlen(q, k, v, varlen, is_causal).flatten(1))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None, is_causal: bool = False,
                cache: dict | None = None, *, varlen: Varlen | None = None) -> Tensor:
        if varlen is not None:
            return self._forward_varlen(x, context, mask, is_causal, cache, varlen)
        B, L, _ = x.shape
        q = self._heads(self.q_proj(x))                                  # (B, H, L, D)
        if context is None:  # self-attention
            k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
                if is_causal:  # the L new queries are the last L of the k.size(2) positions
                    if mask is not None:
                        raise ValueError("MultiHeadAttention: pass either a mask or is_causal=True with a cache")
                    mask, is_causal = causal_lower_right(L, k.size(2)), False
        elif cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self._heads(self.k_proj(context)), self._heads(self.v_proj(context))
            if cache is not None:
                cache["k"], cache["v"] = k, v
        out = self.attend(q, k, v, mask, is_causal)                      # (B, H, L, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, -1))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, dropout={self.dropout}"


class FusedMultiHeadAttention(MultiHeadAttention):
    """:class:`MultiHeadAttention` (same constructor, parameters and ``state_dict``) running
    ``fastattn.scaled_dot_product_attention``.

    Its :meth:`init_cache` preallocates: self-attention with that cache writes each step's keys and values into
    ``(B, max_len, H, D)`` buffers in place and attends with ``fastattn.attention_with_kvcache`` (bottom-right
    causal, split-KV for long caches), the sequences' lengths kept on the device (no host sync per step)."""

    def init_cache(self, max_len: int) -> dict:
        """A preallocated self-attention cache for up to ``max_len`` positions (buffers made on the first call,
        in the keys' dtype and device)."""
        return {"max_len": max_len}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask, is_causal: bool) -> Tensor:
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                     dropout_p=self.dropout if self.training else 0.0)

    def attend_varlen(self, q: Tensor, k: Tensor, v: Tensor, varlen: Varlen, is_causal: bool) -> Tensor:
        return fastattn.varlen_attn(q, k, v, *varlen, window_size=(-1, 0) if is_causal else (-1, -1),
                                    dropout_p=self.dropout if self.training else 0.0)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None, is_causal: bool = False,
                cache: dict | None = None, *, varlen: Varlen | None = None) -> Tensor:
        if varlen is not None or context is not None or cache is None or "max_len" not in cache:
            return super().forward(x, context, mask, is_causal, cache, varlen=varlen)
        if mask is not None:
            raise ValueError("FusedMultiHeadAttention: a preallocated cache takes is_causal, not a mask")
        B, L, _ = x.shape
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, self.head_dim))  # (B, L, H, D): the cache's layout
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if "k_cache" not in cache:
            shape = (B, cache["max_len"], self.num_heads, self.head_dim)
            cache.update(k_cache=k.new_zeros(shape), v_cache=v.new_zeros(shape),
                         seqlens=torch.zeros(B, dtype=torch.int32, device=x.device))
        out = fastattn.attention_with_kvcache(q, cache["k_cache"], cache["v_cache"], k, v,
                                              cache_seqlens=cache["seqlens"], is_causal=is_causal)  # (B, L, H, D)
        cache["seqlens"] += L
        return self.out_proj(out.flatten(2))


class FeedForward(nn.Module):
    """Position-wise feed-forward network ``linear2(dropout(activation(linear1(x))))``."""

    def __init__(self, dim: int, hidden: int, activation: type[nn.Module] = nn.ReLU, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden, bias=bias)
        self.act = activation()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.act(self.linear1(x))))


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """``PE(pos, 2i) = sin(pos / 10000^(2i/d))``, ``PE(pos, 2i+1) = cos(...)``: ``(length, dim)`` float32."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe
