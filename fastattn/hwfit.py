"""Hardware fit without a GPU: compile every kernel config fastattn can launch for real NVIDIA targets.

Each op module lists what it can launch as :class:`KernelSpec` values (``fastattn.ops.<op>.kernel_specs()``):
the ``@triton.jit`` function, one autotune config and example arguments. :func:`compile_spec` turns the
arguments into the signature Triton's JIT would specialise (dtype of each pointer, ints equal to 1 become
constants, 16-aligned pointers and ints carry ``tt.divisibility``), compiles for ``GPUTarget("cuda", arch, 32)``
and reads the cubin with the ``cuobjdump`` that ships in the triton wheel: registers per thread, local memory
and spill stores (``STL`` in the SASS), shared memory, tensor-core instructions (HMMA on sm_80/sm_89, HGMMA
on sm_90) and the resulting occupancy.

It also measures the **issue-slot ceiling** of each GEMM kernel (:func:`loop_analysis`): the innermost loop whose
body holds the tensor-core instructions (a backward branch in the SASS), its length, warp-issues per FLOP and the
fraction of the tensor cores' peak that so many issues allow. Compiled reports are cached on disk by content
(:func:`spec_key`: kernel source, arguments, config, arch, Triton version), so a spec is compiled once per change.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget

from fastattn._runtime import interpreting, jit_function

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

# -- the issue-slot ceiling --------------------------------------------------------------------------------------
# An SM of sm_80 and sm_90 has four warp schedulers, each issuing at most one warp-instruction per cycle (CUDA C
# Programming Guide, "Compute Capabilities"). A loop of I instructions run by W warps therefore takes at least
# I * W / 4 cycles per iteration, however well memory overlaps, and can keep the tensor cores busy at most
#     ceiling = min(1, ISSUES_PER_CYCLE / (issues per FLOP * MMA_FLOP_PER_CYCLE)).
# It is an upper bound a kernel cannot beat, not a prediction.
ISSUES_PER_CYCLE = 4
MMA_FLOP_PER_CYCLE = {  # dense fp16/bf16 tensor-core FLOP per cycle per SM (fp32 accumulation)
    80: 2048,  # A100 SXM: 312e12 FLOP/s / (108 SMs * 1.41e9 Hz boost), NVIDIA A100 whitepaper
    90: 4096,  # H100 SXM: 989e12 FLOP/s / (132 SMs * 1.83e9 Hz boost), NVIDIA H100 datasheet (dense, not 2:4 sparse)
}  # sm_89 has none: its parts differ (GeForce halves the fp32-accumulate rate), so no ceiling is given there
TF32_RATE = 0.5  # TF32 MMAs run at half the fp16 rate on both (156 and 494 TFLOP/s dense)

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
    # FLOPs of one iteration of the loop that holds the MMAs (e.g. attention's forward 4*BLOCK_M*BLOCK_N*BLOCK_D):
    # the ceiling's denominator. None: not a GEMM loop (or not declared: the Triton IR's tt.dot shapes are used).
    loop_flops: int | None = None
    # The archs whose launches pick this config (a tile the launcher takes on sm_90 only, say); empty: every arch.
    # check() compiles a spec only for these.
    archs: tuple[int, ...] = ()

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
    # The issue-slot ceiling (loop_analysis); None where no loop holds MMA instructions.
    loop_instructions: int | None = None  # SASS instructions per iteration of the MMA loop
    loop_mma: int | None = None  # of which MMA instructions (HMMA / HGMMA)
    issues_per_kflop: float | None = None  # warp-issues per 1000 FLOPs: loop_instructions * num_warps / FLOPs
    ceiling: float | None = None  # min(1, 4 / (issues per FLOP * peak FLOP per cycle)); None without a peak
    loop_note: str = ""  # several MMA loops, unrolling, replicated MMAs, why there is no ceiling

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


# -- SASS and IR reading ------------------------------------------------------------------------------------------

_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([^;]+?)\s*;", re.MULTILINE)
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32), "884": (8, 8, 4)}
_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """``(address, instruction without its predicate)`` for every instruction of a ``cuobjdump -sass`` listing."""
    return [(int(m.group(1), 16), m.group(2)) for m in _SASS_LINE.finditer(sass)]


def mma_flops(instruction: str, num_warps: int) -> int:
    """FLOPs one MMA instruction does for the whole program (0 for other instructions). Each warp issues its own
    HMMA (an m x n x k tile per warp); HGMMA is a warpgroup instruction that all four warps of the group issue."""
    op = instruction.split()[0]
    if op.startswith("HMMA."):
        m, n, k = _HMMA_SHAPES.get(op.split(".")[1], (0, 0, 0))
        return 2 * m * n * k * num_warps
    shape = _HGMMA_SHAPE.match(op)
    if shape:
        m, n, k = map(int, shape.groups())
        return 2 * m * n * k * num_warps // 4
    return 0


@dataclasses.dataclass(frozen=True)
class SassLoop:
    """A loop of the SASS: the instructions from a backward branch's target to the branch itself."""

    start: int  # index of its first instruction in sass_instructions()
    end: int  # index of the backward branch
    mma: int  # MMA instructions in the body
    mma_flops: int  # what they compute per pass, all warps together
    tf32: bool  # the MMAs take TF32 operands (half rate)

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def mma_loops(sass: str, num_warps: int) -> list[SassLoop]:
    """The innermost loops whose bodies hold tensor-core instructions, in address order.

    A loop is a backward branch (``BRA`` to an address at or before itself). Of nested loops that hold MMAs only
    the innermost counts (the dK/dV kernel's query-block loop inside its loop over a GQA group's heads); a loop
    that holds none (a reduction, the trailing ``BRA`` to itself) is ignored."""
    ins = sass_instructions(sass)
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    flops = [mma_flops(text, num_warps) for _, text in ins]
    spans = set()
    for i, (addr, text) in enumerate(ins):
        target = re.findall(r"0x([0-9a-f]+)", text) if text.startswith("BRA") else []
        if target and int(target[-1], 16) <= addr and int(target[-1], 16) in index:
            start = index[int(target[-1], 16)]
            if any(flops[start:i + 1]):
                spans.add((start, i))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [SassLoop(a, b, sum(1 for f in flops[a:b + 1] if f), sum(flops[a:b + 1]),
                     any(f and "TF32" in ins[j][1] for j, f in enumerate(flops[a:b + 1], a)))
            for a, b in sorted(inner)]


