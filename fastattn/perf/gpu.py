"""GPU timing: every case forward, backward and forward+backward, fastattn against eager and torch's alternatives.

Times come from ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, median with 20/80 quantiles).
The backward is timed on a retained graph; forward+backward re-runs both. Gradients are computed with
``torch.autograd.grad`` (returned, not accumulated into ``.grad``), so a gradient that two inputs share
(``x + residual``) is not copied by autograd's ``.grad`` bookkeeping, which a model's backward would not do either.
Peak memory is ``torch.cuda.max_memory_allocated`` over one forward+backward, above what was allocated before it
(the inputs). Each implementation of each case is measured in its own ``try``: an out-of-memory, an SDPA backend
that cannot serve a shape or any other error becomes that row's status, never the end of the run.
"""

from __future__ import annotations

import dataclasses
import gc
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.ops._common import dtype_name
from fastattn.perf import blocks, cases
from fastattn.perf.cases import Case
from fastattn.perf.report import Progress, format_table

MODES = ("fwd", "bwd", "fwd+bwd")
DEVICE = "cuda"  # the tests point this at the CPU to exercise the runner without a GPU
FUSED = "fastattn"
EAGER = "eager"
COMPILED = "torch.compile(eager)"


@dataclasses.dataclass
class Timing:
    ms: float  # median
    p20: float
    p80: float


def do_bench(fn: Callable[[], Any], grad_to_none: Sequence[Tensor] | None = None, warmup: int = 25,
             rep: int = 100) -> Timing:
    from triton.testing import do_bench as _do_bench

    median, p20, p80 = _do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return Timing(median, p20, p80)


def _grad_outputs(out: Any) -> list[Tensor]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, Tensor) and o.requires_grad]


def _grads(outs: Sequence[Tensor], leaves: Sequence[Tensor], grads: Sequence[Tensor],
           retain_graph: bool = False) -> tuple[Tensor, ...]:
    """The backward of ``outs`` seeded with ``grads``: the leaves' gradients, returned."""
    return torch.autograd.grad(outs, leaves, grads, retain_graph=retain_graph)


def implementations(case: Case, with_compile: bool = True) -> dict[str, Callable]:
    """Name -> callable, in measuring order (eager first: every ratio is to eager). torch.compile is built lazily
    (a fresh compile per case, after ``torch._dynamo.reset()``, so no recompile limit is ever hit)."""
    impls: dict[str, Callable] = {EAGER: case.eager, FUSED: case.fused, **case.baselines}
    if with_compile:
        impls[COMPILED] = _LazyCompile(case.eager)
    return impls


class _LazyCompile:
    def __init__(self, fn: Callable):
        self.fn, self.compiled = fn, None

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            torch._dynamo.reset()
            self.compiled = torch.compile(self.fn)
        config = torch._functorch.config
        if not hasattr(config, "donated_buffer"):
            return self.compiled(*args, **kwargs)
        # The backward is timed on a retained graph; a backward compiled with donated buffers refuses
        # retain_graph=True (torch names this switch in its error).
        with config.patch(donated_buffer=False):
            return self.compiled(*args, **kwargs)


def measure_impl(case: Case, fn: Callable, dtype: torch.dtype, modes: Sequence[str] = MODES,
                 device: str | None = None) -> tuple[dict[str, Timing], int]:
    """Timings per mode (those of ``modes`` the case has) and the peak memory (bytes) of one forward+backward, or
    of one forward for an inference-only case."""
    inputs = case.make(torch.device(device or DEVICE), dtype)
    leaves = inputs.leaves()
    modes = [m for m in modes if m in case.modes]
    out: dict[str, Timing] = {}
    if "fwd" in modes:
        out["fwd"] = do_bench(lambda: inputs.call(fn))
    backward = "bwd" in case.modes
    if backward:
        outs = _grad_outputs(inputs.call(fn))
        grads = [torch.randn_like(o) for o in outs]
        if "bwd" in modes:
            out["bwd"] = do_bench(lambda: _grads(outs, leaves, grads, retain_graph=True))
        outs.clear()  # frees the retained graph
        if "fwd+bwd" in modes:
            out["fwd+bwd"] = do_bench(lambda: _grads(_grad_outputs(inputs.call(fn)), leaves, grads))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if backward:
        _grads(_grad_outputs(inputs.call(fn)), leaves, grads)
    else:
        inputs.call(fn)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return out, peak


