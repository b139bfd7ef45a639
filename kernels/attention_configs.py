"""Tile tables and their heuristics for kernels/attention.py: which (BLOCK_M, BLOCK_N, num_warps, num_stages) a
launch may take, by kernel, kind of launch, operand class, padded head dim and GPU generation.

Kept apart from the kernels so that retuning a table leaves every compiled kernel's content (and hwfit's compile
cache, keyed by the kernel module's source) unchanged.
"""

import triton

from ._common import arch_class, pick_configs

# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages[, arch class]) by kernel, table, operand class ("16" fp16/bf16,
# "tf32" fp32 with TF32 MMAs, "ieee" fp32 without: FMA dots, the most registers) and padded head dim. For
# _attn_bwd_dkdv BLOCK_N is the key block a program owns and BLOCK_M the query block it streams; for the others
# the other way round. A launch takes (table_for):
#   "decode" with at most DECODE_ROWS query rows: 16-row tiles (forward and dQ: the packed rows of a GQA group;
#            dK/dV: the query block it streams), so a decode step never runs a 64-row tile around one row;
#   "plain"  without a mask tensor, dropout, softcap or ALiBi (causal, a window, sinks and GQA touch only the edge
#            blocks and the prologue): the large tiles and deeper pipelines the issue-slot ceiling asks for;
#   "scores" with softcap or ALiBi (work on every score), "heavy" with a mask tensor or dropout;
# or, where that table has no entry for the GPU, the next heavier one. A fifth element marks a tile for one arch
# class only (90: sm_90's wgmma wants larger tiles than fit sm_80's registers; 80: sm_80 and sm_89). Every tile
# compiles without spills for the archs it serves, with every feature its launches may have (fastattn.ops.attention
# kernel_specs; tests/test_hwfit.py). fp16/bf16 "plain" tiles give wgmma 64 rows per warpgroup (BLOCK_M, dK/dV:
# BLOCK_N >= 16 x num_warps) but for head dim 256's backward, whose wgmma tiles all spill: it takes "heavy"'s.
# A head dim without a "heavy" entry is not served: the launcher runs the eager reference (see `supported`).

