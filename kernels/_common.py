"""Pieces shared by several kernels: the one interpreter switch (config lists, interpreter-exact MMA and casts) and
counter-based dropout.

Dropout draws one Philox-4x32 number per element from ``(seed, c0, c1, c2)``: a 64-bit seed taken from torch's
generator and the element's own coordinates, so the forward and the backward regenerate the same mask without
storing it, and the interpreter produces exactly the bits a GPU does.
"""

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


def pick_configs(gpu_configs, interpreter_config):
    """The autotuner's candidates: the GPU list, or one interpreter config (autotune cannot time on a CPU)."""
    return [interpreter_config] if interpreting() else gpu_configs


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
