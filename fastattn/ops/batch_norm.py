"""Fused BatchNorm + residual add + activation: argument checks, launchers, ``torch.library`` custom ops with
autograd.

``batch_norm_act(x, identity, running_mean, running_var, weight, bias, training, momentum, eps, activation=...)``
equals ``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + identity)``;
``batch_norm_add_relu`` is its ReLU case (the ResNet block tail), on the same kernels.

Two custom ops, because torch.library accepts an autograd formula only for a functional op:
- ``fastattn::batch_norm_stats`` (training only) computes the batch mean and 1/std and updates the running
  statistics in place (``mutates_args=("running_mean", "running_var")``, so torch.compile functionalizes it). It
  is called on ``x.detach()``: autograd never differentiates it.
- ``fastattn::batch_norm_act`` normalizes, adds and activates. Its backward is the whole BatchNorm backward,
  including the dependence of the batch statistics on x, so nothing is lost by the detach above.
x is read through its strides (NCHW, channels_last or any other view) without copies; the output keeps x's layout.

With an identity, the gradient flows as eager's does through its add, so that a network's peak memory is not raised:
didentity is the gradient of the pre-activation itself (no copy), and for ReLU that gradient, dz = dy * (out > 0),
is made by a second, kernel-free autograd node (:class:`_ReLUMask`, eager's threshold_backward) after which autograd
frees dy before the BatchNorm backward allocates dx: dz and dx live at once, not dy, dz and dx. The activations whose
derivative is taken at z keep one node: their backward holds dy, dz and dx at once, as many as eager's, whose
activation backward holds dy, its saved z and dz (the fused op never saves z).

What the backward keeps (besides x and per-channel statistics): ReLU's output (its mask, as torch's own rule; the
next layer usually holds it anyway); for the activations whose derivative is taken at the pre-activation z (every
other one but identity) nothing more without an identity, else the identity, from which z is recomputed exactly as
the forward computed it. In training the backward's fp64 partial sums live in dx's buffer before dx is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn import _runtime, reference
from fastattn.hwfit import KernelSpec
from fastattn.kernels import batch_norm as K
from fastattn.ops._common import (
    KERNEL_DTYPES,
    acc_tl,
    bucket,
    check_float_dtype,
    check_like_x,
    dtype_name,
    fallback_reason,
    stat_dtype,
)

_OP = "batch_norm_act"
ACTIVATIONS = tuple(K.ACTIVATIONS)  # the names ``activation=`` takes
# What a forward and a backward launch: training runs all three (statistics, combine, apply / reduce, combine, dx),
# eval the apply pass and the backward reduction only (plus the combine for dweight/dbias).
FORWARD_KERNELS = tuple(_runtime.kernel_name(k) for k in (K._bn_fwd_reduce, K._bn_fwd_combine, K._bn_fwd_apply))
BACKWARD_KERNELS = tuple(_runtime.kernel_name(k) for k in (K._bn_bwd_reduce, K._bn_bwd_combine, K._bn_bwd_dx))
# The saved rstd, the shift and dx's coefficients have ops._common.stat_dtype (fp32, fp64 for fp64 inputs);
# partial sums and the saved training mean are always fp64. The batch mean is kept in fp64 (C values): the kernels
# subtract it as hi + lo (kernels/batch_norm._mean_hi_lo), so an activation mean large against its spread costs no
# fp32 rounding of the mean in out, dx or dweight.
MEAN_DTYPE = torch.float64


def grad_from(activation: str) -> str | None:
    """Where the backward takes the activation's derivative: ``"out"`` (ReLU: the mask of its output), ``"z"`` (the
    pre-activation, recomputed from x and the identity) or None (identity: nothing)."""
    code = K.ACTIVATIONS[activation]
    return "out" if code == K.ACT_RELU else ("z" if code >= K.FROM_Z else None)


def _layout(shape: torch.Size, *tensors: Tensor | None) -> tuple[int, int, int, list[tuple[int, int, int, int]]]:
    """View every (N, C, H, W) tensor as (A1, A2, C, B) with one set of sizes and each its own strides.

    The non-channel dims (N, H, W) are merged, outer into inner, wherever every tensor's strides allow it, so
    NCHW gives (A1, A2, B) = (1, N, H*W) and channels_last (1, 1, N*H*W); any other view keeps up to three dims.
    Returns A = A1 * A2, A2, B and per tensor (stride_a1, stride_a2, stride_c, stride_b); None gets zeros.
    """
    present = [t for t in tensors if t is not None]
    dims: list[tuple[int, list[int]]] = []  # (size, stride of each present tensor), outer to inner
    for d in (0, 2, 3):
        size = shape[d]
        if size == 1:
            continue
        strides = [t.stride(d) for t in present]
        if dims and all(outer == size * inner for outer, inner in zip(dims[-1][1], strides)):
            dims[-1] = (dims[-1][0] * size, strides)
        else:
            dims.append((size, strides))
    while len(dims) < 3:
        dims.insert(0, (1, [0] * len(present)))
    (a1, s1), (a2, s2), (b, sb) = dims
    out, i = [], 0
    for t in tensors:
        if t is None:
            out.append((0, 0, 0, 0))
        else:
            out.append((s1[i], s2[i], t.stride(1), sb[i]))
            i += 1
    return a1 * a2, a2, b, out


def _channels_inner(strides: tuple[int, int, int, int], B: int) -> int:
    """Autotune key: 1 when the channel stride is the smaller one (channels_last, or H*W == 1)."""
    return int(B == 1 or abs(strides[2]) < abs(strides[3]))


def _num_partials(M: int, C: int, device: torch.device) -> int:
    """How many ranges of each channel's M values are summed in parallel (S; never depends on the config)."""
    if device.type != "cuda":  # the interpreter: a few, so the tests exercise the two-level reduction
        return max(1, min(4, triton.cdiv(M, 64)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # About eight programs per SM for channel blocks of 32, and at least 256 values per channel in a partial.
    return max(1, min(triton.cdiv(8 * sms * 32, C), triton.cdiv(M, 256), 4096))


def lane_terms(x: Tensor) -> int:
    """The most values one lane of the statistics or backward reduction adds in fp32 before the float64 partials
    (the rounding floors of ``fastattn.testing.batch_norm_floors``): one value per tile of its partial's range, for
    any config (tiles are at least 16 long on B)."""
    N, C, H, W = x.shape
    A, _, B, _ = _layout(x.shape, x)
    S = _num_partials(N * H * W, C, x.device)
    return max(1, triton.cdiv(A * triton.cdiv(B, min(b for b, _ in K.TILES)), S))


# ---------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------


def _stats(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
           num_batches_tracked: Tensor | None, momentum: float, eps: float) -> tuple[Tensor, Tensor]:
    """Batch mean and 1/sqrt(var + eps) per channel (stat dtype); updates the running statistics in place."""
    N, C, H, W = x.shape
    M = N * H * W
    sdt = stat_dtype(x.dtype)
    mean = torch.empty(C, device=x.device, dtype=MEAN_DTYPE)
    rstd = torch.empty(C, device=x.device, dtype=sdt)
    if M == 0 or C == 0:  # as torch: empty batch, running statistics untouched
        return mean.zero_(), rstd.zero_()
    A, A2, B, (sx,) = _layout(x.shape, x)
    S = _num_partials(M, C, x.device)
    partial = torch.empty((2, S, C), device=x.device, dtype=torch.float64)
    shift = torch.empty((C,), device=x.device, dtype=sdt)
    _runtime.launch(
        K._bn_fwd_reduce, lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), S), x, partial, shift, *sx, A, A2, B, C, S,
        bucket(B), bucket(C), _channels_inner(sx, B), ACC=acc_tl(x.dtype),
    )
    has_running = running_mean is not None
    cumulative = has_running and num_batches_tracked is not None
    _runtime.launch(
        K._bn_fwd_combine, lambda meta: (triton.cdiv(C, meta["BLOCK_C"]),),
        # without running statistics the autotuner's restore_value still needs tensors: mean and rstd stand in
        partial, shift, mean, rstd, running_mean if has_running else mean, running_var if has_running else rstd,
        num_batches_tracked if cumulative else None, C, S, M, bucket(C), float(momentum), float(eps),
        HAS_RUNNING=has_running, CUMULATIVE=cumulative, BLOCK_S=K.BLOCK_S,
    )
    return mean, rstd


