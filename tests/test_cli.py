"""The ``fastattn`` command and its measuring machinery (``fastattn.perf``) on a CPU.

``inspect --json --dump`` on a few configs, ``bench``'s CPU report in ``--quick`` mode, the GPU runner against a
CPU stand-in for the device (so its bookkeeping is exercised without a GPU), the memory / traffic tracer on
shapes whose answers are known, and ``pytest bench/`` collecting and skipping without a GPU.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import fastattn
from fastattn import hwfit
from fastattn.ops import OPS
from fastattn.perf import blocks, cases, gpu, memory, plots, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIT_FIELDS = {"op", "kernel", "variant", "config", "arch", "registers", "spill_stores", "local_bytes", "shared_bytes",
              "hmma", "hgmma", "occupancy", "needs_tensor_cores", "ok", "problems"}


def _cli(args: list[str], tmp_path, timeout: int = 400) -> subprocess.CompletedProcess:
    """``python -m fastattn.cli ARGS`` as a user runs it: no interpreter switch, an empty cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTATTN_CACHE_DIR"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, "-m", "fastattn.cli", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=timeout, check=False)


def test_every_op_has_benchmark_cases():
    missing = [op for op in OPS if op not in cases.available_ops()]
    assert not missing, f"ops without a @register function in fastattn/perf/cases.py: {missing}"
    for op in OPS:
        for suite in cases.SUITES:
            assert cases.get(op, suite), f"{op} has no {suite!r} cases"


def test_inspect_json_and_dump(tmp_path):
    from fastattn.kernels import attention as attn_kernels

    dump = tmp_path / "cubins"
    res = _cli(["inspect", "--json", "--ops", "attention", "--arch", "80", "--filter", "_attn_fwd float16 D<=64 plain",
                "--dump", str(dump), "--workers", "1"], tmp_path)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    tiles = attn_kernels.TILES["_attn_fwd"]["16"][64]  # the forward's fp16 tiles for head dims 33..64
    assert len(rows) == len(tiles) >= 1, rows
    for r in rows:
        assert FIT_FIELDS <= set(r), set(r) ^ FIT_FIELDS
        assert (r["kernel"], r["variant"], r["arch"]) == ("_attn_fwd", "float16 D<=64 plain", 80)
        assert r["ok"] and r["problems"] == [] and r["spill_stores"] == 0 and r["local_bytes"] == 0
        assert r["registers"] > 0 and 0 < r["occupancy"] <= 1 and r["shared_bytes"] > 0
        assert r["needs_tensor_cores"] and r["hmma"] > 0 and r["hgmma"] == 0
    assert sorted(r["config"] for r in rows) == sorted(f"BLOCK_M{m}-BLOCK_N{n}-w{w}-s{s}" for m, n, w, s in tiles)
    # <kernel function name>-<config>-<arch>.cubin, the config part led by the variant
    names = sorted(os.listdir(dump))
    fields = [n[: -len(".cubin")].split("-") for n in names]
    assert all(len(f) == 3 for f in fields), names
    assert {f[0] for f in fields} == {"_attn_fwd"} and {f[2] for f in fields} == {"sm_80"}
    assert {f[1] for f in fields} == {"float16_Dle64_plain." + r["config"].replace("-", ".") for r in rows}
    usage = subprocess.run([hwfit._bin("cuobjdump"), "-res-usage", str(dump / names[0])], capture_output=True,
                           text=True, check=True).stdout
    assert "Function _attn_fwd" in usage


