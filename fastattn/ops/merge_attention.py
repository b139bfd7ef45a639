"""Merging partial attention: argument checks, the combine launchers and the ``fastattn::merge_attention`` custom op
with autograd.

``merge_attention(outs, lses)`` combines attention computed over disjoint key sets from each part's output and
log-sum-exp (split-KV decoding, ring or context parallelism). The parts are stacked into one ``(S, R, D)`` buffer
(rows = every leading dim and L, flattened) and merged by one Triton kernel; the backward is one more. The split-KV
decode of :mod:`fastattn.ops.kvcache` calls :func:`combine` on its fp32 partial results: the same kernel.

Why a kernel and not eager torch: the merge is memory-bound, and eager's sequence (stack, logsumexp, exp,
broadcast multiply, sum, cast) writes and re-reads the weighted ``(S, R, D)`` products; the kernel reads each part
once and writes the result once, in one launch each way (ring attention merges once per step, forward and
backward). It also gives the split-KV decode its combine under CUDA graphs without extra launches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
from torch import Tensor

from fastattn import _runtime, reference
from fastattn.hwfit import KernelSpec
from fastattn.kernels import merge_attention as K
from fastattn.ops._common import KERNEL_DTYPES, acc_tl, dtype_name, fallback_reason, stat_dtype

_OP = "merge_attention"
FORWARD_KERNELS = (_runtime.kernel_name(K._merge_fwd),)
BACKWARD_KERNELS = (_runtime.kernel_name(K._merge_bwd),)
LSE_DTYPES = (torch.float32, torch.float64)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(max(d, 1)))


# ---------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------


def combine(parts: Tensor, part_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Merge ``parts (S, R, D)`` with ``part_lse (S, R)`` into ``out (R, D)`` and ``lse (R,)`` (any strides; lse
    contiguous). The split-KV decode's combine and :func:`merge_attention`'s forward."""
    S, R, D = parts.shape
    if R == 0:
        return
    cfg = K.config(_block_d(D))
    _runtime.launch(
        K._merge_fwd, (triton.cdiv(R, cfg.kwargs["BLOCK_R"]),), parts, part_lse, out, lse,
        *parts.stride(), *part_lse.stride(), *out.stride(), S, R, D,
        ACC=acc_tl(parts.dtype), BLOCK_D=_block_d(D), num_warps=cfg.num_warps, **cfg.kwargs,
    )


def _forward(parts: Tensor, part_lse: Tensor) -> tuple[Tensor, Tensor]:
    _, R, D = parts.shape
    out = torch.empty((R, D), device=parts.device, dtype=parts.dtype)
    lse = torch.empty((R,), device=parts.device, dtype=stat_dtype(parts.dtype))
    combine(parts, part_lse, out, lse)
    return out, lse


def _backward(parts: Tensor, part_lse: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None
              ) -> tuple[Tensor, Tensor]:
    S, R, D = parts.shape
    dparts = torch.empty((S, R, D), device=parts.device, dtype=parts.dtype)
    dpart_lse = torch.empty((S, R), device=parts.device, dtype=part_lse.dtype)
    if R == 0:
        return dparts, dpart_lse
    lse, dlse = lse.contiguous(), dlse.contiguous() if dlse is not None else None
    cfg = K.config(_block_d(D))
    _runtime.launch(
        K._merge_bwd, (triton.cdiv(R, cfg.kwargs["BLOCK_R"]),), parts, part_lse, lse, dout, dlse, dparts, dpart_lse,
        *parts.stride(), *part_lse.stride(), *dout.stride(), *dparts.stride(), *dpart_lse.stride(), S, R, D,
        ACC=acc_tl(parts.dtype), BLOCK_D=_block_d(D), num_warps=cfg.num_warps, **cfg.kwargs,
    )
    return dparts, dpart_lse


