"""A training step of attention over packed documents (fastattn.perf.cases: 16k LM tokens of 64-4096-token
documents, causal, 16 heads of 128 and 32 of 64; an encoder's 8k tokens of 32-512-token sentences, 12 heads of 64):
fastattn.varlen_attn against the eager reference, torch's SDPA on the padded batch, torch's own varlen_attn where
it runs (flash-attention on CUDA), and torch.compile of the eager reference. Forward, backward and both.

    pytest bench/bench_varlen.py --benchmark-only [--bench-dtypes fp16,bf16]

Timing is ``triton.testing.do_bench`` (median, 20/80 quantiles in ``extra_info`` with TFLOP/s over the visible
query-key pairs, the ratio to eager and the peak memory); pytest-benchmark's own columns time synchronised rounds
of the same call.
"""

import pytest

from fastattn.perf import cases, gpu

PARAMS = [pytest.param(case, impl, mode, id=f"{case.label}-{impl}-{mode}".replace(" ", "_"))
          for case in cases.get("varlen", "gpu") for impl in gpu.implementations(case) for mode in case.modes]


@pytest.mark.parametrize("case, impl, mode", PARAMS)
def test_varlen(benchmark, case, impl, mode, dtype):
    gpu.pytest_benchmark(benchmark, case, impl, mode, dtype)
