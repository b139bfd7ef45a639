"""The benchmark registry: one function per op returns that op's :class:`Case` list for a suite.

Suites:
- ``"gpu"``: the model shapes timed by ``fastattn bench`` on a GPU and by ``pytest bench/``;
- ``"quick"``: a few of them (``fastattn bench --quick``);
- ``"model"``: real model shapes for the CPU report's measured memory and traffic (FakeTensors: no data, so
  size does not matter);
- ``"small"``: one or two small awkward shapes for the interpreter agreement check;
- ``"check"``: ``fastattn gpu-check``'s bounded set: the quick cases, plus LM attention at 4k and 8k tokens.

To add an op, write ``@register("<op module>") def <op>_cases(suite) -> list[Case]`` below (the op module name
is the one in ``fastattn.ops.OPS``), and, where a backward kernel allocates scratch that its fake implementation
does not, an entry in :data:`SCRATCH`. Everything else (timing, CSV, plots, memory, traffic, interpreter check,
``bench/bench_<op>.py``) is generic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import fastattn
from fastattn import reference
from fastattn.ops import patch_embed as pe_ops

SUITES = ("gpu", "quick", "model", "small", "check")


@dataclasses.dataclass
class Inputs:
    """Positional tensors (named) and keyword arguments of one call."""

    args: tuple
    kwargs: dict
    names: tuple[str, ...]  # one per positional argument
    keep_fp32: tuple[str, ...] = ()  # tensors that stay float32 beside fp16/bf16 activations (BatchNorm's parameters)

    def call(self, fn: Callable) -> Any:
        return fn(*self.args, **self.kwargs)

    def leaves(self) -> list[Tensor]:
        """The tensors gradients flow to."""
        return [a for a in self.args if isinstance(a, Tensor) and a.requires_grad]

    def cast(self, dtype: torch.dtype) -> Inputs:
        """Fresh leaf copies with floating tensors in ``dtype`` (same ``requires_grad``); those named in
        ``keep_fp32`` take float32 where ``dtype`` is a half type."""

        def target(name: str, a: Tensor) -> torch.dtype:
            if not a.is_floating_point():
                return a.dtype
            return torch.float32 if name in self.keep_fp32 and dtype in (torch.float16, torch.bfloat16) else dtype

        args = tuple(a.detach().to(target(n, a), copy=True).requires_grad_(a.requires_grad)
                     if isinstance(a, Tensor) else a for n, a in zip(self.names, self.args))
        return Inputs(args, dict(self.kwargs), self.names, self.keep_fp32)


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
    saved_note: str = ""  # what the fused op keeps for the backward, in words (shown when check_saved passes)
    eager_note: str = ""  # where the CPU trace of eager differs from what eager torch runs on a GPU
    lowp_baseline: Callable | None = None  # eager torch in low precision for the 2x rule (default: ``eager``)
    kernels: tuple[str, ...] = ()  # Triton kernels a fused forward + backward must launch
    outputs: tuple[str, ...] = ("out",)  # names of the differentiable outputs (the agreement table's rows)
    dims: dict[str, int] = dataclasses.field(default_factory=dict)  # shape numbers, for formulas and plots
    modes: tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")  # what is timed; ("fwd",) for inference-only ops

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
# The memory tracer adds it to the live bytes while that op runs. SCRATCH_NOTES says in words what each one is.
SCRATCH: dict[str, Callable[[tuple, dict], int]] = {}
SCRATCH_NOTES: dict[str, str] = {}

# Scratch sizes that depend on the GPU (programs per SM) are given for this many SMs: an H100 SXM (A100: 108).
SCRATCH_SMS = 132


def op_arguments(op: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of the custom op ``op`` (``"fastattn::name"``) by their schema's names, defaults filled in, so
    that SCRATCH formulas read them by name, never by position."""
    namespace, name = op.split("::")
    schema = getattr(getattr(torch.ops, namespace), name).default._schema
    bound = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
        baselines=_sdpa_baselines() if suite in ("gpu", "quick", "check") else {}, flops=flops, bwd_flops_factor=2.5,
        min_bytes=min_bytes, check_saved=check_saved, saved_note="saves only q, k, v, out and O(L) statistics",
        lowp_baseline=F.scaled_dot_product_attention,
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
    elif suite == "check":
        shapes = [vit_b] + [lm(L, D, c) for L in (4096, 8192) for D in (64, 128) for c in (False, True)]
    elif suite == "model":
        shapes = [vit_b, vit_l, tbase, lm(4096, 128, True), lm(16384, 128, True)]
    else:  # small: odd lengths and head dims for the interpreter
        shapes = [("small", 2, 3, 67, 40, False), ("small causal", 1, 2, 97, 64, True)]
    return [_attention_case(*s, suite=suite) for s in shapes]


