"""Merging partial attention (fastattn.perf.cases: ring attention's merges of 2 and 8 parts of an LM layer at 4k and
16k tokens per GPU): forward, backward and forward+backward of fastattn.merge_attention against the eager
reference and torch.compile of it, in GB/s.

    pytest bench/bench_merge_attention.py --benchmark-only [--bench-dtypes fp16,bf16]
"""

import pytest

from fastattn.perf import cases, gpu

PARAMS = [pytest.param(case, impl, mode, id=f"{case.label}-{impl}-{mode}".replace(" ", "_"))
          for case in cases.get("merge_attention", "gpu") for impl in gpu.implementations(case) for mode in case.modes]


@pytest.mark.parametrize("case, impl, mode", PARAMS)
def test_merge_attention(benchmark, case, impl, mode, dtype):
    gpu.pytest_benchmark(benchmark, case, impl, mode, dtype)
