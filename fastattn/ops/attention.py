"""Fused attention: the launchers, the ``fastattn::attention`` custom op with autograd, and the public API (its
argument checks and canonical layout in :mod:`fastattn.ops._attention_args`).

``scaled_dot_product_attention`` has torch's signature and semantics; ``attention`` adds ``return_lse`` and the score
modifiers (``window_size``, ``softcap``, ``alibi_slopes``, ``sinks``). Everything is brought to a canonical 4-D
layout ``(Z, H, L, E)`` with views (expand for broadcast batch dims, stride 0 for a broadcast mask), so no input is
copied for the common ranks 2-4. ``varlen_forward`` / ``varlen_backward`` run packed sequences (issue 15).
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from fastattn import _runtime, reference
from fastattn.hwfit import KernelSpec
from fastattn.kernels import attention as K
from fastattn.kernels import attention_configs as C
from fastattn.kernels._common import ARCH_TARGETS
from fastattn.ops._attention_args import (
    _broadcast_batch,
    _causal_bias,
    _check,
    _check_flags,
    _check_heads,
    _check_modifiers,
    _mask_to4d,
    _to4d,
)
from fastattn.ops._common import acc_tl, bucket, dot_precision, draw_seed, fallback_reason, seed_int, stat_dtype

MAX_HEAD_DIM = 256
_PRE_BLOCK = 32  # rows per program of the small delta = rowsum(dO * O) kernel
_OP = "scaled_dot_product_attention"
# What a forward and a backward launch (tests and benchmarks check these ran, not the eager fallback).
FORWARD_KERNELS = (_runtime.kernel_name(K._attn_fwd),)
BACKWARD_KERNELS = tuple(_runtime.kernel_name(k) for k in (K._attn_bwd_preprocess, K._attn_bwd_dkdv, K._attn_bwd_dq))

def _block(d: int) -> int:
    return max(32, triton.next_power_of_2(d))


def _mask_kind(mask: Tensor | None) -> int:
    if mask is None:
        return 0
    return 1 if mask.dtype == torch.bool else 2


def _strides(prefix: str, axes: str, t: Tensor | None, shape: tuple[int, ...] | None = None) -> dict:
    """``stride_<prefix><axis>`` for each axis of ``t`` (0 where ``t`` is None, or has size 1 on a dim ``shape``
    broadcasts)."""
    if t is None:
        return {f"stride_{prefix}{a}": 0 for a in axes}
    st = [0 if shape is not None and t.size(i) == 1 and shape[i] != 1 else t.stride(i) for i in range(t.dim())]
    return {f"stride_{prefix}{a}": s for a, s in zip(axes, st)}


def _alibi2(alibi: Tensor | None) -> Tensor | None:
    """ALiBi slopes ``(H,)`` or ``(Z, H)`` as a 2-D view (size 1 on a shared batch dim)."""
    return alibi if alibi is None or alibi.dim() == 2 else alibi[None]


def _named(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, lse: Tensor, alibi: Tensor | None,
           sinks: Tensor | None, cu: tuple[Tensor, Tensor] | None, rows: tuple[int, int], scalars: tuple) -> dict:
    """The arguments every attention kernel shares, by name: the canonical 4-D views, their strides, the sizes
    (``rows``: M and N, for VARLEN the longest sequences) and the scalars."""
    Z, H, _, D = q.shape
    M, N = rows
    a2 = _alibi2(alibi)
    B = Z if cu is None else cu[0].numel() - 1  # the batch ALiBi's (Z|1, H) slopes index (VARLEN: the sequences)
    scale, causal_offset, window, softcap, seed, dropout_p = scalars
    named = {"Q": q, "K": k, "V": v, "Mask": mask if mask is not None else q, "Alibi": a2 if a2 is not None else lse,
             "Sinks": sinks.contiguous() if sinks is not None else lse, "Lse": lse,
             "CuQ": cu[0] if cu else lse, "CuK": cu[1] if cu else lse,
             **_strides("q", "zhmd", q), **_strides("k", "zhnd", k), **_strides("v", "zhnd", v),
             **_strides("m", "zhmn", mask, (Z, H, M, N)), **_strides("a", "zh", a2, (B, H)),
             **_strides("l", "zhm", lse if lse.dim() == 3 else lse[None]),
             "H": H, "M": M, "N": N, "D": D, "DV": v.shape[3], "GROUP": H // k.shape[1],
             "ROWS_BUCKET": bucket(M * H // k.shape[1]), "N_BUCKET": bucket(N), "sm_scale": scale,
             "causal_offset": causal_offset, "window_left": window[0], "window_right": window[1], "softcap": softcap,
             "seed": seed, "dropout_p": dropout_p}
    if cu is not None:  # packed (T, H, E) tensors as (1, H, T, E) views: the sequence's rows come from cu_seqlens
        for name in ("q", "k", "v", "l"):
            named[f"stride_{name}z"] = 0
    return named


def _flags(q: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, is_causal: bool, window: tuple[int, int],
           softcap: float, alibi: Tensor | None, sinks: Tensor | None, varlen: bool) -> dict:
    D, DV = q.shape[3], v.shape[3]
    return {"IS_CAUSAL": is_causal, "HAS_WINDOW": window[0] >= 0 or window[1] >= 0, "HAS_SOFTCAP": softcap > 0.0,
            "HAS_ALIBI": alibi is not None, "HAS_SINKS": sinks is not None, "MASK_KIND": _mask_kind(mask),
            "HAS_DROPOUT": dropout_p > 0.0, "VARLEN": varlen, "EVEN_D": _block(D) == D and _block(DV) == DV,
            "PRECISION": dot_precision(q.dtype), "ACC": acc_tl(q.dtype), "BLOCK_D": _block(D), "BLOCK_DV": _block(DV)}


def _launch(kernel, grid, named: dict, **constexprs) -> None:
    """Launch with the kernel's runtime arguments taken from ``named`` in its signature's order."""
    fn = _runtime.jit_function(kernel)
    _runtime.launch(kernel, grid, *(named[n] for n in fn.arg_names if n in named), **constexprs)


def _new(like: Tensor, shape: tuple[int, ...], packed: bool) -> Tensor:
    """An uninitialised (Z, H, L, E) result, contiguous; packed: a (1, H, T, E) view of a contiguous (T, H, E)."""
    if not packed:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    return torch.empty((shape[2], shape[1], shape[3]), device=like.device, dtype=like.dtype).transpose(0, 1)[None]


def _window(window_size: tuple[int, int], M: int, N: int) -> tuple[int, int]:
    """The window's bounds for the kernels: -1 where unbounded, else at most M + N (beyond, nothing changes)."""
    return tuple(-1 if w < 0 else min(int(w), M + N) for w in window_size)