def _status(err: BaseException) -> str:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "OOM"
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if "No available kernel" in msg:
        return "unsupported (no available kernel)"
    return f"error: {type(err).__name__}: {msg[:160]}"


def _cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def run_case(case: Case, dtype: torch.dtype, with_compile: bool = True, impls: Sequence[str] | None = None,
             progress: Progress | None = None) -> list[dict]:
    """Rows (one per implementation and mode) for one case; failures become statuses."""
    rows: list[dict] = []
    eager_ms: dict[str, float] = {}
    for name, fn in implementations(case, with_compile).items():
        if impls is not None and name not in impls:
            continue
        status, timings, peak = "ok", {}, None
        try:
            with warnings.catch_warnings():
                if name not in (FUSED, EAGER):  # torch's backend warnings explain the unsupported rows
                    warnings.simplefilter("ignore")
                timings, peak = measure_impl(case, fn, dtype)
        except Exception as err:  # noqa: BLE001 - one failing case is reported, not fatal
            status = _status(err)
        finally:
            _cleanup()
        if name == EAGER:
            eager_ms = {m: t.ms for m, t in timings.items()}
        for mode in case.modes:
            t = timings.get(mode)
            work, unit = case.work(mode, dtype)
            scale = 1e12 if unit == "TFLOP/s" else 1e9
            rows.append(dict(
                op=case.op, case=case.label, shape=case.shape, dtype=dtype_name(dtype), impl=name,
                mode=mode, ms=t.ms if t else None, ms_p20=t.p20 if t else None, ms_p80=t.p80 if t else None,
                throughput=(work / (t.ms * 1e-3) / scale) if (t and work) else None, unit=unit,
                speedup_vs_eager=(eager_ms[mode] / t.ms) if (t and mode in eager_ms) else None,
                peak_mib=peak / 2**20 if peak is not None else None, status=status,
                **{f"dim_{k}": v for k, v in case.dims.items()},
            ))
        if progress:
            progress.update(note=f"{case.name} / {name}: {status}")
    return rows


# -- end to end ------------------------------------------------------------------------------------------------


