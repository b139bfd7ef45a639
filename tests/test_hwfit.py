"""Every kernel config fastattn can launch compiles for sm_80 and sm_90 without register spills, within the
target's shared memory, and (GEMM kernels) with tensor-core instructions. No GPU needed: see fastattn.hwfit."""

import os

import pytest

from fastattn import hwfit
from fastattn.ops import OPS

# Ops whose kernels are GEMMs: their specs must ask for tensor cores, and get them.
TENSOR_CORE_OPS = {"attention", "patch_embed", "kvcache", "varlen"}


@pytest.mark.parametrize("op", OPS)
def test_every_config_fits_sm80_and_sm90(op):
    workers = int(os.environ.get("FASTATTN_COMPILE_WORKERS", "0")) or None
    reports = hwfit.check([op], archs=(80, 90), workers=workers)
    assert reports, f"{op} lists no kernel specs"
    assert {r.arch for r in reports} == {80, 90}
    bad = [f"{r.kernel} [{r.variant}] {r.config} sm_{r.arch}: {'; '.join(r.problems)} (regs {r.registers})"
           for r in reports if not r.ok]
    assert not bad, "configs that do not fit:\n" + "\n".join(bad)
    gemm = [r for r in reports if r.needs_tensor_cores]
    if op in TENSOR_CORE_OPS:
        assert gemm, f"{op} is a GEMM op but marks no kernel spec needs_tensor_cores"
    assert all(r.hmma + r.hgmma > 0 for r in gemm)
    # every tensor-core config has an MMA loop whose FLOPs match its spec's loop_flops, so it has a ceiling
    no_ceiling = [f"{r.kernel} [{r.variant}] {r.config} sm_{r.arch}: {r.loop_note or 'no ceiling'}" for r in gemm
                  if r.ceiling is None or r.loop_instructions is None]
    assert not no_ceiling, "GEMM configs without an issue-slot ceiling:\n" + "\n".join(no_ceiling)