_DOT_TYPES = re.compile(r"\btt\.dot\b.*:\s*tensor<(\d+)x(\d+)x\w+>\s*\*\s*tensor<(\d+)x(\d+)x\w+>")


def ir_loop_flops(ttir: str) -> list[int]:
    """FLOPs of one iteration of each innermost ``scf.for`` of the Triton IR that holds ``tt.dot`` ops (2*M*N*K
    per dot, from the operand types: the logical tile, whatever the warps do), in program order. Loops Triton
    unrolled (``tl.range(..., loop_unroll_factor=k)``) hold k iterations' dots here, as in the SASS."""
    stack: list[list] = []  # [indent, flops, holds an inner loop with dots]
    done: list[int] = []
    for line in ttir.splitlines():
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if stack and indent == stack[-1][0] and body.startswith("}"):
            _, f, inner = stack.pop()
            if f and not inner:
                done.append(f)
            if stack and (f or inner):
                stack[-1][2] = True
            continue
        if re.search(r"\bscf\.for\b", body) and body.endswith("{"):
            stack.append([indent, 0, False])
            continue
        dot = _DOT_TYPES.search(body)
        if dot and stack:
            m, k, _, n = map(int, dot.groups())
            stack[-1][1] += 2 * m * n * k
    return done


def loop_analysis(sass: str, ttir: str, num_warps: int, arch: int, loop_flops: int | None) -> dict[str, Any]:
    """The issue-slot ceiling of a compiled kernel: :class:`FitReport`'s ``loop_*``, ``issues_per_kflop`` and
    ``ceiling`` fields.

    The MMA loops come from the SASS (:func:`mma_loops`), each one's FLOPs per pass from the IR
    (:func:`ir_loop_flops`, paired in program order). ``loop_flops`` (what the spec says one iteration does)
    must divide a pass: a pass of k iterations is a loop unrolled k times, and its instructions count per
    iteration. Of several MMA loops (full blocks and edge blocks, say) the leanest one is reported: the ceiling
    of the loop that runs most where sequences are long."""
    loops = mma_loops(sass, num_warps)
    if not loops:
        has_mma = any(mma_flops(t, num_warps) for _, t in sass_instructions(sass))
        return {"loop_note": "no loop holds the MMA instructions (fully unrolled, or no loop)" if has_mma else ""}
    ir = ir_loop_flops(ttir)
    if len(ir) != len(loops):
        ir = ir * len(loops) if len(set(ir)) == 1 else []
    notes, best = [], None
    for i, loop in enumerate(loops):
        per_pass = ir[i] if ir else loop_flops
        if per_pass is None:
            notes.append("the loop's FLOPs are unknown (no loop_flops, and the IR's loops do not pair with the SASS)")
            continue
        unroll = 1
        if loop_flops is not None:
            if per_pass % loop_flops:
                notes.append(f"the spec's loop_flops ({loop_flops}) does not divide the {per_pass} FLOPs of the "
                             "loop's tt.dot ops: fix loop_flops in the op's kernel_specs()")
                continue
            unroll = per_pass // loop_flops
        issues = loop.length * num_warps / per_pass
        if best is None or issues < best[1]:
            best = (loop, issues, unroll, per_pass)
    out: dict[str, Any] = {}
    if best is not None:
        loop, issues, unroll, per_pass = best
        out = {"loop_instructions": round(loop.length / unroll), "loop_mma": round(loop.mma / unroll),
               "issues_per_kflop": 1000 * issues}
        peak = MMA_FLOP_PER_CYCLE.get(arch)
        if peak is None:
            notes.append(f"no peak MMA rate for sm_{arch}, so no ceiling")
        else:
            out["ceiling"] = min(1.0, ISSUES_PER_CYCLE / (issues * peak * (TF32_RATE if loop.tf32 else 1.0)))
        if unroll > 1:
            notes.append(f"unrolled x{unroll}: {loop.length} instructions for {unroll} iterations")
        if loop.mma_flops > per_pass:
            notes.append(f"the MMAs compute {loop.mma_flops / per_pass:.3g}x the loop's FLOPs: warps repeat work (a "
                         "dot tile smaller than the warps' MMA layout)")
        if len(loops) > 1:
            notes.append(f"{len(loops)} MMA loops ({', '.join(str(lp.length) for lp in loops)} instructions), "
                         "the leanest shown")
    out["loop_note"] = "; ".join(notes)
    return out


