"""Fused BatchNorm + residual add + activation (the tails of ResNet, MBConv and RegNet blocks, the norm + activation
pairs of every CNN), training and inference, forward and backward.

x (N, C, H, W) is read through its strides as (A1, A2, C, B), B the innermost run of (N, H, W) one stride walks
(H*W for NCHW, N*H*W for channels_last); tiles are [BLOCK_B, BLOCK_C]. Per channel, over its M = N*H*W values,
sums are shifted by K = the mean of the channel's first BLOCK_B values (no cancellation when |mean| >> std):
    _bn_fwd_reduce   s1 = sum (x - K), s2 = sum (x - K)^2 over each of S ranges of tiles -> partials (2, S, C)
    _bn_fwd_combine  mean = K + s1/M, var = s2/M - (s1/M)^2, rstd = 1/sqrt(var + eps); running stats += m (. - running)
                     with the unbiased var * M/(M-1)
    _bn_fwd_apply    out = act(z), z = (x - mean) * w * rstd + b + identity   (inference: running mean and var)
The activation is the constexpr ACT (one of ACTIVATIONS: identity, relu, relu6, leaky_relu, hardsigmoid, hardswish,
silu, gelu, gelu_tanh). Backward, g = dy * act'(z): ReLU's mask from the saved output (out > 0, torch's own rule),
every other activation's derivative at z recomputed from x (+ identity) exactly as the forward computed it;
xm = x - mean:
    _bn_bwd_reduce   partial sums of g and g * xm, stores didentity = g (inference: also dx = w rstd g)
    _bn_bwd_combine  dbias = sum g, dweight = rstd sum g xm, dx's coefficients k1 = w rstd, k2, k3
    _bn_bwd_dx       dx = w rstd (g - dbias/M - xhat dweight/M) = k1 g + k2 xm + k3   (training)
Elementwise math and each lane's running sums are in ACC (fp32, or fp64 for fp64 inputs); tree sums, partials and
per-channel statistics in fp64, rounded once. The training mean stays fp64 and x - mean is taken as (x - hi) - lo
with mean = hi + lo in ACC (_mean_hi_lo), so a mean large against the spread is not rounded to fp32 first.
No atomics and a fixed S and combination order: bitwise repeatable.
"""

import triton
import triton.language as tl

from ._common import cast, interpreting, pick_configs, tanh

# -- activations ---------------------------------------------------------------------------------------------------
# ACT codes. ReLU and identity need nothing but dy (and ReLU the output) in the backward; from RELU6 on, the
# derivative is taken at the pre-activation z, which the backward recomputes from x (FROM_Z).
ACT_IDENTITY = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_RELU6 = tl.constexpr(2)
ACT_LEAKY_RELU = tl.constexpr(3)
ACT_HARDSIGMOID = tl.constexpr(4)
ACT_HARDSWISH = tl.constexpr(5)
ACT_SILU = tl.constexpr(6)
ACT_GELU = tl.constexpr(7)
ACT_GELU_TANH = tl.constexpr(8)
FROM_Z = tl.constexpr(2)  # ACT >= FROM_Z: act' is evaluated at the recomputed pre-activation
ACTIVATIONS = {"identity": 0, "relu": 1, "relu6": 2, "leaky_relu": 3, "hardsigmoid": 4, "hardswish": 5, "silu": 6,
               "gelu": 7, "gelu_tanh": 8}
SQRT1_2 = tl.constexpr(0.7071067811865476)  # gelu: erf(z / sqrt 2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # gelu': the normal density's factor
SQRT_2_PI = tl.constexpr(0.7978845608028654)  # gelu_tanh: tanh(sqrt(2 / pi) (z + GELU_KAPPA z^3))
GELU_KAPPA = tl.constexpr(0.044715)


# -- configs -------------------------------------------------------------------------------------------------------
# Memory-bound tiles of 2048 elements in every shape from B-major (NCHW, long H*W) to C-major (channels_last or
# short H*W). 8 warps give 8 values per thread and tensor: one 16-byte load of fp16/bf16, and the backward
# reduction (dy, out, x, two running sums, up to five tensors' addresses) stays at or below 80 registers.

