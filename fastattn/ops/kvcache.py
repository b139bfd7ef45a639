"""Attention against a KV cache: argument checks, the split-KV schedule, the launchers and the custom ops
``fastattn::kvcache_append`` (writes the new keys into the cache in place) and ``fastattn::kvcache_attention``.

Inference only: there is no backward, and inputs that require grad (with grad mode on) raise. Nothing here reads
``cache_seqlens`` on the host, so a decode step runs under CUDA graphs and ``torch.compile(fullgraph=True)``: the
grid depends only on shapes and :func:`schedule` (the split count), the kernels find each sequence's length on the
device. Checks of the lengths' values (a cache too short, a block table naming no page) therefore run only where
they cost no sync: CPU tensors. On a GPU such a sequence's rows come back NaN and its cache is left untouched.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
from torch import Tensor

from fastattn import _runtime, reference
from fastattn.hwfit import KernelSpec
from fastattn.kernels import kvcache as K
from fastattn.kernels._common import ARCH_TARGETS, arch_class
from fastattn.ops import merge_attention as merge_ops
from fastattn.ops._common import (
    KERNEL_DTYPES,
    acc_tl,
    check_window_softcap,
    dot_precision,
    dtype_name,
    fallback_reason,
    sm_count,
    stat_dtype,
)

_OP = "attention_with_kvcache"
MAX_HEAD_DIM = 256
MAX_SPLITS = 64
MIN_BLOCKS_PER_SPLIT = 4  # a split streams at least this many key blocks, or splitting costs more than it gains
FORWARD_KERNELS = (_runtime.kernel_name(K._kvcache_attn),)
APPEND_KERNELS = (_runtime.kernel_name(K._kvcache_append),)
COMBINE_KERNELS = merge_ops.FORWARD_KERNELS


def _block(d: int) -> int:
    return max(32, triton.next_power_of_2(d))


# ---------------------------------------------------------------------------------------------------------------
# the schedule (a pure function of shapes: benchmarks and tests call it)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How one ``attention_with_kvcache`` call is launched."""

    block_m: int  # query rows per tile: (position, head of the GQA group) pairs
    block_n: int  # keys per block
    num_warps: int
    num_stages: int
    m_blocks: int  # query tiles per (sequence, key/value head)
    splits: int  # key splits; > 1 adds the fp32 partials and the combine kernel
    programs: int  # attention programs launched: m_blocks * batch * heads_kv * splits
    scratch_bytes: int  # fp32 partial outputs and lses of the splits (0 when unsplit)


def auto_splits(tiles: int, key_blocks: int, num_sms: int) -> int:
    """Splits of the keys when ``num_splits=0``: none when the ``tiles`` (query tiles x sequences x key/value
    heads) already fill the SMs or the keys are too few to share out; else the fewest splits whose wave efficiency
    (programs / SMs over its ceiling) is within 85% of the best one up to MAX_SPLITS, each split keeping at least
    MIN_BLOCKS_PER_SPLIT key blocks."""
    most = min(MAX_SPLITS, key_blocks // MIN_BLOCKS_PER_SPLIT)
    if tiles >= num_sms or most < 2:
        return 1

    def efficiency(s: int) -> float:
        waves = tiles * s / num_sms
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if efficiency(s) >= 0.85 * best)


