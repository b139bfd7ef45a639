"""Benchmark cases of the attention ops beyond dense batches: ``merge_attention`` (ring / context parallelism,
split-KV), ``kvcache`` (decoding against a KV cache) and ``varlen`` (packed variable-length sequences). Registered
into :mod:`fastattn.perf.cases` (imported at its end).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

import fastattn
from fastattn import reference
from fastattn.perf.cases import SCRATCH, SCRATCH_NOTES, SCRATCH_SMS, Case, Inputs, _elt, op_arguments, register


def _by_parts(fn):
    """``fn(outs, lses)`` called with the parts as positional tensors ``(o_1 .. o_S, lse_1 .. lse_S)``."""

    def call(*tensors: Tensor):
        S = len(tensors) // 2
        return fn(list(tensors[:S]), list(tensors[S:]))

    call.__name__ = getattr(fn, "__name__", "merge")
    return call


def _merge_case(label: str, S: int, B: int, H: int, L: int, D: int) -> Case:
    R = B * H * L

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        outs = [torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(S)]
        stat = torch.float64 if dtype == torch.float64 else torch.float32  # lses stay fp32 beside half outputs
        lses = [(3 * torch.randn(B, H, L, device=device, dtype=stat)).requires_grad_() for _ in range(S)]
        names = tuple(f"out{s}" for s in range(S)) + tuple(f"lse{s}" for s in range(S))
        return Inputs((*outs, *lses), {}, names, keep_fp32=names[S:])

    def min_bytes(dtype: torch.dtype) -> tuple[int, int]:
        e = _elt(dtype)
        fwd = S * R * (D * e + 4) + R * (D * e + 4)  # read the parts and their lse; write out, lse
        # read the parts, their lse, the merged lse, dout, dlse; write d parts, d lses
        bwd = S * R * (D * e + 4) + R * (4 + D * e + 4) + S * R * (D * e + 4)
        return fwd, bwd

    def check_saved(case: Case, saved: list) -> str | None:
        # the stacked parts, their lse and the merged lse: nothing the size of S weighted copies
        limit = S * R * (D * 4 + 8) + 8 * R
        total = sum(s.nbytes for s in saved)
        if total > limit:
            return f"saves {total} bytes, more than the parts, their lse and the merged lse ({limit})"
        return None

    return Case(
        op="merge_attention", label=label, shape=f"S={S} B={B} H={H} L={L} D={D}",
        make=make, fused=_by_parts(fastattn.merge_attention), eager=_by_parts(reference.merge_attention),
        min_bytes=min_bytes, check_saved=check_saved,
        saved_note="saves the stacked parts, their lse and the merged lse",
        kernels=("_merge_fwd", "_merge_bwd"), outputs=("out", "lse"),
        dims={"S": S, "B": B, "H": H, "L": L, "D": D},
    )


@register("merge_attention")
def merge_attention_cases(suite: str) -> list[Case]:
    """Ring attention's merges: one step's two partial results, and eight (a ring of 8 GPUs merged at once), for an
    LM layer of 32 heads of 128 at 4k tokens per GPU (batch 1), and a 16-head, 64-wide layer at 16k tokens."""
    if suite == "gpu":
        shapes = [("ring step 4k d128", 2, 1, 32, 4096, 128), ("ring x8 4k d128", 8, 1, 32, 4096, 128),
                  ("ring step 16k d64", 2, 1, 16, 16384, 64)]
    elif suite == "quick":
        shapes = [("ring step 4k d128", 2, 1, 32, 4096, 128)]
    elif suite == "model":
        shapes = [("ring step 4k d128", 2, 1, 32, 4096, 128), ("ring x8 4k d128", 8, 1, 32, 4096, 128)]
    else:  # small: three parts, an odd row count and head dim
        shapes = [("small", 3, 2, 3, 37, 40)]
    return [_merge_case(*s) for s in shapes]



def _sdpa_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, *, cache_seqlens: Tensor,
                 is_causal: bool = False) -> Tensor:
    """What a torch decoder does without a fused cache kernel: write the new key at each sequence's length (an
    index_put, no host sync), then torch's SDPA over the whole cache (every sequence in these cases fills it)
    with GQA; the layouts are views."""
    B = q.size(0)
    pos = cache_seqlens.long()[:, None] + torch.arange(k.size(1), device=q.device)
    rows = torch.arange(B, device=q.device)[:, None]
    k_cache[rows, pos] = k
    v_cache[rows, pos] = v
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache[:B].transpose(1, 2), v_cache[:B].transpose(1, 2), enable_gqa=True)
    return out.transpose(1, 2)


def _kvcache_baselines() -> dict:
    out = {"torch sdpa": _sdpa_decode}
    try:  # flash-attention's own kernel, where installed (GPU images)
        from flash_attn import flash_attn_with_kvcache
    except Exception:  # noqa: BLE001 - not installed, or built for another torch
        return out

    def flash(q, k_cache, v_cache, k, v, *, cache_seqlens, is_causal=False):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=is_causal)

    out["flash_attn_with_kvcache"] = flash
    return out


def _kvcache_case(label: str, B: int, L: int, H: int = 32, Hkv: int = 8, D: int = 128, suite: str = "gpu") -> Case:
    """One decode step: one new token per sequence after ``L - 1`` cached ones (the cache of ``L`` positions full
    after the append), GQA ``H / Hkv``, causal."""

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        q = torch.randn(B, 1, H, D, device=device, dtype=dtype)
        k_cache, v_cache = (torch.randn(B, L, Hkv, D, device=device, dtype=dtype) for _ in range(2))
        k, v = (torch.randn(B, 1, Hkv, D, device=device, dtype=dtype) for _ in range(2))
        lens = torch.full((B,), L - 1, dtype=torch.int32, device=device)
        return Inputs((q, k_cache, v_cache, k, v), {"cache_seqlens": lens, "is_causal": True},
                      ("q", "k_cache", "v_cache", "k", "v"))

    def min_bytes(dtype: torch.dtype) -> tuple[int, int]:
        e = _elt(dtype)
        # read the cache's keys and values (the appended one included) and q; write the new key / value and out
        return e * (2 * B * L * Hkv * D + B * H * D) + e * (2 * B * Hkv * D + B * H * D), 0

    return Case(
        op="kvcache", label=label, shape=f"B={B} L={L} H={H} Hkv={Hkv} D={D}", make=make,
        fused=fastattn.attention_with_kvcache, eager=reference.attention_with_kvcache,
        baselines=_kvcache_baselines() if suite in ("gpu", "quick") else {}, min_bytes=min_bytes,
        saved_note="inference only: nothing saved", kernels=("_kvcache_append", "_kvcache_attn"),
        dims={"B": B, "L": L, "H": H, "Hkv": Hkv, "D": D}, modes=("fwd",),
    )


@register("kvcache")
def kvcache_cases(suite: str) -> list[Case]:
    """Decode latency of an 8B-class LM layer (32 query heads over 8 key/value heads of 128): cache lengths 1k-32k,
    batch 1, 8 and 64, in GB/s of the cache read (decoding is memory-bound), against torch's SDPA over the cache
    and flash-attention's ``flash_attn_with_kvcache`` where installed."""
    if suite == "gpu":
        shapes = [(f"decode B{b} {n // 1024}k", b, n) for b in (1, 8, 64) for n in (1024, 4096, 16384, 32768)]
    elif suite == "quick":
        shapes = [("decode B1 32k", 1, 32768), ("decode B8 4k", 8, 4096)]
    elif suite == "model":
        shapes = [("decode B8 4k", 8, 4096), ("decode B64 32k", 64, 32768)]
    else:  # small: a short cache, GQA 2, head dim 32 (the interpreter)
        return [_kvcache_case("small", 2, 75, H=4, Hkv=2, D=32, suite=suite)]
    return [_kvcache_case(*s, suite=suite) for s in shapes]


