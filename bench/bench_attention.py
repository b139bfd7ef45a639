"""Attention at model shapes (fastattn.perf.cases: ViT-B/16, ViT-L/16, Transformer-base, LM 1k-16k tokens with
head dims 64 and 128, causal and not): forward, backward and forward+backward of fastattn against the eager
reference, torch's SDPA restricted to each backend, and torch.compile of the eager reference.

    pytest bench/bench_attention.py --benchmark-only [--bench-dtypes fp16,bf16]

Timing is ``triton.testing.do_bench`` (median, 20/80 quantiles in ``extra_info`` with TFLOP/s, the ratio to eager
and the peak memory); pytest-benchmark's own columns time synchronised rounds of the same call.
"""

import pytest

from fastattn.perf import gpu

PARAMS = gpu.pytest_params("attention")


@pytest.mark.parametrize("case, impl, mode", PARAMS)
def test_attention(benchmark, case, impl, mode, dtype):
    gpu.pytest_benchmark(benchmark, case, impl, mode, dtype)