def _attention_backward_scratch(args: tuple, kwargs: dict) -> int:
    # _backward allocates delta like lse (and with sinks dsinks' shares) before launching its kernels.
    from fastattn.ops import attention as attn_ops

    a = op_arguments("fastattn::attention_backward", args, kwargs)
    return attn_ops.backward_scratch_bytes(a["lse"], a["sinks"] is not None)


SCRATCH["fastattn::attention_backward"] = _attention_backward_scratch
SCRATCH_NOTES["fastattn::attention_backward"] = "attention backward's fp32 `delta` (one value per query row)"


# ---------------------------------------------------------------------------------------------------------------
# layer_norm (residual add + LayerNorm / RMSNorm)
# ---------------------------------------------------------------------------------------------------------------


def _layer_norm_case(label: str, lead: tuple[int, ...], N: int, rms: bool) -> Case:
    rows = math.prod(lead)

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        x = torch.randn(*lead, N, device=device, dtype=dtype, requires_grad=True)
        residual = torch.randn(*lead, N, device=device, dtype=dtype, requires_grad=True)
        weight = torch.empty(N, device=device, dtype=dtype).normal_(1.0, 0.1).requires_grad_()
        if rms:
            return Inputs((x, residual, weight), {"eps": 1e-6}, ("x", "residual", "weight"))
        bias = torch.empty(N, device=device, dtype=dtype).normal_(0.0, 0.1).requires_grad_()
        return Inputs((x, residual, weight, bias), {"eps": 1e-5}, ("x", "residual", "weight", "bias"))

    def min_bytes(dtype: torch.dtype) -> tuple[int, int]:
        e, x = _elt(dtype), rows * N
        params = e * N * (1 if rms else 2)  # weight (and bias)
        stats = 4 * rows * (1 if rms else 2)  # fp32 rstd (and mean) per row, saved for the backward
        fwd = e * 2 * x + params + e * 2 * x + stats  # read x, residual, params; write out, residual_out, stats
        # read dout, d residual_out, residual_out, weight, stats; write dx (= dresidual: one tensor), dparams
        bwd = e * 3 * x + e * N + stats + e * x + params
        return fwd, bwd

    def check_saved(case: Case, saved: list) -> str | None:
        # Only residual_out (an output) and per-row statistics may be kept; never x or residual.
        big = [s for s in saved if s.role != "output" and s.nbytes > 8 * max(rows, N)]
        if big:
            return "saves more than residual_out and per-row statistics: " + ", ".join(
                f"{s.role} {s.shape} {s.dtype}" for s in big)
        return None

    return Case(
        op="layer_norm", label=label,
        shape=f"rows={'x'.join(map(str, lead))} N={N}" + (" RMSNorm" if rms else ""),
        make=make, fused=fastattn.add_rms_norm if rms else fastattn.add_layer_norm,
        eager=reference.add_rms_norm if rms else reference.add_layer_norm,
        min_bytes=min_bytes, check_saved=check_saved,
        saved_note="saves only residual_out and per-row statistics" + ("" if rms else ", as eager F.layer_norm does"),
        eager_note=("CPU trace: torch.rms_norm's composite (fp32 upcast); CUDA torch runs its fused _fused_rms_norm, "
                    "which keeps only the input and rstd" if rms else ""),
        kernels=("_layer_norm_fwd", "_layer_norm_bwd", "_layer_norm_bwd_reduce"), outputs=("out", "residual_out"),
        dims={"rows": rows, "N": N, "rms": int(rms)},
    )


@register("layer_norm")
def layer_norm_cases(suite: str) -> list[Case]:
    """Pre-norm residual junctions ``(out, residual_out) = add_layer_norm(x, residual, w, b)``, both outputs used
    (both get a gradient): ViT-B/16 and ViT-L/16 at 224 px with batch 64 (64 x 197 token rows of 768 / 1024), one
    ViT-B/16 image (197 rows: launch-bound), and an LLM layer of 4096 tokens x 4096 wide, LayerNorm and RMSNorm."""
    vit_b = ("ViT-B/16 224px B64", (64, 197), 768, False)
    vit_l = ("ViT-L/16 224px B64", (64, 197), 1024, False)
    vit_b1 = ("ViT-B/16 224px B1", (1, 197), 768, False)
    llm = ("LLM 4096x4096", (4096,), 4096, False)
    llm_rms = ("LLM 4096x4096 RMSNorm", (4096,), 4096, True)
    if suite == "gpu":
        shapes = [vit_b, vit_l, vit_b1, llm, llm_rms]
    elif suite in ("quick", "check"):
        shapes = [vit_b, llm_rms]
    elif suite == "model":
        shapes = [vit_b, vit_l, llm, llm_rms]
    else:  # small: an odd width in one tile, and a width past the backward's tile limit (looped path)
        shapes = [("small", (3, 37), 200, False), ("small RMSNorm looped", (2, 5), 1500, True)]
    return [_layer_norm_case(*s) for s in shapes]


