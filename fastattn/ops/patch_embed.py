"""Fused ViT patch embedding: argument checks, launchers, and the ``fastattn::patch_embed`` custom op with autograd.

``patch_embed(images, weight, bias, pos_embed, cls_token)`` equals
``cat([cls_token, conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2)], 1) + pos_embed``
(each of bias, pos_embed and cls_token optional) in one GEMM whose loads gather the patches from the image.
The images and the weight are read through their strides (NCHW, channels_last, views): nothing is copied.

Memory: the forward saves the images and the weight, as eager's convolution does (bias, pos_embed and cls_token
enter the tokens linearly: the backward needs only their shapes and dtypes). The backward allocates nothing but the
gradients asked for: the split-K partial sums of dweight live in the dimages buffer before dimages is written
(:func:`dw_schedule`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn import _runtime, reference
from fastattn.hwfit import KernelSpec
from fastattn.kernels import patch_embed as K
from fastattn.ops import _common as common

_OP = "patch_embed"
# What a forward and a backward launch (the backward's kernels each only for the gradients asked for).
FORWARD_KERNELS = (_runtime.kernel_name(K._pe_fwd),)
BACKWARD_KERNELS = tuple(_runtime.kernel_name(k) for k in (K._pe_bwd_dw, K._pe_bwd_reduce, K._pe_bwd_dpos,
                                                           K._pe_bwd_dx))
DPOS_BLOCKS = (8, 4, 128)  # _pe_bwd_dpos: images per step, token rows and features per program
REDUCE_BLOCK = 1024


class _Geometry(NamedTuple):
    B: int
    C: int
    D: int
    P: int
    WP: int  # patches per image row
    N: int  # patch tokens per image
    K: int  # C * P * P
    T: int  # output tokens per image: N (+ 1 with a class token)
    cls: int  # 1 with a class token
    shift: int  # 1 when pos_embed covers the patch tokens only (cls present, pos has N rows): timm's no_embed_class
    korder: int  # reduction order over a patch: 0 (c, i, j) for NCHW, 1 (i, j, c) for channels_last
    x_flat: int  # 1: dense channels_last image rows, (j, c) contiguous (the kernels' X_FLAT)
    w_flat: int  # 2: the weight stores each patch in the reduction order (W_FLAT)


def _geometry(images: Tensor, weight: Tensor, pos_rows: int, has_cls: bool) -> _Geometry:
    """``pos_rows``: rows of the (TP, D) position embedding, 0 without one."""
    B, C, H, W = images.shape
    D, P = weight.shape[0], weight.shape[-1]
    WP = W // P
    N = (H // P) * WP
    shift = int(has_cls and pos_rows == N)
    korder = int(C > 1 and images.stride(1) == 1)
    return _Geometry(B, C, D, P, WP, N, C * P * P, N + int(has_cls), int(has_cls), shift, korder,
                     _image_flat(images, korder), _weight_flat(weight, korder))


def _image_flat(t: Tensor, korder: int) -> int:
    """1 when (j, c) of a pixel row is one contiguous run (dense channels_last), which the kernels exploit."""
    return int(korder == 1 and t.stride(1) == 1 and t.stride(3) == t.shape[1])


def _weight_flat(t: Tensor, korder: int) -> int:
    """2 when each feature's (C, P, P) patch is stored contiguously in the reduction order (offset = k)."""
    if t.shape[0] == 0:
        return 0
    patch = t[0] if korder == 0 else t[0].permute(1, 2, 0)
    return 2 * int(patch.is_contiguous())


def _out_dtype(images: Tensor, pos: Tensor | None, cls: Tensor | None) -> torch.dtype:
    """torch's promotion for ``cat([cls, tokens]) + pos`` (an fp32 pos_embed or cls_token makes fp32 tokens)."""
    dtype = images.dtype
    for t in (pos, cls):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _allow_tf32(dtype: torch.dtype, device: torch.device) -> bool:
    """fp32 uses TF32 exactly where the convolution it replaces would: CUDA with ``torch.backends.cudnn.allow_tf32``."""
    return dtype == torch.float32 and device.type == "cuda" and bool(torch.backends.cudnn.allow_tf32)