# ---------------------------------------------------------------------------------------------------------------
# launchers (canonical 4-D tensors; packed sequences as (1, H, T, E) views with cu = (cu_seqlens_q, cu_seqlens_k))
# ---------------------------------------------------------------------------------------------------------------


def _forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, seed: int, is_causal: bool,
             causal_offset: int, scale: float, window: tuple[int, int], softcap: float, alibi: Tensor | None,
             sinks: Tensor | None, cu: tuple[Tensor, Tensor] | None = None,
             rows: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """(out like q with v's head dim, lse fp32: (Z, H, M), or (H, T) for packed sequences)."""
    Z, H, M, _D = q.shape
    HKV, N, DV = k.shape[1], k.shape[2], v.shape[3]
    out = _new(q, (Z, H, M, DV), cu is not None)
    lse = torch.empty((Z, H, M) if cu is None else (H, M), device=q.device, dtype=stat_dtype(q.dtype))
    if Z * H * M == 0:
        return out, lse
    if N == 0:  # no keys: every row is empty (its sink, if any, alone in the denominator)
        lse.copy_(sinks.to(lse.dtype)[:, None].expand(H, M) if sinks is not None else lse.new_full((), -math.inf))
        return out.zero_(), lse
    B, (Mx, Nx) = (Z, (M, N)) if cu is None else (cu[0].numel() - 1, rows)
    window = _window(window, Mx, Nx)
    named = _named(q, k, v, mask, lse, alibi, sinks, cu, (Mx, Nx), (scale, causal_offset, window, softcap, seed,
                                                                     dropout_p))
    named.update(Out=out, **_strides("o", "zhmd", out))
    if cu is not None:
        named["stride_oz"] = 0
    group = H // HKV
    _launch(K._attn_fwd, lambda meta: (triton.cdiv(Mx * group, meta["BLOCK_M"]), B * HKV), named,
            **_flags(q, v, mask, dropout_p, is_causal, window, softcap, alibi, sinks, cu is not None))
    return out, lse


