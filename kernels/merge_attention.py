"""Merging attention computed over disjoint key sets: split-KV decoding, ring and context parallelism.

Part s holds, for every query row r, its output o_s (already normalised over the part's keys) and its log-sum-exp
lse_s (natural log; -inf when the part has no key for the row). Over the union of the keys, per row:
    m = max_s lse_s,   e_s = exp(lse_s - m),   l = sum_s e_s
    out = (sum_s e_s o_s) / l,   lse = m + log(l)             (every part empty: out = 0, lse = -inf)
Dividing by l (rather than weighting by exp(lse_s - lse)) lets the rounding the parts' weights share cancel. The
forward reads each part's output once; the S scalars lse_s are read twice (max, then weights).
Backward, with w_s = exp(lse_s - lse) from the saved merged lse and g_s = dout . o_s:
    d o_s = w_s dout,   d lse_s = w_s (g_s - sum_t w_t g_t + dlse)
One pass reads each part once and parks g_s in d lse_s's buffer until the sum is known (a barrier, then a pass
over the scalars). An empty part (lse_s = -inf) gets zero gradients and adds nothing, whatever its o_s holds.
Exponentials in base 2 (exp2), statistics in fp32 (fp64 for fp64 parts).
"""

import triton
import triton.language as tl

from ._common import LN2, LOG2E, NEG_INF, cast

MAX_BLOCK_D = 256  # the widest row a program holds (the launcher falls back to eager above it)


def config(block_d: int) -> triton.Config:
    """Rows per program: 2048 elements per tile, 16 fp32 accumulators per thread of 4 warps (memory-bound: many
    small programs keep more loads in flight than few wide ones; 4096 cost half the occupancy on sm_80/90)."""
    return triton.Config({"BLOCK_R": max(1, min(64, 2048 // block_d))}, num_warps=4)


@triton.jit
def _row_tile(R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows (int64), the columns, and which rows / elements lie inside ``R x D``."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    r_ok = rows < R
    return rows, cols, r_ok, r_ok[:, None] & (cols[None, :] < D)


@triton.jit
def _part_lse(PartLse, stride_lr, rows, r_ok, ACC: tl.constexpr):
    return tl.load(PartLse + rows * stride_lr, mask=r_ok, other=NEG_INF).to(ACC)


@triton.jit
def _weight(x, shift):
    """exp(x - shift) in base 2; 0 for an empty part (x = -inf), whatever the shift."""
    return tl.where(x != NEG_INF, tl.math.exp2((x - shift) * LOG2E), 0.0)


@triton.jit
def _part(lse_ptr, part, stride_lr, rows, r_ok, tile_ok, shift, ACC: tl.constexpr):
    """One part's rows: whether each holds keys, its weight exp(lse_s - shift) and its output tile."""
    x = _part_lse(lse_ptr, stride_lr, rows, r_ok, ACC)
    o = tl.load(part, mask=tile_ok, other=0.0).to(ACC)
    return x != NEG_INF, _weight(x, shift), o


@triton.jit
def _merge_fwd(
    Parts, PartLse, Out, Lse,  # (S, R, D) part outputs, (S, R) their lse, (R, D) merged output, (R,) merged lse
    stride_ps, stride_pr, stride_pd,
    stride_ls, stride_lr,
    stride_or, stride_od,
    S, R, D,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, r_ok, tile_ok = _row_tile(R, D, BLOCK_R, BLOCK_D)

    m = tl.full([BLOCK_R], NEG_INF, ACC)
    lse_ptr = PartLse
    for _ in range(S):
        m = tl.maximum(m, _part_lse(lse_ptr, stride_lr, rows, r_ok, ACC))
        lse_ptr += stride_ls
    m = tl.where(m == NEG_INF, 0.0, m)  # every part empty: e_s = 0 below, no (-inf) - (-inf)

    l_i = tl.zeros([BLOCK_R], ACC)
    acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    lse_ptr = PartLse
    part = Parts + rows[:, None] * stride_pr + cols[None, :] * stride_pd
    for _ in range(S):
        live, e, o = _part(lse_ptr, part, stride_lr, rows, r_ok, tile_ok, m, ACC)
        acc += tl.where(live[:, None], e[:, None] * o, 0.0)  # an empty part's o may hold anything (NaN)
        l_i += e
        lse_ptr += stride_ls
        part += stride_ps

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, NEG_INF, m + tl.math.log2(tl.where(empty, 1.0, l_i)) * LN2)
    tl.store(Lse + rows, lse, mask=r_ok)
    tl.store(Out + rows[:, None] * stride_or + cols[None, :] * stride_od, cast(out, Out.dtype.element_ty),
             mask=tile_ok)


@triton.jit
def _merge_bwd(
    Parts, PartLse, Lse, DOut, DLse, DParts, DPartLse,  # (S,R,D), (S,R), (R,), (R,D), (R,) or None, (S,R,D), (S,R)
    stride_ps, stride_pr, stride_pd,
    stride_ls, stride_lr,
    stride_dor, stride_dod,
    stride_dps, stride_dpr, stride_dpd,
    stride_dls, stride_dlr,
    S, R, D,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, r_ok, tile_ok = _row_tile(R, D, BLOCK_R, BLOCK_D)

    lse = tl.load(Lse + rows, mask=r_ok, other=NEG_INF).to(ACC)
    lse = tl.where(lse == NEG_INF, float("inf"), lse)  # every part empty: w_s = exp(-inf) = 0
    do = tl.load(DOut + rows[:, None] * stride_dor + cols[None, :] * stride_dod, mask=tile_ok, other=0.0).to(ACC)

    g_sum = tl.zeros([BLOCK_R], ACC)
    lse_ptr = PartLse
    dlse_ptr = DPartLse
    part = Parts + rows[:, None] * stride_pr + cols[None, :] * stride_pd
    dpart = DParts + rows[:, None] * stride_dpr + cols[None, :] * stride_dpd
    for _ in range(S):
        live, w, o = _part(lse_ptr, part, stride_lr, rows, r_ok, tile_ok, lse, ACC)
        g = tl.sum(tl.where(live[:, None], do * o, 0.0), 1)
        tl.store(dpart, cast(w[:, None] * do, DParts.dtype.element_ty), mask=tile_ok)
        tl.store(dlse_ptr + rows * stride_dlr, g, mask=r_ok)  # parked until g_sum is complete
        g_sum += w * g
        lse_ptr += stride_ls
        dlse_ptr += stride_dls
        part += stride_ps
        dpart += stride_dps

    if DLse is not None:
        g_sum -= tl.load(DLse + rows, mask=r_ok, other=0.0).to(ACC)
    tl.debug_barrier()  # other threads of this program may hold the rows whose g they parked
    lse_ptr = PartLse
    dlse_ptr = DPartLse
    for _ in range(S):
        w = _weight(_part_lse(lse_ptr, stride_lr, rows, r_ok, ACC), lse)
        g = tl.load(dlse_ptr + rows * stride_dlr, mask=r_ok, other=0.0).to(ACC)
        tl.store(dlse_ptr + rows * stride_dlr, cast(w * (g - g_sum), DPartLse.dtype.element_ty), mask=r_ok)
        lse_ptr += stride_ls
        dlse_ptr += stride_dls
