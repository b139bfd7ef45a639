"""Pieces shared by several kernels: the interpreter switch for config lists and counter-based dropout.

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
