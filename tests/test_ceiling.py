"""The issue-slot ceiling (fastattn.hwfit.loop_analysis, fastattn.perf.ceiling): the SASS loop finder and the IR
FLOP count on written listings, the arithmetic, then both on kernels compiled here (tests/loop_kernels.py: GEMM
loops of a known MMA count, nested, unrolled, fully unrolled; and one shipped attention config). No GPU needed."""

from __future__ import annotations

import os

import pytest

from fastattn import hwfit
from fastattn.perf import ceiling, refloop

HMMA = "HMMA.16816.F32 R4, R8, R12, R4"  # 2*16*8*16 = 4096 FLOP per warp
HGMMA = "HGMMA.64x64x16.F32 R24, gdesc[UR8], R24"  # 2*64*64*16 FLOP per warpgroup


def _sass(body: list[str]) -> str:
    """A cuobjdump-style listing; ``BRA @name`` / ``@name:`` are resolved to addresses."""
    labels, lines, addr = {}, [], 0
    for text in body:
        if text.endswith(":"):
            labels[text[:-1]] = addr
        else:
            lines.append((addr, text))
            addr += 16
    out = ["\tcode for sm_80", "\t\tFunction : k"]
    for addr, text in lines:
        for name, target in labels.items():
            text = text.replace(f"@{name}", hex(target))
        out.append(f"        /*{addr:04x}*/                   {text} ;                /* 0x000000000000 */")
        out.append("                                                                  /* 0x000fe20000000f00 */")
    return "\n".join(out)


def _ttir(loops: list[list[tuple[int, int, int]]], nest: bool = False) -> str:
    """Triton-IR-like text: one scf.for per entry of ``loops`` holding tt.dot ops of the given (M, N, K); with
    ``nest`` the loops are nested in an outer loop without dots of its own."""
    lines, pad = ["module {", "  tt.func public @k() {"], "    "
    if nest:
        lines.append(f"{pad}%o = scf.for %r = %c0 to %R step %c1 iter_args() -> ()  : i32 {{")
        pad += "  "
    for dots in loops:
        lines.append(f"{pad}%acc = scf.for %i = %c0 to %K step %c32 iter_args(%a = %z) -> (tensor<64x64xf32>) "
                     " : i32 {")
        for m, n, k in dots:
            lines.append(f"{pad}  %d = tt.dot %x, %y, %a, inputPrecision = tf32 : tensor<{m}x{k}xf16> * "
                         f"tensor<{k}x{n}xf16> -> tensor<{m}x{n}xf32> loc(#loc1)")
        lines.append(f"{pad}  scf.yield %d : tensor<64x64xf32> loc(#loc2)")
        lines.append(f"{pad}}} loc(#loc3)")
    if nest:
        lines.append(f"{pad[:-2]}}} loc(#loc4)")
    return "\n".join(lines + ["  } loc(#loc)", "} loc(#loc)"])


def test_mma_loops_innermost_loop_holding_mmas():
    body = ["MOV R1, c[0x0][0x28]", "outer:", "IADD3 R2, R2, 1, RZ",
            "inner:", "LDS.128 R8, [R2]", HMMA, HMMA, "FADD R4, R4, R5", "ISETP.GE.AND P0, PT, R2, R3, PT",
            "@P0 BRA @inner",
            "red:", "FADD R6, R6, R7", "@P1 BRA @red",  # a loop without MMAs: not an MMA loop
            "@P2 BRA @outer", "EXIT", "end:", "BRA @end"]  # the trailing self-branch
    loops = hwfit.mma_loops(_sass(body), num_warps=4)
    assert len(loops) == 1
    (loop,) = loops
    assert (loop.length, loop.mma, loop.mma_flops, loop.tf32) == (6, 2, 2 * 4096 * 4, False)
    assert hwfit.sass_instructions(_sass(body))[loop.start][1].startswith("LDS.128")
    assert hwfit.mma_loops(_sass(["MOV R1, R2", HMMA, "EXIT"]), 4) == []  # straight-line MMAs: no loop
    hg = hwfit.mma_loops(_sass(["top:", HGMMA, "@P0 BRA @top"]), num_warps=8)
    assert hg[0].mma_flops == 2 * 64 * 64 * 16 * 2  # two warpgroups, each warp issuing the group's instruction