def test_bench_cpu_report_quick(tmp_path):
    out = tmp_path / "results"
    res = _cli(["bench", "--quick", "--arch", "80", "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
    assert "No CUDA GPU found" in text
    for section in ("## 1. Hardware fit", "## 2. Memory, measured", "## 3. HBM traffic", "## 4. Interpreter agreement"):
        assert section in text, section
    assert "## Problems" not in text
    assert "saves only q, k, v, out and O(L) statistics" in text
    assert re.search(r"\[fastattn\] .*: \d+/\d+", res.stderr), res.stderr  # progress lines
    for name in ("hwfit.csv", "memory.csv", "traffic.csv", "agreement.csv", "report.md"):
        assert (out / name).exists(), name
    with open(out / "memory.csv") as f:
        mem = list(csv.DictReader(f))
    assert {"device", "torch", "triton", "date"} <= set(mem[0])
    attn = {r["impl"]: r for r in mem if r["case"].startswith("attention ViT-B/16")}
    assert int(attn["fastattn"]["saved_bytes"]) * 3 < int(attn["eager"]["saved_bytes"])
    with open(out / "agreement.csv") as f:
        agreement = list(csv.DictReader(f))
    assert agreement and all(r["ok"] == "True" and r["kernels_ran"] == "True" for r in agreement)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "memory.png").stat().st_size > 1000


# -- the GPU runner, with the CPU standing in for the device -------------------------------------------------------


def _cpu_standin(monkeypatch):
    def do_bench(fn, grad_to_none=None, warmup=25, rep=100):
        for x in grad_to_none or ():
            x.grad = None
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return gpu.Timing(ms, 0.9 * ms, 1.1 * ms)

    monkeypatch.setattr(gpu, "DEVICE", "cpu")
    monkeypatch.setattr(gpu, "do_bench", do_bench)
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 << 20)


def _no_kernel(*args, **kwargs):
    raise RuntimeError("No available kernel. Aborting execution.")


def test_gpu_runner_rows_ratios_and_failures(monkeypatch, tmp_path):
    _cpu_standin(monkeypatch)
    case = cases._attention_case("LM tiny", 1, 2, 16, 16, True, suite="small")  # "LM ": drawn in the TFLOP/s plot
    case.baselines = {"torch sdpa unavailable": _no_kernel}
    with fastattn.record_launches() as launches:
        rows = gpu.run_case(case, torch.float32, with_compile=False)
    assert launches["_attn_fwd"] > 0 and launches["_attn_bwd_dq"] > 0
    by = {(r["impl"], r["mode"]): r for r in rows}
    assert set(by) == {(i, m) for i in ("eager", "fastattn", "torch sdpa unavailable") for m in gpu.MODES}
    for mode in gpu.MODES:
        r = by[("fastattn", mode)]
        work, unit = case.work(mode, torch.float32)
        assert r["status"] == "ok" and unit == "TFLOP/s" and r["unit"] == unit
        assert r["throughput"] == pytest.approx(work / (r["ms"] * 1e-3) / 1e12)
        assert r["speedup_vs_eager"] == pytest.approx(by[("eager", mode)]["ms"] / r["ms"])
        assert r["peak_mib"] == 3.0 and r["dim_L"] == 16 and r["dim_causal"] == 1
        assert by[("torch sdpa unavailable", mode)]["status"] == "unsupported (no available kernel)"
    fwd_flops = 4 * 1 * 2 * 16 * 16 * 16 / 2  # 4 B H Lq Lk D, halved when causal
    assert case.work("fwd", torch.float32)[0] == fwd_flops and case.work("bwd", torch.float32)[0] == 2.5 * fwd_flops
    assert gpu.failures(rows) == []
    assert "torch sdpa unavailable" in gpu.table(rows)

    def broken(*args, **kwargs):
        raise ValueError("boom")

    case.fused = broken
    failed = gpu.run_case(case, torch.float32, with_compile=False, impls=("eager", "fastattn"))
    assert gpu.failures(failed) == ["attention LM tiny: error: ValueError: boom"]

    path = report.write_csv(str(tmp_path / "bench.csv"), rows)
    with open(path) as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and {"device", "torch", "triton", "date", "ms_p20", "ms_p80"} <= set(written[0])
    pytest.importorskip("matplotlib")
    pngs = plots.gpu(rows, str(tmp_path), "CPU stand-in")
    assert sorted(os.path.basename(p) for p in pngs) == ["attention_lm_tflops.png", "attention_speedup.png"]


def test_end_to_end_step_on_tiny_models(monkeypatch):
    _cpu_standin(monkeypatch)

    def tiny_vit(ops, device, dtype):
        model = blocks.construct(lambda: blocks.ViT(ops, image=32, patch=8, dim=32, depth=1, heads=2, classes=10),
                                 device, torch.float32)
        return model, torch.randn(2, 3, 32, 32, device=device)

    tiny = blocks.Workload("tiny ViT", "B=2 32px", blocks.ViT.patterns, tiny_vit, batch=2, classes=10)
    rows = gpu.run_end_to_end(torch.float32, workloads=[tiny])
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"eager", "torch sdpa", "fastattn"}
    assert all(r["status"].startswith("ok") and r["unit"] == "images/s" for r in rows), rows
    assert "fused: attention" in by["fastattn"]["status"]
    assert by["fastattn"]["throughput"] == pytest.approx(2 / (by["fastattn"]["ms"] * 1e-3))