def _kernel_flags(dtype: torch.dtype, device: torch.device) -> dict:
    return {"PRECISION": "tf32" if _allow_tf32(dtype, device) else "ieee", "ACC": common.acc_tl(dtype)}


def _strides(t: Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


class DwSchedule(NamedTuple):
    split: int  # token ranges per dW output tile (1: the GEMM writes dweight and dbias themselves)
    rows: int  # tokens per range
    partial_bytes: int  # the ranges' partial sums, held in the dimages buffer (0 with one range)


def dw_schedule(M: int, K: int, D: int, *, room: int, acc_bytes: int, dw: bool = True, dbias: bool = True,
                sms: int, cuda: bool = True) -> DwSchedule:
    """How the dweight (and dbias) reduction over ``M`` tokens is split, for ``K = C P^2`` and ``D`` features.

    Enough ranges to give each of ``sms`` SMs about two programs, each at least ``min_rows`` tokens long, but no
    more partial sums than ``room`` bytes hold: the bytes of the dimages buffer (0 when dimages is not asked for),
    which the partials occupy until the dimages kernel overwrites it. The backward so allocates nothing but its
    gradients, and its peak memory is that of eager's convolution backward; the price is parallelism where images
    need no gradient (the ViT stem): there one range per output tile, ``ceil(K/BLOCK_M) * ceil(D/BLOCK_N)``
    programs. ``acc_bytes``: 4 (fp32 partials), 8 for float64. ``cuda=False``: the interpreter's short ranges, so
    that small test inputs take the split path too. A pure function: ``fastattn.perf`` and the tests call it.
    """
    min_rows, align = (1024, 64) if cuda else (16, 16)
    tiles = (triton.cdiv(K, 128) if dw else 1) * triton.cdiv(D, 128)
    per_range = ((D * K if dw else 0) + (D if dbias else 0)) * acc_bytes
    fits = room // per_range if per_range else 0
    want = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(M, min_rows), fits))
    rows = triton.cdiv(triton.cdiv(M, want), align) * align
    split = triton.cdiv(M, rows)
    return DwSchedule(split, rows, split * per_range if split > 1 else 0)


def _partials(dx: Tensor, split: int, width: int, dtype: torch.dtype) -> Tensor:
    """A (split, width) tensor of ``dtype`` over the first bytes of ``dx``, a fresh ``empty_like`` (dense, offset 0)
    that :func:`dw_schedule` found large enough and that nothing has written yet."""
    elements = split * width * dtype.itemsize // dx.element_size()
    return dx.as_strided((dx.numel(),), (1,))[:elements].view(dtype).view(split, width)


# ---------------------------------------------------------------------------------------------------------------
# launchers (pos: (TP, D) view or None, cls: (D,) view or None)
# ---------------------------------------------------------------------------------------------------------------


def _forward(images: Tensor, weight: Tensor, bias: Tensor | None, pos: Tensor | None,
             cls: Tensor | None) -> Tensor:
    g = _geometry(images, weight, pos.shape[0] if pos is not None else 0, cls is not None)
    out = torch.empty((g.B, g.T, g.D), device=images.device, dtype=_out_dtype(images, pos, cls))
    M = g.B * g.N
    if M == 0 or g.D == 0:
        return out

    def grid(meta):
        return (triton.cdiv(g.D, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))

    _runtime.launch(
        K._pe_fwd, grid, images, weight, bias, pos, cls, out,
        *images.stride(), *weight.stride(), *_strides(bias, 1), *_strides(pos, 2), *_strides(cls, 1), *out.stride(),
        M, g.N, g.WP, g.K, g.D, common.bucket(M),
        C=g.C, P=g.P, KORDER=g.korder, X_FLAT=g.x_flat, W_FLAT=g.w_flat, CLS=g.cls, SHIFT=g.shift,
        **_kernel_flags(images.dtype, images.device),
    )
    return out


