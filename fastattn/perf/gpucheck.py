"""``fastattn gpu-check`` (``./run.sh gpu-check``): the first thing to run on a CUDA machine, about 8 minutes on one
H100/H200.

1. tests: the op test files (``TEST_FILES``) on the compiled kernels (``FASTATTN_TEST_DEVICE=cuda``: every input on
   the GPU, the CPU-only tests skipped), one pytest process per file, all in parallel (their compiles overlap on the
   host's cores), each within the time limit;
2. agreement: each op's small cases and first quick case (ViT-B/16 attention, ...) fused vs eager in fp16 and bf16
   vs the float64 reference on the GPU, under the test suite's 2x-eager rule (the kernels' launches counted);
3. bench: ``fastattn bench``'s runner on a bounded set (suite ``check``: the quick cases of every op plus LM
   attention at 4k and 8k tokens, no torch.compile baseline, the quick end-to-end steps). The autotuner chooses
   among the shipped tiles only: the kernels' own config lists, pruned per launch.

Writes ``bench/results/<gpu name>/``: ``gpu-check.csv`` (the timings), ``gpu-check-agreement.csv``,
``gpu-check-tests.csv`` (every CSV row carries the GPU name, torch and triton versions and the date),
``gpu-check.log`` and ``gpu-check-pytest-<file>.log``; copies them to ``$OUT`` when it is set. The exit status is 1
when a test fails, a tolerance is missed, a fused kernel did not run or errors, or a step does not finish in time;
``fastattn gpu-check`` returns 2 without a GPU (nothing checked is no pass).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

from fastattn.perf import report

# Their inputs go to FASTATTN_TEST_DEVICE (tests/harness.py's dev()); tests of the CPU itself skip there.
TEST_FILES = ("tests/test_attention.py", "tests/test_layer_norm.py", "tests/test_batch_norm.py",
              "tests/test_patch_embed.py", "tests/test_attention_modifiers.py", "tests/test_attention_packed.py",
              "tests/test_merge_attention.py", "tests/test_kvcache.py")
STEPS = ("tests", "agreement", "bench", "e2e")
# the checkout (an editable install, as run.sh makes); tests/ and bench/ live there, not in an installed package
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Log:
    """Prints each line and appends it to the log file at once, so a run stopped from outside keeps its log."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w"):
            pass

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")


