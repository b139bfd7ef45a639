"""Determinism: every op's forward and backward is bitwise repeatable, and ``torch.use_deterministic_algorithms(True)``
neither breaks nor changes any op while it fixes the autotuned configs (``fastattn._runtime.fixed_config``).

Each op runs with every feature that makes its backward reduce across programs (attention: GQA, a broadcast float
mask with gradient, causal, dropout; layer_norm: several row blocks per program; patch_embed: the split dW sum;
batch_norm: several partial sums per channel), once in torch's default mode and 20 times in deterministic mode;
all 21 results must be bitwise equal. Deterministic mode also fills every ``torch.empty`` with NaN, so a buffer a
kernel fails to write shows up here.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from fastattn.kernels import batch_norm as bn_kernels

import fastattn
from fastattn import _runtime
from fastattn.ops import attention as attn_ops
from fastattn.ops import batch_norm as bn_ops
from fastattn.ops import layer_norm as ln_ops
from fastattn.ops import patch_embed as pe_ops
from fastattn.ops._common import sm_count

REPEATS = 20


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for the test, restored afterwards."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(device=device, dtype=dtype)


# -- one forward + backward per op, from fixed inputs; returns every output and gradient -------------------------------

def _attention(device):
    q = _randn(1, 4, 37, 16, dtype=torch.float16, seed=1, device=device)
    k = _randn(1, 2, 45, 16, dtype=torch.float16, seed=2, device=device)
    v = _randn(1, 2, 45, 16, dtype=torch.float16, seed=3, device=device)
    mask = _randn(4, 37, 45, dtype=torch.float16, seed=4, device=device)  # broadcast over the batch
    g_out = _randn(1, 4, 37, 16, dtype=torch.float16, seed=5, device=device)
    g_lse = _randn(1, 4, 37, seed=6, device=device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    torch.manual_seed(7)  # the dropout seed
    out, lse = fastattn.attention(*leaves[:3], attn_mask=leaves[3], dropout_p=0.2, is_causal=True, enable_gqa=True,
                                  return_lse=True)
    torch.autograd.backward([out, lse], [g_out, g_lse])
    return [out, lse] + [t.grad for t in leaves], attn_ops.FORWARD_KERNELS + attn_ops.BACKWARD_KERNELS


def _add_norm(device, rms):
    M, N = 45, 65
    per = ln_ops.backward_schedule(M, N, torch.float16, ln_ops.device_sms(torch.device(device)), 2).per
    if device == "cpu":
        assert per > 1, "each backward program should own several row blocks"
    x = _randn(M, N, dtype=torch.float16, seed=1, device=device)
    r = _randn(M, N, dtype=torch.float16, seed=2, device=device)
    w = _randn(N, dtype=torch.float16, seed=3, device=device)
    b = _randn(N, dtype=torch.float16, seed=4, device=device)
    g_out, g_res = (_randn(M, N, dtype=torch.float16, seed=s, device=device) for s in (5, 6))
    leaves = [t.clone().requires_grad_() for t in ((x, r, w) if rms else (x, r, w, b))]
    torch.manual_seed(7)
    fn = fastattn.add_rms_norm if rms else fastattn.add_layer_norm
    out, res = fn(*leaves, dropout_p=0.1)
    torch.autograd.backward([out, res], [g_out, g_res])
    return [out, res] + [t.grad for t in leaves], ln_ops.FORWARD_KERNELS + ln_ops.BACKWARD_KERNELS


def _patch_embed(device):
    B, C, H, W, P, D = 2, 3, 24, 24, 4, 16
    # the split dW sum needs its partials to fit in the dimages buffer (2-byte images here)
    sched = pe_ops.dw_schedule(B * (H // P) * (W // P), C * P * P, D, room=2 * B * C * H * W, acc_bytes=4,
                               sms=sm_count(torch.device(device)), cuda=device == "cuda")
    if device == "cpu":
        assert sched.split > 1
    images = _randn(B, C, H, W, dtype=torch.float16, seed=1, device=device)
    weight = _randn(D, C, P, P, dtype=torch.float16, seed=2, device=device) * 0.1
    bias = _randn(D, dtype=torch.float16, seed=3, device=device)
    pos = _randn(1, 37, D, dtype=torch.float16, seed=4, device=device)
    cls = _randn(1, 1, D, dtype=torch.float16, seed=5, device=device)
    g = _randn(B, 37, D, dtype=torch.float16, seed=6, device=device)
    leaves = [t.clone().requires_grad_() for t in (images, weight, bias, pos, cls)]
    out = fastattn.patch_embed(*leaves)
    out.backward(g)
    return [out] + [t.grad for t in leaves], ("_pe_fwd", "_pe_bwd_dw", "_pe_bwd_dpos", "_pe_bwd_dx") + (
        ("_pe_bwd_reduce",) if sched.split > 1 else ())


def _batch_norm(device, training):
    shape = (4, 16, 7, 7)
    x = _randn(*shape, dtype=torch.float16, seed=1, device=device).to(memory_format=torch.channels_last)
    identity = _randn(*shape, dtype=torch.float16, seed=2, device=device)
    w, b = _randn(16, seed=3, device=device), _randn(16, seed=4, device=device)
    rm, rv = _randn(16, seed=5, device=device), _randn(16, seed=6, device=device).abs() + 0.5
    g = _randn(*shape, dtype=torch.float16, seed=7, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, identity, w, b)]
    out = fastattn.batch_norm_add_relu(leaves[0], leaves[1], rm, rv, leaves[2], leaves[3], training, 0.1, 1e-5)
    out.backward(g)
    # eval: the apply pass, and the backward's reduction and combine (dweight, dbias); dx needs no second pass
    kernels = (bn_ops.FORWARD_KERNELS + bn_ops.BACKWARD_KERNELS if training
               else bn_ops.FORWARD_KERNELS[-1:] + bn_ops.BACKWARD_KERNELS[:2])
    return [out, rm, rv] + [t.grad for t in leaves], kernels


OPS = {
    "attention": _attention,
    "add_layer_norm": lambda device: _add_norm(device, rms=False),
    "add_rms_norm": lambda device: _add_norm(device, rms=True),
    "patch_embed": _patch_embed,
    "batch_norm_train": lambda device: _batch_norm(device, training=True),
    "batch_norm_eval": lambda device: _batch_norm(device, training=False),
}


@pytest.mark.parametrize("op", list(OPS))
def test_twenty_passes_are_bitwise_equal(op, device):
    """One run in torch's default mode, then 20 under ``torch.use_deterministic_algorithms(True)``: every output,
    gradient and running statistic is bitwise equal to the first (in the interpreter the configs are the same in
    both modes; on a GPU the default mode's autotuned config may differ from the fixed one, so there only the 20
    deterministic runs must agree bitwise)."""
    run = OPS[op]
    with _runtime.record_launches() as launches:
        baseline, kernels = run(device.type)
    for name in kernels:
        assert launches[name] >= 1, f"Triton kernel {name} did not run: {dict(launches)}"
    assert fastattn.deterministic_backward()
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        with _runtime.record_launches() as launches:
            for _ in range(REPEATS):
                runs.append(run(device.type)[0])
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    for name in kernels:
        assert launches[name] == REPEATS, f"{name} ran {launches[name]} times in {REPEATS} passes"
    first = runs[0] if device.type == "cuda" else baseline
    for i, results in enumerate(runs):
        for j, (a, b) in enumerate(zip(results, first)):
            assert not torch.isnan(a).any(), f"run {i}, result {j}: NaN (an unwritten torch.empty buffer?)"
            assert torch.equal(a, b), f"run {i}, result {j} differs from the first run"
    if device.type == "cuda":
        for a, b in zip(runs[0], baseline):
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


# -- the fixed config ------------------------------------------------------------------------------------------------

def _small_blocks(configs, named_args, **kwargs):
    return [c for c in configs if c.kwargs["BLOCK"] <= named_args["n"]]


@triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=1) for b in (64, 16, 32)], key=["n"],
                 prune_configs_by={"early_config_prune": _small_blocks})
@triton.jit
def _block_size_kernel(Out, n, BLOCK: tl.constexpr):
    tl.store(Out + tl.program_id(0), BLOCK)


def test_deterministic_mode_runs_the_first_config_the_prune_keeps(deterministic, device):
    """Three candidates; for n = 40 the prune keeps 16 and 32, and deterministic mode runs 16 without timing
    anything (the interpreter cannot time several configs at all, so this launch would fail otherwise)."""
    out = torch.zeros(2, dtype=torch.int32, device=device)
    with _runtime.record_launches() as n:
        _runtime.launch(_block_size_kernel, (2,), out, 40)
    assert n["_block_size_kernel"] == 1
    assert out.tolist() == [16, 16]
    out.zero_()
    _runtime.launch(_block_size_kernel, (2,), out, 100)
    assert out.tolist() == [64, 64]  # nothing pruned: the list's first


def test_real_op_in_deterministic_mode_never_autotunes(deterministic, monkeypatch):
    """batch_norm's tile kernels given two candidate tiles that the op's own prune both keeps for this
    channels_last input: deterministic mode launches the first, the autotuner never runs, and the result is
    right."""
    if not _runtime.interpreting():
        pytest.skip("swaps the interpreter's config lists")
    extra = triton.Config({"BLOCK_B": 16, "BLOCK_C": 64}, num_warps=4, num_stages=1)
    kernels = (bn_kernels._bn_fwd_reduce, bn_kernels._bn_fwd_apply, bn_kernels._bn_bwd_reduce, bn_kernels._bn_bwd_dx)
    for k in kernels:
        monkeypatch.setattr(k, "configs", [extra] + list(k.configs))

    def no_autotuning(self, *args, **kwargs):
        raise AssertionError(f"the autotuner ran {_runtime.kernel_name(self)} in deterministic mode")

    monkeypatch.setattr(type(kernels[0]), "run", no_autotuning)
    chosen = []
    real = _runtime.fixed_config

    def spy(tuner, args, kwargs):
        config = real(tuner, args, kwargs)
        chosen.append((_runtime.kernel_name(tuner), config.kwargs))
        return config

    monkeypatch.setattr(_runtime, "fixed_config", spy)
    x = torch.randn(2, 64, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(64, requires_grad=True)
    out = fastattn.batch_norm_add_relu(x, None, None, None, w, None, True)
    out.backward(torch.ones_like(out))
    tiled = {_runtime.kernel_name(k) for k in kernels}
    assert {name for name, _ in chosen} == tiled | {"_bn_fwd_combine", "_bn_bwd_combine"}
    assert all(cfg == extra.kwargs for name, cfg in chosen if name in tiled)
    for k in kernels:  # both candidates pass the prune, so the order decided
        assert len(k.early_config_prune(k.configs, {"B": 18, "C": 64, "C_INNER": 1})) == 2
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.relu(torch.nn.functional.batch_norm(x2, None, None, w2, None, True))
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)
