"""Benchmarks of fastattn.patch_embed against eager PyTorch at ViT-B/16 (P = 16, C = 3, D = 768), on a GPU.

Baselines: the eager reference (conv2d + flatten + transpose + cat + add, fastattn.reference.patch_embed) and
unfold + linear + cat + add. Forward, backward and forward+backward with a class token and a position embedding,
images not requiring grad (training: the stem's input is data), in TFLOP/s from the GEMM work
(forward 2*B*N*K*D, backward the dW GEMM of the same size), timed by triton.testing.do_bench (median with the
20/80 quantiles), with peak memory and the ratio to both baselines measured in the same run.

    pytest bench/bench_patch_embed.py --benchmark-only        # skipped without a CUDA device
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.testing

import fastattn
from fastattn import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="patch_embed benchmarks need a CUDA device")

P, C, D = 16, 3, 768
CASES = [(64, 224), (256, 224), (64, 384), (256, 384)]  # (batch, image size)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ("fwd", "bwd", "fwd+bwd")


def unfold_linear(images, weight, bias=None, pos_embed=None, cls_token=None):
    """The other common eager formulation: im2col by F.unfold, then one matmul."""
    p = weight.shape[-1]
    t = F.linear(F.unfold(images, p, stride=p).transpose(1, 2), weight.reshape(weight.shape[0], -1), bias)
    if cls_token is not None:
        t = torch.cat([cls_token.expand(t.shape[0], -1, -1), t], 1)
    return t + pos_embed if pos_embed is not None else t


IMPLS = {"fastattn": fastattn.patch_embed, "eager_conv": reference.patch_embed, "unfold_linear": unfold_linear}


def make_inputs(batch: int, size: int, dtype: torch.dtype) -> dict:
    n = (size // P) ** 2
    dev = torch.device("cuda")
    return {
        "images": torch.randn(batch, C, size, size, device=dev, dtype=dtype),
        "weight": (torch.randn(D, C, P, P, device=dev, dtype=dtype) * 0.02).requires_grad_(),
        "bias": torch.zeros(D, device=dev, dtype=dtype, requires_grad=True),
        "pos_embed": (torch.randn(1, n + 1, D, device=dev, dtype=dtype) * 0.02).requires_grad_(),
        "cls_token": torch.zeros(1, 1, D, device=dev, dtype=dtype, requires_grad=True),
    }


def timed(fn, inputs: dict, mode: str) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of one pass of ``fn`` over ``inputs``."""
    leaves = [t for t in inputs.values() if t.requires_grad]
    if mode == "fwd":
        return tuple(triton.testing.do_bench(lambda: fn(**inputs), quantiles=[0.5, 0.2, 0.8]))
    if mode == "bwd":
        out = fn(**inputs)
        grad = torch.randn_like(out)
        return tuple(triton.testing.do_bench(lambda: out.backward(grad, retain_graph=True), grad_to_none=leaves,
                                             quantiles=[0.5, 0.2, 0.8]))
    grad = torch.randn_like(fn(**inputs))
    return tuple(triton.testing.do_bench(lambda: fn(**inputs).backward(grad), grad_to_none=leaves,
                                         quantiles=[0.5, 0.2, 0.8]))


def peak_mib(fn, inputs: dict) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(**inputs).sum().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def tflops(batch: int, size: int, mode: str, ms: float) -> float:
    gemm = 2.0 * batch * (size // P) ** 2 * C * P * P * D
    work = {"fwd": gemm, "bwd": gemm, "fwd+bwd": 2 * gemm}[mode]
    return work / (ms * 1e-3) / 1e12


@pytest.mark.parametrize("mode", PASSES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("batch,size", CASES, ids=[f"B{b}-{s}px" for b, s in CASES])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_patch_embed(benchmark, impl, batch, size, dtype, mode):
    inputs = make_inputs(batch, size, DTYPES[dtype])
    fn = IMPLS[impl]
    ms, lo, hi = timed(fn, inputs, mode)
    info = {"impl": impl, "batch": batch, "image_size": size, "dtype": dtype, "mode": mode, "ms": ms, "ms_p20": lo,
            "ms_p80": hi, "tflops": tflops(batch, size, mode, ms), "peak_mib": peak_mib(fn, inputs),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    if impl == "fastattn":  # ratios against the baselines, measured in this same run
        for other in ("eager_conv", "unfold_linear"):
            info[f"speedup_vs_{other}"] = timed(IMPLS[other], inputs, mode)[0] / ms
    benchmark.extra_info.update(info)
    # pytest-benchmark's own timer runs the forward+backward a few times (the numbers above come from do_bench)
    leaves = [t for t in inputs.values() if t.requires_grad]

    def step():
        fn(**inputs).sum().backward()
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
