"""fastattn as torch's SDPA flash backend (``fastattn.register_sdpa_backend``), registered for the CPU dispatch key
so the overridden aten ops run fastattn's kernels through the interpreter: the argument mapping (scale, causal
alignment, window, GQA, dropout's seed through ``rng_state``, packed sequences, the log-sum-exp layout) against
torch's math SDPA in float32 and float64 under the rule of fastattn.testing (tests/harness.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from harness import assert_launched, three_way
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastattn
from fastattn import reference
from fastattn.ops import attention as attn_ops
from fastattn.ops import varlen as varlen_ops
from fastattn.testing import attention_floors

attention_api = pytest.importorskip("torch.nn.attention")
if not hasattr(attention_api, "register_flash_attention_impl"):
    pytest.skip("this torch has no torch.nn.attention.register_flash_attention_impl", allow_module_level=True)

KERNELS = attn_ops.FORWARD_KERNELS + attn_ops.BACKWARD_KERNELS
aten = torch.ops.aten


@pytest.fixture
def backend():
    """fastattn behind the CPU flash ops for one test; torch's own kernels afterwards."""
    assert fastattn.register_sdpa_backend("CPU")
    attention_api.activate_flash_attention_impl("fastattn")
    assert attention_api.current_flash_attention_impl() == "fastattn"
    yield
    attention_api.restore_flash_attention_impl()


def _masters(B, H, HKV, M, N, D):
    return [torch.randn(B, h, L, D, dtype=torch.float64) for h, L in ((H, M), (HKV, N), (HKV, N))]


def _keep(M, N, causal, window):
    """flash's visibility (bottom-right aligned), as a boolean (M, N) mask."""
    d = torch.arange(N)[None, :] - torch.arange(M)[:, None] - (N - M)
    keep = torch.ones(M, N, dtype=torch.bool)
    left, right = window
    if causal:
        keep &= d <= 0
    if left >= 0:
        keep &= d >= -left
    if right >= 0:
        keep &= d <= right
    return keep


def _check(ours, q, k, v, *, keep=None, scale=None, gqa=False):
    """``ours(label_tensors) -> out`` against torch's math SDPA with the visibility ``keep`` as its mask."""
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64)

    def run(label, lowp):
        ts = [t.to(lowp).detach().requires_grad_() for t in (q, k, v)]
        if label == "ours":
            out = ours(*ts)
        else:
            mask = keep if keep is None or keep.dtype == torch.bool else keep.to(lowp)
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(*ts, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out.backward(grad_out.to(lowp))
        return {"out": out, "dq": ts[0].grad, "dk": ts[1].grad, "dv": ts[2].grad}

    def floors(results):
        mask = keep if keep is None or keep.dtype == torch.bool else keep.float().double()
        return attention_floors(*(t.float().double() for t in (q, k, v)), grad_out, dtype=torch.float32,
                                attn_mask=mask, scale=scale, enable_gqa=gqa)

    return three_way(run, torch.float32, kernels=KERNELS, floors=floors)


@pytest.mark.parametrize("M,N,causal", [(13, 13, True), (5, 11, True), (9, 6, False)])
def test_sdpa_flash_op(backend, M, N, causal):
    """``_scaled_dot_product_flash_attention`` (B, H, L, D), the op SDPA's CUDA flash path calls; its backward
    through torch's autograd formula; the log-sum-exp (B, H, Lq) in float32."""
    q, k, v = _masters(2, 2, 2, M, N, 16)
    keep = _keep(M, N, causal, (-1, -1))

    def ours(q, k, v):
        out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=0.3)
        _, ref_lse = reference.scaled_dot_product_attention(q.detach().double(), k.detach().double(),
                                                            v.detach().double(), keep, scale=0.3, return_lse=True)
        assert lse.dtype == torch.float32 and lse.shape == (2, 2, M)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
        return out

    _check(ours, q, k, v, keep=keep, scale=0.3)


@pytest.mark.parametrize("window,causal", [((2, 0), False), ((3, -1), True), ((1, 2), False)])
def test_flash_attention_forward_window_gqa(backend, window, causal):
    """``_flash_attention_forward`` (B, L, H, D): a window (bottom-right aligned), causal, GQA (4 query heads on 2
    key/value heads), a non-square shape, scale=None."""
    q, k, v = _masters(2, 4, 2, 7, 10, 8)
    keep = _keep(7, 10, causal, window)

    def ours(q, k, v):
        out, lse, rng, _, _ = aten._flash_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, 7, 10, 0.0, causal, False,
            window_size_left=window[0], window_size_right=window[1])
        assert out.shape == (2, 7, 4, 8) and lse.shape == (2, 4, 7) and rng.dtype == torch.uint64
        return out.transpose(1, 2)

    _check(ours, q, k, v, keep=keep, gqa=True)


