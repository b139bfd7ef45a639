"""Fused residual add + LayerNorm / RMSNorm at model shapes (fastattn.perf.cases: ViT-B/16 and ViT-L/16 at 224 px
with batch 64, i.e. 64 x 197 = 12608 token rows of 768 / 1024, one ViT-B/16 image of 197 rows, and an LLM layer of
4096 tokens x 4096, LayerNorm and RMSNorm): forward, backward and forward+backward of
``fastattn.add_layer_norm`` / ``add_rms_norm`` (both outputs, ``out`` and ``residual_out``, used downstream as in a
pre-norm block) against the eager reference (``x + residual`` then ``F.layer_norm`` / ``F.rms_norm``) and
torch.compile of it.

    pytest bench/bench_layer_norm.py --benchmark-only [--bench-dtypes fp16,bf16]

Reported in GB/s of the bytes the fused op must move (forward: read x, residual, weight, bias, write out,
residual_out and the fp32 per-row statistics; backward: read dout, d residual_out, residual_out, weight and the
statistics, write dx = dresidual, dweight, dbias), the same numerator for every implementation, so the ratio of
two GB/s figures is the speed-up. Timing is ``triton.testing.do_bench`` (median, 20/80 quantiles in ``extra_info``
with GB/s, the ratio to eager and the peak memory); pytest-benchmark's own columns time synchronised rounds.
"""

import pytest

from fastattn.perf import gpu

PARAMS = gpu.pytest_params("layer_norm")


@pytest.mark.parametrize("case, impl, mode", PARAMS)
def test_layer_norm(benchmark, case, impl, mode, dtype):
    gpu.pytest_benchmark(benchmark, case, impl, mode, dtype)
