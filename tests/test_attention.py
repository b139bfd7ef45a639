"""fastattn.scaled_dot_product_attention against torch's, outputs and every gradient (2x-eager rule, fastattn.testing).

Each case runs three times: torch's SDPA in float64 (the reference), torch's SDPA in the low precision (eager's
error) and ours in the low precision, with a check that the Triton kernels, not the eager fallback, ran.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, cpu_only, dev, eager_sdpa, spy_launches, three_way
from torch.nn.attention.bias import CausalBias, CausalVariant, causal_lower_right, causal_upper_left

import fastattn
from fastattn import _runtime, reference
from fastattn.ops import attention as attn_ops
from fastattn.testing import attention_floors


def check_case(q, k, v, *, dtype, mask=None, mask_grad=False, is_causal=False, scale=None, enable_gqa=False,
               names=("out", "dq", "dk", "dv", "dmask"), torch_mask=None):
    """q, k, v, mask are float64 masters (on the CPU; each run moves them to the test device); everything is
    compared in ``dtype`` under the rule of fastattn.testing (tests/harness.py runs the three ways).

    ``torch_mask`` (with is_causal folded in) replaces ``mask`` and ``is_causal`` for torch's runs."""
    bias = mask if isinstance(mask, CausalBias) else None
    grad_out = None

    def run(label, lowp):
        nonlocal grad_out
        fn = fastattn.scaled_dot_product_attention if label == "ours" else eager_sdpa
        use_mask, causal = (torch_mask, False) if torch_mask is not None and label != "ours" else (mask, is_causal)
        ts = [dev(t, lowp).detach().requires_grad_() for t in (q, k, v)]
        m = bias
        if use_mask is not None and bias is None:
            m = dev(use_mask, None if use_mask.dtype == torch.bool else lowp).detach()
            m.requires_grad_(mask_grad and m.is_floating_point())
            if m.requires_grad:
                ts.append(m)
        out = fn(ts[0], ts[1], ts[2], attn_mask=m, is_causal=causal, scale=scale, enable_gqa=enable_gqa)
        if grad_out is None:
            grad_out = torch.randn(out.shape, dtype=torch.float64)
        out.backward(dev(grad_out, lowp))
        return dict(zip(names, [out] + [t.grad for t in ts]))

    def floors(results):
        lowp = [t.to(dtype).double() for t in (q, k, v)]
        if bias is not None:
            extra = {"is_causal": True, "causal_offset": 0 if bias.variant == CausalVariant.UPPER_LEFT
                     else bias.seq_len_kv - bias.seq_len_q}
        else:
            extra = {"attn_mask": None if mask is None or mask.dtype == torch.bool else mask.to(dtype).double(),
                     "is_causal": is_causal}
            if mask is not None and mask.dtype == torch.bool:
                extra["attn_mask"] = mask
        return attention_floors(*lowp, grad_out, dtype=dtype, scale=scale, enable_gqa=enable_gqa,
                                out=results["ours"]["out"].cpu(), **extra)

    return three_way(run, dtype, kernels=attn_ops.FORWARD_KERNELS + attn_ops.BACKWARD_KERNELS, floors=floors)


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# -- lengths, head dims, dtypes -------------------------------------------------------------------------------------

SHAPES = [  # (B, H, Lq, Lk, D)
    (1, 1, 1, 1, 16),
    (2, 3, 1, 97, 64),
    (2, 2, 97, 113, 40),
    (1, 2, 113, 97, 80),
    (1, 3, 197, 197, 64),  # ViT-B/16 tokens
    (1, 2, 203, 61, 96),
    (1, 1, 64, 203, 112),
    (1, 2, 45, 67, 160),
    (1, 1, 33, 40, 256),
    (1, 1, 7, 5, 8),  # head dim below the 16-wide MMA minimum
]