def _tiles(C: int, A: int, B: int):
    def grid(meta):
        return (triton.cdiv(C, meta["BLOCK_C"]) * A * triton.cdiv(B, meta["BLOCK_B"]),)
    return grid


def _apply(x: Tensor, identity: Tensor | None, mean: Tensor, var_or_rstd: Tensor, weight: Tensor | None,
           bias: Tensor | None, training: bool, eps: float, activation: str, slope: float) -> Tensor:
    out = torch.empty_like(x)
    C = x.shape[1]
    if out.numel() == 0:
        return out
    A, A2, B, (sx, si, so) = _layout(x.shape, x, identity, out)
    _runtime.launch(
        K._bn_fwd_apply, _tiles(C, A, B), x, identity, out, mean, var_or_rstd, weight, bias, *sx, *si, *so, A2, B, C,
        bucket(B), bucket(C), _channels_inner(sx, B), float(eps), float(slope), IS_EVAL=not training,
        ACT=K.ACTIVATIONS[activation], ACC=acc_tl(x.dtype),
    )
    return out


def _empty_grad(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _dx_holding_partials(x: Tensor, S: int) -> tuple[Tensor, Tensor | None]:
    """dx (x's dense layout) and, when its buffer is large enough, the (2, S, C) fp64 partial sums inside it: the
    training backward sums into them and combines them before _bn_bwd_dx writes dx, so they cost no memory."""
    C = x.shape[1]
    dx = torch.empty_like(x)  # dense: its dims in memory order are contiguous
    flat = dx.permute(sorted(range(4), key=lambda d: -dx.stride(d))).view(-1)
    nbytes = 2 * S * C * 8
    if flat.numel() * flat.element_size() < nbytes:
        return dx, None
    return dx, flat.view(torch.uint8)[:nbytes].view(torch.float64).view(2, S, C)


def scratch_bytes(x: Tensor, training: bool, need_dx: bool, need_sums: bool, S: int) -> int:
    """Bytes the backward allocates besides its results: the fp64 partial sums (none in training with dx, where they
    live in dx's buffer) and, training with dx, the (3, C) coefficients. ``S``: :func:`_num_partials`."""
    N, C, H, W = x.shape
    if N * H * W == 0 or C == 0 or not need_sums:
        return 0
    in_dx = training and need_dx and x.numel() * x.element_size() >= 2 * S * C * 8
    coef = 3 * C * torch.empty((), dtype=stat_dtype(x.dtype)).element_size() if training and need_dx else 0
    return (0 if in_dx else 2 * S * C * 8) + coef


def _backward(dy: Tensor, x: Tensor, out: Tensor | None, identity: Tensor | None, mean: Tensor, var_or_rstd: Tensor,
              weight: Tensor | None, bias: Tensor | None, training: bool, eps: float, activation: str, slope: float,
              need_dx: bool, need_did: bool, need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, didentity, dweight, dbias); ``out`` is read for ReLU only, ``identity`` for the activations whose
    derivative is taken at the pre-activation (:func:`grad_from`)."""
    N, C, H, W = x.shape
    M = N * H * W
    need_sums = need_dw or need_db or (training and need_dx)
    S = _num_partials(M, C, x.device)
    partial = None
    if need_dx and training:
        dx, partial = _dx_holding_partials(x, S)
    else:
        dx = torch.empty_like(x) if need_dx else _empty_grad(x)
    did = torch.empty_like(x) if need_did else _empty_grad(x)
    dw = torch.empty_like(weight) if need_dw else _empty_grad(x)
    db = torch.empty_like(bias) if need_db else _empty_grad(x)
    if M == 0 or C == 0:  # nothing to sum: zero gradients for the affine parameters
        return dx, did, dw.zero_(), db.zero_()
    if need_sums and partial is None:
        partial = torch.empty((2, S, C), device=x.device, dtype=torch.float64)
    did_t = did if need_did else None
    dx_t = dx if need_dx else None
    A, A2, B, (sdy, so, sx, si, sdi, sdx) = _layout(x.shape, dy, out, x, identity, did_t, dx_t)
    keys = (bucket(B), bucket(C), _channels_inner(sx, B))
    act, acc = K.ACTIVATIONS[activation], acc_tl(x.dtype)
    _runtime.launch(
        K._bn_bwd_reduce, lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), S),
        dy, out, x, identity, mean, var_or_rstd, weight, bias, did_t, None if training else dx_t,
        partial if need_sums else None, *sdy, *so, *sx, *si, *sdi, *sdx, A, A2, B, C, S, *keys, float(eps),
        float(slope), IS_EVAL=not training, ACT=act, ACC=acc,
    )
    if not need_sums:
        return dx, did, dw, db
    coef = torch.empty((3, C), device=x.device, dtype=stat_dtype(x.dtype)) if training and need_dx else None
    _runtime.launch(
        K._bn_bwd_combine, lambda meta: (triton.cdiv(C, meta["BLOCK_C"]),), partial, var_or_rstd, weight, coef,
        dw if need_dw else None, db if need_db else None, C, S, M, bucket(C), float(eps), IS_EVAL=not training,
        BLOCK_S=K.BLOCK_S,
    )
    if coef is not None:
        # g was stored as didentity by the reduction: read it back instead of recomputing it
        _runtime.launch(
            K._bn_bwd_dx, _tiles(C, A, B), dy, out, x, identity, did_t, mean, coef, bias, dx,
            *sdy, *so, *sx, *si, *sdi, *sdx, A2, B, C, *keys, float(slope), ACT=act, ACC=acc,
        )
    return dx, did, dw, db


# ---------------------------------------------------------------------------------------------------------------
# custom ops + autograd
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastattn::batch_norm_stats", mutates_args=("running_mean", "running_var"),
                         device_types=None)
def batch_norm_stats_op(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                        num_batches_tracked: Tensor | None, momentum: float, eps: float) -> tuple[Tensor, Tensor]:
    """Training statistics (mean, 1/sqrt(var + eps)) of x (N, C, H, W); updates the running stats in place
    (factor ``momentum``, or ``1 / num_batches_tracked`` when that is given)."""
    return _stats(x, running_mean, running_var, num_batches_tracked, momentum, eps)


@batch_norm_stats_op.register_fake
def _(x, running_mean, running_var, num_batches_tracked, momentum, eps):
    C = x.shape[1]
    return x.new_empty((C,), dtype=MEAN_DTYPE), x.new_empty((C,), dtype=stat_dtype(x.dtype))


@torch.library.custom_op("fastattn::batch_norm_act", mutates_args=(), device_types=None)
def batch_norm_act_op(x: Tensor, identity: Tensor | None, mean: Tensor, var_or_rstd: Tensor, weight: Tensor | None,
                      bias: Tensor | None, training: bool, eps: float, activation: str, negative_slope: float,
                      mask_after: bool) -> Tensor:
    """act((x - mean) * rstd * weight + bias + identity); ``var_or_rstd`` is the batch rstd when ``training``,
    else the running variance (rstd = 1/sqrt(var + eps) per channel in the kernel). ``mask_after`` (ReLU): the
    backward takes the gradient it receives as the pre-activation's, i.e. straight through the ReLU, whose mask
    :class:`_ReLUMask` applies to the output's gradient before (the op's output must go through it)."""
    return _apply(x, identity, mean, var_or_rstd, weight, bias, training, eps, activation, negative_slope)


@batch_norm_act_op.register_fake
def _(x, identity, mean, var_or_rstd, weight, bias, training, eps, activation, negative_slope, mask_after):
    return torch.empty_like(x)


@torch.library.custom_op("fastattn::batch_norm_act_backward", mutates_args=(), device_types=None)
def batch_norm_act_backward_op(dy: Tensor, x: Tensor, out: Tensor | None, identity: Tensor | None, mean: Tensor,
                               var_or_rstd: Tensor, weight: Tensor | None, bias: Tensor | None, training: bool,
                               eps: float, activation: str, negative_slope: float, need_dx: bool, need_did: bool,
                               need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, didentity, dweight, dbias) of ``fastattn::batch_norm_act``; a gradient not asked for is empty."""
    return _backward(dy, x, out, identity, mean, var_or_rstd, weight, bias, training, eps, activation,
                     negative_slope, need_dx, need_did, need_dw, need_db)


