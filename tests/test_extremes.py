"""Numerical extremes: huge and tiny logits, zero-variance rows and channels, values near the fp16 maximum.

Every case compares ours with a float64 reference computed from the same (exactly representable) inputs, and
with eager PyTorch in the same low precision:

- where the true result is representable, ours must be finite, and within the 2x-eager rule of
  ``fastattn.testing``; where eager itself is not finite, within twice the error of eager in float32 plus two
  roundings to the low precision (ours computes in fp32 and rounds once);
- where eager overflows (or the true value exceeds the dtype's range), the test pins down what we return, and
  bench/README.md ("Robustness") documents it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import assert_launched, eager_sdpa

import fastattn
from fastattn import _runtime, reference
from fastattn.ops import attention as attn_ops
from fastattn.ops import batch_norm as bn_ops
from fastattn.ops import layer_norm as ln_ops
from fastattn.testing import (
    UNIT_ROUNDOFF,
    attention_floors,
    batch_norm_floors,
    max_err,
    norm_floors,
    patch_embed_floors,
)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


def check_extreme(name, ours, eager, eager32, ref, dtype, floor=0.0):
    """``err(ours) <= 2 err(eager) + u max|ref| + floor``, or with eager non-finite ``2 err(eager32) +
    2 u max|ref| + floor``; ours must be finite wherever the float64 result fits the dtype. ``floor``: the fused
    computation's own rounding floor (fastattn.testing)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    fits = _finite(ref) and ref.abs().max().item() <= torch.finfo(dtype).max
    assert fits, f"{name}: the true result does not fit {dtype}; this case belongs in a documented-overflow test"
    assert _finite(ours), f"{name}: ours is not finite where the float64 result is"
    u, top = UNIT_ROUNDOFF[dtype], ref.abs().max().item()
    e = max_err(ours, ref)
    if _finite(eager):
        bound = 2.0 * max_err(eager, ref) + u * top + floor
    else:
        bound = 2.0 * max_err(eager32, ref) + 2.0 * u * top + floor
    assert e <= bound, f"{name}: max error {e:.3e} > bound {bound:.3e} ({dtype}, eager finite: {_finite(eager)})"


def _run(fn, masters, dtype, grads, **kw):
    """fn on ``masters`` cast to ``dtype`` (all requiring grad), backward with ``grads``: [outputs..., grads...]."""
    leaves = [m.to(dtype).detach().requires_grad_() for m in masters]
    outs = fn(*leaves, **kw)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])
    return outs + [leaf.grad for leaf in leaves]


def compare(fn_ours, fn_eager, masters, dtype, names, n_out=1, floors=None, kernels=(), **kw):
    """Runs float64, eager low precision, eager fp32 and ours; checks every output and gradient.

    ``floors(masters, grads, ours) -> {name: floor}`` gives the fused computation's rounding floors
    (fastattn.testing), from the low-precision values, the incoming gradients and our results."""
    masters = [m.to(dtype).double() for m in masters]  # representable in dtype: every run sees the same numbers
    probe = fn_eager(*masters, **kw)
    probe = list(probe) if isinstance(probe, tuple) else [probe]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in probe[:n_out]]
    ref = _run(fn_eager, masters, torch.float64, grads, **kw)
    eager = _run(fn_eager, masters, dtype, grads, **kw)
    eager32 = _run(fn_eager, masters, torch.float32, grads, **kw)
    with _runtime.record_launches() as launches:
        ours = _run(fn_ours, masters, dtype, grads, **kw)
    assert_launched(launches, kernels)
    floor = floors(masters, grads, dict(zip(names, ours))) if floors is not None else {}
    for name, o, e, e32, r in zip(names, ours, eager, eager32, ref):
        check_extreme(name, o, e, e32, r, o.dtype, floor.get(name, 0.0))  # residual_out may be fp32
    return {"ours": ours, "eager": eager, "ref": ref}


# -- attention ---------------------------------------------------------------------------------------------------------

ATTN = ("out", "dq", "dk", "dv")
ATTN_KERNELS = attn_ops.FORWARD_KERNELS + attn_ops.BACKWARD_KERNELS


def _attention_floors(dtype, **kw):
    def floors(masters, grads, ours):
        return attention_floors(*masters, grads[0], dtype=dtype, out=ours["out"], **kw)
    return floors


def _qkv(seed=0, L=37, D=64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, L, D, generator=gen, dtype=torch.float64) for _ in range(3)]


