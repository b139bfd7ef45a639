"""Fused attention: argument checks, the launchers, and the ``fastattn::attention`` custom op with autograd.

``scaled_dot_product_attention`` has torch's signature and semantics; ``attention`` adds ``return_lse``.
Everything is brought to a canonical 4-D layout ``(Z, H, L, E)`` with views (expand for broadcast batch dims,
stride 0 for a broadcast mask), so no input is copied for the common ranks 2-4.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn import _runtime, reference
from fastattn.hwfit import KernelSpec
from fastattn.kernels import attention as K
from fastattn.ops._common import acc_tl, bucket, draw_seed, fallback_reason, seed_int, stat_dtype

MAX_HEAD_DIM = 256
_PRE_BLOCK = 32  # rows per program of the small delta = rowsum(dO * O) kernel
_OP = "scaled_dot_product_attention"
# What a forward and a backward launch (tests and benchmarks check these ran, not the eager fallback).
FORWARD_KERNELS = (_runtime.kernel_name(K._attn_fwd),)
BACKWARD_KERNELS = tuple(_runtime.kernel_name(k) for k in (K._attn_bwd_preprocess, K._attn_bwd_dkdv, K._attn_bwd_dq))

try:  # torch >= 2.3
    from torch.nn.attention.bias import CausalBias, CausalVariant
except ImportError:  # pragma: no cover - torch < 2.3 is below our floor
    CausalBias = CausalVariant = None


def _block(d: int) -> int:
    return max(32, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    """fp32 ``tl.dot`` uses TF32 exactly when torch's matmuls would (``torch.backends.cuda.matmul.allow_tf32``)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _kernel_flags(dtype: torch.dtype) -> dict:
    return {"PRECISION": _precision(dtype), "ACC": acc_tl(dtype)}


def _mask_kind(mask: Tensor | None) -> int:
    if mask is None:
        return 0
    return 1 if mask.dtype == torch.bool else 2


def _mask4(mask: Tensor | None, shape: tuple[int, int, int, int], like: Tensor) -> tuple[Tensor, tuple]:
    """The mask (already 4-D, size-1 where it broadcasts) and its strides with 0 on broadcast dims."""
    if mask is None:
        return like, (0, 0, 0, 0)
    strides = tuple(0 if mask.size(i) == 1 and shape[i] != 1 else mask.stride(i) for i in range(4))
    return mask, strides


# ---------------------------------------------------------------------------------------------------------------
# launchers (canonical 4-D tensors)
# ---------------------------------------------------------------------------------------------------------------


