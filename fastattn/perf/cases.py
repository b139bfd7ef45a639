"""The benchmark registry: one function per op returns that op's :class:`Case` list for a suite.

Suites:
- ``"gpu"``: the model shapes timed by ``fastattn bench`` on a GPU and by ``pytest bench/``;
- ``"quick"``: a few of them (``fastattn bench --quick``);
- ``"model"``: real model shapes for the CPU report's measured memory and traffic (FakeTensors: no data, so
  size does not matter);
- ``"small"``: one or two small awkward shapes for the interpreter agreement check.

To add an op, write ``@register("<op module>") def <op>_cases(suite) -> list[Case]`` below (the op module name
is the one in ``fastattn.ops.OPS``), and, where a backward kernel allocates scratch that its fake implementation
does not, an entry in :data:`SCRATCH`. Everything else (timing, CSV, plots, memory, traffic, interpreter check,
``bench/bench_<op>.py``) is generic.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import fastattn
from fastattn import reference

SUITES = ("gpu", "quick", "model", "small")


@dataclasses.dataclass
class Inputs:
    """Positional tensors (named) and keyword arguments of one call."""

    args: tuple
    kwargs: dict
    names: tuple[str, ...]

    def call(self, fn: Callable) -> Any:
        return fn(*self.args, **self.kwargs)

    def leaves(self) -> list[Tensor]:
        """The tensors gradients flow to."""
        return [a for a in self.args if isinstance(a, Tensor) and a.requires_grad]

    def cast(self, dtype: torch.dtype) -> Inputs:
        """Fresh leaf copies with floating tensors in ``dtype`` (same ``requires_grad``)."""
        args = tuple(a.detach().to(dtype if a.is_floating_point() else a.dtype).requires_grad_(a.requires_grad)
                     if isinstance(a, Tensor) else a for a in self.args)
        return Inputs(args, dict(self.kwargs), self.names)


@dataclasses.dataclass
class Case:
    """One shape of one op, with everything needed to time it, measure its memory and check it."""

    op: str  # op module name (fastattn.ops.OPS)
    label: str  # "ViT-B/16 224px"
    shape: str  # "B=64 H=12 L=197 D=64"
    make: Callable[[torch.device, torch.dtype], Inputs]  # fresh inputs; requires_grad where gradients flow
    fused: Callable  # the fastattn public function
    eager: Callable  # its eager reference (fastattn.reference): the baseline of every ratio
    baselines: dict[str, Callable] = dataclasses.field(default_factory=dict)  # torch's own alternatives
    flops: float = 0.0  # forward FLOPs: > 0 reports TFLOP/s (GEMM-bound), 0 reports GB/s (memory-bound)
    bwd_flops_factor: float = 2.5  # backward FLOPs = factor * forward FLOPs
    min_bytes: Callable[[torch.dtype], tuple[int, int]] | None = None  # (fwd, bwd) bytes a fused op must move
    check_saved: Callable[[Case, list], str | None] | None = None  # op-specific check of the saved tensors
    lowp_baseline: Callable | None = None  # eager torch in low precision for the 2x rule (default: ``eager``)
    kernels: tuple[str, ...] = ()  # Triton kernels a fused forward + backward must launch
    dims: dict[str, int] = dataclasses.field(default_factory=dict)  # shape numbers, for formulas and plots

    @property
    def name(self) -> str:
        return f"{self.op} {self.label}"

    def work(self, mode: str, dtype: torch.dtype) -> tuple[float, str]:
        """(amount, unit) of work in ``mode`` ("fwd", "bwd", "fwd+bwd"): FLOPs or bytes."""
        if self.flops:
            f = {"fwd": 1.0, "bwd": self.bwd_flops_factor, "fwd+bwd": 1.0 + self.bwd_flops_factor}[mode]
            return self.flops * f, "TFLOP/s"
        if self.min_bytes is None:
            return 0.0, ""
        fwd, bwd = self.min_bytes(dtype)
        return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]), "GB/s"


_REGISTRY: dict[str, Callable[[str], list[Case]]] = {}

# Kernel scratch that a custom op's fake implementation does not allocate: custom-op name -> bytes(args, kwargs).
# The memory tracer adds it to the live bytes while that op runs.
SCRATCH: dict[str, Callable[[tuple, dict], int]] = {}


def register(op: str) -> Callable:
    def deco(fn: Callable[[str], list[Case]]) -> Callable[[str], list[Case]]:
        _REGISTRY[op] = fn
        return fn

    return deco


def available_ops() -> list[str]:
    """Ops that exist in this build (``fastattn.ops.OPS``) and have benchmark cases."""
    from fastattn.ops import OPS

    return [op for op in OPS if op in _REGISTRY]


def select_ops(ops: Sequence[str] | None) -> list[str]:
    known = available_ops()
    if not ops:
        return known
    unknown = [op for op in ops if op not in known]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; available: {', '.join(known)}")
    return list(ops)


def get(op: str, suite: str) -> list[Case]:
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}; got {suite!r}")
    return _REGISTRY[op](suite)


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------


def _sdpa_backend(backend: Any, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False) -> Tensor:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def _sdpa_baselines() -> dict[str, Callable]:
    """torch's SDPA restricted to each backend this torch has (one that cannot serve a case raises; the runner
    reports it as unsupported)."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # pragma: no cover - torch < 2.3 is below our floor
        return {}
    out = {}
    for name, attr in (("flash", "FLASH_ATTENTION"), ("mem-efficient", "EFFICIENT_ATTENTION"),
                       ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH")):
        if hasattr(SDPBackend, attr):
            out[f"torch sdpa {name}"] = functools.partial(_sdpa_backend, getattr(SDPBackend, attr))
    return out


def _attention_case(label: str, B: int, H: int, L: int, D: int, causal: bool, suite: str) -> Case:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        return Inputs((q, k, v), {"is_causal": causal}, ("q", "k", "v"))

    def min_bytes(dtype: torch.dtype) -> tuple[int, int]:
        e, x, stat = _elt(dtype), B * H * L * D, 4 * B * H * L  # stat: the fp32 log-sum-exp row statistic
        fwd = e * 3 * x + e * x + stat  # read q, k, v; write out, lse
        bwd = e * 5 * x + stat + e * 3 * x  # read q, k, v, out, dout, lse; write dq, dk, dv
        return fwd, bwd

    def check_saved(case: Case, saved: list) -> str | None:
        # Only q, k, v, out and O(L) statistics (the log-sum-exp) may be kept for the backward.
        big = [s for s in saved if s.role not in ("input q", "input k", "input v", "output")
               and s.nbytes > 8 * B * H * L]
        if big:
            return "saves more than q, k, v, out and O(L) statistics: " + ", ".join(
                f"{s.shape} {s.dtype}" for s in big)
        return None

    flops = 4.0 * B * H * L * L * D * (0.5 if causal else 1.0)
    return Case(
        op="attention", label=label, shape=f"B={B} H={H} L={L} D={D}" + (" causal" if causal else ""),
        make=make, fused=fastattn.scaled_dot_product_attention, eager=reference.scaled_dot_product_attention,
        baselines=_sdpa_baselines() if suite in ("gpu", "quick") else {}, flops=flops, bwd_flops_factor=2.5,
        min_bytes=min_bytes, check_saved=check_saved, lowp_baseline=F.scaled_dot_product_attention,
        kernels=("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"),
        dims={"B": B, "H": H, "L": L, "D": D, "causal": int(causal)},
    )


@register("attention")
def attention_cases(suite: str) -> list[Case]:
    """ViT-B/16 and ViT-L/16 at 224 px (197 tokens), a Transformer-base layer (d_model 512, 8 heads of 64,
    512 tokens) and LM attention at 1k-16k tokens with 16k tokens per batch, model width 2048 (head dims 64 and
    128), causal and not."""
    vit_b = ("ViT-B/16 224px", 64, 12, 197, 64, False)
    vit_l = ("ViT-L/16 224px", 32, 16, 197, 64, False)
    tbase = ("Transformer-base", 32, 8, 512, 64, False)
    tbase_causal = ("Transformer-base causal", 32, 8, 512, 64, True)

    def lm(L: int, D: int, causal: bool) -> tuple:
        return (f"LM {L // 1024}k d{D}" + (" causal" if causal else ""), 16384 // L, 2048 // D, L, D, causal)

    if suite == "gpu":
        shapes = [vit_b, vit_l, tbase, tbase_causal]
        shapes += [lm(L, D, c) for D in (64, 128) for c in (False, True) for L in (1024, 2048, 4096, 8192, 16384)]
    elif suite == "quick":
        shapes = [vit_b, lm(4096, 64, False), lm(4096, 128, True)]
    elif suite == "model":
        shapes = [vit_b, vit_l, tbase, lm(4096, 128, True), lm(16384, 128, True)]
    else:  # small: odd lengths and head dims for the interpreter
        shapes = [("small", 2, 3, 67, 40, False), ("small causal", 1, 2, 97, 64, True)]
    return [_attention_case(*s, suite=suite) for s in shapes]


def _attention_backward_scratch(args: tuple, kwargs: dict) -> int:
    # _backward allocates delta (Z, H, M) in the statistics dtype before launching its kernels.
    q = args[1]
    Z, H, M = q.shape[:3]
    return Z * H * M * (8 if q.dtype == torch.float64 else 4)


SCRATCH["fastattn::attention_backward"] = _attention_backward_scratch
