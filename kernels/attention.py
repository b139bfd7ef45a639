"""Fused scaled-dot-product attention (FlashAttention-2 style), forward and backward, with the score modifiers of
modern models (sliding window, softcap, ALiBi, sinks) as constexpr features of one kernel family.

Scores of query i and key j of head h (natural units; the kernels keep them in base 2 and use exp2):
    x = scale q_i . k_j;  x = softcap tanh(x / softcap) (HAS_SOFTCAP);  x -= slope_h |i + N - M - j| (HAS_ALIBI);
    x += mask_ij (float mask), or key excluded where a bool mask is False (MASK_KIND 2 / 1)
    key j visible iff i + lo <= j <= i + hi: lo = N - M - left (window), hi = min(causal_offset (IS_CAUSAL, top-left
    by default), N - M + right (window)); unbounded sides are past any index.
Forward, per program of BLOCK_M query rows -- (position i, head g) pairs of one GQA group, so the heads sharing a
key/value head share one pass over its keys (a decode step fills a tile with the group's heads) -- streaming
BLOCK_N keys with the online softmax:
    m = running max, l = running sum of exp(x - m);  HAS_SINKS: m and l start at sink_h and 1 (the sink joins the
    denominator and attends to nothing);  acc = sum_j dropout(exp(x_j - m)) v_j, rescaled by exp(m_old - m_new)
    out = acc / l / (1 - p),  lse = m + log l      (only lse, O(M), is saved; no visible key, no sink: 0 and -inf)
Key blocks no query of the tile sees are never visited (work proportional to the causal / window band); blocks
every query sees whole run without bounds, band or causal tests (the full-block loop); the rest (the diagonal, the
window's edges, the last partial block) are the edge blocks. A mask tensor is read on every visited block. With FMA
dots (fp32 without TF32) every block runs in the edge loop: a second copy of the body would spill.
Backward recomputes p = exp(x - lse) block by block (no atomics, so it is bitwise repeatable):
    delta = rowsum(dO * O) - dlse;  dsink_h = -sum_i exp(sink_h - lse_i) delta_i          (_attn_bwd_preprocess)
    dV = sum_i dropout(p)^T dO;  dX = p (dropout(dO V^T) - delta);  dS = dX (1 - tanh^2) with softcap, else dX
    dK = scale dS^T Q   (_attn_bwd_dkdv: a program per key block, over the query heads of its GQA group)
    dQ = scale dS K     (_attn_bwd_dq: a program per tile of query rows, packed as in the forward)
    dMask = dX          (a float mask that requires grad; written by _attn_bwd_dkdv)
VARLEN: the batch is packed sequences, (T, H, D) tensors and int32 cumulative lengths cu_seqlens_q/k; each program
finds its sequence's rows and lengths in _sequence, and every index above is within its sequence.
Dropout keeps (i, j) of head h iff philox(seed, k0 + j, q0 + i, z H + h) >= p (VARLEN: z = 0, q0 and k0 the
sequence's first rows), so both passes draw the same mask.
"""

import triton
import triton.language as tl

from ._common import LN2, LOG2E, NEG_INF, cast, dropout_keep, edge_block, key_blocks, mma, tanh
from .attention_configs import autotune

# -- shared pieces ---------------------------------------------------------------------------------------------------


@triton.jit
def _sequence(CuQ, CuK, z, M, N, VARLEN: tl.constexpr):
    """The prologue every kernel shares: the first query and key rows of sequence ``z`` in the (packed) tensors and
    its lengths -- dense: 0, 0, M, N; VARLEN: from the int32 cumulative lengths."""
    q0 = z * 0
    k0 = z * 0
    m = M
    n = N
    if VARLEN:
        q0 = tl.load(CuQ + z).to(tl.int64)
        k0 = tl.load(CuK + z).to(tl.int64)
        m = (tl.load(CuQ + z + 1) - q0).to(tl.int32)
        n = (tl.load(CuK + z + 1) - k0).to(tl.int32)
    return q0, k0, m, n