def schedule(batch: int, heads: int, heads_kv: int, lq: int, capacity: int, head_dim: int, head_dim_v: int,
             dtype: torch.dtype, num_sms: int, num_splits: int = 0, precision: str = "ieee",
             arch: int | None = None) -> Schedule | None:
    """The launch of a call with these shapes (``capacity``: the cache's positions per sequence, the only length
    known on the host) on a GPU of ``num_sms`` SMs and arch class ``arch`` (90, 80; None: no GPU, the shared
    tiles); None when no kernel tile serves the dtype and head dims.
    A fixed ``num_splits`` is clamped to [1, min(MAX_SPLITS, key blocks)]; 0 chooses by :func:`auto_splits`."""
    rows = heads // heads_kv * lq
    elt, block_d = torch.empty((), dtype=dtype).element_size(), _block(max(head_dim, head_dim_v))
    block_m = K.decode_block_m(rows)
    while block_m > 16 and K.tile(elt, precision, block_d, block_m, arch) is None:  # the largest tile that fits
        block_m //= 2
    t = K.tile(elt, precision, block_d, block_m, arch)
    if t is None:
        return None
    block_n, warps, stages = t
    m_blocks = triton.cdiv(rows, block_m)
    key_blocks = max(1, triton.cdiv(capacity, block_n))
    if num_splits > 0:
        splits = min(num_splits, MAX_SPLITS, key_blocks)
    else:
        splits = auto_splits(m_blocks * batch * heads_kv, key_blocks, num_sms)
    scratch = splits * batch * lq * heads * (head_dim_v + 1) * 4 if splits > 1 else 0
    return Schedule(block_m, block_n, warps, stages, m_blocks, splits, m_blocks * batch * heads_kv * splits, scratch)


# ---------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------


def _paging(k_cache: Tensor, block_table: Tensor | None, like: Tensor) -> tuple:
    """(table, its strides, capacity per sequence, page size, pages) for the kernels."""
    if block_table is None:
        return like, (0, 0), k_cache.size(1), 1, 0
    return block_table, tuple(block_table.stride()), block_table.size(1) * k_cache.size(1), k_cache.size(1), \
        k_cache.size(0)


def _check_lengths(k_cache: Tensor, cache_seqlens: Tensor, block_table: Tensor | None, L_new: int) -> None:
    """The value checks that need ``cache_seqlens`` on the host: made for CPU tensors only (no sync there)."""
    if cache_seqlens.device.type != "cpu":
        return
    _, _, capacity, page, pages = _paging(k_cache, block_table, cache_seqlens)
    lens = cache_seqlens.tolist()
    for b, n in enumerate(lens):
        if n < 0 or n + L_new > capacity:
            raise ValueError(f"fastattn.{_OP}: k_cache is too short: sequence {b} has cache_seqlens {n} and "
                             f"{L_new} new keys, but the cache holds {capacity} positions per sequence"
                             + (" (block_table's pages x page size)" if block_table is not None else ""))
        if block_table is not None:
            used = block_table[b, : triton.cdiv(n + L_new, page)]
            if ((used < 0) | (used >= pages)).any():
                raise ValueError(f"fastattn.{_OP}: block_table row {b} names pages outside k_cache's {pages} "
                                 f"pages: {used.tolist()}")


def _append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
            block_table: Tensor | None) -> None:
    B, L_new, HKV, D = k.shape
    if B * L_new * HKV == 0:
        return
    table, st, capacity, page, pages = _paging(k_cache, block_table, cache_seqlens)
    _runtime.launch(
        K._kvcache_append, (triton.cdiv(L_new, K.APPEND_BLOCK_T), B * HKV), k, v, k_cache, v_cache, table,
        cache_seqlens, *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), *st,
        HKV, L_new, capacity, page, pages, D, v.size(-1),
        PAGED=block_table is not None, BLOCK_T=K.APPEND_BLOCK_T, BLOCK_D=_block(D), BLOCK_DV=_block(v.size(-1)),
    )