@pytest.mark.parametrize("B,H,M,N,D", SHAPES, ids=[f"B{b}H{h}q{m}k{n}d{d}" for b, h, m, n, d in SHAPES])
def test_shapes_fp16(B, H, M, N, D):
    check_case(randn(B, H, M, D), randn(B, H, N, D), randn(B, H, N, D), dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dtypes(dtype, causal):
    check_case(randn(2, 2, 77, 48), randn(2, 2, 91, 48), randn(2, 2, 91, 48), dtype=dtype, is_causal=causal)


def test_long_sequence_1023():
    check_case(randn(1, 1, 1023, 64), randn(1, 1, 1023, 64), randn(1, 1, 1023, 64), dtype=torch.float16,
               is_causal=True)


def test_value_head_dim_differs():
    check_case(randn(2, 2, 37, 64), randn(2, 2, 53, 64), randn(2, 2, 53, 24), dtype=torch.float16)


def test_explicit_scale():
    check_case(randn(1, 2, 31, 32), randn(1, 2, 29, 32), randn(1, 2, 29, 32), dtype=torch.float32, scale=0.3)


# -- causal, both alignments ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("M,N", [(61, 61), (37, 101), (101, 37)], ids=["square", "q<k", "q>k"])
@pytest.mark.parametrize("align", ["top_left", "lower_right"])
def test_causal(M, N, align):
    q, k, v = randn(2, 2, M, 32), randn(2, 2, N, 32), randn(2, 2, N, 32)
    if align == "top_left":
        check_case(q, k, v, dtype=torch.float16, is_causal=True)
        check_case(q, k, v, dtype=torch.float16, mask=causal_upper_left(M, N))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about Lq > Lk lower-right; those rows are empty
            res = check_case(q, k, v, dtype=torch.float16, mask=causal_lower_right(M, N))
        if M > N:  # rows with no visible key are exactly zero, with zero gradient
            empty = M - N
            assert (res["ours"]["out"][:, :, :empty] == 0).all()
            assert (res["ours"]["dq"][:, :, :empty] == 0).all()


def test_kv_cache_decode_lower_right():
    """One new query against a cache of 113 keys: lower-right causal sees every key."""
    q, k, v = randn(3, 4, 1, 64), randn(3, 4, 113, 64), randn(3, 4, 113, 64)
    check_case(q, k, v, dtype=torch.bfloat16, mask=causal_lower_right(1, 113))


def test_causal_is_in_kernel_not_a_dense_mask(monkeypatch):
    calls = spy_launches(monkeypatch)
    q, k, v = (dev(torch.randn(1, 1, L, 16)) for L in (9, 20, 20))
    fastattn.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(9, 20))
    assert [(name, kw.get("MASK_KIND"), kw.get("IS_CAUSAL")) for name, _, kw in calls] == [("_attn_fwd", 0, True)]


# -- masks ----------------------------------------------------------------------------------------------------------

