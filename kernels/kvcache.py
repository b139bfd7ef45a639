"""Attention against a KV cache (decoding, chunked prefill): the cache append, and split-KV attention.

_kvcache_append writes the new keys/values of sequence b at positions cache_seqlens[b] + t of its cache (dense
rows, or pages through the block table). _kvcache_attn then runs, per (sequence b, key/value head hk, split s),
FlashAttention's online softmax over the keys of split s of the first N_b = cache_seqlens[b] + L_new:
    x = scale * q . k_j;  x = softcap * tanh(x / softcap);  x -= slope_h * |i + N_b - Lq - j|   (ALiBi)
    key j visible from query i iff  i + N_b - Lq - left <= j <= i + N_b - Lq + right   (bottom-right band;
    causal is right = 0; a negative bound is unbounded),   p = exp2(x log2 e - m), online in fp32.
GQA: the tile's rows are (query position i, head g of the group) pairs, i * GROUP + g, so the GROUP query heads
sharing a key/value head share one pass over its keys (a decode step fills 16 rows with 8 heads, not 1 of 64).
Split s of SPLITS covers keys [s C, (s + 1) C) with C = ceil(N_b / SPLITS) rounded up to BLOCK_N, computed in the
kernel from cache_seqlens (the grid never depends on its values). One split writes the output and lse directly;
several write fp32 partials (normalised output, lse) that kernels/merge_attention.py's _merge_fwd combines.
Key blocks wholly outside the band are never visited; blocks wholly inside it run without bounds or band tests.
A sequence whose keys do not fit the cache (cache_seqlens[b] < 0 or N_b > capacity) or whose block table names a
page outside the cache gets NaN rows and no cache write (on a GPU the launcher cannot raise without a host sync).
"""

import triton
import triton.language as tl

from ._common import LN2, LOG2E, NEG_INF, cast, edge_block, key_blocks, mma, tanh

# (BLOCK_N, num_warps, num_stages) by operand class ("16": fp16/bf16, "tf32", "ieee": fp32), padded head dim and
# BLOCK_M (the rows' power of two, 16 .. 64: decode_block_m). Each entry is the first of a candidate list that
# compiles for sm_80 and sm_90 without a spill store, plain and with every feature on (paged, split partials,
# causal, window, softcap, ALiBi); tests/test_hwfit.py enforces it. Where a query tile has no entry the launcher
# takes the largest smaller one that has. ptxas spills erratically here (a 72-register
# build spilling one value at 2 stages, none at 1 or 3), hence the per-BLOCK_M entries. A head dim without an entry
# is not served: the launcher runs the eager reference.
TILES = {
    "16": {32: {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 4, 3)},
           64: {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 4, 3)},
           128: {16: (64, 4, 2), 32: (64, 4, 2), 64: (64, 8, 2)},
           256: {16: (32, 4, 1), 32: (32, 8, 2), 64: (32, 8, 2)}},
    "tf32": {32: {16: (32, 4, 1), 32: (32, 4, 2), 64: (32, 4, 1)},
             64: {16: (32, 4, 2), 32: (32, 4, 2), 64: (32, 4, 2)},
             128: {16: (32, 4, 1), 32: (32, 4, 1), 64: (32, 8, 1)}},
    "ieee": {32: {16: (32, 4, 2), 32: (32, 4, 2), 64: (32, 4, 1)},
             64: {16: (32, 4, 2), 32: (32, 4, 2), 64: (32, 8, 1)},
             128: {16: (16, 8, 1)}},  # no 32- or 64-row tile fits: more, 16-row tiles
}
# Entries that replace TILES' on one arch class (90: sm_90 and later, 80: earlier), where the shared entry is a
# compromise: on sm_90 a 64-row tile of 8 warps replicates its wgmma across the two warpgroups (63% issue-slot
# ceiling at head dim 128), while 4 warps reach 100% there but spill on sm_80 (20 spill stores).
ARCH_TILES = {90: {"16": {128: {64: (64, 4, 2)}}}}
APPEND_BLOCK_T = 16  # new tokens per program of the append


def operand_class(element_size: int, precision: str) -> str:
    return "16" if element_size <= 2 else ("tf32" if precision == "tf32" else "ieee")


def decode_block_m(rows: int) -> int:
    """The query tile of a program: the rows' power of two, between 16 (the MMA minimum) and 64."""
    return min(64, max(16, triton.next_power_of_2(max(rows, 1))))


def tile(element_size: int, precision: str, block_d: int, block_m: int,
         arch: int | None = None) -> tuple[int, int, int] | None:
    """(BLOCK_N, num_warps, num_stages) for this operand class, padded head dim and query tile on ``arch`` (an
    ARCH_TILES key; None: the shared entry), or None if the head dim is not served."""
    cls = operand_class(element_size, precision)
    own = ARCH_TILES.get(arch, {}).get(cls, {}).get(block_d, {}).get(block_m)
    return own or TILES[cls].get(block_d, {}).get(block_m)