def _attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, block_table: Tensor | None,
               alibi_slopes: Tensor | None, L_new: int, scale: float, is_causal: bool, window_left: int,
               window_right: int, softcap: float, num_splits: int, sched: Schedule) -> tuple[Tensor, Tensor]:
    B, Lq, H, D = q.shape
    HKV, DV = k_cache.size(2), v_cache.size(3)
    out = torch.empty((B, Lq, H, DV), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Lq, H), device=q.device, dtype=stat_dtype(q.dtype))
    if B * Lq * H == 0:
        return out, lse
    table, st, capacity, page, pages = _paging(k_cache, block_table, cache_seqlens)
    S = sched.splits
    if S > 1:  # fp32 partials, (S, B, Lq, H, DV) and (S, B, Lq, H): the combine's (S, rows, DV) layout
        part = torch.empty((S, B, Lq, H, DV), device=q.device, dtype=stat_dtype(q.dtype))
        part_lse = torch.empty((S, B, Lq, H), device=q.device, dtype=stat_dtype(q.dtype))
        o_st, l_st = part.stride(), part_lse.stride()
        target, target_lse = part, part_lse
    else:
        o_st, l_st = (0, *out.stride()), (0, *lse.stride())
        target, target_lse = out, lse
    alibi = alibi_slopes if alibi_slopes is not None else cache_seqlens
    a_st = (0, 0) if alibi_slopes is None else ((0, alibi.stride(0)) if alibi.dim() == 1 else tuple(alibi.stride()))
    bd, bdv = _block(D), _block(DV)
    _runtime.launch(
        K._kvcache_attn, (sched.m_blocks, B * HKV, S), q, k_cache, v_cache, table, cache_seqlens, alibi, target,
        target_lse, *q.stride(), *k_cache.stride(), *v_cache.stride(), *st, *a_st, *o_st,
        l_st[0], l_st[1], l_st[3], l_st[2],  # (split, b, h, i): the lse buffers are laid out (split, b, i, h)
        HKV, Lq, L_new, capacity, page, pages, D, DV, H // HKV, S, scale, softcap, window_left, window_right,
        IS_CAUSAL=is_causal, HAS_WINDOW=window_left >= 0 or window_right >= 0, HAS_SOFTCAP=softcap > 0.0,
        HAS_ALIBI=alibi_slopes is not None, PAGED=block_table is not None, EVEN_D=bd == D and bdv == DV,
        PRECISION=dot_precision(q.dtype), ACC=acc_tl(q.dtype), BLOCK_M=sched.block_m, BLOCK_N=sched.block_n,
        BLOCK_D=bd, BLOCK_DV=bdv, num_warps=sched.num_warps, num_stages=sched.num_stages,
    )
    if S > 1:
        merge_ops.combine(part.view(S, -1, DV), part_lse.view(S, -1), out.view(-1, DV), lse.view(-1))
    return out, lse


def launch_schedule(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor | None,
                    num_splits: int) -> Schedule | None:
    """The :class:`Schedule` a call with these tensors gets on their device (None: the eager reference runs)."""
    B, Lq, H, D = q.shape
    capacity = _paging(k_cache, block_table, q)[2]
    return schedule(B, H, k_cache.size(2), Lq, capacity, D, v_cache.size(3), q.dtype, sm_count(q.device),
                    num_splits, dot_precision(q.dtype), arch_class(q.device))


def _fallback(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor | None, num_splits: int
              ) -> tuple[str | None, Schedule | None]:
    reason = fallback_reason(q.device, q.dtype)
    if reason is None and max(q.size(-1), v_cache.size(-1)) > MAX_HEAD_DIM:
        reason = f"head dim {max(q.size(-1), v_cache.size(-1))} is above the kernels' limit of {MAX_HEAD_DIM}"
    sched = launch_schedule(q, k_cache, v_cache, block_table, num_splits) if reason is None else None
    if reason is None and sched is None:
        reason = (f"no decode tile fits {dtype_name(q.dtype)} at head dim {max(q.size(-1), v_cache.size(-1))} "
                  "in the registers of sm_80/sm_90")
    return reason, sched


# ---------------------------------------------------------------------------------------------------------------
# custom ops (no autograd: inference only)
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastattn::kvcache_append", mutates_args=("k_cache", "v_cache"), device_types=None)
def kvcache_append_op(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                      block_table: Tensor | None) -> None:
    """Write ``k, v (B, L_new, H_kv, D)`` into the caches at positions ``cache_seqlens[b] ...``, in place."""
    _check_lengths(k_cache, cache_seqlens, block_table, k.size(1))
    reason = fallback_reason(k.device, k.dtype)
    if reason is not None:
        _runtime.warn_fallback(_OP, reason)
        reference.kvcache_append(k_cache, v_cache, k, v, cache_seqlens, block_table)
        return
    _append(k_cache, v_cache, k, v, cache_seqlens, block_table)


