"""Fused residual add + LayerNorm / RMSNorm over the last dimension, forward and backward.

Forward, per row of N elements (fp32 statistics; fp64 for fp64 inputs):
    z    = dropout(x) + residual          (rounded to the residual stream's dtype; written out as residual_out
                                           only when the caller or the backward needs it)
    mean = sum(z) / N,  var = sum((z - mean)^2) / N         (RMSNorm: mean = 0, var = sum(z^2) / N)
    rstd = 1 / sqrt(var + eps),  xhat = (z - mean) * rstd,  out = xhat * w + b
    (ROUND_XHAT: xhat is rounded to z's dtype before the weight multiply, as Llama-family RMSNorms do; Out may
    have another dtype than X, e.g. the promoted dtype of such a norm's weight and input)
Rows that fit one register tile are reduced exactly in two passes over registers. Longer rows take a looped path:
a first sweep merges per-chunk (mean, M2) pairs (Chan et al.), a second sweep recomputes z and normalises.

Backward, per row, with g = w * dout (w = 1 without weight):
    dz = rstd * (g - xhat * mean(g * xhat) - mean(g))     (RMSNorm: no mean(g) term)   + d residual_out
    dresidual = dz,   dx = dz * keep / (1 - p)   (the forward's keep-mask, regenerated),
    dw = sum over rows of dout * xhat,   db = sum over rows of dout
Each backward program owns a contiguous range of rows and writes one partial (dw, db) row; _layer_norm_bwd_reduce
sums the partial rows in a fixed order. There are no atomics, so repeated backward passes are bitwise equal.
Dropout keeps element (row, col) iff output col % 4 of philox(seed, col // 4, row mod 2^31, row div 2^31) >= p;
the backward regenerates the mask, nothing is stored.
"""

import triton
import triton.language as tl

from ._common import cast

# -- configs -------------------------------------------------------------------------------------------------------
# Memory-bound kernels: no autotuning. The config is a function of N alone, so the rows each backward program sums
# (and therefore dweight/dbias bit for bit) never depend on timing noise. A tile holds BLOCK_M rows of BLOCK_N
# columns; num_warps gives each thread 8 values of a row-sized array in the forward and 4 in the backward, which
# keeps more arrays live (dz, xhat, w * dout, the dweight/dbias accumulators, the regenerated dropout mask). Tiles
# needing 16 warps (at most 128 registers per thread) are used only where they compile without spilling with
# margin on sm_80 and sm_90 (fastattn.hwfit, with triton 3.6 and 3.9); longer rows loop over chunks.

MIN_BLOCK_N = 16
MAX_TILE_N_FWD = 8192  # longer rows take the looped forward (16384 in one tile spills on sm_90)
MAX_TILE_N_BWD = 1024  # longer rows take the looped backward (2048 with 16 warps sits at the 128-register cap)
LOOP_FWD = (1, 2048)  # (BLOCK_M, BLOCK_N) of the looped paths: 8 warps
LOOP_BWD = (4, 256)  # 4 rows per step amortise the read-modify-write of the partial (dw, db) rows


def _config(block_m: int, block_n: int, looped: bool, per_thread: int = 8) -> triton.Config:
    warps = min(16, max(4, block_m * block_n // (32 * per_thread)))
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "LOOPED": looped}, num_warps=warps, num_stages=1)


def tile_block_n(n: int) -> int:
    return max(MIN_BLOCK_N, triton.next_power_of_2(max(n, 1)))


