"""Packed variable-length attention's own kernel: the rows past the last sequence.

The attention kernels' VARLEN path (kernels/attention.py) runs programs per (sequence, key/value head); rows of the
packed query past ``cu_seqlens_q[B]`` belong to no sequence and no program writes them. _varlen_tail gives them
the values of a row with no key, ``out = 0`` and ``lse = -inf`` (forward), or only an lse value (the backward with
sinks reads a copy with ``+inf`` there, where each row's ``exp(sink - lse)`` must be 0). Each program reads the end
offset and stores only where its rows are past it, so a batch without such rows costs one load per program.
"""

import triton
import triton.language as tl


@triton.jit
def _varlen_tail(
    Out, Lse, CuQ,  # Out (T, H, DV), or None: lse only; Lse (H, T) fp32 (fp64 for fp64); CuQ (B + 1,) int32
    stride_ot, stride_oh, stride_od,
    stride_lh, stride_lt,
    T, DV, B, lse_fill,
    BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    h = tl.program_id(1).to(tl.int64)
    end = tl.load(CuQ + B)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tail = (rows >= end) & (rows < T)
    if Out is not None:
        offs_dv = tl.arange(0, BLOCK_DV)
        out_ptrs = Out + rows[:, None] * stride_ot + h * stride_oh + offs_dv[None, :] * stride_od
        out_ok = tail[:, None] & (offs_dv < DV)[None, :]
        tl.store(out_ptrs, tl.zeros([BLOCK_T, BLOCK_DV], Out.dtype.element_ty), mask=out_ok)
    fill = tl.full([BLOCK_T], lse_fill, Lse.dtype.element_ty)
    tl.store(Lse + h * stride_lh + rows * stride_lt, fill, mask=tail)