@triton.jit
def _key_rows(n, n_ok, Table_b, stride_tp, stride_kb, stride_kn, stride_vb, stride_vn, PAGE_SIZE, NUM_PAGES,
              PAGED: tl.constexpr, EDGE: tl.constexpr):
    """Offsets of keys ``n`` in the K and V caches (relative to the head's base pointer) and which of them name a
    page outside the cache. Dense: rows of this sequence (its batch offset is in the base). Paged: the block
    table's page, then the slot in it."""
    if PAGED:
        if EDGE:
            page = tl.load(Table_b + (n // PAGE_SIZE) * stride_tp, mask=n_ok, other=0)
        else:
            page = tl.load(Table_b + (n // PAGE_SIZE) * stride_tp)
        bad = ((page < 0) | (page >= NUM_PAGES)) & n_ok
        page = tl.where(bad, 0, page).to(tl.int64)
        slot = (n % PAGE_SIZE).to(tl.int64)
        return page * stride_kb + slot * stride_kn, page * stride_vb + slot * stride_vn, bad
    n64 = n.to(tl.int64)
    return n64 * stride_kn, n64 * stride_vn, n < 0


@triton.jit
def _attn_block(acc, l_i, m_i, bad, q, K_h, V_h, Table_b, start_n, offs_n, offs_d, offs_dv, qpos, slope2, N,
                lo, hi, stride_tp, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, D, DV,
                PAGE_SIZE, NUM_PAGES, qk_scale, cap_in, cap_out,
                EDGE: tl.constexpr, BANDED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                PAGED: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                BLOCK_N: tl.constexpr):
    n = start_n + offs_n
    n_ok = n < N
    k_off, v_off, bad_n = _key_rows(n, n_ok, Table_b, stride_tp, stride_kb, stride_kn, stride_vb, stride_vn,
                                    PAGE_SIZE, NUM_PAGES, PAGED, EDGE)
    bad = bad | bad_n
    kt_ptrs = K_h + offs_d[:, None] * stride_kd + k_off[None, :]
    v_ptrs = V_h + v_off[:, None] + offs_dv[None, :] * stride_vd
    if EDGE or not EVEN_D:
        kt = tl.load(kt_ptrs, mask=(offs_d[:, None] < D) & n_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    else:
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
    qk = mma(q, kt, tl.zeros([q.shape[0], BLOCK_N], ACC), PRECISION)
    if HAS_SOFTCAP:
        s = tanh(qk * cap_in) * cap_out
    else:
        s = qk * qk_scale
    if HAS_ALIBI:
        s = s - slope2[:, None] * tl.abs(qpos[:, None] - n[None, :]).to(ACC)
    if EDGE:
        valid = n_ok[None, :]
        if BANDED:
            valid = valid & (n[None, :] >= qpos[:, None] + lo) & (n[None, :] <= qpos[:, None] + hi)
        s = tl.where(valid, s, NEG_INF)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == NEG_INF, 0.0, m_new)  # every key excluded so far: no (-inf) - (-inf)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = mma(cast(p, v.dtype), v, acc * alpha[:, None], PRECISION)
    return acc, l_i, m_new, bad


@triton.jit
def _kvcache_attn(
    Q, K, V, BlockTable, SeqLens, Alibi, Out, Lse,
    # Q (B, Lq, H, D); K/V dense (B_c, L_cache, HKV, D|DV) or paged (pages, PAGE_SIZE, HKV, D|DV);
    # BlockTable (B, max_pages) int32; SeqLens (B,) int32; Alibi (B|1, H) fp32; Out (B, Lq, H, DV) or fp32
    # partials (SPLITS, B, Lq, H, DV); Lse fp32 indexed (split, b, h, i) through its strides
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_tb, stride_tp,
    stride_ab, stride_ah,
    stride_os, stride_ob, stride_om, stride_oh, stride_od,
    stride_ls, stride_lb, stride_lh, stride_lm,
    HKV, LQ, L_NEW, CAPACITY, PAGE_SIZE, NUM_PAGES, D, DV, GROUP, SPLITS,
    sm_scale, softcap, window_left, window_right,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    PAGED: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    seqlen = tl.load(SeqLens + b)
    N = seqlen + L_NEW
    bad_seq = (seqlen < 0) | (N > CAPACITY)
    N = tl.where(bad_seq, 0, N)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * LQ
    i = tl.minimum(rows // GROUP, LQ - 1)  # rows past the tile's space repeat the last position (never stored)
    h = hk * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + i[:, None].to(tl.int64) * stride_qm + h[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    qpos = i + N - LQ  # the key index on query i's diagonal (bottom-right alignment)

    lo = -(CAPACITY + LQ + 1)  # unbounded sides: offsets past any index
    hi = CAPACITY + LQ + 1
    if IS_CAUSAL:
        hi = 0
    if HAS_WINDOW:
        hi = tl.where(window_right >= 0, tl.minimum(hi, window_right), hi)
        lo = tl.where(window_left >= 0, -window_left, lo)
    chunk = tl.cdiv(tl.cdiv(N, SPLITS), BLOCK_N) * BLOCK_N
    k_lo = pid_s * chunk
    k_hi = tl.minimum(k_lo + chunk, N)
    i_lo = tl.minimum(pid_m * BLOCK_M // GROUP, LQ - 1)
    i_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, LQ - 1)
    start, full_start, full_end, end = key_blocks(i_lo + N - LQ, i_hi + N - LQ, lo, hi, k_lo, k_hi, BLOCK_N)

    if PAGED:
        K_h = K + hk * stride_kh
        V_h = V + hk * stride_vh
    else:
        K_h = K + b * stride_kb + hk * stride_kh
        V_h = V + b * stride_vb + hk * stride_vh
    Table_b = BlockTable + b * stride_tb
    slope2 = tl.zeros([BLOCK_M], ACC)
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h * stride_ah).to(ACC) * LOG2E
    qk_scale = sm_scale * LOG2E
    cap_in = sm_scale
    if HAS_SOFTCAP:
        cap_in = sm_scale / softcap
    cap_out = softcap * LOG2E

    m_i = tl.full([BLOCK_M], NEG_INF, ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    bad = tl.zeros([BLOCK_N], tl.int1)
    offs_n = tl.arange(0, BLOCK_N)
    n_left = tl.cdiv(full_start - start, BLOCK_N)
    n_edge = n_left + tl.cdiv(end - full_end, BLOCK_N)
    for e in range(n_edge):
        start_n = edge_block(e, n_left, start, full_end, BLOCK_N)
        acc, l_i, m_i, bad = _attn_block(
            acc, l_i, m_i, bad, q, K_h, V_h, Table_b, start_n, offs_n, offs_d, offs_dv, qpos, slope2, N, lo, hi,
            stride_tp, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, D, DV, PAGE_SIZE,
            NUM_PAGES, qk_scale, cap_in, cap_out, True, IS_CAUSAL or HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, PAGED,
            EVEN_D, PRECISION, ACC, BLOCK_N)
    for start_n in range(full_start, full_end, BLOCK_N):
        acc, l_i, m_i, bad = _attn_block(
            acc, l_i, m_i, bad, q, K_h, V_h, Table_b, start_n, offs_n, offs_d, offs_dv, qpos, slope2, N, lo, hi,
            stride_tp, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, D, DV, PAGE_SIZE,
            NUM_PAGES, qk_scale, cap_in, cap_out, False, IS_CAUSAL or HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, PAGED,
            EVEN_D, PRECISION, ACC, BLOCK_N)

    empty = l_i == 0.0  # no visible key in this split: output 0, lse -inf (the combine skips it)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, NEG_INF, (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    failed = bad_seq.to(tl.int32) + tl.max(bad.to(tl.int32), 0)
    out = tl.where(failed > 0, float("nan"), out)
    lse = tl.where(failed > 0, float("nan"), lse)
    i64 = i.to(tl.int64)
    o_ptrs = (Out + pid_s.to(tl.int64) * stride_os + b * stride_ob + i64[:, None] * stride_om
              + h[:, None] * stride_oh + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, cast(out, Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(Lse + pid_s.to(tl.int64) * stride_ls + b * stride_lb + h * stride_lh + i64 * stride_lm, lse,
             mask=row_ok)


@triton.jit
def _kvcache_append(
    KNew, VNew, KCache, VCache, BlockTable, SeqLens,  # (B, L_NEW, HKV, D|DV), caches as above, (B, P), (B,)
    stride_knb, stride_knt, stride_knh, stride_knd,
    stride_vnb, stride_vnt, stride_vnh, stride_vnd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_tb, stride_tp,
    HKV, L_NEW, CAPACITY, PAGE_SIZE, NUM_PAGES, D, DV,
    PAGED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    seqlen = tl.load(SeqLens + b)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    fits = (seqlen >= 0) & (seqlen + L_NEW <= CAPACITY)
    ok = t < tl.where(fits, L_NEW, 0)  # a sequence that does not fit writes nothing
    pos = tl.where(ok, seqlen + t, 0)
    k_off, v_off, bad = _key_rows(pos, ok, BlockTable + b * stride_tb, stride_tp, stride_kb, stride_kn,
                                  stride_vb, stride_vn, PAGE_SIZE, NUM_PAGES, PAGED, True)
    ok = ok & (bad == 0)
    if not PAGED:
        k_off += b * stride_kb
        v_off += b * stride_vb
    t64 = t.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_k = ok[:, None] & (offs_d[None, :] < D)
    k = tl.load(KNew + b * stride_knb + t64[:, None] * stride_knt + hk * stride_knh + offs_d[None, :] * stride_knd,
                mask=mask_k)
    tl.store(KCache + hk * stride_kh + k_off[:, None] + offs_d[None, :] * stride_kd, k, mask=mask_k)
    mask_v = ok[:, None] & (offs_dv[None, :] < DV)
    v = tl.load(VNew + b * stride_vnb + t64[:, None] * stride_vnt + hk * stride_vnh + offs_dv[None, :] * stride_vnd,
                mask=mask_v)
    tl.store(VCache + hk * stride_vh + v_off[:, None] + offs_dv[None, :] * stride_vd, v, mask=mask_v)
