"""Minimal FlashAttention-2 loops: the yardstick of the issue-slot ceiling (``fastattn ceiling``, the CPU report).

Three small kernels that do only what every block of a long attention without masks needs, in the structure of
Triton's fused-attention tutorial: no bounds tests (lengths are a multiple of the blocks), no causal, window or
mask work, no dropout, head-dim-contiguous operands, pointers advanced by one block per iteration. fastattn never
launches them: ``hwfit`` compiles them beside the shipped kernels, for the same head dims and for fastattn's own
tiles (the dense and packed (VARLEN) attention kernels' and the KV-cache decode kernel's, whose MMA loop is a forward
loop) as well as a few larger ones, so the ceiling report can say how many more issue slots per FLOP a shipped loop
spends than the least a loop of that tile needs. Per iteration (scores in base 2, ``qk_scale = scale * log2(e)``,
``lse`` in base 2):

    forward (a program per BLOCK_M queries, streaming keys):   s = q k^T; m, l online; acc = acc * alpha + p v
    dK/dV   (a program per BLOCK_N keys, streaming queries):   p^T = exp2(k q^T - lse); dv += p^T do;
                                                               ds^T = p^T * (v do^T - delta); dk += ds^T q
    dQ      (a program per BLOCK_M queries, streaming keys):   p = exp2(q k^T - lse); ds = p * (do v^T - delta);
                                                               dq += ds k
that is 2, 4 and 3 BLOCK_M x BLOCK_N x BLOCK_D GEMMs, the split of fastattn's kernels today.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastattn.hwfit import KernelSpec
from fastattn.ops._common import dtype_name

# reference kernel -> the fastattn kernel it stands beside (same tile convention: for dK/dV BLOCK_N is the key block
# a program owns and BLOCK_M the query block it streams)
MIRRORS = {"_ref_attn_fwd": "_attn_fwd", "_ref_attn_bwd_dkdv": "_attn_bwd_dkdv", "_ref_attn_bwd_dq": "_attn_bwd_dq"}
# fastattn kernel -> the reference loop beside it: the KV-cache decode kernel's MMA loop (q k^T, online softmax, p v
# over a split's keys) is the forward loop's
REFERENCE_OF = {**{m: r for r, m in MIRRORS.items()}, "_kvcache_attn": "_ref_attn_fwd"}
GEMMS = {"_ref_attn_fwd": 2, "_ref_attn_bwd_dkdv": 4, "_ref_attn_bwd_dq": 3}  # per loop iteration
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) tried besides fastattn's own: the tutorial's shapes and the
# 64-row-per-warpgroup tiles sm_90's wgmma needs.
CANDIDATES = {
    "_ref_attn_fwd": [(128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    "_ref_attn_bwd_dkdv": [(32, 128, 4, 2), (64, 128, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2)],
    "_ref_attn_bwd_dq": [(128, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2)],
}


@triton.jit
def _rows(X, zh, idx, cols, stride_h, stride_l):
    """Pointers to rows ``idx`` of head ``zh`` of a (Z*H, L, D) tensor: a (len(idx), BLOCK_D) tile."""
    return X + zh * stride_h + idx[:, None] * stride_l + cols[None, :]


@triton.jit
def _cols(X, zh, idx, cols, stride_h, stride_l):
    """The same rows as a transposed (BLOCK_D, len(idx)) tile of pointers."""
    return X + zh * stride_h + idx[None, :] * stride_l + cols[:, None]


@triton.jit
def _program(OWN: tl.constexpr, STREAM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(head, the OWN rows this program owns, the first STREAM rows it streams, the head-dim columns)."""
    return (tl.program_id(1).to(tl.int64), tl.program_id(0) * OWN + tl.arange(0, OWN), tl.arange(0, STREAM),
            tl.arange(0, BLOCK_D))


@triton.jit
def _ref_attn_fwd(
    Q, K, V, Out, Lse,  # (Z*H, L, D) each, D contiguous; Lse (Z*H, L) fp32
    stride_h, stride_l, L, qk_scale,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    zh, rows, keys, cols = _program(BLOCK_M, BLOCK_N, BLOCK_D)
    q = tl.load(_rows(Q, zh, rows, cols, stride_h, stride_l))
    kt_ptrs = _cols(K, zh, keys, cols, stride_h, stride_l)  # (BLOCK_D, BLOCK_N): k^T
    v_ptrs = _rows(V, zh, keys, cols, stride_h, stride_l)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for _ in range(0, L, BLOCK_N):
        s = tl.dot(q, tl.load(kt_ptrs))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(V.dtype.element_ty), tl.load(v_ptrs), acc * alpha[:, None])
        m_i = m_new
        kt_ptrs += BLOCK_N * stride_l
        v_ptrs += BLOCK_N * stride_l
    out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
    tl.store(_rows(Out, zh, rows, cols, stride_h, stride_l), out)
    tl.store(Lse + zh * L + rows, m_i + tl.math.log2(l_i))


