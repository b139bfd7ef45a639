"""The ``fastattn`` command and its measuring machinery (``fastattn.perf``) on a CPU.

``inspect --json --dump`` on a few configs, ``bench``'s CPU report in ``--quick`` mode, the GPU runner against a
CPU stand-in for the device (so its bookkeeping is exercised without a GPU), the memory / traffic tracer on
shapes whose answers are known, and ``pytest bench/`` collecting and skipping without a GPU.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn import _runtime, hwfit
from fastattn.ops import OPS
from fastattn.ops import _common as common
from fastattn.perf import blocks, cases, gpu, memory, plots, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIT_FIELDS = {"op", "kernel", "variant", "config", "arch", "registers", "spill_stores", "local_bytes", "shared_bytes",
              "hmma", "hgmma", "occupancy", "needs_tensor_cores", "ok", "problems", "loop_instructions", "loop_mma",
              "issues_per_kflop", "ceiling", "loop_note"}


def _cli(args: list[str], tmp_path, timeout: int = 400) -> subprocess.CompletedProcess:
    """``python -m fastattn.cli ARGS`` as a user runs it: no interpreter switch. The compile cache is the one the
    suite shares (``$FASTATTN_CACHE_DIR`` or ``~/.cache/fastattn``; tests/test_hwfit.py fills it): content-keyed, so
    a spec compiled there is not compiled again, and any change to what is compiled misses it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastattn.cli", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=timeout, check=False)


def test_every_op_has_benchmark_cases():
    missing = [op for op in OPS if op not in cases.available_ops()]
    assert not missing, f"ops without a @register function in fastattn/perf/cases.py: {missing}"
    for op in OPS:
        for suite in cases.SUITES:
            got = cases.get(op, suite)
            assert got, f"{op} has no {suite!r} cases"
            assert len({c.label for c in got}) == len(got), f"{op} {suite}: labels repeat"
            for c in got:
                assert c.op == op and c.kernels and c.min_bytes is not None, c.name
                fwd, bwd = c.min_bytes(torch.float16)
                assert 0 < fwd and (0 < bwd or c.modes == ("fwd",)), c.name  # inference-only ops: no backward
                assert c.work("fwd", torch.float16)[1] in ("TFLOP/s", "GB/s"), c.name
    # the units the issue asks for: GEMMs in TFLOP/s, memory-bound ops in GB/s
    assert {op: cases.get(op, "gpu")[0].work("fwd", torch.float16)[1] for op in OPS} == {
        "attention": "TFLOP/s", "patch_embed": "TFLOP/s", "layer_norm": "GB/s", "batch_norm": "GB/s",
        "merge_attention": "GB/s", "kvcache": "GB/s", "varlen": "TFLOP/s"}


def test_inspect_json_and_dump(tmp_path):
    from fastattn.kernels import attention_configs

    dump = tmp_path / "cubins"
    res = _cli(["inspect", "--json", "--ops", "attention", "--arch", "80", "--filter", "_attn_fwd float16 D<=64 plain",
                "--dump", str(dump), "--workers", "1"], tmp_path)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    # the tiles a plain fp16 forward takes on sm_80 for head dims 33..64
    tiles = attention_configs.tiles_for("_attn_fwd", 2, "ieee", 64, "plain", arch=80)
    assert len(rows) == len(tiles) >= 1, rows
    for r in rows:
        assert FIT_FIELDS <= set(r), set(r) ^ FIT_FIELDS
        assert (r["kernel"], r["variant"], r["arch"]) == ("_attn_fwd", "float16 D<=64 plain", 80)
        assert r["ok"] and r["problems"] == [] and r["spill_stores"] == 0 and r["local_bytes"] == 0
        assert r["registers"] > 0 and 0 < r["occupancy"] <= 1 and r["shared_bytes"] > 0
        assert r["needs_tensor_cores"] and r["hmma"] > 0 and r["hgmma"] == 0
        # the issue-slot ceiling of the key loop: 2 GEMMs of BLOCK_M x BLOCK_N x 64 per iteration, 2048 FLOP/cycle
        bm, bn, warps = (int(x) for x in re.fullmatch(r"BLOCK_M(\d+)-BLOCK_N(\d+)-w(\d+)-s\d+", r["config"]).groups())
        assert 0 < r["loop_mma"] <= r["hmma"] < r["loop_instructions"], r
        assert r["issues_per_kflop"] == pytest.approx(1000 * r["loop_instructions"] * warps / (4 * bm * bn * 64))
        assert r["ceiling"] == pytest.approx(min(1.0, 4 / (r["issues_per_kflop"] / 1000 * 2048)))
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
    # quick: the first model case of every op, and the first block with every pattern fused
    assert {r["case"].split()[0] for r in mem if r["kind"] == "op"} == set(OPS)
    block = {r["impl"]: r for r in mem if r["kind"] == "block"}
    assert block["fastattn"]["note"].startswith("fused: layer_norm, add_layer_norm, attention"), block
    with open(out / "agreement.csv") as f:
        agreement = list(csv.DictReader(f))
    assert agreement and all(r["ok"] == "True" and r["kernels_ran"] == "True" for r in agreement)
    assert {r["case"].split()[0] for r in agreement} == set(OPS)
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