def _forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, seed: int,
             is_causal: bool, causal_offset: int, scale: float) -> tuple[Tensor, Tensor]:
    Z, H, M, D = q.shape
    HKV, N, DV = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((Z, H, M, DV), device=q.device, dtype=q.dtype)
    lse = torch.empty((Z, H, M), device=q.device, dtype=stat_dtype(q.dtype))
    if Z * H * M == 0:
        return out, lse
    if N == 0:  # no keys at all: every row is empty
        return out.zero_(), lse.fill_(float("-inf"))
    mask_t, ms = _mask4(mask, (Z, H, M, N), q)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), Z * H)

    _runtime.launch(
        K._attn_fwd, grid, q, k, v, mask_t, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
        H, M, N, D, DV, H // HKV, bucket(M), bucket(N),
        scale, causal_offset, seed, dropout_p,
        IS_CAUSAL=is_causal, MASK_KIND=_mask_kind(mask), HAS_DROPOUT=dropout_p > 0.0, BLOCK_D=_block(D),
        BLOCK_DV=_block(DV), **_kernel_flags(q.dtype),
    )
    return out, lse


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
              mask: Tensor | None, dropout_p: float, seed: int, is_causal: bool, causal_offset: int,
              scale: float, mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    Z, H, M, D = q.shape
    HKV, N, DV = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    dmask = torch.zeros((Z, H, M, N) if mask_grad else (0,), device=q.device, dtype=stat_dtype(q.dtype))
    if Z * H * M * N == 0:
        return dq, dk, dv, dmask
    delta = torch.empty((Z, H, M), device=q.device, dtype=stat_dtype(q.dtype))
    _runtime.launch(
        K._attn_bwd_preprocess, (triton.cdiv(M, _PRE_BLOCK), Z * H), out, do, dlse, delta,
        *out.stride(), *do.stride(), H, M, DV, BLOCK_DV=_block(DV), BLOCK_M=_PRE_BLOCK,
    )
    mask_t, ms = _mask4(mask, (Z, H, M, N), q)
    flags = dict(IS_CAUSAL=is_causal, MASK_KIND=_mask_kind(mask), HAS_DROPOUT=dropout_p > 0.0, BLOCK_D=_block(D),
                 BLOCK_DV=_block(DV), **_kernel_flags(q.dtype))
    scalars = (scale, causal_offset, seed, dropout_p)
    _runtime.launch(
        K._attn_bwd_dkdv, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), Z * HKV),
        q, k, v, mask_t, do, lse, delta, dk, dv, dmask if mask_grad else q,
        *q.stride(), *k.stride(), *v.stride(), *ms, *do.stride(), *dk.stride(), *dv.stride(),
        H, HKV, M, N, D, DV, H // HKV, bucket(M), bucket(N), *scalars, MASK_GRAD=mask_grad, **flags,
    )
    _runtime.launch(
        K._attn_bwd_dq, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), Z * H),
        q, k, v, mask_t, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *ms, *do.stride(), *dq.stride(),
        H, M, N, D, DV, H // HKV, bucket(M), bucket(N), *scalars, **flags,
    )
    return dq, dk, dv, dmask


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
                 is_causal: bool, causal_offset: int, scale: float) -> tuple[Tensor, Tensor]:
    """Canonical fused attention on (Z, H, M, D) / (Z, HKV, N, D) / (Z, HKV, N, DV) -> (out, lse)."""
    return _forward(q, k, v, mask, dropout_p, seed_int(seed), is_causal, causal_offset, scale)


@attention_op.register_fake
def _(q, k, v, mask, dropout_p, seed, is_causal, causal_offset, scale):
    Z, H, M, _ = q.shape
    return q.new_empty((Z, H, M, v.shape[3])), q.new_empty((Z, H, M), dtype=stat_dtype(q.dtype))