TILES = {
    "_attn_fwd": {
        "plain": {"16": {32: [(128, 128, 8, 2)], 64: [(128, 128, 8, 2, 90), (128, 64, 8, 2, 80)],
                         128: [(128, 64, 8, 2, 90), (128, 32, 8, 2, 80)],
                         256: [(64, 32, 4, 1, 90), (64, 16, 4, 2, 80)]}},
        "scores": {"16": {32: [(128, 64, 8, 2)], 64: [(128, 64, 8, 2)], 128: [(128, 32, 8, 2)], 256: [(32, 32, 4, 1)]}},
        "heavy": {
            "16": {32: [(128, 32, 4, 3), (128, 32, 8, 2)], 64: [(128, 64, 8, 3), (64, 64, 4, 3)],
                   128: [(128, 32, 8, 2)], 256: [(32, 32, 8, 1)]},
            "tf32": {32: [(128, 32, 8, 2), (64, 32, 8, 2)], 64: [(64, 32, 8, 2)], 128: [(32, 32, 4, 2), (32, 32, 8, 1)],
                     256: [(32, 32, 8, 1), (16, 16, 8, 1)]},
            "ieee": {32: [(32, 64, 8, 2), (64, 32, 8, 1)], 64: [(16, 64, 8, 2), (32, 32, 8, 2)], 128: [(16, 32, 8, 1)]},
        },
        "decode": {"16": {32: [(16, 64, 4, 2)], 64: [(16, 64, 4, 2)], 128: [(16, 64, 4, 2)], 256: [(16, 32, 4, 1)]}},
    },
    "_attn_bwd_dkdv": {
        "plain": {"16": {32: [(64, 128, 8, 2)], 64: [(32, 128, 8, 2, 90), (32, 128, 8, 1, 80)],
                         128: [(16, 128, 8, 2)]}},
        "scores": {"16": {32: [(32, 128, 8, 2)], 64: [(16, 128, 8, 2)], 128: [(16, 128, 8, 2, 90), (16, 64, 8, 2)]}},
        "heavy": {
            "16": {32: [(16, 64, 4, 1), (16, 32, 4, 2)], 64: [(16, 32, 4, 1)], 128: [(16, 32, 4, 1), (16, 32, 4, 2)],
                   256: [(16, 32, 8, 1)]},
            "tf32": {32: [(16, 64, 8, 2), (16, 32, 8, 1)], 64: [(16, 32, 4, 2)],
                     128: [(32, 32, 8, 1, 90), (16, 16, 4, 1, 80)], 256: [(16, 16, 4, 2, 90), (16, 16, 8, 2, 80)]},
            "ieee": {32: [(16, 32, 4, 2), (32, 32, 8, 1)], 64: [(16, 32, 8, 1)],
                     128: [(16, 16, 4, 2, 90), (16, 16, 8, 1, 80)]},
        },
        "decode": {"16": {32: [(16, 64, 4, 1)], 64: [(16, 32, 4, 1)], 128: [(16, 32, 4, 1)], 256: [(16, 32, 8, 1)]}},
    },
    "_attn_bwd_dq": {
        "plain": {"16": {32: [(128, 64, 8, 2)], 64: [(128, 64, 8, 2)], 128: [(64, 32, 4, 2)],
                         256: [(64, 16, 8, 2, 90)]}},
        "scores": {"16": {32: [(128, 64, 8, 2)], 64: [(128, 32, 8, 2)], 128: [(64, 32, 4, 2)],
                          256: [(64, 16, 8, 2, 90)]}},
        "heavy": {
            "16": {32: [(64, 32, 8, 2), (16, 64, 4, 2)], 64: [(32, 64, 8, 2), (16, 64, 8, 2)],
                   128: [(16, 64, 4, 2), (32, 32, 4, 2)], 256: [(16, 64, 8, 2), (16, 32, 4, 1)]},
            "tf32": {32: [(16, 64, 4, 2), (32, 32, 8, 1)], 64: [(16, 64, 8, 2)], 128: [(32, 64, 8, 2), (16, 64, 8, 2)],
                     256: [(16, 16, 8, 1)]},
            "ieee": {32: [(16, 64, 4, 2)], 64: [(32, 32, 8, 1)], 128: [(16, 16, 8, 2)]},
        },
        "decode": {"16": {32: [(16, 64, 4, 2)], 64: [(16, 64, 4, 2)], 128: [(16, 64, 4, 2)], 256: [(16, 32, 4, 1)]}},
    },
}
# Packed launches (VARLEN: each program loads its sequence's offsets and lengths, and every row and key index is
# offset by them) take a few more registers than the dense ones; where a table's tile spills with VARLEN on, the
# entry here replaces that table's entry for the packed launches of that arch class (every tile marked with its
# arch), found by compiling the VARLEN specialisations (kernel_specs(varlen=True); tests/test_hwfit.py's "varlen").
VARLEN_TILES = {
    "_attn_fwd": {
        "plain": {"16": {256: [(64, 16, 8, 2, 80), (64, 32, 8, 2, 90)]}},
        "heavy": {"tf32": {64: [(64, 32, 8, 1, 80)], 128: [(32, 32, 8, 2, 90), (32, 32, 8, 1, 90)]},
                  "ieee": {32: [(32, 64, 8, 2, 80), (64, 32, 8, 2, 80), (32, 64, 8, 2, 90), (64, 32, 8, 2, 90)]}},
        "decode": {"16": {256: [(16, 32, 8, 1, 90)]}},
    },
    "_attn_bwd_dkdv": {
        "plain": {"16": {32: [(64, 128, 8, 1, 90)], 128: [(16, 64, 8, 2, 80)]}},
        "heavy": {"tf32": {64: [(16, 32, 8, 2, 80), (16, 32, 8, 2, 90)],
                           128: [(16, 16, 8, 2, 80), (32, 32, 4, 1, 90)]}},
        "decode": {"16": {64: [(16, 32, 4, 2, 90)]}},
    },
    "_attn_bwd_dq": {
        "scores": {"16": {128: [(64, 32, 8, 2, 80)]}},
        "heavy": {"16": {32: [(64, 32, 8, 2, 80), (16, 64, 8, 2, 80)], 128: [(16, 64, 4, 2, 90), (32, 32, 8, 2, 90)]},
                  "ieee": {128: [(16, 16, 4, 2, 80)]}},
        "decode": {"16": {32: [(16, 64, 8, 2, 80)]}},
    },
}
TABLES = ("plain", "scores", "heavy", "decode")
DECODE_ROWS = 16  # launches with at most this many query rows (per program's tile space) take the "decode" table
INTERPRETER_TILE = (32, 32, 4, 1)


