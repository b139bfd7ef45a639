"""Fused BatchNorm + residual add + ReLU at the ResNet-50 block tails (fastattn.perf.cases_bn: stage outputs
256x56x56, 512x28x28, 1024x14x14 and 2048x7x7, batch 64 and 256, training and eval, NCHW and channels_last; weight,
bias and running statistics in fp32): forward, backward and forward+backward of ``fastattn.batch_norm_add_relu``
against the eager reference (``relu(F.batch_norm(x) + identity)``) and torch.compile of it. Eval mode keeps the
gradient flowing to x and identity (fine-tuning with frozen statistics). Also ``fastattn.batch_norm_act`` with SiLU
and no identity at EfficientNet-B0's stage shapes (stem 32x112x112 to head 1280x7x7, batch 64, training) against
``silu(F.batch_norm(x))``.

    pytest bench/bench_batch_norm.py --benchmark-only [--bench-dtypes fp16,bf16]

Reported in GB/s of the bytes the op must move, once each: forward x and identity read, out written; backward dy,
x and out read, dx and didentity written; plus the per-channel parameters and statistics. The same numerator for
every implementation, so the ratio of two GB/s figures is the speed-up (the fused training forward reads x twice:
statistics, then normalisation). Timing is ``triton.testing.do_bench`` (median, 20/80 quantiles in ``extra_info``
with GB/s, the ratio to eager and the peak memory); pytest-benchmark's own columns time synchronised rounds.
"""

import pytest

from fastattn.perf import gpu

PARAMS = gpu.pytest_params("batch_norm")


@pytest.mark.parametrize("case, impl, mode", PARAMS)
def test_batch_norm(benchmark, case, impl, mode, dtype):
    gpu.pytest_benchmark(benchmark, case, impl, mode, dtype)