def _bwd_scratch(lse: Tensor, has_sinks: bool) -> tuple[Tensor, Tensor]:
    """The backward's buffers besides its results: delta like ``lse`` (``(Z, H, M)``, or ``(H, T)`` packed) and, with
    sinks, each preprocess program's share of dsinks ``(Z H, cdiv(M, _PRE_BLOCK))`` (else empty)."""
    rows = lse.shape[0] * lse.shape[1] if lse.dim() == 3 else lse.shape[0]
    shape = (rows, triton.cdiv(lse.shape[-1], _PRE_BLOCK)) if has_sinks else (0,)
    return torch.empty_like(lse), torch.empty(shape, device=lse.device, dtype=lse.dtype)


def backward_scratch_bytes(lse: Tensor, has_sinks: bool) -> int:
    """Bytes the backward allocates besides its results for a forward's ``lse`` (:func:`_bwd_scratch`; any device)."""
    meta = torch.empty(lse.shape, device="meta", dtype=lse.dtype)
    return sum(t.numel() * t.element_size() for t in _bwd_scratch(meta, has_sinks))


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
              mask: Tensor | None, dropout_p: float, seed: int, is_causal: bool, causal_offset: int, scale: float,
              mask_grad: bool, window: tuple[int, int], softcap: float, alibi: Tensor | None, sinks: Tensor | None,
              cu: tuple[Tensor, Tensor] | None = None, rows: tuple[int, int] | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask (Z, H, M, N) fp32 or empty, dsinks (H,) fp32 or empty)."""
    Z, H, M, _D = q.shape
    HKV, N, DV = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = (_new(t, t.shape, cu is not None).zero_() for t in (q, k, v))
    dmask = torch.zeros((Z, H, M, N) if mask_grad else (0,), device=q.device, dtype=stat_dtype(q.dtype))
    # with sinks and rows, dsinks is the preprocess programs' shares summed: no buffer of its own
    dsinks = torch.zeros((H,) if sinks is not None and Z * H * M == 0 else (0,), device=q.device,
                         dtype=stat_dtype(q.dtype))
    if Z * H * M == 0:
        return dq, dk, dv, dmask, dsinks
    lse = lse.contiguous()
    delta, shares = _bwd_scratch(lse, sinks is not None)
    # the packed (H, T) statistics as (Z, H, M) = (1, H, T) for the row-wise preprocess
    lse3, delta3 = (lse, delta) if cu is None else (lse[None], delta[None])
    Zp = lse3.shape[0]
    blocks = triton.cdiv(M, _PRE_BLOCK)
    _launch(K._attn_bwd_preprocess, (blocks, Zp * H),
            {"Out": out, "DO": do, "DLse": None if dlse is None else dlse.contiguous(), "Lse": lse3,
             "Sinks": sinks if sinks is not None else lse, "Delta": delta3, "DSinks": shares,
             **_strides("o", "zhmd", out), **_strides("do", "zhmd", do), **_strides("l", "zhm", lse3), "H": H,
             "M": M, "DV": DV}, HAS_SINKS=sinks is not None, BLOCK_DV=_block(DV), BLOCK_M=_PRE_BLOCK)
    if sinks is not None:
        dsinks = shares.view(Zp, H, blocks).sum((0, 2))
    if N == 0:
        return dq, dk, dv, dmask, dsinks
    B, (Mx, Nx) = (Z, (M, N)) if cu is None else (cu[0].numel() - 1, rows)
    window = _window(window, Mx, Nx)
    named = _named(q, k, v, mask, lse, alibi, sinks, cu, (Mx, Nx), (scale, causal_offset, window, softcap, seed,
                                                                     dropout_p))
    named.update(DO=do, Delta=delta, DK=dk, DV_=dv, DMask=dmask if mask_grad else q, DQ=dq,
                 **_strides("do", "zhmd", do), **_strides("dk", "zhnd", dk), **_strides("dv", "zhnd", dv),
                 **_strides("dq", "zhmd", dq))
    if cu is not None:
        for name in ("do", "dk", "dv", "dq"):
            named[f"stride_{name}z"] = 0
    flags = _flags(q, v, mask, dropout_p, is_causal, window, softcap, alibi, sinks, cu is not None)
    group = H // HKV
    _launch(K._attn_bwd_dkdv, lambda meta: (triton.cdiv(Nx, meta["BLOCK_N"]), B * HKV),
            {**named, "ROWS_BUCKET": bucket(Mx)}, MASK_GRAD=mask_grad, **flags)
    _launch(K._attn_bwd_dq, lambda meta: (triton.cdiv(Mx * group, meta["BLOCK_M"]), B * HKV), named, **flags)
    return dq, dk, dv, dmask, dsinks


def _packed(t: Tensor) -> Tensor:
    """(T, H, E) as the kernels' (1, H, T, E) view."""
    return t.transpose(0, 1)[None]


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, *,
                   scale: float, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                   alibi_slopes: Tensor | None = None, sinks: Tensor | None = None, dropout_p: float = 0.0,
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """Attention over packed variable-length sequences: ``q (T_q, H, D)``, ``k (T_k, H_kv, D)``, ``v (T_k, H_kv,
    DV)``; sequence b is rows ``cu_q[b]:cu_q[b + 1]`` of q and ``cu_k[b]:cu_k[b + 1]`` of k and v (int32 ``(B + 1,)``
    on the device, ``max_q``/``max_k`` at least the longest). Each sequence is its own attention with bottom-right
    alignment (``window_size`` as in ``attention``; causal is ``(-1, 0)``), ALiBi ``(H,)`` or ``(B, H)`` fp32,
    sinks ``(H,)``; dropout draws from ``seed`` with counters (k row, q row, head) of the packed tensors. Returns
    ``out (T_q, H, DV)`` and ``lse (H, T_q)`` fp32 (natural log; -inf for rows with no key and no sink). No checks:
    the caller's (issue 15's varlen API)."""
    out, lse = _forward(_packed(q), _packed(k), _packed(v), None, dropout_p, seed, False, 0, scale, window_size,
                        softcap, alibi_slopes, sinks, (cu_q, cu_k), (max_q, max_k))
    return out[0].transpose(0, 1), lse


