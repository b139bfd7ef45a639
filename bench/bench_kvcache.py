"""Decode latency against a KV cache (fastattn.perf.cases: an 8B-class layer, 32 query heads over 8 key/value
heads of 128, caches of 1k-32k tokens, batch 1, 8 and 64): fastattn.attention_with_kvcache against the eager
reference, torch's SDPA over the cache, flash-attention's flash_attn_with_kvcache where installed, and
torch.compile of the eager reference. Forward only (inference).

    pytest bench/bench_kvcache.py --benchmark-only [--bench-dtypes fp16,bf16]

Timing is ``triton.testing.do_bench`` (median, 20/80 quantiles in ``extra_info`` with GB/s of the cache read, the
ratio to eager and the peak memory); pytest-benchmark's own columns time synchronised rounds of the same call.
"""

import pytest

from fastattn.perf import gpu

PARAMS = gpu.pytest_params("kvcache")


@pytest.mark.parametrize("case, impl, mode", PARAMS)
def test_kvcache(benchmark, case, impl, mode, dtype):
    gpu.pytest_benchmark(benchmark, case, impl, mode, dtype)
