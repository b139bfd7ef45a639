"""Fused ViT patch embedding: patchify + projection + bias + class token + position embedding, forward and backward.

Token m = b*N + n (n = ph*WP + pw) of image b is patch (ph, pw); its K = C*P*P pixels, in the order of the
conv weight (c, i, j), are gathered straight from the image through its four strides (NCHW, channels_last or any
view), so the forward is one tensor-core GEMM with no patch tensor in memory:
    out[b, CLS + n, :] = X_patches[m, :] @ W.view(D, K)^T + bias + pos[CLS + n - SHIFT]    (CLS = 1 with a class token)
    out[b, 0, :]       = cls + pos[0]     (written by the program that owns token n = 0 of image b; no pos term
                                            when SHIFT = 1, i.e. pos covers the patch tokens only, timm's
                                            no_embed_class)
For channels_last images the reduction runs over k in (i, j, c) order instead (KORDER = 1) so that neighbouring
k are neighbouring bytes; the weight is read through its strides in the same order, so the sum is unchanged.

Backward, with dT = dOut at the patch-token rows:
    dW    = X_patches^T @ dT      (K x D, reduction over all B*N tokens; split into SPLIT row ranges whose fp32
                                   partials a second kernel adds in a fixed order: deterministic, no atomics. The
                                   launcher keeps the partials in dX's buffer before dX is written, so SPLIT > 1
                                   only with dX; without, one range per tile writes dW itself)
    dbias = colsum(dT)            (accumulated by the dW programs of the first K block, from the tiles they load;
                                   with dbias alone (DW None) only those programs run, without the GEMM)
    dpos  = sum_b dOut[b],  dcls = sum_b dOut[b, 0]                              (one small reduction kernel)
    dX    = dT @ W, stored through the pixel gather (patches do not overlap: a plain store, no atomics)
"""

import triton
import triton.language as tl

from ._common import cast as _cast
from ._common import mma as _mma
from ._common import pick_configs


@triton.jit
def _patch_offsets(offs_k, stride_c, stride_i, stride_j, C: tl.constexpr, P: tl.constexpr, KORDER: tl.constexpr,
                   FLAT: tl.constexpr):
    """Offset of element k of a patch, (c, i, j) = (channel, patch row, patch column), in a tensor with these strides.

    C and P are constexprs so that `%` and `//` are cheap and the compiler sees the contiguous runs and vectorises.
    FLAT 2: the tensor holds a patch in the reduction order itself (a contiguous conv weight): the offset is k.
    FLAT 1 (KORDER 1 only): a dense channels_last image, where (j, c) is one run of P*C contiguous elements.
    """
    if FLAT == 2:
        off = offs_k
    elif KORDER == 0:  # k = (c*P + i)*P + j, the conv weight's own order
        off = (offs_k // (P * P)) * stride_c + ((offs_k // P) % P) * stride_i + (offs_k % P) * stride_j
    elif FLAT == 1:  # k = (i*P + j)*C + c
        off = (offs_k // (C * P)) * stride_i + offs_k % (C * P)
    else:
        off = (offs_k % C) * stride_c + (offs_k // (C * P)) * stride_i + ((offs_k // C) % P) * stride_j
    return off


@triton.jit
def _tile(pid0, pid1, size0, size1, BLOCK0: tl.constexpr, BLOCK1: tl.constexpr):
    """Row and column indices of output tile (pid0, pid1) and their in-bounds masks."""
    offs0 = pid0 * BLOCK0 + tl.arange(0, BLOCK0)
    offs1 = pid1 * BLOCK1 + tl.arange(0, BLOCK1)
    return offs0, offs1, offs0 < size0, offs1 < size1


@triton.jit
def _token_offsets(offs_m, N, WP, stride_b, stride_h, stride_w, P: tl.constexpr):
    """Image offset of the top-left pixel of token m = b*N + ph*WP + pw, and (b, n)."""
    b = (offs_m // N).to(tl.int64)
    n = offs_m % N
    ph = n // WP
    pw = n - ph * WP
    return b * stride_b + (ph * P).to(tl.int64) * stride_h + (pw * P).to(tl.int64) * stride_w, b, n


# -- configs -------------------------------------------------------------------------------------------------------
# One list for the three GEMM kernels; BLOCK_M x BLOCK_N is the output tile and BLOCK_K the reduction step:
#   forward  (tokens x D, reduction over patch pixels)     dX  (tokens x patch pixels, reduction over D)
#   dW       (patch pixels x D, reduction over tokens)
# 2-byte types take BLOCK_K = 64, fp32 (TF32 or IEEE) BLOCK_K = 32 so the pipelined tiles stay in shared memory
# (see gemm_prune).


def gemm_configs():
    gpu = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 8, 4),
            (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 64, 32, 4, 3),
        ]
    ]
    return pick_configs(gpu, triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4,
                                           num_stages=1))


