"""Hardware fit without a GPU: compile every kernel config fastattn can launch for real NVIDIA targets.

Each op module lists what it can launch as :class:`KernelSpec` values (``fastattn.ops.<op>.kernel_specs()``):
the ``@triton.jit`` function, one autotune config and example arguments. :func:`compile_spec` turns the
arguments into the signature Triton's JIT would specialise (dtype of each pointer, ints equal to 1 become
constants, 16-aligned pointers and ints carry ``tt.divisibility``), compiles for ``GPUTarget("cuda", arch, 32)``
and reads the cubin with the ``cuobjdump`` that ships in the triton wheel: registers per thread, local memory
and spill stores (``STL`` in the SASS), shared memory, tensor-core instructions (HMMA on sm_80/sm_89, HGMMA
on sm_90) and the resulting occupancy.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget

from fastattn._runtime import jit_function

# Per-SM limits of the targets we report on (CUDA C Programming Guide, "Compute capabilities").
ARCH_LIMITS = {
    80: {"name": "sm_80 (A100)", "smem_per_block": 166912, "smem_per_sm": 167936, "regs_per_sm": 65536,
         "max_warps": 64},
    89: {"name": "sm_89 (L40/RTX 4090)", "smem_per_block": 101376, "smem_per_sm": 102400, "regs_per_sm": 65536,
         "max_warps": 48},
    90: {"name": "sm_90 (H100)", "smem_per_block": 232448, "smem_per_sm": 233472, "regs_per_sm": 65536,
         "max_warps": 64},
}
MAX_BLOCKS_PER_SM = 32

_TORCH_TO_TRITON = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.bool: "i1", torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32",
    torch.int64: "i64",
}


@dataclasses.dataclass
class KernelSpec:
    """One launchable (kernel, config, specialisation) triple."""

    op: str  # public op family, e.g. "attention"
    kernel: Any  # the @triton.jit function (autotune/heuristics wrappers are looked through)
    args: dict[str, Any]  # every non-config argument by name: tensors (dtype matters), ints, floats, None
    config: triton.Config  # the autotune config: its kwargs are constexprs, plus num_warps / num_stages
    variant: str  # the specialisation in words, e.g. "fp16 D=64 causal"
    needs_tensor_cores: bool = False  # a GEMM kernel: the report fails if it compiles to no MMA instruction

    @property
    def name(self) -> str:
        return jit_function(self.kernel).__name__

    @property
    def config_label(self) -> str:
        parts = [f"{k}{v}" for k, v in self.config.kwargs.items()]
        parts += [f"w{self.config.num_warps}", f"s{self.config.num_stages}"]
        return "-".join(str(p) for p in parts)


@dataclasses.dataclass
class FitReport:
    op: str
    kernel: str
    variant: str
    config: str
    arch: int
    registers: int
    local_bytes: int
    spill_stores: int
    shared_bytes: int
    hmma: int
    hgmma: int
    occupancy: float  # resident warps / max warps per SM
    needs_tensor_cores: bool
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _signature(spec: KernelSpec) -> tuple[dict, dict, dict]:
    fn = jit_function(spec.kernel)
    consts = dict(spec.config.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[name] = consts[name]
            continue
        if name not in spec.args:
            raise KeyError(f"KernelSpec for {fn.__name__} has no value for argument {name!r}")
        value = spec.args[name]
        param = fn.params[i]
        if param.is_constexpr or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"KernelSpec for {fn.__name__}: cannot type argument {name!r}={value!r}")
    return signature, constexprs, attrs


def cubin_name(spec: KernelSpec, arch: int) -> str:
    """``<kernel function name>-<config>-<arch>.cubin``; the config part starts with the variant, so every spec
    has its own file, and holds no ``-``, so the name splits into exactly three fields on ``-``."""
    variant = re.sub(r"[^A-Za-z0-9_.=+]+", "_", spec.variant.replace("<=", "le"))
    config = spec.config_label.replace("-", ".")
    return f"{spec.name}-{variant}.{config}-sm_{arch}.cubin"


def _bin(tool: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _occupancy(arch: int, regs: int, shared: int, num_warps: int) -> float:
    lim = ARCH_LIMITS[arch]
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = lim["regs_per_sm"] // (regs_per_warp * num_warps)
    by_warps = lim["max_warps"] // num_warps
    by_smem = lim["smem_per_sm"] // (shared + 1024) if shared else MAX_BLOCKS_PER_SM
    blocks = min(by_regs, by_warps, by_smem, MAX_BLOCKS_PER_SM)
    return blocks * num_warps / lim["max_warps"]


def compile_spec(spec: KernelSpec, arch: int, dump_dir: str | None = None) -> FitReport:
    """Compile ``spec`` for ``sm_<arch>`` and read its resource usage off the cubin."""
    fn = jit_function(spec.kernel)
    if type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("fastattn.hwfit.compile_spec needs kernels built without TRITON_INTERPRET; "
                           "use fastattn.hwfit.check(), which compiles in clean worker processes")
    signature, constexprs, attrs = _signature(spec)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": spec.config.num_warps, "num_stages": spec.config.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    cubin = compiled.asm["cubin"]
    shared = int(compiled.metadata.shared)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res.stdout, re.DOTALL)
    if m is None:
        raise RuntimeError(f"could not read cuobjdump -res-usage output for {fn.__name__}:\n{res.stdout}")
    regs, local = int(m.group(1)), int(m.group(3))
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.MULTILINE)
    spill_stores = sum(1 for o in ops if o.startswith("STL"))
    hmma = sum(1 for o in ops if o.startswith("HMMA"))
    hgmma = sum(1 for o in ops if o.startswith("HGMMA"))
    lim = ARCH_LIMITS[arch]
    problems = []
    if local or spill_stores:
        problems.append(f"spills: {local} bytes of local memory, {spill_stores} spill stores")
    if shared > lim["smem_per_block"]:
        problems.append(f"shared memory {shared} B exceeds the {lim['smem_per_block']} B per block of sm_{arch}")
    if spec.needs_tensor_cores and hmma + hgmma == 0:
        problems.append("no tensor-core instruction (HMMA/HGMMA) in the SASS")
    if dump_dir is not None:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, cubin_name(spec, arch)), "wb") as f:
            f.write(cubin)
    return FitReport(op=spec.op, kernel=spec.name, variant=spec.variant, config=spec.config_label, arch=arch,
                     registers=regs, local_bytes=local, spill_stores=spill_stores, shared_bytes=shared, hmma=hmma,
                     hgmma=hgmma, occupancy=_occupancy(arch, regs, shared, spec.config.num_warps),
                     needs_tensor_cores=spec.needs_tensor_cores, problems=problems)


def all_specs(ops: Iterable[str] | None = None) -> list[KernelSpec]:
    """Every KernelSpec of the ops that exist (``fastattn.ops.<op>.kernel_specs``)."""
    import importlib

    from fastattn.ops import OPS

    specs: list[KernelSpec] = []
    for op in ops or OPS:
        module = importlib.import_module(f"fastattn.ops.{op}")
        specs.extend(module.kernel_specs())
    return specs


@dataclasses.dataclass(frozen=True)
class SpecInfo:
    """What :func:`check`'s ``select`` sees of a spec (listed in a clean worker, like the compiles)."""

    op: str
    index: int
    name: str
    variant: str
    config_label: str


