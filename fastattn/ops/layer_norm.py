"""Fused residual add + LayerNorm / RMSNorm: argument checks, launchers, and the ``fastattn::add_layer_norm``
custom op with autograd.

Public functions:
- ``add_layer_norm(x, residual, weight, bias, eps, dropout_p)`` -> ``(out, residual_out)`` and its RMSNorm twin
  ``add_rms_norm``: ``residual_out = dropout(x) + residual``, ``out = norm(residual_out)`` over the last dim.
- ``layer_norm`` / ``rms_norm`` with the signatures of ``torch.nn.functional.layer_norm`` / ``rms_norm``.

Inputs are read through their strides: the leading dims are mapped onto at most two strided levels (so views such
as ``x[:, 1:]`` of a ``(B, L, N)`` activation are not copied) and the normalised dim may have any stride. Outputs
are contiguous.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn import _runtime, reference
from fastattn.hwfit import KernelSpec
from fastattn.kernels import layer_norm as K
from fastattn.ops._common import (
    TL_DTYPES,
    check_like_x,
    draw_seed,
    dtype_name,
    fallback_reason,
    seed_int,
    sm_count,
    stat_dtype,
)

# What a forward and a backward launch (the reduction only with a weight or bias to differentiate).
FORWARD_KERNELS = (_runtime.kernel_name(K._layer_norm_fwd),)
BACKWARD_KERNELS = tuple(_runtime.kernel_name(k) for k in (K._layer_norm_bwd, K._layer_norm_bwd_reduce))
MAX_ROWS = 2**31 - 2**16  # row indices are int32 in the kernels (element offsets are int64)


def residual_dtype(x_dtype: torch.dtype, residual_in_fp32: bool) -> torch.dtype:
    """The dtype of ``residual_out``: fp32 for fp16/bf16 ``x`` with ``residual_in_fp32``, else ``x``'s dtype."""
    if residual_in_fp32 and x_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x_dtype


# ---------------------------------------------------------------------------------------------------------------
# strided rows
# ---------------------------------------------------------------------------------------------------------------


def _collapse(sizes: Sequence[int], strides: Sequence[int]) -> int | None:
    """The single stride that walks ``sizes`` (row-major) in ``strides``, or None if there is none."""
    dims = [(s, st) for s, st in zip(sizes, strides, strict=True) if s != 1]
    for (_, outer), (size, inner) in itertools.pairwise(dims):
        if outer != inner * size:
            return None
    return dims[-1][1] if dims else 0


def _split_rows(lead: Sequence[int], tensors: list[Tensor | None]):
    """Map the leading dims of every tensor onto two strided levels: (tensors, M_INNER, [(outer, inner) strides]).

    Row ``r`` of a tensor lives at ``(r // M_INNER) * outer + (r % M_INNER) * inner``. Tensors whose leading dims
    fit no common split are copied to contiguous memory (never for up to two irregular levels).
    """
    for _ in range(2):
        for p in range(len(lead) + 1):
            strides = []
            for t in tensors:
                if t is None:
                    strides.append((0, 0))
                    continue
                st = t.stride()[: len(lead)]
                outer, inner = _collapse(lead[:p], st[:p]), _collapse(lead[p:], st[p:])
                if outer is None or inner is None:
                    break
                strides.append((outer, inner))
            else:
                return tensors, math.prod(lead[p:]), strides
        tensors = [t.contiguous() if t is not None else None for t in tensors]
    raise AssertionError("unreachable: contiguous tensors always collapse")


# The SM count the backward's schedule assumes off a GPU (the interpreter): one, so that the tests see programs that
# own several row blocks.
INTERPRETER_SMS = 1


def device_sms(device: torch.device) -> int:
    """The SM count the launchers schedule for on ``device``."""
    return sm_count(device) if device.type == "cuda" else INTERPRETER_SMS