def gemm_prune(configs, named_args, **kwargs):
    """BLOCK_K = 64 for 2-byte operands whose patch rows load as 16-byte vectors; BLOCK_K = 32 for fp32 and for
    gathers that cannot vectorise (rows of P = 14 or 7 pixels, non-dense channels_last), whose per-element
    addresses would otherwise spill."""
    wide = named_args["Wt"].element_size() > 2
    p, c, korder, x_flat = (_arg(named_args, kwargs, name) for name in ("P", "C", "KORDER", "X_FLAT"))
    run = p if korder == 0 else (p * c if x_flat else 1)  # contiguous elements per patch row
    small = wide or run % 8 != 0
    kept = [cfg for cfg in configs if (cfg.kwargs["BLOCK_K"] == 32) == small]
    return kept or configs[-1:]


def _arg(named_args, kwargs, name):
    return kwargs[name] if name in kwargs else named_args[name]


# -- forward -------------------------------------------------------------------------------------------------------


@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "D", "C", "P", "KORDER", "X_FLAT", "W_FLAT"],
                 prune_configs_by={"early_config_prune": gemm_prune})
@triton.jit
def _pe_fwd(
    X, Wt, Bias, Pos, Cls, Out,  # (B, C, H, W), (D, C, P, P), (D,) or None, (TP, D) or None, (D,) or None, (B, T, D)
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wd, stride_wc, stride_wi, stride_wj,
    stride_bias, stride_pt, stride_pd, stride_cls,
    stride_ob, stride_ot, stride_od,
    M, N, WP, K, D,  # M = B*N tokens, N per image, WP patches per image row, K = C*P*P
    M_BUCKET,  # autotune key only: power-of-two bucket of M
    C: tl.constexpr, P: tl.constexpr, KORDER: tl.constexpr, X_FLAT: tl.constexpr, W_FLAT: tl.constexpr,
    CLS: tl.constexpr, SHIFT: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # D blocks vary fastest so the programs sharing a token block run together and read its pixels once from DRAM.
    offs_m, offs_n, m_ok, n_ok = _tile(tl.program_id(1), tl.program_id(0), M, D, BLOCK_M, BLOCK_N)
    row, b, n = _token_offsets(offs_m, N, WP, stride_xb, stride_xh, stride_xw, P)
    w_base = Wt + offs_n[None, :] * stride_wd

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        col = _patch_offsets(offs_k, stride_xc, stride_xh, stride_xw, C, P, KORDER, X_FLAT)
        a = tl.load(X + row[:, None] + col[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wk = _patch_offsets(offs_k, stride_wc, stride_wi, stride_wj, C, P, KORDER, W_FLAT)
        w = tl.load(w_base + wk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(a, w, acc, PRECISION)

    if Bias is not None:
        acc += tl.load(Bias + offs_n * stride_bias, mask=n_ok, other=0.0).to(ACC)[None, :]
    if Pos is not None:
        acc += tl.load(Pos + (n + CLS - SHIFT)[:, None] * stride_pt + offs_n[None, :] * stride_pd,
                       mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(ACC)
    out_row = Out + b[:, None] * stride_ob + offs_n[None, :] * stride_od
    tl.store(out_row + (n + CLS)[:, None] * stride_ot, _cast(acc, Out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
    if Cls is not None:  # the class-token row of every image whose first patch token is in this block
        cls = tl.load(Cls + offs_n * stride_cls, mask=n_ok, other=0.0).to(ACC)
        if Pos is not None and SHIFT == 0:
            cls += tl.load(Pos + offs_n * stride_pd, mask=n_ok, other=0.0).to(ACC)
        first = m_ok & (n == 0)
        tl.store(out_row, _cast(tl.broadcast_to(cls[None, :], (BLOCK_M, BLOCK_N)), Out.dtype.element_ty),
                 mask=first[:, None] & n_ok[None, :])


# -- backward ------------------------------------------------------------------------------------------------------


@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "D", "C", "P", "KORDER", "X_FLAT", "DW_FLAT"],
                 prune_configs_by={"early_config_prune": gemm_prune})
@triton.jit
def _pe_bwd_dw(
    X, Wt, DO, DW, DB,  # (B, C, H, W), (D, C, P, P) (only its dtype is used), (B, T, D), see below
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_dob, stride_dot, stride_dod,
    stride_dws, stride_dwd, stride_dwc, stride_dwi, stride_dwj,
    stride_dbs, stride_dbd,
    M, N, WP, K, D, ROWS,  # ROWS tokens per split: program (., ., s) reduces tokens [s*ROWS, (s+1)*ROWS)
    M_BUCKET,  # autotune key only: power-of-two bucket of ROWS
    C: tl.constexpr, P: tl.constexpr, KORDER: tl.constexpr, X_FLAT: tl.constexpr, DW_FLAT: tl.constexpr,
    CLS: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # DW, DB: dW (D, C, P, P) and dbias (D,) themselves when SPLIT == 1 (stride_dws = stride_dbs = 0), else the fp32
    # partials (SPLIT, D, K) (k in reduction order, DW_FLAT = 2) and (SPLIT, D). DB is None without a bias gradient,
    # DW None with dbias alone (the grid then has one K block and no program runs the GEMM).
    # Output tile: BLOCK_M patch pixels x BLOCK_N features; BLOCK_K tokens per step.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_k = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    n_ok = offs_n < D
    col = _patch_offsets(offs_k, stride_xc, stride_xh, stride_xw, C, P, KORDER, X_FLAT)
    lo = pid_s * ROWS
    hi = tl.minimum(lo + ROWS, M)

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    db = tl.zeros([BLOCK_N], ACC)
    for m0 in range(lo, hi, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        m_ok = offs_m < hi
        row, b, n = _token_offsets(offs_m, N, WP, stride_xb, stride_xh, stride_xw, P)
        if DW is not None:
            xt = tl.load(X + col[:, None] + row[None, :], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        do = tl.load(DO + b[:, None] * stride_dob + (n + CLS)[:, None] * stride_dot + offs_n[None, :] * stride_dod,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if DB is not None:  # noqa: SIM102  (pid_m is a runtime value: Triton's `and` takes constexprs only)
            if pid_m == 0:
                db += tl.sum(do.to(ACC), 0)
        if DW is not None:
            # dOut may be wider than the operands (fp32 tokens from an fp32 pos_embed): the conv sees it in its dtype.
            acc = _mma(xt, _cast(do, X.dtype.element_ty), acc, PRECISION)

    if DW is not None:
        wk = _patch_offsets(offs_k, stride_dwc, stride_dwi, stride_dwj, C, P, KORDER, DW_FLAT)
        tl.store(DW + pid_s.to(tl.int64) * stride_dws + wk[:, None] + offs_n[None, :] * stride_dwd,
                 _cast(acc, DW.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])
    if DB is not None:  # noqa: SIM102
        if pid_m == 0:
            tl.store(DB + pid_s * stride_dbs + offs_n * stride_dbd, _cast(db, DB.dtype.element_ty), mask=n_ok)


@triton.jit
def _pe_bwd_reduce(
    Part, DW, DB,  # (SPLIT, E) fp32 (fp64 for fp64) partials: dW as (D, K) in reduction order, then dbias (D,)
    stride_wd, stride_wc, stride_wi, stride_wj, stride_bd,  # of dW (D, C, P, P) and dbias (D,); either may be None
    SPLIT, D, K,
    C: tl.constexpr, P: tl.constexpr, KORDER: tl.constexpr, W_FLAT: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    DK = 0
    if DW is not None:
        DK = D * K
    E = DK
    if DB is not None:
        E += D
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < E
    acc = tl.zeros([BLOCK], ACC)
    ptrs = Part + offs
    for _ in range(SPLIT):  # a fixed order: the sum is bitwise repeatable
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += E
    if DW is not None:
        wk = _patch_offsets((offs % K).to(tl.int32), stride_wc, stride_wi, stride_wj, C, P, KORDER, W_FLAT)
        tl.store(DW + (offs // K) * stride_wd + wk, _cast(acc, DW.dtype.element_ty), mask=ok & (offs < DK))
    if DB is not None:
        tl.store(DB + (offs - DK) * stride_bd, _cast(acc, DB.dtype.element_ty), mask=ok & (offs >= DK))


@triton.jit
def _pe_bwd_dpos(
    DO, DPos, DCls,  # (B, T, D); (TP, D) or None; (D,) or None
    stride_dob, stride_dot, stride_dod,
    stride_pt, stride_pd, stride_cls,
    B, R, D,  # R token rows reduced: T with DPos, else 1 (only the class token)
    SHIFT,  # pos row of token row t is t - SHIFT
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # BLOCK_B images per step keep several independent loads in flight per thread; the sum order is fixed.
    offs_b = tl.arange(0, BLOCK_B)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (offs_t[:, None] < R) & (offs_d[None, :] < D)
    ptrs = (DO + offs_b[:, None, None] * stride_dob + offs_t[None, :, None] * stride_dot
            + offs_d[None, None, :] * stride_dod)
    acc = tl.zeros([BLOCK_T, BLOCK_D], ACC)
    for b0 in range(0, B, BLOCK_B):
        x = tl.load(ptrs, mask=ok[None, :, :] & (b0 + offs_b < B)[:, None, None], other=0.0)
        acc += tl.sum(x.to(ACC), 0)
        ptrs += BLOCK_B * stride_dob  # 64-bit pointer arithmetic: no b * stride overflow
    if DPos is not None:
        tl.store(DPos + (offs_t - SHIFT)[:, None] * stride_pt + offs_d[None, :] * stride_pd,
                 _cast(acc, DPos.dtype.element_ty), mask=ok & (offs_t[:, None] >= SHIFT))
    if DCls is not None:
        tl.store(DCls + tl.broadcast_to(offs_d[None, :] * stride_cls, (BLOCK_T, BLOCK_D)),
                 _cast(acc, DCls.dtype.element_ty), mask=ok & (offs_t[:, None] == 0))


@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "D", "C", "P", "KORDER", "W_FLAT", "X_FLAT"],
                 prune_configs_by={"early_config_prune": gemm_prune})
@triton.jit
def _pe_bwd_dx(
    DO, Wt, DX,  # (B, T, D), (D, C, P, P), (B, C, H, W)
    stride_dob, stride_dot, stride_dod,
    stride_wd, stride_wc, stride_wi, stride_wj,
    stride_xb, stride_xc, stride_xh, stride_xw,  # of DX
    M, N, WP, K, D,
    M_BUCKET,
    C: tl.constexpr, P: tl.constexpr, KORDER: tl.constexpr, X_FLAT: tl.constexpr, W_FLAT: tl.constexpr,
    CLS: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Output tile: BLOCK_M tokens x BLOCK_N patch pixels; BLOCK_K features per step.
    offs_m, offs_k, m_ok, k_ok = _tile(tl.program_id(1), tl.program_id(0), M, K, BLOCK_M, BLOCK_N)
    row, b, n = _token_offsets(offs_m, N, WP, stride_xb, stride_xh, stride_xw, P)
    do_row = DO + b * stride_dob + (n + CLS) * stride_dot
    wk = _patch_offsets(offs_k, stride_wc, stride_wi, stride_wj, C, P, KORDER, W_FLAT)

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for d0 in range(0, D, BLOCK_K):
        offs_d = d0 + tl.arange(0, BLOCK_K)
        d_ok = offs_d < D
        do = tl.load(do_row[:, None] + offs_d[None, :] * stride_dod, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(Wt + offs_d[:, None] * stride_wd + wk[None, :], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(_cast(do, Wt.dtype.element_ty), w, acc, PRECISION)

    col = _patch_offsets(offs_k, stride_xc, stride_xh, stride_xw, C, P, KORDER, X_FLAT)
    tl.store(DX + row[:, None] + col[None, :], _cast(acc, DX.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])