# -- compiling ----------------------------------------------------------------------------------------------------


def cache_dir() -> str:
    """``$FASTATTN_CACHE_DIR``, default ``~/.cache/fastattn`` (``$XDG_CACHE_HOME/fastattn``)."""
    return os.environ.get("FASTATTN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastattn")


@functools.cache  # once per process: a source edited during a run does not split that run's keys
def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def spec_key(spec: KernelSpec, arch: int) -> str:
    """A content key for one compile: the kernel's source with every function and global it uses (Triton's own
    ``JITFunction.cache_key``), the typed signature, constexprs and alignment, the config, the arch, the Triton
    version, the FP-fusion switch, and the sources of this module (how the cubin is read) and of the kernel's
    module (for module-level values ``cache_key`` does not see)."""
    fn = jit_function(spec.kernel)
    signature, constexprs, attrs = _signature(spec)
    parts = [triton.__version__, _file_hash(__file__), _file_hash(inspect.getsourcefile(fn.fn)), fn.cache_key,
             sorted(signature.items()),
             sorted((k, repr(v)) for k, v in constexprs.items()), sorted(attrs.items()), spec.config.num_warps,
             spec.config.num_stages, arch, spec.loop_flops, spec.needs_tensor_cores,
             os.environ.get("TRITON_DEFAULT_FP_FUSION", "")]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _cache_path(spec: KernelSpec, arch: int) -> str:
    return os.path.join(cache_dir(), "hwfit-specs", f"{spec_key(spec, arch)}.json")


def _load(path: str, spec: KernelSpec) -> FitReport | None:
    try:
        with open(path) as f:
            report = FitReport(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    # the key holds no names: the same compile may serve another spec's labels
    return dataclasses.replace(report, op=spec.op, kernel=spec.name, variant=spec.variant, config=spec.config_label)


def _store(path: str, report: FitReport) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(report), f)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the next run its compile
        pass


def compile_spec(spec: KernelSpec, arch: int, dump_dir: str | None = None, use_cache: bool = True) -> FitReport:
    """Compile ``spec`` for ``sm_<arch>`` and read its resource usage and MMA loop off the cubin.

    With ``use_cache`` a report compiled before from the same content (:func:`spec_key`) is read from
    ``cache_dir()/hwfit-specs`` instead; ``dump_dir`` (the cubin itself is wanted) always compiles."""
    fn = jit_function(spec.kernel)
    if interpreting():
        raise RuntimeError("fastattn.hwfit.compile_spec needs kernels built without TRITON_INTERPRET; "
                           "use fastattn.hwfit.check(), which compiles in clean worker processes")
    path = _cache_path(spec, arch) if use_cache else None
    if path is not None and dump_dir is None:
        report = _load(path, spec)
        if report is not None:
            return report
    signature, constexprs, attrs = _signature(spec)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": spec.config.num_warps, "num_stages": spec.config.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    cubin = compiled.asm["cubin"]
    shared = int(compiled.metadata.shared)
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True,
                             check=True)
        sass = subprocess.run([_bin("cuobjdump"), "-sass", cubin_path], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res.stdout, re.DOTALL)
    if m is None:
        raise RuntimeError(f"could not read cuobjdump -res-usage output for {fn.__name__}:\n{res.stdout}")
    regs, local = int(m.group(1)), int(m.group(3))
    ops = [text.split()[0] for _, text in sass_instructions(sass)]
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
    loop = loop_analysis(sass, compiled.asm.get("ttir", ""), spec.config.num_warps, arch, spec.loop_flops)
    report = FitReport(op=spec.op, kernel=spec.name, variant=spec.variant, config=spec.config_label, arch=arch,
                       registers=regs, local_bytes=local, spill_stores=spill_stores, shared_bytes=shared, hmma=hmma,
                       hgmma=hgmma, occupancy=_occupancy(arch, regs, shared, spec.config.num_warps),
                       needs_tensor_cores=spec.needs_tensor_cores, problems=problems, **loop)
    if path is not None:
        _store(path, report)
    return report