def backward_programs(num_blocks: int, num_warps: int, num_sms: int) -> tuple[int, int]:
    """(programs, row blocks per program) of the backward: about 32 resident warps per SM.

    A function of the shape, the config and the SM count only, so dweight/dbias are summed in the same order on
    every run on one device (bitwise repeatable); another GPU model may round differently.
    """
    programs = min(num_blocks, num_sms * max(1, 32 // num_warps))
    per = triton.cdiv(num_blocks, programs)
    return triton.cdiv(num_blocks, per), per


class BackwardSchedule(NamedTuple):
    """The backward's launch for one shape on a GPU of a given SM count."""

    programs: int  # programs of _layer_norm_bwd, each owning `per` consecutive row blocks
    per: int
    width: int  # length of a partial-sum row: N on the looped path, BLOCK_N on the tile path
    scratch_bytes: int  # the dweight / dbias partial rows (stat dtype) that _layer_norm_bwd_reduce sums


def backward_schedule(M: int, N: int, dtype: torch.dtype, num_sms: int, partials: int) -> BackwardSchedule:
    """The backward of ``M`` rows of ``N`` in ``dtype`` with ``partials`` (0, 1 or 2) of dweight and dbias to sum:
    a pure function of the shapes and the SM count (the launcher, benchmarks and the memory tracer call it)."""
    if M == 0 or N == 0:  # nothing is launched
        return BackwardSchedule(0, 0, 0, 0)
    cfg = K.bwd_config(N)
    programs, per = backward_programs(triton.cdiv(M, cfg.kwargs["BLOCK_M"]), cfg.num_warps, num_sms)
    width = N if cfg.kwargs["LOOPED"] else cfg.kwargs["BLOCK_N"]
    return BackwardSchedule(programs, per, width, partials * programs * width * stat_dtype(dtype).itemsize)


# ---------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty((0,), device=like.device, dtype=dtype)


def _forward(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
             dropout_p: float, seed: int, is_rms: bool, residual_in_fp32: bool, store_residual: bool,
             round_xhat: bool = False, out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lead, N = tuple(x.shape[:-1]), x.shape[-1]
    M = math.prod(lead)
    stat = stat_dtype(x.dtype)
    z_dtype = residual_dtype(x.dtype, residual_in_fp32)
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype)
    res_out = torch.empty(x.shape, device=x.device, dtype=z_dtype) if store_residual else _empty(x, z_dtype)
    mean = _empty(x, stat) if is_rms else torch.empty((M,), device=x.device, dtype=stat)
    rstd = torch.empty((M,), device=x.device, dtype=stat)
    if M == 0 or N == 0:
        return out, res_out, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    (x, residual), m_inner, ((sxo, sxi), (sro, sri)) = _split_rows(lead, [x, residual])
    cfg = K.fwd_config(N)
    _runtime.launch(
        K._layer_norm_fwd, (triton.cdiv(M, cfg.kwargs["BLOCK_M"]),),
        x, residual, _param(weight), _param(bias), out, res_out if store_residual else None,
        None if is_rms else mean, rstd,
        sxo, sxi, x.stride(-1), sro, sri, residual.stride(-1) if residual is not None else 0,
        M, N, m_inner, float(eps), seed, float(dropout_p),
        IS_RMS=is_rms, HAS_DROPOUT=dropout_p > 0.0, Z_DT=TL_DTYPES[z_dtype], ACC=TL_DTYPES[stat],
        ROUND_XHAT=round_xhat, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs,
    )
    return out, res_out, mean, rstd


def _param(p: Tensor | None) -> Tensor | None:
    # (N,) parameters are read at unit stride; a strided one (never seen in practice) is copied, N elements.
    return p.contiguous() if p is not None else None


def _backward(dy: Tensor, dz: Tensor | None, z: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
              dropout_p: float, seed: int, is_rms: bool, dx_dtype: torch.dtype | None,
              dres_dtype: torch.dtype | None, need_dweight: bool, dbias_dtype: torch.dtype | None,
              round_xhat: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lead, N = tuple(z.shape[:-1]), z.shape[-1]
    M = math.prod(lead)
    stat = stat_dtype(z.dtype)
    dx = torch.empty(z.shape, device=z.device, dtype=dx_dtype) if dx_dtype else _empty(z, z.dtype)
    dres = torch.empty(z.shape, device=z.device, dtype=dres_dtype) if dres_dtype else _empty(z, z.dtype)
    need_dweight = need_dweight and weight is not None
    dw = torch.empty((N,), device=z.device, dtype=weight.dtype) if need_dweight else _empty(z, z.dtype)
    db = torch.empty((N,), device=z.device, dtype=dbias_dtype) if dbias_dtype else _empty(z, z.dtype)
    if M == 0 or N == 0:
        return dx, dres, dw.zero_(), db.zero_()
    cfg = K.bwd_config(N)
    programs, per, width, _ = backward_schedule(M, N, z.dtype, device_sms(z.device), 0)
    # Partial-sum rows: the looped path accumulates into zeroed rows of N, the tile path writes whole BLOCK_N rows.
    alloc = torch.zeros if cfg.kwargs["LOOPED"] else torch.empty
    dwp = alloc((programs, width), device=z.device, dtype=stat) if need_dweight else None
    dbp = alloc((programs, width), device=z.device, dtype=stat) if dbias_dtype else None
    (z, dy, dz), m_inner, strides = _split_rows(lead, [z, dy, dz])
    (szo, szi), (syo, syi), (sdo, sdi) = strides
    _runtime.launch(
        K._layer_norm_bwd, (programs,),
        z, dy, dz, _param(weight), None if is_rms else mean, rstd, dx if dx_dtype else None,
        dres if dres_dtype else None, dwp, dbp,
        szo, szi, z.stride(-1), syo, syi, dy.stride(-1), sdo, sdi, dz.stride(-1) if dz is not None else 0, width,
        M, N, m_inner, per, seed, float(dropout_p),
        IS_RMS=is_rms, HAS_DROPOUT=dropout_p > 0.0, ACC=TL_DTYPES[stat], ROUND_XHAT=round_xhat,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs,
    )
    if dwp is not None or dbp is not None:
        rc = K.REDUCE_CONFIG
        _runtime.launch(K._layer_norm_bwd_reduce, (triton.cdiv(N, rc.kwargs["BLOCK_N"]),), dwp, dbp,
                        dw if need_dweight else None, db if dbias_dtype else None, width, programs, N,
                        ACC=TL_DTYPES[stat], num_warps=rc.num_warps, **rc.kwargs)
    return dx, dres, dw, db


def dropout_keep_mask(seed: int, shape: tuple[int, int], dropout_p: float, device: torch.device) -> Tensor:
    """The boolean keep-mask ``(M, N)`` (rows = all leading dims flattened) that the kernels draw for ``seed``."""
    M, N = shape
    keep = torch.empty(shape, device=device, dtype=torch.bool)
    cfg = K.MASK_CONFIG
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    _runtime.launch(K._layer_norm_dropout_mask, (triton.cdiv(M, bm), triton.cdiv(N, bn)), keep, M, N, seed,
                    float(dropout_p), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs)
    return keep


# ---------------------------------------------------------------------------------------------------------------
# custom op + autograd
# ---------------------------------------------------------------------------------------------------------------


# torch.library.custom_op reads these annotations; Optional[...] is understood by every torch we support.
OptTensor = Optional[Tensor]  # noqa: UP045
OptDtype = Optional[torch.dtype]  # noqa: UP045


@torch.library.custom_op("fastattn::add_layer_norm", mutates_args=(), device_types=None)
def add_layer_norm_op(x: Tensor, residual: OptTensor, weight: OptTensor, bias: OptTensor,
                      eps: float, dropout_p: float, seed: OptTensor, is_rms: bool, residual_in_fp32: bool,
                      store_residual: bool, round_xhat: bool = False,
                      out_dtype: OptDtype = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, residual_out or empty, mean (empty for RMSNorm), rstd) over the last dim of ``x``. ``round_xhat``:
    round the normalised value to the residual stream's dtype before the weight multiply; ``out_dtype``: the
    output's dtype (None: ``x``'s)."""
    return _forward(x, residual, weight, bias, eps, dropout_p, seed_int(seed), is_rms, residual_in_fp32,
                    store_residual, round_xhat, out_dtype)


@add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed, is_rms, residual_in_fp32, store_residual, round_xhat=False,
      out_dtype=None):
    M = math.prod(x.shape[:-1])
    stat = stat_dtype(x.dtype)
    z_dtype = residual_dtype(x.dtype, residual_in_fp32)
    res_out = x.new_empty(x.shape if store_residual else (0,), dtype=z_dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format, dtype=out_dtype or x.dtype), res_out,
            x.new_empty((0,) if is_rms else (M,), dtype=stat), x.new_empty((M,), dtype=stat))


@torch.library.custom_op("fastattn::add_layer_norm_backward", mutates_args=(), device_types=None)
def add_layer_norm_backward_op(dout: Tensor, dresidual_out: OptTensor, z: Tensor, weight: OptTensor,
                               mean: Tensor, rstd: Tensor, dropout_p: float, seed: OptTensor, is_rms: bool,
                               dx_dtype: OptDtype, dresidual_dtype: OptDtype,
                               need_dweight: bool, dbias_dtype: OptDtype,
                               round_xhat: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dweight, dbias) of ``fastattn::add_layer_norm``; each is empty where its dtype is None."""
    return _backward(dout, dresidual_out, z, weight, mean, rstd, dropout_p, seed_int(seed), is_rms, dx_dtype,
                     dresidual_dtype, need_dweight, dbias_dtype, round_xhat)


@add_layer_norm_backward_op.register_fake
def _(dout, dresidual_out, z, weight, mean, rstd, dropout_p, seed, is_rms, dx_dtype, dresidual_dtype, need_dweight,
      dbias_dtype, round_xhat=False):
    N = z.shape[-1]

    def full(dtype):
        return z.new_empty(z.shape, dtype=dtype) if dtype else z.new_empty((0,))

    dw = z.new_empty((N,), dtype=weight.dtype) if need_dweight and weight is not None else z.new_empty((0,))
    db = z.new_empty((N,), dtype=dbias_dtype) if dbias_dtype else z.new_empty((0,))
    return full(dx_dtype), full(dresidual_dtype), dw, db


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, dropout_p, seed, is_rms, residual_in_fp32, store_residual, round_xhat, _ = inputs
    out, res_out, mean, rstd = output
    z_dtype = residual_dtype(x.dtype, residual_in_fp32)
    z_is_x = residual is None and dropout_p == 0.0 and z_dtype == x.dtype
    ctx.z_missing = not z_is_x and not store_residual
    ctx.save_for_backward(x if z_is_x else res_out, weight, mean, rstd, seed)
    ctx.args = (dropout_p, is_rms, round_xhat)
    ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None,
                  bias.dtype if bias is not None else None, out.dtype)
    ctx.stored = store_residual
    ctx.set_materialize_grads(False)  # unused outputs (mean, rstd, often residual_out) arrive as None, not zeros


def _backward_autograd(ctx, dout, dres_out, _dmean, _drstd):
    if ctx.z_missing:
        raise RuntimeError("fastattn.add_layer_norm: backward needs residual_out, but the op ran with "
                           "store_residual=False; call the public fastattn.add_layer_norm instead")
    z, weight, mean, rstd, seed = ctx.saved_tensors
    dropout_p, is_rms, round_xhat = ctx.args
    x_dtype, r_dtype, b_dtype, out_dtype = ctx.dtypes
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    if dout is None:
        dout = torch.zeros(z.shape, device=z.device, dtype=out_dtype)
    if not ctx.stored or dres_out is None or dres_out.shape != z.shape:
        dres_out = None
    # Without dropout and with one dtype, dresidual equals dx: one tensor serves both (as for torch's add).
    separate = need_r and (dropout_p > 0.0 or r_dtype != x_dtype)
    dx_needed = need_x or (need_r and not separate)
    dx, dres, dw, db = add_layer_norm_backward_op(
        dout, dres_out, z, weight, mean, rstd, dropout_p, seed, is_rms, x_dtype if dx_needed else None,
        r_dtype if separate else None, bool(need_w), b_dtype if need_b else None, round_xhat)
    return (dx if need_x else None, (dres if separate else dx) if need_r else None, dw if need_w else None,
            db if need_b else None, None, None, None, None, None, None, None, None)


add_layer_norm_op.register_autograd(_backward_autograd, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def _check(op: str, x, residual, weight, bias, eps, dropout_p, residual_in_fp32, norm_shape: tuple[int, ...]):
    if not isinstance(x, Tensor):
        raise TypeError(f"fastattn.{op}: x must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"fastattn.{op}: x must be a floating-point tensor; got {dtype_name(x.dtype)}")
    if x.dim() == 0:
        raise ValueError(f"fastattn.{op}: x must have at least one dim (the normalised one); got a 0-dim tensor")
    if not norm_shape:  # torch raises too; flattening no dims would normalise every element on its own
        raise ValueError(f"fastattn.{op}: normalized_shape must have at least one dim; got ()")
    if x.dim() < len(norm_shape) or tuple(x.shape[x.dim() - len(norm_shape):]) != norm_shape:
        raise ValueError(f"fastattn.{op}: normalized_shape {norm_shape} must equal the trailing dims of x; "
                         f"got x of shape {tuple(x.shape)}")
    check_like_x(op, "residual", residual, x)
    if residual is not None:
        ok = (x.dtype,) + ((torch.float32,) if residual_in_fp32 else ())
        if residual.dtype not in ok:
            hint = "" if residual_in_fp32 else " (an fp32 residual stream needs residual_in_fp32=True)"
            raise TypeError(f"fastattn.{op}: residual must have dtype {' or '.join(map(dtype_name, ok))}; got "
                            f"{dtype_name(residual.dtype)}{hint}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, Tensor):
            raise TypeError(f"fastattn.{op}: {name} must be a Tensor or None, got {type(p).__name__}")
        if tuple(p.shape) != norm_shape:
            raise ValueError(f"fastattn.{op}: {name} must have shape {norm_shape} (the normalised trailing dims of "
                             f"x); got {tuple(p.shape)}")
        if p.dtype not in (x.dtype, torch.float32):
            allowed = dtype_name(x.dtype) + (" or float32" if x.dtype != torch.float32 else "")
            raise TypeError(f"fastattn.{op}: {name} must have x's dtype {allowed}; got {dtype_name(p.dtype)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 < float(eps) < math.inf):
        raise ValueError(f"fastattn.{op}: eps must be a positive finite float; got {eps!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"fastattn.{op}: dropout_p must be a float in [0, 1); got {dropout_p!r}")
    if not isinstance(residual_in_fp32, bool):
        raise TypeError(f"fastattn.{op}: residual_in_fp32 must be a bool; got {type(residual_in_fp32).__name__}")
    _runtime.check_same_device(op, x=x, residual=residual, weight=weight, bias=bias)


def _fallback_reason(x: Tensor) -> str | None:
    reason = fallback_reason(x.device, x.dtype)
    if reason is None and math.prod(x.shape[:-1]) >= MAX_ROWS:
        reason = f"{math.prod(x.shape[:-1])} rows exceed the kernels' int32 row index (at most {MAX_ROWS - 1})"
    return reason


def _add_norm(op: str, x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
              eps: float, dropout_p: float, residual_in_fp32: bool, return_residual: bool, is_rms: bool,
              norm_shape: tuple[int, ...], *, round_xhat: bool = False, out_dtype: torch.dtype | None = None):
    """The one path of every norm entry point. ``round_xhat``: round the normalised value to the residual stream's
    dtype before the weight multiply (Llama-family RMSNorms); ``out_dtype``: the output's dtype (None: ``x``'s)."""
    _check(op, x, residual, weight, bias, eps, dropout_p, residual_in_fp32, norm_shape)
    eps, dropout_p = float(eps), float(dropout_p)
    shape = x.shape
    if len(norm_shape) != 1:  # normalise over the flattened trailing dims (a view whenever the layout allows)
        n = math.prod(norm_shape)
        x = x.reshape(*shape[: x.dim() - len(norm_shape)], n)
        residual = residual.reshape(x.shape) if residual is not None else None
        weight = weight.reshape(n) if weight is not None else None
        bias = bias.reshape(n) if bias is not None else None

    reason = _fallback_reason(x)
    if reason is not None:
        _runtime.warn_fallback(op, reason)
        if is_rms:
            out, res_out = reference.add_rms_norm(x, residual, weight, eps, dropout_p,
                                                  residual_in_fp32=residual_in_fp32, round_xhat=round_xhat,
                                                  out_dtype=out_dtype)
        else:
            out, res_out = reference.add_layer_norm(x, residual, weight, bias, eps, dropout_p,
                                                    residual_in_fp32=residual_in_fp32)
    else:
        seed = draw_seed(dropout_p)
        z_is_x = residual is None and dropout_p == 0.0 and residual_dtype(x.dtype, residual_in_fp32) == x.dtype
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, residual, weight, bias))
        store = not z_is_x and (return_residual or needs_grad)
        out, res_out, _, _ = add_layer_norm_op(x, residual, weight, bias, eps, dropout_p, seed, is_rms,
                                               residual_in_fp32, store, round_xhat, out_dtype)
        if z_is_x:
            res_out = x
    if len(norm_shape) != 1:
        out, res_out = out.reshape(shape), res_out.reshape(shape)
    return (out, res_out) if return_residual else out


def add_layer_norm(x: Tensor, residual: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None,
                   eps: float = 1e-5, dropout_p: float = 0.0, *, residual_in_fp32: bool = False,
                   return_residual: bool = True) -> tuple[Tensor, Tensor] | Tensor:
    """Fused ``residual_out = dropout(x) + residual``, ``out = layer_norm(residual_out)`` over the last dim.

    Returns ``(out, residual_out)``; post-norm blocks use ``out`` (pass ``return_residual=False`` to get only
    ``out``, and the sum is then not written unless the backward needs it), pre-norm blocks carry ``residual_out``
    on as the next residual. ``residual_out`` has ``x``'s dtype, or float32 with ``residual_in_fp32=True`` for
    fp16/bf16 ``x`` (``residual`` may then be float32 too); ``out`` has ``x``'s dtype. Statistics are fp32.
    Dropout (on ``x``, before the add) draws its mask in-kernel from a seed taken from torch's default generator.
    """
    n = x.shape[-1] if isinstance(x, Tensor) and x.dim() else -1
    return _add_norm("add_layer_norm", x, residual, weight, bias, eps, dropout_p, residual_in_fp32, return_residual,
                     False, (n,))


def add_rms_norm(x: Tensor, residual: Tensor | None = None, weight: Tensor | None = None, eps: float = 1e-6,
                 dropout_p: float = 0.0, *, residual_in_fp32: bool = False,
                 return_residual: bool = True) -> tuple[Tensor, Tensor] | Tensor:
    """RMSNorm twin of :func:`add_layer_norm`: ``out = residual_out * rsqrt(mean(residual_out^2) + eps) * weight``."""
    n = x.shape[-1] if isinstance(x, Tensor) and x.dim() else -1
    return _add_norm("add_rms_norm", x, residual, weight, None, eps, dropout_p, residual_in_fp32, return_residual,
                     True, (n,))


def _norm_shape(op: str, normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    if isinstance(normalized_shape, (str, bytes)):
        normalized_shape = None  # iterable, but not a shape
    try:
        return tuple(int(s) for s in normalized_shape)
    except TypeError:
        raise TypeError(f"fastattn.{op}: normalized_shape must be an int or a sequence of ints; got "
                        f"{normalized_shape!r}") from None


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.layer_norm`` (several trailing dims are normalised as one flat dim)."""
    shape = _norm_shape("layer_norm", normalized_shape)
    return _add_norm("layer_norm", input, None, weight, bias, eps, 0.0, False, False, False, shape)


def layer_norm2d(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the channels of an (N, C, H, W) tensor: ConvNeXt's channels-first ``LayerNorm2d``
    (torchvision's and timm's), ``F.layer_norm(x.permute(0, 2, 3, 1), (C,), weight, bias, eps).permute(0, 3, 1, 2)``.

    The kernels read x through its strides, the normalised channel dim at stride H*W (NCHW) or 1 (channels_last):
    no permuted copy. As there, the result is (N, C, H, W) in channels_last memory (the layer norm's rows are the
    N*H*W positions), and so is the gradient of x."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"fastattn.layer_norm2d: x must be a 4-D (N, C, H, W) tensor; got {got}")
    out = _add_norm("layer_norm2d", x.permute(0, 2, 3, 1), None, weight, bias, eps, 0.0, False, False, False,
                    (x.shape[1],))
    return out.permute(0, 3, 1, 2)


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.rms_norm``; ``eps=None`` means ``torch.finfo(input.dtype).eps``."""
    shape = _norm_shape("rms_norm", normalized_shape)
    if eps is None and isinstance(input, Tensor) and input.is_floating_point():
        eps = torch.finfo(input.dtype).eps
    return _add_norm("rms_norm", input, None, weight, None, eps, 0.0, False, False, True, shape)


# ---------------------------------------------------------------------------------------------------------------
# hardware fit
# ---------------------------------------------------------------------------------------------------------------


def kernel_specs() -> list[KernelSpec]:
    """Every (kernel, config) the launchers can pick, each in its heaviest specialisation (residual, dropout,
    weight, bias, residual_out written, xhat rounded before the weight; backward with d residual_out, a separate
    dresidual, dweight and dbias),
    for fp16 activations with an fp32 residual stream and for fp32."""
    meta = torch.device("meta")
    specs: list[KernelSpec] = []
    M = 1000
    for dtype, rdtype in ((torch.float16, torch.float32), (torch.float32, torch.float32)):
        dname = f"{dtype_name(dtype)} (residual {dtype_name(rdtype)})"

        def t(n, dt):
            return torch.empty((M, n), device=meta, dtype=dt)

        stat = torch.empty((M,), device=meta, dtype=torch.float32)
        for cfg in K.all_fwd_configs():
            n = cfg.kwargs["BLOCK_N"] * (3 if cfg.kwargs["LOOPED"] else 1) - 3
            args = {"X": t(n, dtype), "R": t(n, rdtype), "W": t(n, dtype)[0], "B": t(n, dtype)[0], "Out": t(n, dtype),
                    "RO": t(n, rdtype), "Mean": stat, "Rstd": stat, "stride_xo": 0, "stride_xi": n, "stride_xn": 1,
                    "stride_ro": 0, "stride_ri": n, "stride_rn": 1, "M": M, "N": n, "M_INNER": M, "eps": 1e-5,
                    "seed": 1234, "dropout_p": 0.1, "IS_RMS": False, "HAS_DROPOUT": True, "Z_DT": TL_DTYPES[rdtype],
                    "ACC": tl.float32, "ROUND_XHAT": True}
            specs.append(KernelSpec("layer_norm", K._layer_norm_fwd, args, cfg, f"{dname} all features"))
        for cfg in K.all_bwd_configs():
            n = cfg.kwargs["BLOCK_N"] * (3 if cfg.kwargs["LOOPED"] else 1) - 3
            width = n if cfg.kwargs["LOOPED"] else cfg.kwargs["BLOCK_N"]
            part = torch.empty((264, width), device=meta, dtype=torch.float32)
            args = {"Z": t(n, rdtype), "DY": t(n, dtype), "DZ": t(n, rdtype), "W": t(n, dtype)[0], "Mean": stat,
                    "Rstd": stat, "DX": t(n, dtype), "DR": t(n, rdtype), "DWp": part, "DBp": part, "stride_zo": 0,
                    "stride_zi": n, "stride_zn": 1, "stride_dyo": 0, "stride_dyi": n, "stride_dyn": 1,
                    "stride_dzo": 0, "stride_dzi": n, "stride_dzn": 1, "stride_p": width, "M": M, "N": n, "M_INNER": M,
                    "BLOCKS_PER_PROG": 4, "seed": 1234, "dropout_p": 0.1, "IS_RMS": False, "HAS_DROPOUT": True,
                    "ACC": tl.float32, "ROUND_XHAT": True}
            specs.append(KernelSpec("layer_norm", K._layer_norm_bwd, args, cfg, f"{dname} all features"))
        part = torch.empty((264, 4093), device=meta, dtype=torch.float32)
        vec = torch.empty((4093,), device=meta, dtype=dtype)
        args = {"DWp": part, "DBp": part, "DW": vec, "DB": vec, "stride_p": 4093, "G": 264, "N": 4093,
                "ACC": tl.float32}
        specs.append(KernelSpec("layer_norm", K._layer_norm_bwd_reduce, args, K.REDUCE_CONFIG,
                                f"{dtype_name(dtype)} dweight+dbias"))
    keep = torch.empty((M, 4093), device=meta, dtype=torch.bool)
    args = {"Keep": keep, "M": M, "N": 4093, "seed": 1234, "dropout_p": 0.1}
    specs.append(KernelSpec("layer_norm", K._layer_norm_dropout_mask, args, K.MASK_CONFIG, "bool mask"))
    return specs