def test_ir_loop_flops_innermost_loops_in_order():
    assert hwfit.ir_loop_flops(_ttir([[(128, 64, 64), (128, 64, 64)]])) == [2 * 2 * 128 * 64 * 64]
    assert hwfit.ir_loop_flops(_ttir([[(64, 64, 32)], [(16, 16, 16)]], nest=True)) == [2 * 64 * 64 * 32,
                                                                                        2 * 16 * 16 * 16]
    assert hwfit.ir_loop_flops(_ttir([[]])) == []


def test_loop_analysis_arithmetic():
    loop_flops = 2 * 64 * 64 * 32
    sass = _sass(["top:"] + ["FADD R1, R1, R2"] * 7 + [HMMA] * 8 + ["@P0 BRA @top", "EXIT"])  # 16 instructions
    got = hwfit.loop_analysis(sass, _ttir([[(64, 64, 32)]]), num_warps=4, arch=90, loop_flops=loop_flops)
    issues = 16 * 4 / loop_flops  # warp-issues per FLOP
    assert got["loop_instructions"] == 16 and got["loop_mma"] == 8
    assert got["issues_per_kflop"] == pytest.approx(1000 * issues)
    assert got["ceiling"] == pytest.approx(min(1.0, 4 / (issues * 4096)))
    assert got["loop_note"] == ""
    # a longer body on sm_80's 2048 FLOP/cycle: below 1
    long = _sass(["top:"] + ["FADD R1, R1, R2"] * 300 + [HMMA] * 8 + ["@P0 BRA @top"])
    got = hwfit.loop_analysis(long, _ttir([[(64, 64, 32)]]), 4, 80, loop_flops)
    assert got["ceiling"] == pytest.approx(4 / (309 * 4 / loop_flops * 2048)) and got["ceiling"] < 1
    assert hwfit.loop_analysis(long, _ttir([[(64, 64, 32)]]), 4, 89, loop_flops).get("ceiling") is None
    # TF32 MMAs: half the peak rate, so the same issues leave a higher ceiling
    tf32 = long.replace("HMMA.16816.F32 ", "HMMA.1688.F32.TF32 ")
    got32 = hwfit.loop_analysis(tf32, _ttir([[(64, 64, 32)]]), 4, 80, loop_flops)
    assert got32["ceiling"] == pytest.approx(2 * got["ceiling"])
    # a pass of two iterations (unrolled): instructions counted per iteration
    got = hwfit.loop_analysis(sass, _ttir([[(64, 64, 32), (64, 64, 32)]]), 4, 90, loop_flops)
    assert got["loop_instructions"] == 8 and "unrolled x2" in got["loop_note"]
    assert got["issues_per_kflop"] == pytest.approx(1000 * 16 * 4 / (2 * loop_flops))
    # a spec whose loop_flops does not divide the loop's dots: no ceiling, and the note says what to fix
    got = hwfit.loop_analysis(sass, _ttir([[(64, 64, 32)]]), 4, 90, 3 * loop_flops)
    assert got.get("ceiling") is None and "loop_flops" in got["loop_note"]
    # MMAs straight-line, none at all
    assert "no loop holds" in hwfit.loop_analysis(_sass([HMMA, "EXIT"]), "", 4, 90, loop_flops)["loop_note"]
    assert hwfit.loop_analysis(_sass(["top:", "FADD R1, R1, R2", "@P0 BRA @top"]), "", 4, 90, None) == {
        "loop_note": ""}


def _report(kernel, variant, config, arch, ceiling_, issues, ok=True, op="attention"):
    return hwfit.FitReport(op=op, kernel=kernel, variant=variant, config=config, arch=arch, registers=128,
                           local_bytes=0, spill_stores=0 if ok else 4, shared_bytes=1024, hmma=0, hgmma=8,
                           occupancy=0.25, needs_tensor_cores=True, problems=[] if ok else ["spills"],
                           loop_instructions=300, issues_per_kflop=issues, ceiling=ceiling_)