def _gradients(images: Tensor, weight: Tensor, pos_rows: int, pos_dtype: torch.dtype, cls_dtype: torch.dtype,
               needs: tuple[bool, ...]) -> tuple[Tensor, ...]:
    """The backward's outputs, uninitialised: (dimages, dweight, dbias, dpos_embed, dcls_token), each a fresh empty
    tensor when not asked for (custom-op outputs must not alias one another). Nothing else is allocated."""
    D = weight.shape[0]
    made = (lambda: torch.empty_like(images), lambda: torch.empty_like(weight),
            lambda: images.new_empty((D,)), lambda: images.new_empty((pos_rows, D), dtype=pos_dtype),
            lambda: images.new_empty((D,), dtype=cls_dtype))
    return tuple(make() if need else images.new_empty((0,)) for make, need in zip(made, needs))


def _backward(dout: Tensor, images: Tensor, weight: Tensor, pos_rows: int, has_cls: bool, pos_dtype: torch.dtype,
              cls_dtype: torch.dtype, need_dx: bool, need_dw: bool, need_dbias: bool, need_dpos: bool,
              need_dcls: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = _geometry(images, weight, pos_rows, has_cls)
    M = g.B * g.N
    dx, dw, db, dpos, dcls = _gradients(images, weight, pos_rows, pos_dtype, cls_dtype,
                                        (need_dx, need_dw, need_dbias, need_dpos, need_dcls))
    if M == 0 or g.D == 0:  # nothing to sum: zero gradients
        return dx.zero_(), dw.zero_(), db.zero_(), dpos.zero_(), dcls.zero_()
    flags = _kernel_flags(images.dtype, images.device)
    geo = {"C": g.C, "P": g.P, "KORDER": g.korder, "CLS": g.cls}

    if need_dw or need_dbias:
        _dweight_dbias(dout, images, weight, g, dx, dw if need_dw else None, db if need_dbias else None, flags, geo)

    if need_dpos or need_dcls:
        rows_t = g.T if need_dpos else 1
        bb, bt, bd = DPOS_BLOCKS
        _runtime.launch(
            K._pe_bwd_dpos, (triton.cdiv(rows_t, bt), triton.cdiv(g.D, bd)),
            dout, dpos if need_dpos else None, dcls if need_dcls else None,
            *dout.stride(), *_strides(dpos if need_dpos else None, 2), dcls.stride(0) if need_dcls else 0,
            g.B, rows_t, g.D, g.shift, ACC=flags["ACC"], BLOCK_B=bb, BLOCK_T=bt, BLOCK_D=bd,
            num_warps=4,
        )

    if need_dx:  # last: until here dx's buffer may hold the dweight partials
        _runtime.launch(
            K._pe_bwd_dx, lambda meta: (triton.cdiv(g.K, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"])),
            dout, weight, dx, *dout.stride(), *weight.stride(), *dx.stride(),
            M, g.N, g.WP, g.K, g.D, common.bucket(M), X_FLAT=_image_flat(dx, g.korder), W_FLAT=g.w_flat, **geo,
            **flags,
        )
    return dx, dw, db, dpos, dcls


def _dweight_dbias(dout: Tensor, images: Tensor, weight: Tensor, g: _Geometry, dx: Tensor, dw: Tensor | None,
                   db: Tensor | None, flags: dict, geo: dict) -> None:
    """dweight and/or dbias (None: not asked for) by the dW GEMM, split as :func:`dw_schedule` says."""
    M = g.B * g.N
    acc = common.stat_dtype(images.dtype)
    sched = dw_schedule(M, g.K, g.D, room=dx.numel() * dx.element_size(), acc_bytes=acc.itemsize,
                        dw=dw is not None, dbias=db is not None, sms=common.sm_count(images.device),
                        cuda=images.device.type == "cuda")
    dw_flat = _weight_flat(dw, g.korder) if dw is not None else 0
    DK = g.D * g.K if dw is not None else 0
    E = DK + (g.D if db is not None else 0)
    if sched.split == 1:  # the GEMM writes the gradients themselves
        DW, DB = dw, db
        dw_strides, db_strides = (0, *_strides(dw, 4)), (0, *_strides(db, 1))
    else:  # partials per range, (D, K) in reduction order then (D,), added in a fixed order by _pe_bwd_reduce
        part = _partials(dx, sched.split, E, acc)
        DW, DB = (part if dw is not None else None), (part[:, DK:] if db is not None else None)
        dw_strides, db_strides = (E, g.K, 0, 0, 0), (E, 1)
    k_blocks = (lambda meta: triton.cdiv(g.K, meta["BLOCK_M"])) if dw is not None else (lambda meta: 1)
    _runtime.launch(
        K._pe_bwd_dw, lambda meta: (k_blocks(meta), triton.cdiv(g.D, meta["BLOCK_N"]), sched.split),
        images, weight, dout, DW, DB,
        *images.stride(), *dout.stride(), *dw_strides, *db_strides,
        M, g.N, g.WP, g.K, g.D, sched.rows, common.bucket(sched.rows), X_FLAT=g.x_flat,
        DW_FLAT=dw_flat if sched.split == 1 else 2, **geo, **flags,
    )
    if sched.split > 1:
        _runtime.launch(
            K._pe_bwd_reduce, (triton.cdiv(E, REDUCE_BLOCK),), part, dw, db,
            *_strides(dw, 4), *_strides(db, 1), sched.split, g.D, g.K,
            C=g.C, P=g.P, KORDER=g.korder, W_FLAT=dw_flat, ACC=flags["ACC"], BLOCK=REDUCE_BLOCK,
        )


# ---------------------------------------------------------------------------------------------------------------
# custom op + autograd
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastattn::patch_embed", mutates_args=(), device_types=None)
def patch_embed_op(images: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None,
                   cls_token: Tensor | None) -> Tensor:
    """Canonical fused patch embedding: images (B, C, H, W), weight (D, C, P, P), bias (D,), pos_embed (TP, D),
    cls_token (D,) -> tokens (B, T, D)."""
    return _forward(images, weight, bias, pos_embed, cls_token)


@patch_embed_op.register_fake
def _(images, weight, bias, pos_embed, cls_token):
    B, _, H, W = images.shape
    P = weight.shape[-1]
    T = (H // P) * (W // P) + (cls_token is not None)
    return images.new_empty((B, T, weight.shape[0]), dtype=_out_dtype(images, pos_embed, cls_token))


@torch.library.custom_op("fastattn::patch_embed_backward", mutates_args=(), device_types=None)
def patch_embed_backward_op(grad_out: Tensor, images: Tensor, weight: Tensor, pos_rows: int, has_cls: bool,
                            pos_dtype: torch.dtype, cls_dtype: torch.dtype, need_dx: bool, need_dw: bool,
                            need_dbias: bool, need_dpos: bool,
                            need_dcls: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dimages, dweight, dbias, dpos_embed, dcls_token) of ``fastattn::patch_embed``; the ones not asked
    for are empty tensors. ``pos_rows`` (0: no pos_embed), ``has_cls``, ``pos_dtype`` and ``cls_dtype`` describe
    the inputs the backward does not read."""
    return _backward(grad_out, images, weight, pos_rows, has_cls, pos_dtype, cls_dtype, need_dx, need_dw, need_dbias,
                     need_dpos, need_dcls)


@patch_embed_backward_op.register_fake
def _(grad_out, images, weight, pos_rows, has_cls, pos_dtype, cls_dtype, need_dx, need_dw, need_dbias, need_dpos,
      need_dcls):
    return _gradients(images, weight, pos_rows, pos_dtype, cls_dtype,
                      (need_dx, need_dw, need_dbias, need_dpos, need_dcls))


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos, cls = inputs
    ctx.save_for_backward(images, weight)  # bias, pos and cls enter linearly: only their shapes and dtypes matter
    ctx.has_bias = bias is not None
    ctx.pos = (pos.shape[0], pos.dtype) if pos is not None else (0, images.dtype)
    ctx.cls = (True, cls.dtype) if cls is not None else (False, images.dtype)


def _backward_autograd(ctx, dout):
    images, weight = ctx.saved_tensors
    (pos_rows, pos_dtype), (has_cls, cls_dtype) = ctx.pos, ctx.cls
    needs = ctx.needs_input_grad
    need = (needs[0], needs[1], ctx.has_bias and needs[2], pos_rows > 0 and needs[3], has_cls and needs[4])
    grads = patch_embed_backward_op(dout, images, weight, pos_rows, has_cls, pos_dtype, cls_dtype, *need)
    return tuple(gr if n else None for gr, n in zip(grads, need))


patch_embed_op.register_autograd(_backward_autograd, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def _check(images: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor | None,
           cls_token: Tensor | None) -> None:
    for name, t, optional in (("images", images, False), ("weight", weight, False), ("bias", bias, True),
                              ("pos_embed", pos_embed, True), ("cls_token", cls_token, True)):
        if not isinstance(t, Tensor) and not (optional and t is None):
            raise TypeError(f"fastattn.{_OP}: {name} must be a Tensor{' or None' if optional else ''}, got "
                            f"{type(t).__name__}")
    _runtime.check_same_device(_OP, images=images, weight=weight, bias=bias, pos_embed=pos_embed,
                               cls_token=cls_token)
    if images.dim() != 4:
        raise ValueError(f"fastattn.{_OP}: images must be 4-D (B, C, H, W); got shape {tuple(images.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"fastattn.{_OP}: weight must be a Conv2d weight (D, C, P, P) with a square P x P patch; "
                         f"got shape {tuple(weight.shape)}")
    common.check_float_dtype(_OP, "images", images, common.KERNEL_DTYPES)
    if weight.dtype != images.dtype or (bias is not None and bias.dtype != images.dtype):
        got = f"images {common.dtype_name(images.dtype)}, weight {common.dtype_name(weight.dtype)}"
        got += f", bias {common.dtype_name(bias.dtype)}" if bias is not None else ""
        raise TypeError(f"fastattn.{_OP}: images, weight and bias must have one dtype (as conv2d requires); got {got}")
    for name, t in (("pos_embed", pos_embed), ("cls_token", cls_token)):
        if t is not None and t.dtype not in (images.dtype, torch.float32):
            raise TypeError(f"fastattn.{_OP}: {name} must have the images' dtype {common.dtype_name(images.dtype)} or "
                            f"float32; got {common.dtype_name(t.dtype)}")
    _, C, H, W = images.shape
    D, CW, P, _ = weight.shape
    if C != CW:
        raise ValueError(f"fastattn.{_OP}: images have {C} channels (shape {tuple(images.shape)}) but weight "
                         f"{tuple(weight.shape)} expects {CW}")
    if P == 0:
        raise ValueError(f"fastattn.{_OP}: weight has patch size 0 (shape {tuple(weight.shape)})")
    if C == 0:  # torch's conv2d returns (B, N, 0) tokens here, dropping the D features its bias would give
        raise ValueError(f"fastattn.{_OP}: images have 0 channels (shape {tuple(images.shape)}); patches need at "
                         f"least one")
    for what, size in (("height", H), ("width", W)):
        if size < P:
            raise ValueError(f"fastattn.{_OP}: image {what} {size} is smaller than patch size {P}")
        if size % P != 0:
            raise ValueError(f"fastattn.{_OP}: image {what} {size} is not a multiple of patch size {P} "
                             f"(images {tuple(images.shape)}); crop or pad the images first")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"fastattn.{_OP}: bias must have shape ({D},); got {tuple(bias.shape)}")
    if cls_token is not None and tuple(cls_token.shape) != (1, 1, D):
        raise ValueError(f"fastattn.{_OP}: cls_token must have shape (1, 1, {D}); got {tuple(cls_token.shape)}")
    if pos_embed is not None:
        N = (H // P) * (W // P)
        rows = (N + 1, N) if cls_token is not None else (N,)
        ok = pos_embed.dim() in (2, 3) and pos_embed.shape[-1] == D and pos_embed.shape[-2] in rows and (
            pos_embed.dim() == 2 or pos_embed.shape[0] == 1)
        if not ok:
            want = " or ".join(f"(1, {r}, {D})" for r in rows)
            raise ValueError(f"fastattn.{_OP}: pos_embed must have shape {want} (or without the leading 1) for "
                             f"{N} patch tokens{' and a class token' if cls_token is not None else ''}; got "
                             f"{tuple(pos_embed.shape)}")


def patch_embed(images: Tensor, weight: Tensor, bias: Tensor | None = None, pos_embed: Tensor | None = None,
                cls_token: Tensor | None = None) -> Tensor:
    """ViT patch embedding in one kernel: tokens ``(B, N[+1], D)`` from images ``(B, C, H, W)``.

    Equals ``t = conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2)``, then
    ``t = cat([cls_token.expand(B, -1, -1), t], 1)`` with a class token, then ``t + pos_embed``. ``weight`` is a
    Conv2d weight ``(D, C, P, P)``; ``pos_embed`` is ``(1, N + 1, D)`` (``(1, N, D)`` without a class token) or
    the same without the leading 1. With a class token, a ``pos_embed`` of ``N`` rows is added to the patch tokens
    only (timm's ``no_embed_class``). ``pos_embed`` and ``cls_token`` may be float32 with half-precision images;
    the tokens then come out in float32, as torch's type promotion gives.
    """
    _check(images, weight, bias, pos_embed, cls_token)
    reason = common.fallback_reason(images.device, images.dtype)
    if reason is not None:
        _runtime.warn_fallback(_OP, reason)
        return reference.patch_embed(images, weight, bias, pos_embed, cls_token)
    D = weight.shape[0]
    pos = pos_embed.reshape(pos_embed.shape[-2], D) if pos_embed is not None else None
    cls = cls_token.reshape(D) if cls_token is not None else None
    return patch_embed_op(images, weight, bias, pos, cls)


# ---------------------------------------------------------------------------------------------------------------
# hardware fit
# ---------------------------------------------------------------------------------------------------------------


def kernel_specs() -> list[KernelSpec]:
    """Every (kernel, config, specialisation) this module can launch on a GPU, for ``fastattn.hwfit``.

    ViT-B/16 at 224 px, batch 8, with bias, class token and position embedding on. Half precision with float32
    pos_embed/cls_token (fp32 tokens and gradients: the widest loads), fp32 (TF32), and the gathers that do not
    vectorise: P = 14 (rows of 28 bytes) and channels_last images with an NCHW weight.
    """
    meta = torch.device("meta")
    specs: list[KernelSpec] = []
    B, D, C = 8, 768, 3
    variants = [  # (name, operand dtype, token dtype, patch size, channels_last)
        ("fp16 P=16 fp32-tokens", torch.float16, torch.float32, 16, False),
        ("bf16 P=16 fp32-tokens", torch.bfloat16, torch.float32, 16, False),
        ("fp32 P=16 tf32", torch.float32, torch.float32, 16, False),
        ("fp16 P=14", torch.float16, torch.float16, 14, False),
        ("fp16 P=16 channels_last", torch.float16, torch.float16, 16, True),
    ]
    for vname, dtype, tok_dtype, P, channels_last in variants:
        H = W = 224
        N, T, Kp = (H // P) * (W // P), (H // P) * (W // P) + 1, C * P * P
        images = torch.empty((B, C, H, W), device=meta, dtype=dtype)
        if channels_last:
            images = images.to(memory_format=torch.channels_last)
        weight = torch.empty((D, C, P, P), device=meta, dtype=dtype)
        g = _geometry(images, weight, 0, True)
        vec = torch.empty((D,), device=meta, dtype=dtype)
        pos = torch.empty((T, D), device=meta, dtype=tok_dtype)
        cls = torch.empty((D,), device=meta, dtype=tok_dtype)
        out = torch.empty((B, T, D), device=meta, dtype=tok_dtype)
        flags = {"ACC": tl.float32, "C": C, "P": P, "KORDER": g.korder, "CLS": 1,
                 "PRECISION": "tf32" if dtype == torch.float32 else "ieee"}
        xs = dict(zip(("stride_xb", "stride_xc", "stride_xh", "stride_xw"), images.stride()))
        ws = dict(zip(("stride_wd", "stride_wc", "stride_wi", "stride_wj"), weight.stride()))
        dos = dict(zip(("stride_dob", "stride_dot", "stride_dod"), out.stride()))
        M = B * N
        sizes = {"M": M, "N": N, "WP": W // P, "K": Kp, "D": D, "M_BUCKET": common.bucket(M)}
        fwd = dict(X=images, Wt=weight, Bias=vec, Pos=pos, Cls=cls, Out=out, **xs, **ws, stride_bias=1,
                   stride_pt=D, stride_pd=1, stride_cls=1, stride_ob=T * D, stride_ot=D, stride_od=1, **sizes,
                   X_FLAT=g.x_flat, W_FLAT=g.w_flat, SHIFT=0, **flags)
        part = torch.empty((4, D * Kp + D), device=meta, dtype=torch.float32)
        dw = dict(X=images, Wt=weight, DO=out, DW=part, DB=part, **xs, **dos, stride_dws=D * Kp + D,
                  stride_dwd=Kp, stride_dwc=0, stride_dwi=0, stride_dwj=0, stride_dbs=D * Kp + D, stride_dbd=1,
                  **sizes, ROWS=448, X_FLAT=g.x_flat, DW_FLAT=2, **flags)
        dw["M_BUCKET"] = 512
        # one range (no dimages to hold partials): the GEMM stores dweight in the weight's dtype and layout
        dw_one = dict(dw, DW=weight, DB=vec, stride_dws=0, stride_dbs=0, ROWS=M, M_BUCKET=sizes["M_BUCKET"],
                      DW_FLAT=g.w_flat, **{f"stride_dw{a}": st for a, st in zip("dcij", weight.stride())})
        dx = dict(DO=out, Wt=weight, DX=images, **dos, **ws, **xs, **sizes, X_FLAT=g.x_flat, W_FLAT=g.w_flat, **flags)
        gemms = ((K._pe_fwd, fwd, vname), (K._pe_bwd_dw, dw, vname), (K._pe_bwd_dw, dw_one, f"{vname} one range"),
                 (K._pe_bwd_dx, dx, vname))
        for kern, args, variant in gemms:
            for cfg in K.gemm_prune(K.gemm_configs(), args):
                tile = cfg.kwargs  # one BLOCK_M x BLOCK_N x BLOCK_K MMA step per iteration of the reduction loop
                specs.append(KernelSpec(_OP, kern, args, cfg, variant, needs_tensor_cores=True,
                                        loop_flops=2 * tile["BLOCK_M"] * tile["BLOCK_N"] * tile["BLOCK_K"]))
        if P != 16 or channels_last:
            continue
        # dbias alone (frozen weight): the dW kernel without its GEMM, and the partials' sum without dweight
        db_only = dict(dw, DW=None, DB=part, stride_dbs=D, DW_FLAT=0)
        for cfg in K.gemm_prune(K.gemm_configs(), db_only):
            specs.append(KernelSpec(_OP, K._pe_bwd_dw, db_only, cfg, f"{vname} dbias only"))
        red = {"Part": part, "DW": weight, "DB": vec, "stride_wd": Kp, "stride_wc": P * P, "stride_wi": P,
               "stride_wj": 1, "stride_bd": 1, "SPLIT": 4, "D": D, "K": Kp, "C": C, "P": P, "KORDER": 0, "W_FLAT": 2,
               "ACC": tl.float32}
        for variant, args in ((vname, red), (f"{vname} dbias only", dict(red, DW=None))):
            specs.append(KernelSpec(_OP, K._pe_bwd_reduce, args, triton.Config({"BLOCK": REDUCE_BLOCK}, num_warps=4),
                                    variant))
        dpos = dict(DO=out, DPos=pos, DCls=cls, **dos, stride_pt=D, stride_pd=1, stride_cls=1, B=B, R=T, D=D,
                    SHIFT=0, ACC=tl.float32)
        bb, bt, bd = DPOS_BLOCKS
        specs.append(KernelSpec(_OP, K._pe_bwd_dpos, dpos, triton.Config({"BLOCK_B": bb, "BLOCK_T": bt,
                                                                          "BLOCK_D": bd}, num_warps=4), vname))
    return specs
