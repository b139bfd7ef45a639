"""Eager PyTorch reference of every fused op.

One function per op. Each is at once the test oracle (run in float64), the benchmark baseline and the fallback
where no Triton path applies. They are written for clarity, not speed, and match the public functions'
signatures; extra keyword-only arguments (``dropout_mask=``) let tests replay the exact dropout mask that a
kernel drew.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------


def per_head(t: Tensor, rank: int) -> Tensor:
    """A per-head ``(H,)`` or ``(..., H)`` tensor shaped to broadcast against ``rank``-dim scores ``(..., H, L, S)``
    (rank 2: one head, no head dim)."""
    return t.reshape(1, 1) if rank == 2 else t[..., None, None]


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False, *, causal_offset: int | None = None,
                                 dropout_mask: Tensor | None = None, return_lse: bool = False,
                                 window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                                 alibi_slopes: Tensor | None = None,
                                 sinks: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + mask) @ v, as ``torch.nn.functional.scaled_dot_product_attention``, with the score
    modifiers of ``fastattn.attention``.

    ``is_causal`` keeps key j for query i iff ``j <= i + causal_offset`` (0: torch's top-left alignment,
    ``Lk - Lq``: lower-right); ``window_size=(left, right)`` keeps it iff ``i + Lk - Lq - left <= j <= i + Lk - Lq
    + right`` (negative: unbounded). Scores ``x = scale q.k``, then ``softcap tanh(x / softcap)`` (softcap > 0),
    then ``- slope_h |i + Lk - Lq - j|`` (``alibi_slopes (H,)`` or the batch shape ``(..., H)``), then the mask.
    ``sinks (H,)`` add ``exp(sinks[h])`` to every row's denominator. Rows with no key left (and no sink) give zeros
    (torch >= 2.5). ``dropout_mask`` (bool, True = keep, broadcastable to the scores) replaces the random draw so a
    kernel's own mask can be replayed. ``return_lse`` also returns the natural-log log-sum-exp of each row's scores
    (-inf for empty rows).
    """
    L, S = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and query.dim() >= 3 and key.size(-3) != query.size(-3):
        group = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(group, dim=-3)
        value = value.repeat_interleave(group, dim=-3)
    scores = (query @ key.transpose(-2, -1)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(L, device=query.device)[:, None]
    j = torch.arange(S, device=query.device)[None, :]
    if alibi_slopes is not None:
        slopes = per_head(alibi_slopes.to(scores.dtype), scores.dim())  # (..., H, 1, 1)
        scores = scores - slopes * (i + S - L - j).abs().to(scores.dtype)
    keep = None
    if is_causal:
        keep = j <= i + (0 if causal_offset is None else causal_offset)
    left, right = window_size
    if left >= 0:
        keep = (j >= i + S - L - left) if keep is None else keep & (j >= i + S - L - left)
    if right >= 0:
        keep = (j <= i + S - L + right) if keep is None else keep & (j <= i + S - L + right)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            scores = scores + attn_mask
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if sinks is not None:  # one more column per row: the sink's logit, dropped after the softmax
        sink = per_head(sinks.to(scores.dtype), scores.dim()).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    if scores.size(-1) == 0:  # no keys: amax has nothing to reduce; every row is empty
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    else:
        row_max = scores.amax(dim=-1, keepdim=True)
    empty = row_max == float("-inf")
    shifted = (scores - torch.where(empty, torch.zeros_like(row_max), row_max)).exp()
    denom = shifted.sum(dim=-1, keepdim=True)
    probs = shifted / torch.where(empty, torch.ones_like(denom), denom)
    lse = torch.where(empty, row_max, row_max + denom.log()).squeeze(-1)
    if sinks is not None:
        probs = probs[..., :S]
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    out = probs.to(value.dtype) @ value
    return (out, lse) if return_lse else out


def merge_attention(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Attention over the union of disjoint key sets from each part's output ``(..., L, D)`` and log-sum-exp
    ``(..., L)``: ``out = sum_s exp(lse_s - lse) o_s``, ``lse = logsumexp_s lse_s``, computed in the promoted dtype
    of the outputs and the lses. A part with ``lse_s = -inf`` adds nothing (its output is not read); a row empty in
    every part gives ``out = 0, lse = -inf``. Returns ``out`` in outs' dtype and ``lse`` fp32 (fp64 for fp64)."""
    o = torch.stack(list(outs))  # (S, ..., L, D)
    x = torch.stack(list(lses))  # (S, ..., L)
    ct = torch.promote_types(o.dtype, x.dtype)
    x = x.to(ct)
    m = x.detach().amax(0)  # the shift cancels exactly; detached, it carries no gradient
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)  # -inf -> 0
    den = e.sum(0)
    empty = den == 0
    w = e / torch.where(empty, torch.ones_like(den), den)
    o = torch.where(torch.isneginf(x)[..., None], torch.zeros((), dtype=o.dtype, device=o.device), o)
    out = (w[..., None] * o.to(ct)).sum(0)
    lse = torch.where(empty, torch.full_like(den, float("-inf")), m + torch.log(torch.where(empty, 1.0, den)))
    return out.to(o.dtype), lse.to(torch.float64 if o.dtype == torch.float64 else torch.float32)

# ---------------------------------------------------------------------------------------------------------------
# attention_with_kvcache (decoding against a dense or paged KV cache)
# ---------------------------------------------------------------------------------------------------------------


def _cache_index(cache: Tensor, positions: Tensor, block_table: Tensor | None) -> tuple[Tensor, Tensor]:
    """Index of ``positions (B, n)`` of each sequence in a dense ``(B, L, H, D)`` or paged ``(pages, P, H, D)``
    cache (table entries past a sequence's keys may be anything: clamped, the rows they give are masked)."""
    if block_table is None:
        return torch.arange(positions.size(0), device=positions.device)[:, None].expand_as(positions), positions
    page = cache.size(1)
    pages = block_table.long().clamp(0, cache.size(0) - 1).gather(1, positions // page)
    return pages, positions % page


def kvcache_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                   block_table: Tensor | None = None) -> None:
    """Write ``k, v (B, L_new, H_kv, D)`` into the caches in place at positions ``cache_seqlens[b] ...``."""
    pos = cache_seqlens.long()[:, None] + torch.arange(k.size(1), device=k.device)  # (B, L_new)
    index = _cache_index(k_cache, pos, block_table)
    k_cache[index] = k
    v_cache[index] = v


def _modified_softmax(x: Tensor, diag: Tensor, j: Tensor, visible: Tensor, *, softcap: float = 0.0,
                      slopes: Tensor | None = None, left: int = -1, right: int = -1,
                      sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The score modifiers and the softmax of flash-attention's conventions, on scaled scores ``x (..., H, Lq, C)``:
    ``x = softcap tanh(x / softcap)``, then ALiBi ``x -= slope |diag - j|``; key j is visible from a query whose
    diagonal key is ``diag`` iff ``visible`` and ``diag - left <= j <= diag + right`` (a negative bound unbounded).
    ``sinks (H,)``: one logit per head that joins every row's denominator and attends to nothing. Returns the
    probabilities ``p`` (0 where not visible) and the rows' log-sum-exp (the sink included; -inf for a row with
    neither a visible key nor a sink, whose p is all 0). ``diag``, ``j``, ``visible`` and ``slopes (..., H, 1, 1)``
    broadcast against ``x``."""
    if softcap > 0:
        x = softcap * torch.tanh(x / softcap)
    if slopes is not None:
        x = x - slopes.to(x.dtype) * (diag - j).abs().to(x.dtype)
    if left >= 0:
        visible = visible & (j >= diag - left)
    if right >= 0:
        visible = visible & (j <= diag + right)
    x = x.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # the sink as one more column that is always visible
        x = torch.cat([x, sinks.to(x.dtype)[:, None, None].expand(*x.shape[:-1], 1)], dim=-1)
    row_max = x.amax(-1, keepdim=True) if x.size(-1) else x.new_full((*x.shape[:-1], 1), float("-inf"))
    empty = row_max == float("-inf")
    e = (x - torch.where(empty, 0.0, row_max)).exp()
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(empty, 1.0, den)
    lse = torch.where(empty, row_max, row_max + den.log()).squeeze(-1)
    return (p[..., :-1] if sinks is not None else p), lse


def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None = None,
                           v: Tensor | None = None, *, cache_seqlens: Tensor | int, block_table: Tensor | None = None,
                           scale: float | None = None, is_causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Tensor | None = None, num_splits: int = 0,
                           return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``fastattn.attention_with_kvcache`` in eager torch (``num_splits`` changes nothing here).

    Appends ``k, v`` to the caches in place at ``cache_seqlens[b] ...``, then ``q[b] (Lq, H, D)`` attends to the
    first ``N_b = cache_seqlens[b] + L_new`` keys of its own sequence: scores ``x = scale q . k`` (fp32, or
    float64 for float64 inputs), ``x = softcap tanh(x / softcap)``, ``x -= slope_h |i + N_b - Lq - j|``, key j
    visible iff ``j < N_b`` and ``i + N_b - Lq - left <= j <= i + N_b - Lq + right`` (causal: right = 0), softmax,
    the probabilities cast to v's dtype before ``p @ v``. Rows with no visible key give zeros and lse = -inf.
    Every sequence is computed over the cache's whole capacity with the keys past N_b masked, so nothing reads
    the lengths on the host (it runs under CUDA graphs and on FakeTensors)."""
    B, Lq, H, D = q.shape
    Hkv = k_cache.size(2)
    lens = cache_seqlens
    if not isinstance(lens, Tensor):
        lens = torch.full((B,), int(lens), dtype=torch.int32, device=q.device)
    if k is not None:
        kvcache_append(k_cache, v_cache, k, v, lens, block_table)
    capacity = k_cache.size(1) * (block_table.size(1) if block_table is not None else 1)
    index = _cache_index(k_cache, torch.arange(capacity, device=q.device).expand(B, capacity), block_table)
    keys = k_cache[index].transpose(1, 2).repeat_interleave(H // Hkv, 1)  # (B, H, C, D)
    values = v_cache[index].transpose(1, 2).repeat_interleave(H // Hkv, 1)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    x = (q.transpose(1, 2).to(ct) @ keys.to(ct).mT) * sc  # (B, H, Lq, C)
    N = (lens.long() + (0 if k is None else k.size(1)))[:, None, None, None]  # (B, 1, 1, 1)
    i = torch.arange(Lq, device=q.device)[:, None] + N - Lq  # (B, 1, Lq, 1): the query's diagonal key
    j = torch.arange(capacity, device=q.device)
    slopes = alibi_slopes.expand(B, H)[:, :, None, None] if alibi_slopes is not None else None
    left, right = window_size
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    p, lse = _modified_softmax(x, i, j, j < N, softcap=softcap, slopes=slopes, left=left, right=right)
    out = (p.to(values.dtype) @ values).transpose(1, 2).to(q.dtype)  # (B, Lq, H, DV)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------------------
# varlen_attn (packed variable-length sequences)
# ---------------------------------------------------------------------------------------------------------------


def varlen_rows(cu_seqlens: Tensor, max_len: int, total: int, used: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """For a padded ``(N, max_len)`` batch of the packed sequences that ``cu_seqlens (N + 1,)`` delimits in a
    tensor of ``total`` rows: the packed row of each (sequence, position), and whether it is one of the sequence's
    rows (its first ``used[b]`` when given). Padding positions index row ``total``, one past the end (a zero row
    the caller appends), so nothing is read on the host."""
    pos = torch.arange(max_len, device=cu_seqlens.device)
    starts = cu_seqlens[:-1].long()[:, None]
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long() if used is None else used.long()
    valid = pos < lens[:, None]
    return torch.where(valid, (starts + pos).clamp(0, total), total), valid


def pad_rows(t: Tensor, rows: Tensor) -> Tensor:
    """``t (T, ...)`` gathered at ``rows (N, L)`` (row T: zeros) -> ``(N, L, ...)``."""
    ext = torch.cat([t, t.new_zeros((1, *t.shape[1:]))])
    return ext[rows]


def varlen_attn(query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor | None, max_q: int,
                max_k: int, *, return_aux=None, scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                enable_gqa: bool = False, seqused_k: Tensor | None = None, block_table: Tensor | None = None,
                num_splits: int | None = None, softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                sinks: Tensor | None = None, dropout_p: float = 0.0,
                dropout_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``fastattn.varlen_attn`` in eager torch: each packed sequence attends to its own keys only.

    Sequence b has the queries ``query[cu_seq_q[b]:cu_seq_q[b + 1]]`` (``Lq_b`` rows) and the keys
    ``key[cu_seq_k[b]:cu_seq_k[b + 1]]`` (``N_b``; with ``seqused_k`` only the first ``seqused_k[b]`` of them, and
    with ``block_table`` the first ``seqused_k[b]`` positions of its pages of a paged ``key (pages, page_size, H_kv,
    D)``). Scores ``x = scale q . k`` (fp32, or float64 for float64 inputs), ``x = softcap tanh(x / softcap)``,
    ``x -= slope_h |i + N_b - Lq_b - j|``; key j visible from query i iff ``i + N_b - Lq_b - left <= j <= i + N_b -
    Lq_b + right`` (``window_size = (left, right)``, negative = unbounded: ``(-1, 0)`` is causal, bottom-right
    aligned); ``sinks (H,)`` join every row's denominator; softmax; dropout (``dropout_mask``, bool ``(N, H, max_q,
    max_k)`` over the padded positions, replays a kernel's mask); the probabilities cast to value's dtype before
    ``p @ v``. Returns ``out (T_q, H, DV)`` and, with ``return_aux.lse``, ``lse (H, T_q)`` in fp32 (float64 for
    float64), natural log, as torch's ``varlen_attn`` returns it. A row with no visible key gives 0 and lse -inf (the
    sink's logit where there are sinks); rows past ``cu_seq_q[-1]`` give 0 and -inf.

    The sequences are gathered into a padded ``(N, H, max_q, max_k)`` batch by index arithmetic on the device: no
    host sync (it runs on FakeTensors and under CUDA graphs), and the padding is masked, never attended."""
    T_q, H, D = query.shape
    N = cu_seq_q.numel() - 1
    Hkv = key.size(-2)
    ct = torch.float64 if query.dtype == torch.float64 else torch.float32
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    rows_q, valid_q = varlen_rows(cu_seq_q, max_q, T_q)
    if block_table is not None:
        page = key.size(1)
        j = torch.arange(max_k, device=key.device)
        pages = block_table.long().clamp(0, key.size(0) - 1).gather(1, (j // page).expand(N, max_k))
        flat = key.size(0) * page
        valid_k = j < seqused_k.long()[:, None]
        rows_k = torch.where(valid_k, pages * page + j % page, flat)
        keys, values = (t.reshape(flat, *t.shape[2:]) for t in (key, value))
    else:
        rows_k, valid_k = varlen_rows(cu_seq_k, max_k, key.size(0), seqused_k)
        keys, values = key, value
    q = pad_rows(query, rows_q).transpose(1, 2)  # (N, H, max_q, D)
    k = pad_rows(keys, rows_k).transpose(1, 2).repeat_interleave(H // Hkv, 1)  # (N, H, max_k, D)
    v = pad_rows(values, rows_k).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    x = (q.to(ct) @ k.to(ct).mT) * sc  # (N, H, max_q, max_k)
    lens_q, lens_k = valid_q.sum(1), valid_k.sum(1)
    diag = (torch.arange(max_q, device=query.device) + (lens_k - lens_q)[:, None])[:, None, :, None]
    j = torch.arange(max_k, device=query.device)
    visible = valid_q[:, None, :, None] & valid_k[:, None, None, :]
    slopes = alibi_slopes.expand(N, H)[:, :, None, None] if alibi_slopes is not None else None
    left, right = (int(w) for w in window_size)
    p, lse = _modified_softmax(x, diag, j, visible, softcap=softcap, slopes=slopes, left=left, right=right,
                               sinks=sinks)
    lse = torch.where(valid_q[:, None, :], lse, float("-inf"))  # padding rows, sinks or not
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    o = (p.to(v.dtype) @ v).to(query.dtype)  # (N, H, max_q, DV)
    # back to the packed rows: row t of sequence b at position t - cu_seq_q[b]; rows past the last sequence read
    # the appended zero / -inf row
    t = torch.arange(T_q, device=query.device)
    seq = torch.searchsorted(cu_seq_q[1:].long(), t, right=True).clamp(max=N)
    pos = t - cu_seq_q.long()[seq.clamp(max=max(N - 1, 0))] if N else t
    flat = torch.where((seq < N) & (pos < max_q), seq * max_q + pos, N * max_q)
    out = torch.cat([o.transpose(1, 2).reshape(N * max_q, H, -1), o.new_zeros(1, H, o.size(-1))])[flat]
    lse_rows = torch.cat([lse.transpose(1, 2).reshape(N * max_q, H), lse.new_full((1, H), float("-inf"))])
    lse = lse_rows[flat].transpose(0, 1)  # (H, T_q)
    return (out, lse) if return_aux is not None and return_aux.lse else out


# ---------------------------------------------------------------------------------------------------------------
# patch embedding
# ---------------------------------------------------------------------------------------------------------------


def patch_embed(
    images: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    pos_embed: Tensor | None = None,
    cls_token: Tensor | None = None,
) -> Tensor:
    """ViT stem: ``conv2d(images, weight, bias, stride=P)`` as tokens ``(B, N, D)``, class token, position embedding.

    ``t = conv2d(...).flatten(2).transpose(1, 2)``; ``t = cat([cls_token.expand(B, -1, -1), t], 1)`` when a class
    token is given; ``t + pos_embed``. A ``pos_embed`` of ``N`` rows together with a class token is added before the
    class token is prepended (timm's ``no_embed_class``).
    """
    P = weight.shape[-1]
    t = F.conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2)  # (B, N, D)
    if pos_embed is not None and pos_embed.shape[-2] == t.shape[1]:
        t = t + pos_embed
        pos_embed = None
    if cls_token is not None:
        t = torch.cat([cls_token.expand(t.shape[0], -1, -1), t], 1)  # promotes as torch does (fp32 cls: fp32)
    if pos_embed is not None:
        t = t + pos_embed
    return t

# ---------------------------------------------------------------------------------------------------------------
# batch_norm (BatchNorm + residual add + activation)
# ---------------------------------------------------------------------------------------------------------------

# activation name -> its torch.nn.functional form (slope: leaky_relu's negative slope)
ACTIVATIONS = {
    "identity": lambda y, slope: y,
    "relu": lambda y, slope: F.relu(y),
    "relu6": lambda y, slope: F.relu6(y),
    "leaky_relu": lambda y, slope: F.leaky_relu(y, slope),
    # torch's float64 hardsigmoid backward multiplies by 1/6 rounded to fp32 (1e-8 off): the float64 oracle divides
    "hardsigmoid": lambda y, slope: F.relu6(y + 3.0) / 6.0 if y.dtype == torch.float64 else F.hardsigmoid(y),
    "hardswish": lambda y, slope: F.hardswish(y),
    "silu": lambda y, slope: F.silu(y),
    "gelu": lambda y, slope: F.gelu(y),
    "gelu_tanh": lambda y, slope: F.gelu(y, approximate="tanh"),
}


def batch_norm_act(x: Tensor, identity: Tensor | None = None, running_mean: Tensor | None = None,
                   running_var: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None,
                   training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5, *,
                   activation: str = "relu", negative_slope: float = 0.01,
                   num_batches_tracked: Tensor | None = None) -> Tensor:
    """act(F.batch_norm(x, ...) + identity); ``momentum=None`` uses the cumulative factor 1 / num_batches_tracked
    (the count including this batch), as ``nn.BatchNorm2d`` does."""
    if momentum is None:
        momentum = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return ACTIVATIONS[activation](y if identity is None else y + identity, negative_slope)


def batch_norm_add_relu(x, identity, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                        eps=1e-5, *, num_batches_tracked=None) -> Tensor:
    """relu(F.batch_norm(x, ...) + identity): :func:`batch_norm_act` with ``activation="relu"``."""
    return batch_norm_act(x, identity, running_mean, running_var, weight, bias, training, momentum, eps,
                          activation="relu", num_batches_tracked=num_batches_tracked)


# ---------------------------------------------------------------------------------------------------------------
# add + layer_norm / rms_norm
# ---------------------------------------------------------------------------------------------------------------


def layer_norm2d(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the channels of (N, C, H, W), as torchvision's and timm's ConvNeXt ``LayerNorm2d`` compute it."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)


def _add_dropout_residual(x: Tensor, residual: Tensor | None, dropout_p: float, residual_in_fp32: bool,
                          dropout_mask: Tensor | None) -> Tensor:
    """``dropout(x) + residual`` in the residual stream's dtype (x's, or fp32 for fp16/bf16 x with
    ``residual_in_fp32``); ``x`` itself when there is nothing to add, drop or cast."""
    z_dtype = torch.float32 if residual_in_fp32 and x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    h = x
    if dropout_mask is not None:
        h = x * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        h = F.dropout(x, dropout_p)
    h = h.to(z_dtype)
    return h + residual.to(z_dtype) if residual is not None else h


def _compute_dtype(z: Tensor, *params: Tensor | None) -> torch.dtype:
    dtype = z.dtype
    for p in params:
        if p is not None:
            dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def add_layer_norm(x: Tensor, residual: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None,
                   eps: float = 1e-5, dropout_p: float = 0.0, *, residual_in_fp32: bool = False,
                   dropout_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``residual_out = dropout(x) + residual``, ``out = layer_norm(residual_out)`` over the last dim, both returned.

    ``residual_out`` is computed in the residual stream's dtype; the norm runs in the promoted dtype of
    ``residual_out`` and the parameters and ``out`` is cast to ``x``'s dtype. ``dropout_mask`` (bool, True = keep,
    shaped like ``x``) replays a kernel's mask.
    """
    return _add_norm(x, residual, weight, bias, eps, dropout_p, residual_in_fp32, dropout_mask, False)


def add_rms_norm(x: Tensor, residual: Tensor | None = None, weight: Tensor | None = None, eps: float = 1e-6,
                 dropout_p: float = 0.0, *, residual_in_fp32: bool = False, dropout_mask: Tensor | None = None,
                 round_xhat: bool = False, out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """RMSNorm twin of :func:`add_layer_norm`: ``out = residual_out * rsqrt(mean(residual_out^2) + eps) * weight``.

    ``round_xhat``: the normalised value is computed in float32 (float64 for float64 data) and rounded to
    ``residual_out``'s dtype before the weight multiply, as Llama-family RMSNorms do. ``out`` has ``out_dtype``
    (None: ``x``'s)."""
    return _add_norm(x, residual, weight, None, eps, dropout_p, residual_in_fp32, dropout_mask, True, round_xhat,
                     out_dtype)


def _add_norm(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
              dropout_p: float, residual_in_fp32: bool, dropout_mask: Tensor | None, is_rms: bool,
              round_xhat: bool = False, out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    z = _add_dropout_residual(x, residual, dropout_p, residual_in_fp32, dropout_mask)
    n = (z.size(-1),)
    if round_xhat:  # RMSNorm only
        xhat = F.rms_norm(z.to(torch.promote_types(z.dtype, torch.float32)), n, None, eps).to(z.dtype)
        out = xhat * weight.to(torch.promote_types(xhat.dtype, weight.dtype)) if weight is not None else xhat
        return out.to(out_dtype or x.dtype), z
    ct = _compute_dtype(z, weight, bias)
    w = weight.to(ct) if weight is not None else None
    if is_rms:
        out = F.rms_norm(z.to(ct), n, w, eps)
    else:
        out = F.layer_norm(z.to(ct), n, w, bias.to(ct) if bias is not None else None, eps)
    return out.to(out_dtype or x.dtype), z