def _layer_norm_backward_scratch(args: tuple, kwargs: dict, sms: int | None = None) -> int:
    """One partial-sum row per backward program for dweight and one for dbias, summed by a second kernel: the
    launcher's own schedule on a GPU of ``sms`` SMs (default :data:`SCRATCH_SMS`)."""
    from fastattn.ops import layer_norm as ln_ops

    a = op_arguments("fastattn::add_layer_norm_backward", args, kwargs)
    z = a["z"]
    partials = int(bool(a["need_dweight"]) and a["weight"] is not None) + int(a["dbias_dtype"] is not None)
    return ln_ops.backward_schedule(math.prod(z.shape[:-1]), z.shape[-1], z.dtype, sms or SCRATCH_SMS,
                                    partials).scratch_bytes


SCRATCH["fastattn::add_layer_norm_backward"] = _layer_norm_backward_scratch
SCRATCH_NOTES["fastattn::add_layer_norm_backward"] = (
    "layer_norm backward's fp32 dweight/dbias partial rows (one per program)")


# ---------------------------------------------------------------------------------------------------------------
# patch_embed
# ---------------------------------------------------------------------------------------------------------------


def _unfold_linear(images: Tensor, weight: Tensor, bias: Tensor | None = None, pos_embed: Tensor | None = None,
                   cls_token: Tensor | None = None) -> Tensor:
    """The other common eager formulation: im2col by ``F.unfold``, one matmul, then class token and position."""
    p = weight.shape[-1]
    t = F.linear(F.unfold(images, p, stride=p).transpose(1, 2), weight.reshape(weight.shape[0], -1), bias)
    if cls_token is not None:
        t = torch.cat([cls_token.expand(t.shape[0], -1, -1), t], 1)
    return t + pos_embed if pos_embed is not None else t