MASKS = {
    "bool_2d": lambda B, H, M, N: torch.rand(M, N) > 0.3,
    "bool_key_padding": lambda B, H, M, N: torch.arange(N).expand(B, 1, 1, N) < torch.tensor([N, N // 2])[:B, None,
                                                                                                        None, None],
    "bool_per_head": lambda B, H, M, N: torch.rand(B, H, M, N) > 0.5,
    "float_2d": lambda B, H, M, N: randn(M, N),
    "float_head_bcast": lambda B, H, M, N: randn(B, 1, M, N),
    "float_with_-inf": lambda B, H, M, N: randn(H, M, N).masked_fill(torch.rand(H, M, N) > 0.6, float("-inf")),
}


@pytest.mark.parametrize("kind", list(MASKS))
def test_masks(kind):
    B, H, M, N = 2, 3, 29, 43
    mask = MASKS[kind](B, H, M, N)
    check_case(randn(B, H, M, 32), randn(B, H, N, 32), randn(B, H, N, 32), dtype=torch.float16, mask=mask)


@pytest.mark.parametrize("shape", [(2, 3, 29, 43), (29, 43), (2, 1, 1, 43), (3, 29, 1)], ids=str)
def test_float_mask_gradient(shape):
    B, H, M, N = 2, 3, 29, 43
    check_case(randn(B, H, M, 32), randn(B, H, N, 32), randn(B, H, N, 32), dtype=torch.float32, mask=randn(*shape),
               mask_grad=True)


def test_float_mask_gradient_fp16_with_causal():
    """is_causal together with a float mask combines both (torch raises here when the mask requires grad, so the
    reference gets the causal part folded into the mask as -inf)."""
    M = 33
    mask = randn(1, 2, M, M)
    causal = torch.ones(M, M, dtype=torch.bool).tril()
    check_case(randn(2, 2, M, 32), randn(2, 2, M, 32), randn(2, 2, M, 32), dtype=torch.float16, mask=mask,
               mask_grad=True, is_causal=True, torch_mask=mask.masked_fill(~causal, float("-inf")))


def test_mask_and_causal_combine():
    """The reference gets the causal part folded into the mask: torch's SDPA takes both only in its CPU flash kernel
    (its math backend, which serves float64 on a GPU, refuses the pair)."""
    q, k, v = randn(1, 2, 40, 32), randn(1, 2, 50, 32), randn(1, 2, 50, 32)
    mask = torch.rand(40, 50) > 0.2
    check_case(q, k, v, dtype=torch.float16, mask=mask, is_causal=True,
               torch_mask=mask & torch.ones(40, 50, dtype=torch.bool).tril())


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_are_zero(kind):
    M, N = 19, 23
    keep = torch.rand(M, N) > 0.3
    keep[[0, 5, 18]] = False
    mask = keep if kind == "bool" else torch.zeros(M, N, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    res = check_case(randn(2, 2, M, 32), randn(2, 2, N, 32), randn(2, 2, N, 32), dtype=torch.float16, mask=mask)
    out, dq = res["ours"]["out"], res["ours"]["dq"]
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (out[:, :, [0, 5, 18]] == 0).all() and (dq[:, :, [0, 5, 18]] == 0).all()


def test_mask_read_through_strides_without_copy(monkeypatch):
    calls = spy_launches(monkeypatch, "_attn_fwd")
    qkv = dev(torch.randn(2, 11, 3, 4, 16))  # (B, L, 3, H, D): the packed projection of a self-attention layer
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    mask = dev(torch.randn(11, 11))
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    [(_, args, _)] = calls
    named = dict(zip(_runtime.jit_function(attn_ops.K._attn_fwd).arg_names, args))
    assert named["Q"].data_ptr() == q.data_ptr() and named["Mask"].data_ptr() == mask.data_ptr()
    assert tuple(named[f"stride_m{a}"] for a in "zhmn") == (0, 0, 11, 1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)


# -- layouts --------------------------------------------------------------------------------------------------------

def test_packed_qkv_views_bf16():
    B, L, H, D = 2, 37, 3, 40
    qkv = randn(B, L, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check_case(q, k, v, dtype=torch.bfloat16, is_causal=True)


def test_transposed_and_sliced_inputs():
    q = randn(2, 30, 3, 32).transpose(1, 2)  # (B, H, L, D) from (B, L, H, D)
    k = randn(2, 3, 64, 41)[..., 3:35]  # sliced head dim
    v = randn(2, 3, 32, 64).transpose(-1, -2)  # (B, H, L, D) with D innermost stride 64
    check_case(q, k, v, dtype=torch.float16)


@pytest.mark.parametrize("rank", [2, 3, 5])
def test_other_ranks(rank):
    lead = {2: (), 3: (3,), 5: (2, 2, 2)}[rank]
    check_case(randn(*lead, 17, 32), randn(*lead, 23, 32), randn(*lead, 23, 32), dtype=torch.float16)


@pytest.mark.parametrize("q_shape,kv_batch", [((2, 3, 17, 32), (1, 3)), ((17, 32), (3,))], ids=["batch1", "rank"])
def test_broadcast_batch_dims(q_shape, kv_batch):
    check_case(randn(*q_shape), randn(*kv_batch, 23, 32), randn(*kv_batch, 23, 32), dtype=torch.float32)


# -- grouped-query attention ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("H,HKV", [(6, 2), (4, 1), (3, 3)])
def test_gqa(H, HKV):
    check_case(randn(2, H, 29, 32), randn(2, HKV, 41, 32), randn(2, HKV, 41, 32), dtype=torch.float16,
               enable_gqa=True, is_causal=True)


# -- log-sum-exp ----------------------------------------------------------------------------------------------------

def test_return_lse_and_its_gradient():
    q, k, v = randn(2, 2, 21, 32), randn(2, 2, 26, 32), randn(2, 2, 26, 32)
    mask = torch.rand(21, 26) > 0.4
    mask[3] = False
    mask = dev(mask)
    leaves = [dev(t, torch.float32).requires_grad_() for t in (q, k, v)]
    with _runtime.record_launches() as n:
        out, lse = fastattn.attention(*leaves, attn_mask=mask, return_lse=True)
        (out.square().sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert n["_attn_fwd"] == 1 and n["_attn_bwd_dkdv"] == 1
    ref_leaves = [dev(t, copy=True).requires_grad_() for t in (q, k, v)]
    r_out, r_lse = reference.scaled_dot_product_attention(*ref_leaves, attn_mask=mask, return_lse=True)
    (r_out.square().sum() + r_lse[torch.isfinite(r_lse)].sum()).backward()
    assert lse.shape == (2, 2, 21) and lse.dtype == torch.float32
    assert torch.isneginf(lse[:, :, 3]).all()
    torch.testing.assert_close(lse.double(), r_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), r_out, atol=1e-5, rtol=1e-5)
    for ours, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)


# -- dropout --------------------------------------------------------------------------------------------------------

def _sdpa_dropout(q, k, v, p, **kw):
    return fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p, **kw)


def test_dropout_reproducible_under_manual_seed():
    q, k, v = (dev(torch.randn(2, 2, L, 32)) for L in (33, 47, 47))
    torch.manual_seed(123)
    a = _sdpa_dropout(q, k, v, 0.3)
    b = _sdpa_dropout(q, k, v, 0.3)
    torch.manual_seed(123)
    c = _sdpa_dropout(q, k, v, 0.3)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_dropout_matches_reference_with_the_kernels_mask(dtype):
    """Output and gradients equal the reference run with the very mask the kernel drew; keep rate is 1 - p."""
    B, H, M, N, D, p = 2, 2, 41, 53, 32, 0.25
    q, k, v = randn(B, H, M, D), randn(B, H, N, D), randn(B, H, N, D)
    mask = torch.rand(M, N) > 0.1
    grad_out = randn(B, H, M, D)

    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = attn_ops.dropout_keep_mask(seed, (B, H, M, N), p, DEVICE)
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f} vs {1 - p}"

    def run(label, lowp):
        ts = [dev(t, lowp).detach().requires_grad_() for t in (q, k, v)]
        if label == "ours":
            torch.manual_seed(7)  # the op draws the same seed as above
            out = fastattn.scaled_dot_product_attention(*ts, attn_mask=dev(mask), dropout_p=p, is_causal=True)
        else:
            out = reference.scaled_dot_product_attention(*ts, attn_mask=dev(mask), dropout_p=p, is_causal=True,
                                                         dropout_mask=keep)
        out.backward(dev(grad_out, lowp))
        return dict(zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in ts]))

    def floors(results):
        return attention_floors(*(t.to(dtype).double() for t in (q, k, v)), grad_out, dtype=dtype, attn_mask=mask,
                                is_causal=True, dropout_p=p, dropout_mask=keep.cpu(), out=results["ours"]["out"].cpu())

    three_way(run, dtype, kernels={"_attn_fwd": 1}, floors=floors)


