"""The hardware-fit report (``fastattn inspect``, and section 1 of the CPU report) over :mod:`fastattn.hwfit`.

Compiling every spec for two or three architectures takes minutes on a small machine, so reports are cached in
``$FASTATTN_CACHE_DIR`` (default ``~/.cache/fastattn``) at two levels: every compile by its content
(``hwfit.spec_key``: kernel source, arguments, config, arch, Triton version), shared by ``fastattn inspect``,
``fastattn bench``, ``fastattn ceiling`` and the tests, and whole (op, arch) reports keyed by the Triton version and
a hash of the op's kernel sources (with the shared ``_common.py``), the op module and ``hwfit.py``, which spare a
fully cached run its compile workers. ``--dump`` always compiles (the cubins are written by the compile).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence

import triton

from fastattn import hwfit
from fastattn.perf.report import Progress, format_table, say

cache_dir = hwfit.cache_dir


def _source_key(op: str, arch: int) -> str:
    """Hash of what an op's compiles depend on: the Triton version, the arch, the kernel modules its op module
    imports and the shared ``_``-prefixed ones (``_common.py``, which kernel modules import), the op module and
    ``hwfit.py``. Another op's kernels are not in it, so changing one op's kernels recompiles that op only."""
    import types

    import fastattn.kernels as kernels_pkg

    h = hashlib.sha256(f"triton {triton.__version__} arch {arch}".encode())
    kdir = os.path.dirname(kernels_pkg.__file__)
    module = hwfit.spec_module(op)
    own = {os.path.abspath(m.__file__) for m in vars(module).values() if isinstance(m, types.ModuleType)
           and m.__name__.startswith(kernels_pkg.__name__ + ".")}
    shared = {os.path.abspath(os.path.join(kdir, f)) for f in os.listdir(kdir) if f.endswith(".py") and f[0] == "_"}
    files = sorted(own | shared) + [module.__file__, hwfit.__file__]
    for path in files:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()[:20]


def _cache_path(op: str, arch: int) -> str:
    return os.path.join(cache_dir(), f"hwfit-{op}-sm{arch}-{_source_key(op, arch)}.json")


def _load(path: str) -> list[hwfit.FitReport] | None:
    try:
        with open(path) as f:
            rows = json.load(f)
        return [hwfit.FitReport(**{k: v for k, v in r.items() if k != "ok"}) for r in rows]
    except (OSError, ValueError, TypeError):
        return None


def _store(path: str, reports: Sequence[hwfit.FitReport]) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump([as_dict(r) for r in reports], f)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home only costs the next run its cache
        say(f"could not write the hardware-fit cache {path}: {e}")


def as_dict(r: hwfit.FitReport) -> dict:
    return {**dataclasses.asdict(r), "ok": r.ok}


def matches(filters: Sequence[str]) -> Callable[[hwfit.SpecInfo], bool] | None:
    """A spec selector: every filter must be a substring of ``"<kernel> <variant> <config>"``."""
    if not filters:
        return None

    def select(info: hwfit.SpecInfo) -> bool:
        text = f"{info.name} {info.variant} {info.config_label}"
        return all(f in text for f in filters)

    return select


def _selector(filters: Sequence[str], first_per_kernel: bool,
              select: Callable[[hwfit.SpecInfo], bool] | None = None) -> Callable[[hwfit.SpecInfo], bool] | None:
    by_text = matches(filters)
    keep = by_text if select is None else (lambda i: (by_text is None or by_text(i)) and select(i))
    if not first_per_kernel:
        return keep
    seen: set[str] = set()

    def select(info: hwfit.SpecInfo) -> bool:  # hwfit.check asks once per spec, in order
        if (keep is not None and not keep(info)) or info.name in seen:
            return False
        seen.add(info.name)
        return True

    return select


def run(ops: Iterable[str], archs: Sequence[int], *, filters: Sequence[str] = (), dump_dir: str | None = None,
        use_cache: bool = True, workers: int | None = None, first_per_kernel: bool = False,
        select: Callable[[hwfit.SpecInfo], bool] | None = None) -> list[hwfit.FitReport]:
    """Fit reports for every spec of ``ops`` (optionally filtered) on every arch, with a progress line.

    ``first_per_kernel`` keeps only the first spec of each kernel function (``--quick``); ``select`` keeps the
    specs it returns True for (after ``filters``). ``ops`` are op names or spec module names
    (``hwfit.spec_module``). Only whole, undumped runs use and fill the per-op cache; every compile uses the
    per-spec cache unless ``use_cache`` is False.
    """
    whole = not filters and not first_per_kernel and dump_dir is None and select is None
    ops = list(ops)
    found: dict[tuple[str, int], list[hwfit.FitReport]] = {}
    groups: dict[tuple[int, ...], list[str]] = {}  # archs to compile -> ops missing exactly those
    for op in ops:
        todo = []
        for arch in archs:
            cached = _load(_cache_path(op, arch)) if (use_cache and whole) else None
            if cached is not None:
                say(f"hardware fit: {op} sm_{arch}: {len(cached)} configs from the cache ({cache_dir()})")
                found[(op, arch)] = cached
            else:
                todo.append(arch)
        if todo:
            groups.setdefault(tuple(todo), []).append(op)
    # One pool of workers per group: starting the spawned workers costs seconds each time, so not once per op.
    for todo, group in groups.items():
        label = f"hardware fit: compiling {', '.join(group)} for {', '.join(f'sm_{a}' for a in todo)}"
        progress: list[Progress] = []

        def report(done: int, total: int, r: hwfit.FitReport, label=label, progress=progress) -> None:
            if not progress:
                progress.append(Progress(label, total))
            progress[0].update(done, f"{r.op} {r.kernel} {r.config}")

        say(f"{label} (listing the configs)")
        pairs = hwfit.check_pairs(group, archs=todo, workers=workers, dump_dir=dump_dir,
                                  select=_selector(filters, first_per_kernel, select), progress=report,
                                  use_cache=use_cache)
        for op in group:
            for arch in todo:
                found[(op, arch)] = [r for info, r in pairs if info.op == op and r.arch == arch]
                if whole:
                    _store(_cache_path(op, arch), found[(op, arch)])
    return [r for op in ops for arch in archs for r in found.get((op, arch), [])]


def status(r: hwfit.FitReport) -> str:
    """``OK`` or the problems in a few words (the full sentences are in ``FitReport.problems``)."""
    if r.ok:
        return "OK"
    out = []
    if r.spill_stores or r.local_bytes:
        out.append(f"SPILLS ({r.spill_stores} STL)")
    limit = hwfit.ARCH_LIMITS[r.arch]["smem_per_block"]
    if r.shared_bytes > limit:
        out.append(f"SMEM {r.shared_bytes / 1024:.0f} > {limit / 1024:.0f} KB")
    if r.needs_tensor_cores and r.hmma + r.hgmma == 0:
        out.append("NO MMA")
    return ", ".join(out) or "; ".join(r.problems)


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def table(reports: Sequence[hwfit.FitReport]) -> str:
    """One row per compile; GEMM kernels also show their MMA loop: instructions per iteration, warp-issues per
    1000 FLOPs and the issue-slot ceiling (``hwfit.loop_analysis``)."""
    rows = [(r.kernel, r.variant, r.config, f"sm_{r.arch}", r.registers, r.spill_stores, f"{r.shared_bytes / 1024:.1f}",
             r.hmma, r.hgmma, f"{100 * r.occupancy:.0f}%", _num(r.loop_instructions, "d"), _num(r.issues_per_kflop),
             pct(r.ceiling), status(r)) for r in reports]
    return format_table(("kernel", "variant", "config", "arch", "regs", "spills", "smem KB", "HMMA", "HGMMA",
                         "occupancy", "loop instr", "issues/kFLOP", "ceiling", "status"), rows,
                        align="llllrrrrrrrrrl")


def summary(reports: Sequence[hwfit.FitReport]) -> str:
    """One row per (kernel, arch): how many configs, the worst registers / shared memory, occupancy range."""
    groups: dict[tuple[str, int], list[hwfit.FitReport]] = {}
    for r in reports:
        groups.setdefault((r.kernel, r.arch), []).append(r)
    rows = []
    for (kernel, arch), rs in groups.items():
        mma = "HMMA " + _span([r.hmma for r in rs]) + (f", HGMMA {_span([r.hgmma for r in rs])}" if arch >= 90 else "")
        bad = sum(1 for r in rs if not r.ok)
        ceilings = [r.ceiling for r in rs if r.ceiling is not None]
        rows.append((kernel, f"sm_{arch}", len(rs), max(r.registers for r in rs), sum(r.spill_stores for r in rs),
                     f"{max(r.shared_bytes for r in rs) / 1024:.1f}", mma,
                     f"{100 * min(r.occupancy for r in rs):.0f}-{100 * max(r.occupancy for r in rs):.0f}%",
                     f"{pct(min(ceilings))}-{pct(max(ceilings))}" if ceilings else "",
                     "all OK" if not bad else f"{bad} FAIL"))
    return format_table(("kernel", "arch", "configs", "max regs", "spills", "max smem KB", "tensor-core instr",
                         "occupancy", "ceiling", "status"), rows, align="llrrrrlrrl")


def _span(values: Sequence[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def problems(reports: Sequence[hwfit.FitReport]) -> list[str]:
    return [f"{r.kernel} [{r.variant}] {r.config} sm_{r.arch}: {'; '.join(r.problems)}" for r in reports if not r.ok]