@batch_norm_act_backward_op.register_fake
def _(dy, x, out, identity, mean, var_or_rstd, weight, bias, training, eps, activation, negative_slope, need_dx,
      need_did, need_dw, need_db):
    def grad(flag, like):
        return torch.empty_like(like) if flag else x.new_empty((0,))

    return grad(need_dx, x), grad(need_did, x), grad(need_dw, weight), grad(need_db, bias)


def _setup_context(ctx, inputs, output):
    x, identity, mean, var_or_rstd, weight, bias, training, eps, activation, slope, mask_after = inputs
    # Saved: x, the statistics and parameters, and what act' needs (grad_from): ReLU's output -- its mask, rather
    # than bits: autograd must keep some activation alive anyway, out is usually referenced by the next layer
    # already (so saving it costs no memory), and it is torch's own rule (relu's backward looks at its result) --
    # or the identity, from which the pre-activation is recomputed (nothing more without one). With mask_after the
    # ReLU's derivative is _ReLUMask's (which saves out): here the gradient is the pre-activation's.
    activation = "identity" if mask_after else activation
    source = grad_from(activation)
    ctx.save_for_backward(x, output if source == "out" else None, identity if source == "z" else None, mean,
                          var_or_rstd, weight, bias)
    ctx.args = (training, eps, activation, slope)
    ctx.has_identity = identity is not None