def _patch_embed_case(label: str, B: int, H: int, W: int, dimages: bool, P: int = 16, D: int = 768,
                      C: int = 3) -> Case:
    N, K = (H // P) * (W // P), C * P * P
    T = N + 1  # class token

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        images = torch.randn(B, C, H, W, device=device, dtype=dtype, requires_grad=dimages)
        weight = torch.empty(D, C, P, P, device=device, dtype=dtype).normal_(0.0, K**-0.5).requires_grad_()
        bias = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
        pos = torch.empty(1, T, D, device=device, dtype=dtype).normal_(0.0, 0.5).requires_grad_()
        cls = torch.randn(1, 1, D, device=device, dtype=dtype, requires_grad=True)
        return Inputs((images, weight, bias, pos, cls), {}, ("images", "weight", "bias", "pos_embed", "cls_token"))

    def min_bytes(dtype: torch.dtype) -> tuple[int, int]:
        e, img, w, out, pos = _elt(dtype), B * C * H * W, D * K, B * T * D, T * D
        fwd = e * (img + w + D + pos + D) + e * out  # read images, weight, bias, pos, cls; write tokens
        # read dtokens, images (for dW) and, for dimages, weight; write dweight, dbias, dpos, dcls (and dimages)
        bwd = e * (out + img + (w if dimages else 0)) + e * (w + D + pos + D + (img if dimages else 0))
        return fwd, bwd

    def check_saved(case: Case, saved: list) -> str | None:
        extra = [s for s in saved if not s.role.startswith("input")]
        if extra:
            return "saves more than its inputs: " + ", ".join(f"{s.role} {s.shape} {s.dtype}" for s in extra)
        return None

    kernels = ("_pe_fwd", "_pe_bwd_dw", "_pe_bwd_dpos") + (("_pe_bwd_dx",) if dimages else ())
    # the launcher's dW schedule on a GPU of SCRATCH_SMS SMs, for 2-byte images: its partials need dimages' buffer
    sched = pe_ops.dw_schedule(B * N, K, D, room=2 * B * C * H * W if dimages else 0, acc_bytes=4, sms=SCRATCH_SMS)
    if sched.split > 1:
        dw_note = (f"dweight's {sched.split} split-K partial sums ({sched.partial_bytes / 2**20:,.1f} MiB at "
                   f"{SCRATCH_SMS} SMs) live in the dimages buffer before it is written")
    else:
        dw_note = "dweight in one token range per tile (no dimages buffer to hold split-K partials): no scratch"
    return Case(
        op="patch_embed", label=label,
        shape=f"B={B} {C}x{H}x{W} P={P} D={D}" + (" +dimages" if dimages else ""),
        make=make, fused=fastattn.patch_embed, eager=reference.patch_embed,
        baselines={"unfold + linear": _unfold_linear},
        flops=2.0 * B * N * K * D, bwd_flops_factor=2.0 if dimages else 1.0,
        min_bytes=min_bytes, check_saved=check_saved,
        saved_note=f"saves only images and weight, as eager's convolution does; {dw_note}",
        kernels=kernels, dims={"B": B, "H": H, "W": W, "P": P, "D": D, "N": N, "dimages": int(dimages)},
    )


@register("patch_embed")
def patch_embed_cases(suite: str) -> list[Case]:
    """ViT-B/16's stem (16 px patches of 3 channels to width 768, class token, position embedding) at 224 px (196
    patches) and 384 px (576 patches), batch 64 and 256. Images do not require grad (they are data); one case
    also computes dimages (a stem behind another differentiable layer)."""
    if suite == "gpu":
        shapes = [(f"ViT-B/16 {s}px B{b}", b, s, s, False) for s in (224, 384) for b in (64, 256)]
        shapes.append(("ViT-B/16 224px B64 +dimages", 64, 224, 224, True))
    elif suite in ("quick", "check"):
        shapes = [("ViT-B/16 224px B64", 64, 224, 224, False)]
    elif suite == "model":
        shapes = [("ViT-B/16 224px B64", 64, 224, 224, False), ("ViT-B/16 384px B64", 64, 384, 384, False),
                  ("ViT-B/16 224px B64 +dimages", 64, 224, 224, True)]
    else:  # small: non-square images, widths that are no multiple of the tiles
        return [_patch_embed_case("small", 3, 32, 48, False, P=16, D=40),
                _patch_embed_case("small +dimages", 2, 24, 40, True, P=8, D=72)]
    return [_patch_embed_case(*s) for s in shapes]




# ---------------------------------------------------------------------------------------------------------------
# batch_norm (BatchNorm + residual add + ReLU)
# ---------------------------------------------------------------------------------------------------------------

# The cases live in fastattn.perf.cases_bn (imported at the end); the scratch of its custom ops here, with the rest.


def _batch_norm_partials(M: int, C: int, sms: int) -> int:
    """S, the partial sums per channel, as ``fastattn.ops.batch_norm._num_partials`` computes it on a GPU of ``sms``."""
    return max(1, min(_cdiv(8 * sms * 32, C), _cdiv(M, 256), 4096))


def _batch_norm_stats_scratch(args: tuple, kwargs: dict, partials: Callable[[int, int], int] | None = None) -> int:
    """fp64 partial sums (2, S, C) and the per-channel shift. ``partials(M, C)`` (S) defaults to a GPU with
    :data:`SCRATCH_SMS` SMs."""
    partials = partials or (lambda M, C: _batch_norm_partials(M, C, SCRATCH_SMS))
    x = op_arguments("fastattn::batch_norm_stats", args, kwargs)["x"]
    N, C, H, W = x.shape
    if N * H * W == 0 or C == 0:
        return 0
    stat = 8 if x.dtype == torch.float64 else 4
    return 2 * partials(N * H * W, C) * C * 8 + C * stat


def _batch_norm_backward_scratch(args: tuple, kwargs: dict, partials: Callable[[int, int], int] | None = None
                                 ) -> int:
    """fp64 partial sums (2, S, C) -- in dx's buffer when training computes dx -- and, training with dx, dx's
    coefficients (3, C): ``fastattn.ops.batch_norm.scratch_bytes``."""
    from fastattn.ops import batch_norm as bn_ops

    partials = partials or (lambda M, C: _batch_norm_partials(M, C, SCRATCH_SMS))
    a = op_arguments("fastattn::batch_norm_act_backward", args, kwargs)
    x, training, need_dx, need_dw, need_db = a["x"], a["training"], a["need_dx"], a["need_dw"], a["need_db"]
    N, C, H, W = x.shape
    return bn_ops.scratch_bytes(x, training, need_dx, need_dw or need_db or (training and need_dx),
                                partials(N * H * W, C))


SCRATCH["fastattn::batch_norm_stats"] = _batch_norm_stats_scratch
SCRATCH["fastattn::batch_norm_act_backward"] = _batch_norm_backward_scratch
SCRATCH_NOTES["fastattn::batch_norm_stats"] = "batch_norm's fp64 partial sums of the statistics"
SCRATCH_NOTES["fastattn::batch_norm_act_backward"] = (
    "batch_norm backward's dx coefficients and, without dx, its fp64 partial sums (with dx they live in dx's buffer)")


# The partial-attention ops (merge_attention, kvcache) and batch_norm register their cases from their own modules.
from fastattn.perf import cases_bn, cases_kv  # noqa: E402,F401
