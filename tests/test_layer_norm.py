"""fastattn.add_layer_norm / add_rms_norm / layer_norm / nn.LayerNorm against eager PyTorch (2x-eager rule,
fastattn.testing), outputs and every gradient.

Each case runs three times: the eager reference (``fastattn.reference``: ``x + residual`` then
``F.layer_norm``/``F.rms_norm``) in float64 (the oracle) and in the low precision (eager's error), and ours in the
low precision, with a check that the Triton kernels, not the eager fallback, ran.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from fastattn.kernels import layer_norm as K
from harness import DEVICE, cpu_only, dev, spy_launches, three_way

import fastattn
from fastattn import _runtime, reference
from fastattn.ops import layer_norm as ln_ops
from fastattn.testing import norm_floors

FWD, BWD, REDUCE = "_layer_norm_fwd", "_layer_norm_bwd", "_layer_norm_bwd_reduce"


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _seed_of(manual_seed: int) -> int:
    """The seed the public op draws right after ``torch.manual_seed(manual_seed)``."""
    torch.manual_seed(manual_seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def check_case(x, residual=None, weight=None, bias=None, *, dtype, rms=False, eps=None, dropout_p=0.0,
               residual_in_fp32=False, residual_dtype=None, param_dtype=None, layout=None, grad_residual_out=True):
    """x, residual, weight, bias are float64 masters (or None) on the CPU, moved to the test device by each run;
    compared in ``dtype`` under the 2x-eager rule.

    ``residual_dtype``/``param_dtype`` override the low-precision dtype of the residual / parameters; ``layout``
    maps each low-precision activation to a non-contiguous tensor with the same values. Returns the results."""
    eps = (1e-6 if rms else 1e-5) if eps is None else eps
    lead, N = x.shape[:-1], x.shape[-1]
    keep, manual_seed = None, 1234
    if dropout_p > 0:
        keep = ln_ops.dropout_keep_mask(_seed_of(manual_seed), (math.prod(lead), N), dropout_p, DEVICE)
        keep = keep.reshape(x.shape)
    dy = randn(*x.shape)
    dro = randn(*x.shape) if grad_residual_out else None
    def run(label, lowp):
        rdt = torch.float64 if label == "ref" else (residual_dtype or dtype)
        pdt = torch.float64 if label == "ref" else (param_dtype or dtype)
        xl = dev(x, lowp).detach().requires_grad_()
        rl = dev(residual, rdt).detach().requires_grad_() if residual is not None else None
        wl = dev(weight, pdt).detach().requires_grad_() if weight is not None else None
        bl = dev(bias, pdt).detach().requires_grad_() if bias is not None else None
        xi, ri = xl, rl
        if layout is not None and label == "ours":
            xi = layout(xl)
            ri = layout(rl) if rl is not None else None
        if label == "ours":
            torch.manual_seed(manual_seed)
            if rms:
                out, res_out = fastattn.add_rms_norm(xi, ri, wl, eps, dropout_p, residual_in_fp32=residual_in_fp32)
            else:
                out, res_out = fastattn.add_layer_norm(xi, ri, wl, bl, eps, dropout_p,
                                                       residual_in_fp32=residual_in_fp32)
            assert out.dtype == dtype
            assert res_out.dtype == (torch.float32 if residual_in_fp32 and dtype != torch.float32 else dtype)
        else:
            fn = reference.add_rms_norm if rms else reference.add_layer_norm
            args = (xi, ri, wl, eps) if rms else (xi, ri, wl, bl, eps)
            out, res_out = fn(*args, dropout_p, residual_in_fp32=residual_in_fp32, dropout_mask=keep)
        outs, grads = [out], [dev(dy, out.dtype)]
        if dro is not None:
            outs.append(res_out)
            grads.append(dev(dro, res_out.dtype))
        torch.autograd.backward(outs, grads)
        return {"out": out, "residual_out": res_out, "dx": xl.grad, "dresidual": rl.grad if rl is not None else None,
                "dweight": wl.grad if wl is not None else None, "dbias": bl.grad if bl is not None else None}

    def low(t, dt):
        return t.to(dt).double() if t is not None else None

    floors = norm_floors(low(x, dtype), low(residual, residual_dtype or dtype), low(weight, param_dtype or dtype),
                         low(bias, param_dtype or dtype), dy, dro, dtype=dtype, eps=eps, rms=rms,
                         dropout_p=dropout_p, dropout_mask=keep.cpu() if keep is not None else None)
    kernels = {FWD: 1, BWD: 1, REDUCE: 1 if weight is not None or bias is not None else 0}
    return three_way(run, dtype, kernels=kernels, floors=floors)


# -- channels-first LayerNorm2d (ConvNeXt) ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,channels_last", [((2, 96, 7, 5), False), ((3, 13, 3, 1), True), ((1, 40, 2, 9), False)],
                         ids=["convnext-nchw", "odd-cl", "batch1-nchw"])
def test_layer_norm2d(shape, channels_last, dtype, monkeypatch):
    """Over the channel dim at stride H*W (NCHW) or 1 (channels_last), every gradient, read without a copy."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    C = shape[1]
    x, w, b, dy = randn(*shape), randn(C), randn(C), randn(*shape)
    read = []
    real = _runtime.launch

    def spy(kernel, grid, *args, **kwargs):
        if _runtime.kernel_name(kernel) == FWD:
            read.append(args[0].data_ptr())
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_runtime, "launch", spy)

    def run(label, lowp):
        pdt = torch.float64 if label == "ref" else dtype
        xl = dev(x, lowp, copy=True).to(memory_format=fmt).requires_grad_()
        wl, bl = dev(w, pdt, copy=True).requires_grad_(), dev(b, pdt, copy=True).requires_grad_()
        fn = fastattn.layer_norm2d if label == "ours" else reference.layer_norm2d
        out = fn(xl, wl, bl, 1e-6)
        if label == "ours":
            assert out.is_contiguous(memory_format=torch.channels_last) and read == [xl.data_ptr()]
        out.backward(dev(dy, out.dtype))
        return {"out": out, "dx": xl.grad, "dweight": wl.grad, "dbias": bl.grad}

    def low(t):
        return t.to(dtype).double().permute(0, 2, 3, 1)  # the rows the kernels normalise: (N, H, W, C)

    floors = norm_floors(low(x), None, w.to(dtype).double(), b.to(dtype).double(), dy.permute(0, 2, 3, 1),
                         dtype=dtype, eps=1e-6)
    three_way(run, dtype, kernels={FWD: 1, BWD: 1, REDUCE: 1}, floors=floors)