TILES = ((128, 16), (64, 32), (32, 64), (16, 128))
# The interpreter's cost is per program and per op, not per element: large tiles, long on B or on C (and the
# small one for small shapes).
INTERPRETER_TILES = ((1024, 32), (128, 128), (16, 2048), (32, 64))


def gpu_tile_configs():
    return [triton.Config({"BLOCK_B": b, "BLOCK_C": c}, num_warps=8, num_stages=2) for b, c in TILES]


def tile_configs():
    return pick_configs(gpu_tile_configs(), [triton.Config({"BLOCK_B": b, "BLOCK_C": c}, num_warps=4, num_stages=1)
                                             for b, c in INTERPRETER_TILES])


def _waste(cfg, B, C):
    """How many times the tile is larger than the (power-of-two padded) data it covers."""
    bb, bc = cfg.kwargs["BLOCK_B"], cfg.kwargs["BLOCK_C"]
    return bb / min(bb, triton.next_power_of_2(B)) * (bc / min(bc, triton.next_power_of_2(C)))


def tile_prune(configs, named_args, **kwargs):
    """Keep tiles that are not mostly padding and whose contiguous side is long enough to coalesce."""
    B, C, c_inner = named_args["B"], named_args["C"], named_args["C_INNER"]
    pb, pc = triton.next_power_of_2(B), triton.next_power_of_2(C)

    def fits(cfg):
        bb, bc = cfg.kwargs["BLOCK_B"], cfg.kwargs["BLOCK_C"]
        if bb > max(pb, 16) or bc > max(pc, 16):
            return False
        return bc >= min(pc, 32) if c_inner else bb >= min(pb, 64)

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: _waste(c, B, C))]


def launch_tile_prune(configs, named_args, **kwargs):
    """The autotuner's prune: :func:`tile_prune`; in the interpreter, which cannot time configs, its own
    INTERPRETER_TILES collapse to the one that wastes least (other configs, e.g. a test's, are kept as they are)."""
    kept = tile_prune(configs, named_args)
    if not interpreting():
        return kept
    own = [c for c in kept if (c.kwargs["BLOCK_B"], c.kwargs["BLOCK_C"]) in INTERPRETER_TILES]
    best = [min(own, key=lambda c: _waste(c, named_args["B"], named_args["C"]))] if own else []
    return [c for c in kept if c not in own] + best


# Partials summed per step: fixed, never tuned, so the combination order never changes (2 in the interpreter, so
# that its few partials still take the loop and its masked tail).
GPU_BLOCK_S = 32
BLOCK_S = 2 if interpreting() else GPU_BLOCK_S


def gpu_combine_configs():
    return [triton.Config({"BLOCK_C": c}, num_warps=4, num_stages=1) for c in (32, 128)]


def combine_configs():
    return pick_configs(gpu_combine_configs(), triton.Config({"BLOCK_C": 64}, num_warps=4, num_stages=1))


def combine_prune(configs, named_args, **kwargs):
    pc = triton.next_power_of_2(named_args["C"])
    kept = [c for c in configs if c.kwargs["BLOCK_C"] <= max(pc, 32)]
    return kept or configs[:1]


# -- shared pieces -------------------------------------------------------------------------------------------------


@triton.jit
def _tile(t, nb, A2, B, offs_b, c_ok, BLOCK_B: tl.constexpr):
    """Tile t of the (A1 * A2) x cdiv(B, BLOCK_B) tiles of one channel block -> (a1, a2, first b) in int64, and the
    tile's mask."""
    a = t // nb
    b0 = (t - a * nb) * BLOCK_B
    a1 = a // A2
    ok = (offs_b[:, None] < B - b0) & c_ok[None, :]
    return a1.to(tl.int64), (a - a1 * A2).to(tl.int64), b0.to(tl.int64), ok


@triton.jit
def _ptrs(P, a1, a2, b0, c0, offs_b, offs_c, s_a1, s_a2, s_c, s_b):
    # int64 for the block's base, int32 lane offsets inside the tile.
    base = P + (a1 * s_a1 + a2 * s_a2 + b0 * s_b + c0 * s_c)
    return base + offs_b[:, None] * s_b + offs_c[None, :] * s_c