def test_blocks_fused_and_eager_agree():
    torch.manual_seed(0)
    eager = blocks.ViT(blocks.EAGER_OPS, image=32, patch=8, dim=48, depth=2, heads=3, classes=7)
    fused = blocks.ViT(blocks.FUSED_OPS, image=32, patch=8, dim=48, depth=2, heads=3, classes=7)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with fastattn.record_launches() as launches:
        out = fused(x)
    assert launches["_attn_fwd"] == 2
    torch.testing.assert_close(out, eager(x), atol=1e-4, rtol=1e-4)
    assert blocks.fused_patterns(blocks.ViT.patterns) == ["attention"]
    assert blocks.fused_patterns(blocks.Bottleneck.patterns) == []
    assert blocks.ResNet50(blocks.EAGER_OPS, classes=5)(torch.randn(1, 3, 64, 64)).shape == (1, 5)


# -- the memory / traffic tracer -------------------------------------------------------------------------------


def test_traffic_counts_each_op_views_free_broadcast_once():
    def setup():
        x = torch.randn(4, 8, requires_grad=True)  # 128 bytes
        y = torch.randn(8)  # 32 bytes

        def forward():
            w = x * y.expand(4, 8)  # expand: a view; mul reads 128 + 32 (stride 0 counted once), writes 128
            return w.t().sum()  # t: a view; sum reads 128, writes 4

        return forward, {"x": x}, []

    m = memory.measure(setup)
    assert m.traffic["fwd"] == (128 + 32 + 128) + (128 + 4)
    assert m.ops_run["fwd"]["aten.expand"] == 1 and m.traffic_by_op["fwd"]["aten.expand"] == 0
    assert m.traffic_by_op["fwd"]["aten.t"] == 0
    # backward: sum's grad expands the seed (a view), mul's grad for x reads seed (4 bytes, broadcast) and y
    assert m.traffic["bwd"] == m.traffic_by_op["bwd"]["aten.mul"] == 4 + 32 + 128
    assert [s.role for s in m.saved] == ["intermediate"]  # mul saves y's expanded view (y is no input here)
    # live: x, y, w, the sum and its seed, then x.grad (w may be freed before x.grad exists)
    assert 128 + 32 + 128 <= m.peak_bytes <= 128 + 32 + 128 + 4 + 4 + 128


def test_fused_attention_measured_at_vit_shape():
    case = cases.get("attention", "model")[0]
    assert case.label.startswith("ViT-B/16")
    B, H, L, D = (case.dims[k] for k in "BHLD")
    fused = memory.measure_call(case.make, case.fused, torch.float16)
    eager = memory.measure_call(case.make, case.eager, torch.float16)
    assert case.check_saved(case, fused.saved) is None
    roles = sorted(s.role for s in fused.saved)
    assert roles == ["input k", "input q", "input v", "intermediate", "output"]
    lse = next(s for s in fused.saved if s.role == "intermediate")
    assert lse.shape == (B, H, L) and lse.dtype == "float32"
    assert fused.saved_bytes == 4 * B * H * L * D * 2 + B * H * L * 4
    assert fused.scratch_bytes == B * H * L * 4  # the backward's delta
    assert fused.traffic["fwd"] == case.min_bytes(torch.float16)[0]
    assert eager.saved_bytes > 3 * fused.saved_bytes and eager.peak_bytes > 3 * fused.peak_bytes
    assert case.check_saved(case, eager.saved) is not None  # eager keeps the (B, H, L, L) scores
    assert eager.traffic["fwd"] > 10 * fused.traffic["fwd"]


def test_pytest_bench_collects_and_skips_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: pytest bench/ would run the benchmarks")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"\d+ skipped", res.stdout) and "error" not in res.stdout.lower(), res.stdout[-2000:]


def test_cli_rejects_unknown_ops_and_archs(capsys):
    from fastattn import cli

    with pytest.raises(SystemExit, match="unknown op"):
        cli.main(["inspect", "--ops", "no_such_op"])
    with pytest.raises(SystemExit):
        cli.main(["inspect", "--arch", "75"])
    assert "--arch" in capsys.readouterr().err