def test_ceiling_rows_pick_best_fitting_configs():
    v = "float16 D<=64 plain"
    reports = [
        _report("_attn_fwd", v, "BLOCK_M128-BLOCK_N64-w8-s3", 90, 0.57, 1.70),
        _report("_attn_fwd", v, "BLOCK_M64-BLOCK_N64-w4-s3", 90, 0.54, 1.80),
        _report("_attn_fwd", "float16 D<=64 causal+floatmask+grad+dropout", "BLOCK_M128-BLOCK_N64-w8-s3", 90, 0.9,
                1.0),  # not the plain specialisation: ignored
        _report("_ref_attn_fwd", v, "BLOCK_M128-BLOCK_N64-w8-s3", 90, 1.0, 0.70),
        _report("_ref_attn_fwd", v, "BLOCK_M128-BLOCK_N128-w8-s2", 90, 1.0, 0.55),
        _report("_ref_attn_fwd", v, "BLOCK_M128-BLOCK_N256-w8-s2", 90, 1.0, 0.40, ok=False),  # spills: no candidate
        _report("_attn_fwd", "float32/tf32 D<=64 plain", "BLOCK_M128-BLOCK_N32-w8-s2", 90, 0.5, 1.0),  # no reference
    ]
    (row,) = ceiling.rows(reports)
    assert (row["family"], row["kernel"], row["arch"], row["dtype"], row["head_dim"]) == ("dense", "_attn_fwd", 90,
                                                                                          "float16", 64)
    assert row["config"] == "BLOCK_M128-BLOCK_N64-w8-s3" and row["ceiling"] == 0.57
    assert row["ref_same_tile_issues_per_kflop"] == 0.70 and row["issues_vs_ref_same_tile"] == pytest.approx(1.7 / 0.7)
    assert row["ref_config"] == "BLOCK_M128-BLOCK_N128-w8-s2" and row["ceiling_ratio"] == pytest.approx(0.57)
    text = ceiling.table([row])
    assert "128x64 w8 s3" in text and "57%" in text and "0.57x" in text and "dense" in text


def test_ceiling_rows_varlen_and_kvcache_families():
    """The packed (VARLEN) builds are their own rows beside the same reference; the decode kernel gets a row per
    query tile, against the reference forward loop with as many query rows; the append and combine none."""
    v = "float16 D<=64 plain"
    ref = [_report("_ref_attn_fwd", v, "BLOCK_M128-BLOCK_N128-w8-s2", 90, 1.0, 0.55, op="reference"),
           _report("_ref_attn_fwd", v, "BLOCK_M16-BLOCK_N64-w4-s3", 90, 0.9, 1.10, op="reference"),
           _report("_ref_attn_fwd", v, "BLOCK_M64-BLOCK_N64-w4-s3", 90, 1.0, 0.80, op="reference"),
           _report("_ref_attn_fwd", v, "BLOCK_M64-BLOCK_N128-w8-s2", 90, 1.0, 0.70, op="reference")]
    ours = [_report("_attn_fwd", v, "BLOCK_M128-BLOCK_N128-w8-s2", 90, 0.96, 1.0),
            _report("_attn_fwd", v, "BLOCK_M128-BLOCK_N64-w8-s2", 90, 0.80, 1.2, op="varlen"),
            _report("_varlen_tail", "float16 DV<=64", "BLOCK_T64-BLOCK_DV64-w4-s3", 90, None, None, op="varlen"),
            _report("_kvcache_attn", v, "BLOCK_M64-BLOCK_N64-w4-s3", 90, 0.68, 1.43, op="kvcache"),
            _report("_kvcache_attn", v, "BLOCK_M16-BLOCK_N64-w4-s3", 90, 0.27, 3.56, op="kvcache"),
            _report("_kvcache_attn", v, "BLOCK_M32-BLOCK_N64-w4-s3", 90, 0.37, 2.64, op="kvcache", ok=False),
            _report("_kvcache_append", "float16 D<=64 dense", "BLOCK_T16-BLOCK_D64-w4-s3", 90, None, None,
                    op="kvcache"),
            _report("_merge_fwd", "fp32 partials -> float16 D<=64", "BLOCK_D64-w4-s3", 90, None, None, op="kvcache")]
    got = ceiling.rows([*ref, *ours])
    assert [(r["family"], r["kernel"], r["config"]) for r in got] == [
        ("dense", "_attn_fwd", "BLOCK_M128-BLOCK_N128-w8-s2"), ("varlen", "_attn_fwd", "BLOCK_M128-BLOCK_N64-w8-s2"),
        ("kvcache", "_kvcache_attn", "BLOCK_M16-BLOCK_N64-w4-s3"),
        ("kvcache", "_kvcache_attn", "BLOCK_M32-BLOCK_N64-w4-s3"),  # spills: a row without a ceiling
        ("kvcache", "_kvcache_attn", "BLOCK_M64-BLOCK_N64-w4-s3")]
    dense, varlen, k16, k32, k64 = got
    assert varlen["ref_config"] == dense["ref_config"] == "BLOCK_M128-BLOCK_N128-w8-s2"
    assert varlen["ref_same_tile_ceiling"] is None and varlen["ceiling_ratio"] == pytest.approx(0.80)
    assert k16["ref_config"] == "BLOCK_M16-BLOCK_N64-w4-s3" and k16["ref_configs"] == 1  # same BLOCK_M only
    assert k16["issues_vs_ref_same_tile"] == pytest.approx(3.56 / 1.10) and k16["ceiling_ratio"] == pytest.approx(0.3)
    assert k32["ceiling"] is None and k32["ref_config"] is None
    assert k64["ref_config"] == "BLOCK_M64-BLOCK_N128-w8-s2" and k64["ref_configs"] == 2
    assert k64["issues_vs_ref_same_tile"] == pytest.approx(1.43 / 0.80) and k64["configs"] == 1
    text = ceiling.table(got)
    assert "varlen" in text and "_kvcache_attn" in text and "16x64 w4 s3" in text