# ---------------------------------------------------------------------------------------------------------------
# custom op + autograd
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastattn::merge_attention", mutates_args=(), device_types=None)
def merge_attention_op(parts: Tensor, part_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Canonical merge: ``parts (S, R, D)``, ``part_lse (S, R)`` -> ``(out (R, D), lse (R,))``."""
    return _forward(parts, part_lse)


@merge_attention_op.register_fake
def _(parts, part_lse):
    _, R, D = parts.shape
    return parts.new_empty((R, D)), parts.new_empty((R,), dtype=stat_dtype(parts.dtype))


@torch.library.custom_op("fastattn::merge_attention_backward", mutates_args=(), device_types=None)
def merge_attention_backward_op(parts: Tensor, part_lse: Tensor, lse: Tensor, dout: Tensor,
                                dlse: Tensor | None) -> tuple[Tensor, Tensor]:
    """Gradients ``(dparts (S, R, D), dpart_lse (S, R))`` of ``fastattn::merge_attention``."""
    return _backward(parts, part_lse, lse, dout, dlse)


@merge_attention_backward_op.register_fake
def _(parts, part_lse, lse, dout, dlse):
    return torch.empty_like(parts, memory_format=torch.contiguous_format), torch.empty_like(
        part_lse, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    parts, part_lse = inputs
    ctx.save_for_backward(parts, part_lse, output[1])
    ctx.set_materialize_grads(False)  # an unused out or lse arrives as None


def _backward_autograd(ctx, dout, dlse):
    parts, part_lse, lse = ctx.saved_tensors
    if dout is None:
        dout = parts.new_zeros(parts.shape[1:])
    return merge_attention_backward_op(parts, part_lse, lse, dout, dlse)


merge_attention_op.register_autograd(_backward_autograd, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def _check(outs, lses) -> None:
    for name, seq in (("outs", outs), ("lses", lses)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"fastattn.{_OP}: {name} must be a list or tuple of tensors (one per part); got "
                            f"{type(seq).__name__}")
        for i, t in enumerate(seq):
            if not isinstance(t, Tensor):
                raise TypeError(f"fastattn.{_OP}: {name}[{i}] must be a Tensor; got {type(t).__name__}")
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"fastattn.{_OP}: outs and lses must hold the same number (>= 1) of parts; got "
                         f"{len(outs)} and {len(lses)}")
    first = outs[0]
    if first.dim() < 2:
        raise ValueError(f"fastattn.{_OP}: outs[0] must have shape (..., L, D); got {tuple(first.shape)}")
    if first.dtype not in KERNEL_DTYPES:
        raise TypeError(f"fastattn.{_OP}: outs must be {', '.join(map(dtype_name, KERNEL_DTYPES))}; got "
                        f"{dtype_name(first.dtype)}")
    for i, (o, x) in enumerate(zip(outs, lses)):
        if o.shape != first.shape or o.dtype != first.dtype:
            raise ValueError(f"fastattn.{_OP}: every part's output must have outs[0]'s shape and dtype "
                             f"{tuple(first.shape)} {dtype_name(first.dtype)}; outs[{i}] is {tuple(o.shape)} "
                             f"{dtype_name(o.dtype)}")
        if x.dtype not in LSE_DTYPES:
            raise TypeError(f"fastattn.{_OP}: lses must be float32 or float64 (natural-log log-sum-exps, as "
                            f"fastattn.attention(..., return_lse=True) returns); lses[{i}] is {dtype_name(x.dtype)}")
        if x.shape != first.shape[:-1] or x.dtype != lses[0].dtype:
            raise ValueError(f"fastattn.{_OP}: lses[{i}] must have shape {tuple(first.shape[:-1])} (outs' shape "
                             f"without the last dim) and lses[0]'s dtype {dtype_name(lses[0].dtype)}; got "
                             f"{tuple(x.shape)} {dtype_name(x.dtype)}")
    _runtime.check_same_device(_OP, **{f"outs[{i}]": o for i, o in enumerate(outs)},
                               **{f"lses[{i}]": x for i, x in enumerate(lses)})


def merge_attention(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Combine attention over disjoint key sets: ``outs[s] (..., L, D)`` and ``lses[s] (..., L)`` of each part
    (fp32 natural-log log-sum-exps, as ``fastattn.attention(..., return_lse=True)`` returns) -> ``(out, lse)``,
    the attention over the union of the keys: ``out`` in outs' dtype, ``lse`` fp32 (fp64 for fp64 outs).

    Differentiable in every ``outs[s]`` and ``lses[s]``. A part with ``lse = -inf`` for a row (no keys there)
    contributes nothing and gets zero gradients, whatever its output holds; a row empty in every part gives
    ``out = 0``, ``lse = -inf``. The parts are stacked (one copy) before the kernel reads them.
    """
    _check(outs, lses)
    shape = outs[0].shape
    reason = fallback_reason(outs[0].device, outs[0].dtype)
    if reason is None and shape[-1] > K.MAX_BLOCK_D:
        reason = f"head dim {shape[-1]} is above the kernels' limit of {K.MAX_BLOCK_D}"
    if reason is not None:
        _runtime.warn_fallback(_OP, reason)
        return reference.merge_attention(outs, lses)
    parts = torch.stack(list(outs)).reshape(len(outs), -1, shape[-1])  # (S, R, D)
    part_lse = torch.stack(list(lses)).reshape(len(lses), -1)  # (S, R)
    out, lse = merge_attention_op(parts, part_lse)
    return out.reshape(shape), lse.reshape(shape[:-1])


# ---------------------------------------------------------------------------------------------------------------
# hardware fit
# ---------------------------------------------------------------------------------------------------------------


def kernel_specs() -> list[KernelSpec]:
    """The forward and backward kernels for each activation dtype and padded head dim (16 .. 256), with an
    incoming lse gradient (the backward's only optional input)."""
    meta = torch.device("meta")
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d in (16, 32, 64, 128, 256):
            cfg = K.config(d)
            parts = torch.empty((4, 4096, d), device=meta, dtype=dtype)
            stat = torch.empty((4, 4096), device=meta, dtype=torch.float32)
            row, tile = stat[0], parts[0]
            common = {"stride_ps": 4096 * d, "stride_pr": d, "stride_pd": 1, "stride_ls": 4096, "stride_lr": 1,
                      "S": 4, "R": 4096, "D": d, "ACC": acc_tl(dtype), "BLOCK_D": d}
            fwd = {**common, "Parts": parts, "PartLse": stat, "Out": tile, "Lse": row, "stride_or": d,
                   "stride_od": 1}
            bwd = {**common, "Parts": parts, "PartLse": stat, "Lse": row, "DOut": tile, "DLse": row,
                   "DParts": parts, "DPartLse": stat, "stride_dor": d, "stride_dod": 1, "stride_dps": 4096 * d,
                   "stride_dpr": d, "stride_dpd": 1, "stride_dls": 4096, "stride_dlr": 1}
            for kern, args in ((K._merge_fwd, fwd), (K._merge_bwd, bwd)):
                specs.append(KernelSpec(_OP, kern, args, cfg, f"{dtype_name(dtype)} D<={d}"))
    return specs