@triton.jit
def _ref_attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV,  # (Z*H, L, D) each, D contiguous; Lse (base 2), Delta (Z*H, L) fp32
    stride_h, stride_l, L, qk_scale, sm_scale,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    zh, keys, rows, cols = _program(BLOCK_N, BLOCK_M, BLOCK_D)
    k = tl.load(_rows(K, zh, keys, cols, stride_h, stride_l))
    v = tl.load(_rows(V, zh, keys, cols, stride_h, stride_l))
    qt_ptrs = _cols(Q, zh, rows, cols, stride_h, stride_l)  # (BLOCK_D, BLOCK_M): q^T
    do_ptrs = _rows(DO, zh, rows, cols, stride_h, stride_l)
    stat_ptrs = zh * L + rows
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for _ in range(0, L, BLOCK_M):
        qt = tl.load(qt_ptrs)
        pt = tl.math.exp2(tl.dot(k, qt) * qk_scale - tl.load(Lse + stat_ptrs)[None, :])
        do = tl.load(do_ptrs)
        dv = tl.dot(pt.to(DO.dtype.element_ty), do, dv)
        dst = pt * (tl.dot(v, tl.trans(do)) - tl.load(Delta + stat_ptrs)[None, :])
        dk = tl.dot(dst.to(Q.dtype.element_ty), tl.trans(qt), dk)
        qt_ptrs += BLOCK_M * stride_l
        do_ptrs += BLOCK_M * stride_l
        stat_ptrs += BLOCK_M
    tl.store(_rows(DK, zh, keys, cols, stride_h, stride_l), (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(_rows(DV, zh, keys, cols, stride_h, stride_l), dv.to(DV.dtype.element_ty))


@triton.jit
def _ref_attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ,  # (Z*H, L, D) each, D contiguous; Lse (base 2), Delta (Z*H, L) fp32
    stride_h, stride_l, L, qk_scale, sm_scale,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    zh, rows, keys, cols = _program(BLOCK_M, BLOCK_N, BLOCK_D)
    q = tl.load(_rows(Q, zh, rows, cols, stride_h, stride_l))
    do = tl.load(_rows(DO, zh, rows, cols, stride_h, stride_l))
    lse = tl.load(Lse + zh * L + rows)
    delta = tl.load(Delta + zh * L + rows)
    kt_ptrs = _cols(K, zh, keys, cols, stride_h, stride_l)  # (BLOCK_D, BLOCK_N): k^T
    vt_ptrs = _cols(V, zh, keys, cols, stride_h, stride_l)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for _ in range(0, L, BLOCK_N):
        kt = tl.load(kt_ptrs)
        p = tl.math.exp2(tl.dot(q, kt) * qk_scale - lse[:, None])
        ds = p * (tl.dot(do, tl.load(vt_ptrs)) - delta[:, None])
        dq = tl.dot(ds.to(K.dtype.element_ty), tl.trans(kt), dq)
        kt_ptrs += BLOCK_N * stride_l
        vt_ptrs += BLOCK_N * stride_l
    tl.store(_rows(DQ, zh, rows, cols, stride_h, stride_l), (dq * sm_scale).to(DQ.dtype.element_ty))


KERNELS = {"_ref_attn_fwd": _ref_attn_fwd, "_ref_attn_bwd_dkdv": _ref_attn_bwd_dkdv,
           "_ref_attn_bwd_dq": _ref_attn_bwd_dq}


def variant(dtype: torch.dtype, d: int) -> str:
    """The variant label, in the words of fastattn's attention specs (``float16 D<=64 plain``)."""
    return f"{dtype_name(dtype)} D<={d} plain"


def _args(dtype: torch.dtype, d: int) -> dict:
    """A (Z*H = 8, L = 1024, d) launch on the meta device."""
    meta = torch.device("meta")
    t = torch.empty((8, 1024, d), device=meta, dtype=dtype)
    stats = torch.empty((8, 1024), device=meta, dtype=torch.float32)
    tensors = {name: t for name in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}
    return {**tensors, "Lse": stats, "Delta": stats, "stride_h": t.stride(0), "stride_l": t.stride(1), "L": 1024,
            "qk_scale": 0.18, "sm_scale": 0.125, "BLOCK_D": d}


def shipped_tiles() -> dict[tuple[str, str], list[tuple[int, int, int, int]]]:
    """fastattn's plain-specialisation tiles by (reference kernel, variant): those of the dense and the packed
    (VARLEN) attention kernels and of the KV-cache decode kernel, read from their ops' specs."""
    from fastattn.ops import attention, kvcache

    out: dict[tuple[str, str], list[tuple[int, int, int, int]]] = {}
    for spec in [*attention.kernel_specs(), *attention.kernel_specs(varlen=True), *kvcache.kernel_specs()]:
        kw, ref = spec.config.kwargs, REFERENCE_OF.get(spec.name)
        if ref is not None and spec.variant.endswith(" plain"):
            tile = (kw["BLOCK_M"], kw["BLOCK_N"], spec.config.num_warps, spec.config.num_stages)
            out.setdefault((ref, spec.variant), []).append(tile)
    return out


def kernel_specs() -> list[KernelSpec]:
    """Every reference kernel for fp16 and bf16, head dims 64 and 128, at the candidate tiles and fastattn's."""
    shipped = shipped_tiles()
    specs = []
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            name = variant(dtype, d)
            for ref, kernel in KERNELS.items():
                tiles = list(dict.fromkeys(CANDIDATES[ref] + shipped.get((ref, name), [])))
                for bm, bn, w, s in tiles:
                    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                    specs.append(KernelSpec("reference", kernel, _args(dtype, d), config, name, needs_tensor_cores=True,
                                            loop_flops=2 * GEMMS[ref] * bm * bn * d))
    return specs