def test_dropout_gradcheck_float64_through_the_kernels():
    """Finite differences of the Triton kernels themselves (float64 runs in the interpreter) with dropout on."""
    if not _runtime.interpreting():
        pytest.skip("float64 runs the Triton kernels only under the interpreter")
    q, k, v = (torch.randn(1, 2, 6, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, mask):
        torch.manual_seed(11)  # the same dropout mask on every evaluation
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3, is_causal=True)

    with _runtime.record_launches() as n:
        assert torch.autograd.gradcheck(f, (q, k, v, mask), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    assert n["_attn_fwd"] > 0 and n["_attn_bwd_dkdv"] > 0


# -- torch.compile --------------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    q, k, v = (dev(torch.randn(2, 2, 19, 32)).requires_grad_() for _ in range(3))
    mask = dev(torch.randn(19, 19))

    def f(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with _runtime.record_launches() as n:
        loss = compiled(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
    assert n["_attn_fwd"] == 1 and n["_attn_bwd_dq"] == 1
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_loss = F.scaled_dot_product_attention(*ref, attn_mask=mask, is_causal=True).square().sum()
    ref_grads = torch.autograd.grad(ref_loss, ref)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_torch_compile_with_dropout_fullgraph():
    q, k, v = (dev(torch.randn(1, 2, 9, 16)) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: _sdpa_dropout(q, k, v, 0.5), fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    a = compiled(q, k, v)
    torch.manual_seed(3)
    b = _sdpa_dropout(q, k, v, 0.5)
    assert torch.equal(a, b)


def test_registered_custom_ops():
    assert hasattr(torch.ops.fastattn, "attention") and hasattr(torch.ops.fastattn, "attention_backward")
    q = dev(torch.randn(1, 1, 5, 16))
    out, _lse = torch.ops.fastattn.attention(q, q, q, None, 0.0, None, False, 0, 0.25)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, scale=0.25))


# -- empty inputs ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape_q,shape_k", [((2, 3, 0, 16), (2, 3, 5, 16)), ((2, 3, 4, 16), (2, 3, 0, 16)),
                                             ((0, 3, 4, 16), (0, 3, 5, 16))])
