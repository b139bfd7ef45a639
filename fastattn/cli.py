"""The ``fastattn`` command: ``bench`` (GPU timings, or the measured CPU report where there is no GPU),
``inspect`` (the hardware-fit report of every kernel config, compiled for sm_80 / sm_89 / sm_90 without a GPU),
``ceiling`` (the issue-slot ceiling of the attention, varlen and KV-cache decode kernels beside minimal reference
loops, no GPU needed) and
``gpu-check`` (tests, agreement and a bounded benchmark on a CUDA GPU).

    fastattn bench [--ops attention] [--dtype fp16] [--quick] [--out DIR]
    fastattn inspect [--ops attention] [--arch 80,90] [--json] [--dump DIR] [--filter TEXT]
    fastattn ceiling [--arch 90] [--dtype fp16] [--head-dim 128] [--kernel fwd,dkdv,dq,decode]
                     [--family dense,varlen,kvcache] [--json]
    fastattn gpu-check [--skip tests,agreement,bench,e2e] [--test-timeout S] [--out DIR]
    fastattn demo [--task all|vit|transformer] [--steps N]   (= python -m fastattn.demo)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its current default

ARCHS = (80, 89, 90)


def _ops(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _archs(text: str) -> list[int]:
    try:
        archs = [int(t.strip().removeprefix("sm_").removeprefix("sm")) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--arch takes a comma list of {', '.join(map(str, ARCHS))}; got {text!r}")
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs:
        raise argparse.ArgumentTypeError(f"--arch takes a comma list of {', '.join(map(str, ARCHS))}; got {text!r}")
    return archs


def _dtypes(text: str) -> list[str]:
    names = {"fp16": "float16", "bf16": "bfloat16", "float16": "float16", "bfloat16": "bfloat16"}
    got = [t.strip() for t in text.split(",") if t.strip()]
    if not got or any(t not in names for t in got):
        raise argparse.ArgumentTypeError(f"--dtype takes a comma list of fp16, bf16; got {text!r}")
    return [names[t] for t in got]


def _head_dims(text: str) -> list[int]:
    from fastattn.perf import refloop

    try:
        dims = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        dims = []
    if not dims or any(d not in refloop.HEAD_DIMS for d in dims):
        raise argparse.ArgumentTypeError(f"--head-dim takes a comma list of {', '.join(map(str, refloop.HEAD_DIMS))}; "
                                         f"got {text!r}")
    return dims


def _kernels(text: str) -> list[str]:
    from fastattn.perf import ceiling

    got = [t.strip() for t in text.split(",") if t.strip()]
    out = [ceiling.SHORT.get(t, t) for t in got]
    if not out or any(k not in ceiling.KERNELS for k in out):
        raise argparse.ArgumentTypeError(f"--kernel takes a comma list of {', '.join(ceiling.SHORT)} (or "
                                         f"{', '.join(ceiling.KERNELS)}); got {text!r}")
    return out


def _families(text: str) -> list[str]:
    from fastattn.perf import ceiling

    got = [t.strip() for t in text.split(",") if t.strip()]
    if not got or any(f not in ceiling.FAMILIES for f in got):
        raise argparse.ArgumentTypeError(f"--family takes a comma list of {', '.join(ceiling.FAMILIES)}; got {text!r}")
    return got


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastattn", description="bench: GPU timings, or the measured CPU report where "
                                "there is no GPU; inspect: the hardware-fit report of every kernel config.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="benchmarks on a GPU; the measured CPU report where there is none",
                       description="On a CUDA device: every op forward, backward and forward+backward against eager "
                       "PyTorch, torch's alternatives and torch.compile, at model shapes, plus end-to-end training "
                       "steps; a table, a CSV and PNG plots. Without one: the hardware-fit report, measured memory "
                       "and traffic, and the interpreter agreement check.")
    b.add_argument("--ops", type=_ops, default=None, help="comma list of ops (default: all)")
    b.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="default fp16")
    b.add_argument("--out", default=None,
                   help="results directory (default bench/results/<device>, e.g. bench/results/cpu)")
    b.add_argument("--quick", action="store_true", help="a few shapes, first config of each kernel: a smoke run")
    b.add_argument("--no-compile", action="store_true", help="GPU: skip the torch.compile baseline")
    b.add_argument("--no-e2e", action="store_true", help="GPU: skip the end-to-end training steps")
    b.add_argument("--cpu-report", action="store_true", help="the CPU report even where a GPU exists")
    b.add_argument("--skip-inspect", action="store_true", help="CPU: skip the hardware-fit section")
    b.add_argument("--skip", type=_ops, default=[], help="CPU: skip sections: memory (sections 2-3), agreement (4)")
    b.add_argument("--arch", type=_archs, default=[80, 90], help="CPU: architectures to compile for (default 80,90)")
    b.add_argument("--workers", type=int, default=None, help="compile processes (default: all cores)")

    i = sub.add_parser("inspect", help="registers, spills, shared memory, tensor-core use, occupancy per config",
                       description="Compile every kernel config fastattn can launch for real GPU targets (no GPU "
                       "needed) and read the cubins with cuobjdump.")
    i.add_argument("--ops", type=_ops, default=None, help="comma list of ops (default: all)")
    i.add_argument("--arch", type=_archs, default=[80, 90], help="comma list of 80, 89, 90 (default 80,90)")
    i.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    i.add_argument("--dump", metavar="DIR", default=None,
                   help="write each cubin as DIR/<kernel function name>-<config>-<arch>.cubin (for cuobjdump)")
    i.add_argument("--filter", action="append", default=[], metavar="TEXT",
                   help="keep specs whose '<kernel> <variant> <config>' contains TEXT (repeat: all must match)")
    i.add_argument("--no-cache", action="store_true", help="compile even where a cached report exists")
    i.add_argument("--workers", type=int, default=None, help="compile processes (default: all cores)")
    c = sub.add_parser("ceiling", help="issue-slot ceiling of the attention kernels beside minimal reference loops",
                       description="Compile the plain specialisation of every attention kernel (dense, varlen's "
                       "VARLEN=True builds, the KV-cache decode kernel) and the minimal "
                       "FlashAttention-2 reference loops (fastattn/perf/refloop.py) for real GPU targets (no GPU "
                       "needed), find the loop holding the MMAs in the SASS and print the issue-slot ceiling of the "
                       "best config of each beside the reference's: an upper bound, not a speed.")
    c.add_argument("--arch", type=_archs, default=[80, 90], help="comma list of 80, 90 (default 80,90)")
    c.add_argument("--dtype", type=_dtypes, default=["float16", "bfloat16"], help="fp16, bf16 (default both)")
    c.add_argument("--head-dim", type=_head_dims, default=None, help="comma list of 64, 128 (default both)")
    c.add_argument("--kernel", type=_kernels, default=None, help="comma list of fwd, dkdv, dq, decode (default all)")
    c.add_argument("--family", type=_families, default=None, help="comma list of dense, varlen, kvcache (default all)")
    c.add_argument("--json", action="store_true", help="the rows as JSON on stdout")
    c.add_argument("--no-cache", action="store_true", help="compile even where a cached report exists")
    c.add_argument("--workers", type=int, default=None, help="compile processes (default: all cores)")

    g = sub.add_parser("gpu-check", help="on a CUDA GPU: the op tests, agreement and a bounded benchmark (~8 min)",
                       description="Run the op test files on the compiled kernels, an agreement check at model "
                       "shapes and the benchmark on a bounded set; write bench/results/<gpu>/gpu-check*.csv and a "
                       "log (copied to $OUT when set). Exit status 1 on any failure, 2 without a GPU.")
    g.add_argument("--ops", type=_ops, default=None, help="ops to benchmark and check (default: all)")
    g.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="benchmark dtype (default fp16)")
    g.add_argument("--out", default=None, help="results directory (default bench/results/<gpu name>)")
    g.add_argument("--skip", type=_ops, default=[], help="steps to skip: tests, agreement, bench, e2e")
    g.add_argument("--test-timeout", type=float, default=330.0, help="seconds per test file (default 330)")
    g.add_argument("--parallel", type=int, default=None, help="test files run at once (default: all of them)")
    sub.add_parser("demo", add_help=False, help="train a tiny ViT and a tiny Transformer, fused vs eager "
                   "(python -m fastattn.demo; `fastattn demo --help` for its options)")
    return p


def _check_ops(ops: Sequence[str] | None, known: Sequence[str]) -> list[str]:
    if not ops:
        return list(known)
    unknown = [op for op in ops if op not in known]
    if unknown:
        raise SystemExit(f"fastattn: unknown op(s) {', '.join(unknown)}; available: {', '.join(known)}")
    return list(ops)


def _bench(a: argparse.Namespace) -> int:
    import torch

    from fastattn.perf import cases, report

    ops = _check_ops(a.ops, cases.available_ops())
    if not torch.cuda.is_available() or a.cpu_report:
        from fastattn.perf import cpu

        if not torch.cuda.is_available():
            report.say("no CUDA GPU found: writing the CPU report (hardware fit, measured memory and traffic, "
                       "interpreter agreement); no timings")
        return cpu.run(ops, dtype=a.dtype, out_dir=a.out or os.path.join("bench", "results", "cpu"), quick=a.quick,
                       skip_inspect=a.skip_inspect, archs=a.arch, workers=a.workers, skip=a.skip,
                       gpu_present=torch.cuda.is_available())

    from fastattn.perf import gpu, plots

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    env = report.environment()
    out_dir = a.out or os.path.join("bench", "results", report.device_slug(env["device"]))
    report.say(f"benchmarking on {env['device']} (torch {env['torch']}, triton {env['triton']}); results -> {out_dir}")
    rows = gpu.run(ops, dtype, suite="quick" if a.quick else "gpu", with_compile=not a.no_compile,
                   end_to_end=not a.no_e2e)
    os.makedirs(out_dir, exist_ok=True)
    note = (f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}, dtype {a.dtype}. "
            "Times: median of triton.testing.do_bench (CSV: 20/80 quantiles); throughput in TFLOP/s (attention: "
            "forward 4*B*H*L*L*D, halved when causal, backward 2.5x; patch_embed: forward 2*B*N*K*D, backward the "
            "dW GEMM of that size, twice that with dimages) or GB/s of the bytes the op must move (layer_norm, "
            "batch_norm), images/s end to end; x eager = eager time / this time, same run.")
    text = [f"# fastattn bench on {env['device']}", "", note, "", gpu.table(rows)]
    print("\n".join(text), flush=True)
    csv_path = report.write_csv(os.path.join(out_dir, "bench.csv"), rows, env)
    pngs = plots.gpu(rows, out_dir, env["device"])
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print(f"\nFiles: {csv_path}" + "".join(f", {p}" for p in pngs) + f", {os.path.join(out_dir, 'report.md')}")
    bad = gpu.failures(rows)
    if bad:
        print("\nfastattn measurements that failed:\n" + "\n".join(f"- {b}" for b in bad))
    return 1 if bad else 0


def _inspect(a: argparse.Namespace) -> int:
    from fastattn.ops import OPS
    from fastattn.perf import fit

    ops = _check_ops(a.ops, OPS)
    reports = fit.run(ops, a.arch, filters=a.filter, dump_dir=a.dump, use_cache=not a.no_cache, workers=a.workers)
    if a.json:
        print(json.dumps([fit.as_dict(r) for r in reports], indent=1))
    else:
        print(fit.table(reports))
        notes = [f"- {r.kernel} [{r.variant}] {r.config} sm_{r.arch}: {r.loop_note}" for r in reports if r.loop_note]
        if notes:
            print("\nMMA loop notes (issue-slot ceiling):\n" + "\n".join(notes))
        print()
        print(fit.summary(reports))
        bad = fit.problems(reports)
        print(f"\n{len(reports)} compiles, {len(bad)} with problems" + (":\n" + "\n".join(bad) if bad else "."))
    if a.dump:
        print(f"cubins written to {a.dump} (check with: cuobjdump -res-usage / -sass <file>)", file=sys.stderr)
    return 1 if fit.problems(reports) else 0


def _ceiling(a: argparse.Namespace) -> int:
    from fastattn import hwfit
    from fastattn.perf import ceiling, refloop

    if any(arch not in hwfit.MMA_FLOP_PER_CYCLE for arch in a.arch):
        raise SystemExit(f"fastattn ceiling: --arch takes {', '.join(map(str, hwfit.MMA_FLOP_PER_CYCLE))} (the "
                         f"archs with a peak MMA rate); got {', '.join(map(str, a.arch))}")

    reports = ceiling.compile_reports(a.arch, dtypes=a.dtype, head_dims=a.head_dim or refloop.HEAD_DIMS,
                                      kernels=a.kernel or ceiling.KERNELS, families=a.family or tuple(ceiling.FAMILIES),
                                      workers=a.workers, use_cache=not a.no_cache)
    rows = ceiling.rows(reports)
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        print(ceiling.table(rows))
        print()
        print(ceiling.NOTE)
    missing = [f"{r['family']} {r['kernel']} sm_{r['arch']} {r['dtype']} D<={r['head_dim']}" for r in rows
               if r["ceiling"] is None]
    if missing:
        print("no ceiling (no config fits, or no MMA loop was found): " + "; ".join(missing), file=sys.stderr)
    return 1 if missing or not rows else 0


def _gpu_check(a: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("fastattn gpu-check: no CUDA GPU here (torch.cuda.is_available() is False), so nothing was checked "
              "(exit status 2). It runs the op tests on the compiled kernels and a bounded benchmark on a GPU; on a "
              "CPU run ./run.sh test and ./run.sh bench instead.", file=sys.stderr)
        return 2
    from fastattn.perf import cases, gpucheck

    bad = [s for s in a.skip if s not in gpucheck.STEPS]
    if bad:
        raise SystemExit(f"fastattn gpu-check: unknown step(s) {', '.join(bad)} for --skip; "
                         f"steps: {', '.join(gpucheck.STEPS)}")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    return gpucheck.run(out_dir=a.out, ops=_check_ops(a.ops, cases.available_ops()), dtype=dtype, skip=a.skip,
                        test_timeout_s=a.test_timeout, parallel=a.parallel or len(gpucheck.TEST_FILES))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options
        from fastattn import demo

        return demo.main(argv[1:])
    a = _parser().parse_args(argv)
    commands = {"bench": _bench, "inspect": _inspect, "ceiling": _ceiling, "gpu-check": _gpu_check}
    return commands[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
