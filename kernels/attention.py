"""Fused scaled-dot-product attention (FlashAttention-2 style), forward and backward.

Forward, per (batch z, head h) and block of BLOCK_M query rows, streaming BLOCK_N keys at a time:
    s   = (q @ k^T) * scale + mask            (mask: additive float, or bool -> 0 / -inf; causal in-kernel)
    m_i = running row max,  l_i = running sum of exp(s - m_i)      (online softmax, fp32)
    acc = sum_j dropout(exp(s_j - m_i)) @ v_j,  rescaled by exp(m_old - m_new) each step
    out = acc / l_i / (1 - p),   lse = m_i + log(l_i)               (only lse, O(Lq), is saved)
The Lq x Lk score matrix never exists in memory. Rows with every key masked out give out = 0, lse = -inf.

Backward recomputes p = exp(s - lse) block by block (no atomics, so it is bitwise repeatable):
    delta = rowsum(dO * O) - dlse                       (_attn_bwd_preprocess)
    dV = sum_m dropout(p)^T dO,  dS = p * (dropout(dO V^T) - delta),  dK = scale * dS^T Q
                                                         (_attn_bwd_dkdv: one program per key block, looping over
                                                          the query blocks of every query head of its GQA group)
    dQ = scale * dS K                                    (_attn_bwd_dq: one program per query block)
    dMask = dS (only when a float mask requires grad; written by _attn_bwd_dkdv)
Dropout keeps element (z*H + h, m, n) iff philox(seed, n, m, z*H + h) >= p, so both passes draw the same mask.
Scores are kept in base 2 (scale * log2(e) folded in) so the inner loop uses exp2.
"""

import triton
import triton.language as tl

from ._common import cast, dropout_keep, mma, pick_configs

LOG2E = 1.4426950408889634


# -- configs -------------------------------------------------------------------------------------------------------
# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) by kernel, operand class and padded head dim. "16": fp16/bf16,
# "tf32": fp32 with TF32 MMAs, "ieee": fp32 without TF32 (FMA dots, the most registers). The table is what fits the
# registers and shared memory of sm_80 and sm_90 with every optional feature on (causal, float mask with gradient,
# dropout): `fastattn inspect` shows it and tests/test_hwfit.py enforces it. An empty entry means the kernel cannot
# serve that case; the launcher runs the eager reference instead (see `supported`).
# For _attn_bwd_dkdv, BLOCK_N is the key block a program owns and BLOCK_M the query block it streams; for _attn_fwd
# and _attn_bwd_dq it is the other way round.

TILES = {
    "_attn_fwd": {
        "16": {32: [(128, 32, 4, 3), (128, 32, 8, 2)], 64: [(128, 64, 8, 3), (64, 64, 4, 3)],
               128: [(128, 32, 8, 2), (64, 64, 8, 2)], 256: [(64, 32, 8, 2)]},
        "tf32": {32: [(128, 32, 8, 2), (64, 32, 8, 2)], 64: [(128, 32, 8, 2), (64, 32, 8, 2)], 128: [(64, 32, 8, 2)],
                 256: [(32, 32, 8, 1), (16, 16, 8, 1)]},
        "ieee": {32: [(64, 32, 8, 2)], 64: [(64, 32, 8, 2)], 128: [(32, 32, 8, 1), (16, 32, 8, 1)],
                 256: [(16, 16, 8, 1)]},
    },
    "_attn_bwd_dkdv": {
        "16": {32: [(32, 128, 8, 2), (16, 64, 8, 2)], 64: [(32, 128, 8, 2), (16, 64, 8, 2)],
               128: [(16, 64, 8, 2), (16, 32, 8, 1)], 256: [(16, 32, 8, 1)]},
        "tf32": {32: [(16, 64, 8, 2), (16, 32, 8, 1)], 64: [(16, 64, 8, 2), (16, 32, 8, 1)], 128: [(16, 32, 8, 1)],
                 256: [(16, 16, 8, 1)]},
        "ieee": {32: [(64, 32, 8, 2), (32, 32, 4, 2)], 64: [(16, 64, 8, 2)], 128: [(16, 64, 8, 2)]},
    },
    "_attn_bwd_dq": {
        "16": {32: [(64, 32, 8, 2), (16, 64, 4, 2)], 64: [(32, 64, 8, 2), (16, 64, 8, 2)],
               128: [(16, 64, 4, 2), (32, 32, 4, 2)], 256: [(16, 64, 8, 2), (16, 32, 8, 1)]},
        "tf32": {32: [(16, 64, 4, 2), (32, 32, 8, 1)], 64: [(32, 64, 8, 2), (16, 64, 8, 2)],
                 128: [(32, 64, 8, 2), (16, 64, 8, 2)], 256: [(16, 16, 8, 1)]},
        "ieee": {32: [(64, 32, 8, 2), (16, 64, 4, 2)], 64: [(64, 32, 8, 2)], 128: [(16, 32, 4, 2), (16, 32, 8, 2)]},
    },
}
INTERPRETER_TILE = (32, 32, 4, 1)