def varlen_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor,
                    cu_k: Tensor, max_q: int, max_k: int, *, scale: float, window_size: tuple[int, int] = (-1, -1),
                    softcap: float = 0.0, alibi_slopes: Tensor | None = None, sinks: Tensor | None = None,
                    dropout_p: float = 0.0, seed: int = 0, dlse: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`varlen_forward` given ``do (T_q, H, DV)``, its ``out`` and ``lse (H, T_q)`` (and
    ``dlse (H, T_q)``, a gradient flowing into lse): ``(dq (T_q, H, D), dk, dv (T_k, H_kv, ...), dsinks (H,) fp32 or
    None)``, each a view of a contiguous (T, H, E) tensor. Deterministic (no atomics)."""
    dq, dk, dv, _, dsinks = _backward(_packed(do), _packed(q), _packed(k), _packed(v), _packed(out), lse, dlse, None,
                                      dropout_p, seed, False, 0, scale, False, window_size, softcap, alibi_slopes,
                                      sinks, (cu_q, cu_k), (max_q, max_k))
    return dq[0].transpose(0, 1), dk[0].transpose(0, 1), dv[0].transpose(0, 1), dsinks if sinks is not None else None


def dropout_keep_mask(seed: int, shape: tuple[int, int, int, int], dropout_p: float, device: torch.device) -> Tensor:
    """The boolean keep-mask ``(Z, H, M, N)`` that the kernels draw for ``seed`` (for tests and debugging)."""
    Z, H, M, N = shape
    keep = torch.empty(shape, device=device, dtype=torch.bool)
    _runtime.launch(K._attn_dropout_mask, (triton.cdiv(M, 32), triton.cdiv(N, 32), Z * H), keep, M, N, seed,
                    dropout_p, BLOCK_M=32, BLOCK_N=32)
    return keep


# ---------------------------------------------------------------------------------------------------------------
# custom op + autograd
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastattn::attention", mutates_args=(), device_types=None)
def attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, seed: Tensor | None,
                 is_causal: bool, causal_offset: int, scale: float, window_left: int = -1, window_right: int = -1,
                 softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                 sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Canonical fused attention on (Z, H, M, D) / (Z, HKV, N, D) / (Z, HKV, N, DV) -> (out, lse); ALiBi slopes
    (H,) or (Z, H) fp32, sinks (H,)."""
    return _forward(q, k, v, mask, dropout_p, seed_int(seed), is_causal, causal_offset, scale,
                    (window_left, window_right), softcap, alibi_slopes, sinks)