def training_step(workload: blocks.Workload, ops: dict[str, Callable], dtype: torch.dtype,
                  device: str | None = None) -> tuple[Timing, int]:
    """One SGD step (forward under autocast in ``dtype``, cross-entropy, backward, update): timing and peak."""
    device = torch.device(device or DEVICE)
    torch.manual_seed(0)
    model, x = workload.build(ops, device, dtype)
    model.train()
    y = torch.randint(0, workload.classes, (x.size(0),), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # momentum buffers exist from here on
    timing = do_bench(step, warmup=200, rep=2000)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return timing, torch.cuda.max_memory_allocated() - base


def _timed_step(workload: blocks.Workload, ops: dict, dtype: torch.dtype) -> tuple[str, Any, int | None]:
    """(status, timing, peak) of one :func:`training_step`; an error becomes the status, never the end of the run."""
    status, timing, peak = "ok", None, None
    try:
        timing, peak = training_step(workload, ops, dtype)
    except Exception as err:  # noqa: BLE001
        status = _status(err)
    finally:
        _cleanup()
    return status, timing, peak


def _step_row(workload: blocks.Workload, impl: str, dtype: torch.dtype, timing: Any, peak: int | None,
              eager_ms: float | None, status: str) -> dict:
    """The CSV row of one end-to-end training step (images/s; timing None when it did not run)."""
    return {
        "op": "end-to-end", "case": workload.label, "shape": workload.shape,
        "dtype": dtype_name(dtype), "impl": impl, "mode": "train step",
        "ms": timing.ms if timing else None, "ms_p20": timing.p20 if timing else None,
        "ms_p80": timing.p80 if timing else None,
        "throughput": workload.batch / (timing.ms * 1e-3) if timing else None, "unit": "images/s",
        "speedup_vs_eager": eager_ms / timing.ms if (timing and eager_ms) else None,
        "peak_mib": peak / 2**20 if peak is not None else None, "status": status,
    }


def run_end_to_end(dtype: torch.dtype, quick: bool = False, progress: Progress | None = None,
                   workloads: Sequence[blocks.Workload] | None = None) -> list[dict]:
    """Training steps of each workload (default: ViT-B/16 and ResNet-50) with each op table; a table whose
    patterns are all eager for a model is skipped, not re-timed as if it were something else."""
    rows = []
    if workloads is None:
        workloads = blocks.end_to_end(*((16, 32) if quick else (64, 64)))
    tables = {"eager": blocks.EAGER_OPS, "torch sdpa": blocks.TORCH_SDPA_OPS, FUSED: blocks.FUSED_OPS}
    for w in workloads:
        eager_ms = None
        for name, ops in tables.items():
            fused = blocks.fused_patterns(w.patterns, ops)
            if name != "eager" and not fused:
                status = f"skipped: same ops as eager for this model ({', '.join(w.patterns)})"
                timing, peak = None, None
            else:
                status, timing, peak = _timed_step(w, ops, dtype)
            if name == "eager" and timing:
                eager_ms = timing.ms
            status += f" (fused: {', '.join(fused)})" if fused and name != "eager" else ""
            rows.append(_step_row(w, name, dtype, timing, peak, eager_ms, status))
            if progress:
                progress.update(note=f"{w.label} / {name}: {status}")
    return rows


def run_patched_models(dtype: torch.dtype, quick: bool = False, progress: Progress | None = None,
                       models: Sequence[tuple[str, Callable[[], torch.nn.Module]]] | None = None,
                       image: int = 224, classes: int = 1000) -> list[dict]:
    """Training steps of torchvision's ViT-B/16, ResNet-50 and EfficientNet-B0 as users run them, eager vs
    ``fastattn.patch``.

    Both runs build the model with the same constructor and seed, so the patched one has the very weights of the
    eager one; rows say "skipped" when torchvision is not importable. ``models``/``image`` replace the defaults
    (tests use tiny ones)."""
    import fastattn

    batch = 16 if quick else 64
    if models is None:
        try:
            import torchvision
        except Exception as err:  # noqa: BLE001
            return [{"op": "end-to-end", "case": f"torchvision {name} train step", "shape": f"B={batch} {image}px",
                     "dtype": dtype_name(dtype), "impl": impl, "mode": "train step",
                     "status": f"skipped: torchvision not importable ({type(err).__name__})"}
                    for name in ("ViT-B/16", "ResNet-50", "EfficientNet-B0") for impl in ("eager", "fastattn.patch")]
        models = [("ViT-B/16", torchvision.models.vit_b_16), ("ResNet-50", torchvision.models.resnet50),
                  ("EfficientNet-B0", torchvision.models.efficientnet_b0)]

    def workload(name, ctor):
        def build(ops, device, _dtype):
            model = ctor().to(device)
            if ops.get("patch"):
                fastattn.patch(model)
            return model, torch.randn(batch, 3, image, image, device=device)
        return blocks.Workload(f"torchvision {name} train step", f"B={batch} {image}px", ("patch",), build, batch,
                               classes)

    tables = {"eager": {}, "fastattn.patch": {"patch": True}}
    rows = []
    for w in (workload(name, ctor) for name, ctor in models):
        eager_ms = None
        for name, ops in tables.items():
            status, timing, peak = _timed_step(w, ops, dtype)
            if name == "eager" and timing:
                eager_ms = timing.ms
            rows.append(_step_row(w, name, dtype, timing, peak, eager_ms, status))
            if progress:
                progress.update(note=f"{w.label} / {name}: {status}")
    return rows


def run(ops: Sequence[str], dtype: torch.dtype, suite: str = "gpu", with_compile: bool = True,
        end_to_end: bool = True) -> list[dict]:
    from fastattn.perf import cases as cases_mod

    all_cases = [c for op in ops for c in cases_mod.get(op, suite)]
    n_impls = sum(len(implementations(c, with_compile)) for c in all_cases)
    n_e2e = 6 + 6 if end_to_end else 0  # (ViT, ResNet) x 3 op tables, 3 torchvision models x 2
    progress = Progress("GPU benchmark", n_impls + n_e2e, every_s=10.0)
    rows = []
    for case in all_cases:
        rows += run_case(case, dtype, with_compile, progress=progress)
    if end_to_end:
        quick = suite in ("quick", "check")
        rows += run_end_to_end(dtype, quick=quick, progress=progress)
        rows += run_patched_models(dtype, quick=quick, progress=progress)
    return rows


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec)