def test_select_and_cpu_report_section(monkeypatch, tmp_path):
    from fastattn.perf import cpu, fit, report

    keep = ceiling.select(dtypes=("float16",), head_dims=(64,), kernels=("_attn_bwd_dq",))

    def info(name, variant, op="attention"):
        return hwfit.SpecInfo(op, 0, name, variant, "BLOCK_M32-BLOCK_N64-w8-s2")

    assert keep(info("_attn_bwd_dq", "float16 D<=64 plain")) and keep(info("_ref_attn_bwd_dq", "float16 D<=64 plain"))
    assert keep(info("_attn_bwd_dq", "float16 D<=64 plain", "varlen"))
    assert not keep(info("_attn_bwd_dq", "float16 D<=64 causal+floatmask+grad+dropout"))
    assert not keep(info("_attn_fwd", "float16 D<=64 plain")) and not keep(info("_attn_bwd_dq", "float16 D<=128 plain"))
    decode = ceiling.select(dtypes=("float16",), head_dims=(64,), families=("kvcache",))
    assert decode(info("_kvcache_attn", "float16 D<=64 plain", "kvcache")) and decode(info("_ref_attn_fwd", "float16 "
                                                                                         "D<=64 plain"))
    assert not decode(info("_attn_fwd", "float16 D<=64 plain")) and not decode(info("_ref_attn_bwd_dq", "float16 "
                                                                                     "D<=64 plain"))
    assert not decode(info("_merge_fwd", "float16 D<=64 plain", "kvcache"))

    v = "float16 D<=64 plain"
    ours = [_report("_attn_fwd", v, "BLOCK_M128-BLOCK_N64-w8-s3", 90, 0.57, 1.70)]
    refs = [_report("_ref_attn_fwd", v, "BLOCK_M128-BLOCK_N128-w8-s2", 90, 1.0, 0.55)]
    seen = {}

    def fake_run(ops, archs, **kwargs):  # the reference compiles, as fit.run returns them
        seen.update(ops=list(ops), archs=list(archs))
        return refs

    monkeypatch.setattr(fit, "run", fake_run)
    out = cpu._Printer()
    cpu._ceiling_section(out, ours, [80, 89, 90], False, 1, str(tmp_path), report.environment())
    text = "\n".join(out.lines)
    assert "Issue-slot ceiling" in text and "not a speed" in text and "0.57x" in text
    # the varlen and KV-cache kernels' plain configs compiled with the references where the report had none
    assert seen == {"ops": ["varlen", "kvcache", ceiling.REFERENCE], "archs": [80, 90]}
    assert "ceiling_ratio" in (tmp_path / "ceiling.csv").read_text().splitlines()[0]
    quick = cpu._Printer()
    cpu._ceiling_section(quick, ours, [80, 90], True, 1, str(tmp_path), report.environment())
    assert "Skipped in quick mode" in "\n".join(quick.lines)