def spec_module(op: str) -> Any:
    """The module whose ``kernel_specs()`` lists ``op``'s specs: ``fastattn.ops.<op>`` for the ops of
    ``fastattn.ops.OPS``, otherwise the module named ``op`` (``fastattn.perf.refloop``, the ceiling's reference
    loops; a test's own kernels)."""
    import importlib

    from fastattn.ops import OPS

    return importlib.import_module(f"fastattn.ops.{op}" if op in OPS else op)


@functools.cache
def _specs_of(op: str) -> list[KernelSpec]:  # once per worker process, not once per compile
    return spec_module(op).kernel_specs()


def all_specs(ops: Iterable[str] | None = None) -> list[KernelSpec]:
    """Every KernelSpec of the ops that exist (``fastattn.ops.<op>.kernel_specs``)."""
    from fastattn.ops import OPS

    return [spec for op in ops or OPS for spec in spec_module(op).kernel_specs()]


@dataclasses.dataclass(frozen=True)
class SpecInfo:
    """What :func:`check`'s ``select`` sees of a spec (listed in a clean worker, like the compiles)."""

    op: str  # as given to check(): an op name or a module name
    index: int
    name: str
    variant: str
    config_label: str
    archs: tuple[int, ...] = ()  # KernelSpec.archs


def _list_specs(op: str) -> list[SpecInfo]:
    return [SpecInfo(op, i, s.name, s.variant, s.config_label, s.archs) for i, s in enumerate(_specs_of(op))]


def _compile_indexed(job: tuple[str, int, int, str | None, bool]) -> FitReport:
    op, index, arch, dump_dir, use_cache = job
    return compile_spec(_specs_of(op)[index], arch, dump_dir, use_cache)


def check(ops: Iterable[str] | None = None, archs: Iterable[int] = (80, 90), workers: int | None = None,
          dump_dir: str | None = None, progress=None, select=None, use_cache: bool = True) -> list[FitReport]:
    """Compile every spec of ``ops`` for every arch in ``workers`` fresh processes (default: all cores); see
    :func:`check_pairs`, which also says which listing each report came from."""
    return [r for _, r in check_pairs(ops, archs, workers, dump_dir, progress, select, use_cache)]


def check_pairs(ops: Iterable[str] | None = None, archs: Iterable[int] = (80, 90), workers: int | None = None,
                dump_dir: str | None = None, progress=None, select=None,
                use_cache: bool = True) -> list[tuple[SpecInfo, FitReport]]:
    """``(spec info, report)`` for every spec of ``ops`` on every arch it serves (``KernelSpec.archs``), compiled in
    ``workers`` fresh processes.

    ``select(info: SpecInfo) -> bool`` keeps a subset; ``progress(done, total, report)`` is called as compiles
    finish. The workers start without ``TRITON_INTERPRET`` so that they build real ``JITFunction`` kernels even
    when this process (a test run) uses the interpreter; the specs are listed there too, since config lists
    depend on the interpreter switch (``kernels._common.pick_configs``). ``use_cache``: reuse the reports of
    earlier compiles of the same content (:func:`compile_spec`). ``ops`` are op names or spec module names
    (:func:`spec_module`).
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
            chosen = [(i, arch) for i in infos if select is None or select(i) for arch in archs
                      if not i.archs or arch in i.archs]
            futures = [pool.submit(_compile_indexed, (i.op, i.index, arch, dump_dir, use_cache)) for i, arch in chosen]
            results = []
            for (info, _), future in zip(chosen, futures):
                results.append((info, future.result()))
                if progress:
                    progress(len(results), len(chosen), results[-1][1])
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return results
