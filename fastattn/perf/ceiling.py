"""The issue-slot ceiling report (``fastattn ceiling``, and the CPU report's ceiling section).

For each attention kernel, arch, dtype and head dim: the best shipped config of the ``plain`` specialisation (no
mask, no dropout: what long-sequence training runs) beside the minimal reference loop of
:mod:`fastattn.perf.refloop`, compiled in the same run, at fastattn's own tile and at the reference's best tile.
Three families of kernels: ``dense`` (the attention op's _attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq), ``varlen`` (the
same kernels compiled with VARLEN=True, as the packed launches take them, at their own tiles) and ``kvcache`` (the
split-KV decode kernel _kvcache_attn, beside the reference forward loop; one row per shipped query tile, since the
launcher picks BLOCK_M from the query rows, not for speed; the combine kernel has no MMA loop and no row).
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
FAMILIES = {"dense": "attention", "varlen": "varlen", "kvcache": "kvcache"}  # family -> the op listing its specs
KERNELS_OF = {"dense": tuple(refloop.MIRRORS.values()), "varlen": tuple(refloop.MIRRORS.values()),
              "kvcache": ("_kvcache_attn",)}
KERNELS = tuple(dict.fromkeys(k for ks in KERNELS_OF.values() for k in ks))  # + _kvcache_attn
SHORT = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq", "decode": "_kvcache_attn"}
NOTE = ("Issue-slot ceiling = min(1, 4 / (warp-issues per FLOP x peak MMA FLOP per cycle per SM)), from the SASS of "
        "the loop that holds the MMAs (4096 FLOP/cycle on sm_90, 2048 on sm_80, dense fp16/bf16): an upper bound "
        "on tensor-core use that the loop's instruction count allows, not a prediction and not a speed. fastattn: "
        "the best shipped config of the plain specialisation (no mask, no dropout); family dense: the attention "
        "kernels; varlen: the same kernels compiled with VARLEN=True (packed sequences) at the packed launches' "
        "tiles; kvcache: the split-KV decode kernel _kvcache_attn (dense cache, one split, no modifier), one row "
        "per shipped query tile BLOCK_M (picked from the query rows: 16 for a decode step of up to 16 query "
        "heads per KV head), its reference the forward loop _ref_attn_fwd and the reference's best among tiles of "
        "the same BLOCK_M; the combine kernel (_merge_fwd) has no MMA loop and no row. ref: the minimal FA2 "
        "loops of fastattn/perf/refloop.py compiled in the same run, at fastattn's tile (ref@tile) and at their "
        "own best tile; issues x ref@tile = fastattn's issues per FLOP over the reference's at the same tile; "
        "ceiling ratio = fastattn's ceiling over the reference's best. Configs that spill or exceed shared memory "
        "are not candidates.")


def _family(op: str) -> str | None:
    return next((f for f, o in FAMILIES.items() if o == op), None)


def select(dtypes: Sequence[str] = ("float16", "bfloat16"), head_dims: Sequence[int] = refloop.HEAD_DIMS,
           kernels: Sequence[str] = KERNELS, families: Sequence[str] = tuple(FAMILIES)
           ) -> Callable[[hwfit.SpecInfo], bool]:
    """A spec selector for ``fit.run``: the plain specs of these families' kernels and the reference specs beside
    them, of these dtypes (torch names), head dims and fastattn kernels."""
    variants = {f"{dt} D<={d} plain" for dt in dtypes for d in head_dims}
    ours = {(FAMILIES[f], k) for f in families for k in KERNELS_OF[f] if k in kernels}
    refs = {refloop.REFERENCE_OF[k] for _, k in ours}

    def keep(info: hwfit.SpecInfo) -> bool:
        return info.variant in variants and (info.name in refs or (info.op, info.name) in ours)

    return keep


def compile_reports(archs: Sequence[int], *, dtypes: Sequence[str] = ("float16", "bfloat16"),
                    head_dims: Sequence[int] = refloop.HEAD_DIMS, kernels: Sequence[str] = KERNELS,
                    families: Sequence[str] = tuple(FAMILIES), workers: int | None = None,
                    use_cache: bool = True) -> list[hwfit.FitReport]:
    """Compile (or read from the cache) the selected plain specs of these families and their reference loops."""
    ops = [FAMILIES[f] for f in families] + [REFERENCE]
    return fit.run(ops, archs, select=select(dtypes, head_dims, kernels, families), workers=workers,
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


def _block_m(config: str) -> int | None:
    m = re.match(r"BLOCK_M(\d+)-", config)
    return int(m.group(1)) if m else None


def rows(reports: Sequence[hwfit.FitReport]) -> list[dict]:
    """One row per (family, fastattn kernel, arch, variant) present in ``reports`` (fastattn's and the reference's
    together, as ``compile_reports`` returns them), and for the kvcache family per shipped BLOCK_M."""
    variants = {refloop.variant(dt, d) for dt in refloop.DTYPES for d in refloop.HEAD_DIMS}
    refs: dict[tuple[str, int, str], list[hwfit.FitReport]] = {}
    groups: dict[tuple[str, str, int, str, int | None], list[hwfit.FitReport]] = {}
    for r in reports:
        if r.variant not in variants:  # the dtypes and head dims the reference covers
            continue
        if r.kernel in refloop.KERNELS:
            refs.setdefault((r.kernel, r.arch, r.variant), []).append(r)
            continue
        family = _family(r.op)
        if family is None or r.kernel not in KERNELS_OF[family]:
            continue
        block_m = _block_m(r.config) if family == "kvcache" else None
        groups.setdefault((family, r.kernel, r.arch, r.variant, block_m), []).append(r)
    order = {k: i for i, k in enumerate(KERNELS)}
    fam_order = {f: i for i, f in enumerate(FAMILIES)}

    def key(group: tuple) -> tuple:
        (family, kernel, arch, variant, block_m), _ = group
        dtype, head_dim = variant.split()[:2]
        return fam_order[family], order[kernel], arch, dtype != "float16", int(head_dim.removeprefix("D<=")), \
            block_m or 0

    out = []
    for (family, kernel, arch, variant, block_m), mine in sorted(groups.items(), key=key):
        theirs = refs.get((refloop.REFERENCE_OF[kernel], arch, variant), [])
        if block_m is not None:  # a decode tile: the reference with as many query rows
            theirs = [r for r in theirs if _block_m(r.config) == block_m]
        ours, ref_best = _best(mine), _best(theirs)
        same = next((r for r in theirs if ours and r.config == ours.config and r.ceiling is not None), None)
        dtype, head_dim = variant.split()[:2]
        out.append({
            "kernel": kernel, "arch": arch, "dtype": dtype, "head_dim": int(head_dim.removeprefix("D<=")),
            "config": ours.config if ours else (mine[0].config if block_m else None), "mma": _mma(ours),
            "loop_instructions": ours.loop_instructions if ours else None,
            "issues_per_kflop": ours.issues_per_kflop if ours else None,
            "ceiling": ours.ceiling if ours else None,
            "ref_same_tile_issues_per_kflop": same.issues_per_kflop if same else None,
            "ref_same_tile_ceiling": same.ceiling if same else None,
            "issues_vs_ref_same_tile": (ours.issues_per_kflop / same.issues_per_kflop) if (ours and same) else None,
            "ref_config": ref_best.config if ref_best else None, "ref_mma": _mma(ref_best),
            "ref_issues_per_kflop": ref_best.issues_per_kflop if ref_best else None,
            "ref_ceiling": ref_best.ceiling if ref_best else None,
            "ceiling_ratio": (ours.ceiling / ref_best.ceiling) if (ours and ref_best) else None,
            "configs": len(mine), "ref_configs": len(theirs), "family": family,
        })
    return out


def _mma(r: hwfit.FitReport | None) -> str:
    if r is None:
        return ""
    return "HGMMA" if r.hgmma else ("HMMA" if r.hmma else "none")


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def table(rows_: Sequence[dict]) -> str:
    out = [(r["family"], r["kernel"], f"sm_{r['arch']}", r["dtype"], r["head_dim"], _tile(r["config"]),
            r["mma"], fit._num(r["loop_instructions"], "d"), fit._num(r["issues_per_kflop"]), fit.pct(r["ceiling"]),
            fit._num(r["ref_same_tile_issues_per_kflop"]), fit.pct(r["ref_same_tile_ceiling"]),
            _x(r["issues_vs_ref_same_tile"]), _tile(r["ref_config"]),
            fit._num(r["ref_issues_per_kflop"]), fit.pct(r["ref_ceiling"]), _x(r["ceiling_ratio"])) for r in rows_]
    return format_table(("family", "kernel", "arch", "dtype", "D", "fastattn best", "MMA", "loop instr", "issues/kFLOP",
                         "ceiling", "ref@tile issues/kFLOP", "ref@tile ceiling", "issues x ref@tile", "ref best",
                         "ref issues/kFLOP", "ref ceiling", "ceiling ratio"), out, align="lllllllrrrrrrlrrr")