def operand_class(element_size: int, precision: str) -> str:
    return "16" if element_size <= 2 else ("tf32" if precision == "tf32" else "ieee")


def supported(element_size: int, precision: str, block_d: int) -> bool:
    """Whether every attention kernel has a tile that fits this operand class and padded head dim."""
    cls = operand_class(element_size, precision)
    return all(TILES[k][cls].get(block_d) for k in TILES)


def _config(tile):
    bm, bn, w, s = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def configs(kernel: str):
    """The autotuner's candidates for ``kernel``: every tile of its table (pruned per launch by ``prune``)."""
    tiles = sorted({t for cls in TILES[kernel].values() for ts in cls.values() for t in ts})
    return pick_configs([_config(t) for t in tiles], _config(INTERPRETER_TILE))


def tiles_for(kernel: str, element_size: int, precision: str, block_d: int):
    return TILES[kernel][operand_class(element_size, precision)].get(block_d, [])


def _prune(kernel):
    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:  # the interpreter's single config
            return configs
        block_d = max(_arg(named_args, kwargs, "BLOCK_D"), _arg(named_args, kwargs, "BLOCK_DV"))
        allowed = tiles_for(kernel, named_args["Q"].element_size(), _arg(named_args, kwargs, "PRECISION"), block_d)
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                in allowed]
    return prune


def _arg(named_args, kwargs, name):
    return kwargs[name] if name in kwargs else named_args[name]


@triton.jit
def _load_tile(base, rows, cols, stride_r, stride_c, R, C):
    """The ``rows x cols`` tile of a strided 2-D view, zero outside ``R x C`` (swap the arguments for its transpose)."""
    return tl.load(base + rows[:, None] * stride_r + cols[None, :] * stride_c,
                   mask=(rows[:, None] < R) & (cols[None, :] < C), other=0.0)


@triton.jit
def _store_tile(base, rows, cols, stride_r, stride_c, R, C, value):
    tl.store(base + rows[:, None] * stride_r + cols[None, :] * stride_c, value,
             mask=(rows[:, None] < R) & (cols[None, :] < C))


