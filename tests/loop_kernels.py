"""Tiny GEMM loops whose MMA loop is known, for tests/test_ceiling.py: ``hwfit.check(["loop_kernels"])`` compiles
them in clean worker processes (this directory is on their ``sys.path``, as on pytest's).

Every kernel multiplies a (BLOCK_M, K) by a (K, BLOCK_N) tile with one ``BLOCK_M x BLOCK_N x BLOCK_K`` tl.dot per
step of K, so one iteration of its loop does 2 * BLOCK_M * BLOCK_N * BLOCK_K FLOPs and, on sm_80 with 4 warps,
(64 * 64 * 32) / (16 * 8 * 16) / 4 = 16 HMMA.16816 per warp:
- ``_gemm_loop``: a plain loop over K (one MMA loop);
- ``_gemm_nested``: the same loop inside a loop over ``REPEAT`` output tiles (the MMA loop is the inner one);
- ``_gemm_unrolled2``: the loop unrolled twice by Triton (``loop_unroll_factor=2``): 32 HMMA per pass;
- ``_gemm_static``: ``tl.static_range`` over a constexpr number of steps: no loop is left in the SASS.
"""

import torch
import triton
import triton.language as tl

from fastattn.hwfit import KernelSpec

TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
LOOP_FLOPS = 2 * 64 * 64 * 32
HMMA_PER_WARP = 16


@triton.jit
def _tile_ptrs(A, B, stride_a, stride_b, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    return A + rows[:, None] * stride_a + ks[None, :], B + ks[:, None] * stride_b + cols[None, :]


@triton.jit
def _store(C, acc, stride_c, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    tl.store(C + rows[:, None] * stride_c + cols[None, :], acc.to(C.dtype.element_ty))


@triton.jit
def _gemm_loop(A, B, C, stride_a, stride_b, stride_c, K,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    a_ptrs, b_ptrs = _tile_ptrs(A, B, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_b
    _store(C, acc, stride_c, BLOCK_M, BLOCK_N)


@triton.jit
def _gemm_nested(A, B, C, stride_a, stride_b, stride_c, K, REPEAT,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    for r in range(REPEAT):
        a_ptrs, b_ptrs = _tile_ptrs(A + r * BLOCK_M * stride_a, B, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for _ in range(0, K, BLOCK_K):
            acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_b
        _store(C + r * BLOCK_M * stride_c, acc, stride_c, BLOCK_M, BLOCK_N)


@triton.jit
def _gemm_unrolled2(A, B, C, stride_a, stride_b, stride_c, K,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    a_ptrs, b_ptrs = _tile_ptrs(A, B, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in tl.range(0, K, BLOCK_K, loop_unroll_factor=2):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_b
    _store(C, acc, stride_c, BLOCK_M, BLOCK_N)


@triton.jit
def _gemm_static(A, B, C, stride_a, stride_b, stride_c, K,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STEPS: tl.constexpr):
    a_ptrs, b_ptrs = _tile_ptrs(A, B, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in tl.static_range(STEPS):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_b
    _store(C, acc, stride_c, BLOCK_M, BLOCK_N)


KERNELS = (_gemm_loop, _gemm_nested, _gemm_unrolled2, _gemm_static)


def kernel_specs() -> list[KernelSpec]:
    meta = torch.device("meta")
    a = torch.empty((256, 1024), device=meta, dtype=torch.float16)
    b = torch.empty((1024, 64), device=meta, dtype=torch.float16)
    c = torch.empty((256, 64), device=meta, dtype=torch.float16)
    args = {"A": a, "B": b, "C": c, "stride_a": 1024, "stride_b": 64, "stride_c": 64, "K": 1024, "REPEAT": 4,
            "STEPS": 4}
    config = triton.Config(TILE, num_warps=4, num_stages=2)
    return [KernelSpec("test", k, args, config, "fp16", needs_tensor_cores=True, loop_flops=LOOP_FLOPS)
            for k in KERNELS]