def test_flash_dropout_seed_travels_in_rng_state(backend):
    """With dropout the forward's seed comes back in ``rng_state``, and the backward (given it) differentiates the
    mask the forward drew: the gradients equal the reference's with the kernel's own mask replayed."""
    q, k, v = (t.float().requires_grad_() for t in _masters(1, 2, 2, 9, 9, 8))
    out, _, rng, _, _ = aten._flash_attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                                                      None, 9, 9, 0.3, True, False)
    seed = int(rng.view(torch.int64)[0])
    keep = attn_ops.dropout_keep_mask(seed, (1, 2, 9, 9), 0.3, q.device)
    ref = reference.scaled_dot_product_attention(q, k, v, None, 0.3, True, dropout_mask=keep)
    torch.testing.assert_close(out.transpose(1, 2), ref)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    with fastattn.record_launches() as launches:
        grads = torch.autograd.grad(out.transpose(1, 2), (q, k, v), g)
    assert_launched(launches, attn_ops.BACKWARD_KERNELS)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_varlen_attn_runs_fastattns_varlen_op(backend):
    """``torch.nn.attention.varlen.varlen_attn`` over packed sequences (lengths 3, 6, 1) runs
    ``fastattn::varlen_attention`` (``fastattn.varlen_attn``'s kernels, no fallback), forward and backward; each
    sequence's own causal attention; the log-sum-exp in flash's packed layout (H, total_q)."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    lengths = [3, 6, 1]
    cu = torch.tensor([0, 3, 9, 10], dtype=torch.int32)
    q, k, v = (torch.randn(10, 2, 8, requires_grad=True) for _ in range(3))
    with warnings.catch_warnings(), fastattn.record_launches() as launches:
        warnings.simplefilter("error", fastattn.FallbackWarning)
        out, lse = varlen_attn(q, k, v, cu, cu, 6, 6, window_size=(-1, 0), return_aux=AuxRequest(lse=True))
    with fastattn.record_launches() as backward_launches:
        out.sum().backward()
    assert_launched(launches, varlen_ops.FORWARD_KERNELS)
    assert_launched(backward_launches, varlen_ops.BACKWARD_KERNELS)
    ours, ours_lse = fastattn.varlen_attn(q, k, v, cu, cu, 6, 6, window_size=(-1, 0), return_aux=AuxRequest(lse=True))
    assert torch.equal(out, ours) and torch.equal(lse, ours_lse)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        qs, ks, vs = (t.detach()[s].transpose(0, 1).requires_grad_() for t in (q, k, v))
        ref, ref_lse = reference.scaled_dot_product_attention(qs, ks, vs, is_causal=True, return_lse=True)
        torch.testing.assert_close(out[s].transpose(0, 1), ref)
        torch.testing.assert_close(lse[:, s], ref_lse)  # (H, total_q), as the meta kernel and torch's CUDA give
        ref.sum().backward()
        for t, r in ((q, qs), (k, ks), (v, vs)):
            torch.testing.assert_close(t.grad[s].transpose(0, 1), r.grad, rtol=1e-4, atol=1e-5)
        start += n


def test_varlen_attn_window_and_seqused_k(backend):
    """A sliding window and, for inference, ``seqused_k`` (the KV-cache kernel) through torch's ``varlen_attn``:
    the bits of ``fastattn.varlen_attn`` with the same arguments."""
    from torch.nn.attention.varlen import varlen_attn

    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in ([0, 4, 9], [0, 7, 20]))
    q, k, v = torch.randn(9, 4, 16), torch.randn(20, 2, 16), torch.randn(20, 2, 16)
    args = (q, k, v, cu_q, cu_k, 5, 13)
    got = varlen_attn(*args, window_size=(3, 0), enable_gqa=True)
    assert torch.equal(got, fastattn.varlen_attn(*args, window_size=(3, 0), enable_gqa=True))
    used = torch.tensor([5, 13], dtype=torch.int32)
    with torch.no_grad(), fastattn.record_launches() as launches:
        got = varlen_attn(*args, window_size=(-1, 0), enable_gqa=True, seqused_k=used)
    assert_launched(launches, varlen_ops.PAGED_KERNELS)
    with torch.no_grad():
        assert torch.equal(got, fastattn.varlen_attn(*args, window_size=(-1, 0), enable_gqa=True, seqused_k=used))


def test_cpu_sdpa_takes_fastattn_through_the_flash_backend(backend):
    """On the CPU dispatch key also SDPA's own CPU flash op: ``F.scaled_dot_product_attention`` restricted to the
    flash backend runs fastattn's kernels (a float mask and top-left causal, as SDPA promises)."""
    q, k, v = _masters(2, 2, 2, 6, 6, 16)
    mask = torch.randn(2, 1, 6, 6, dtype=torch.float64)

    def ours(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))

    results = _check(ours, q, k, v, keep=mask)
    assert results["launches"]["_attn_fwd"] == 1


def test_restore_gives_torch_its_kernels_back():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    assert fastattn.register_sdpa_backend("CPU")
    attention_api.activate_flash_attention_impl("fastattn")
    attention_api.restore_flash_attention_impl()
    with fastattn.record_launches() as launches, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not launches
    with sdpa_kernel(SDPBackend.MATH):
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_unsupported_arguments_raise(backend):
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="return_debug_mask"):
        aten._flash_attention_forward(q, q, q, None, None, 4, 4, 0.0, False, True)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        aten._flash_attention_forward(q, q, q, None, None, 4, 4, 0.0, False, False, alibi_slopes=torch.ones(2))


def test_register_checks_its_argument_and_old_torch(monkeypatch):
    with pytest.raises(ValueError, match="dispatch_key"):
        fastattn.register_sdpa_backend("TPU")
    monkeypatch.delattr(torch.nn.attention, "register_flash_attention_impl")
    with pytest.warns(RuntimeWarning, match="nothing was registered"):
        assert fastattn.register_sdpa_backend() is False


def test_compiled_sdpa_runs_the_backend(backend):
    """Under torch.compile (aot_eager) the flash op is traced with torch's meta kernel and runs fastattn's at run
    time; the outputs come back in the layouts the meta kernels promise, so the compiled gradients are eager's."""
    q, k, v = (torch.randn(2, 2, 6, 8, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with fastattn.record_launches() as launches:
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert_launched(launches, KERNELS)
    ref = f(q, k, v)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(got, want)
