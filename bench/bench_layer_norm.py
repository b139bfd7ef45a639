"""Fused add + LayerNorm / RMSNorm against eager ``x + residual`` then ``F.layer_norm`` / ``F.rms_norm`` on a GPU.

Pre-norm residual stream (``out, residual_out = add_layer_norm(x, residual, w, b)``, both used downstream), timed
with ``triton.testing.do_bench`` (median, 20/80 quantiles) for forward, backward and forward+backward. Reported in
GB/s of the bytes the fused op must move (forward: read x, residual, write out, residual_out; backward: read dout,
d residual_out, residual_out, write dx = dresidual), the same numerator for both implementations, so the ratio is
the speed-up. Also the peak memory of one forward+backward. Run: ``pytest bench/bench_layer_norm.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton

import fastattn

if not torch.cuda.is_available():
    pytest.skip("the layer-norm benchmarks need a CUDA GPU", allow_module_level=True)

SHAPES = {  # (rows, hidden)
    "vit_b_197x768_b64": (64 * 197, 768),
    "vit_l_197x1024_b64": (64 * 197, 1024),
    "vit_b_197x768_b1": (197, 768),
    "llm_4096x4096": (4096, 4096),
}
PASSES = ("fwd", "bwd", "fwd+bwd")


def _eager(x, r, w, b, rms):
    z = x + r
    out = F.rms_norm(z, (z.size(-1),), w, 1e-6) if rms else F.layer_norm(z, (z.size(-1),), w, b, 1e-5)
    return out, z


def _fused(x, r, w, b, rms):
    if rms:
        return fastattn.add_rms_norm(x, r, w, 1e-6)
    return fastattn.add_layer_norm(x, r, w, b, 1e-5)


def _bytes(rows: int, n: int, dtype: torch.dtype, which: str) -> int:
    e = torch.empty((), dtype=dtype).element_size()
    fwd, bwd = 4 * rows * n * e, 4 * rows * n * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[which]


def _runner(fn, inputs, which):
    x, r, w, b = inputs
    params = [t for t in (x, r, w, b) if t is not None]
    gy, gz = torch.randn_like(x), torch.randn_like(x)

    def fwd():
        return fn(x, r, w, b)

    def grad(out, res):
        return torch.autograd.grad([out, res], params, [gy, gz], retain_graph=True)

    if which == "fwd":
        return fwd
    if which == "bwd":
        out, res = fwd()
        return lambda: grad(out, res)
    return lambda: grad(*fwd())


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_add_norm(benchmark, shape, dtype, rms, which):
    rows, n = SHAPES[shape]
    dev = torch.device("cuda")
    x = torch.randn(rows, n, device=dev, dtype=dtype, requires_grad=True)
    r = torch.randn(rows, n, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
    b = None if rms else torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
    nbytes = _bytes(rows, n, dtype, which)
    info = {"shape": shape, "rows": rows, "hidden": n, "dtype": str(dtype), "norm": "rms" if rms else "layer",
            "pass": which, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__}
    for label, impl in (("eager", _eager), ("fastattn", _fused)):
        fn = _runner(lambda *a, impl=impl: impl(*a, rms), (x, r, w, b), which)
        med, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        info[f"{label}_ms"] = med
        info[f"{label}_ms_q20_q80"] = (lo, hi)
        info[f"{label}_gbps"] = nbytes / (med * 1e-3) / 1e9
        info[f"{label}_peak_mb_fwd_bwd"] = _peak_bytes(_runner(lambda *a, impl=impl: impl(*a, rms), (x, r, w, b),
                                                               "fwd+bwd")) / 2**20
    info["speedup"] = info["eager_ms"] / info["fastattn_ms"]
    benchmark.extra_info.update(info)
    benchmark.group = f"{shape} {info['dtype']} {info['norm']} {which}"
    fused = _runner(lambda *a: _fused(*a, rms), (x, r, w, b), which)
    benchmark.pedantic(lambda: (fused(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
