"""Benchmark cases of the partial-attention ops: ``merge_attention`` (ring / context parallelism, split-KV) and
``kvcache`` (decoding against a KV cache). Registered into :mod:`fastattn.perf.cases` (imported at its end).
"""

from __future__ import annotations

import torch
from torch import Tensor

import fastattn
from fastattn import reference
from fastattn.perf.cases import Case, Inputs, _elt, register


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