def operand_class(element_size: int, precision: str) -> str:
    return "16" if element_size <= 2 else ("tf32" if precision == "tf32" else "ieee")


def supported(element_size: int, precision: str, block_d: int) -> bool:
    """Whether every attention kernel has a tile that fits this operand class and padded head dim."""
    cls = operand_class(element_size, precision)
    return all(TILES[k]["heavy"][cls].get(block_d) for k in TILES)


def _entries(tables: dict, kernel: str, table: str, cls: str, block_d: int, arch: int | None) -> list[tuple]:
    tiles = tables.get(kernel, {}).get(table, {}).get(cls, {}).get(block_d, [])
    return [t[:4] for t in tiles if arch is None or len(t) == 4 or t[4] == arch]


def table_entries(kernel: str, table: str, cls: str, block_d: int, arch: int | None = None,
                  varlen: bool = False) -> list[tuple]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles of one table entry that serve ``arch`` (a fifth element
    marks a tile for one arch class only); ``varlen``: VARLEN_TILES' entry for that arch where it has one."""
    own = _entries(VARLEN_TILES, kernel, table, cls, block_d, arch) if varlen and arch is not None else []
    return own or _entries(TILES, kernel, table, cls, block_d, arch)


def table_for(kernel: str, cls: str, block_d: int, kind: str = "heavy", rows: int = 1 << 20,
              arch: int | None = None, varlen: bool = False) -> tuple[str | None, list[tuple]]:
    """(table, tiles) a launch takes: "decode" for at most DECODE_ROWS query rows, else its ``kind`` ("plain": no mask
    tensor, dropout, softcap or ALiBi; "scores": softcap or ALiBi; "heavy": a mask tensor or dropout), else the next
    heavier table with an entry for its arch. ``varlen``: a packed launch (VARLEN_TILES)."""
    order = ["plain", "scores", "heavy"]
    chain = (["decode"] if rows <= DECODE_ROWS else []) + order[order.index(kind):]
    return next(((t, tiles) for t in chain if (tiles := table_entries(kernel, t, cls, block_d, arch, varlen))),
                (None, []))


def tiles_for(kernel: str, element_size: int, precision: str, block_d: int, kind: str = "heavy",
              rows: int = 1 << 20, arch: int | None = None, varlen: bool = False) -> list[tuple]:
    return table_for(kernel, operand_class(element_size, precision), block_d, kind, rows, arch, varlen)[1]


def config(tile) -> triton.Config:
    bm, bn, w, s = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def all_tiles(kernel: str) -> list[tuple]:
    """Every (BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel``'s tables, dense and packed."""
    return sorted({t[:4] for tables in (TILES, VARLEN_TILES) for table in tables.get(kernel, {}).values()
                   for cls in table.values() for ts in cls.values() for t in ts})


def configs(kernel: str):
    """The autotuner's candidates for ``kernel``: every tile of its tables (pruned per launch by ``_prune``)."""
    return pick_configs([config(t) for t in all_tiles(kernel)], config(INTERPRETER_TILE))


def _prune(kernel):
    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:  # the interpreter's single config
            return configs

        def arg(name):
            return kwargs[name] if name in kwargs else named_args[name]

        q = arg("Q")
        kind = "heavy" if arg("MASK_KIND") != 0 or arg("HAS_DROPOUT") else (
            "scores" if arg("HAS_SOFTCAP") or arg("HAS_ALIBI") else "plain")
        arch = arch_class(q.device)
        allowed = tiles_for(kernel, q.element_size(), arg("PRECISION"), max(arg("BLOCK_D"), arg("BLOCK_DV")), kind,
                            arg("ROWS_BUCKET"), arch, bool(arg("VARLEN")))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                in allowed]
    return prune


_KEYS = ["ROWS_BUCKET", "N_BUCKET", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_ALIBI",
         "HAS_SINKS", "MASK_KIND", "HAS_DROPOUT", "VARLEN", "PRECISION"]


def autotune(kernel: str, keys=()):
    """The autotuner of ``kernel`` over its tiles, keyed by the shapes and flags that change the best one."""
    return triton.autotune(configs=configs(kernel), key=_KEYS + list(keys),
                           prune_configs_by={"early_config_prune": _prune(kernel)})