@triton.jit
def _masked_scores(s, m_idx, n_idx, M, N, mask_base, stride_mm, stride_mn, causal_offset,
                   IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Scores ``s`` (base 2) with the bounds, the causal rule and the mask applied: -inf where a key is excluded.

    ``m_idx``/``n_idx`` are the query/key indices broadcast to the block's shape in either orientation, so the
    forward and dQ kernels (queries on rows) and the dK/dV kernel (keys on rows) share this code."""
    inside = (m_idx < M) & (n_idx < N)
    valid = inside
    if IS_CAUSAL:
        valid = valid & (n_idx <= m_idx + causal_offset)
    if MASK_KIND != 0:
        mv = tl.load(mask_base + m_idx * stride_mm + n_idx * stride_mn, mask=inside, other=0)
        if MASK_KIND == 1:
            valid = valid & (mv != 0)
        else:
            s = s + mv.to(s.dtype) * 1.4426950408889634
    return tl.where(valid, s, float("-inf"))


# -- forward -------------------------------------------------------------------------------------------------------


@triton.autotune(configs=configs("_attn_fwd"), key=["M_BUCKET", "N_BUCKET", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL",
                                                      "MASK_KIND", "HAS_DROPOUT", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune("_attn_fwd")})
@triton.jit
def _attn_fwd(
    Q, K, V, Mask, Out, Lse,  # (Z,H,M,D), (Z,HKV,N,D), (Z,HKV,N,DV), broadcast (Z,H,M,N), (Z,H,M,DV), (Z*H,M)
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_oz, stride_oh, stride_om, stride_od,
    H, M, N, D, DV, GROUP,  # GROUP = H // HKV query heads share one key/value head
    M_BUCKET, N_BUCKET,  # autotune keys only: power-of-two buckets of M and N
    sm_scale, causal_offset, seed, dropout_p,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,  # MASK_KIND: 0 none, 1 bool, 2 additive float
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    z = (pid_zh // H).to(tl.int64)
    h = (pid_zh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M

    q = _load_tile(Q + z * stride_qz + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, M, D)
    k_base = K + z * stride_kz + hk * stride_kh
    v_base = V + z * stride_vz + hk * stride_vh
    mask_base = Mask + z * stride_mz + h * stride_mh
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): scores in base 2

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)

    hi = N
    if IS_CAUSAL:  # keys past the last row's diagonal are masked for the whole block
        hi = tl.maximum(tl.minimum(N, (pid_m + 1) * BLOCK_M + causal_offset), 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = _load_tile(k_base, offs_d, offs_n, stride_kd, stride_kn, D, N)
        s = mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], ACC), PRECISION) * qk_scale
        s = _masked_scores(s, offs_m[:, None], offs_n[None, :], M, N, mask_base, stride_mm, stride_mn, causal_offset,
                           IS_CAUSAL, MASK_KIND)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: avoid (-inf) - (-inf)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_n[None, :], offs_m[:, None], pid_zh, dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_tile(v_base, offs_n, offs_dv, stride_vn, stride_vd, N, DV)
        acc = mma(cast(p, v.dtype), v, acc * alpha[:, None], PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # every key masked out: output 0 (torch >= 2.5), lse = -inf
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if HAS_DROPOUT:
        inv = inv / (1.0 - dropout_p)
    out = acc * inv[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    tl.store(Lse + pid_zh.to(tl.int64) * M + offs_m, lse, mask=m_ok)
    _store_tile(Out + z * stride_oz + h * stride_oh, offs_m, offs_dv, stride_om, stride_od, M, DV,
                cast(out, Out.dtype.element_ty))


# -- backward ------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(
    Out, DO, DLse, Delta,  # (Z, H, M, DV), (Z, H, M, DV), (Z*H, M) or None, (Z*H, M) fp32
    stride_oz, stride_oh, stride_om, stride_od,
    stride_doz, stride_doh, stride_dom, stride_dod,
    H, M, DV,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    z = (pid_zh // H).to(tl.int64)
    h = (pid_zh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(Out + z * stride_oz + h * stride_oh, offs_m, offs_dv, stride_om, stride_od, M, DV)
    do = _load_tile(DO + z * stride_doz + h * stride_doh, offs_m, offs_dv, stride_dom, stride_dod, M, DV)
    o = o.to(Delta.dtype.element_ty)
    do = do.to(Delta.dtype.element_ty)
    delta = tl.sum(o * do, 1)
    if DLse is not None:  # d(lse)/d(s) = p, so a gradient flowing into lse folds into delta
        delta -= tl.load(DLse + pid_zh.to(tl.int64) * M + offs_m, mask=offs_m < M, other=0.0)
    tl.store(Delta + pid_zh.to(tl.int64) * M + offs_m, delta, mask=offs_m < M)


@triton.autotune(configs=configs("_attn_bwd_dkdv"), key=["M_BUCKET", "N_BUCKET", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL",
                                                           "MASK_KIND", "HAS_DROPOUT", "MASK_GRAD", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune("_attn_bwd_dkdv")})
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Mask, DO, Lse, Delta, DK, DV_, DMask,  # DK (Z, HKV, N, D), DV_ (Z, HKV, N, DV), DMask (Z, H, M, N) fp32
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_dkz, stride_dkh, stride_dkn, stride_dkd,
    stride_dvz, stride_dvh, stride_dvn, stride_dvd,
    H, HKV, M, N, D, DV, GROUP,
    M_BUCKET, N_BUCKET,
    sm_scale, causal_offset, seed, dropout_p,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_zhk = tl.program_id(1)
    z = (pid_zhk // HKV).to(tl.int64)
    hk = (pid_zhk % HKV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < N
    k = _load_tile(K + z * stride_kz + hk * stride_kh, offs_n, offs_d, stride_kn, stride_kd, N, D)
    v = _load_tile(V + z * stride_vz + hk * stride_vh, offs_n, offs_dv, stride_vn, stride_vd, N, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    qk_scale = sm_scale * 1.4426950408889634

    lo = 0
    if IS_CAUSAL:  # query rows above this key block's diagonal see none of its keys
        lo = tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
    for g in range(GROUP):
        h = hk * GROUP + g
        zh = z * H + h
        q_base = Q + z * stride_qz + h * stride_qh
        do_base = DO + z * stride_doz + h * stride_doh
        mask_base = Mask + z * stride_mz + h * stride_mh
        for start_m in range(lo, M, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            qt = _load_tile(q_base, offs_d, offs_m, stride_qd, stride_qm, D, M)
            lse = tl.load(Lse + zh * M + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0, not NaN
            st = mma(k, qt, tl.zeros([BLOCK_N, BLOCK_M], ACC), PRECISION) * qk_scale
            st = _masked_scores(st, offs_m[None, :], offs_n[:, None], M, N, mask_base, stride_mm, stride_mn,
                                causal_offset, IS_CAUSAL, MASK_KIND)
            pt = tl.math.exp2(st - lse[None, :])  # (BLOCK_N, BLOCK_M) = P^T; 0 where excluded
            do = _load_tile(do_base, offs_m, offs_dv, stride_dom, stride_dod, M, DV)
            dpt = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], ACC), PRECISION)
            if HAS_DROPOUT:
                keep = dropout_keep(seed, offs_n[:, None], offs_m[None, :], zh.to(tl.int32), dropout_p)
                scale_keep = 1.0 / (1.0 - dropout_p)
                pt_drop = tl.where(keep, pt * scale_keep, 0.0)
                dpt = tl.where(keep, dpt * scale_keep, 0.0)
            else:
                pt_drop = pt
            dv = mma(cast(pt_drop, do.dtype), do, dv, PRECISION)
            delta = tl.load(Delta + zh * M + offs_m, mask=m_ok, other=0.0)
            dst = pt * (dpt - delta[None, :])
            dk = mma(cast(dst, qt.dtype), tl.trans(qt), dk, PRECISION)
            if MASK_GRAD:
                tl.store(DMask + zh * M * N + offs_m[None, :] * N + offs_n[:, None], dst,
                         mask=n_ok[:, None] & m_ok[None, :])
    dk = dk * sm_scale
    _store_tile(DK + z * stride_dkz + hk * stride_dkh, offs_n, offs_d, stride_dkn, stride_dkd, N, D,
                cast(dk, DK.dtype.element_ty))
    _store_tile(DV_ + z * stride_dvz + hk * stride_dvh, offs_n, offs_dv, stride_dvn, stride_dvd, N, DV,
                cast(dv, DV_.dtype.element_ty))


@triton.autotune(configs=configs("_attn_bwd_dq"), key=["M_BUCKET", "N_BUCKET", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL",
                                                         "MASK_KIND", "HAS_DROPOUT", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune("_attn_bwd_dq")})
@triton.jit
def _attn_bwd_dq(
    Q, K, V, Mask, DO, Lse, Delta, DQ,  # DQ (Z, H, M, D)
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_dqz, stride_dqh, stride_dqm, stride_dqd,
    H, M, N, D, DV, GROUP,
    M_BUCKET, N_BUCKET,
    sm_scale, causal_offset, seed, dropout_p,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Here BLOCK_M is the query block this program owns and BLOCK_N the key block it streams.
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    z = (pid_zh // H).to(tl.int64)
    h = (pid_zh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M
    q = _load_tile(Q + z * stride_qz + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, M, D)
    do = _load_tile(DO + z * stride_doz + h * stride_doh, offs_m, offs_dv, stride_dom, stride_dod, M, DV)
    lse = tl.load(Lse + pid_zh.to(tl.int64) * M + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + pid_zh.to(tl.int64) * M + offs_m, mask=m_ok, other=0.0)
    k_base = K + z * stride_kz + hk * stride_kh
    v_base = V + z * stride_vz + hk * stride_vh
    mask_base = Mask + z * stride_mz + h * stride_mh
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)

    hi = N
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(N, (pid_m + 1) * BLOCK_M + causal_offset), 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = _load_tile(k_base, offs_d, offs_n, stride_kd, stride_kn, D, N)
        s = mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], ACC), PRECISION) * qk_scale
        s = _masked_scores(s, offs_m[:, None], offs_n[None, :], M, N, mask_base, stride_mm, stride_mn, causal_offset,
                           IS_CAUSAL, MASK_KIND)
        p = tl.math.exp2(s - lse[:, None])  # 0 where excluded
        vt = _load_tile(v_base, offs_dv, offs_n, stride_vd, stride_vn, DV, N)
        dp = mma(do, vt, tl.zeros([BLOCK_M, BLOCK_N], ACC), PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_n[None, :], offs_m[:, None], pid_zh, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = mma(cast(ds, kt.dtype), tl.trans(kt), dq, PRECISION)
    dq = dq * sm_scale
    _store_tile(DQ + z * stride_dqz + h * stride_dqh, offs_m, offs_d, stride_dqm, stride_dqd, M, D,
                cast(dq, DQ.dtype.element_ty))


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