def _backward_autograd(ctx, dout):
    x, out, identity, mean, var_or_rstd, weight, bias = ctx.saved_tensors
    need_dx, need_did = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.has_identity
    need_dw = weight is not None and ctx.needs_input_grad[4]
    need_db = bias is not None and ctx.needs_input_grad[5]
    # Without an activation the gradient of bn(x) + identity is dout: didentity is dout itself, as eager's add
    # hands it on (a copy would hold one activation more while dx is allocated).
    through = ctx.args[2] == "identity"
    dx, did, dw, db = batch_norm_act_backward_op(dout, x, out, identity, mean, var_or_rstd, weight, bias, *ctx.args,
                                                 need_dx, need_did and not through, need_dw, need_db)
    return (dx if need_dx else None, (dout if through else did) if need_did else None, None, None,
            dw if need_dw else None, db if need_db else None, None, None, None, None, None)


class _ReLUMask(torch.autograd.Function):
    """The ReLU's derivative of ``batch_norm_act_op(..., mask_after=True)``'s output, as a node of its own: its
    backward makes dz = dy * (out > 0) (eager's threshold_backward) and autograd frees dy before the BatchNorm node
    allocates dx, as in eager's relu -> add -> batch_norm chain. The forward does nothing (out is already
    rectified): it hands out on as if modified in place, so out is not a view and the next in-place op on it is
    caught like one on eager's relu output (saved for the backward)."""

    @staticmethod
    def forward(ctx, out: Tensor) -> Tensor:
        ctx.mark_dirty(out)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, dy: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(dy, out, 0)