def test_empty(shape_q, shape_k):
    q, k, v = (dev(torch.randn(s)).requires_grad_() for s in (shape_q, shape_k, shape_k))
    out = fastattn.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


# -- bad input ------------------------------------------------------------------------------------------------------

def _qkv(*shapes, dtype=torch.float32):
    return [dev(torch.randn(*s, dtype=dtype)) for s in shapes]


BAD = [
    ("rank", lambda: (_qkv((4,), (5, 4), (5, 4)), {}), ValueError, "query must have at least 2 dims"),
    ("head_dim", lambda: (_qkv((1, 2, 3, 8), (1, 2, 5, 16), (1, 2, 5, 16)), {}), ValueError, "same head dim"),
    ("kv_len", lambda: (_qkv((1, 2, 3, 8), (1, 2, 5, 8), (1, 2, 6, 8)), {}), ValueError, "same length"),
    ("batch", lambda: (_qkv((2, 2, 3, 8), (3, 2, 5, 8), (3, 2, 5, 8)), {}), ValueError, "do not broadcast"),
    ("heads", lambda: (_qkv((2, 4, 3, 8), (2, 3, 5, 8), (2, 3, 5, 8)), {}), ValueError, "do not broadcast"),
    ("gqa_div", lambda: (_qkv((2, 4, 3, 8), (2, 3, 5, 8), (2, 3, 5, 8)), {"enable_gqa": True}), ValueError,
     "multiple of the key/value heads"),
    ("gqa_kv_heads", lambda: (_qkv((2, 4, 3, 8), (2, 2, 5, 8), (2, 1, 5, 8)), {"enable_gqa": True}), ValueError,
     "same number of heads"),
    ("dtype_mix", lambda: (_qkv((1, 3, 8)) + _qkv((1, 5, 8), dtype=torch.float16) + _qkv((1, 5, 8)), {}), TypeError,
     "one dtype"),
    ("int_input", lambda: ([dev(torch.ones(1, 3, 8, dtype=torch.int64))] * 3, {}), TypeError, "floating-point"),
    ("mask_bcast", lambda: (_qkv((2, 2, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)), {"attn_mask": dev(torch.zeros(4, 5))}),
     ValueError, "does not broadcast"),
    ("mask_dtype", lambda: (_qkv((2, 2, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)),
                            {"attn_mask": dev(torch.zeros(3, 5, dtype=torch.int32))}), TypeError,
     "attn_mask must be bool"),
    ("mask_type", lambda: (_qkv((2, 2, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)), {"attn_mask": [[1.0]]}), TypeError,
     "attn_mask must be a Tensor"),
    ("dropout_hi", lambda: (_qkv((1, 3, 8), (1, 5, 8), (1, 5, 8)), {"dropout_p": 1.0}), ValueError, "dropout_p"),
    ("dropout_lo", lambda: (_qkv((1, 3, 8), (1, 5, 8), (1, 5, 8)), {"dropout_p": -0.1}), ValueError, "dropout_p"),
    ("dropout_nan", lambda: (_qkv((1, 3, 8), (1, 5, 8), (1, 5, 8)), {"dropout_p": float("nan")}), ValueError,
     "dropout_p"),
    ("bias_len", lambda: (_qkv((1, 3, 8), (1, 5, 8), (1, 5, 8)), {"attn_mask": causal_lower_right(4, 5)}), ValueError,
     "CausalBias"),
    ("bias_and_causal", lambda: (_qkv((1, 3, 8), (1, 5, 8), (1, 5, 8)),
                                 {"attn_mask": causal_lower_right(3, 5), "is_causal": True}), ValueError, "not both"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_naming_the_argument(case):
    _, make, exc, text = case
    (q, k, v), kw = make()
    with pytest.raises(exc, match=text):
        fastattn.scaled_dot_product_attention(q, k, v, **kw)


def test_device_mix_raises():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to mix devices")
    q = torch.randn(1, 3, 8, device="cuda")
    with pytest.raises(RuntimeError, match="one device"):
        fastattn.scaled_dot_product_attention(q, torch.randn(1, 5, 8), torch.randn(1, 5, 8))


def test_device_mix_is_checked_before_anything_else(monkeypatch):
    """Without a second device, check the guard itself: tensors claiming different devices are rejected."""
    with pytest.raises(RuntimeError, match="key is on meta"):
        _runtime.check_same_device("scaled_dot_product_attention", query=dev(torch.empty(1)),
                                   key=torch.empty(1, device="meta"))


# -- visible fallback -----------------------------------------------------------------------------------------------

def test_head_dim_above_256_falls_back_with_one_warning():
    q, k, v = (dev(torch.randn(1, 2, 7, 272)) for _ in range(3))
    with pytest.warns(fastattn.FallbackWarning, match="head dim 272"), _runtime.record_launches() as n:
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert sum(n.values()) == 0
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second call: no second warning
        fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_cpu_without_interpreter_runs_eager_reference_visibly():
    cpu_only("the eager fallback of CPU tensors without Triton's interpreter")
    code = textwrap.dedent("""
        import os, warnings
        os.environ.pop("TRITON_INTERPRET", None)
        import torch, fastattn, torch.nn.functional as F
        q = torch.randn(1, 2, 5, 16)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = fastattn.scaled_dot_product_attention(q, q, q)
        assert any(issubclass(x.category, fastattn.FallbackWarning) and "interpreter" in str(x.message) for x in w)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
