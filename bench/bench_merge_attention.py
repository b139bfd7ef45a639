"""Merging partial attention (fastattn.perf.cases: ring attention's merges of 2 and 8 parts of an LM layer at 4k and
16k tokens per GPU): forward, backward and forward+backward of fastattn.merge_attention against the eager
reference and torch.compile of it, in GB/s.

    pytest bench/bench_merge_attention.py --benchmark-only [--bench-dtypes fp16,bf16]
"""

import pytest

from fastattn.perf import gpu

PARAMS = gpu.pytest_params("merge_attention")


@pytest.mark.parametrize("case, impl, mode", PARAMS)
def test_merge_attention(benchmark, case, impl, mode, dtype):
    gpu.pytest_benchmark(benchmark, case, impl, mode, dtype)