def test_reference_loops_compute_attention():
    """The reference loops are a yardstick, never launched by fastattn; they still compute attention, its lse and
    gradients (interpreter, fp32, against float64 torch; a structural check: a wrong index or scale is off by O(1),
    far beyond fp32 rounding over 64 keys)."""
    import math

    import torch

    from fastattn import _runtime

    if not _runtime.interpreting():
        pytest.skip("runs the reference kernels in the interpreter")
    zh, L, D, bm, bn = 3, 64, 32, 16, 32
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(zh, L, D) for _ in range(4))
    scale = 1 / math.sqrt(D)
    qk_scale = scale * 1.4426950408889634
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = torch.softmax(q64 @ k64.transpose(1, 2) * scale, -1) @ v64
    ref.backward(do.double())
    lse_ref = torch.logsumexp(q64.detach() @ k64.detach().transpose(1, 2) * scale, -1) * 1.4426950408889634
    out, lse = torch.empty_like(q), torch.empty(zh, L)
    refloop._ref_attn_fwd[(L // bm, zh)](q, k, v, out, lse, L * D, D, L, qk_scale, BLOCK_D=D, BLOCK_M=bm, BLOCK_N=bn)
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-4, rtol=1e-4)  # base 2
    delta = (do * out).sum(-1)
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    refloop._ref_attn_bwd_dkdv[(L // bn, zh)](q, k, v, do, lse, delta, dk, dv, L * D, D, L, qk_scale, scale,
                                              BLOCK_D=D, BLOCK_M=bm, BLOCK_N=bn)
    refloop._ref_attn_bwd_dq[(L // bm, zh)](q, k, v, do, lse, delta, dq, L * D, D, L, qk_scale, scale, BLOCK_D=D,
                                            BLOCK_M=bm, BLOCK_N=bn)
    for ours, want in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        torch.testing.assert_close(ours.double(), want, atol=1e-4, rtol=1e-4)


# -- compiled -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled():
    """The loop_kernels GEMMs on sm_80 and sm_90 and one shipped attention config on sm_90, compiled afresh (no
    cache) in one worker pool."""
    import loop_kernels

    attention = ("_attn_fwd", "float16 D<=64 plain", "BLOCK_M128-BLOCK_N128-w8-s2")  # sm_90's plain tile

    def select(info):
        return info.op == "loop_kernels" or (info.name, info.variant, info.config_label) == attention

    workers = int(os.environ.get("FASTATTN_COMPILE_WORKERS", "0")) or None
    pairs = hwfit.check_pairs(["loop_kernels", "attention"], archs=(80, 90), workers=workers, select=select,
                              use_cache=False)
    return {(r.kernel, r.arch): r for _, r in pairs}, loop_kernels


def test_gemm_loop_of_known_mma_count(compiled):
    reports, lk = compiled
    for arch, mma in ((80, lk.HMMA_PER_WARP), (90, 2)):  # sm_90: HGMMA.64x64x16, BLOCK_K 32 = two per pass
        plain, nested = reports[("_gemm_loop", arch)], reports[("_gemm_nested", arch)]
        for r in (plain, nested):
            assert r.ok and r.loop_mma == mma and r.loop_note == "", r
            assert mma < r.loop_instructions < 200
            assert r.issues_per_kflop == pytest.approx(1000 * r.loop_instructions * 4 / lk.LOOP_FLOPS)
            expect = min(1.0, 4 / (r.issues_per_kflop / 1000 * hwfit.MMA_FLOP_PER_CYCLE[arch]))
            assert r.ceiling == pytest.approx(expect)
        # the nested kernel's MMA loop is its inner K loop, about as long as the plain kernel's
        assert abs(nested.loop_instructions - plain.loop_instructions) < 0.25 * plain.loop_instructions
        unrolled = reports[("_gemm_unrolled2", arch)]
        assert unrolled.loop_mma == mma and "unrolled x2" in unrolled.loop_note
        static = reports[("_gemm_static", arch)]
        assert static.hmma + static.hgmma == 4 * mma  # four K steps, straight-line
        assert static.loop_instructions is None and static.ceiling is None
        assert "no loop holds" in static.loop_note


def test_attention_config_loop(compiled):
    reports, _ = compiled
    r = reports[("_attn_fwd", 90)]
    assert ("_attn_fwd", 80) not in reports  # a tile the launcher takes on sm_90 only is compiled for sm_90 only
    assert r.ok and r.hgmma > 0 and r.hmma == 0
    flops = 4 * 128 * 128 * 64  # QK^T and PV, 128 x 128 x 64 each
    # two MMA loops, the edge blocks' and the full blocks', of one iteration's MMAs each; the leaner is reported
    assert r.loop_note.startswith("2 MMA loops") and 0 < 2 * r.loop_mma <= r.hgmma
    assert r.issues_per_kflop == pytest.approx(1000 * r.loop_instructions * 8 / flops)
    assert 0 < r.ceiling <= 1


def test_reference_specs_cover_fastattn_tiles():
    specs = refloop.kernel_specs()
    shipped = refloop.shipped_tiles()
    from fastattn.ops import kvcache, varlen

    packed = {(refloop.REFERENCE_OF[s.name], s.variant, s.config.kwargs["BLOCK_M"], s.config.kwargs["BLOCK_N"])
              for s in [*varlen.kernel_specs(), *kvcache.kernel_specs()]
              if s.name in refloop.REFERENCE_OF and s.variant == "float16 D<=128 plain"}
    assert {k for k in packed if k[0] == "_ref_attn_fwd"} >= {("_ref_attn_fwd", "float16 D<=128 plain", 16, 64)}
    for ref, variant, bm, bn in packed:  # the varlen and decode tiles are among the shipped ones
        assert any(t[:2] == (bm, bn) for t in shipped[(ref, variant)]), (ref, variant, bm, bn)
    for (ref, variant), tiles in shipped.items():
        if not any(variant == refloop.variant(dt, d) for dt in refloop.DTYPES for d in refloop.HEAD_DIMS):
            continue
        have = {(s.config.kwargs["BLOCK_M"], s.config.kwargs["BLOCK_N"], s.config.num_warps, s.config.num_stages)
                for s in specs if s.name == ref and s.variant == variant}
        assert set(tiles) <= have, (ref, variant)
    assert all(s.loop_flops == 2 * refloop.GEMMS[s.name] * s.config.kwargs["BLOCK_M"] * s.config.kwargs["BLOCK_N"]
               * s.args["BLOCK_D"] for s in specs)


def test_varlen_and_decode_rows_from_compiled_reports():
    """One packed (VARLEN) forward config and the decode kernel's 16-row tile on sm_90, each with the reference
    forward loop at its tile: four compiles (or their content-cached reports), two rows of the new families whose
    numbers are hwfit's."""
    from fastattn.ops import kvcache, varlen
    from fastattn.perf import fit

    v = "float16 D<=64 plain"
    packed = next(s for s in varlen.kernel_specs() if s.name == "_attn_fwd" and s.variant == v
                  and (not s.archs or 90 in s.archs))
    decode = next(s for s in kvcache.kernel_specs() if s.name == "_kvcache_attn" and s.variant == v
                  and s.config.kwargs["BLOCK_M"] == 16)
    ours = {("varlen", "_attn_fwd", packed.config_label), ("kvcache", "_kvcache_attn", decode.config_label)}

    def select(info):
        return info.variant == v and ((info.op, info.name, info.config_label) in ours or (
            info.name == "_ref_attn_fwd" and info.config_label in {packed.config_label, decode.config_label}))

    workers = int(os.environ.get("FASTATTN_COMPILE_WORKERS", "0")) or None
    reports = fit.run(["varlen", "kvcache", ceiling.REFERENCE], [90], select=select, workers=workers)
    assert len(reports) == 4, [(r.op, r.kernel, r.config) for r in reports]
    by = {(r.op, r.kernel): r for r in reports}
    got = {r["family"]: r for r in ceiling.rows(reports)}
    assert set(got) == {"varlen", "kvcache"}
    for family, kernel in (("varlen", "_attn_fwd"), ("kvcache", "_kvcache_attn")):
        row, r = got[family], by[(ceiling.FAMILIES[family], kernel)]
        assert r.ok and 0 < r.ceiling <= 1 and (row["kernel"], row["config"], row["ceiling"]) == (kernel, r.config,
                                                                                                  r.ceiling)
        assert row["ref_same_tile_ceiling"] is not None and row["ref_config"] in {packed.config_label, r.config}
    assert got["kvcache"]["ref_config"] == decode.config_label  # the reference with as many query rows
    for row in got.values():
        assert row["issues_vs_ref_same_tile"] == pytest.approx(row["issues_per_kflop"] /
                                                               row["ref_same_tile_issues_per_kflop"])


def test_cli_family_and_kernel_options():
    import argparse

    from fastattn import cli

    args = cli._parser().parse_args(["ceiling", "--family", "kvcache,varlen", "--kernel", "fwd,decode"])
    assert args.family == ["kvcache", "varlen"] and args.kernel == ["_attn_fwd", "_kvcache_attn"]
    for bad in ("paged", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="dense, varlen, kvcache"):
            cli._families(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="decode"):
        cli._kernels("_merge_fwd")
