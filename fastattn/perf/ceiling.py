"""The issue-slot ceiling report (``fastattn ceiling``, and the CPU report's ceiling section).

For each attention kernel, arch, dtype and head dim: the best shipped config of the ``plain`` specialisation (no
mask, no dropout: what long-sequence training runs) beside the minimal reference loop of
:mod:`fastattn.perf.refloop`, compiled in the same run, at fastattn's own tile and at the reference's best tile.
Every number is an issue-slot ceiling (``hwfit.loop_analysis``): an upper bound on tensor-core utilisation that the
loop's instruction count allows, never a speed. "Best" is the highest ceiling among configs that fit (no spills,
shared memory within the limit), then the fewest issues per FLOP.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from fastattn import hwfit
from fastattn.perf import fit, refloop
from fastattn.perf.report import format_table

REFERENCE = "fastattn.perf.refloop"  # the spec module of the reference loops (hwfit.spec_module)
KERNELS = tuple(refloop.MIRRORS.values())  # _attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq
SHORT = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}
NOTE = ("Issue-slot ceiling = min(1, 4 / (warp-issues per FLOP x peak MMA FLOP per cycle per SM)), from the SASS of "
        "the loop that holds the MMAs (4096 FLOP/cycle on sm_90, 2048 on sm_80, dense fp16/bf16): an upper bound "
        "on tensor-core use that the loop's instruction count allows, not a prediction and not a speed. fastattn: "
        "the best shipped config of the plain specialisation (no mask, no dropout); ref: the minimal FA2 loop of "
        "fastattn/perf/refloop.py compiled in the same run, at fastattn's tile (ref@tile) and at its own best "
        "tile; issues x ref@tile = fastattn's issues per FLOP over the reference's at the same tile; ceiling "
        "ratio = fastattn's ceiling over the reference's best. Configs that spill or exceed shared memory are not "
        "candidates.")


def select(dtypes: Sequence[str] = ("float16", "bfloat16"), head_dims: Sequence[int] = refloop.HEAD_DIMS,
           kernels: Sequence[str] = KERNELS) -> Callable[[hwfit.SpecInfo], bool]:
    """A spec selector for ``fit.run``: the plain attention specs and the reference specs of these dtypes (torch
    names), head dims and fastattn kernels."""
    variants = {f"{dt} D<={d} plain" for dt in dtypes for d in head_dims}

    def keep(info: hwfit.SpecInfo) -> bool:
        return info.variant in variants and refloop.MIRRORS.get(info.name, info.name) in kernels

    return keep


def compile_reports(archs: Sequence[int], *, dtypes: Sequence[str] = ("float16", "bfloat16"),
                    head_dims: Sequence[int] = refloop.HEAD_DIMS, kernels: Sequence[str] = KERNELS,
                    workers: int | None = None, use_cache: bool = True) -> list[hwfit.FitReport]:
    """Compile (or read from the cache) the selected plain attention specs and their reference loops."""
    return fit.run(["attention", REFERENCE], archs, select=select(dtypes, head_dims, kernels), workers=workers,
                   use_cache=use_cache)


def _best(reports: Sequence[hwfit.FitReport]) -> hwfit.FitReport | None:
    fits = [r for r in reports if r.ok and r.ceiling is not None]
    return max(fits, key=lambda r: (r.ceiling, -r.issues_per_kflop)) if fits else None


def _tile(config: str | None) -> str:
    """``BLOCK_M128-BLOCK_N32-w8-s2`` -> ``128x32 w8 s2``."""
    if config is None:
        return "-"
    m = re.fullmatch(r"BLOCK_M(\d+)-BLOCK_N(\d+)-(.*)", config)
    return f"{m.group(1)}x{m.group(2)} {m.group(3).replace('-', ' ')}" if m else config


def rows(reports: Sequence[hwfit.FitReport]) -> list[dict]:
    """One row per (fastattn kernel, arch, variant) present in ``reports`` (fastattn's and the reference's
    together, as ``compile_reports`` returns them)."""
    variants = {refloop.variant(dt, d) for dt in refloop.DTYPES for d in refloop.HEAD_DIMS}
    groups: dict[tuple[str, int, str], dict[str, list[hwfit.FitReport]]] = {}
    for r in reports:
        kernel = refloop.MIRRORS.get(r.kernel, r.kernel)
        if kernel not in KERNELS or r.variant not in variants:  # the dtypes and head dims the reference covers
            continue
        side = "ref" if r.kernel in refloop.MIRRORS else "fastattn"
        groups.setdefault((kernel, r.arch, r.variant), {"fastattn": [], "ref": []})[side].append(r)
    out = []
    order = {k: i for i, k in enumerate(KERNELS)}

    def key(group: tuple) -> tuple:
        (kernel, arch, variant), _ = group
        dtype, head_dim = variant.split()[:2]
        return order[kernel], arch, dtype != "float16", int(head_dim.removeprefix("D<="))

    for (kernel, arch, variant), sides in sorted(groups.items(), key=key):
        ours, ref_best = _best(sides["fastattn"]), _best(sides["ref"])
        same = next((r for r in sides["ref"] if ours and r.config == ours.config and r.ceiling is not None), None)
        dtype, head_dim = variant.split()[:2]
        out.append({
            "kernel": kernel, "arch": arch, "dtype": dtype, "head_dim": int(head_dim.removeprefix("D<=")),
            "config": ours.config if ours else None, "mma": _mma(ours), "loop_instructions":
            ours.loop_instructions if ours else None, "issues_per_kflop": ours.issues_per_kflop if ours else None,
            "ceiling": ours.ceiling if ours else None,
            "ref_same_tile_issues_per_kflop": same.issues_per_kflop if same else None,
            "ref_same_tile_ceiling": same.ceiling if same else None,
            "issues_vs_ref_same_tile": (ours.issues_per_kflop / same.issues_per_kflop) if (ours and same) else None,
            "ref_config": ref_best.config if ref_best else None, "ref_mma": _mma(ref_best),
            "ref_issues_per_kflop": ref_best.issues_per_kflop if ref_best else None,
            "ref_ceiling": ref_best.ceiling if ref_best else None,
            "ceiling_ratio": (ours.ceiling / ref_best.ceiling) if (ours and ref_best) else None,
            "configs": len(sides["fastattn"]), "ref_configs": len(sides["ref"]),
        })
    return out


def _mma(r: hwfit.FitReport | None) -> str:
    if r is None:
        return ""
    return "HGMMA" if r.hgmma else ("HMMA" if r.hmma else "none")


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def table(rows_: Sequence[dict]) -> str:
    out = [(r["kernel"], f"sm_{r['arch']}", r["dtype"], r["head_dim"], _tile(r["config"]),
            r["mma"], fit._num(r["loop_instructions"], "d"), fit._num(r["issues_per_kflop"]), fit.pct(r["ceiling"]),
            fit._num(r["ref_same_tile_issues_per_kflop"]), fit.pct(r["ref_same_tile_ceiling"]),
            _x(r["issues_vs_ref_same_tile"]), _tile(r["ref_config"]),
            fit._num(r["ref_issues_per_kflop"]), fit.pct(r["ref_ceiling"]), _x(r["ceiling_ratio"])) for r in rows_]
    return format_table(("kernel", "arch", "dtype", "D", "fastattn best", "MMA", "loop instr", "issues/kFLOP",
                         "ceiling", "ref@tile issues/kFLOP", "ref@tile ceiling", "issues x ref@tile", "ref best",
                         "ref issues/kFLOP", "ref ceiling", "ceiling ratio"), out, align="llllllrrrrrrlrrr")