def table(rows: Sequence[dict]) -> str:
    """One line per (case, implementation): the three modes side by side."""
    by: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r["op"], r["case"], r["impl"]), {})[r["mode"]] = r
    out = []
    for (op, case, impl), modes in by.items():
        any_row = next(iter(modes.values()))
        f, b, fb = modes.get("fwd", {}), modes.get("bwd", {}), modes.get("fwd+bwd", modes.get("train step", {}))
        out.append((op, case, impl, _fmt(f.get("ms")), _fmt(b.get("ms")), _fmt(fb.get("ms")),
                    _fmt(f.get("throughput"), ".1f"), _fmt(b.get("throughput"), ".1f"),
                    _fmt(fb.get("throughput"), ".1f"), any_row["unit"],
                    _fmt(fb.get("speedup_vs_eager"), ".2f"), _fmt(any_row.get("peak_mib"), ",.0f"),
                    "" if any_row["status"] == "ok" else any_row["status"]))
    return format_table(("op", "case", "impl", "fwd ms", "bwd ms", "f+b ms", "fwd", "bwd", "f+b", "unit",
                         "f+b x eager", "peak MiB", "status"), out, align="lllrrrrrrlrrl")


def failures(rows: Sequence[dict]) -> list[str]:
    """fastattn rows that errored (baselines that cannot serve a shape are not failures)."""
    return sorted({f"{r['op']} {r['case']}: {r['status']}" for r in rows
                   if r["impl"] == FUSED and r["status"] != "ok" and not r["status"].startswith("skipped")})


# -- pytest-benchmark ------------------------------------------------------------------------------------------

_eager_cache: dict[tuple, float] = {}


def pytest_params(op: str) -> list:
    """The parameters of ``bench/bench_<op>.py``: a ``(case, impl, mode)`` per case of the ``gpu`` suite,
    implementation and timed mode."""
    import pytest

    return [pytest.param(case, impl, mode, id=f"{case.label}-{impl}-{mode}".replace(" ", "_"))
            for case in cases.get(op, "gpu") for impl in implementations(case) for mode in case.modes]


def pytest_benchmark(benchmark: Any, case: Case, impl: str, mode: str, dtype: torch.dtype = torch.float16) -> None:
    """Time ``impl`` of ``case`` in ``mode`` for pytest-benchmark; do_bench numbers go to ``extra_info``.

    pytest-benchmark's own rounds wrap the call in ``torch.cuda.synchronize()`` so its wall-clock statistics are
    real too. Eager is measured once per (case, mode) in the session for the ratio.
    """
    import pytest

    fn = implementations(case)[impl]
    benchmark.group = f"{case.op} {case.label} {mode} {dtype_name(dtype)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timings, peak = measure_impl(case, fn, dtype, modes=(mode,))
    except Exception as err:
        status = _status(err)
        _cleanup()
        if impl != FUSED:
            pytest.skip(f"{impl} on {case.name}: {status}")
        raise
    t = timings[mode]
    key = (case.name, mode, dtype)
    if key not in _eager_cache:
        try:
            if impl == EAGER:
                _eager_cache[key] = t.ms
            else:
                _eager_cache[key] = measure_impl(case, case.eager, dtype, modes=(mode,))[0][mode].ms
        except Exception:  # noqa: BLE001 - eager may not fit (OOM at long sequences)
            _eager_cache[key] = float("nan")
        _cleanup()
    work, unit = case.work(mode, dtype)
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    benchmark.extra_info.update(
        case=case.label, shape=case.shape, impl=impl, mode=mode, dtype=str(dtype), ms_median=t.ms, ms_p20=t.p20,
        ms_p80=t.p80, unit=unit, throughput=work / (t.ms * 1e-3) / scale if work else None,
        speedup_vs_eager=_eager_cache[key] / t.ms, peak_mib=peak / 2**20)

    inputs = case.make(torch.device(DEVICE), dtype)
    leaves = inputs.leaves()
    grads = [torch.randn_like(o) for o in _grad_outputs(inputs.call(fn))]

    def forward():
        inputs.call(fn)
        torch.cuda.synchronize()

    def setup_backward():
        outs = _grad_outputs(inputs.call(fn))
        torch.cuda.synchronize()
        return (outs,), {}

    def backward(outs):
        _grads(outs, leaves, grads)
        torch.cuda.synchronize()

    def forward_backward():
        _grads(_grad_outputs(inputs.call(fn)), leaves, grads)
        torch.cuda.synchronize()

    if mode == "fwd":
        benchmark.pedantic(forward, rounds=20, warmup_rounds=3)
    elif mode == "bwd":
        benchmark.pedantic(backward, setup=setup_backward, rounds=20, warmup_rounds=3)
    else:
        benchmark.pedantic(forward_backward, rounds=20, warmup_rounds=3)