@attention_op.register_fake
def _(q, k, v, mask, dropout_p, seed, is_causal, causal_offset, scale, window_left=-1, window_right=-1, softcap=0.0,
      alibi_slopes=None, sinks=None):
    Z, H, M, _ = q.shape
    return q.new_empty((Z, H, M, v.shape[3])), q.new_empty((Z, H, M), dtype=stat_dtype(q.dtype))


@torch.library.custom_op("fastattn::attention_backward", mutates_args=(), device_types=None)
def attention_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          dlse: Tensor | None, mask: Tensor | None, dropout_p: float, seed: Tensor | None,
                          is_causal: bool, causal_offset: int, scale: float, mask_grad: bool, window_left: int = -1,
                          window_right: int = -1, softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                          sinks: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dmask, dsinks) of ``fastattn::attention``; dmask is (Z, H, M, N) fp32 or empty,
    dsinks (H,) fp32 or empty."""
    return _backward(do, q, k, v, out, lse, dlse, mask, dropout_p, seed_int(seed), is_causal, causal_offset, scale,
                     mask_grad, (window_left, window_right), softcap, alibi_slopes, sinks)


@attention_backward_op.register_fake
def _(do, q, k, v, out, lse, dlse, mask, dropout_p, seed, is_causal, causal_offset, scale, mask_grad,
      window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, sinks=None):
    Z, H, M, _ = q.shape
    N = k.shape[2]
    dmask = q.new_empty((Z, H, M, N) if mask_grad else (0,), dtype=stat_dtype(q.dtype))
    dsinks = q.new_empty((H,) if sinks is not None else (0,), dtype=stat_dtype(q.dtype))
    # Contiguous, as _backward allocates them (empty_like would keep the strides of a permuted q, and a compiled
    # graph would then view the real gradients with the wrong strides).
    def grad(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return grad(q), grad(k), grad(v), dmask, dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, mask, dropout_p, seed, is_causal, causal_offset, scale, *modifiers = inputs
    window_left, window_right, softcap, alibi, sinks = (modifiers + [-1, -1, 0.0, None, None][len(modifiers):])
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed, alibi, sinks)
    ctx.args = (dropout_p, is_causal, causal_offset, scale)
    ctx.modifiers = (window_left, window_right, softcap)
    ctx.mask_grad = mask is not None and mask.requires_grad
    ctx.set_materialize_grads(False)  # an unused lse then arrives as None instead of a zero tensor to read


def _backward_autograd(ctx, dout, dlse):
    q, k, v, out, lse, mask, seed, alibi, sinks = ctx.saved_tensors
    dropout_p, is_causal, causal_offset, scale = ctx.args
    mask_grad = ctx.mask_grad and ctx.needs_input_grad[3]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dmask, dsinks = attention_backward_op(dout, q, k, v, out, lse, dlse, mask, dropout_p, seed,
                                                      is_causal, causal_offset, scale, mask_grad, *ctx.modifiers,
                                                      alibi, sinks)
    dmask_in = None
    if mask_grad:  # sum over the dims where the mask broadcast (size 1), in fp32, then cast
        dims = [i for i in range(4) if mask.size(i) == 1 and dmask.size(i) != 1]
        dmask_in = (dmask.sum(dim=dims, keepdim=True) if dims else dmask).to(mask.dtype)
    dsinks_in = dsinks.to(sinks.dtype) if sinks is not None and ctx.needs_input_grad[13] else None
    return dq, dk, dv, dmask_in, None, None, None, None, None, None, None, None, None, dsinks_in


attention_op.register_autograd(_backward_autograd, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def fused_reason(query: Tensor, D: int, DV: int) -> str | None:
    """Why the kernels cannot run attention on ``query``'s device and dtype at head dims ``D`` / ``DV`` (None: they
    can)."""
    reason = fallback_reason(query.device, query.dtype)
    if reason is None and max(D, DV) > MAX_HEAD_DIM:
        reason = f"head dim {max(D, DV)} is above the kernels' limit of {MAX_HEAD_DIM}"
    elif reason is None and not C.supported(query.element_size(), dot_precision(query.dtype), _block(max(D, DV))):
        reason = (f"no kernel tile fits {query.dtype} (TF32 {'on' if dot_precision(query.dtype) == 'tf32' else 'off'})"
                  f" at head dim {max(D, DV)} in the registers of sm_80/sm_90")
    return reason


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
              return_lse: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
              alibi_slopes: Tensor | None = None, sinks: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Fused attention with torch's semantics, the score modifiers of the kernels, and the rows' log-sum-exp.

    With scores ``x_ij = scale q_i . k_j`` of query ``i < Lq`` and key ``j < Lk``:

    - ``window_size=(left, right)``: key j is visible from query i iff ``i + Lk - Lq - left <= j <= i + Lk - Lq +
      right`` (bottom-right aligned; a negative bound is unbounded: ``(W, 0)`` is causal with W keys back). It
      intersects ``is_causal`` (top-left) and ``attn_mask``; key blocks outside the band are never visited.
    - ``softcap > 0``: ``x = softcap tanh(x / softcap)`` (Gemma 2), before ALiBi and the mask.
    - ``alibi_slopes`` fp32 ``(H,)`` or ``(B, H)`` (the batch shape): ``x -= slope |i + Lk - Lq - j|``, from
      indices. The slopes get no gradient: a tensor that requires grad raises (pass ``.detach()``).
    - ``sinks`` ``(H,)``: one logit per query head that joins every row's softmax denominator and attends to
      nothing (gpt-oss); differentiable. A row with no visible key then gives zeros and ``lse = sinks[h]``.
    - ``return_lse=True`` also returns the log-sum-exp ``(..., H, Lq)`` fp32 (natural log, -inf for rows with no
      visible key and no sink); it is differentiable.
    """
    _check_flags(is_causal, scale, enable_gqa)
    _check_modifiers(window_size, softcap, alibi_slopes, sinks, return_lse)
    attn_mask, is_causal, causal_offset = _causal_bias(attn_mask, is_causal, query, key)
    _check(query, key, value, attn_mask, dropout_p, enable_gqa)
    dropout_p = float(dropout_p)

    M, D = query.shape[-2:]
    N, DV = value.shape[-2:]
    if enable_gqa and key.size(-3) != query.size(-3):
        outer = _broadcast_batch([("query", query.shape[:-3]), ("key", key.shape[:-3]), ("value", value.shape[:-3])])
        H, HKV = query.size(-3), key.size(-3)
        batch = (*outer, H)
    else:
        batch = _broadcast_batch([("query", query.shape[:-2]), ("key", key.shape[:-2]), ("value", value.shape[:-2])])
        outer, H = (batch[:-1], batch[-1]) if batch else ((), 1)
        HKV = H
    _check_heads(query, batch, alibi_slopes, sinks)
    mask4 = _mask_to4d(attn_mask, outer, H, M, N) if attn_mask is not None else None
    # E = 0: every score is the empty sum 0 whatever the scale, so the rows average v (as torch gives)
    sm_scale = (1.0 / math.sqrt(D) if D > 0 else 1.0) if scale is None else float(scale)
    window = (int(window_size[0]), int(window_size[1]))
    modified = max(window) >= 0 or softcap > 0 or alibi_slopes is not None or sinks is not None

    reason = fused_reason(query, D, DV)
    if reason is not None:
        _runtime.warn_fallback(_OP, reason)
        if return_lse or causal_offset != 0 or modified:
            return reference.scaled_dot_product_attention(
                query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_offset=causal_offset,
                return_lse=return_lse, window_size=window, softcap=float(softcap), alibi_slopes=alibi_slopes,
                sinks=sinks)
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa)

    q4, k4, v4 = _to4d(query, outer, H), _to4d(key, outer, HKV), _to4d(value, outer, HKV)
    alibi = alibi_slopes.reshape(-1, H) if alibi_slopes is not None and alibi_slopes.dim() > 1 else alibi_slopes
    out4, lse4 = attention_op(q4, k4, v4, mask4, dropout_p, draw_seed(dropout_p), bool(is_causal), causal_offset,
                              sm_scale, *window, float(softcap), alibi, sinks)
    out = out4.reshape(*batch, M, DV)  # (Z, H, M, DV) -> the broadcast batch shape
    return (out, lse4.reshape(*batch, M)) if return_lse else out


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` running the fused Triton kernel.

    Shapes ``(..., Lq, E)``, ``(..., Lk, E)``, ``(..., Lk, Ev)``; ``attn_mask`` bool (True = takes part), float
    (added to the scores) or ``torch.nn.attention.bias.causal_lower_right/upper_left(Lq, Lk)``; ``is_causal`` is
    top-left aligned as in torch. Rows with every key masked give zeros. Dropout is drawn in-kernel from a seed
    taken from torch's default generator.
    """
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


# ---------------------------------------------------------------------------------------------------------------
# hardware fit
# ---------------------------------------------------------------------------------------------------------------

# BLOCK_M x BLOCK_N x BLOCK_D GEMMs per iteration of each kernel's key (or query) loop, as the work is split:
# forward S = QK^T, O += PV; dK/dV S^T = KQ^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q; dQ S = QK^T, dP = dO V^T,
# dQ += dS K. hwfit's issue-slot ceiling divides by these FLOPs (loop_flops); change them with the split.
_LOOP_GEMMS = {"_attn_fwd": 2, "_attn_bwd_dkdv": 4, "_attn_bwd_dq": 3}
# The specialisations compiled for the tiles a kind of launch takes: (variant words, features of _example_args).
# Packed sequences (VARLEN) have neither a mask tensor nor the top-left causal flag (causal is a window there).
_HEAVY = "causal+window+softcap+alibi+sinks+floatmask+grad+dropout"
_VARIANTS = {"plain": [("plain", ""), ("band causal+window+sinks+gqa", "band")],
             "scores": [("scores causal+window+softcap+alibi+sinks+gqa", "scores")],
             "heavy": [(f"heavy {_HEAVY}", "all")], "decode": [("decode", ""), (f"decode {_HEAVY}", "all")]}
_PACKED_HEAVY = "window+softcap+alibi+sinks+gqa+dropout"
_PACKED_VARIANTS = {"plain": [("plain", ""), ("band window+sinks+gqa", "band")],
                    "scores": [("scores window+softcap+alibi+sinks+gqa", "scores")],
                    "heavy": [(f"heavy {_PACKED_HEAVY}", "all")],
                    "decode": [("decode", ""), (f"decode {_PACKED_HEAVY}", "all")]}


def _example_args(kernel, dtype: torch.dtype, d: int, features: str, varlen: bool = False) -> dict:
    """Arguments of a (2, 8, 1000, d) self-attention launch as the launchers pass them, on the meta device, with
    ``features``: "" none; "band": causal, a window and sinks, GQA groups of 2; "scores": those and softcap and ALiBi;
    "all": those and a float mask with gradient and dropout. ``varlen``: the two sequences packed, as
    :func:`varlen_forward` / :func:`varlen_backward` launch them (no mask tensor, no causal flag: a window)."""
    meta = torch.device("meta")
    Z, H, L = 2, 8, 1000
    band, scores, heavy = features in ("band", "scores", "all"), features in ("scores", "all"), features == "all"
    hkv = H // 2 if band else H
    if varlen:  # (T, H, E) tensors as the (1, H, T, E) views the launchers make
        q, kv = (_packed(torch.empty((Z * L, h, d), device=meta, dtype=dtype)) for h in (H, hkv))
        lse = torch.empty((H, Z * L), device=meta, dtype=torch.float32)
        cu = (torch.empty((Z + 1,), device=meta, dtype=torch.int32),) * 2
    else:
        q, kv = (torch.empty((Z, h, L, d), device=meta, dtype=dtype) for h in (H, hkv))
        lse = torch.empty((Z, H, L), device=meta, dtype=torch.float32)
        cu = None
    mask = torch.empty((Z, H, L, L), device=meta, dtype=torch.float32) if heavy and not varlen else None
    stats = torch.empty((H,), device=meta, dtype=torch.float32)
    alibi, sinks = stats if scores else None, stats if band else None
    window, softcap, dropout_p = (256, 0) if band else (-1, -1), 30.0 if scores else 0.0, 0.1 if heavy else 0.0
    named = _named(q, kv, kv, mask, lse, alibi, sinks, cu, (L, L), (0.125, 0, window, softcap, 12345, dropout_p))
    named.update(Out=q, DO=q, Delta=lse, DK=kv, DV_=kv, DMask=mask if mask is not None else q, DQ=q,
                 **_strides("o", "zhmd", q), **_strides("do", "zhmd", q), **_strides("dk", "zhnd", kv),
                 **_strides("dv", "zhnd", kv), **_strides("dq", "zhmd", q))
    if varlen:
        named.update({f"stride_{name}z": 0 for name in ("o", "do", "dk", "dv", "dq")})
    if kernel is K._attn_bwd_dkdv:
        named["ROWS_BUCKET"] = bucket(L)
    flags = _flags(q, kv, mask, dropout_p, band and not varlen, window, softcap, alibi, sinks, varlen)
    return {**named, **flags, "MASK_GRAD": mask is not None}


def kernel_specs(varlen: bool = False) -> list[KernelSpec]:
    """Every (kernel, config, specialisation) the launchers can pick on a GPU, for ``fastattn.hwfit``.

    For each operand class, padded head dim and arch class, each kind of launch (plain, scores, heavy; and decode,
    at most 16 query rows) takes the tiles ``kernels.attention.table_for`` gives; each such tile is compiled, for
    the archs where it is taken, as the specialisations of that kind (``_VARIANTS``): plain launches plain and with
    causal, a window, sinks and GQA; scores launches with those and softcap and ALiBi; heavy and decode launches with
    every feature (and decode plain too). ``varlen``: the VARLEN specialisations the packed launchers take instead
    (``_PACKED_VARIANTS``, listed under the op "varlen"), without _attn_bwd_preprocess, which has no VARLEN flag:
    packed sequences launch the specialisation listed here.
    """
    op, variants = ("varlen", _PACKED_VARIANTS) if varlen else ("attention", _VARIANTS)
    specs: list[KernelSpec] = []
    classes = [(torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee")]
    for dtype, precision in classes:
        dname = str(dtype).replace("torch.", "") + ("" if dtype != torch.float32 else f"/{precision}")
        cls = C.operand_class(dtype.itemsize, precision)
        for d in (32, 64, 128, 256):
            if not C.supported(dtype.itemsize, precision, d):
                continue
            for kern in (K._attn_fwd, K._attn_bwd_dkdv, K._attn_bwd_dq):
                name = _runtime.kernel_name(kern)
                served: dict[tuple, set] = {}  # (tile, variant) -> the archs that take it
                for arch, targets in ARCH_TARGETS.items():
                    for kind in ("plain", "scores", "heavy"):
                        for rows in (1 << 20, 1):
                            table, tiles = C.table_for(name, cls, d, kind, rows, arch, varlen)
                            for tile in tiles:
                                for variant in variants["decode" if table == "decode" else kind]:
                                    served.setdefault((tile, variant), set()).update(targets)
                for (tile, (words, features)), archs in served.items():
                    specs.append(KernelSpec(
                        op, kern, {**_example_args(kern, dtype, d, features, varlen), "PRECISION": precision},
                        C.config(tile), f"{dname} D<={d} {words}", loop_flops=2 * _LOOP_GEMMS[name] * tile[0] *
                        tile[1] * d, needs_tensor_cores=precision == "tf32" or dtype != torch.float32,
                        archs=() if len(archs) == 3 else tuple(sorted(archs))))
            if varlen:
                continue
            pre = {"Out": torch.empty((2, 4, 1000, d), device="meta", dtype=dtype), "DLse": None, "HAS_SINKS": True,
                   "H": 4, "M": 1000, "DV": d, "BLOCK_DV": d}
            pre.update(DO=pre["Out"], Lse=torch.empty((2, 4, 1000), device="meta"), **_strides("o", "zhmd", pre["Out"]),
                       **_strides("do", "zhmd", pre["Out"]))
            pre.update(Sinks=pre["Lse"], Delta=pre["Lse"], DSinks=pre["Lse"], **_strides("l", "zhm", pre["Lse"]))
            specs.append(KernelSpec("attention", K._attn_bwd_preprocess, pre,
                                    triton.Config({"BLOCK_M": _PRE_BLOCK}, num_warps=4), f"{dname} D<={d}"))
    return specs