@pytest.mark.parametrize("op,which", [("layer_norm", 0), ("patch_embed", 0), ("batch_norm", 0), ("batch_norm", -1),
                                      ("merge_attention", 0), ("kvcache", 0), ("varlen", 0)],
                         ids=["layer_norm", "patch_embed", "batch_norm", "batch_norm_act-silu", "merge_attention",
                              "kvcache", "varlen"])
def test_gpu_runner_on_every_op(monkeypatch, op, which):
    _cpu_standin(monkeypatch)
    case = cases.get(op, "small")[which]
    with fastattn.record_launches() as launches:
        rows = gpu.run_case(case, torch.float32, with_compile=False)
    missing = [k for k in case.kernels if launches[k] == 0]
    assert not missing, f"kernels that did not run: {missing} ({dict(launches)})"
    impls = {"eager", "fastattn", *case.baselines}
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in impls for m in case.modes}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    for r in rows:
        work, unit = case.work(r["mode"], torch.float32)
        scale = 1e12 if unit == "TFLOP/s" else 1e9
        assert r["unit"] == unit == ("TFLOP/s" if op in ("patch_embed", "varlen") else "GB/s")
        assert r["throughput"] == pytest.approx(work / (r["ms"] * 1e-3) / scale)
    if op == "patch_embed":  # forward 2*B*N*K*D; backward the dW GEMM (dimages not asked for here)
        d = case.dims
        gemm = 2.0 * d["B"] * d["N"] * 3 * d["P"] ** 2 * d["D"]
        assert not d["dimages"] and case.work("fwd", torch.float32)[0] == gemm == case.work("bwd", torch.float32)[0]
        assert "unfold + linear" in impls


def test_gpu_runner_decode_forward_only(monkeypatch, tmp_path):
    """An inference-only op: forward rows only, GB/s of the cache read, torch's SDPA decode baseline beside it (and
    flash-attention's where installed), the decode latency plot."""
    from fastattn.perf import cases_kv

    _cpu_standin(monkeypatch)
    case = cases_kv._kvcache_case("decode tiny", 2, 64, H=4, Hkv=2, D=32, suite="gpu")
    assert "torch sdpa" in case.baselines and case.modes == ("fwd",)
    with fastattn.record_launches() as launches:
        rows = gpu.run_case(case, torch.float32, with_compile=False)
    assert launches["_kvcache_attn"] > 0 and launches["_kvcache_append"] > 0
    assert {r["mode"] for r in rows} == {"fwd"} and all(r["status"] == "ok" for r in rows), rows
    assert {r["impl"] for r in rows} == {"eager", "fastattn", *case.baselines}
    fused = next(r for r in rows if r["impl"] == "fastattn")
    assert fused["unit"] == "GB/s" and fused["throughput"] == pytest.approx(
        case.min_bytes(torch.float32)[0] / (fused["ms"] * 1e-3) / 1e9)
    inputs = case.make(torch.device("cpu"), torch.float32)
    ref = inputs.cast(torch.float32).call(case.eager)
    torch.testing.assert_close(inputs.cast(torch.float32).call(case.baselines["torch sdpa"]), ref)
    pytest.importorskip("matplotlib")
    names = sorted(os.path.basename(p) for p in plots.gpu(rows, str(tmp_path), "CPU stand-in"))
    assert names == ["kvcache_decode_latency.png", "kvcache_speedup.png"]