def _kvcache_scratch(args: tuple, kwargs: dict, sms: int | None = None) -> int:
    """The split-KV partials (fp32 outputs and lses) the attention op allocates, from the launcher's own schedule on
    a GPU of ``sms`` SMs (default :data:`SCRATCH_SMS`)."""
    from fastattn.ops import kvcache as kv_ops

    a = op_arguments("fastattn::kvcache_attention", args, kwargs)
    q, k_cache, v_cache, block_table = a["q"], a["k_cache"], a["v_cache"], a["block_table"]
    B, Lq, H, D = q.shape
    capacity = k_cache.size(1) * (block_table.size(1) if block_table is not None else 1)
    sched = kv_ops.schedule(B, H, k_cache.size(2), Lq, capacity, D, v_cache.size(3), q.dtype, sms or SCRATCH_SMS,
                            a["num_splits"])
    return sched.scratch_bytes if sched is not None else 0


SCRATCH["fastattn::kvcache_attention"] = _kvcache_scratch
SCRATCH_NOTES["fastattn::kvcache_attention"] = "kvcache's fp32 split-KV partial outputs and lses"


# ---------------------------------------------------------------------------------------------------------------
# varlen (packed sequences)
# ---------------------------------------------------------------------------------------------------------------


def _padded_sdpa(q: Tensor, k: Tensor, v: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int, max_k: int, *,
                 window_size: tuple[int, int] = (-1, -1)) -> Tensor:
    """What a torch model does with packed data and no varlen kernel: pad to ``(N, H, max, D)`` (gathers on the
    device), torch's SDPA, unpad. Causal self-attention over right-padded sequences needs no mask (a real row never
    sees a later, padded key), so SDPA may take its flash kernel; full attention masks the padded keys."""
    rows_q, valid_q = reference.varlen_rows(cu_seq_q, max_q, q.size(0))
    rows_k, valid_k = reference.varlen_rows(cu_seq_k, max_k, k.size(0))
    qp, kp, vp = (reference.pad_rows(t, rows).transpose(1, 2) for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k)))
    causal = tuple(window_size) == (-1, 0)
    mask = None if causal else valid_k[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2)[valid_q]  # (T_q, H, D): the sequences are in order, so valid rows are the packed rows