@kvcache_append_op.register_fake
def _(k_cache, v_cache, k, v, cache_seqlens, block_table):
    return None


@torch.library.custom_op("fastattn::kvcache_attention", mutates_args=(), device_types=None)
def kvcache_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                         block_table: Tensor | None, alibi_slopes: Tensor | None, L_new: int, scale: float,
                         is_causal: bool, window_left: int, window_right: int, softcap: float,
                         num_splits: int) -> tuple[Tensor, Tensor]:
    """``q (B, Lq, H, D)`` against the first ``cache_seqlens[b] + L_new`` keys -> ``(out (B, Lq, H, DV),
    lse (B, Lq, H))``."""
    _check_lengths(k_cache, cache_seqlens, block_table, L_new)
    reason, sched = _fallback(q, k_cache, v_cache, block_table, num_splits)
    if reason is not None:
        _runtime.warn_fallback(_OP, reason)
        out, lse = reference.attention_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=cache_seqlens + L_new, block_table=block_table, scale=scale,
            is_causal=is_causal, window_size=(window_left, window_right), softcap=softcap,
            alibi_slopes=alibi_slopes, return_lse=True)
        return out, lse.transpose(1, 2).contiguous()
    return _attention(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, L_new, scale, is_causal,
                      window_left, window_right, softcap, num_splits, sched)