@torch.library.custom_op("fastattn::attention_backward", mutates_args=(), device_types=None)
def attention_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          dlse: Tensor | None, mask: Tensor | None, dropout_p: float, seed: Tensor | None,
                          is_causal: bool, causal_offset: int, scale: float,
                          mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dmask) of ``fastattn::attention``; dmask is (Z, H, M, N) fp32 or empty."""
    return _backward(do, q, k, v, out, lse, dlse, mask, dropout_p, seed_int(seed), is_causal, causal_offset,
                     scale, mask_grad)


@attention_backward_op.register_fake
def _(do, q, k, v, out, lse, dlse, mask, dropout_p, seed, is_causal, causal_offset, scale, mask_grad):
    Z, H, M, _ = q.shape
    N = k.shape[2]
    dmask = q.new_empty((Z, H, M, N) if mask_grad else (0,), dtype=stat_dtype(q.dtype))
    # Contiguous, as _backward allocates them (empty_like would keep the strides of a permuted q, and a compiled
    # graph would then view the real gradients with the wrong strides).
    def grad(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return grad(q), grad(k), grad(v), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, dropout_p, seed, is_causal, causal_offset, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.args = (dropout_p, is_causal, causal_offset, scale)
    ctx.mask_grad = mask is not None and mask.requires_grad
    ctx.set_materialize_grads(False)  # an unused lse then arrives as None instead of a zero tensor to read


def _backward_autograd(ctx, dout, dlse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    dropout_p, is_causal, causal_offset, scale = ctx.args
    mask_grad = ctx.mask_grad and ctx.needs_input_grad[3]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dmask = attention_backward_op(dout, q, k, v, out, lse, dlse, mask, dropout_p, seed, is_causal,
                                              causal_offset, scale, mask_grad)
    dmask_in = None
    if mask_grad:  # sum over the dims where the mask broadcast (size 1), in fp32, then cast
        dims = [i for i in range(4) if mask.size(i) == 1 and dmask.size(i) != 1]
        dmask_in = (dmask.sum(dim=dims, keepdim=True) if dims else dmask).to(mask.dtype)
    return dq, dk, dv, dmask_in, None, None, None, None, None


attention_op.register_autograd(_backward_autograd, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def _shape_str(t: Tensor) -> str:
    return str(tuple(t.shape))


def _check_flags(is_causal, scale, enable_gqa) -> None:
    """The non-tensor arguments, before anything reads the tensors (torch's own parser rejects the same values)."""
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(flag, bool):
            raise TypeError(f"fastattn.{_OP}: {name} must be a bool; got {type(flag).__name__}")
    if scale is not None:
        try:
            if isinstance(scale, (str, bytes)):  # float("0.5") would accept a string
                raise TypeError
            value = float(scale)
        except (TypeError, ValueError):
            raise TypeError(f"fastattn.{_OP}: scale must be a float or None; got {type(scale).__name__}") from None
        if not math.isfinite(value):
            raise ValueError(f"fastattn.{_OP}: scale must be finite (or None for 1/sqrt(E)); got {value!r}")


def _check(query: Tensor, key: Tensor, value: Tensor, attn_mask, dropout_p: float, enable_gqa: bool) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fastattn.{_OP}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"fastattn.{_OP}: {name} must have at least 2 dims (..., L, E); got shape "
                             f"{_shape_str(t)}")
        if not t.is_floating_point():
            raise TypeError(f"fastattn.{_OP}: {name} must be a floating-point tensor; got {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"fastattn.{_OP}: query, key and value must have one dtype; got query {query.dtype}, "
                        f"key {key.dtype}, value {value.dtype}")
    _runtime.check_same_device(_OP, query=query, key=key, value=value,
                               attn_mask=attn_mask if isinstance(attn_mask, Tensor) else None)
    if query.size(-1) != key.size(-1):
        raise ValueError(f"fastattn.{_OP}: query and key must have the same head dim (last dim); got query "
                         f"{_shape_str(query)} and key {_shape_str(key)}")
    if key.size(-2) != value.size(-2):
        raise ValueError(f"fastattn.{_OP}: key and value must have the same length (dim -2); got key "
                         f"{_shape_str(key)} and value {_shape_str(value)}")
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"fastattn.{_OP}: dropout_p must be a float in [0, 1); got {dropout_p!r}")
    if enable_gqa:
        if min(query.dim(), key.dim(), value.dim()) < 3:
            raise ValueError(f"fastattn.{_OP}: enable_gqa=True needs a heads dim (-3) on query, key and value; "
                             f"got query {_shape_str(query)}, key {_shape_str(key)}, value {_shape_str(value)}")
        hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
        if hk != hv:
            raise ValueError(f"fastattn.{_OP}: key and value must have the same number of heads (dim -3); got "
                             f"{hk} and {hv}")
        if hq % hk != 0:
            raise ValueError(f"fastattn.{_OP}: with enable_gqa=True the query heads ({hq}) must be a multiple of "
                             f"the key/value heads ({hk})")
    allowed_masks = (torch.bool, torch.float32, query.dtype)
    if isinstance(attn_mask, Tensor) and attn_mask.dtype not in allowed_masks:
        raise TypeError(f"fastattn.{_OP}: attn_mask must be bool (True = takes part) or a float tensor of "
                        f"dtype float32 or query's dtype {query.dtype}; got {attn_mask.dtype}")


def _broadcast_batch(op_batch: list[tuple[str, tuple[int, ...]]]) -> tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*(s for _, s in op_batch)))
    except RuntimeError:
        desc = ", ".join(f"{n} {s}" for n, s in op_batch)
        raise ValueError(f"fastattn.{_OP}: the batch dims (all but the last two) of query, key and value do not "
                         f"broadcast: {desc}") from None


def _to4d(t: Tensor, outer: tuple[int, ...], heads: int) -> Tensor:
    """Expand ``t`` (..., L, E) to (*outer, heads, L, E) and view it as (Z, heads, L, E)."""
    t = t.expand(*outer, heads, t.size(-2), t.size(-1))
    if len(outer) == 1:
        return t
    if len(outer) == 0:
        return t.unsqueeze(0)
    return t.reshape(-1, heads, t.size(-2), t.size(-1))