@triton.jit
def _elementwise_tile(A2, B, C, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's [BLOCK_B, BLOCK_C] tile in an elementwise pass (one program per tile, channel blocks
    fastest): (a1, a2, b0, c0, offs_b, offs_c, c_ok, ok)."""
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BLOCK_C)
    t = pid // n_cb
    c0 = (pid - t * n_cb) * BLOCK_C
    offs_b = tl.arange(0, BLOCK_B)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C - c0
    a1, a2, b0, ok = _tile(t, tl.cdiv(B, BLOCK_B), A2, B, offs_b, c_ok, BLOCK_B)
    return a1, a2, b0, c0, offs_b, offs_c, c_ok, ok


@triton.jit
def _reduction_block(C, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's channel block and partial in a reduction pass (grid: channel blocks x S partials):
    (s, c0, offs_b, offs_c, c_ok)."""
    c0 = tl.program_id(0) * BLOCK_C
    offs_c = tl.arange(0, BLOCK_C)
    return tl.program_id(1), c0, tl.arange(0, BLOCK_B), offs_c, offs_c < C - c0


@triton.jit
def _mean_hi_lo(Mean, offs_c, c_ok, ACC: tl.constexpr):
    """The per-channel mean as hi + lo, both in ACC: x - mean is then (x - hi) - lo. For the fp64 training mean this
    keeps the bits an fp32 mean would lose (they matter once |mean| >> std: (x - mean) * rstd would carry
    u32 |mean| rstd); an fp32 running mean gives lo = 0. Per channel, not per element: the fp64 ops cost nothing."""
    m = tl.load(Mean + offs_c, mask=c_ok, other=0.0).to(tl.float64)
    hi = m.to(ACC)
    return hi, (m - hi.to(tl.float64)).to(ACC)


@triton.jit
def _tile_range(s, A, B, S, BLOCK_B: tl.constexpr):
    """The tiles [t0, t1) that partial s sums, and tiles per row of B."""
    nb = tl.cdiv(B, BLOCK_B)
    s64 = s.to(tl.int64)  # A, B, S may be the constant 1 (Triton specialises ints equal to 1)
    return s64 * A * nb // S, (s64 + 1) * A * nb // S, nb


