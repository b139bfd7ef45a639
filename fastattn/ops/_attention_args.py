"""The public attention API's argument checks and its canonical layout: every user-facing shape, dtype and value is
checked here, and query, key, value and mask are viewed as the kernels' ``(Z, H, L, E)`` without copies
(:mod:`fastattn.ops.attention` launches them)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastattn import _runtime
from fastattn.ops._common import check_alibi_no_grad, check_window_softcap

_OP = "scaled_dot_product_attention"

try:  # torch >= 2.3
    from torch.nn.attention.bias import CausalBias, CausalVariant
except ImportError:  # pragma: no cover - torch < 2.3 is below our floor
    CausalBias = CausalVariant = None


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


def _check_modifiers(window_size, softcap, alibi_slopes, sinks, return_lse) -> None:
    """The score modifiers' types and values (their shapes are checked against the heads in ``_check_heads``)."""
    if not isinstance(return_lse, bool):
        raise TypeError(f"fastattn.attention: return_lse must be a bool; got {type(return_lse).__name__}")
    check_window_softcap("attention", window_size, softcap)
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"fastattn.attention: {name} must be a Tensor or None; got {type(t).__name__}")
    check_alibi_no_grad("attention", alibi_slopes)


def _check_heads(query: Tensor, batch: tuple[int, ...], alibi_slopes: Tensor | None, sinks: Tensor | None) -> None:
    """ALiBi slopes ``(H,)`` or the batch shape ``(..., H)`` fp32; sinks ``(H,)`` fp32 or query's dtype; one device."""
    H = batch[-1] if batch else 1
    if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32
                                     or tuple(alibi_slopes.shape) not in ((H,), tuple(batch) or (H,))):
        raise ValueError(f"fastattn.attention: alibi_slopes must be float32 of shape ({H},) or {tuple(batch)} (the "
                         f"query heads, or the batch and heads); got {tuple(alibi_slopes.shape)} {alibi_slopes.dtype}")
    if sinks is not None and (sinks.dtype not in (torch.float32, query.dtype) or tuple(sinks.shape) != (H,)):
        raise ValueError(f"fastattn.attention: sinks must be of shape ({H},) (one logit per query head) and dtype "
                         f"float32 or the query's {query.dtype}; got {tuple(sinks.shape)} {sinks.dtype}")
    _runtime.check_same_device("attention", query=query, alibi_slopes=alibi_slopes, sinks=sinks)


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


def _causal_bias(attn_mask, is_causal: bool, query: Tensor, key: Tensor) -> tuple[Tensor | None, bool, int]:
    """A torch ``CausalBias`` mask as the kernel's causal rule: (mask, is_causal, causal_offset)."""
    if CausalBias is None or not isinstance(attn_mask, CausalBias):
        if attn_mask is not None and not isinstance(attn_mask, Tensor):
            raise TypeError(f"fastattn.{_OP}: attn_mask must be a Tensor, a torch CausalBias or None; got "
                            f"{type(attn_mask).__name__}")
        return attn_mask, is_causal, 0
    if is_causal:
        raise ValueError(f"fastattn.{_OP}: pass either is_causal=True or a CausalBias attn_mask, not both")
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (query.size(-2), key.size(-2)):
        raise ValueError(f"fastattn.{_OP}: the CausalBias attn_mask is for lengths ({attn_mask.seq_len_q}, "
                         f"{attn_mask.seq_len_kv}) but query/key have ({query.size(-2)}, {key.size(-2)})")
    lower_right = attn_mask.variant == CausalVariant.LOWER_RIGHT
    return None, True, key.size(-2) - query.size(-2) if lower_right else 0