@kvcache_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, L_new, scale, is_causal, window_left,
      window_right, softcap, num_splits):
    B, Lq, H, _ = q.shape
    return q.new_empty((B, Lq, H, v_cache.size(3))), q.new_empty((B, Lq, H), dtype=stat_dtype(q.dtype))


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_scalars(is_causal, window_size, softcap, scale, num_splits, return_lse) -> None:
    for name, flag in (("is_causal", is_causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"fastattn.{_OP}: {name} must be a bool; got {type(flag).__name__}")
    check_window_softcap(_OP, window_size, softcap)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"fastattn.{_OP}: scale must be a finite float or None (1/sqrt(D)); got {scale!r}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"fastattn.{_OP}: num_splits must be an int >= 0 (0 chooses); got {num_splits!r}")


def _check_tensors(q, k_cache, v_cache, k, v, cache_seqlens, block_table, alibi_slopes) -> None:
    named = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v, "block_table": block_table,
             "alibi_slopes": alibi_slopes}
    if isinstance(cache_seqlens, Tensor):
        named["cache_seqlens"] = cache_seqlens
    elif isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, int):
        raise TypeError(f"fastattn.{_OP}: cache_seqlens must be an int32 tensor (B,) or an int; got "
                        f"{type(cache_seqlens).__name__}")
    for name, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"fastattn.{_OP}: {name} must be a Tensor; got {type(t).__name__}")
    for name in ("q", "k_cache", "v_cache", "k", "v"):
        t = named[name]
        if t is not None and t.dim() != 4:
            raise ValueError(f"fastattn.{_OP}: {name} must be 4-D; got shape {_shape(t)}")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"fastattn.{_OP}: q must be {', '.join(map(dtype_name, KERNEL_DTYPES))}; got "
                        f"{dtype_name(q.dtype)}")
    for name in ("k_cache", "v_cache", "k", "v"):
        if named[name] is not None and named[name].dtype != q.dtype:
            raise TypeError(f"fastattn.{_OP}: {name} must have q's dtype {dtype_name(q.dtype)}; got "
                            f"{dtype_name(named[name].dtype)}")
    _runtime.check_same_device(_OP, **named)
    B, _, H, D = q.shape
    pages_or_b, page_or_len, HKV, Dk = k_cache.shape
    if Dk != D or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"fastattn.{_OP}: k_cache must be (B, L_cache, H_kv, D) or (pages, page_size, H_kv, D) "
                         f"with q's head dim {D}, and v_cache must match it but for its last dim; got k_cache "
                         f"{_shape(k_cache)}, v_cache {_shape(v_cache)}")
    if HKV == 0 or H % HKV != 0:
        raise ValueError(f"fastattn.{_OP}: q's heads ({H}) must be a multiple of the caches' heads ({HKV})")
    if min(D, v_cache.size(3)) == 0:
        raise ValueError(f"fastattn.{_OP}: head dims must be >= 1; got q {_shape(q)}, v_cache {_shape(v_cache)}")
    if block_table is None:
        if pages_or_b < B:
            raise ValueError(f"fastattn.{_OP}: k_cache holds {pages_or_b} sequences, fewer than q's batch {B}")
    else:
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.size(0) != B:
            raise ValueError(f"fastattn.{_OP}: block_table must be int32 (B={B}, max_pages); got "
                             f"{_shape(block_table)} {dtype_name(block_table.dtype)}")
        if page_or_len % 16 != 0:
            raise ValueError(f"fastattn.{_OP}: with a block_table, k_cache is (pages, page_size, H_kv, D) and "
                             f"page_size must be a multiple of 16; got {_shape(k_cache)}")
    if isinstance(cache_seqlens, Tensor) and (cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,)):
        raise ValueError(f"fastattn.{_OP}: cache_seqlens must be int32 of shape ({B},); got "
                         f"{_shape(cache_seqlens)} {dtype_name(cache_seqlens.dtype)}")
    if (k is None) != (v is None):
        raise ValueError(f"fastattn.{_OP}: pass both k and v (the new keys and values) or neither")
    if k is not None:
        if k.shape != (B, k.size(1), HKV, D) or v.shape != (B, k.size(1), HKV, v_cache.size(3)):
            raise ValueError(f"fastattn.{_OP}: k must be (B, L_new, H_kv, D) = ({B}, L_new, {HKV}, {D}) and v "
                             f"(B, L_new, H_kv, DV) with DV = {v_cache.size(3)}; got k {_shape(k)}, v {_shape(v)}")
        capacity = _paging(k_cache, block_table, q)[2]
        if k.size(1) > capacity:
            raise ValueError(f"fastattn.{_OP}: k_cache is too short: {k.size(1)} new keys, but the cache holds "
                             f"{capacity} positions per sequence")
    if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32
                                     or _shape(alibi_slopes) not in ((H,), (B, H))):
        raise ValueError(f"fastattn.{_OP}: alibi_slopes must be float32 of shape ({H},) or ({B}, {H}); got "
                         f"{_shape(alibi_slopes)} {dtype_name(alibi_slopes.dtype)}")


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    *,
    cache_seqlens: Tensor | int,
    block_table: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    num_splits: int = 0,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of ``q (B, Lq, H, D)`` against a KV cache, flash-attention's ``flash_attn_with_kvcache`` layouts.

    The cache is dense, ``(B, L_cache, H_kv, D)`` (``v_cache``: ``DV`` last), or paged, ``(pages, page_size, H_kv,
    D)`` with ``block_table (B, max_pages)`` int32 (any page size that is a multiple of 16). ``k, v (B, L_new,
    H_kv, D|DV)``, when given, are written into the caches in place at positions ``cache_seqlens[b] ...``; then
    ``q`` attends to the first ``N_b = cache_seqlens[b] + L_new`` keys of its sequence. ``cache_seqlens`` (B,)
    int32 (or an int for all) is not modified. ``is_causal`` and ``window_size=(left, right)`` are bottom-right
    aligned: key j is visible from query i iff ``i + N_b - Lq - left <= j <= i + N_b - Lq + right`` (negative =
    unbounded; causal is right = 0). ``softcap > 0``: ``x = softcap tanh(x / softcap)`` on the scaled scores, then
    ALiBi ``x -= slope_h |i + N_b - Lq - j|`` (``alibi_slopes (H,)`` or ``(B, H)`` fp32). GQA: ``H % H_kv == 0``.
    Returns ``out (B, Lq, H, DV)``, and with ``return_lse`` also ``lse (B, H, Lq)`` fp32 (natural log, -inf for
    rows with no visible key, whose output is 0).

    Split-KV: ``num_splits`` > 1 splits each sequence's keys across that many programs whose partial results one
    combine kernel merges by their log-sum-exp (bitwise repeatable for a fixed value); 0 chooses from the shapes
    and the SM count (:func:`schedule`). Inference only: inputs requiring grad raise unless grad mode is off. No
    host sync: the call runs under CUDA graphs and ``torch.compile(fullgraph=True)``; a cache too short for a
    sequence's new keys raises on CPU tensors and gives NaN rows (no cache write) on a GPU.
    """
    _check_scalars(is_causal, window_size, softcap, scale, num_splits, return_lse)
    _check_tensors(q, k_cache, v_cache, k, v, cache_seqlens, block_table, alibi_slopes)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k_cache, v_cache, k, v, alibi_slopes)):
        raise RuntimeError(f"fastattn.{_OP} is inference only (it has no backward): call it under "
                           "torch.no_grad() or torch.inference_mode(), or train with fastattn.attention")
    B = q.size(0)
    if not isinstance(cache_seqlens, Tensor):
        cache_seqlens = torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    sm_scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    if k is not None:
        kvcache_append_op(k_cache, v_cache, k, v, cache_seqlens, block_table)
    out, lse = kvcache_attention_op(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes,
                                    0 if k is None else k.size(1), sm_scale, is_causal, int(window_size[0]),
                                    int(window_size[1]), float(softcap), num_splits)
    return (out, lse.transpose(1, 2)) if return_lse else out


# ---------------------------------------------------------------------------------------------------------------
# hardware fit
# ---------------------------------------------------------------------------------------------------------------


def _example_args(dtype: torch.dtype, d: int, heavy: bool) -> dict:
    """Arguments of a decode launch (8 sequences, 32 query heads over 8 key/value heads, a 4096-key cache, 16-key
    pages when heavy) as the launcher passes them, on the meta device."""
    meta = torch.device("meta")
    B, Lq, H, HKV, L, page = 8, 1, 32, 8, 4096, 16
    q = torch.empty((B, Lq, H, d), device=meta, dtype=dtype)
    pages = B * L // page
    cache = torch.empty((pages, page, HKV, d) if heavy else (B, L, HKV, d), device=meta, dtype=dtype)
    table = torch.empty((B, L // page), device=meta, dtype=torch.int32)
    lens = torch.empty((B,), device=meta, dtype=torch.int32)
    S = 4 if heavy else 1
    out = torch.empty((S, B, Lq, H, d), device=meta, dtype=torch.float32 if heavy else dtype)
    lse = torch.empty((S, B, Lq, H), device=meta, dtype=torch.float32)
    args = {"Q": q, "K": cache, "V": cache, "BlockTable": table if heavy else lens, "SeqLens": lens,
            "Alibi": torch.empty((H,), device=meta, dtype=torch.float32) if heavy else lens, "Out": out, "Lse": lse,
            "HKV": HKV, "LQ": Lq, "L_NEW": 1, "CAPACITY": L, "PAGE_SIZE": page if heavy else 1,
            "NUM_PAGES": pages if heavy else 0, "D": d, "DV": d, "GROUP": H // HKV, "SPLITS": S, "sm_scale": 0.125,
            "softcap": 30.0 if heavy else 0.0, "window_left": 1024 if heavy else -1,
            "window_right": 0 if heavy else -1, "IS_CAUSAL": heavy, "HAS_WINDOW": heavy, "HAS_SOFTCAP": heavy,
            "HAS_ALIBI": heavy, "PAGED": heavy, "EVEN_D": True, "ACC": acc_tl(dtype), "BLOCK_D": d, "BLOCK_DV": d}
    names = {"q": ("b", "m", "h", "d"), "k": ("b", "n", "h", "d"), "v": ("b", "n", "h", "d")}
    for p, t in (("q", q), ("k", cache), ("v", cache)):
        args.update({f"stride_{p}{a}": s for a, s in zip(names[p], t.stride())})
    args.update(stride_tb=table.stride(0) if heavy else 0, stride_tp=1 if heavy else 0, stride_ab=0,
                stride_ah=1 if heavy else 0, stride_os=out.stride(0) if heavy else 0, stride_ob=out.stride(1),
                stride_om=out.stride(2), stride_oh=out.stride(3), stride_od=1, stride_ls=lse.stride(0) if heavy else 0,
                stride_lb=lse.stride(1), stride_lh=lse.stride(3), stride_lm=lse.stride(2))
    return args


def kernel_specs() -> list[KernelSpec]:
    """Every decode tile the launcher can pick (BLOCK_M 16, 32, 64 for each operand class and padded head dim),
    plain (dense, unsplit, no modifier) and heavy (paged, split partials, causal + window + softcap + ALiBi); the
    append kernel; the combine's fp32-partials specialisation of merge_attention's forward."""
    specs: list[KernelSpec] = []
    classes = [(torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee")]
    for dtype, precision in classes:
        dname = dtype_name(dtype) + ("" if dtype != torch.float32 else f"/{precision}")
        for d, by_m in K.TILES[K.operand_class(dtype.itemsize, precision)].items():
            for block_m in by_m:
                # the arch classes' tiles (K.ARCH_TILES), each compiled for the hwfit targets that take it
                served: dict[tuple, list[int]] = {}
                for arch, targets in ARCH_TARGETS.items():
                    served.setdefault(K.tile(dtype.itemsize, precision, d, block_m, arch), []).extend(targets)
                for (block_n, warps, stages), archs in served.items():
                    cfg = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
                    for heavy in (False, True):
                        args = {**_example_args(dtype, d, heavy), "PRECISION": precision}
                        variant = f"{dname} D<={d} {'paged+split+causal+window+softcap+alibi' if heavy else 'plain'}"
                        specs.append(KernelSpec("kvcache", K._kvcache_attn, args, cfg, variant,
                                                needs_tensor_cores=precision == "tf32" or dtype != torch.float32,
                                                archs=() if len(served) == 1 else tuple(archs)))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d in (64, 128):
            for paged in (False, True):
                args = _example_args(dtype, d, paged)
                app = {"KNew": args["Q"], "VNew": args["Q"], "KCache": args["K"], "VCache": args["V"],
                       "BlockTable": args["BlockTable"], "SeqLens": args["SeqLens"], "HKV": 8, "L_NEW": 1,
                       "CAPACITY": 4096, "PAGE_SIZE": args["PAGE_SIZE"], "NUM_PAGES": args["NUM_PAGES"], "D": d,
                       "DV": d, "PAGED": paged, "BLOCK_DV": d, "stride_tb": args["stride_tb"],
                       "stride_tp": args["stride_tp"]}
                for p, t, axes in (("kn", args["Q"], "bthd"), ("vn", args["Q"], "bthd"), ("k", args["K"], "bnhd"),
                                   ("v", args["V"], "bnhd")):
                    app.update({f"stride_{p}{a}": st for a, st in zip(axes, t.stride())})
                specs.append(KernelSpec("kvcache", K._kvcache_append, app, triton.Config(
                    {"BLOCK_T": K.APPEND_BLOCK_T, "BLOCK_D": d}, num_warps=4),
                    f"{dtype_name(dtype)} D<={d} {'paged' if paged else 'dense'}"))
    for d in (64, 128, 256):  # the combine: fp32 partials in, the activation dtype out
        for dtype in (torch.float16, torch.bfloat16):
            cfg = merge_ops.K.config(d)
            parts = torch.empty((4, 256, d), device="meta", dtype=torch.float32)
            stat = torch.empty((4, 256), device="meta", dtype=torch.float32)
            args = {"Parts": parts, "PartLse": stat, "Out": torch.empty((256, d), device="meta", dtype=dtype),
                    "Lse": stat[0], "stride_ps": 256 * d, "stride_pr": d, "stride_pd": 1, "stride_ls": 256,
                    "stride_lr": 1, "stride_or": d, "stride_od": 1, "S": 4, "R": 256, "D": d, "ACC": acc_tl(dtype),
                    "BLOCK_D": d}
            specs.append(KernelSpec("kvcache", merge_ops.K._merge_fwd, args, cfg,
                                    f"fp32 partials -> {dtype_name(dtype)} D<={d}"))
    return specs
