"""``fastattn bench`` without a GPU: what is real on this machine, measured, never a timing.

1. Hardware fit: every kernel config compiled for sm_80 / sm_90 (:mod:`fastattn.perf.fit`), with the issue-slot
   ceiling of the attention loops beside minimal reference loops (:mod:`fastattn.perf.ceiling`).
2. Memory: bytes saved for backward and peak live bytes, fused vs eager, per op and for a ViT-B/16 block and a
   ResNet-50 bottleneck at real shapes, traced on FakeTensors (:mod:`fastattn.perf.memory`).
3. Traffic: bytes the eager sequence moves, counted op by op, against the minimum each fused op must move.
4. Interpreter agreement: each op through Triton's interpreter at a small shape against a float64 reference,
   under the 2x-eager rule of the test suite.

Sections 2-4 run in a child process with ``TRITON_INTERPRET=1`` (Triton reads it when the kernels are decorated,
i.e. at import): the interpreter is what section 4 needs, and it is what lets the device policy choose the fused
custom ops for CPU tensors in sections 2-3 (there, under FakeTensorMode, no kernel runs: the ops' fake
implementations give the output sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------------------------
# child: sections 2-4 (run with TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------------------


def _memory_row(kind: str, label: str, shape: str, impl: str, m: Any, note: str = "") -> dict:
    from fastattn.perf.memory import summarize_saved

    return {"kind": kind, "case": label, "shape": shape, "impl": impl, "saved_bytes": m.saved_bytes,
            "peak_bytes": m.peak_bytes, "scratch_bytes": m.scratch_bytes, "traffic_fwd": m.traffic["fwd"],
            "traffic_bwd": m.traffic["bwd"], "note": note,
            "saved": summarize_saved(m.saved) if kind == "op" else f"{len(m.saved)} tensors"}


def _memory_and_traffic(ops: Sequence[str], dtype: torch.dtype, quick: bool) -> tuple[list[dict], list[dict]]:
    from fastattn.perf import blocks, cases, memory
    from fastattn.perf.report import Progress

    op_cases = [c for op in ops for c in cases.get(op, "model")[:1 if quick else None]]
    workloads = blocks.BLOCKS[:1] if quick else blocks.BLOCKS
    progress = Progress("memory and traffic (FakeTensors)", len(op_cases) + len(workloads))
    mem, traffic = [], []
    for case in op_cases:
        eager = memory.measure_call(case.make, case.eager, dtype)
        fused = memory.measure_call(case.make, case.fused, dtype)
        problem = case.check_saved(case, fused.saved) if case.check_saved else None
        mem.append(_memory_row("op", case.name, case.shape, "eager", eager, note=case.eager_note))
        note = problem or case.saved_note
        if fused.scratch_bytes:
            note += f"{'; ' if note else ''}peak includes {fused.scratch_bytes / 2**20:,.1f} MiB kernel scratch"
        mem.append(_memory_row("op", case.name, case.shape, "fastattn", fused, note=note))
        mem[-1]["problem"] = problem
        fwd_min, bwd_min = case.min_bytes(dtype)
        traffic.append({"case": case.name, "shape": case.shape, "eager_fwd": eager.traffic["fwd"],
                            "eager_bwd": eager.traffic["bwd"], "min_fwd": fwd_min, "min_bwd": bwd_min,
                            "fused_fwd": fused.traffic["fwd"], "fused_bwd": fused.traffic["bwd"],
                            "eager_top": _top(eager.traffic_by_op), "fused_ops": _top(fused.traffic_by_op, 6)})
        progress.update(note=case.name)
    for w in workloads:
        fused_here = blocks.fused_patterns(w.patterns)
        for impl, table in (("eager", blocks.EAGER_OPS), ("fastattn", blocks.FUSED_OPS)):
            if impl == "fastattn" and not fused_here:
                mem.append({"kind": "block", "case": w.label, "shape": w.shape, "impl": impl, "saved_bytes": None,
                            "peak_bytes": None, "scratch_bytes": None, "traffic_fwd": None, "traffic_bwd": None,
                            "saved": "", "note": f"no fastattn op serves {', '.join(w.patterns)} yet: same as eager"})
                continue

            def setup(w=w, table=table):
                module, x = w.build(table, torch.device("cpu"), dtype)
                x.requires_grad_(w.input_grad)  # an activation's gradient flows to the layer before
                return (lambda: module(x)), {"x": x}, list(module.parameters())

            m = memory.measure(setup)
            note = f"fused: {', '.join(fused_here)}" if impl == "fastattn" else ""
            if impl == "fastattn" and m.scratch_bytes:
                note += f"; peak includes {m.scratch_bytes / 2**20:,.1f} MiB kernel scratch"
            mem.append(_memory_row("block", w.label, w.shape, impl, m, note))
        progress.update(note=w.label)
    return mem, traffic


def _top(by_op: dict[str, dict[str, int]], n: int = 3) -> str:
    merged: dict[str, int] = {}
    for phase in by_op.values():
        for name, b in phase.items():
            merged[name] = merged.get(name, 0) + b
    top = sorted(((b, name) for name, b in merged.items() if b), reverse=True)[:n]
    return ", ".join(f"{name.replace('aten.', '')} {b / 2**20:,.0f}" for b, name in top)


def _tensor_outputs(out: Any) -> list[torch.Tensor]:
    """Every floating tensor output (an inference-only op's results, compared without a backward)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]


def _agreement(ops: Sequence[str], dtypes: Sequence[torch.dtype], quick: bool) -> list[dict]:
    """Section 4: outputs and every gradient, fused (interpreted) vs eager in low precision vs float64."""
    from fastattn.perf import cases

    if quick:  # one case of each op in the first dtype
        work = [(cases.get(op, "small")[0], dtypes[0]) for op in ops]
    else:
        work = [(c, d) for op in ops for c in cases.get(op, "small") for d in dtypes]
    return agreement(work, torch.device("cpu"), "interpreter agreement (TRITON_INTERPRET=1)")


def agreement(work: Sequence[tuple[Any, torch.dtype]], device: torch.device, title: str) -> list[dict]:
    """Rows of max errors, fused vs eager in ``dtype`` vs the float64 eager reference, for each ``(case, dtype)``,
    under the test suite's 2x-eager rule, on ``device`` (the CPU report's interpreter check; gpu-check on CUDA)."""
    from fastattn import _runtime
    from fastattn.ops._common import dtype_name
    from fastattn.perf.gpu import _grad_outputs
    from fastattn.perf.report import Progress
    from fastattn.testing import max_err, rule_bound

    progress = Progress(title, len(work))
    rows = []
    for case, dtype in work:
        torch.manual_seed(0)
        master = case.make(device, torch.float64)
        backward = "bwd" in case.modes
        outputs = _grad_outputs if backward else _tensor_outputs
        grad_out = [torch.randn_like(o) for o in outputs(master.cast(torch.float64).call(case.eager))]
        results = {}
        t0 = time.monotonic()
        for label, fn, dt in (("ref", case.eager, torch.float64), ("eager", case.lowp_baseline or case.eager, dtype),
                              ("fastattn", case.fused, dtype)):
            inputs = master.cast(dt)
            with _runtime.record_launches() as launches:
                outs = outputs(inputs.call(fn))
                if backward:
                    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grad_out, outs)])
            results[label] = outs + [t.grad for t in inputs.leaves()]
            if label == "fastattn":
                missing = [k for k in case.kernels if launches[k] == 0]
        seconds = time.monotonic() - t0
        grad_names = [f"d{n}" for n, a in zip(master.names, master.args) if isinstance(a, torch.Tensor)
                      and a.requires_grad]
        out_names = (list(case.outputs) if len(case.outputs) == len(grad_out)
                     else [f"out{i}" for i in range(len(grad_out))])
        names = out_names + grad_names
        for i, name in enumerate(names):
            ref, eager, ours = results["ref"][i], results["eager"][i], results["fastattn"][i]
            e_ours, e_eager = max_err(ours, ref), max_err(eager, ref)
            bound = rule_bound(eager, ref, dtype)  # fp16/bf16: the floors of fastattn.testing are negligible here
            rows.append({"case": case.name, "shape": case.shape, "dtype": dtype_name(dtype),
                         "tensor": name, "err_fastattn": e_ours, "err_eager": e_eager, "bound": bound,
                         "ok": bool(e_ours <= bound), "kernels_ran": not missing, "missing_kernels": ", ".join(missing),
                         "seconds": seconds})
        progress.update(note=f"{case.name} {dtype}")
    return rows