def test_end_to_end_step_on_tiny_models(monkeypatch):
    _cpu_standin(monkeypatch)

    def tiny_vit(ops, device, dtype):
        model = blocks.construct(lambda: blocks.ViT(ops, image=32, patch=8, dim=32, depth=1, heads=2, classes=10),
                                 device, torch.float32)
        return model, torch.randn(2, 3, 32, 32, device=device)

    tiny = blocks.Workload("tiny ViT", "B=2 32px", blocks.ViT.patterns, tiny_vit, batch=2, classes=10)
    rows = gpu.run_end_to_end(torch.bfloat16, workloads=[tiny])  # under autocast, as on a GPU
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"eager", "torch sdpa", "fastattn"}
    assert all(r["status"].startswith("ok") and r["unit"] == "images/s" for r in rows), rows
    assert "fused: patch_embed, layer_norm, add_layer_norm, attention" in by["fastattn"]["status"]
    assert by["fastattn"]["throughput"] == pytest.approx(2 / (by["fastattn"]["ms"] * 1e-3))


def test_patched_torchvision_training_step(monkeypatch):
    """The end-to-end rows of torchvision models, eager vs fastattn.patch (tiny models standing in for the real)."""
    torchvision = pytest.importorskip("torchvision")
    _cpu_standin(monkeypatch)
    vit = ("tiny ViT", lambda: torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1,
                                                                    num_heads=2, hidden_dim=32, mlp_dim=64,
                                                                    num_classes=10))
    effnet = torchvision.models.efficientnet
    tiny_effnet = ("tiny EfficientNet", lambda: effnet.EfficientNet(
        [effnet.MBConvConfig(1, 3, 1, 8, 8, 1), effnet.MBConvConfig(2, 3, 2, 8, 8, 2)], 0.2, num_classes=10))
    with fastattn.record_launches() as launches:
        rows = gpu.run_patched_models(torch.float32, quick=True, models=[vit, tiny_effnet], image=16, classes=10)
    assert [r["impl"] for r in rows] == ["eager", "fastattn.patch"] * 2
    assert all(r["status"] == "ok" and r["unit"] == "images/s" and r["ms"] > 0 for r in rows), rows
    assert launches["_attn_fwd"] > 0 and launches["_pe_fwd"] > 0  # the patched runs used the fused kernels
    assert launches["_bn_fwd_apply"] > 0 and launches["_bn_bwd_dx"] > 0


def _fused_and_eager(make, x):
    torch.manual_seed(0)
    eager, fused = make(blocks.EAGER_OPS), make(blocks.FUSED_OPS)
    fused.load_state_dict(eager.state_dict())
    outs = []
    for model in (eager, fused):
        with fastattn.record_launches() as launches:
            out = model(x)
            out.backward(torch.ones_like(out))
        outs.append(out)
    for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    return eager, fused, launches