@triton.jit
def _sum_partials(Partial, S, C, offs_c, c_ok, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Column sums of the two (S, C) fp64 halves of Partial, in a fixed order: a tree per block of BLOCK_S rows,
    the blocks one after another."""
    acc1 = tl.zeros([BLOCK_C], tl.float64)
    acc2 = tl.zeros([BLOCK_C], tl.float64)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = (offs_s[:, None] < S) & c_ok[None, :]
        idx = offs_s[:, None] * C + offs_c[None, :]
        acc1 += tl.sum(tl.load(Partial + idx, mask=ok, other=0.0), 0)
        acc2 += tl.sum(tl.load(Partial + S * C + idx, mask=ok, other=0.0), 0)
    return acc1, acc2


@triton.jit
def _rstd64(Var, offs_c, c_ok, eps, IS_EVAL: tl.constexpr):
    """fp64 1/std per channel: Var holds rstd (training: the saved batch value) or the running variance."""
    v = tl.load(Var + offs_c, mask=c_ok, other=1.0).to(tl.float64)
    if IS_EVAL:
        v = 1.0 / tl.sqrt(v + eps)
    return v


@triton.jit
def _weight64(W, offs_c, c_ok):
    if W is not None:
        return tl.load(W + offs_c, mask=c_ok, other=0.0).to(tl.float64)
    else:
        return tl.full(offs_c.shape, 1.0, tl.float64)


@triton.jit
def _relu6(z):
    """min(max(z, 0), 6) that keeps NaN, as torch's hardtanh."""
    return tl.where(z <= 0.0, 0.0, tl.where(z >= 6.0, 6.0, z))


@triton.jit
def _act(z, slope, ACT: tl.constexpr):
    """act(z), with torch's formulas (the same operations in the same order as its CPU and CUDA kernels)."""
    if ACT == ACT_RELU:
        y = tl.where(z <= 0.0, 0.0, z)  # relu that keeps NaN, as torch.relu
    elif ACT == ACT_RELU6:
        y = _relu6(z)
    elif ACT == ACT_LEAKY_RELU:
        y = tl.where(z > 0.0, z, z * slope)
    elif ACT == ACT_HARDSIGMOID:
        y = _relu6(z + 3.0) / 6.0
    elif ACT == ACT_HARDSWISH:
        y = z * _relu6(z + 3.0) / 6.0
    elif ACT == ACT_SILU:
        y = z / (1.0 + tl.exp(-z))
    elif ACT == ACT_GELU:
        y = 0.5 * z * (1.0 + tl.math.erf(z * SQRT1_2))
    elif ACT == ACT_GELU_TANH:
        y = 0.5 * z * (1.0 + tanh((z + (z * z * z) * GELU_KAPPA) * SQRT_2_PI))
    else:
        y = z
    return y


@triton.jit
def _act_grad(dy, z, slope, ACT: tl.constexpr):
    """dy * act'(z) for ACT >= FROM_Z, with torch's backward formulas (which also take these at the input)."""
    if ACT == ACT_RELU6:
        g = tl.where((z <= 0.0) | (z >= 6.0), 0.0, dy)
    elif ACT == ACT_LEAKY_RELU:
        g = tl.where(z > 0.0, dy, dy * slope)
    elif ACT == ACT_HARDSIGMOID:
        g = tl.where((z > -3.0) & (z < 3.0), dy / 6.0, 0.0)
    elif ACT == ACT_HARDSWISH:
        g = tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, dy * (z / 3.0 + 0.5), dy))
    elif ACT == ACT_SILU:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = dy * s * (1.0 + z * (1.0 - s))
    elif ACT == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT1_2))
        pdf = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
        g = dy * (cdf + z * pdf)
    else:  # ACT_GELU_TANH
        z2 = z * z
        t = tanh((z + (z2 * z) * GELU_KAPPA) * SQRT_2_PI)
        g = dy * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * ((1.0 + z2 * (3.0 * GELU_KAPPA)) * SQRT_2_PI))
    return g


@triton.jit
def _pre_act(x, mean_hi, mean_lo, scale, Bias, Id, a1, a2, b0, c0, offs_b, offs_c, c_ok, ok,
             stride_ia1, stride_ia2, stride_ic, stride_ib, ACC: tl.constexpr):
    """z = ((x - hi) - lo) * (w rstd) + b + identity of one tile: the forward's pre-activation, and the backward's
    recomputation of it, operation for operation, so act' is taken at exactly the z the forward activated.
    (x - mean) * scale + b rather than x * scale + (b - mean * scale): no cancellation when |mean| >> std, and the
    extra subtraction is free in a memory-bound pass."""
    z = ((x - mean_hi[None, :]) - mean_lo[None, :]) * scale[None, :]
    if Bias is not None:
        z += tl.load(Bias + c0 + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]
    if Id is not None:
        z += tl.load(_ptrs(Id, a1, a2, b0, c0, offs_b, offs_c, stride_ia1, stride_ia2, stride_ic, stride_ib),
                     mask=ok, other=0.0).to(ACC)
    return z


@triton.jit
def _grad(DY, Out, Id, Bias, x, mean_hi, mean_lo, scale, a1, a2, b0, c0, offs_b, offs_c, c_ok, ok,
          stride_dya1, stride_dya2, stride_dyc, stride_dyb, stride_oa1, stride_oa2, stride_oc, stride_ob,
          stride_ia1, stride_ia2, stride_ic, stride_ib, slope, ACT: tl.constexpr, ACC: tl.constexpr):
    """g = dy * act'(z) of one tile: exact and in dy's dtype for ReLU (the mask of its output, as torch's
    threshold_backward) and identity, in ACC for the others (at z recomputed from x and identity)."""
    dy = tl.load(_ptrs(DY, a1, a2, b0, c0, offs_b, offs_c, stride_dya1, stride_dya2, stride_dyc, stride_dyb),
                 mask=ok, other=0.0)
    if ACT == ACT_RELU:
        o = tl.load(_ptrs(Out, a1, a2, b0, c0, offs_b, offs_c, stride_oa1, stride_oa2, stride_oc, stride_ob),
                    mask=ok, other=0.0)
        g = tl.where(o <= 0.0, 0.0, dy)
    elif ACT >= FROM_Z:
        z = _pre_act(x, mean_hi, mean_lo, scale, Bias, Id, a1, a2, b0, c0, offs_b, offs_c, c_ok, ok,
                     stride_ia1, stride_ia2, stride_ic, stride_ib, ACC)
        g = _act_grad(dy.to(ACC), z, slope, ACT)
    else:
        g = dy
    return g