def fwd_config(n: int) -> triton.Config:
    block_n = tile_block_n(n)
    if block_n > MAX_TILE_N_FWD:
        return _config(*LOOP_FWD, True)
    return _config(max(1, 1024 // block_n), block_n, False)


def bwd_config(n: int) -> triton.Config:
    block_n = tile_block_n(n)
    if block_n > MAX_TILE_N_BWD:
        return _config(*LOOP_BWD, True, 4)
    return _config(max(1, 1024 // block_n), block_n, False, 4)


def all_fwd_configs() -> list:
    """Every config fwd_config can return (for the hardware-fit report)."""
    sizes = [MIN_BLOCK_N << i for i in range(32) if MIN_BLOCK_N << i <= MAX_TILE_N_FWD]
    return [fwd_config(n) for n in sizes] + [fwd_config(2 * MAX_TILE_N_FWD)]


def all_bwd_configs() -> list:
    sizes = [MIN_BLOCK_N << i for i in range(32) if MIN_BLOCK_N << i <= MAX_TILE_N_BWD]
    return [bwd_config(n) for n in sizes] + [bwd_config(2 * MAX_TILE_N_BWD)]


REDUCE_CONFIG = triton.Config({"BLOCK_G": 32, "BLOCK_N": 128}, num_warps=4, num_stages=1)
MASK_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 256}, num_warps=4, num_stages=1)


# -- helpers -------------------------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(rows, M_INNER, stride_outer, stride_inner):
    # Leading dims come in as two strided levels, so views like x[:, 1:] of a (B, L, N) tensor need no copy. The
    # split is in int32 (row counts stay below 2^31; an int64 division costs dozens of registers), the offsets in
    # int64.
    outer = rows // M_INNER
    inner = rows - outer * M_INNER
    return outer.to(tl.int64) * stride_outer + inner.to(tl.int64) * stride_inner


@triton.jit
def _keep(seed, rows, start, p, BLOCK_N: tl.constexpr):
    """Keep-mask of the (rows, start + arange(BLOCK_N)) tile; ``start`` is a multiple of 4.

    One Philox-4x32 call yields four numbers, used for four consecutive columns: a quarter of the rounds of one
    call per element, whose registers would otherwise make the backward spill."""
    rows = rows.to(tl.int64)
    lo = (rows & 0x7FFFFFFF).to(tl.uint32)[:, None]
    hi = (rows >> 31).to(tl.uint32)[:, None]
    quad = (start // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)[None, :]
    zero = quad * 0 + lo * 0
    r0, r1, r2, r3 = tl.philox(seed, quad + zero, lo + zero, hi + zero, zero)
    r = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [..., i, j] = r_(2i + j): column 4q + 2i + j
    r = tl.reshape(r, (rows.shape[0], BLOCK_N))
    return tl.uint_to_uniform_float(r) >= p


@triton.jit
def _load_z(X, R, x_rows, r_rows, rows, start, cols, mask, stride_xn, stride_rn, seed, dropout_p,
            HAS_DROPOUT: tl.constexpr, Z_DT: tl.constexpr, ACC: tl.constexpr,
            BLOCK_N: tl.constexpr):
    z = tl.load(X + x_rows[:, None] + cols[None, :] * stride_xn, mask=mask, other=0.0).to(ACC)
    if HAS_DROPOUT:
        keep = _keep(seed, rows, start, dropout_p, BLOCK_N)
        z = tl.where(keep, z * (1.0 / (1.0 - dropout_p)), 0.0)
    if R is not None:
        z += tl.load(R + r_rows[:, None] + cols[None, :] * stride_rn, mask=mask, other=0.0).to(ACC)
    # Round to the residual stream's dtype: the normalised value is exactly the residual_out the caller sees and
    # the backward reads.
    return cast(z, Z_DT).to(ACC)


@triton.jit
def _affine(xhat, W, B, cols, Z_DT: tl.constexpr, ACC: tl.constexpr, ROUND_XHAT: tl.constexpr):
    # cols arrive clamped into [0, N), so the parameter loads need no mask.
    y = _weighted_xhat(xhat, Z_DT, ACC, ROUND_XHAT)
    if W is not None:
        y = y * tl.load(W + cols).to(ACC)[None, :]
    if B is not None:
        y = y + tl.load(B + cols).to(ACC)[None, :]
    return y


# -- forward -------------------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_fwd(
    X, R, W, B, Out, RO, Mean, Rstd,  # X, R: (M, N) through strides; W, B: (N,); Out, RO: (M, N) contiguous; (M,)
    stride_xo, stride_xi, stride_xn,
    stride_ro, stride_ri, stride_rn,
    M, N, M_INNER,  # row r lives at (r // M_INNER) * stride_*o + (r % M_INNER) * stride_*i
    eps, seed, dropout_p,
    IS_RMS: tl.constexpr, HAS_DROPOUT: tl.constexpr, Z_DT: tl.constexpr, ACC: tl.constexpr,
    ROUND_XHAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOPED: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = _row_offsets(rows, M_INNER, stride_xo, stride_xi)
    r_rows = _row_offsets(rows, M_INNER, stride_ro, stride_ri)
    o_rows = rows.to(tl.int64) * N
    offs = tl.arange(0, BLOCK_N)
    if not LOOPED:
        mask = row_ok[:, None] & (offs[None, :] < N)
        z = _load_z(X, R, x_rows, r_rows, rows, 0, offs, mask, stride_xn, stride_rn, seed, dropout_p,
                    HAS_DROPOUT, Z_DT, ACC, BLOCK_N)
        if RO is not None:
            tl.store(RO + o_rows[:, None] + offs[None, :], z.to(RO.dtype.element_ty), mask=mask)
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], ACC)
            var = tl.sum(z * z, 1) / N
        else:
            mean = tl.sum(z, 1) / N
            zc = tl.where(mask, z - mean[:, None], 0.0)
            var = tl.sum(zc * zc, 1) / N
        rstd = tl.math.rsqrt(var + eps)
        y = _affine((z - mean[:, None]) * rstd[:, None], W, B, tl.where(offs < N, offs, 0), Z_DT, ACC, ROUND_XHAT)
        tl.store(Out + o_rows[:, None] + offs[None, :], cast(y, Out.dtype.element_ty), mask=mask)
    else:
        count = tl.zeros([BLOCK_M], ACC)
        mean = tl.zeros([BLOCK_M], ACC)
        m2 = tl.zeros([BLOCK_M], ACC)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            mask = row_ok[:, None] & (cols[None, :] < N)
            z = _load_z(X, R, x_rows, r_rows, rows, start, cols, mask, stride_xn, stride_rn, seed, dropout_p,
                        HAS_DROPOUT, Z_DT, ACC, BLOCK_N)
            if RO is not None:
                tl.store(RO + o_rows[:, None] + cols[None, :], z.to(RO.dtype.element_ty), mask=mask)
            if IS_RMS:
                m2 += tl.sum(z * z, 1)
            else:  # merge this chunk's (mean, M2) into the running pair: no cancellation for large |mean|
                n_c = tl.minimum(N - start, BLOCK_N).to(ACC)
                mean_c = tl.sum(z, 1) / n_c
                zc = tl.where(mask, z - mean_c[:, None], 0.0)
                total = count + n_c
                delta = mean_c - mean
                mean += delta * (n_c / total)
                m2 += tl.sum(zc * zc, 1) + delta * delta * (count * n_c / total)
                count = total
        rstd = tl.math.rsqrt(m2 / N + eps)
        for start in range(0, N, BLOCK_N):  # second sweep recomputes z (its inputs mostly come back from L2)
            cols = start + offs
            mask = row_ok[:, None] & (cols[None, :] < N)
            z = _load_z(X, R, x_rows, r_rows, rows, start, cols, mask, stride_xn, stride_rn, seed, dropout_p,
                        HAS_DROPOUT, Z_DT, ACC, BLOCK_N)
            y = _affine((z - mean[:, None]) * rstd[:, None], W, B, tl.where(cols < N, cols, 0), Z_DT, ACC,
                        ROUND_XHAT)
            tl.store(Out + o_rows[:, None] + cols[None, :], cast(y, Out.dtype.element_ty), mask=mask)
    if Mean is not None:
        tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


# -- backward ------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_terms(Z, DY, W, Mean, Rstd, z_rows, dy_rows, rows, cols, mask, row_ok, stride_zn, stride_dyn,
               IS_RMS: tl.constexpr, ACC: tl.constexpr):
    """(xhat, g = w * dy, dy, rstd) of one tile."""
    z = tl.load(Z + z_rows[:, None] + cols[None, :] * stride_zn, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + dy_rows[:, None] + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(ACC)
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    # Outside ``mask`` xhat is junk, but dy = g = 0 there, so it never reaches a sum.
    if IS_RMS:
        xhat = z * rstd[:, None]
    else:
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        xhat = (z - mean[:, None]) * rstd[:, None]
    g = dy
    if W is not None:
        g = dy * tl.load(W + cols).to(ACC)[None, :]  # cols clamped into [0, N)
    return xhat, g, dy, rstd


@triton.jit
def _weighted_xhat(xhat, Z_DT: tl.constexpr, ACC: tl.constexpr, ROUND_XHAT: tl.constexpr):
    """The xhat the forward multiplied by the weight (dweight's factor): rounded to z's dtype with ROUND_XHAT. The
    input gradient differentiates through that rounding as the identity, as autograd does, so it keeps xhat."""
    if ROUND_XHAT:
        xhat = cast(xhat, Z_DT).to(ACC)
    return xhat


@triton.jit
def _bwd_store(dz, keep, DZ, DX, DR, z_rows_dz, o_rows, cols, mask, stride_dzn, dropout_p,
               HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr):
    if DZ is not None:  # gradient flowing into residual_out (pre-norm blocks)
        dz += tl.load(DZ + z_rows_dz[:, None] + cols[None, :] * stride_dzn, mask=mask, other=0.0).to(ACC)
    if DR is not None:
        tl.store(DR + o_rows[:, None] + cols[None, :], cast(dz, DR.dtype.element_ty), mask=mask)
    if DX is not None:
        if HAS_DROPOUT:
            dz = tl.where(keep, dz * (1.0 / (1.0 - dropout_p)), 0.0)
        tl.store(DX + o_rows[:, None] + cols[None, :], cast(dz, DX.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd(
    Z, DY, DZ, W, Mean, Rstd, DX, DR, DWp, DBp,
    # Z: the normalised input (residual_out, or x itself), DY: d out, DZ: d residual_out -- (M, N) through strides;
    # W: (N,); Mean, Rstd: (M,); DX, DR: (M, N) contiguous; DWp, DBp: (programs, >= N) partial sums in ACC
    stride_zo, stride_zi, stride_zn,
    stride_dyo, stride_dyi, stride_dyn,
    stride_dzo, stride_dzi, stride_dzn,
    stride_p,  # row stride of DWp, DBp: BLOCK_N on the tile path (stored unmasked), N on the looped path
    M, N, M_INNER, BLOCKS_PER_PROG,
    seed, dropout_p,
    IS_RMS: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr, ROUND_XHAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOPED: tl.constexpr,
):
    pid = tl.program_id(0)
    # This program's row blocks: pid * BLOCKS_PER_PROG + [0, BLOCKS_PER_PROG); past the last row everything is
    # masked (the last program only).
    offs = tl.arange(0, BLOCK_N)
    part = pid.to(tl.int64) * stride_p
    if not LOOPED:
        col_ok = offs < N
        dw = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        db = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for i in range(BLOCKS_PER_PROG):
            rows = (pid * BLOCKS_PER_PROG + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            mask = row_ok[:, None] & col_ok[None, :]
            keep = 0
            if HAS_DROPOUT:  # drawn first, while few values are live: the Philox rounds need many registers
                keep = _keep(seed, rows, 0, dropout_p, BLOCK_N)
            xhat, g, dy, rstd = _bwd_terms(Z, DY, W, Mean, Rstd, _row_offsets(rows, M_INNER, stride_zo, stride_zi),
                                           _row_offsets(rows, M_INNER, stride_dyo, stride_dyi), rows,
                                           tl.where(col_ok, offs, 0), mask, row_ok, stride_zn, stride_dyn,
                                           IS_RMS, ACC)
            if DWp is not None:
                dw += dy * _weighted_xhat(xhat, Z.dtype.element_ty, ACC, ROUND_XHAT)
            if DBp is not None:
                db += dy
            c1 = tl.sum(xhat * g, 1) / N
            if IS_RMS:
                dz = (g - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, 1) / N
                dz = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            _bwd_store(dz, keep, DZ, DX, DR, _row_offsets(rows, M_INNER, stride_dzo, stride_dzi),
                       rows.to(tl.int64) * N, offs, mask, stride_dzn, dropout_p, HAS_DROPOUT, ACC)
        # Whole padded rows (zero past N): no column mask has to stay live across the loop, which ptxas would
        # spill on sm_90.
        if DWp is not None:
            tl.store(DWp + part + offs, tl.sum(dw, 0))
        if DBp is not None:
            tl.store(DBp + part + offs, tl.sum(db, 0))
    else:
        for i in range(BLOCKS_PER_PROG):
            rows = (pid * BLOCKS_PER_PROG + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            z_rows = _row_offsets(rows, M_INNER, stride_zo, stride_zi)
            dy_rows = _row_offsets(rows, M_INNER, stride_dyo, stride_dyi)
            c1 = tl.zeros([BLOCK_M], ACC)
            c2 = tl.zeros([BLOCK_M], ACC)
            for start in range(0, N, BLOCK_N):
                cols = start + offs
                mask = row_ok[:, None] & (cols[None, :] < N)
                xhat, g, dy, rstd = _bwd_terms(Z, DY, W, Mean, Rstd, z_rows, dy_rows, rows,
                                               tl.where(cols < N, cols, 0), mask, row_ok, stride_zn, stride_dyn,
                                               IS_RMS, ACC)
                c1 += tl.sum(xhat * g, 1)
                c2 += tl.sum(g, 1)
            c1 = c1 / N
            c2 = c2 / N
            for start in range(0, N, BLOCK_N):
                cols = start + offs
                col_ok = cols < N
                mask = row_ok[:, None] & col_ok[None, :]
                keep = 0
                if HAS_DROPOUT:
                    keep = _keep(seed, rows, start, dropout_p, BLOCK_N)
                xhat, g, dy, rstd = _bwd_terms(Z, DY, W, Mean, Rstd, z_rows, dy_rows, rows,
                                               tl.where(col_ok, cols, 0), mask, row_ok, stride_zn, stride_dyn,
                                               IS_RMS, ACC)
                # This program's own partial row, updated in place: no other program touches it.
                if DWp is not None:
                    acc = tl.load(DWp + part + cols, mask=col_ok, other=0.0)
                    dw_c = tl.sum(dy * _weighted_xhat(xhat, Z.dtype.element_ty, ACC, ROUND_XHAT), 0)
                    tl.store(DWp + part + cols, acc + dw_c, mask=col_ok)
                if DBp is not None:
                    acc = tl.load(DBp + part + cols, mask=col_ok, other=0.0)
                    tl.store(DBp + part + cols, acc + tl.sum(dy, 0), mask=col_ok)
                if IS_RMS:
                    dz = (g - xhat * c1[:, None]) * rstd[:, None]
                else:
                    dz = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                _bwd_store(dz, keep, DZ, DX, DR, _row_offsets(rows, M_INNER, stride_dzo, stride_dzi),
                           rows.to(tl.int64) * N, cols, mask, stride_dzn, dropout_p, HAS_DROPOUT, ACC)
            # The next row block reads the partial rows back, maybe in other threads than wrote them.
            tl.debug_barrier()


@triton.jit
def _sum_partials(Part, Out, stride_p, G, cols, col_ok, ACC: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Out[cols] = the sum of the G partial rows of Part in a fixed order (BLOCK_G rows at a time, then a tree)."""
    offs_g = tl.arange(0, BLOCK_G)
    acc = tl.zeros([BLOCK_G, BLOCK_N], ACC)
    for start in range(0, G, BLOCK_G):
        g = start + offs_g
        acc += tl.load(Part + g.to(tl.int64)[:, None] * stride_p + cols[None, :],
                       mask=(g < G)[:, None] & col_ok[None, :], other=0.0)
    tl.store(Out + cols, cast(tl.sum(acc, 0), Out.dtype.element_ty), mask=col_ok)


@triton.jit
def _layer_norm_bwd_reduce(
    DWp, DBp, DW, DB,  # DWp, DBp: (G, >= N) partial sums in ACC with row stride stride_p; DW, DB: (N,)
    stride_p, G, N,
    ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if DWp is not None:
        _sum_partials(DWp, DW, stride_p, G, cols, col_ok, ACC, BLOCK_G, BLOCK_N)
    if DBp is not None:
        _sum_partials(DBp, DB, stride_p, G, cols, col_ok, ACC, BLOCK_G, BLOCK_N)


@triton.jit
def _layer_norm_dropout_mask(
    Keep,  # (M, N) bool: the keep-mask the kernels above draw, for tests and debugging
    M, N, seed, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, rows, tl.program_id(1) * BLOCK_N, dropout_p, BLOCK_N)
    tl.store(Keep + rows.to(tl.int64)[:, None] * N + cols[None, :], keep,
             mask=(rows[:, None] < M) & (cols[None, :] < N))