batch_norm_act_op.register_autograd(_backward_autograd, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def _check(op: str, x: Tensor, identity: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
           weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float | None, eps: float,
           num_batches_tracked: Tensor | None, activation: str, negative_slope: float) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"fastattn.{op}: x must be a Tensor, got {type(x).__name__}")
    if not isinstance(training, bool):
        raise TypeError(f"fastattn.{op}: training must be a bool, got {type(training).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"fastattn.{op}: eps must be a float, got {type(eps).__name__}")
    # torch's own rule (F.batch_norm): a NaN eps passes and gives NaN, as there
    if training and eps <= 0.0:
        raise ValueError(f"fastattn.{op}: eps must be positive during training (as torch's batch_norm requires); "
                         f"got {eps!r}")
    if eps < 0.0:
        raise ValueError(f"fastattn.{op}: eps must be non-negative (as torch's batch_norm requires); got {eps!r}")
    if not isinstance(activation, str) or activation not in K.ACTIVATIONS:
        raise ValueError(f"fastattn.{op}: activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"fastattn.{op}: negative_slope must be a float, got {type(negative_slope).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fastattn.{op}: x must be 4-D (N, C, H, W); got shape {tuple(x.shape)}")
    check_float_dtype(op, "x", x, KERNEL_DTYPES)
    C = x.shape[1]
    check_like_x(op, "identity", identity, x)
    if identity is not None and identity.dtype != x.dtype:
        raise TypeError(f"fastattn.{op}: identity must have x's dtype {dtype_name(x.dtype)}; got "
                        f"{dtype_name(identity.dtype)}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"fastattn.{op}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.shape != (C,):
            raise ValueError(f"fastattn.{op}: {name} must have shape ({C},) (the channels of x {tuple(x.shape)}); "
                             f"got {tuple(t.shape)}")
        check_float_dtype(op, name, t, KERNEL_DTYPES)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"fastattn.{op}: running_mean and running_var must both be tensors or both be None; got "
                         f"running_mean {'None' if running_mean is None else 'a tensor'} and running_var "
                         f"{'None' if running_var is None else 'a tensor'}")
    if not training and running_mean is None:
        raise RuntimeError(f"fastattn.{op}: running_mean must be defined in evaluation mode (training=False)")
    if num_batches_tracked is not None and not isinstance(num_batches_tracked, Tensor):
        raise TypeError(f"fastattn.{op}: num_batches_tracked must be a Tensor or None, got "
                        f"{type(num_batches_tracked).__name__}")
    if momentum is None:
        if training and running_mean is not None and num_batches_tracked is None:
            raise TypeError(f"fastattn.{op}: momentum=None (cumulative moving average) needs num_batches_tracked= "
                            f"(the count of batches seen, this one included), as BatchNorm modules keep it")
    elif not isinstance(momentum, (int, float)):
        raise TypeError(f"fastattn.{op}: momentum must be a float or None, got {type(momentum).__name__}")
    _runtime.check_same_device(op, x=x, identity=identity, running_mean=running_mean, running_var=running_var,
                               weight=weight, bias=bias, num_batches_tracked=num_batches_tracked)
    if training:  # torch's own check and message (F.batch_norm -> _verify_batch_size)
        size_prods = x.shape[0] * x.shape[2] * x.shape[3]
        if size_prods == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def _batch_norm_act(op: str, x: Tensor, identity: Tensor | None, running_mean: Tensor | None,
                    running_var: Tensor | None, weight: Tensor | None, bias: Tensor | None, training: bool,
                    momentum: float | None, eps: float, num_batches_tracked: Tensor | None, activation: str,
                    negative_slope: float) -> Tensor:
    """The one path of both public functions (``op`` names the caller in messages and warnings)."""
    _check(op, x, identity, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
           activation, negative_slope)
    training, eps, negative_slope = bool(training), float(eps), float(negative_slope)
    reason = fallback_reason(x.device, x.dtype)
    if reason is not None:
        _runtime.warn_fallback(op, reason)
        return reference.batch_norm_act(x, identity, running_mean, running_var, weight, bias, training, momentum, eps,
                                        activation=activation, negative_slope=negative_slope,
                                        num_batches_tracked=num_batches_tracked)
    if training:
        cumulative = momentum is None and running_mean is not None
        mean, var_or_rstd = batch_norm_stats_op(x.detach(), running_mean, running_var,
                                                num_batches_tracked if cumulative else None,
                                                0.0 if momentum is None else float(momentum), eps)
    else:
        mean, var_or_rstd = running_mean, running_var
    mask_after = activation == "relu" and identity is not None
    out = batch_norm_act_op(x, identity, mean, var_or_rstd, weight, bias, training, eps, activation, negative_slope,
                            mask_after)
    return _ReLUMask.apply(out) if mask_after and out.requires_grad else out


def batch_norm_act(
    x: Tensor, identity: Tensor | None = None, running_mean: Tensor | None = None,
    running_var: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None,
    training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5, *, activation: str = "relu",
    negative_slope: float = 0.01, num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + identity)``, fused.

    ``activation``: ``"identity"``, ``"relu"``, ``"relu6"``, ``"leaky_relu"`` (with ``negative_slope``),
    ``"hardsigmoid"``, ``"hardswish"``, ``"silu"``, ``"gelu"`` (erf) or ``"gelu_tanh"``, each as its
    ``torch.nn.functional`` function computes it. x (N, C, H, W) in fp16, bf16 or fp32 (NCHW, channels_last or any
    strided view); identity None or x's shape and dtype; running statistics, weight and bias None or (C,) of any float
    dtype (statistics are kept in fp32). ``training=True`` normalizes with the batch statistics and updates the
    running ones in place by ``momentum`` (unbiased variance), or with ``momentum=None`` by the cumulative average
    ``1 / num_batches_tracked`` (keyword; the count including this batch, which the caller increments as
    ``nn.BatchNorm2d`` does). ``training=False`` uses the running statistics in a single fused pass.
    """
    return _batch_norm_act(_OP, x, identity, running_mean, running_var, weight, bias, training, momentum, eps,
                           num_batches_tracked, activation, negative_slope)


def batch_norm_add_relu(x: Tensor, identity: Tensor | None, running_mean: Tensor | None,
                        running_var: Tensor | None, weight: Tensor | None = None, bias: Tensor | None = None,
                        training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5, *,
                        num_batches_tracked: Tensor | None = None) -> Tensor:
    """``relu(F.batch_norm(x, ...) + identity)``: :func:`batch_norm_act` with ``activation="relu"`` (a ResNet block's
    tail), the same kernels and semantics."""
    return _batch_norm_act("batch_norm_add_relu", x, identity, running_mean, running_var, weight, bias, training,
                           momentum, eps, num_batches_tracked, "relu", 0.0)


# ---------------------------------------------------------------------------------------------------------------
# hardware fit
# ---------------------------------------------------------------------------------------------------------------

# (layout, N, C, H, W): the size classes the launcher meets; each config the prune keeps for one is compiled.
_SIZE_CLASSES = [
    ("nchw", 64, 256, 56, 56),
    ("nchw", 64, 2048, 7, 7),
    ("nchw", 64, 256, 4, 4),
    ("channels_last", 64, 64, 56, 56),
    ("channels_last", 64, 1024, 14, 14),
]


def kernel_specs() -> list[KernelSpec]:
    """Every (kernel, config, specialisation) this module can launch on a GPU, for ``fastattn.hwfit``.

    Each kernel is compiled in its heaviest ReLU specialisation (identity, weight, bias, running statistics with the
    cumulative factor, didentity and, for the backward reduction, the inference-mode dx store), per activation
    dtype and per layout class that selects the config; each other activation once more, in fp16 at the first
    config (its elementwise math is what changes: the apply pass and the two backward passes that evaluate act',
    with the identity from which they recompute z). Built from the GPU config lists even in an interpreter
    process, so the list is the same wherever it is made (``hwfit.check`` counts the specs in the calling process
    and compiles them by index in clean workers).
    """
    meta = torch.device("meta")
    picks: dict[tuple[int, int, str], tuple] = {}  # (BLOCK_B, BLOCK_C, layout) -> (config, size class)
    for layout, N, C, H, W in _SIZE_CLASSES:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.empty((N, C, H, W), device=meta).to(memory_format=fmt)
        _, _, B, (sx,) = _layout(x.shape, x)
        for cfg in K.tile_prune(K.gpu_tile_configs(), {"B": B, "C": C, "C_INNER": _channels_inner(sx, B)}):
            picks.setdefault((cfg.kwargs["BLOCK_B"], cfg.kwargs["BLOCK_C"], layout), (cfg, fmt, N, C, H, W))
    specs: list[KernelSpec] = []
    specs_act: list[KernelSpec] = []
    stat = torch.empty((4096,), device=meta, dtype=torch.float32)
    stat64 = torch.empty((4096,), device=meta, dtype=torch.float64)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        dname = dtype_name(dtype)
        for (_, _, layout), (cfg, fmt, N, C, H, W) in picks.items():
            x = torch.empty((N, C, H, W), device=meta, dtype=dtype).to(memory_format=fmt)
            A, A2, B, (sx,) = _layout(x.shape, x)
            common = {"A": A, "A2": A2, "B": B, "C": C, "S": 132, "M": N * H * W, "B_BUCKET": bucket(B),
                      "C_BUCKET": bucket(C), "C_INNER": _channels_inner(sx, B), "eps": 1e-5, "ACC": tl.float32}
            for p in ("x", "i", "o", "dy", "di", "dx", "g"):
                common.update({f"stride_{p}{d}": v for d, v in zip(("a1", "a2", "c", "b"), sx)})
            variant = f"{dname} {layout}"
            relu = {"slope": 0.0, "ACT": K.ACTIVATIONS["relu"]}
            for kern, args, v in (
                (K._bn_fwd_reduce, {"X": x, "Partial": stat64, "Shift": stat}, variant),
                (K._bn_fwd_apply, {"X": x, "Id": x, "Out": x, "Mean": stat, "Var": stat, "W": stat, "Bias": stat,
                                   "IS_EVAL": True, **relu}, variant + " eval +identity"),
                # training: the fp64 batch mean (hi + lo)
                (K._bn_fwd_apply, {"X": x, "Id": x, "Out": x, "Mean": stat64, "Var": stat, "W": stat, "Bias": stat,
                                   "IS_EVAL": False, **relu}, variant + " train +identity"),
                (K._bn_bwd_reduce, {"DY": x, "Out": x, "X": x, "Id": None, "Mean": stat, "Var": stat, "W": stat,
                                    "Bias": stat, "DId": x, "DX": x, "Partial": stat64, "IS_EVAL": True, **relu},
                 variant + " eval +didentity +dx"),
                (K._bn_bwd_reduce, {"DY": x, "Out": x, "X": x, "Id": None, "Mean": stat64, "Var": stat, "W": stat,
                                    "Bias": stat, "DId": x, "DX": None, "Partial": stat64, "IS_EVAL": False, **relu},
                 variant + " train +didentity"),
                (K._bn_bwd_dx, {"DY": x, "Out": x, "X": x, "Id": None, "G": x, "Mean": stat64, "Coef": stat,
                                "Bias": stat, "DX": x, **relu}, variant + " g from didentity"),
            ):
                specs.append(KernelSpec("batch_norm", kern, {**common, **args}, cfg, v))
            if dtype == torch.float16 and not specs_act:
                specs_act = _activation_specs(common, x, stat, stat64, cfg, variant)
    specs += specs_act
    comb = {"Partial": stat64, "Shift": stat, "Mean": stat64, "Rstd": stat, "RunningMean": stat, "RunningVar": stat,
            "NumBatches": torch.empty((), device=meta, dtype=torch.int64), "C": 256, "S": 132, "M": 64 * 3136,
            "C_BUCKET": 256, "momentum": 0.1, "eps": 1e-5, "HAS_RUNNING": True, "CUMULATIVE": True,
            "BLOCK_S": K.GPU_BLOCK_S}
    bcomb = {"Partial": stat64, "Var": stat, "W": stat, "Coef": stat, "DW": stat, "DB": stat, "C": 256, "S": 132,
             "M": 64 * 3136, "C_BUCKET": 256, "eps": 1e-5, "IS_EVAL": True, "BLOCK_S": K.GPU_BLOCK_S}
    for cfg in K.gpu_combine_configs():  # fp32 statistics, the mean fp64, whatever the activations: one dtype
        specs.append(KernelSpec("batch_norm", K._bn_fwd_combine, comb, cfg, "fp32 statistics, running+cumulative"))
        specs.append(KernelSpec("batch_norm", K._bn_bwd_combine, bcomb, cfg, "fp32 statistics, all outputs"))
    return specs


def _activation_specs(common: dict, x: Tensor, stat: Tensor, stat64: Tensor, cfg, variant: str) -> list[KernelSpec]:
    """The kernels whose elementwise math depends on the activation, once per activation other than ReLU: the
    training apply pass with an identity, and the backward passes that evaluate act' at z recomputed from x and the
    identity (the reduction storing didentity, the dx pass recomputing g)."""
    specs = []
    for name, code in K.ACTIVATIONS.items():
        if name == "relu":
            continue
        act = {"slope": 0.01, "ACT": code}
        ident = x if code >= K.FROM_Z else None
        for kern, args, v in (
            (K._bn_fwd_apply, {"X": x, "Id": x, "Out": x, "Mean": stat64, "Var": stat, "W": stat, "Bias": stat,
                               "IS_EVAL": False}, " train +identity"),
            (K._bn_bwd_reduce, {"DY": x, "Out": None, "X": x, "Id": ident, "Mean": stat64, "Var": stat, "W": stat,
                                "Bias": stat, "DId": x, "DX": None, "Partial": stat64, "IS_EVAL": False},
             " train +didentity"),
            (K._bn_bwd_dx, {"DY": x, "Out": None, "X": x, "Id": ident, "G": None, "Mean": stat64, "Coef": stat,
                            "Bias": stat, "DX": x}, " g recomputed"),
        ):
            specs.append(KernelSpec("batch_norm", kern, {**common, **args, **act}, cfg, f"{variant} {name}{v}"))
    return specs