def test_layer_norm2d_rejects_other_ranks():
    with pytest.raises(ValueError, match="x must be a 4-D"):
        fastattn.layer_norm2d(dev(torch.randn(2, 3, 4)))


def test_layer_norm2d_module_and_compile():
    """fastattn.nn.LayerNorm2d: nn.LayerNorm's state_dict, ConvNeXt's LayerNorm2d forward; compiles in one graph."""
    ours, theirs = fastattn.nn.LayerNorm2d(12, eps=1e-6), torch.nn.LayerNorm(12, eps=1e-6)
    assert list(ours.state_dict()) == list(theirs.state_dict()) and "channels-first" in repr(ours)
    theirs.weight.data.normal_()
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = dev(ours), dev(theirs)
    x = dev(torch.randn(2, 12, 5, 3)).requires_grad_()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with _runtime.record_launches() as n:
        out = compiled(x)
        out.sum().backward()
    assert n[FWD] == 1 and n[BWD] == 1
    torch.testing.assert_close(out, theirs(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


# -- hidden sizes -----------------------------------------------------------------------------------------------------

SIZES = [(1, (3, 37)), (65, (2, 53)), (768, (2, 9)), (1000, (17,)), (1536, (9,)), (4099, (5,)), (8192, (3,)),
         (10007, (2,)), (65536, (1,))]


@pytest.mark.parametrize("N,lead", SIZES, ids=[f"N{n}" for n, _ in SIZES])
def test_hidden_sizes_fp16(N, lead):
    assert K.fwd_config(N).kwargs["LOOPED"] == (N > 8192)  # the last two take the looped paths of both kernels
    assert K.bwd_config(N).kwargs["LOOPED"] == (N > 1024)
    check_case(randn(*lead, N), randn(*lead, N), randn(N), randn(N), dtype=torch.float16)


@pytest.mark.parametrize("N,lead", [(1, (5,)), (65, (2, 21)), (768, (13,)), (4099, (3,)), (10007, (2,))],
                         ids=lambda v: str(v))
def test_hidden_sizes_rms_bf16(N, lead):
    check_case(randn(*lead, N), randn(*lead, N), randn(N), dtype=torch.bfloat16, rms=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_dtypes(dtype, rms):
    check_case(randn(2, 7, 768), randn(2, 7, 768), randn(768), randn(768), dtype=dtype, rms=rms)


def test_large_mean_rows_fp32():
    """Rows whose mean dwarfs their spread (cancellation in a one-pass variance)."""
    x = randn(37, 1000) * 0.01 + 300.0
    check_case(x, randn(37, 1000), randn(1000), randn(1000), dtype=torch.float32)


# -- optional residual / weight / bias ------------------------------------------------------------------------------

@pytest.mark.parametrize("has_r", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("has_w", [False, True], ids=["now", "w"])
@pytest.mark.parametrize("has_b", [False, True], ids=["nob", "b"])
def test_optional_arguments(has_r, has_w, has_b):
    N = 65
    check_case(randn(4, 23, N), randn(4, 23, N) if has_r else None, randn(N) if has_w else None,
               randn(N) if has_b else None, dtype=torch.float16)


@pytest.mark.parametrize("has_r", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("has_w", [False, True], ids=["now", "w"])
def test_optional_arguments_rms(has_r, has_w):
    check_case(randn(41, 130), randn(41, 130) if has_r else None, randn(130) if has_w else None,
               dtype=torch.float32, rms=True)


def test_post_norm_only_out_is_used():
    """Post-norm (no gradient into residual_out): dx and dresidual come only from out."""
    check_case(randn(2, 19, 96), randn(2, 19, 96), randn(96), randn(96), dtype=torch.bfloat16,
               grad_residual_out=False)


# -- looped path with small chunks (several chunks per row and a ragged last one) -----------------------------------

@pytest.fixture
def small_loops(monkeypatch):
    monkeypatch.setattr(K, "MAX_TILE_N_FWD", 64)
    monkeypatch.setattr(K, "MAX_TILE_N_BWD", 64)
    monkeypatch.setattr(K, "LOOP_FWD", (2, 64))
    monkeypatch.setattr(K, "LOOP_BWD", (2, 128))


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_looped_path_small_chunks(small_loops, rms):
    assert K.fwd_config(300).kwargs["LOOPED"] and K.bwd_config(300).kwargs["LOOPED"]
    per = ln_ops.backward_schedule(23, 300, torch.float16, ln_ops.device_sms(torch.device("cpu")), 2).per
    assert per > 1  # programs accumulate several row blocks into their partial (dweight, dbias) rows
    x = randn(23, 300) * 0.5 + 3.0
    check_case(x, randn(23, 300), randn(300), randn(300), dtype=torch.float16, rms=rms, dropout_p=0.2)


# -- residual stream in fp32, fp32 parameters ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rdt", [None, torch.float32], ids=["residual_lowp", "residual_fp32"])
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_residual_in_fp32(dtype, rdt, rms):
    res = check_case(randn(3, 29, 200), randn(3, 29, 200), randn(200), randn(200), dtype=dtype, rms=rms,
                     residual_in_fp32=True, residual_dtype=rdt)
    assert res["ours"]["residual_out"].dtype == torch.float32
    assert res["ours"]["dresidual"].dtype == (rdt or dtype)


def test_residual_in_fp32_without_residual():
    res = check_case(randn(17, 100), None, randn(100), randn(100), dtype=torch.bfloat16, residual_in_fp32=True)
    assert res["ours"]["residual_out"].dtype == torch.float32


def test_fp32_parameters_with_bf16_activations():
    res = check_case(randn(2, 33, 256), randn(2, 33, 256), randn(256), randn(256), dtype=torch.bfloat16,
                     param_dtype=torch.float32)
    assert res["ours"]["dweight"].dtype == torch.float32 and res["ours"]["out"].dtype == torch.bfloat16


# -- dropout ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_dropout_matches_reference_with_the_kernels_mask(dtype, rms):
    check_case(randn(2, 19, 160), randn(2, 19, 160), randn(160), randn(160), dtype=dtype, rms=rms, dropout_p=0.3)


def test_dropout_without_residual():
    check_case(randn(9, 768), None, randn(768), randn(768), dtype=torch.bfloat16, dropout_p=0.1)


def test_dropout_keep_rate():
    p = 0.25
    keep = ln_ops.dropout_keep_mask(_seed_of(5), (96, 1031), p, DEVICE)
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f} vs {1 - p}"
    assert not torch.equal(keep[0], keep[1])  # rows draw different numbers


def test_dropout_reproducible_under_manual_seed():
    x, r = dev(torch.randn(7, 300)), dev(torch.randn(7, 300))
    torch.manual_seed(123)
    a = fastattn.add_layer_norm(x, r, dropout_p=0.4)
    b = fastattn.add_layer_norm(x, r, dropout_p=0.4)
    torch.manual_seed(123)
    c = fastattn.add_layer_norm(x, r, dropout_p=0.4)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert not torch.equal(a[1], b[1])
    dropped = (a[1] == r)  # residual_out = dropout(x) + r equals r where x was dropped
    assert 0.3 < dropped.double().mean().item() < 0.5


def test_dropout_backward_regenerates_the_mask():
    """dx is zero exactly where the forward dropped x, and dy/(1-p) scaled elsewhere (no norm in the way: the
    gradient flows only through residual_out here)."""
    x = dev(torch.randn(11, 97)).requires_grad_()
    r = dev(torch.randn(11, 97))
    torch.manual_seed(9)
    _, res_out = fastattn.add_layer_norm(x, r, dropout_p=0.5)
    g = dev(torch.randn(11, 97))
    res_out.backward(g)
    kept = res_out != r
    torch.testing.assert_close(x.grad, torch.where(kept, g * 2.0, torch.zeros_like(g)))


# -- edge rows -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [1, 768, 10007])
def test_constant_rows_are_finite(dtype, N):
    rows = 3 if N > 8192 else 9
    x = torch.full((rows, N), 0.3, dtype=torch.float64)
    x[1] = -2.5
    x[2] = 0.0
    res = check_case(x, None, randn(N), randn(N), dtype=dtype)
    for name, t in res["ours"].items():
        if t is not None:
            assert torch.isfinite(t).all(), name
    if N > 1:  # a constant row normalises to exactly the bias
        torch.testing.assert_close(res["ours"]["out"][0].double(), res["ref"]["out"][0], atol=1e-2, rtol=1e-2)


def test_constant_rows_fp32_and_rms(small_loops):
    for rms in (False, True):
        x = torch.full((6, 300), 1.7, dtype=torch.float64)
        x[3] = 0.0  # an all-zero row: RMSNorm's variance is 0 as well
        w = dev(torch.randn(300)).requires_grad_()
        xl = dev(x, torch.float32).requires_grad_()
        out, _ = (fastattn.add_rms_norm(xl, None, w) if rms else fastattn.add_layer_norm(xl, None, w))
        out.backward(torch.randn_like(out))
        for t in (out, xl.grad, w.grad):
            assert torch.isfinite(t).all()


# -- layouts ---------------------------------------------------------------------------------------------------------

LAYOUTS = {
    # (B, L, N) activations without the class token: rows on two strided levels, no copy
    "sliced_tokens": lambda t: F.pad(t, (0, 0, 1, 0))[:, 1:],
    # normalised dim with stride != 1 (a channels-first tensor normalised over channels)
    "transposed_last_dim": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
    # batch-major view of a sequence-major buffer
    "transposed_rows": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_contiguous_inputs(layout):
    res = check_case(randn(3, 19, 72), randn(3, 19, 72), randn(72), randn(72), dtype=torch.float16,
                     layout=LAYOUTS[layout])
    assert res["ours"]["out"].is_contiguous()


def test_strided_inputs_are_read_without_copies(monkeypatch):
    calls = spy_launches(monkeypatch, FWD)
    buf = dev(torch.randn(2, 11, 40))
    x = buf[:, 1:]  # (2, 10, 40) with strides (440, 40, 1)
    r = dev(torch.randn(40, 10, 2)).permute(2, 1, 0)  # strides (1, 2, 20)
    out, _ = fastattn.add_layer_norm(x, r)
    seen = [(args[0].data_ptr(), args[1].data_ptr(), args[8:14]) for _, args, _ in calls]
    assert seen == [(x.data_ptr(), r.data_ptr(), (440, 40, 1, 1, 2, 20))]
    torch.testing.assert_close(out, F.layer_norm(x + r, (40,)))


def test_irregular_leading_strides_are_copied_once():
    x = dev(torch.randn(3, 4, 5, 16))[:, 1:, ::2]  # three irregular levels
    w = dev(torch.randn(16))
    torch.testing.assert_close(fastattn.layer_norm(x, (16,), w), F.layer_norm(x, (16,), w))


def test_expanded_gradient():
    x = dev(torch.randn(5, 6, 33)).requires_grad_()
    fastattn.layer_norm(x, (33,)).square().sum().backward()  # grad of .sum() is a zero-stride expand
    x2 = x.detach().clone().requires_grad_()
    F.layer_norm(x2, (33,)).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)
    y = dev(torch.randn(4, 21)).requires_grad_()
    fastattn.layer_norm(y, (21,)).sum().backward()
    torch.testing.assert_close(y.grad, torch.zeros_like(y), atol=1e-6, rtol=0)


# -- functional drop-ins ---------------------------------------------------------------------------------------------

def test_layer_norm_matches_torch_functional():
    x, w, b = (dev(torch.randn(*s)).requires_grad_() for s in ((2, 7, 6, 10), (6, 10), (6, 10)))
    ramp = dev(torch.arange(10.0))
    with _runtime.record_launches() as n:
        out = fastattn.layer_norm(x, (6, 10), w, b, 1e-3)  # two normalised dims, flattened
        out.backward(torch.ones_like(out) * ramp)
    assert n[FWD] == 1 and n[BWD] == 1
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    ref = F.layer_norm(leaves[0], (6, 10), leaves[1], leaves[2], 1e-3)
    ref.backward(torch.ones_like(ref) * ramp)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip((x, w, b), leaves):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fastattn.layer_norm(x, 10), F.layer_norm(x, (10,)), atol=1e-5, rtol=1e-5)


def test_rms_norm_matches_torch_functional():
    x = dev(torch.randn(3, 9, 50, dtype=torch.float16))
    w = dev(torch.randn(50, dtype=torch.float16))
    with _runtime.record_launches() as n:
        out = fastattn.rms_norm(x, (50,), w)  # eps=None: finfo(float16).eps, as torch
    assert n[FWD] == 1
    torch.testing.assert_close(out, F.rms_norm(x.float(), (50,), w.float(), torch.finfo(torch.float16).eps).half(),
                               atol=2e-3, rtol=2e-3)


def test_return_residual_false_skips_the_write_when_no_grad(monkeypatch):
    calls = spy_launches(monkeypatch, FWD)

    def stored():  # whether each launch wrote residual_out (its pointer RO)
        return [args[5] is not None for _, args, _ in calls]

    x, r = dev(torch.randn(9, 64)), dev(torch.randn(9, 64))
    with torch.no_grad():
        out = fastattn.add_layer_norm(x, r, return_residual=False)
    assert isinstance(out, torch.Tensor) and stored() == [False]
    xg = x.clone().requires_grad_()
    out2 = fastattn.add_layer_norm(xg, r, return_residual=False)  # the backward needs the sum: it is written
    out2.sum().backward()
    assert stored() == [False, True]
    torch.testing.assert_close(out, F.layer_norm(x + r, (64,)))
    _, res3 = fastattn.add_layer_norm(x, None)  # nothing to add: residual_out is x itself, never written
    assert res3 is x and stored()[-1] is False


# -- modules ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-6}], ids=str)
def test_layernorm_module_is_a_drop_in(kw):
    torch_ln = torch.nn.LayerNorm(48, **kw)
    with torch.no_grad():
        for p in torch_ln.parameters():
            p.normal_()
    ours = fastattn.nn.LayerNorm(48, **kw)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == torch_ln.state_dict().keys()
    ours.load_state_dict(torch_ln.state_dict())
    assert repr(ours).replace("fastattn.nn.", "") == repr(torch_ln)
    ours, torch_ln = dev(ours), dev(torch_ln)
    x = dev(torch.randn(2, 13, 48))
    with _runtime.record_launches() as n:
        out = ours(x)
    assert isinstance(out, torch.Tensor) and n[FWD] == 1
    torch.testing.assert_close(out, torch_ln(x), atol=1e-5, rtol=1e-5)


def test_layernorm_module_residual_pre_and_post_norm():
    m = dev(fastattn.nn.LayerNorm(32))
    x, r = dev(torch.randn(3, 5, 32)), dev(torch.randn(3, 5, 32))
    out, res_out = m(x, r)
    torch.testing.assert_close(res_out, x + r)
    torch.testing.assert_close(out, F.layer_norm(x + r, (32,), m.weight, m.bias), atol=1e-5, rtol=1e-5)
    out_only = m(x, r, return_residual=False)
    torch.testing.assert_close(out_only, out)
    m.eval()  # dropout only applies in training
    torch.testing.assert_close(m(x, r, dropout_p=0.5)[1], x + r)
    m.train()
    assert not torch.equal(m(x, r, dropout_p=0.5)[1], x + r)


def test_layernorm_module_multi_dim_shape():
    m = fastattn.nn.LayerNorm((4, 8))
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = dev(torch.randn(3, 4, 8))
    ref = torch.nn.LayerNorm((4, 8))
    ref.load_state_dict(m.state_dict())
    m, ref = dev(m), dev(ref)
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rmsnorm_module_is_a_drop_in(eps):
    torch_rms = torch.nn.RMSNorm(40, eps=eps)
    with torch.no_grad():
        torch_rms.weight.normal_()
    ours = fastattn.nn.RMSNorm(40, eps=eps)
    assert isinstance(ours, torch.nn.RMSNorm)
    ours.load_state_dict(torch_rms.state_dict())
    ours, torch_rms = dev(ours), dev(torch_rms)
    x, r = dev(torch.randn(6, 40)).requires_grad_(), dev(torch.randn(6, 40))
    torch.testing.assert_close(ours(x), torch_rms(x), atol=1e-5, rtol=1e-5)
    out, _ = ours(x, r, residual_in_fp32=True)
    torch.testing.assert_close(out, torch_rms(x + r), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert ours.weight.grad is not None and x.grad is not None


# -- determinism, gradcheck, torch.compile ---------------------------------------------------------------------------

def test_backward_is_bitwise_repeatable():
    """Every gradient, dweight and dbias included, is bitwise equal across runs (no atomics), also when programs
    own several row blocks."""
    N, M = 65, 150
    per = ln_ops.backward_schedule(M, N, torch.float16, ln_ops.device_sms(torch.device("cpu")), 2).per
    assert per > 1  # several row blocks per program: the partial sums really accumulate
    inputs = [dev(torch.randn(*s, dtype=torch.float16)) for s in ((M, N), (M, N), (N,), (N,))]
    g_out, g_res = dev(torch.randn(M, N, dtype=torch.float16)), dev(torch.randn(M, N, dtype=torch.float16))
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in inputs]
        torch.manual_seed(0)
        out, res = fastattn.add_layer_norm(*leaves, dropout_p=0.1)
        torch.autograd.backward([out, res], [g_out, g_res])
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_gradcheck_float64_through_the_kernels(small_loops):
    """Finite differences of the Triton kernels themselves (float64 runs in the interpreter): tile path for
    N=7, looped path (small chunks) for N=150, with dropout, residual and residual_out's gradient."""
    if not _runtime.interpreting():
        pytest.skip("float64 runs the Triton kernels only under the interpreter")
    for N, rms in ((7, False), (150, False), (7, True)):
        x, r, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 3, N), (2, 3, N), (N,),
                                                                                          (N,)))

        def f(x, r, w, b, rms=rms):
            torch.manual_seed(11)  # the same dropout mask on every evaluation
            if rms:
                return fastattn.add_rms_norm(x, r, w, dropout_p=0.3)
            return fastattn.add_layer_norm(x, r, w, b, dropout_p=0.3)

        with _runtime.record_launches() as n:
            assert torch.autograd.gradcheck(f, (x, r, w, b), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
        assert n[FWD] > 0 and n[BWD] > 0


def test_torch_compile_fullgraph():
    x = dev(torch.randn(2, 9, 64)).requires_grad_()
    r = dev(torch.randn(2, 9, 64)).requires_grad_()
    m = dev(fastattn.nn.LayerNorm(64))

    def f(x, r):
        out, res = m(x, r, dropout_p=0.2)
        return (out * res).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    with _runtime.record_launches() as n:
        loss = compiled(x, r)
        grads = torch.autograd.grad(loss, (x, r, m.weight, m.bias))
    assert n[FWD] == 1 and n[BWD] == 1 and n[REDUCE] == 1
    torch.manual_seed(3)
    ref_loss = f(x, r)
    ref_grads = torch.autograd.grad(ref_loss, (x, r, m.weight, m.bias))
    assert torch.equal(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_registered_custom_ops():
    assert hasattr(torch.ops.fastattn, "add_layer_norm") and hasattr(torch.ops.fastattn, "add_layer_norm_backward")
    x = dev(torch.randn(4, 12))
    out, _, mean, rstd = torch.ops.fastattn.add_layer_norm(x, x, None, None, 1e-5, 0.0, None, False, False, True)
    torch.testing.assert_close(out, F.layer_norm(2 * x, (12,)))
    assert mean.shape == (4,) and rstd.dtype == torch.float32


def test_opcheck():
    x = dev(torch.randn(3, 20)).requires_grad_()
    w = dev(torch.randn(20)).requires_grad_()
    torch.library.opcheck(torch.ops.fastattn.add_layer_norm.default, (x, x.detach() * 2, w, None, 1e-5, 0.0, None,
                                                                      False, False, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# -- empty inputs ----------------------------------------------------------------------------------------------------

def test_empty_rows():
    x, w, b = (dev(torch.randn(*s)).requires_grad_() for s in ((0, 7, 16), (16,), (16,)))
    out, _ = fastattn.add_layer_norm(x, dev(torch.randn(0, 7, 16)), w, b)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.equal(w.grad, dev(torch.zeros(16))) and x.grad.shape == x.shape


# -- bad input -------------------------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32):
    return dev(torch.randn(*shape, dtype=dtype))


BAD = [
    ("weight_shape", lambda: ((_t(3, 8), None, _t(7)), {}), ValueError, r"weight must have shape \(8,\)"),
    ("bias_shape", lambda: ((_t(3, 8), None, None, _t(8, 1)), {}), ValueError, "bias must have shape"),
    ("residual_shape", lambda: ((_t(3, 8), _t(4, 8)), {}), ValueError, "residual must have x's shape"),
    ("residual_dtype", lambda: ((_t(3, 8), _t(3, 8, dtype=torch.float16)), {}), TypeError, "residual must have dtype"),
    ("residual_fp32_needs_flag", lambda: ((_t(3, 8, dtype=torch.float16), _t(3, 8)), {}), TypeError,
     "residual_in_fp32=True"),
    ("weight_dtype", lambda: ((_t(3, 8), None, _t(8, dtype=torch.float16)), {}), TypeError, "weight must have"),
    ("eps_zero", lambda: ((_t(3, 8),), {"eps": 0.0}), ValueError, "eps must be a positive"),
    ("eps_negative", lambda: ((_t(3, 8),), {"eps": -1e-5}), ValueError, "eps must be a positive"),
    ("eps_nan", lambda: ((_t(3, 8),), {"eps": float("nan")}), ValueError, "eps"),
    ("dropout_one", lambda: ((_t(3, 8),), {"dropout_p": 1.0}), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    ("dropout_negative", lambda: ((_t(3, 8),), {"dropout_p": -0.1}), ValueError, "dropout_p"),
    ("int_input", lambda: ((dev(torch.ones(3, 8, dtype=torch.int64)),), {}), TypeError, "x must be a floating-point"),
    ("not_a_tensor", lambda: (([1.0, 2.0],), {}), TypeError, "x must be a Tensor"),
    ("scalar_input", lambda: ((dev(torch.tensor(1.0)),), {}), ValueError, "x must have at least one dim"),
    ("fp32_flag_type", lambda: ((_t(3, 8),), {"residual_in_fp32": 1}), TypeError, "residual_in_fp32 must be a bool"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_naming_the_argument(case):
    _, make, exc, text = case
    args, kw = make()
    with pytest.raises(exc, match=text):
        fastattn.add_layer_norm(*args, **kw)


@pytest.mark.parametrize("call,text", [
    (lambda: fastattn.layer_norm(_t(3, 8), (4,)), "normalized_shape"),
    (lambda: fastattn.layer_norm(_t(3, 8), (8,), _t(4, 2)), "weight must have shape"),
    (lambda: fastattn.layer_norm(_t(3, 8), "8"), "normalized_shape must be an int"),
    (lambda: fastattn.add_rms_norm(_t(3, 8), None, _t(9)), "weight must have shape"),
    (lambda: fastattn.add_rms_norm(_t(3, 8), eps=0.0), "eps"),
    (lambda: dev(fastattn.nn.LayerNorm(8, eps=0.0))(_t(3, 8)), "eps"),
], ids=["ln_shape", "ln_weight", "ln_shape_type", "rms_weight", "rms_eps", "module_eps"])
def test_bad_input_other_entry_points(call, text):
    with pytest.raises((ValueError, TypeError), match=text):
        call()


def test_device_mix_raises():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to mix devices")
    with pytest.raises(RuntimeError, match="one device"):
        fastattn.add_layer_norm(torch.randn(3, 8, device="cuda"), torch.randn(3, 8))


# -- visible fallback ------------------------------------------------------------------------------------------------

def test_cpu_without_interpreter_runs_eager_reference_visibly():
    cpu_only("the eager fallback of CPU tensors without Triton's interpreter")
    code = textwrap.dedent("""
        import os, warnings
        os.environ.pop("TRITON_INTERPRET", None)
        import torch, fastattn, torch.nn.functional as F
        x, r = torch.randn(4, 16), torch.randn(4, 16)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out, res = fastattn.add_layer_norm(x, r)
            m = fastattn.nn.RMSNorm(16)
            y = m(x)
        assert any(issubclass(v.category, fastattn.FallbackWarning) and "interpreter" in str(v.message) for v in w)
        torch.testing.assert_close(out, F.layer_norm(x + r, (16,)))
        torch.testing.assert_close(res, x + r)
        torch.testing.assert_close(y, F.rms_norm(x, (16,), m.weight, torch.finfo(torch.float32).eps))
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