def run_pytest_files(files: Sequence[str], env: dict[str, str], log_dir: str, timeout_s: float,
                     parallel: int = 4) -> list[dict]:
    """``python -m pytest FILE -q`` for each file, ``parallel`` at a time, each killed after ``timeout_s`` seconds
    from its start. One row per file: ``file``, ``rc`` (None when it timed out), ``seconds``, ``summary`` (pytest's
    last line) and ``log`` (its output)."""
    pending, running, rows = list(files), [], []
    while pending or running:
        while pending and len(running) < parallel:
            file = pending.pop(0)
            log = os.path.join(log_dir, f"gpu-check-pytest-{os.path.splitext(os.path.basename(file))[0]}.log")
            with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen([sys.executable, "-m", "pytest", file, "-q", "-p", "no:cacheprovider"],
                                        cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
            running.append((file, log, proc, time.monotonic()))
        time.sleep(0.5)
        for item in list(running):
            file, log, proc, start = item
            late = proc.poll() is None and time.monotonic() - start > timeout_s
            if proc.poll() is None and not late:
                continue
            if late:
                proc.kill()
                proc.wait()
            running.remove(item)
            with open(log) as f:
                lines = [line.strip() for line in f if line.strip()]
            summary = f"timed out after {timeout_s:.0f} s" if late else (lines[-1] if lines else "no output")
            rows.append({"file": file, "rc": None if late else proc.returncode,
                         "seconds": round(time.monotonic() - start, 1), "summary": summary, "log": log})
    return sorted(rows, key=lambda r: list(files).index(r["file"]))


def _agreement_work(ops: Sequence[str]) -> list[tuple]:
    from fastattn.perf import cases

    work = [(c, d) for op in ops for c in cases.get(op, "small") + cases.get(op, "quick")[:1]
            for d in (torch.float16, torch.bfloat16)]
    return work


def run(*, out_dir: str | None = None, ops: Sequence[str] | None = None, dtype: torch.dtype = torch.float16,
        suite: str = "check", skip: Sequence[str] = (), test_files: Sequence[str] = TEST_FILES,
        test_timeout_s: float = 330.0, parallel: int = len(TEST_FILES), agreement_work: Sequence[tuple] | None = None,
        test_runner: Callable[..., list[dict]] = run_pytest_files) -> int:
    """Run the steps (``STEPS`` minus ``skip``) and write the results; returns the exit status (0: all passed).

    The device is ``fastattn.perf.gpu.DEVICE`` (CUDA; the tests point it, the timer and the test runner at
    CPU stand-ins). An error in a step is that step's failure, never the end of the run."""
    from fastattn.perf import cases, cpu, gpu

    missing = [f for f in test_files if not os.path.exists(os.path.join(ROOT, f))]
    if missing and "tests" not in skip:
        raise FileNotFoundError(f"fastattn gpu-check runs from a checkout (./run.sh gpu-check): {', '.join(missing)} "
                                f"not found under {ROOT}")
    env = report.environment()
    out_dir = out_dir or os.path.join(ROOT, "bench", "results", report.device_slug(env["device"]))
    ops = cases.select_ops(ops)
    log = _Log(os.path.join(out_dir, "gpu-check.log"))
    log(f"# fastattn gpu-check on {env['device']} (torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"{env['date']}); results -> {out_dir}")
    failures: list[str] = []
    written: list[str] = [log.path]
    t_start = time.monotonic()

    def step(name: str, fn: Callable[[], None]) -> None:
        if name in skip:
            log(f"\n## {name}: skipped")
            return
        log(f"\n## {name}")
        t0 = time.monotonic()
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - the other steps still run
            failures.append(f"{name}: {type(err).__name__}: {err}")
            log(f"ERROR: {type(err).__name__}: {err}")
        log(f"({name}: {time.monotonic() - t0:.0f} s)")

    def tests() -> None:
        test_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        test_env["FASTATTN_TEST_DEVICE"] = "cuda"
        rows = test_runner(test_files, test_env, out_dir, test_timeout_s, parallel)
        for r in rows:
            log(f"{r['file']}: {'ok' if r['rc'] == 0 else 'FAILED'} in {r['seconds']} s: {r['summary']}")
            written.append(r["log"])
            if r["rc"] != 0:
                failures.append(f"tests: {r['file']}: {r['summary']} (log: {r['log']})")
        written.append(report.write_csv(os.path.join(out_dir, "gpu-check-tests.csv"),
                                        [{k: v for k, v in r.items() if k != "log"} for r in rows], env))

    def agreement() -> None:
        work = agreement_work if agreement_work is not None else _agreement_work(ops)
        rows = cpu.agreement(work, torch.device(gpu.DEVICE), "agreement on the device")
        bad = [r for r in rows if not (r["ok"] and r["kernels_ran"])]
        for r in bad:
            why = "kernels did not run: " + r["missing_kernels"] if not r["kernels_ran"] else \
                f"error {r['err_fastattn']:.3g} > bound {r['bound']:.3g} (2 x eager {r['err_eager']:.3g} + rounding)"
            failures.append(f"agreement: {r['case']} {r['dtype']} {r['tensor']}: {why}")
        log(f"{len(rows) - len(bad)} of {len(rows)} tensors within the 2x-eager rule" +
            "".join(f"\n  FAIL {f}" for f in failures if f.startswith("agreement")))
        written.append(report.write_csv(os.path.join(out_dir, "gpu-check-agreement.csv"), rows, env))

    def bench() -> None:
        rows = gpu.run(ops, dtype, suite=suite, with_compile=False, end_to_end="e2e" not in skip)
        log(gpu.table(rows))
        bad = gpu.failures(rows)
        failures.extend(f"bench: {b}" for b in bad)
        written.append(report.write_csv(os.path.join(out_dir, "gpu-check.csv"), rows, env))

    step("tests", tests)
    step("agreement", agreement)
    step("bench", bench)
    log(f"\n## result: {'PASS' if not failures else 'FAIL'} in {time.monotonic() - t_start:.0f} s")
    for f in failures:
        log(f"- {f}")
    dest = os.environ.get("OUT")
    if dest:
        os.makedirs(dest, exist_ok=True)
        for path in written:
            if os.path.exists(path):
                shutil.copy(path, os.path.join(dest, os.path.basename(path)))
        print(f"copied {len(written)} files to {dest}", flush=True)
    return 1 if failures else 0