# -- forward -------------------------------------------------------------------------------------------------------


@triton.autotune(configs=tile_configs(), key=["B_BUCKET", "C_BUCKET", "C_INNER"],
                 prune_configs_by={"early_config_prune": launch_tile_prune})
@triton.jit
def _bn_fwd_reduce(
    X, Partial, Shift,  # x (N, C, H, W) seen as (A1, A2, C, B); (2, S, C) fp64: sums of x - K, (x - K)^2; (C,) K
    stride_xa1, stride_xa2, stride_xc, stride_xb,
    A, A2, B, C, S,
    B_BUCKET, C_BUCKET, C_INNER,  # autotune keys only
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s, c0, offs_b, offs_c, c_ok = _reduction_block(C, BLOCK_B, BLOCK_C)
    # The shift K: every program of a channel computes the same one (the mean of the channel's first BLOCK_B values
    # at a = 0); any K is exact in the sums, one within ~std/sqrt(BLOCK_B) of the mean avoids the cancellation.
    # Rounded to x's dtype, so that x - K is exact in fp32 for fp16/bf16 activations of similar magnitude.
    ok0 = (offs_b[:, None] < B) & c_ok[None, :]
    x0 = tl.load(_ptrs(X, 0, 0, 0, c0, offs_b, offs_c, stride_xa1, stride_xa2, stride_xc, stride_xb), mask=ok0,
                 other=0.0).to(ACC)
    shift = (tl.sum(x0, 0) / tl.maximum(tl.sum(ok0.to(ACC), 0), 1.0)).to(X.dtype.element_ty).to(ACC)
    if s == 0:
        tl.store(Shift + c0 + offs_c, shift, mask=c_ok)
    acc1 = tl.zeros([BLOCK_B, BLOCK_C], ACC)
    acc2 = tl.zeros([BLOCK_B, BLOCK_C], ACC)
    t0, t1, nb = _tile_range(s, A, B, S, BLOCK_B)
    for t in range(t0, t1):
        a1, a2, b0, ok = _tile(t, nb, A2, B, offs_b, c_ok, BLOCK_B)
        x = tl.load(_ptrs(X, a1, a2, b0, c0, offs_b, offs_c, stride_xa1, stride_xa2, stride_xc, stride_xb), mask=ok,
                    other=0.0).to(ACC)
        d = tl.where(ok, x - shift[None, :], 0.0)
        acc1 += d
        acc2 += d * d
    tl.store(Partial + s * C + c0 + offs_c, tl.sum(acc1.to(tl.float64), 0), mask=c_ok)
    tl.store(Partial + (S + s) * C + c0 + offs_c, tl.sum(acc2.to(tl.float64), 0), mask=c_ok)


@triton.autotune(configs=combine_configs(), key=["C_BUCKET"], restore_value=["RunningMean", "RunningVar"],
                 prune_configs_by={"early_config_prune": combine_prune})
@triton.jit
def _bn_fwd_combine(
    Partial, Shift, Mean, Rstd, RunningMean, RunningVar, NumBatches,
    # (2, S, C) fp64 and (C,) ACC from _bn_fwd_reduce; (C,) ACC outputs; (C,) running stats, updated in place (any float
    # dtype); () int64 num_batches_tracked, read only with CUMULATIVE (momentum=None: factor 1 / num_batches_tracked)
    C, S, M,
    C_BUCKET,  # autotune key only
    momentum, eps,
    HAS_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    s1, s2 = _sum_partials(Partial, S, C, offs_c, c_ok, BLOCK_S, BLOCK_C)
    n = M + tl.zeros([], tl.float64)  # scalar args are plain Python numbers in the interpreter: no .to()
    d_mean = s1 / n
    var = s2 / n - d_mean * d_mean
    var = tl.where(var < 0.0, 0.0, var)  # clamps rounding below 0 but keeps NaN (tl.maximum drops it), as torch
    mean = tl.load(Shift + offs_c, mask=c_ok, other=0.0).to(tl.float64) + d_mean
    tl.store(Mean + offs_c, mean.to(Mean.dtype.element_ty), mask=c_ok)
    tl.store(Rstd + offs_c, (1.0 / tl.sqrt(var + eps)).to(Rstd.dtype.element_ty), mask=c_ok)
    if HAS_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / tl.load(NumBatches).to(tl.float64)
        else:
            factor = momentum + tl.zeros([], tl.float64)
        rm = tl.load(RunningMean + offs_c, mask=c_ok, other=0.0).to(tl.float64)
        rv = tl.load(RunningVar + offs_c, mask=c_ok, other=0.0).to(tl.float64)
        unbiased = var * (n / (n - 1.0))
        tl.store(RunningMean + offs_c, (factor * mean + (1.0 - factor) * rm).to(RunningMean.dtype.element_ty),
                 mask=c_ok)
        tl.store(RunningVar + offs_c, (factor * unbiased + (1.0 - factor) * rv).to(RunningVar.dtype.element_ty),
                 mask=c_ok)


@triton.autotune(configs=tile_configs(), key=["B_BUCKET", "C_BUCKET", "C_INNER"],
                 prune_configs_by={"early_config_prune": launch_tile_prune})
@triton.jit
def _bn_fwd_apply(
    X, Id, Out, Mean, Var, W, Bias,
    # x, identity (or None), out: (N, C, H, W) seen as (A1, A2, C, B) through their own strides;
    # (C,) mean and rstd (training) or running mean and running var (IS_EVAL); (C,) weight, bias or None
    stride_xa1, stride_xa2, stride_xc, stride_xb, stride_ia1, stride_ia2, stride_ic, stride_ib,
    stride_oa1, stride_oa2, stride_oc, stride_ob,
    A2, B, C,
    B_BUCKET, C_BUCKET, C_INNER,
    eps, slope,  # slope: leaky_relu's negative slope
    IS_EVAL: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    a1, a2, b0, c0, offs_b, offs_c, c_ok, ok = _elementwise_tile(A2, B, C, BLOCK_B, BLOCK_C)
    mean_hi, mean_lo = _mean_hi_lo(Mean, c0 + offs_c, c_ok, ACC)
    scale = (_rstd64(Var, c0 + offs_c, c_ok, eps, IS_EVAL) * _weight64(W, c0 + offs_c, c_ok)).to(ACC)
    x = tl.load(_ptrs(X, a1, a2, b0, c0, offs_b, offs_c, stride_xa1, stride_xa2, stride_xc, stride_xb), mask=ok,
                other=0.0).to(ACC)
    z = _pre_act(x, mean_hi, mean_lo, scale, Bias, Id, a1, a2, b0, c0, offs_b, offs_c, c_ok, ok,
                 stride_ia1, stride_ia2, stride_ic, stride_ib, ACC)
    tl.store(_ptrs(Out, a1, a2, b0, c0, offs_b, offs_c, stride_oa1, stride_oa2, stride_oc, stride_ob),
             cast(_act(z, slope, ACT), Out.dtype.element_ty), mask=ok)


# -- backward ------------------------------------------------------------------------------------------------------


@triton.autotune(configs=tile_configs(), key=["B_BUCKET", "C_BUCKET", "C_INNER"],
                 prune_configs_by={"early_config_prune": launch_tile_prune})
@triton.jit
def _bn_bwd_reduce(
    DY, Out, X, Id, Mean, Var, W, Bias, DId, DX, Partial,
    # dy, out (ReLU only), x, identity (ACT >= FROM_Z only, or None): (N, C, H, W) as (A1, A2, C, B); (C,) mean and
    # rstd (or running stats, IS_EVAL); weight, bias or None; didentity (written when not None); dx (written here
    # only in IS_EVAL); (2, S, C) fp64 sums of g and g * xm (None: not needed)
    stride_dya1, stride_dya2, stride_dyc, stride_dyb, stride_oa1, stride_oa2, stride_oc, stride_ob,
    stride_xa1, stride_xa2, stride_xc, stride_xb, stride_ia1, stride_ia2, stride_ic, stride_ib,
    stride_dia1, stride_dia2, stride_dic, stride_dib, stride_dxa1, stride_dxa2, stride_dxc, stride_dxb,
    A, A2, B, C, S,
    B_BUCKET, C_BUCKET, C_INNER,
    eps, slope,
    IS_EVAL: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s, c0, offs_b, offs_c, c_ok = _reduction_block(C, BLOCK_B, BLOCK_C)
    mean_hi, mean_lo = _mean_hi_lo(Mean, c0 + offs_c, c_ok, ACC)
    scale = (_rstd64(Var, c0 + offs_c, c_ok, eps, IS_EVAL) * _weight64(W, c0 + offs_c, c_ok)).to(ACC)
    acc_g = tl.zeros([BLOCK_B, BLOCK_C], ACC)
    acc_gx = tl.zeros([BLOCK_B, BLOCK_C], ACC)
    t0, t1, nb = _tile_range(s, A, B, S, BLOCK_B)
    for t in range(t0, t1):
        a1, a2, b0, ok = _tile(t, nb, A2, B, offs_b, c_ok, BLOCK_B)
        x = 0.0
        if Partial is not None or ACT >= FROM_Z:
            x = tl.load(_ptrs(X, a1, a2, b0, c0, offs_b, offs_c, stride_xa1, stride_xa2, stride_xc, stride_xb),
                        mask=ok, other=0.0).to(ACC)
        g = _grad(DY, Out, Id, Bias, x, mean_hi, mean_lo, scale, a1, a2, b0, c0, offs_b, offs_c, c_ok, ok,
                  stride_dya1, stride_dya2, stride_dyc, stride_dyb, stride_oa1, stride_oa2, stride_oc, stride_ob,
                  stride_ia1, stride_ia2, stride_ic, stride_ib, slope, ACT, ACC)
        if DId is not None:
            # stored rounded, and summed as stored: _bn_bwd_dx reads this g back, so the sums match it (as eager's
            # batch-norm backward sums the rounded gradient it is given)
            g = cast(g, DId.dtype.element_ty)
            tl.store(_ptrs(DId, a1, a2, b0, c0, offs_b, offs_c, stride_dia1, stride_dia2, stride_dic, stride_dib),
                     g, mask=ok)
        g = g.to(ACC)
        if IS_EVAL and DX is not None:
            tl.store(_ptrs(DX, a1, a2, b0, c0, offs_b, offs_c, stride_dxa1, stride_dxa2, stride_dxc, stride_dxb),
                     cast(g * scale[None, :], DX.dtype.element_ty), mask=ok)
        if Partial is not None:
            acc_g += g
            # rstd is applied once per channel in _bn_bwd_combine
            acc_gx += g * ((x - mean_hi[None, :]) - mean_lo[None, :])
    if Partial is not None:
        tl.store(Partial + s * C + c0 + offs_c, tl.sum(acc_g.to(tl.float64), 0), mask=c_ok)
        tl.store(Partial + (S + s) * C + c0 + offs_c, tl.sum(acc_gx.to(tl.float64), 0), mask=c_ok)


@triton.autotune(configs=combine_configs(), key=["C_BUCKET"], prune_configs_by={"early_config_prune": combine_prune})
@triton.jit
def _bn_bwd_combine(
    Partial, Var, W, Coef, DW, DB,
    # (2, S, C) fp64 sums of g, g * xm; (C,) rstd (or running var, IS_EVAL); weight or None;
    # (3, C) ACC out: dx = k1 g + k2 xm + k3 (training); (C,) dweight, dbias or None
    C, S, M,
    C_BUCKET,
    eps,
    IS_EVAL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    sum_g, sum_gxm = _sum_partials(Partial, S, C, offs_c, c_ok, BLOCK_S, BLOCK_C)
    rstd = _rstd64(Var, offs_c, c_ok, eps, IS_EVAL)
    sum_gxhat = sum_gxm * rstd
    if DW is not None:
        tl.store(DW + offs_c, cast(sum_gxhat, DW.dtype.element_ty), mask=c_ok)
    if DB is not None:
        tl.store(DB + offs_c, cast(sum_g, DB.dtype.element_ty), mask=c_ok)
    if Coef is not None:
        k1 = _weight64(W, offs_c, c_ok) * rstd
        inv_m = 1.0 / (M + tl.zeros([], tl.float64))
        tl.store(Coef + offs_c, k1.to(Coef.dtype.element_ty), mask=c_ok)
        tl.store(Coef + C + offs_c, (-k1 * rstd * sum_gxhat * inv_m).to(Coef.dtype.element_ty), mask=c_ok)
        tl.store(Coef + 2 * C + offs_c, (-k1 * sum_g * inv_m).to(Coef.dtype.element_ty), mask=c_ok)


@triton.autotune(configs=tile_configs(), key=["B_BUCKET", "C_BUCKET", "C_INNER"],
                 prune_configs_by={"early_config_prune": launch_tile_prune})
@triton.jit
def _bn_bwd_dx(
    DY, Out, X, Id, G, Mean, Coef, Bias, DX,
    # dy, out, x, identity (N, C, H, W) as (A1, A2, C, B); G: the stored g = didentity, or None to recompute it from
    # dy and out or z (as _bn_bwd_reduce); (C,) mean; (3, C) ACC coefficients from _bn_bwd_combine; bias or None; dx
    stride_dya1, stride_dya2, stride_dyc, stride_dyb, stride_oa1, stride_oa2, stride_oc, stride_ob,
    stride_xa1, stride_xa2, stride_xc, stride_xb, stride_ia1, stride_ia2, stride_ic, stride_ib,
    stride_ga1, stride_ga2, stride_gc, stride_gb, stride_dxa1, stride_dxa2, stride_dxc, stride_dxb,
    A2, B, C,
    B_BUCKET, C_BUCKET, C_INNER,
    slope,
    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    a1, a2, b0, c0, offs_b, offs_c, c_ok, ok = _elementwise_tile(A2, B, C, BLOCK_B, BLOCK_C)
    mean_hi, mean_lo = _mean_hi_lo(Mean, c0 + offs_c, c_ok, ACC)
    k1 = tl.load(Coef + c0 + offs_c, mask=c_ok, other=0.0)  # w rstd: also the forward's scale, bit for bit
    k2 = tl.load(Coef + C + c0 + offs_c, mask=c_ok, other=0.0)
    k3 = tl.load(Coef + 2 * C + c0 + offs_c, mask=c_ok, other=0.0)
    x = tl.load(_ptrs(X, a1, a2, b0, c0, offs_b, offs_c, stride_xa1, stride_xa2, stride_xc, stride_xb), mask=ok,
                other=0.0).to(ACC)
    if G is not None:
        g = tl.load(_ptrs(G, a1, a2, b0, c0, offs_b, offs_c, stride_ga1, stride_ga2, stride_gc, stride_gb), mask=ok,
                    other=0.0).to(ACC)
    else:
        g = _grad(DY, Out, Id, Bias, x, mean_hi, mean_lo, k1, a1, a2, b0, c0, offs_b, offs_c, c_ok, ok,
                  stride_dya1, stride_dya2, stride_dyc, stride_dyb, stride_oa1, stride_oa2, stride_oc, stride_ob,
                  stride_ia1, stride_ia2, stride_ic, stride_ib, slope, ACT, ACC).to(ACC)
    dx = k1[None, :] * g + k2[None, :] * ((x - mean_hi[None, :]) - mean_lo[None, :]) + k3[None, :]
    tl.store(_ptrs(DX, a1, a2, b0, c0, offs_b, offs_c, stride_dxa1, stride_dxa2, stride_dxc, stride_dxb),
             cast(dx, DX.dtype.element_ty), mask=ok)
