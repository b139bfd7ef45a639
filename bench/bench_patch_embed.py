"""Fused ViT patch embedding at ViT-B/16's stem (fastattn.perf.cases: 16 px patches, 3 channels, width 768, class
token and position embedding; 224 px and 384 px, batch 64 and 256; images not requiring grad, and one case with
dimages): forward, backward and forward+backward of ``fastattn.patch_embed`` against the eager reference (conv2d +
flatten + transpose + cat + add), unfold + linear + cat + add, and torch.compile of the eager reference.

    pytest bench/bench_patch_embed.py --benchmark-only [--bench-dtypes fp16,bf16]

Reported in TFLOP/s of the GEMM work: forward 2*B*N*K*D (N patches per image, K = 3*16*16, D = 768); backward
the dW GEMM of the same size, plus the dimages GEMM of the same size when the images require grad (the bias,
position and class-token sums are not counted); the ratio to eager is in every row. Timing is
``triton.testing.do_bench`` (median, 20/80 quantiles in ``extra_info`` with TFLOP/s, the ratio to eager and the
peak memory); pytest-benchmark's own columns time synchronised rounds of the same call.
"""

import pytest

from fastattn.perf import gpu

PARAMS = gpu.pytest_params("patch_embed")


@pytest.mark.parametrize("case, impl, mode", PARAMS)
def test_patch_embed(benchmark, case, impl, mode, dtype):
    gpu.pytest_benchmark(benchmark, case, impl, mode, dtype)