def _varlen_baselines() -> dict:
    out = {"torch sdpa padded": _padded_sdpa}
    try:  # torch >= 2.10: its own varlen entry point (flash-attention on CUDA; fp16/bf16)
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover
        return out
    out["torch varlen_attn"] = varlen_attn
    return out


def document_lengths(total: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """Lengths of documents packed into ``total`` tokens: log-uniform in [shortest, longest] from a fixed seed (real
    corpora are dominated by short documents with a long tail), the last one cut to fill ``total`` exactly."""
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        x = torch.rand((), generator=g).item()
        lengths.append(min(round(shortest * (longest / shortest) ** x), total - sum(lengths)))
    return lengths


def _varlen_case(label: str, lengths: list[int], H: int, D: int, causal: bool, suite: str) -> Case:
    T, N, longest = sum(lengths), len(lengths), max(lengths)
    offsets = [0, *itertools.accumulate(lengths)]  # on the host: make() may run under FakeTensorMode
    from fastattn.ops import varlen as varlen_ops

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        q, k, v = (torch.randn(T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        kwargs = {"max_q": longest, "max_k": longest, "window_size": (-1, 0) if causal else (-1, -1)}
        return Inputs((q, k, v, cu, cu), kwargs, ("q", "k", "v", "cu_seq_q", "cu_seq_k"))

    def min_bytes(dtype: torch.dtype) -> tuple[int, int]:
        e, x, stat = _elt(dtype), T * H * D, 4 * T * H  # stat: the fp32 log-sum-exp per row and head
        return e * 4 * x + stat, e * 5 * x + stat + e * 3 * x  # as dense attention's (cases.py)

    def check_saved(case: Case, saved: list) -> str | None:
        big = [s for s in saved if not s.role.startswith("input") and s.role != "output" and s.nbytes > 8 * T * H]
        if big:
            return "saves more than q, k, v, out and O(T) statistics: " + ", ".join(f"{s.shape} {s.dtype}" for s in big)
        return None

    pairs = sum(n * n for n in lengths)
    return Case(
        op="varlen", label=label, shape=f"T={T} N={N} max={longest} H={H} D={D}" + (" causal" if causal else ""),
        make=make, fused=fastattn.varlen_attn, eager=reference.varlen_attn,
        baselines=_varlen_baselines() if suite in ("gpu", "quick", "check") else {},
        flops=4.0 * H * D * pairs * (0.5 if causal else 1.0), bwd_flops_factor=2.5, min_bytes=min_bytes,
        check_saved=check_saved, saved_note="saves only q, k, v, out, the offsets and O(T) statistics",
        eager_note="eager: the reference pads every sequence to the longest (gathers on the device)",
        kernels=varlen_ops.FORWARD_KERNELS + varlen_ops.BACKWARD_KERNELS,
        dims={"T": T, "N": N, "max": longest, "H": H, "D": D, "causal": int(causal)},
    )


@register("varlen")
def varlen_cases(suite: str) -> list[Case]:
    """A training step over packed documents: 16k tokens of an LM corpus (documents of 64-4096 tokens, log-uniform:
    most short, a long tail), causal, model width 2048 as 16 heads of 128 and 32 of 64; an encoder's 8k tokens of
    32-512 token sentences, 12 heads of 64, full attention. Against torch's SDPA on the padded batch (what a model
    without a varlen kernel runs) and torch's own varlen_attn where it runs (flash-attention on CUDA)."""
    lm, enc = document_lengths(16384, 64, 4096), document_lengths(8192, 32, 512, seed=1)
    shapes = {"LM 16k d128": (lm, 16, 128, True), "LM 16k d64": (lm, 32, 64, True),
              "encoder 8k d64": (enc, 12, 64, False)}
    if suite in ("gpu", "model"):
        names = list(shapes)
    elif suite in ("quick", "check"):
        names = ["LM 16k d128"]
    else:  # small: ragged lengths with a 1 and a 0, an odd head dim (the interpreter)
        return [_varlen_case("small", [37, 1, 0, 20], 2, 40, True, suite)]
    return [_varlen_case(n, *shapes[n], suite=suite) for n in names]


def _varlen_backward_scratch(args: tuple, kwargs: dict) -> int:
    """The VARLEN backward's own buffers (delta, dsinks shares; with sinks, the lse it reads), from the launcher."""
    from fastattn.ops import varlen as varlen_ops

    a = op_arguments("fastattn::varlen_attention_backward", args, kwargs)
    return varlen_ops.backward_scratch_bytes(a["lse"], a["sinks"] is not None)


SCRATCH["fastattn::varlen_attention_backward"] = _varlen_backward_scratch
SCRATCH_NOTES["fastattn::varlen_attention_backward"] = (
    "varlen backward's fp32 `delta` (one value per query row and head), and with sinks the lse it reads")