def _mask_to4d(mask: Tensor, outer: tuple[int, ...], heads: int, M: int, N: int) -> Tensor:
    """The mask as 4-D (Zm, Hm, Mm, Nm) with size 1 where it broadcasts against (Z, heads, M, N)."""
    full = (*outer, heads, M, N)
    try:
        torch.broadcast_shapes(mask.shape, full)
        if len(mask.shape) > len(full):
            raise RuntimeError
        if torch.broadcast_shapes(mask.shape, full) != torch.Size(full):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"fastattn.{_OP}: attn_mask of shape {tuple(mask.shape)} does not broadcast to the "
                         f"attention scores' shape {full}") from None
    m = mask.reshape((1,) * (len(full) - mask.dim()) + tuple(mask.shape))
    if len(outer) == 0:
        return m.unsqueeze(0)
    if len(outer) == 1:
        return m
    lead = m.shape[: len(outer)]
    if all(s == 1 for s in lead):
        return m.reshape(1, *m.shape[len(outer):])
    return m.expand(*outer, *m.shape[len(outer):]).reshape(-1, *m.shape[len(outer):])


def fused_reason(query: Tensor, D: int, DV: int) -> str | None:
    """Why the kernels cannot run attention on ``query``'s device and dtype at head dims ``D`` / ``DV`` (None: they
    can)."""
    reason = fallback_reason(query.device, query.dtype)
    if reason is None and max(D, DV) > MAX_HEAD_DIM:
        reason = f"head dim {max(D, DV)} is above the kernels' limit of {MAX_HEAD_DIM}"
    elif reason is None and not K.supported(query.element_size(), _precision(query.dtype), _block(max(D, DV))):
        reason = (f"no kernel tile fits {query.dtype} (TF32 {'on' if _precision(query.dtype) == 'tf32' else 'off'}) "
                  f"at head dim {max(D, DV)} in the registers of sm_80/sm_90")
    return reason


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused attention with torch's semantics; ``return_lse=True`` also returns the rows' log-sum-exp.

    The log-sum-exp has shape ``(..., H, Lq)`` in float32 (natural log, -inf for rows with no key) and is
    differentiable.
    """
    _check_flags(is_causal, scale, enable_gqa)
    causal_offset = 0
    if CausalBias is not None and isinstance(attn_mask, CausalBias):
        if is_causal:
            raise ValueError(f"fastattn.{_OP}: pass either is_causal=True or a CausalBias attn_mask, not both")
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (query.size(-2), key.size(-2)):
            raise ValueError(f"fastattn.{_OP}: the CausalBias attn_mask is for lengths ({attn_mask.seq_len_q}, "
                             f"{attn_mask.seq_len_kv}) but query/key have ({query.size(-2)}, {key.size(-2)})")
        is_causal = True
        if attn_mask.variant == CausalVariant.LOWER_RIGHT:
            causal_offset = key.size(-2) - query.size(-2)
        attn_mask = None
    elif attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"fastattn.{_OP}: attn_mask must be a Tensor, a torch CausalBias or None; got "
                        f"{type(attn_mask).__name__}")
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
    mask4 = _mask_to4d(attn_mask, outer, H, M, N) if attn_mask is not None else None
    # E = 0: every score is the empty sum 0 whatever the scale, so the rows average v (as torch gives)
    sm_scale = (1.0 / math.sqrt(D) if D > 0 else 1.0) if scale is None else float(scale)

    reason = fused_reason(query, D, DV)
    if reason is not None:
        _runtime.warn_fallback(_OP, reason)
        if return_lse or causal_offset != 0:
            return reference.scaled_dot_product_attention(
                query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_offset=causal_offset,
                return_lse=return_lse)
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa)

    q4 = _to4d(query, outer, H)
    k4 = _to4d(key, outer, HKV)
    v4 = _to4d(value, outer, HKV)
    seed = draw_seed(dropout_p)
    out4, lse4 = attention_op(q4, k4, v4, mask4, dropout_p, seed, bool(is_causal), causal_offset, sm_scale)
    out = out4.reshape(*batch, M, DV)  # (Z, H, M, DV) -> the broadcast batch shape
    return (out, lse4.reshape(*batch, M)) if return_lse else out


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
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


def _example_args(dtype: torch.dtype, d: int, full: bool) -> dict:
    """Arguments of a (2, 4, 1000, d) self-attention launch, as the launchers pass them, on the meta device."""
    meta = torch.device("meta")
    t = torch.empty((2, 4, 1000, d), device=meta, dtype=dtype)
    mask = torch.empty((2, 4, 1000, 1000), device=meta, dtype=torch.float32)
    stats = torch.empty((2, 4, 1000), device=meta, dtype=torch.float32)
    axes = {"q": "zhmd", "o": "zhmd", "do": "zhmd", "dq": "zhmd", "k": "zhnd", "v": "zhnd", "dk": "zhnd",
            "dv": "zhnd", "m": "zhmn"}
    args = {f"stride_{p}{a}": st for p, ax in axes.items() for a, st in zip(ax, (mask if p == "m" else t).stride())}
    args.update(Q=t, K=t, V=t, Out=t, DO=t, DK=t, DV_=t, DQ=t, Mask=mask if full else t, Lse=stats, Delta=stats,
                DMask=mask if full else t, DLse=None, H=4, HKV=4, M=1000, N=1000, D=d, DV=d, GROUP=1,
                M_BUCKET=1024, N_BUCKET=1024, sm_scale=0.125, causal_offset=0, seed=12345, dropout_p=0.1,
                IS_CAUSAL=full, MASK_KIND=2 if full else 0, HAS_DROPOUT=full, MASK_GRAD=full, ACC=tl.float32,
                BLOCK_D=d, BLOCK_DV=d)
    return args


# BLOCK_M x BLOCK_N x BLOCK_D GEMMs per iteration of each kernel's key (or query) loop, as the work is split today:
# forward S = QK^T, O += PV; dK/dV S^T = KQ^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q; dQ S = QK^T, dP = dO V^T,
# dQ += dS K. hwfit's issue-slot ceiling divides by these FLOPs (loop_flops); change them with the split.
_LOOP_GEMMS = {"_attn_fwd": 2, "_attn_bwd_dkdv": 4, "_attn_bwd_dq": 3}


def kernel_specs() -> list[KernelSpec]:
    """Every (kernel, config, specialisation) the launchers can pick on a GPU, for ``fastattn.hwfit``.

    For each operand class and padded head dim, every tile of ``kernels.attention.TILES`` is listed twice: the
    plain kernel and the one with every optional feature on (causal, float mask with gradient, dropout).
    """
    specs: list[KernelSpec] = []
    classes = [(torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee")]
    for dtype, precision in classes:
        dname = str(dtype).replace("torch.", "") + ("" if dtype != torch.float32 else f"/{precision}")
        for d in (32, 64, 128, 256):
            if not K.supported(dtype.itemsize, precision, d):
                continue
            for full in (False, True):
                args = {**_example_args(dtype, d, full), "PRECISION": precision}
                variant = f"{dname} D<={d} {'causal+floatmask+grad+dropout' if full else 'plain'}"
                for kern in (K._attn_fwd, K._attn_bwd_dkdv, K._attn_bwd_dq):
                    name = _runtime.kernel_name(kern)
                    for tile in K.tiles_for(name, dtype.itemsize, precision, d):
                        specs.append(KernelSpec("attention", kern, args, K._config(tile), variant,
                                                needs_tensor_cores=precision == "tf32" or dtype != torch.float32,
                                                loop_flops=2 * _LOOP_GEMMS[name] * tile[0] * tile[1] * d))
            pre = {**_example_args(dtype, d, False), "BLOCK_DV": d}
            specs.append(KernelSpec("attention", K._attn_bwd_preprocess, pre,
                                    triton.Config({"BLOCK_M": _PRE_BLOCK}, num_warps=4), f"{dname} D<={d}"))
    return specs