def child_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastattn.perf.cpu")
    p.add_argument("--json", required=True)
    p.add_argument("--ops", required=True)
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip", default="", help="comma list of sections to skip: memory, agreement")
    a = p.parse_args(argv)
    from fastattn import _runtime

    if not _runtime.interpreting():
        raise SystemExit("fastattn.perf.cpu: run with TRITON_INTERPRET=1 (set before Python starts)")
    ops, skip = a.ops.split(","), set(filter(None, a.skip.split(",")))
    out: dict[str, Any] = {"memory": [], "traffic": [], "agreement": []}
    if "memory" not in skip:
        out["memory"], out["traffic"] = _memory_and_traffic(ops, DTYPES[a.dtype], a.quick)
    if "agreement" not in skip:
        out["agreement"] = _agreement(ops, (torch.float16, torch.bfloat16), a.quick)
    with open(a.json, "w") as f:
        json.dump(out, f)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# parent: the report
# ---------------------------------------------------------------------------------------------------------------


class _Printer:
    """Prints the report to stdout and keeps it for ``report.md``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


def _run_child(ops: Sequence[str], dtype: str, quick: bool, skip: Sequence[str]) -> dict | None:
    from fastattn.perf.report import say

    env = dict(os.environ, TRITON_INTERPRET="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cpu.json")
        cmd = [sys.executable, "-m", "fastattn.perf.cpu", "--json", path, "--ops", ",".join(ops), "--dtype", dtype]
        cmd += ["--quick"] if quick else []
        cmd += ["--skip", ",".join(skip)] if skip else []
        proc = subprocess.run(cmd, env=env, check=False)
        if proc.returncode != 0 or not os.path.exists(path):
            say(f"the measuring process failed (exit status {proc.returncode}): {' '.join(cmd)}")
            return None
        with open(path) as f:
            return json.load(f)


def _ceiling_section(out: _Printer, reports: Sequence[Any], archs: Sequence[int], quick: bool, workers: int | None,
                     out_dir: str, env: dict) -> None:
    """Section 1's ceiling table: the plain attention configs just compiled beside the reference loops (and the
    varlen and KV-cache kernels' plain configs, compiled here where their ops were not in the report)."""
    from fastattn.perf import ceiling, fit, refloop
    from fastattn.perf.report import write_csv

    out()
    out("### Issue-slot ceiling of the attention loops (an upper bound, not a speed)")
    out()
    if quick:
        out("Skipped in quick mode (it needs every plain config at head dims 64 and 128): `fastattn ceiling`.")
        return
    missing = [op for op in ceiling.FAMILIES.values() if op not in {r.op for r in reports}]
    refs = fit.run([*missing, ceiling.REFERENCE], [a for a in archs if a in (80, 90)], select=ceiling.select(),
                   workers=workers)
    rows = ceiling.rows([*reports, *refs])
    out(ceiling.table(rows))
    out()
    n_ref = sum(r.kernel in refloop.KERNELS for r in refs)
    out(ceiling.NOTE + f" {n_ref} reference compiles; CSV: ceiling.csv.")
    write_csv(os.path.join(out_dir, "ceiling.csv"), rows, env)


