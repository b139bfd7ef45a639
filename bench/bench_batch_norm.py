"""Fused BatchNorm + add + ReLU against eager ``relu(F.batch_norm(x) + identity)`` at the ResNet-50 block tails.

Run on a GPU: ``python -m pytest bench/bench_batch_norm.py --benchmark-only`` (skipped where there is no CUDA
device). Each case times ours and eager PyTorch in the same run with ``triton.testing.do_bench`` (median and the
20/80 quantiles, in ms) and reports the effective bandwidth from the bytes the op must move, once each:
forward x, identity and out; backward dy, out and x read, dx and didentity written. pytest-benchmark's own timing
(``benchmark.pedantic``) is of ours; the comparison with eager, the GB/s and the peak memory of a forward+backward
are in ``extra_info`` (``--benchmark-json`` keeps them).
"""

from __future__ import annotations

import pytest
import torch
import triton.testing

import fastattn
from fastattn import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the benchmarks need a CUDA GPU")

# ResNet-50 stage outputs (the conv3 + bn3 + add + relu of every Bottleneck): (channels, spatial size).
STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
BATCHES = [64, 256]
CASES = [(n, c, s) for n in BATCHES for c, s in STAGES]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# (name, training, what is timed)
MODES = [("train_fwd", True, "fwd"), ("train_bwd", True, "bwd"), ("train_fwd_bwd", True, "fwd_bwd"),
         ("eval_fwd", False, "fwd")]


def _inputs(n, c, s, dtype, fmt, training):
    x = torch.randn(n, c, s, s, device="cuda", dtype=dtype).to(memory_format=fmt).requires_grad_(training)
    identity = torch.randn_like(x).requires_grad_(training)
    weight = torch.rand(c, device="cuda", requires_grad=training)
    bias = torch.randn(c, device="cuda", requires_grad=training)
    running = (torch.zeros(c, device="cuda"), torch.ones(c, device="cuda"))
    return x, identity, weight, bias, running


def _runner(fn, what, x, identity, weight, bias, running, training):
    rm, rv = running
    grad = torch.randn_like(x)

    def fwd():
        return fn(x, identity, rm, rv, weight, bias, training, 0.1, 1e-5)

    if what == "fwd":
        return fwd, None
    if what == "fwd_bwd":
        def fwd_bwd():
            fwd().backward(grad)
        return fwd_bwd, [x, identity, weight, bias]
    out = fwd()

    def bwd():
        out.backward(grad, retain_graph=True)
    return bwd, [x, identity, weight, bias]


def _bytes(x, what):
    t = x.numel() * x.element_size()
    fwd, bwd = 3 * t, 5 * t  # fwd: x, identity, out; bwd: dy, out, x, dx, didentity
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[what]


def _time(fn, grad_to_none):
    ms, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    return ms, lo, hi


@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[f"{n}x{c}x{s}x{s}" for n, c, s in CASES])
def test_batch_norm_add_relu(benchmark, case, dtype, layout, mode):
    n, c, s = case
    name, training, what = mode
    args = _inputs(n, c, s, DTYPES[dtype], LAYOUTS[layout], training)
    info = {"shape": f"{n}x{c}x{s}x{s}", "dtype": dtype, "layout": layout, "mode": name,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for label, fn in (("eager", reference.batch_norm_add_relu), ("fastattn", fastattn.batch_norm_add_relu)):
        run, grads = _runner(fn, what, *args, training)
        ms, lo, hi = _time(run, grads)
        info[f"{label}_ms"], info[f"{label}_ms_p20"], info[f"{label}_ms_p80"] = ms, lo, hi
        info[f"{label}_gbps"] = _bytes(args[0], what) / ms * 1e-6
        if what == "fwd_bwd":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            info[f"{label}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    info["speedup_vs_eager"] = info["eager_ms"] / info["fastattn_ms"]
    benchmark.extra_info.update(info)
    run, _ = _runner(fastattn.batch_norm_add_relu, what, *args, training)

    def timed():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=3)
