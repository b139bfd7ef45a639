"""What several op modules share, written once: statistic and accumulator dtypes, autotune buckets, the dropout
seed, dtype names in messages and the reason an op falls back to eager.

The device policy, kernel launching and the fallback warning itself live in :mod:`fastattn._runtime`; the
interpreter's work-arounds inside kernels in :mod:`fastattn.kernels._common`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn import _runtime

# torch dtype -> the Triton dtype a kernel's constexpr takes (residual streams, accumulators)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}

# Activation dtypes the kernels take: fp16/bf16/fp32 everywhere, float64 only through the interpreter (gradcheck).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Saved statistics (log-sum-exp, mean, rstd) and partial sums: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_tl(dtype: torch.dtype) -> tl.dtype:
    """The kernels' accumulator (``ACC`` constexpr) for activations of ``dtype``: fp32, or fp64 for fp64."""
    return TL_DTYPES[stat_dtype(dtype)]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: TF32 for fp32 exactly when torch's matmuls would use it
    (``torch.backends.cuda.matmul.allow_tf32``), else IEEE."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


# The SM count the schedules assume off a GPU (the interpreter): small, so that tests see split work.
INTERPRETER_SMS = 4


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (CUDA), or :data:`INTERPRETER_SMS` elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def bucket(n: int) -> int:
    """The power-of-two bucket of a size, an autotune key (one timing per bucket, not per size)."""
    return triton.next_power_of_2(max(n, 1))


def draw_seed(dropout_p: float) -> Tensor | None:
    """The dropout seed, drawn from torch's default (CPU) generator so that ``torch.manual_seed`` reproduces the
    mask; None without dropout. A tensor, so ``torch.compile`` keeps the draw in the graph."""
    return torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0.0 else None


def seed_int(seed: Tensor | None) -> int:
    """The kernels' seed argument (0 without dropout, where the kernels never read it)."""
    return int(seed.item()) if seed is not None else 0


def dtype_name(dtype: torch.dtype) -> str:
    """``float16`` rather than ``torch.float16``, for messages and report labels."""
    return str(dtype).replace("torch.", "")


def check_float_dtype(op: str, name: str, t: Tensor, allowed: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"fastattn.{op}: {name} must have dtype {', '.join(map(dtype_name, allowed))}; got "
                        f"{dtype_name(t.dtype)}")


def check_like_x(op: str, name: str, t: object, x: Tensor) -> None:
    """An optional second activation (a residual, an identity): None, or a Tensor of ``x``'s shape."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"fastattn.{op}: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(f"fastattn.{op}: {name} must have x's shape {tuple(x.shape)}; got {tuple(t.shape)}")


def check_window_softcap(op: str, window_size, softcap) -> None:
    """The score modifiers every attention op takes in flash-attention's form: ``window_size`` two ints (left, right;
    negative = unbounded), ``softcap`` a finite float >= 0 (0 disables it)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"fastattn.{op}: window_size must be two ints (left, right), negative = unbounded; got "
                        f"{window_size!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0.0 <= softcap < math.inf:
        raise ValueError(f"fastattn.{op}: softcap must be a finite float >= 0 (0 disables it); got {softcap!r}")


def check_alibi_no_grad(op: str, alibi_slopes) -> None:
    """ALiBi slopes that would get a gradient raise: the kernels compute none (the slopes are fixed in ALiBi
    models), so a silent zero would be wrong."""
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"fastattn.{op}: alibi_slopes requires grad, but the kernels compute no gradient for the "
                         "slopes (fixed in ALiBi models); pass alibi_slopes.detach()")


def fallback_reason(device: torch.device, dtype: torch.dtype,
                    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> str | None:
    """Why tensors of ``dtype`` on ``device`` cannot run the Triton kernels (None when they can): no GPU and no
    interpreter, float64 outside the interpreter, or a dtype the kernels do not take."""
    if not _runtime.triton_device_ok(device):
        return _runtime.device_fallback_reason(device)
    if dtype == torch.float64 and device.type != "cpu":
        return "float64 runs the Triton kernels only in the interpreter"
    if dtype not in dtypes:
        return f"dtype {dtype_name(dtype)} is not supported by the kernels"
    return None