@triton.jit
def _band(M, N, causal_offset, window_left, window_right, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(lo, hi): key j is visible from query i iff i + lo <= j <= i + hi (offsets past any index where unbounded).
    The launcher clamps the window's bounds into [-1, M + N], so nothing here overflows."""
    lo = -(M + N + 1)
    hi = M + N + 1
    if IS_CAUSAL:
        hi = tl.minimum(hi, causal_offset)
    if HAS_WINDOW:
        lo = tl.where(window_left >= 0, N - M - window_left, lo)
        hi = tl.where(window_right >= 0, tl.minimum(hi, N - M + window_right), hi)
    return lo, hi


@triton.jit
def _consts(sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Base-2 score factors: plain ``x log2(e) = qk (scale log2 e)``; softcapped ``tanh(qk scale / c) (c log2 e)``."""
    cap_in = sm_scale
    if HAS_SOFTCAP:
        cap_in = sm_scale / softcap
    return sm_scale * LOG2E, cap_in, softcap * LOG2E


@triton.jit
def _query_tile(CuQ, CuK, Alibi, K, V, Mask, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn,
                stride_mz, stride_mh, stride_mm, stride_az, stride_ah, H, M, N, GROUP, sm_scale, softcap,
                causal_offset, window_left, window_right, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr, ACC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The prologue of the forward and dQ programs: a tile of BLOCK_M rows, (position i, head g) pairs
    ``i * GROUP + g`` of key/value head hk's group in sequence z, what its key blocks need (the key/value heads'
    bases, the mask's rows, ALiBi slopes, score factors, dropout counters) and the key blocks it visits
    (key_blocks)."""
    pid_m = tl.program_id(0)
    z = (tl.program_id(1) // (H // GROUP)).to(tl.int64)
    hk = tl.program_id(1) % (H // GROUP)
    q0, k0, Mz, Nz = _sequence(CuQ, CuK, z, M, N, VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Mz * GROUP
    i = tl.maximum(tl.minimum(rows // GROUP, Mz - 1), 0)  # rows past the sequence repeat its last (never stored)
    h = (hk * GROUP + rows % GROUP).to(tl.int64)
    slope2 = tl.zeros([BLOCK_M], ACC)
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + z * stride_az + h * stride_ah).to(ACC) * LOG2E
    lo, hi = _band(Mz, Nz, causal_offset, window_left, window_right, IS_CAUSAL, HAS_WINDOW)
    n_hi = tl.where(pid_m * BLOCK_M < Mz * GROUP, Nz, 0)  # a program past its sequence's rows visits nothing
    i_lo = tl.maximum(tl.minimum(pid_m * BLOCK_M // GROUP, Mz - 1), 0)
    i_hi = tl.maximum(tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, Mz - 1), 0)
    blocks = key_blocks(i_lo, i_hi, lo, hi, 0, n_hi, BLOCK_N)
    K_h = K + z * stride_kz + hk * stride_kh + k0 * stride_kn
    V_h = V + z * stride_vz + hk * stride_vh + k0 * stride_vn
    mask_rows = Mask + z * stride_mz + h * stride_mh + i * stride_mm
    consts = _consts(sm_scale, softcap, HAS_SOFTCAP)
    c1, c2 = _counters(z, h, q0 + i, H, VARLEN)
    return z, q0, k0, Nz, row_ok, i, h, i + (Nz - Mz), slope2, c1, c2, lo, hi, K_h, V_h, mask_rows, consts, blocks


@triton.jit
def _schedule(blocks, PRECISION: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """key_blocks' schedule as the loops run it: (start, edge blocks left of the full ones, edge blocks, full_start,
    full_end, FMA). With FMA dots (fp32 without TF32) every block is an edge block: one loop, as a second copy of
    the body spills."""
    start, full_start, full_end, end = blocks
    FMA: tl.constexpr = PRECISION == "ieee" and DTYPE.primitive_bitwidth >= 32
    if FMA:
        full_start = end
        full_end = end
    n_left = tl.cdiv(full_start - start, BLOCK)
    return start, n_left, n_left + tl.cdiv(end - full_end, BLOCK), full_start, full_end


@triton.jit
def _counters(z, h, row, H, VARLEN: tl.constexpr):
    """Dropout's second and third Philox counters of query ``row`` (in the packed tensor) of head ``h``."""
    c2 = z * H + h
    if VARLEN:
        c2 = h
    return row.to(tl.int32), c2.to(tl.int32)


@triton.jit
def _tile(ptrs, r_ok, c_ok, TEST_R: tl.constexpr, TEST_C: tl.constexpr):
    """A 2-D load testing only the sides that can run out of bounds (full blocks of an even head dim: none)."""
    if TEST_R and TEST_C:
        x = tl.load(ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    elif TEST_R:
        x = tl.load(ptrs, mask=r_ok[:, None], other=0.0)
    elif TEST_C:
        x = tl.load(ptrs, mask=c_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _scores(qk, i, j, qpos, slope2, mask_ptrs, inb, lo, hi, qk_scale, cap_in, cap_out,
            EDGE: tl.constexpr, BANDED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
            MASK_KIND: tl.constexpr):
    """Base-2 scores of a block from ``qk = q . k`` (either orientation: ``i``, ``j``, ``qpos = i + N - M`` and
    ``slope2`` broadcast to its shape), -inf where a key is excluded, and tanh's value (HAS_SOFTCAP; the gradient
    needs it). Edge blocks test ``inb`` (the bounds) and the band; the mask, if any, is read on every block."""
    if HAS_SOFTCAP:
        t = tanh(qk * cap_in)
        s = t * cap_out
    else:
        t = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(qpos - j).to(s.dtype)
    if MASK_KIND != 0:
        if EDGE:
            mv = tl.load(mask_ptrs, mask=inb, other=0)
        else:
            mv = tl.load(mask_ptrs)
        if MASK_KIND == 1:
            s = tl.where(mv != 0, s, NEG_INF)
        else:
            s = s + mv.to(s.dtype) * LOG2E
    if EDGE:
        valid = inb
        if BANDED:
            valid = valid & (j >= i + lo) & (j <= i + hi)
        s = tl.where(valid, s, NEG_INF)
    return s, t


# -- forward -------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(acc, l_i, m_i, q, K_h, V_h, mask_rows, start_n, offs_n, offs_d, offs_dv, i, qpos, slope2, c1, c2,
               lo, hi, N, D, DV, k0, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale, cap_in, cap_out,
               seed, dropout_p,
               EDGE: tl.constexpr, BANDED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_SINKS: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr,
               PRECISION: tl.constexpr, ACC: tl.constexpr):
    """One key block of the online softmax (``EDGE``: with the bound and band tests)."""
    j = start_n + offs_n
    n_ok = j < N
    kt = _tile(K_h + offs_d[:, None] * stride_kd + j[None, :] * stride_kn, offs_d < D, n_ok, not EVEN_D, EDGE)
    qk = mma(q, kt, tl.zeros([q.shape[0], offs_n.shape[0]], ACC), PRECISION)
    s, _ = _scores(qk, i[:, None], j[None, :], qpos[:, None], slope2[:, None], mask_rows[:, None] + j[None, :] *
                   stride_mn, n_ok[None, :], lo, hi, qk_scale, cap_in, cap_out, EDGE, BANDED, HAS_SOFTCAP, HAS_ALIBI,
                   MASK_KIND)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = m_new
    if (EDGE or MASK_KIND != 0) and not HAS_SINKS:  # a row with every key excluded so far: no (-inf) - (-inf)
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, (k0 + j[None, :]).to(tl.int32), c1[:, None], c2[:, None], dropout_p)
        p = tl.where(keep, p, 0.0)
    v = _tile(V_h + j[:, None] * stride_vn + offs_dv[None, :] * stride_vd, n_ok, offs_dv < DV, EDGE, not EVEN_D)
    acc = mma(cast(p, v.dtype), v, acc * alpha[:, None], PRECISION)
    return acc, l_i, m_new


@autotune("_attn_fwd")
@triton.jit
def _attn_fwd(
    Q, K, V, Mask, Alibi, Sinks, Out, Lse, CuQ, CuK,
    # Q (Z,H,M,D), K (Z,HKV,N,D), V (Z,HKV,N,DV), Mask broadcast (Z,H,M,N), Alibi (Z|1,H) fp32, Sinks (H,),
    # Out (Z,H,M,DV), Lse fp32 through (z, h, m) strides; VARLEN: (T,H,D) tensors as (1,H,T,D) views, CuQ/CuK (Z+1,)
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_az, stride_ah,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_lz, stride_lh, stride_lm,
    H, M, N, D, DV, GROUP,  # GROUP = H // HKV query heads share one key/value head; M, N: VARLEN's longest
    ROWS_BUCKET, N_BUCKET,  # autotune keys only: power-of-two buckets of the rows (M * GROUP) and of N
    sm_scale, causal_offset, window_left, window_right, softcap, seed, dropout_p,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr, MASK_KIND: tl.constexpr,  # MASK_KIND: 0 none, 1 bool, 2 additive float
    HAS_DROPOUT: tl.constexpr, VARLEN: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    z, q0, k0, Nz, row_ok, i, h, qpos, slope2, c1, c2, lo, hi, K_h, V_h, mask_rows, consts, blocks = _query_tile(
        CuQ, CuK, Alibi, K, V, Mask, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn, stride_mz,
        stride_mh, stride_mm, stride_az, stride_ah, H, M, N, GROUP, sm_scale, softcap, causal_offset, window_left,
        window_right, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, VARLEN, ACC, BLOCK_M, BLOCK_N)
    qk_scale, cap_in, cap_out = consts
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _tile(Q + (z * stride_qz + h * stride_qh + (q0 + i) * stride_qm)[:, None] + offs_d[None, :] * stride_qd,
              row_ok, offs_d < D, True, True)
    if HAS_SINKS:
        m_i = tl.load(Sinks + h).to(ACC) * LOG2E
        l_i = tl.full([BLOCK_M], 1.0, ACC)
    else:
        m_i = tl.full([BLOCK_M], NEG_INF, ACC)
        l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    offs_n = tl.arange(0, BLOCK_N)
    start, n_left, n_edge, full_start, full_end = _schedule(blocks, PRECISION, Q.dtype.element_ty, BLOCK_N)
    for e in range(n_edge):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, K_h, V_h, mask_rows, edge_block(e, n_left, start, full_end, BLOCK_N), offs_n, offs_d,
            offs_dv, i, qpos, slope2, c1, c2, lo, hi, Nz, D, DV, k0, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_mn, qk_scale, cap_in, cap_out, seed, dropout_p, True, IS_CAUSAL or HAS_WINDOW, HAS_SOFTCAP,
            HAS_ALIBI, HAS_SINKS, MASK_KIND, HAS_DROPOUT, EVEN_D, PRECISION, ACC)
    for start_n in range(full_start, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, K_h, V_h, mask_rows, start_n, offs_n, offs_d, offs_dv, i, qpos, slope2, c1, c2, lo,
            hi, Nz, D, DV, k0, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale, cap_in, cap_out,
            seed, dropout_p, False, IS_CAUSAL or HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, HAS_SINKS, MASK_KIND,
            HAS_DROPOUT, EVEN_D, PRECISION, ACC)

    empty = l_i == 0.0  # no visible key and no sink: output 0 (torch >= 2.5), lse = -inf
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if HAS_DROPOUT:
        inv = inv / (1.0 - dropout_p)
    lse = tl.where(empty, NEG_INF, (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(Lse + z * stride_lz + h * stride_lh + (q0 + i) * stride_lm, lse, mask=row_ok)
    o_rows = z * stride_oz + h * stride_oh + (q0 + i) * stride_om
    tl.store(Out + o_rows[:, None] + offs_dv[None, :] * stride_od, cast(acc * inv[:, None], Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))


# -- backward ------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(
    Out, DO, DLse, Lse, Sinks, Delta, DSinks,
    # Out, DO (Z,H,M,DV); DLse (or None), Lse, Delta fp32 through the (z, h, m) strides; Sinks (H,);
    # DSinks (Z*H, cdiv(M, BLOCK_M)) fp32: each program's share of dsinks, summed in order by the launcher
    stride_oz, stride_oh, stride_om, stride_od,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_lz, stride_lh, stride_lm,
    H, M, DV,
    HAS_SINKS: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    z = (pid_zh // H).to(tl.int64)
    h = (pid_zh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M
    dv_ok = offs_dv < DV
    o = _tile(Out + z * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
              m_ok, dv_ok, True, True)
    do = _tile(DO + z * stride_doz + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
               m_ok, dv_ok, True, True)
    delta = tl.sum(o.to(Delta.dtype.element_ty) * do.to(Delta.dtype.element_ty), 1)
    stats = z * stride_lz + h * stride_lh + offs_m * stride_lm
    if DLse is not None:  # d(lse)/d(x) = p, so a gradient flowing into lse folds into delta
        delta -= tl.load(DLse + stats, mask=m_ok, other=0.0)
    tl.store(Delta + stats, delta, mask=m_ok)
    if HAS_SINKS:  # d(lse)/d(sink) = exp(sink - lse), and rowsum(p dP) = delta: dsink = -sum exp(sink - lse) delta
        sink = tl.load(Sinks + h).to(Delta.dtype.element_ty)
        lse = tl.load(Lse + stats, mask=m_ok, other=float("inf"))
        share = -tl.sum(tl.math.exp2((sink - lse) * LOG2E) * delta, 0)
        tl.store(DSinks + pid_zh.to(tl.int64) * tl.num_programs(0) + pid_m, share)


@triton.jit
def _row_stats(Lse, Delta, stats, ok, EDGE: tl.constexpr):
    """A block's base-2 lse (+inf for rows with no key, whose p must be 0, not NaN) and delta."""
    if EDGE:
        lse = tl.load(Lse + stats, mask=ok, other=0.0)
        delta = tl.load(Delta + stats, mask=ok, other=0.0)
    else:
        lse = tl.load(Lse + stats)
        delta = tl.load(Delta + stats)
    return tl.where(lse == NEG_INF, float("inf"), lse * LOG2E), delta


@triton.jit
def _dkdv_block(dk, dv, k, v, Q_h, DO_h, Lse, Delta, stats_h, mask_cols, DMask_h, start_m, offs_m, offs_d, offs_dv,
                j, j_ok, slope2, c0, c2, q0, lo, hi, M, N, D, DV, stride_qm, stride_qd, stride_dom, stride_dod,
                stride_lm, stride_mm, qk_scale, cap_in, cap_out, seed, dropout_p,
                EDGE: tl.constexpr, BANDED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr, EVEN_D: tl.constexpr,
                PRECISION: tl.constexpr, ACC: tl.constexpr):
    """One query block of a key block's dK and dV (transposed: keys on rows)."""
    i = start_m + offs_m
    i_ok = i < M
    qt = _tile(Q_h + offs_d[:, None] * stride_qd + i[None, :] * stride_qm, offs_d < D, i_ok, not EVEN_D, EDGE)
    lse2, delta = _row_stats(Lse, Delta, stats_h + i * stride_lm, i_ok, EDGE)
    st = mma(k, qt, tl.zeros([k.shape[0], offs_m.shape[0]], ACC), PRECISION)
    st, t = _scores(st, i[None, :], j[:, None], i[None, :] + (N - M), slope2, mask_cols[:, None] + i[None, :] *
                    stride_mm, i_ok[None, :], lo, hi, qk_scale, cap_in, cap_out, EDGE, BANDED, HAS_SOFTCAP,
                    HAS_ALIBI, MASK_KIND)
    pt = tl.math.exp2(st - lse2[None, :])  # (BLOCK_N, BLOCK_M) = P^T; 0 where excluded
    do = _tile(DO_h + i[:, None] * stride_dom + offs_dv[None, :] * stride_dod, i_ok, offs_dv < DV, EDGE, not EVEN_D)
    dpt = mma(v, tl.trans(do), tl.zeros([k.shape[0], offs_m.shape[0]], ACC), PRECISION)
    pt_drop = pt
    if HAS_DROPOUT:
        keep = dropout_keep(seed, c0[:, None], (q0 + i[None, :]).to(tl.int32), c2, dropout_p)
        pt_drop = tl.where(keep, pt / (1.0 - dropout_p), 0.0)
        dpt = tl.where(keep, dpt / (1.0 - dropout_p), 0.0)
    dv = mma(cast(pt_drop, do.dtype), do, dv, PRECISION)
    dst = pt * (dpt - delta[None, :])
    if MASK_GRAD:
        tl.store(DMask_h + i[None, :] * N + j[:, None], dst, mask=j_ok[:, None] & i_ok[None, :])
    if HAS_SOFTCAP:
        dst = dst * (1.0 - t * t)
    return mma(cast(dst, qt.dtype), tl.trans(qt), dk, PRECISION), dv


@autotune("_attn_bwd_dkdv", keys=["MASK_GRAD"])
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Mask, Alibi, DO, Lse, Delta, DK, DV_, DMask, CuQ, CuK,
    # as _attn_fwd; DO like Q; Lse, Delta fp32 (z, h, m) strides; DK (Z,HKV,N,D), DV_ (Z,HKV,N,DV); DMask
    # (Z,H,M,N) fp32 contiguous (MASK_GRAD)
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_az, stride_ah,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_lz, stride_lh, stride_lm,
    stride_dkz, stride_dkh, stride_dkn, stride_dkd,
    stride_dvz, stride_dvh, stride_dvn, stride_dvd,
    H, M, N, D, DV, GROUP,
    ROWS_BUCKET, N_BUCKET,
    sm_scale, causal_offset, window_left, window_right, softcap, seed, dropout_p,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
    VARLEN: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    z = (tl.program_id(1) // (H // GROUP)).to(tl.int64)
    hk = (tl.program_id(1) % (H // GROUP)).to(tl.int64)
    q0, k0, Mz, Nz = _sequence(CuQ, CuK, z, M, N, VARLEN)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < Nz
    jc = tl.maximum(tl.minimum(j, Nz - 1), 0)  # keys past the sequence repeat its last (never stored)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_m = tl.arange(0, BLOCK_M)
    k = _tile(K + z * stride_kz + hk * stride_kh + (k0 + j)[:, None] * stride_kn + offs_d[None, :] * stride_kd, j_ok,
              offs_d < D, True, True)
    v = _tile(V + z * stride_vz + hk * stride_vh + (k0 + j)[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
              j_ok, offs_dv < DV, True, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    qk_scale, cap_in, cap_out = _consts(sm_scale, softcap, HAS_SOFTCAP)
    lo, hi = _band(Mz, Nz, causal_offset, window_left, window_right, IS_CAUSAL, HAS_WINDOW)
    # query i sees key j iff j - hi <= i <= j - lo: the band seen from the keys
    m_hi = tl.where(pid_n * BLOCK_N < Nz, Mz, 0)
    j_lo = tl.maximum(tl.minimum(pid_n * BLOCK_N, Nz - 1), 0)
    j_hi = tl.maximum(tl.minimum(pid_n * BLOCK_N + BLOCK_N - 1, Nz - 1), 0)
    start, n_left, n_edge, full_start, full_end = _schedule(key_blocks(j_lo, j_hi, -hi, -lo, 0, m_hi, BLOCK_M),
                                                            PRECISION, Q.dtype.element_ty, BLOCK_M)
    c0 = (k0 + j).to(tl.int32)  # dropout's first counter
    for g in range(GROUP):
        h = hk * GROUP + g
        Q_h = Q + z * stride_qz + h * stride_qh + q0 * stride_qm
        DO_h = DO + z * stride_doz + h * stride_doh + q0 * stride_dom
        stats_h = z * stride_lz + h * stride_lh + q0 * stride_lm
        mask_cols = Mask + z * stride_mz + h * stride_mh + jc * stride_mn
        DMask_h = DMask + (z * H + h) * M * N
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Alibi + z * stride_az + h * stride_ah).to(ACC) * LOG2E
        _, c2 = _counters(z, h, q0, H, VARLEN)
        for e in range(n_edge):
            dk, dv = _dkdv_block(
                dk, dv, k, v, Q_h, DO_h, Lse, Delta, stats_h, mask_cols, DMask_h,
                edge_block(e, n_left, start, full_end, BLOCK_M), offs_m, offs_d, offs_dv, jc, j_ok, slope2, c0,
                c2, q0, lo, hi, Mz, Nz, D, DV, stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_mm,
                qk_scale, cap_in, cap_out, seed, dropout_p, True, IS_CAUSAL or HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI,
                MASK_KIND, HAS_DROPOUT, MASK_GRAD, EVEN_D, PRECISION, ACC)
        for start_m in range(full_start, full_end, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, Q_h, DO_h, Lse, Delta, stats_h, mask_cols, DMask_h, start_m, offs_m, offs_d,
                offs_dv, jc, j_ok, slope2, c0, c2, q0, lo, hi, Mz, Nz, D, DV, stride_qm, stride_qd, stride_dom,
                stride_dod, stride_lm, stride_mm, qk_scale, cap_in, cap_out, seed, dropout_p, False,
                IS_CAUSAL or HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_DROPOUT, MASK_GRAD, EVEN_D,
                PRECISION, ACC)
    dk = dk * sm_scale
    dk_ptrs = DK + z * stride_dkz + hk * stride_dkh + (k0 + j)[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(dk_ptrs, cast(dk, DK.dtype.element_ty), mask=j_ok[:, None] & (offs_d[None, :] < D))
    dv_ptrs = DV_ + z * stride_dvz + hk * stride_dvh + (k0 + j)[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    tl.store(dv_ptrs, cast(dv, DV_.dtype.element_ty), mask=j_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_block(dq, q, do, lse2, delta, K_h, V_h, mask_rows, start_n, offs_n, offs_d, offs_dv, i, qpos, slope2, c1, c2,
              lo, hi, N, D, DV, k0, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale, cap_in, cap_out,
              seed, dropout_p,
              EDGE: tl.constexpr, BANDED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
              MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
              ACC: tl.constexpr):
    """One key block of a query tile's dQ."""
    j = start_n + offs_n
    n_ok = j < N
    kt = _tile(K_h + offs_d[:, None] * stride_kd + j[None, :] * stride_kn, offs_d < D, n_ok, not EVEN_D, EDGE)
    qk = mma(q, kt, tl.zeros([q.shape[0], offs_n.shape[0]], ACC), PRECISION)
    s, t = _scores(qk, i[:, None], j[None, :], qpos[:, None], slope2[:, None], mask_rows[:, None] + j[None, :] *
                   stride_mn, n_ok[None, :], lo, hi, qk_scale, cap_in, cap_out, EDGE, BANDED, HAS_SOFTCAP, HAS_ALIBI,
                   MASK_KIND)
    p = tl.math.exp2(s - lse2[:, None])  # 0 where excluded
    vt = _tile(V_h + offs_dv[:, None] * stride_vd + j[None, :] * stride_vn, offs_dv < DV, n_ok, not EVEN_D, EDGE)
    dp = mma(do, vt, tl.zeros([q.shape[0], offs_n.shape[0]], ACC), PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, (k0 + j[None, :]).to(tl.int32), c1[:, None], c2[:, None], dropout_p)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return mma(cast(ds, kt.dtype), tl.trans(kt), dq, PRECISION)


@autotune("_attn_bwd_dq")
@triton.jit
def _attn_bwd_dq(
    Q, K, V, Mask, Alibi, DO, Lse, Delta, DQ, CuQ, CuK,  # as _attn_bwd_dkdv; DQ like Q
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_az, stride_ah,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_lz, stride_lh, stride_lm,
    stride_dqz, stride_dqh, stride_dqm, stride_dqd,
    H, M, N, D, DV, GROUP,
    ROWS_BUCKET, N_BUCKET,
    sm_scale, causal_offset, window_left, window_right, softcap, seed, dropout_p,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    z, q0, k0, Nz, row_ok, i, h, qpos, slope2, c1, c2, lo, hi, K_h, V_h, mask_rows, consts, blocks = _query_tile(
        CuQ, CuK, Alibi, K, V, Mask, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn, stride_mz,
        stride_mh, stride_mm, stride_az, stride_ah, H, M, N, GROUP, sm_scale, softcap, causal_offset, window_left,
        window_right, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, VARLEN, ACC, BLOCK_M, BLOCK_N)
    qk_scale, cap_in, cap_out = consts
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    q = _tile(Q + (z * stride_qz + h * stride_qh + (q0 + i) * stride_qm)[:, None] + offs_d[None, :] * stride_qd,
              row_ok, d_ok, True, True)
    do = _tile(DO + (z * stride_doz + h * stride_doh + (q0 + i) * stride_dom)[:, None] + offs_dv[None, :] *
               stride_dod, row_ok, offs_dv < DV, True, True)
    lse2, delta = _row_stats(Lse, Delta, z * stride_lz + h * stride_lh + (q0 + i) * stride_lm, row_ok, True)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    offs_n = tl.arange(0, BLOCK_N)
    start, n_left, n_edge, full_start, full_end = _schedule(blocks, PRECISION, Q.dtype.element_ty, BLOCK_N)
    for e in range(n_edge):
        dq = _dq_block(
            dq, q, do, lse2, delta, K_h, V_h, mask_rows, edge_block(e, n_left, start, full_end, BLOCK_N), offs_n,
            offs_d, offs_dv, i, qpos, slope2, c1, c2, lo, hi, Nz, D, DV, k0, stride_kn, stride_kd, stride_vn,
            stride_vd, stride_mn, qk_scale, cap_in, cap_out, seed, dropout_p, True, IS_CAUSAL or HAS_WINDOW,
            HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, HAS_DROPOUT, EVEN_D, PRECISION, ACC)
    for start_n in range(full_start, full_end, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, K_h, V_h, mask_rows, start_n, offs_n, offs_d, offs_dv, i, qpos, slope2, c1,
            c2, lo, hi, Nz, D, DV, k0, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale, cap_in,
            cap_out, seed, dropout_p, False, IS_CAUSAL or HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, MASK_KIND,
            HAS_DROPOUT, EVEN_D, PRECISION, ACC)
    dq_rows = z * stride_dqz + h * stride_dqh + (q0 + i) * stride_dqm
    tl.store(DQ + dq_rows[:, None] + offs_d[None, :] * stride_dqd, cast(dq * sm_scale, DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_dropout_mask(
    Keep,  # (Z*H, M, N) bool: the keep-mask the kernels above draw, for tests and debugging
    M, N, seed, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_zh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, offs_n[None, :], offs_m[:, None], pid_zh, dropout_p)
    tl.store(Keep + pid_zh.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :], keep,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