def _list_specs(op: str) -> list[SpecInfo]:
    import importlib

    specs = importlib.import_module(f"fastattn.ops.{op}").kernel_specs()
    return [SpecInfo(op, i, s.name, s.variant, s.config_label) for i, s in enumerate(specs)]


def _compile_indexed(job: tuple[str, int, int, str | None]) -> FitReport:
    op, index, arch, dump_dir = job
    import importlib

    spec = importlib.import_module(f"fastattn.ops.{op}").kernel_specs()[index]
    return compile_spec(spec, arch, dump_dir)


def check(ops: Iterable[str] | None = None, archs: Iterable[int] = (80, 90), workers: int | None = None,
          dump_dir: str | None = None, progress=None, select=None) -> list[FitReport]:
    """Compile every spec of ``ops`` for every arch in ``workers`` fresh processes (default: all cores).

    ``select(info: SpecInfo) -> bool`` keeps a subset; ``progress(done, total, report)`` is called as compiles
    finish. The workers start without ``TRITON_INTERPRET`` so that they build real ``JITFunction`` kernels even
    when this process (a test run) uses the interpreter; the specs are listed there too, since config lists
    depend on the interpreter switch (``kernels._common.pick_configs``).
    """
    import concurrent.futures
    import multiprocessing

    from fastattn.ops import OPS

    ops = list(ops or OPS)
    archs = list(archs)
    workers = max(1, workers or os.cpu_count() or 1)
    # Workers are spawned as work is submitted, so the variable stays unset until the last job is queued.
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        with pool:
            infos = [info for listing in pool.map(_list_specs, ops) for info in listing]
            jobs = [(i.op, i.index, arch, dump_dir) for i in infos if select is None or select(i) for arch in archs]
            futures = [pool.submit(_compile_indexed, job) for job in jobs]
            results = []
            for future in futures:
                results.append(future.result())
                if progress:
                    progress(len(results), len(jobs), results[-1])
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return results