def _attention(q, k, v, dtype, **kw):
    return compare(fastattn.scaled_dot_product_attention, eager_sdpa, [q, k, v], dtype, ATTN,
                   kernels=ATTN_KERNELS, floors=_attention_floors(dtype, **kw), **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_logits_near_fp16_max(dtype, causal):
    """q and k scaled by 30: q . k reaches ~2.7e4 (fp16 max 65504) before the 1/8 scale, logits ~3.4e3; the
    softmax is nearly one-hot. Ours accumulates q . k in fp32."""
    q, k, v = _qkv()
    _attention(q * 30, k * 30, v, dtype, is_causal=causal)


def test_attention_q_dot_k_beyond_fp16_max():
    """q and k scaled by 60: q . k reaches ~1.1e5, beyond fp16's range. torch's SDPA (fp32 accumulation) and ours
    stay finite and agree; ``fastattn.reference`` (q @ k^T in the input dtype: the eager fallback where no kernel
    runs and the benchmarks' eager baseline) overflows to inf and returns NaN."""
    q, k, v = (t.half() for t in _qkv())
    q, k = q * 60, k * 60
    assert (q.double() @ k.double().transpose(-1, -2)).abs().max() > torch.finfo(torch.float16).max
    _attention(q.double(), k.double(), v.double(), torch.float16)
    assert torch.isnan(reference.scaled_dot_product_attention(q, k, v)).any()


@pytest.mark.parametrize("mult", [1, 30], ids=["unit", "x30"])
def test_attention_all_equal_keys(mult):
    """Every key the same: the softmax is exactly uniform and out is the mean of v; dq is 0 in exact arithmetic."""
    q, k, v = _qkv()
    k = k[:, :, :1].expand_as(k).contiguous()
    res = _attention(q * mult, k * mult, v, torch.float16)
    torch.testing.assert_close(res["ours"][0].double(), v.half().double().mean(2, keepdim=True).expand_as(v),
                               atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("scale", [1e4, -1e4, 1e-6], ids=["1e4", "-1e4", "1e-6"])
def test_attention_huge_and_tiny_scale(scale):
    """scale 1e4: logits up to ~4e5, one-hot rows, finite everywhere (true dq, dk ~1e-10; ours and eager alike
    give errors ~0.1-0.2, from rounding O to fp16 in delta = rowsum(dO * O), which the floor of
    ``attention_floors`` measures). The backward recomputes p = exp(s - lse) from fp32 logits, whose rounding at
    |s| ~ 4e5 is ~0.03: dv may carry that relative to eager (the floor's recomputation term). scale 1e-6: uniform
    rows."""
    _attention(*_qkv(), torch.float16, scale=scale)


# -- LayerNorm / RMSNorm -----------------------------------------------------------------------------------------------

LN_KERNELS = ln_ops.FORWARD_KERNELS + ln_ops.BACKWARD_KERNELS
N = 97


def _norm_floors(dtype, rms=False, eps=None, residual=False, **kw):
    def floors(masters, grads, ours):
        x, rest = masters[0], masters[1:]
        r = rest.pop(0) if residual else None
        w = rest.pop(0) if rest else None
        b = rest.pop(0) if rest and not rms else None
        return norm_floors(x, r, w, b, grads[0], grads[1] if len(grads) > 1 else None, dtype=dtype,
                           eps=eps if eps is not None else (1e-6 if rms else 1e-5), rms=rms, **kw)
    return floors


def _rows(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(6, N, generator=gen, dtype=torch.float64), torch.randn(N, generator=gen, dtype=torch.float64),
            torch.randn(N, generator=gen, dtype=torch.float64))


def _ln(x, w, b):
    return F.layer_norm(x, (N,), w, b)


def _ln_ours(x, w, b):
    return fastattn.layer_norm(x, (N,), w, b)


def _rms(x, w):
    return F.rms_norm(x, (N,), w, 1e-6)


def _rms_ours(x, w):
    return fastattn.rms_norm(x, (N,), w, 1e-6)


# Padding lanes of the 60000 row compute (0 - 60000) * rstd before the masked store; the interpreter's numpy cast
# warns about them although nothing is stored.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_layer_norm_zero_variance_rows(dtype):
    """Constant rows (0.3, 0, -1000, 60000): variance 0, rstd = 1/sqrt(eps), out = bias, dx ~1e3. In fp16/bf16
    every row sums exactly, so out is exactly the bias, where eager fp16 misses it by ~3. In fp32 the 0.3 row's
    mean rounds (torch's CPU kernel accumulates in float64) and rstd amplifies that rounding in out, dx and
    dweight: the floor's mean term."""
    x, w, b = _rows()
    x[0], x[1], x[2], x[3] = 0.3, 0.0, -1000.0, 60000.0
    res = compare(_ln_ours, _ln, [x, w, b], dtype, ("out", "dx", "dweight", "dbias"), floors=_norm_floors(dtype),
                  kernels=LN_KERNELS)
    if dtype != torch.float32:
        torch.testing.assert_close(res["ours"][0][:4].double(), b.to(dtype).double().expand(4, N), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rms_norm_zero_rows(dtype):
    x, w, _ = _rows()
    x[0], x[1] = 0.0, 0.3
    compare(_rms_ours, _rms, [x, w], dtype, ("out", "dx", "dweight"), floors=_norm_floors(dtype, rms=True),
            kernels=LN_KERNELS)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_norm_values_near_fp16_max(rms):
    """|x| up to 65000: sums of squares ~1e11 stay in fp32."""
    x, w, b = _rows()
    x = (x * 20000).clamp(-65000, 65000)
    if rms:
        compare(_rms_ours, _rms, [x, w], torch.float16, ("out", "dx", "dweight"),
                floors=_norm_floors(torch.float16, rms=True), kernels=LN_KERNELS)
    else:
        compare(_ln_ours, _ln, [x, w, b], torch.float16, ("out", "dx", "dweight", "dbias"),
                floors=_norm_floors(torch.float16), kernels=LN_KERNELS)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the inf/NaN row
def test_add_layer_norm_sum_overflowing_fp16():
    """x + residual = 1.2e5 does not fit fp16: residual_out is inf and out and every gradient NaN, exactly where
    eager's ``x + residual`` then ``layer_norm`` gives them. ``residual_in_fp32=True`` keeps the stream finite and
    out, residual_out and every gradient within the rule."""
    x, w, b = _rows()
    x = (x * 20000).clamp(-65000, 65000)
    r = x.flip(1) * 0.01
    x[0], r[0] = 60000.0, 60000.0  # only row 0's sum overflows
    xh, rh = x.half(), r.half()
    outs = {}
    for label, fn in (("ours", fastattn.add_layer_norm), ("eager", reference.add_layer_norm)):
        xs, rs = xh.clone().requires_grad_(), rh.clone().requires_grad_()
        ws, bs = w.half().requires_grad_(), b.half().requires_grad_()
        out, res = fn(xs, rs, ws, bs)
        (out.float().sum() + res.float().sum()).backward()
        outs[label] = [out, res, xs.grad, rs.grad, ws.grad, bs.grad]
    for name, o, e in zip(("out", "residual_out", "dx", "dresidual", "dweight", "dbias"), outs["ours"],
                          outs["eager"]):
        assert torch.equal(torch.isfinite(o), torch.isfinite(e)), f"{name}: non-finite where eager is not"
        assert torch.equal(torch.isnan(o), torch.isnan(e)), f"{name}: NaN pattern differs from eager's"
    assert torch.isinf(outs["ours"][1][0]).all() and torch.isnan(outs["ours"][0][0]).all()
    assert _finite(outs["ours"][0][1:])  # the other rows are unaffected

    def ours32(x, r, w, b):
        return fastattn.add_layer_norm(x, r.float(), w, b, residual_in_fp32=True)

    def eager32(x, r, w, b):
        return reference.add_layer_norm(x, r.to(torch.promote_types(r.dtype, torch.float32)), w, b,
                                        residual_in_fp32=True)

    compare(ours32, eager32, [x, r, w, b], torch.float16, ("out", "residual_out", "dx", "dresidual",
                                                                    "dweight", "dbias"), n_out=2,
            floors=_norm_floors(torch.float16, residual=True), kernels=LN_KERNELS)


# -- BatchNorm ---------------------------------------------------------------------------------------------------------

BN_GRADS = ("out", "dx", "didentity", "dweight", "dbias")
BN_KERNELS = bn_ops.FORWARD_KERNELS + bn_ops.BACKWARD_KERNELS  # training, every gradient
BN_EVAL_KERNELS = bn_ops.FORWARD_KERNELS[-1:]  # eval: the apply pass (no statistics)
C = 5


def _bn_floors(dtype, training, running_var=1.0, eps=1e-5):
    def floors(masters, grads, ours):
        x, identity, w, b = masters
        rm, rv = torch.zeros(C, dtype=torch.float64), torch.full((C,), running_var, dtype=torch.float64)
        return batch_norm_floors(x, identity, rm, rv, w, b, grads[0], dtype=dtype, training=training, eps=eps,
                                 lane_terms=bn_ops.lane_terms(x))
    return floors


def _bn_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, C, 3, 5, generator=gen, dtype=torch.float64)
    identity = torch.randn(4, C, 3, 5, generator=gen, dtype=torch.float64)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    return x, identity, w, b


def _bn(training, running_var=1.0, eps=1e-5):
    def fns(ours):
        def f(x, identity, w, b):
            sdt = torch.float64 if x.dtype == torch.float64 else torch.float32
            rm, rv = torch.zeros(C, dtype=sdt), torch.full((C,), running_var, dtype=sdt)
            fn = fastattn.batch_norm_add_relu if ours else reference.batch_norm_add_relu
            return fn(x, identity, rm, rv, w.to(sdt), b.to(sdt), training, 0.1, eps)
        return f
    return fns(True), fns(False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_batch_norm_zero_variance_channels(dtype):
    """Channels constant at 0.7, 1000 and 0 in training: variance 0, rstd = 1/sqrt(eps), dx ~1e3."""
    x, identity, w, b = _bn_inputs()
    x[:, 0], x[:, 1], x[:, 2] = 0.7, 1000.0, 0.0
    ours, eager = _bn(True)
    compare(ours, eager, [x, identity, w, b], dtype, BN_GRADS, floors=_bn_floors(dtype, True),
            kernels=BN_KERNELS)


@pytest.mark.parametrize("spread", ["wide", "narrow"])
def test_batch_norm_values_near_fp16_max(spread):
    """fp16 activations up to 65000, either spread over the whole range or within +-300 of 60000 (the shifted
    sums keep the variance)."""
    x, identity, w, b = _bn_inputs()
    x = (x * 20000).clamp(-65000, 65000) if spread == "wide" else (x * 100 + 60000).clamp(max=65000)
    ours, eager = _bn(True)
    compare(ours, eager, [x, identity, w, b], torch.float16, BN_GRADS, floors=_bn_floors(torch.float16, True),
            kernels=BN_KERNELS)


def test_batch_norm_eval_zero_running_variance():
    """Eval with running_var = 0: the scale is weight / sqrt(eps) ~ 300."""
    x, identity, w, b = _bn_inputs()
    ours, eager = _bn(False, running_var=0.0)
    compare(ours, eager, [x * 0.01, identity, w, b], torch.float16, BN_GRADS,
            floors=_bn_floors(torch.float16, False, running_var=0.0), kernels=BN_EVAL_KERNELS)


# -- patch embedding ---------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # dweight's inf, as intended
def test_patch_embed_pixels_near_fp16_max():
    """Pixels up to 65000 with small weights: the tokens (~400) and dimages are finite and within the rule;
    dweight = sum of pixel x dtoken exceeds fp16's range (~2e5) and is inf exactly where the true value is."""
    gen = torch.Generator().manual_seed(0)
    images = (torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64) * 15000).clamp(-65000, 65000)
    weight = torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64) * 1e-3
    bias = torch.randn(8, generator=gen, dtype=torch.float64)
    masters = [t.half().double() for t in (images, weight, bias)]
    grad = torch.randn(2, 4, 8, generator=gen, dtype=torch.float64)
    ref = _run(reference.patch_embed, masters, torch.float64, [grad])
    eager = _run(reference.patch_embed, masters, torch.float16, [grad])
    eager32 = _run(reference.patch_embed, masters, torch.float32, [grad])
    with _runtime.record_launches() as launches:
        ours = _run(fastattn.patch_embed, masters, torch.float16, [grad])
    assert launches["_pe_fwd"] == 1 and launches["_pe_bwd_dw"] == 1
    floor = patch_embed_floors(*masters, None, None, grad, dtype=torch.float16)
    for i, name in ((0, "out"), (1, "dimages"), (3, "dbias")):
        check_extreme(name, ours[i], eager[i], eager32[i], ref[i], torch.float16, floor[name])
    # dweight: inf exactly where the true value rounds to inf in fp16 (|value| >= 65520, half an ulp past the
    # largest finite 65504), up to one rounding at that boundary; compared with the float64 truth, not with one CPU's
    # eager result (torch's fp16 convolution backward rounds differently per CPU).
    limit, u = 65520.0, UNIT_ROUNDOFF[torch.float16]
    true = ref[2].abs()
    must_inf, must_fit = true > limit * (1 + u), true < limit * (1 - u)
    assert must_inf.any() and must_fit.any()
    assert torch.isinf(ours[2])[must_inf].all(), "dweight is finite where the true value overflows fp16"
    assert torch.isfinite(ours[2])[must_fit].all(), "dweight overflows where the true value fits fp16"
    fits = ours[2][must_fit].double()
    assert (fits - ref[2][must_fit]).abs().max() <= 2 * u * true[must_fit].max(), "dweight wrong where it fits"