def run(ops: Sequence[str], *, dtype: str = "fp16", out_dir: str, quick: bool = False, skip_inspect: bool = False,
        archs: Sequence[int] = (80, 90), workers: int | None = None, skip: Sequence[str] = (),
        gpu_present: bool = False) -> int:
    """The CPU report; returns the exit status (1 if any check failed)."""
    from fastattn.perf import cases, fit
    from fastattn.perf.report import environment, format_table, mib, ratio, say, write_csv

    env = environment()
    out = _Printer()
    failed: list[str] = []
    out("# fastattn bench: CPU report")
    out()
    why = ("--cpu-report was given, so nothing is timed" if gpu_present else
           "No CUDA GPU found (torch.cuda.is_available() is False), so nothing is timed here")
    out(f"{why}. What follows is what can be measured on this machine ({env['device']}; torch {env['torch']}, "
        f"triton {env['triton']}, "
        f"{env['date']}). Ops: {', '.join(ops)}; dtype {dtype}." + (" Quick mode: a subset." if quick else ""))
    os.makedirs(out_dir, exist_ok=True)

    # 1. hardware fit
    out()
    out("## 1. Hardware fit (compiled for real GPU targets, no GPU needed)")
    out()
    if skip_inspect:
        out("Skipped (--skip-inspect). `fastattn inspect` prints it in full.")
    else:
        try:
            reports = fit.run(ops, archs, workers=workers, first_per_kernel=quick)
            out(f"{len(reports)} compiles ({'first config of each kernel, ' if quick else ''}"
                f"{', '.join(f'sm_{a}' for a in archs)}), read with cuobjdump; per kernel and arch "
                f"(full table: `fastattn inspect`, CSV: hwfit.csv):")
            out()
            out(fit.summary(reports))
            write_csv(os.path.join(out_dir, "hwfit.csv"), [fit.as_dict(r) for r in reports], env)
            bad = fit.problems(reports)
            if bad:
                failed.append(f"hardware fit: {len(bad)} of {len(reports)} compiles spill or exceed shared memory "
                              "(all listed in hwfit.csv and by `fastattn inspect`), e.g.:")
                failed += [f"  {p}" for p in bad[:8]]
            if "attention" in ops:
                _ceiling_section(out, reports, archs, quick, workers, out_dir, env)
        except Exception as err:  # noqa: BLE001 - the other sections still run
            out(f"FAILED: {type(err).__name__}: {err}")
            failed.append(f"hardware fit: {err}")

    say("measuring memory, traffic and interpreter agreement in a child process (TRITON_INTERPRET=1)")
    data = _run_child(ops, dtype, quick, skip)
    if data is None:
        failed.append("the measuring process failed (see above)")
        data = {"memory": [], "traffic": [], "agreement": []}

    # 2. memory
    mem = data["memory"]
    if "memory" not in skip:
        out()
        out("## 2. Memory, measured (FakeTensors at real shapes, forward + backward)")
        out()
        rows = []
        for r in mem:
            eager = next((e for e in mem if e["case"] == r["case"] and e["impl"] == "eager"), None)
            less = ""
            if r["impl"] != "eager" and eager and r["peak_bytes"]:
                less = (f"{ratio(eager['saved_bytes'], r['saved_bytes'])} / "
                        f"{ratio(eager['peak_bytes'], r['peak_bytes'])}")
            rows.append((r["case"], r["shape"], r["impl"], mib(r["saved_bytes"]), mib(r["peak_bytes"]), less,
                         r["saved"] if r["kind"] == "op" else "", r["note"]))
            if r.get("problem"):
                failed.append(f"memory: {r['case']}: {r['problem']}")
        out(format_table(("case", "shape", "impl", "saved for bwd MiB", "peak live MiB", "eager/fused saved / peak",
                          "saved tensors", "note"), rows, align="lllrrrll"))
        out()
        scratch = "; ".join(note for name, note in cases.SCRATCH_NOTES.items() if any(op in name for op in ops))
        out(f"dtype {dtype}. *Saved for bwd*: distinct storages autograd keeps for the backward "
            "(saved_tensors_hooks; a saved view counts its whole buffer once; parameters excluded; an op's "
            "weight-like inputs are inputs here). *Peak live*: largest sum of live storages over forward + "
            "backward, seen op by op by a TorchDispatchMode, including inputs, parameters, gradients and the kernel "
            f"scratch that fake implementations do not allocate, added while its op runs ({scratch}; sized for a "
            f"GPU with {cases.SCRATCH_SMS} SMs where it depends on the SM count). Gradients come from "
            "torch.autograd.grad for the inputs and parameters that require them. Blocks and models run with "
            "parameters in the dtype, train mode; a block's input is an activation (it gets a gradient), a model's "
            "input is images (none). The CPU trace runs the ops torch picks for CPU tensors (e.g. native_batch_norm, "
            "not cuDNN's; torch.rms_norm's fp32 composite, not CUDA's fused _fused_rms_norm), whose saved buffers "
            "can differ from a GPU's (see each eager row's note). torch's own fused SDPA backends "
            "(flash, mem-efficient) also keep O(L) statistics instead of the scores; they are compared in the GPU "
            "benchmark.")
        write_csv(os.path.join(out_dir, "memory.csv"), mem, env)

        # 3. traffic
        out()
        out("## 3. HBM traffic: minimum of the fused op vs what eager moves (counted)")
        out()
        rows = []
        for t in data["traffic"]:
            rows.append((t["case"], t["shape"], mib(t["eager_fwd"]), mib(t["eager_bwd"]), mib(t["min_fwd"]),
                         mib(t["min_bwd"]), f"{mib(t['fused_fwd'])} / {mib(t['fused_bwd'])}",
                         ratio(t["eager_fwd"] + t["eager_bwd"], t["min_fwd"] + t["min_bwd"]), t["eager_top"]))
        out(format_table(("case", "shape", "eager fwd MiB", "eager bwd MiB", "fused min fwd", "fused min bwd",
                          "fused traced fwd / bwd", "eager / min", "eager's biggest movers (MiB)"), rows,
                         align="llrrrrrrl"))
        out()
        out("*Eager*: the reference (`fastattn.reference`; for attention the math path that materialises the "
            "scores; add + `F.layer_norm`; conv2d + flatten + cat + add; `F.batch_norm` + add + relu), every aten "
            "op counted: bytes read = each tensor input's distinct elements (a stride-0 broadcast dim once), bytes "
            "written = its outputs; views (outputs aliasing an input: view, transpose, expand, _unsafe_view) move "
            "nothing; `empty*` writes nothing. *Fused min*: the op's inputs read once and outputs written once (a "
            "formula per op). *Fused traced*: the same counter on the fused path, where the custom op counts as one "
            "op; any excess over the minimum is a second pass (batch_norm in training: a statistics op reads x "
            "before the normalising op) or work outside the kernels (autograd materialising a zero gradient for an "
            "unused output; inputs a backward op receives but does not read). Both are lower bounds for what a "
            "kernel really moves (tiles are re-read; caches help).")
        write_csv(os.path.join(out_dir, "traffic.csv"), data["traffic"], env)

    # 4. interpreter agreement
    if "agreement" not in skip:
        out()
        out("## 4. Interpreter agreement (the Triton kernels run by Triton's interpreter, small shapes)")
        out()
        rows = []
        for r in data["agreement"]:
            rows.append((r["case"], r["shape"], r["dtype"], r["tensor"], f"{r['err_fastattn']:.2e}",
                         f"{r['err_eager']:.2e}", f"{r['bound']:.2e}",
                         ("pass" if r["ok"] else "FAIL") + ("" if r["kernels_ran"] else
                                                            f" (kernels did not run: {r['missing_kernels']})")))
            if not r["ok"] or not r["kernels_ran"]:
                failed.append(f"agreement: {r['case']} {r['dtype']} {r['tensor']}")
        out(format_table(("case", "shape", "dtype", "tensor", "max err fastattn", "max err eager", "bound",
                          "2x-eager rule"), rows, align="llllrrrl"))
        out()
        out("Errors are max |x - ref| against the float64 reference; *eager* is torch in the same dtype (for "
            "attention torch's own SDPA); bound = 2 x eager + one rounding of the result (u x max|ref|), the rule "
            "of the test suite. The launch counter checks that the Triton kernels, not the eager fallback, ran.")
        write_csv(os.path.join(out_dir, "agreement.csv"), data["agreement"], env)

    plot = None
    if mem or data["traffic"]:
        from fastattn.perf import plots

        plot = plots.cpu_memory(mem, data["traffic"], os.path.join(out_dir, "memory.png"), dtype)
    out()
    written = ["hwfit.csv"] * (not skip_inspect) + ["ceiling.csv"] * (not skip_inspect and not quick
                                                                        and "attention" in ops)
    written += ["memory.csv", "traffic.csv", "agreement.csv"]
    if plot:
        written.append("memory.png")
    elif mem or data["traffic"]:
        written.append("no plot (matplotlib is not installed)")
    out(f"Files in {out_dir}: {', '.join(written + ['report.md'])}.")
    if failed:
        out()
        out("## Problems")
        out()
        for f in failed:
            out(f"  - {f.strip()}" if f.startswith("  ") else f"- {f}")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(out.lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(child_main())
