"""Pieces shared by several kernels: the one interpreter switch (config lists, interpreter-exact MMA and casts), the
arch classes of the tile tables, and counter-based dropout.

Dropout draws one Philox-4x32 number per element from ``(seed, c0, c1, c2)``: a 64-bit seed taken from torch's
generator and the element's own coordinates, so the forward and the backward regenerate the same mask without
storing it, and the interpreter produces exactly the bits a GPU does.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def probe_kernel(x_ptr):
    # Never launched: its type tells whether this process builds kernels for the interpreter.
    tl.store(x_ptr, 0)


def interpreting() -> bool:
    """What ``@triton.jit`` decided for this process (it reads ``TRITON_INTERPRET`` at decoration time)."""
    return type(probe_kernel).__name__ == "InterpretedFunction"


# The switch as the kernels see it: a module constexpr, so the work-arounds below compile away on a GPU and no
# kernel takes an argument for them.
INTERPRETED = tl.constexpr(interpreting())

LOG2E = tl.constexpr(1.4426950408889634)  # scores and log-sum-exps go to base 2 for exp2 / log2
LN2 = tl.constexpr(0.6931471805599453)
NEG_INF = tl.constexpr(float("-inf"))


# Tile tables that differ by GPU generation key their entries by arch class: 90 for sm_90 and later (wgmma), 80
# before. Each class stands for these hwfit targets (the archs a tile marked with the class is compiled for).
ARCH_TARGETS = {80: (80, 89), 90: (90,)}


def arch_class(device: torch.device) -> int | None:
    """The arch class of a torch device: 90 or 80 for a CUDA GPU, None elsewhere (no GPU: the shared tiles)."""
    if device.type != "cuda":
        return None
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def pick_configs(gpu_configs, interpreter_config):
    """The autotuner's candidates: the GPU list, or the interpreter's config (or list of configs, of which the
    kernel's prune keeps one: autotune cannot time on a CPU)."""
    if not interpreting():
        return gpu_configs
    return list(interpreter_config) if isinstance(interpreter_config, (list, tuple)) else [interpreter_config]


@triton.jit
def dropout_keep(seed, c0, c1, c2, p):
    """Keep-mask of dropout with probability ``p`` for the elements at integer counters ``(c0, c1, c2)``."""
    zero = c0 * 0 + c1 * 0  # int32 counters broadcast to the block's full shape
    c0 = (c0 + zero).to(tl.uint32, bitcast=True)
    c1 = (c1 + zero).to(tl.uint32, bitcast=True)
    c2 = (c2 + zero).to(tl.uint32, bitcast=True)
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c0 * 0)
    return tl.uint_to_uniform_float(r) >= p


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """``tl.dot(a, b, acc)``. Triton's interpreter computes bf16 ``tl.dot`` on raw bit patterns (triton#11584), so
    interpreted bf16 operands go in as fp32 (exact: bf16 products fit fp32); the compiled path keeps bf16 operands
    for the tensor cores and never takes this branch."""
    if INTERPRETED and (a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16):
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)``. Triton's interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest even,
    doubling the rounding error of bf16 results; interpreted runs round the bits here. Compiled: a plain cast."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# tanh(x) = x (1 + C1 x^2 + C2 x^4 + ...): the odd Taylor series' coefficients 2^2n (2^2n - 1) B_2n / (2n)!
_TANH_C = [tl.constexpr(c) for c in (-1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075,
                                     -929569 / 638512875, 6404582 / 10854718875)]
_TANH_C1, _TANH_C2, _TANH_C3, _TANH_C4, _TANH_C5, _TANH_C6, _TANH_C7, _TANH_C8 = _TANH_C


@triton.jit
def tanh(x):
    """tanh within a few ulp of fp32 (and of fp64 in the interpreter) without libdevice (the interpreter has
    none): the series through x^17 for |x| below 0.55 (0.2 in fp64), where its next term is below the precision,
    else ``1 - 2 / (exp2(2 |x| log2 e) + 1)``, whose cancellation costs at most two bits there. Softcapped scores
    (Gemma 2) need it."""
    a = tl.minimum(tl.abs(x), 20.0)  # tanh(20) rounds to 1 even in fp64
    a1 = tl.minimum(a, 1.0)  # keeps the series' argument small where its value is discarded
    x2 = a1 * a1
    p = _TANH_C8 * x2 + _TANH_C7
    p = p * x2 + _TANH_C6
    p = p * x2 + _TANH_C5
    p = p * x2 + _TANH_C4
    p = p * x2 + _TANH_C3
    p = p * x2 + _TANH_C2
    p = p * x2 + _TANH_C1
    big = 1.0 - tl.fdiv(tl.full(x.shape, 2.0, x.dtype), tl.math.exp2(a * (2.0 * LOG2E)) + 1.0)
    t = tl.where(a < (0.2 if x.dtype == tl.float64 else 0.55), a1 + a1 * x2 * p, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def key_blocks(a_lo, a_hi, lo, hi, k_lo, k_hi, BLOCK: tl.constexpr):
    """The key blocks a tile of queries visits: keys j in [k_lo, k_hi) (k_lo a multiple of BLOCK), queries at
    positions a in [a_lo, a_hi], where a sees j iff a + lo <= j <= a + hi (the causal / sliding-window band).

    Returns (start, full_start, full_end, end): blocks in [full_start, full_end) are seen whole by every query
    (no bounds or band test needed); [start, full_start) and [full_end, end) are edge blocks; blocks outside
    [start, end) are seen by no query and are never visited. All but ``end`` are multiples of BLOCK past k_lo.
    (Operands of // are kept >= 0: GPUs truncate, numpy floors.)"""
    start = tl.maximum(a_lo + lo, k_lo) // BLOCK * BLOCK
    end = tl.maximum(tl.minimum(a_hi + hi + 1, k_hi), start)
    full_start = tl.minimum((tl.maximum(a_hi + lo, start) + BLOCK - 1) // BLOCK * BLOCK, end)
    full_end = tl.maximum(tl.maximum(tl.minimum(a_lo + hi + 1, k_hi), 0) // BLOCK * BLOCK, full_start)
    return start, full_start, full_end, end


@triton.jit
def edge_block(e, n_left, start, full_end, BLOCK: tl.constexpr):
    """The e-th edge block of :func:`key_blocks`' two edge ranges, the first ``n_left`` of them in
    [start, full_start): one loop serves both, so the block body is emitted once."""
    return tl.where(e < n_left, start + e * BLOCK, full_end + (e - n_left) * BLOCK)