def test_blocks_fused_and_eager_agree():
    assert blocks.fused_patterns(blocks.ViT.patterns) == ["patch_embed", "layer_norm", "add_layer_norm", "attention"]
    assert blocks.fused_patterns(blocks.Bottleneck.patterns) == ["bn_relu", "bn_add_relu"]
    assert blocks.fused_patterns(blocks.ViT.patterns, blocks.TORCH_SDPA_OPS) == ["attention"]
    _, _, launches = _fused_and_eager(
        lambda ops: blocks.ViT(ops, image=32, patch=8, dim=48, depth=2, heads=3, classes=7), torch.randn(2, 3, 32, 32))
    # 2 blocks: ln1 and the add + ln2 junction each; the final norm; one patch embedding
    assert (launches["_pe_fwd"], launches["_attn_fwd"], launches["_layer_norm_fwd"]) == (1, 2, 5), dict(launches)
    assert launches["_pe_bwd_dw"] == 1 and launches["_attn_bwd_dq"] == 2 and launches["_layer_norm_bwd"] == 5
    eager, fused, launches = _fused_and_eager(lambda ops: blocks.Bottleneck(8, 4, 2, ops), torch.randn(2, 8, 6, 5))
    assert launches["_bn_fwd_apply"] == 3 and launches["_bn_bwd_dx"] == 3, dict(launches)  # bn1, bn2, bn3
    for name, buf in eager.named_buffers():  # running statistics and batch counts, downsample's BN included
        torch.testing.assert_close(dict(fused.named_buffers())[name], buf, atol=1e-5, rtol=1e-5, msg=name)
    assert blocks.ResNet50(blocks.EAGER_OPS, classes=5)(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert blocks.fused_patterns(blocks.MBConv.patterns) == ["bn_act", "bn_add"]
    _, _, launches = _fused_and_eager(lambda ops: blocks.MBConv(8, 3, 3, ops), torch.randn(2, 8, 6, 5))
    assert launches["_bn_fwd_apply"] == 3 and launches["_bn_bwd_dx"] == 3, dict(launches)  # bn1, bn2, bn3 + add
    _, _, launches = _fused_and_eager(lambda ops: blocks.ConvNeXtStage(8, 16, ops), torch.randn(2, 8, 6, 6))
    assert launches["_layer_norm_fwd"] == 2 and launches["_layer_norm_bwd"] == 2, dict(launches)


# -- gpu-check, with the CPU standing in for the device ---------------------------------------------------------


def test_gpu_check_standin_writes_results_and_fails_on_any_step(monkeypatch, tmp_path):
    from fastattn.perf import gpucheck

    _cpu_standin(monkeypatch)
    outcome = {f: 0 for f in gpucheck.TEST_FILES}
    calls = []

    def fake_pytest(files, env, log_dir, timeout_s, parallel):  # stands in for run_pytest_files
        calls.append((list(files), env.get("FASTATTN_TEST_DEVICE"), "TRITON_INTERPRET" in env))
        rows = []
        for f in files:
            log = os.path.join(log_dir, f"gpu-check-pytest-{os.path.basename(f)}.log")
            with open(log, "w") as fh:
                fh.write("3 passed\n" if outcome[f] == 0 else "1 failed, 2 passed\n")
            rows.append({"file": f, "rc": outcome[f], "seconds": 0.1, "summary": "x", "log": log})
        return rows

    work = [(cases.get("layer_norm", "small")[0], torch.float16)]

    def check(name: str) -> tuple[int, str]:
        out = tmp_path / name
        monkeypatch.setenv("OUT", str(tmp_path / f"{name}-OUT"))
        rc = gpucheck.run(out_dir=str(out), ops=["layer_norm"], dtype=torch.float32, suite="small", skip=["e2e"],
                          agreement_work=work, test_runner=fake_pytest)
        return rc, (out / "gpu-check.log").read_text()

    with fastattn.record_launches() as launches:
        rc, log = check("ok")
    assert rc == 0, log
    assert calls == [(list(gpucheck.TEST_FILES), "cuda", False)]  # the op test files, on CUDA, not interpreted
    assert launches["_layer_norm_fwd"] > 0 and "PASS" in log
    for name in ("gpu-check.csv", "gpu-check-agreement.csv", "gpu-check-tests.csv", "gpu-check.log"):
        assert (tmp_path / "ok" / name).exists() and (tmp_path / "ok-OUT" / name).exists(), name
    with open(tmp_path / "ok" / "gpu-check.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"device", "torch", "triton", "date"} <= set(rows[0])
    assert {r["impl"] for r in rows} >= {"eager", "fastattn"} and all(r["status"] == "ok" for r in rows)

    outcome["tests/test_batch_norm.py"] = 1  # a failing test file
    rc, log = check("tests-fail")
    assert rc == 1 and "tests/test_batch_norm.py" in log.split("## result: FAIL")[1]

    outcome["tests/test_batch_norm.py"] = 0

    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(cases, "_layer_norm_case", broken)
    rc, log = check("bench-error")  # an error in a step fails the run; the other steps still run
    assert rc == 1 and "bench: ValueError: boom" in log
    assert (tmp_path / "bench-error" / "gpu-check-agreement.csv").exists()


def test_gpu_check_pytest_runner_rc_and_timeout(tmp_path):
    from fastattn.perf import gpucheck

    files = {"test_pass.py": "def test_a():\n    pass\n", "test_fail.py": "def test_a():\n    assert False\n",
             "test_slow.py": "import time\n\ndef test_a():\n    time.sleep(60)\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows = gpucheck.run_pytest_files([str(tmp_path / n) for n in files], env, str(tmp_path), timeout_s=20, parallel=3)
    got = {os.path.basename(r["file"]): r for r in rows}
    assert got["test_pass.py"]["rc"] == 0 and "1 passed" in got["test_pass.py"]["summary"]
    assert got["test_fail.py"]["rc"] == 1 and "1 failed" in got["test_fail.py"]["summary"]
    assert got["test_slow.py"]["rc"] is None and "timed out" in got["test_slow.py"]["summary"]
    assert all(os.path.exists(r["log"]) for r in rows)


# Failure messages of a test that mixed devices (torch's, torch.testing's, fastattn's own check).
_MIXED_DEVICES = re.compile(r"not on the expected device|same device|must be on one device|attribute 'device' do not "
                            r"match|fused ops ran on")


def test_gpu_check_test_files_put_their_inputs_on_the_test_device(tmp_path):
    """gpu-check's test step runs the op test files with FASTATTN_TEST_DEVICE=cuda. Here ``meta`` stands in for the
    GPU: the files run (and mostly fail: meta tensors hold no values, and the kernels do not launch on them) while
    tests/conftest.py records the devices every test's fused op calls dispatched on (JUnit property
    ``op_devices``). A test that built its inputs on the CPU would show ``cpu`` there (on a GPU: the eager fallback,
    nothing checked) or fail for mixing devices."""
    from fastattn.perf import gpucheck

    xml = tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTATTN_TEST_DEVICE"] = "meta"
    res = subprocess.run([sys.executable, "-m", "pytest", *gpucheck.TEST_FILES, "-q", "-p", "no:cacheprovider",
                          "-p", "no:xdist", f"--junitxml={xml}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900, check=False)
    assert xml.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    on_meta, wrong = {}, []
    for case in ET.parse(xml).getroot().iter("testcase"):
        devices = {p.get("value") for p in case.iter("property") if p.get("name") == "op_devices"}
        failed = [f.get("message") or "" for f in (*case.iter("failure"), *case.iter("error"))]
        name = f"{case.get('classname')}::{case.get('name')}"
        if devices - {"", "meta"} or any(_MIXED_DEVICES.search(m) for m in failed):
            wrong.append((name, devices, [m[:200] for m in failed]))
        module = case.get("classname").rsplit(".", 1)[-1]
        on_meta[module] = on_meta.get(module, 0) + (devices == {"meta"})
    assert not wrong, wrong
    files = {os.path.splitext(os.path.basename(f))[0] for f in gpucheck.TEST_FILES}
    assert set(on_meta) == files and all(on_meta[f] > 0 for f in files), on_meta  # the ops really saw the device


def test_gpu_check_benchmark_inputs_are_made_on_the_device():
    """The agreement and bench steps make their inputs with each case's ``make(device, dtype)``, the end-to-end steps
    with ``Workload.build``: on the device given (``meta`` here), every tensor. (batch_norm's small cases move inputs
    off the ReLU's kink by their values, which meta tensors lack; their ``make`` is the others'.)"""
    meta = torch.device("meta")
    made = 0
    for op in cases.available_ops():
        for case in (c for suite in ("small", "quick", "check") for c in cases.get(op, suite)):
            if op == "batch_norm" and "small" in case.name:
                continue
            inputs = case.make(meta, torch.float16)
            tensors = [a for a in (*inputs.args, *inputs.kwargs.values()) if isinstance(a, torch.Tensor)]
            assert tensors and all(t.device == meta for t in tensors), case.name
            made += 1
    assert made >= len(cases.available_ops())
    for workload in blocks.end_to_end(16, 32):
        model, x = workload.build({}, meta, torch.float16)
        assert x.device == meta and {t.device for t in (*model.parameters(), *model.buffers())} == {meta}


def test_gpu_check_without_gpu_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu-check would run")
    res = _cli(["gpu-check"], tmp_path, timeout=120)
    assert res.returncode == 2 and "no CUDA GPU" in res.stderr and not res.stdout


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
    # a fresh pytest: not an xdist worker (pytest-benchmark disables itself under xdist, clashing with
    # --benchmark-only), no interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}
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


@pytest.mark.parametrize("op", ["layer_norm", "patch_embed", "batch_norm"])
def test_fused_ops_measured_at_model_shapes(op):
    case = cases.get(op, "model")[0]
    fused = memory.measure_call(case.make, case.fused, torch.float16)
    eager = memory.measure_call(case.make, case.eager, torch.float16)
    assert case.check_saved(case, fused.saved) is None
    fwd_min, bwd_min = case.min_bytes(torch.float16)
    inputs = case.make(torch.device("meta"), torch.float16)
    x = inputs.args[0]
    x_bytes = x.numel() * x.element_size()
    if op == "batch_norm":  # the statistics pass reads x once more than the minimum, and the fp64 batch mean it
        # hands to the normalising op is 4 bytes per channel wider than the fp32 statistics the minimum counts
        channels = x.shape[1]
        assert case.dims["train"] and fused.traffic["fwd"] == fwd_min + x_bytes + 2 * 4 * channels
    else:
        assert fused.traffic["fwd"] == fwd_min
    assert eager.traffic["fwd"] + eager.traffic["bwd"] > fwd_min + bwd_min
    if op == "patch_embed":  # allocates nothing but its gradients: the peak is eager's (inputs, tokens and gradients)
        assert fused.scratch_bytes == 0 and fused.peak_bytes <= eager.peak_bytes
    else:  # the kernel scratch the fake implementations leave out is counted in the peak
        expected = {"layer_norm": "fastattn::add_layer_norm_backward", "batch_norm": "fastattn::batch_norm_stats"}[op]
        assert fused.scratch_bytes > 0 and expected in cases.SCRATCH
    if op == "layer_norm":  # residual_out, the weight and fp32 mean and rstd per row; eager keeps as much
        assert {s.role for s in fused.saved} == {"output", "input weight", "intermediate"}
        assert fused.saved_bytes == x_bytes + 2 * case.dims["N"] + 2 * 4 * case.dims["rows"]
        assert abs(fused.saved_bytes - eager.saved_bytes) < 0.01 * x_bytes
    elif op == "patch_embed":  # the images and the weight, as eager's convolution
        assert {s.role for s in fused.saved} == {"input images", "input weight"}
        assert fused.saved_bytes == eager.saved_bytes
    else:  # x, out, the fp32 weight, bias and rstd and the fp64 per-channel mean
        assert fused.saved_bytes == 2 * x_bytes + (3 * 4 + 8) * case.dims["C"]


class _Allocations(TorchDispatchMode):
    """Storages created by factory ops (empty, zeros, ...) while a launcher runs."""

    FACTORIES = ("aten::empty", "aten::zeros", "aten::empty_like", "aten::zeros_like", "aten::new_empty",
                 "aten::new_zeros", "aten::empty_strided", "aten::new_empty_strided")

    def __init__(self):
        super().__init__()
        self.made = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name in self.FACTORIES:
            s = out.untyped_storage()
            self.made[s.data_ptr()] = s.nbytes()
        return out


def _scratch_of(launcher, *args) -> tuple[int, tuple]:
    """Bytes a launcher allocates beyond the tensors it returns, and what it returned."""
    with _Allocations() as rec:
        outs = launcher(*args)
    returned = {t.untyped_storage().data_ptr() for t in outs}
    return sum(n for ptr, n in rec.made.items() if ptr not in returned), outs


def test_scratch_matches_the_launchers():
    """SCRATCH's formulas against what each launcher really allocates (the interpreter, with the launchers' own CPU
    choice of programs / splits / partials plugged in), and their GPU programs against the launchers' CUDA branch."""
    from fastattn.ops import batch_norm as bn_ops
    from fastattn.ops import layer_norm as ln_ops
    from fastattn.ops import patch_embed as pe_ops

    cpu = torch.device("cpu")
    for rows, n in ((37, 200), (10, 1500)):  # the tile path and the looped path
        z, dy = torch.randn(rows, n), torch.randn(rows, n)
        w, stat = torch.randn(n), torch.rand(rows) + 0.5
        args = (dy, None, z, w, stat, stat, 0.0, None, False, torch.float32, None, True, torch.float32)
        got, _ = _scratch_of(ln_ops._backward, dy, None, z, w, stat, stat, 0.0, 0, False, torch.float32, None, True,
                             torch.float32)
        assert got == cases._layer_norm_backward_scratch(args, {}, sms=ln_ops.device_sms(cpu)) > 0

    # patch_embed allocates nothing but its gradients (no SCRATCH entry): with dimages, its split-K partials sit in
    # the dimages buffer; without, one range per tile. 72 tokens, 8 features: 4 ranges on the interpreter's device.
    images, weight = torch.randn(3, 3, 32, 48), torch.randn(8, 3, 8, 8)
    for need_dx, need_dw in itertools.product((True, False), (True, False)):
        with _runtime.record_launches() as n:
            got, _ = _scratch_of(pe_ops._backward, torch.randn(3, 25, 8), images, weight, 25, True, torch.float32,
                                 torch.float32, need_dx, need_dw, True, True, True)
        sched = pe_ops.dw_schedule(72, 192, 8, room=images.numel() * 4 if need_dx else 0, acc_bytes=4, dw=need_dw,
                                   sms=common.sm_count(cpu), cuda=False)
        assert got == 0 and "fastattn::patch_embed_backward" not in cases.SCRATCH
        assert n["_pe_bwd_reduce"] == int(need_dx) == int(sched.split > 1)

    x, identity = torch.randn(3, 5, 7, 9), torch.randn(3, 5, 7, 9)
    rm, rv, w, b = torch.zeros(5), torch.ones(5), torch.rand(5) + 0.5, torch.randn(5)

    def partials(M, C):
        return bn_ops._num_partials(M, C, cpu)
    got, (mean, rstd) = _scratch_of(bn_ops._stats, x, rm, rv, None, 0.1, 1e-5)
    assert got == cases._batch_norm_stats_scratch((x, rm, rv, None, 0.1, 1e-5), {}, partials=partials) > 0
    out = bn_ops._apply(x, identity, mean, rstd, w, b, True, 1e-5, "relu", 0.0)
    for shape, need_dx in (((3, 5, 7, 9), True), ((3, 5, 7, 9), False), ((2, 5, 1, 1), True)):
        # training with dx: the partial sums live in dx's buffer where it holds them (not for 2 values per channel)
        xs = torch.randn(shape)
        args = (torch.randn_like(xs), xs, bn_ops._apply(xs, None, mean, rstd, w, b, True, 1e-5, "relu", 0.0), None,
                mean, rstd, w, b, True, 1e-5, "relu", 0.0, need_dx, False, True, True)
        got, _ = _scratch_of(bn_ops._backward, *args)
        assert got == cases._batch_norm_backward_scratch(args, {}, partials=partials) > 0
    assert out.shape == x.shape


def test_scratch_programs_match_the_cuda_launchers(monkeypatch):
    """The GPU sizes of SCRATCH (programs, partial sums) equal the launchers' CUDA branch on a device
    that reports cases.SCRATCH_SMS SMs."""
    from fastattn.ops import batch_norm as bn_ops
    from fastattn.ops import layer_norm as ln_ops

    class Props:
        multi_processor_count = cases.SCRATCH_SMS

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: Props())
    cuda = torch.device("cuda")
    assert ln_ops.device_sms(cuda) == cases.SCRATCH_SMS  # SCRATCH calls the schedule with the GPU's SM count
    for M, C in ((64 * 3136, 256), (256 * 49, 2048), (10, 3), (2**22, 64)):
        assert bn_ops._num_partials(M, C, cuda) == cases._batch_norm_partials(M, C, cases.SCRATCH_SMS)
