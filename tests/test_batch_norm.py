"""fastattn.batch_norm_act / batch_norm_add_relu against act(F.batch_norm(...) + identity): output, every gradient
and the running statistics (2x-eager rule, fastattn.testing), for every activation.

Each case runs three times on the same inputs (low-precision values, so every run sees exactly the same numbers):
eager PyTorch in float64 (the reference), eager PyTorch in the low precision (eager's error) and ours in the low
precision, with a check that the Triton kernels, not the eager fallback, ran.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, cpu_only, dev, spy_launches, three_way

import fastattn
from fastattn import _runtime, reference
from fastattn.ops import batch_norm as bn_ops
from fastattn.testing import batch_norm_floors

GRADS = ("dx", "didentity", "dweight", "dbias")
ACTIVATIONS = bn_ops.ACTIVATIONS
# Where each activation's derivative jumps: the tests keep the pre-activation away from these (see below).
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "hardsigmoid": (-3.0, 3.0),
         "hardswish": (-3.0, 3.0)}


def _eager(x, identity, rm, rv, w, b, training, momentum, eps, num_batches_tracked=None, activation="relu",
           negative_slope=0.01):
    return reference.batch_norm_act(x, identity, rm, rv, w, b, training, momentum, eps, activation=activation,
                                    negative_slope=negative_slope, num_batches_tracked=num_batches_tracked)


def _lowp(shape, dtype, scale=1.0, offset=0.0):
    """float64 values that the low precision holds exactly."""
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype).double()


def _leaf(t, dtype, fmt=None, requires_grad=False):
    t = dev(t.detach(), dtype, copy=True)
    return (t.to(memory_format=fmt) if fmt is not None else t).requires_grad_(requires_grad)


KINK_MARGIN = {torch.float16: 0.02, torch.bfloat16: 0.1, torch.float32: 1e-4}


def _away_from_the_kink(x, ident, rm, rv, w, b, training, eps, dtype, kinks=(0.0,)):
    """Move the inputs whose pre-activation z = bn(x) + identity lies within a few roundings of a kink.

    Eager PyTorch rounds bn(x) to the low precision before adding identity and activating, so near a point where
    the activation's derivative jumps (ReLU's 0, ReLU6's 0 and 6, the hard ones' -3 and 3) its derivative differs
    from the float64 one; each such element costs it an O(|dy|) gradient error, which would make the 2x-eager rule
    vacuous for every gradient. Away from the kinks the rule measures the arithmetic."""
    margin = KINK_MARGIN[dtype]
    for _ in range(4 if kinks else 0):
        z = F.batch_norm(x, rm, rv, w, b, training, 0.0, eps)  # momentum 0: the running stats are not changed
        if ident is not None:
            z = z + ident
        nearest = torch.stack([z - k for k in kinks]).abs().argmin(0)
        d = z - torch.tensor(kinks, dtype=z.dtype)[nearest]  # signed distance to the nearest kink
        close = d.abs() < margin
        if not close.any():
            break
        step = torch.where(d < 0, -2.0 * margin, 2.0 * margin)
        if ident is not None:  # the statistics do not depend on identity: move it
            ident = torch.where(close, ident + step, ident).to(dtype).double()
        else:  # move x by the step seen through this channel's scale; the batch statistics shift by O(step / M)
            var = x.var((0, 2, 3), unbiased=False) if training or rv is None else rv
            scale = ((var + eps).rsqrt() * (w if w is not None else 1.0)).view(1, -1, 1, 1)
            x = torch.where(close, x + step / scale, x).to(dtype).double()
    return x, ident


def check_case(shape, dtype, *, training=True, identity=True, channels_last=False, affine=True, running=True,
               momentum=0.1, eps=1e-5, offset=0.0, requires=("x", "identity", "weight", "bias"), activation=None,
               negative_slope=0.01, scale=2.0):
    """Compare ours with eager in ``dtype`` against float64 eager, all on the test device (the inputs are drawn on the
    CPU); returns ours' results. ``activation=None``: ``fastattn.batch_norm_add_relu``, else
    ``fastattn.batch_norm_act`` with that activation."""
    C = shape[1]
    act = activation or "relu"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _lowp(shape, dtype, scale, offset)
    ident = _lowp(shape, dtype) if identity else None
    w = (torch.rand(C, dtype=torch.float64) + 0.5).float().double() if affine else None
    b = _lowp((C,), torch.float32) if affine else None
    rm = _lowp((C,), torch.float32) if running else None
    rv = _lowp((C,), torch.float32).abs() + 0.5 if running else None
    grad_out = _lowp(shape, dtype)
    x, ident = _away_from_the_kink(x, ident, rm, rv, w, b, training, eps, dtype, KINKS.get(act, ()))

    def ours(*args):
        if activation is None:
            return fastattn.batch_norm_add_relu(*args)
        return fastattn.batch_norm_act(*args, activation=activation, negative_slope=negative_slope)

    layout_kept = []

    def run(label, lowp):
        pdt = torch.float64 if label == "ref" else torch.float32
        xs = _leaf(x, lowp, fmt, "x" in requires)
        ids = _leaf(ident, lowp, fmt, "identity" in requires) if identity else None
        ws = _leaf(w, pdt, None, "weight" in requires) if affine else None
        bs = _leaf(b, pdt, None, "bias" in requires) if affine else None
        rms = _leaf(rm, pdt) if running else None
        rvs = _leaf(rv, pdt) if running else None
        leaves = {"dx": xs, "didentity": ids, "dweight": ws, "dbias": bs}
        args = (xs, ids, rms, rvs, ws, bs, training, momentum, eps)
        out = ours(*args) if label == "ours" else _eager(*args, activation=act, negative_slope=negative_slope)
        if any(t is not None and t.requires_grad for t in leaves.values()):
            out.backward(dev(grad_out, lowp).to(memory_format=fmt))
        if label == "ours":
            layout_kept.append(out.is_contiguous(memory_format=fmt))
        return {"out": out, "running_mean": rms, "running_var": rvs,
                **{k: (t.grad if t is not None and t.requires_grad else None) for k, t in leaves.items()}}

    kernels = dict.fromkeys(bn_ops.FORWARD_KERNELS if training else bn_ops.FORWARD_KERNELS[-1:], 1)  # eval: apply
    if requires:
        kernels[bn_ops.BACKWARD_KERNELS[0]] = 1
    floors = batch_norm_floors(x, ident, rm, rv, w, b, grad_out, dtype=dtype, training=training, eps=eps,
                               momentum=momentum, lane_terms=bn_ops.lane_terms(dev(x).to(memory_format=fmt)),
                               activation=act, negative_slope=negative_slope)
    results = three_way(run, dtype, kernels=kernels, floors=floors)
    ours_r, eager = results["ours"], results["eager"]
    assert layout_kept == [True], "the output does not keep x's memory format"
    for name in GRADS:
        if results["ref"][name] is None:
            assert ours_r[name] is None, f"{name}: a gradient where torch has none"
        else:
            assert ours_r[name].dtype == eager[name].dtype, f"{name}: dtype {ours_r[name].dtype} != {eager[name].dtype}"
    return ours_r


# -- ResNet-like shapes, both layouts, training and inference, with and without identity ---------------------------

SHAPES = [(4, 64, 7, 7), (2, 3, 13, 11), (8, 256, 4, 4), (3, 5, 1, 1)]


@pytest.mark.parametrize("identity", [True, False], ids=["identity", "no_identity"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_shapes_fp16(shape, channels_last, training, identity):
    check_case(shape, torch.float16, training=training, identity=identity, channels_last=channels_last)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_dtypes(dtype, channels_last, training):
    check_case((4, 24, 7, 5), dtype, training=training, channels_last=channels_last)


# -- every activation (batch_norm_act): fp16, bf16 and fp32, training and eval, both layouts -----------------------

ACTIVATION_CASES = [  # (dtype, training, channels_last, identity)
    (torch.float16, True, False, True),
    (torch.float16, False, True, False),
    (torch.bfloat16, True, True, True),
    (torch.float32, True, False, False),
]


@pytest.mark.parametrize("dtype,training,channels_last,identity", ACTIVATION_CASES,
                         ids=["fp16-train-nchw-identity", "fp16-eval-cl", "bf16-train-cl-identity", "fp32-train-nchw"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation(activation, dtype, training, channels_last, identity):
    # values over [-6, 6] and beyond: every piece of the piecewise activations and the tails of the smooth ones
    check_case((3, 20, 7, 5), dtype, training=training, channels_last=channels_last, identity=identity,
               activation=activation, negative_slope=0.2, scale=3.0)


def test_leaky_relu_negative_slope_and_bias_only_gradient():
    check_case((4, 9, 5, 3), torch.float16, activation="leaky_relu", negative_slope=-0.3, requires=("bias",))
    check_case((4, 9, 5, 3), torch.float16, activation="silu", requires=("weight", "identity"), training=False)


@pytest.mark.parametrize("activation,identity,saved", [
    ("relu", True, {"x", "out"}), ("silu", False, {"x"}), ("silu", True, {"x", "identity"}),
    ("identity", True, {"x"}), ("gelu_tanh", False, {"x"})])
def test_saves_the_least_the_backward_needs(activation, identity, saved):
    """ReLU keeps its output (its mask); an activation whose derivative is taken at the pre-activation keeps the
    identity (if any) to recompute it from x; identity needs neither. Besides these: per-channel vectors only."""
    x = dev(torch.randn(2, 3, 4, 5)).requires_grad_()
    ident = dev(torch.randn(2, 3, 4, 5)).requires_grad_() if identity else None
    w, b = dev(torch.rand(3)).requires_grad_(), dev(torch.randn(3)).requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = fastattn.batch_norm_act(x, ident, None, None, w, b, True, activation=activation)
    big = {"x" if t.data_ptr() == x.data_ptr() else "out" if t.data_ptr() == out.data_ptr() else
           "identity" if ident is not None and t.data_ptr() == ident.data_ptr() else tuple(t.shape)
           for t in kept if t.numel() > 3}
    assert big == saved


def test_eval_batch_1_spatial_1x1():
    check_case((1, 7, 1, 1), torch.float16, training=False)
    check_case((1, 7, 1, 1), torch.float32, training=False, channels_last=True)


def test_train_batch_1_spatial_1x1_raises_torchs_error():
    x, rm, rv = dev(torch.randn(1, 3, 1, 1)), dev(torch.zeros(3)), dev(torch.ones(3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as ours:
        fastattn.batch_norm_add_relu(x, None, rm, rv, training=True)
    with pytest.raises(ValueError) as theirs:
        F.batch_norm(x, rm, rv, training=True)
    assert str(ours.value) == str(theirs.value)


def test_batch_1_training_with_spatial_is_fine():
    check_case((1, 6, 3, 2), torch.float16, training=True)


# -- statistics ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,channels_last", [(torch.float16, False), (torch.float16, True),
                                                 (torch.float32, False)], ids=["fp16-nchw", "fp16-cl", "fp32-nchw"])
def test_large_mean_variance_is_robust(dtype, channels_last):
    """Activations around 1000 with std ~2: E[x^2] - E[x]^2 in fp32 would lose the variance (~6e-2 error)."""
    check_case((4, 16, 9, 7), dtype, offset=1000.0, channels_last=channels_last)


def test_without_running_stats_track_running_stats_false():
    check_case((4, 24, 7, 5), torch.float16, running=False)


@pytest.mark.parametrize("affine", [False, True], ids=["no_affine", "affine"])
def test_weight_and_bias_none(affine):
    check_case((3, 10, 6, 5), torch.float16, affine=affine)
    check_case((3, 10, 6, 5), torch.float16, affine=affine, training=False)


def test_weight_only():
    x = dev(torch.randn(3, 6, 5, 4))
    w = dev(torch.randn(6)).requires_grad_()
    with _runtime.record_launches() as n:
        out = fastattn.batch_norm_add_relu(x, None, None, None, w, None, training=True)
        out.sum().backward()
    assert n["_bn_bwd_combine"] == 1
    w2 = w.detach().clone().requires_grad_()
    ref = F.relu(F.batch_norm(x, None, None, w2, None, True))
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_momentum_values():
    check_case((4, 24, 7, 5), torch.float16, momentum=1.0)
    check_case((4, 24, 7, 5), torch.float16, momentum=0.0, eps=1e-3)


def test_momentum_none_cumulative_average():
    x = dev(torch.randn(4, 6, 5, 3))
    rm, rv = dev(torch.randn(6)), dev(torch.rand(6) + 0.5)
    rm2, rv2 = rm.clone(), rv.clone()
    nbt = dev(torch.tensor(3))
    with _runtime.record_launches() as n:
        out = fastattn.batch_norm_add_relu(x, None, rm, rv, None, None, True, None, num_batches_tracked=nbt)
    assert n["_bn_fwd_combine"] == 1
    ref = F.relu(F.batch_norm(x, rm2, rv2, None, None, True, 1.0 / 3))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


@pytest.mark.parametrize("which", ["identity", "weight", "x", "weight+bias"])
def test_only_some_inputs_require_grad(which):
    check_case((3, 12, 5, 7), torch.float16, requires=tuple(which.split("+")))
    check_case((3, 12, 5, 7), torch.float16, requires=tuple(which.split("+")), training=False)


# -- layouts -------------------------------------------------------------------------------------------------------

def _torch_vs_ours(x, identity, grad_out=None, training=True):
    """fp32 comparison of ours with eager on arbitrary (strided) inputs; returns ours' output."""
    C = x.shape[1]
    w, b = dev(torch.randn(C)), dev(torch.randn(C))
    rm, rv = dev(torch.randn(C)), dev(torch.rand(C) + 0.5)
    results = []
    for fn in (_eager, fastattn.batch_norm_add_relu):
        xs = x.detach().requires_grad_()  # same strides as x
        ids = identity.detach().requires_grad_() if identity is not None else None
        ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
        rms, rvs = rm.clone(), rv.clone()
        with _runtime.record_launches() as n:
            out = fn(xs, ids, rms, rvs, ws, bs, training, 0.1, 1e-5)
            out.backward(grad_out if grad_out is not None else torch.ones_like(out))
        results.append([out, xs.grad, ids.grad if ids is not None else None, ws.grad, bs.grad, rms, rvs])
    assert n["_bn_fwd_apply"] == 1 and n["_bn_bwd_reduce"] == 1
    for name, a, b_ in zip(("out", "dx", "did", "dw", "db", "rm", "rv"), results[1], results[0]):
        if b_ is not None:
            torch.testing.assert_close(a, b_, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    return results[1][0]


def test_strided_views_without_copy(monkeypatch):
    """A cropped, strided spatial view (H and W do not merge) and a transposed one are read through strides."""
    calls = spy_launches(monkeypatch, "_bn_fwd_reduce")
    base = dev(torch.randn(3, 6, 11, 14))
    x = base[:, :, 1:, ::2]
    _torch_vs_ours(x, dev(torch.randn(x.shape)))
    assert [args[0].data_ptr() for _, args, _ in calls] == [x.data_ptr()]
    xt = dev(torch.randn(3, 6, 7, 5)).transpose(2, 3)
    _torch_vs_ours(xt, dev(torch.randn(xt.shape)), training=False)


def test_mixed_layouts_and_broadcast_grad():
    """channels_last x with an NCHW identity, and dy = ones expanded with stride 0 (what .sum() sends back)."""
    x = dev(torch.randn(4, 8, 5, 3)).to(memory_format=torch.channels_last)
    identity = dev(torch.randn(4, 8, 5, 3))
    out = _torch_vs_ours(x, identity, grad_out=dev(torch.ones(())).expand(4, 8, 5, 3))
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(training):
    x = dev(torch.randn(0, 5, 3, 3)).requires_grad_()
    w = dev(torch.randn(5)).requires_grad_()
    rm, rv = dev(torch.randn(5)), dev(torch.rand(5) + 0.5)
    rm0, rv0 = rm.clone(), rv.clone()
    out = fastattn.batch_norm_add_relu(x, None, rm, rv, w, None, training)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)  # as torch: an empty batch leaves them untouched
    assert x.grad.shape == x.shape and torch.equal(w.grad, dev(torch.zeros(5)))


# -- determinism, gradcheck, torch.compile -------------------------------------------------------------------------

def test_repeatable_bitwise():
    x = dev(torch.randn(4, 16, 7, 7, dtype=torch.float16))
    identity = dev(torch.randn(4, 16, 7, 7, dtype=torch.float16))
    runs = []
    for _ in range(2):
        xs, ws = x.clone().requires_grad_(), dev(torch.ones(16)).requires_grad_()
        rm, rv = dev(torch.zeros(16)), dev(torch.ones(16))
        out = fastattn.batch_norm_add_relu(xs, identity, rm, rv, ws, None, True)
        out.backward(torch.ones_like(out))
        runs.append([out, xs.grad, ws.grad, rm, rv])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training,activation", [(True, "relu"), (False, "relu"), (True, "silu"),
                                                 (False, "gelu_tanh"), (True, "gelu")])
def test_gradcheck_float64_through_the_kernels(training, activation):
    if not _runtime.interpreting():
        pytest.skip("float64 runs the Triton kernels only under the interpreter")
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    identity = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def f(x, identity, w, b):
        return fastattn.batch_norm_act(x, identity, rm.clone(), rv.clone(), w, b, training, activation=activation)

    with _runtime.record_launches() as n:
        assert torch.autograd.gradcheck(f, (x, identity, w, b), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    assert n["_bn_fwd_apply"] > 0 and n["_bn_bwd_reduce"] > 0


def test_torch_compile_fullgraph_updates_running_stats_like_eager():
    x, identity, w, b = (dev(torch.randn(*s)).requires_grad_() for s in ((4, 8, 5, 3), (4, 8, 5, 3), (8,), (8,)))

    def f(x, identity, w, b, rm, rv):
        return fastattn.batch_norm_add_relu(x, identity, rm, rv, w, b, True, 0.1, 1e-5).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    rm_c, rv_c = dev(torch.zeros(8)), dev(torch.ones(8))
    with _runtime.record_launches() as n:
        loss = compiled(x, identity, w, b, rm_c, rv_c)
        grads = torch.autograd.grad(loss, (x, identity, w, b))
    assert n["_bn_fwd_reduce"] == 1 and n["_bn_fwd_combine"] == 1 and n["_bn_bwd_dx"] == 1
    rm_e, rv_e = dev(torch.zeros(8)), dev(torch.ones(8))
    loss_e = f(x, identity, w, b, rm_e, rv_e)
    grads_e = torch.autograd.grad(loss_e, (x, identity, w, b))
    assert torch.equal(rm_c, rm_e) and torch.equal(rv_c, rv_e)  # the same kernels: bitwise
    torch.testing.assert_close(loss, loss_e)
    for a, e in zip(grads, grads_e):
        torch.testing.assert_close(a, e)
    rm_t, rv_t = dev(torch.zeros(8)), dev(torch.ones(8))
    F.batch_norm(x.detach(), rm_t, rv_t, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(rm_c, rm_t)
    torch.testing.assert_close(rv_c, rv_t)


@pytest.mark.parametrize("activation", ["relu", "identity", "silu"])
def test_backward_holds_no_more_activations_than_eager_inside_a_network(activation):
    """A block tail inside a network (FakeTensors at ResNet-50's 256x56x56, batch 64): the gradient reaching it is
    made by the layer after (here a doubling) and freed by autograd once used, so the peak shows what the tail's
    backward holds while it writes dx. Eager's ReLU backward makes dz = dy * (out > 0) and frees dy before the
    BatchNorm backward, and its add hands dz on as didentity; the fused tail must do the same (a backward that holds
    dy while writing didentity and dx holds one activation more). SiLU's eager backward keeps its saved
    pre-activation alive until it ran, which the fused tail never saves: the same count. The peaks may differ by
    per-channel statistics and kernel scratch only, under 1 MiB here against one activation's 98 MiB."""
    from fastattn.perf import memory

    N, C, H, W = 64, 256, 56, 56
    act_bytes = N * C * H * W * 2

    def peak(fn):
        def setup():
            x, identity = (torch.empty(N, C, H, W, device=DEVICE, dtype=torch.float16).requires_grad_()
                           for _ in range(2))
            w, b = (torch.ones(C, device=DEVICE).requires_grad_() for _ in range(2))
            rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
            return (lambda: fn(x, identity, rm, rv, w, b, True, 0.1, 1e-5, activation=activation) * 2,
                    {"x": x, "identity": identity}, [w, b])

        return memory.measure(setup)

    fused, eager = peak(fastattn.batch_norm_act), peak(_eager)
    assert fused.ops_run["bwd"].get("fastattn.batch_norm_act_backward") == 1  # the fused path ran, not the fallback
    assert fused.peak_bytes < eager.peak_bytes + act_bytes // 8, (fused.peak_bytes / 2**20, eager.peak_bytes / 2**20)


def test_registered_custom_ops():
    for name in ("batch_norm_stats", "batch_norm_act", "batch_norm_act_backward"):
        assert hasattr(torch.ops.fastattn, name)
    schema = str(torch.ops.fastattn.batch_norm_stats.default._schema)
    assert "Tensor(a1!)? running_mean" in schema and "Tensor(a2!)? running_var" in schema


# -- the module ----------------------------------------------------------------------------------------------------

class _EagerBlockTail(torch.nn.BatchNorm2d):
    def forward(self, x, identity=None):
        y = super().forward(x)
        return F.relu(y if identity is None else y + identity)


def test_module_is_a_batchnorm2d_with_the_same_state_dict():
    ours = fastattn.nn.BatchNormAddReLU(32, eps=1e-3, momentum=0.2)
    theirs = torch.nn.BatchNorm2d(32, eps=1e-3, momentum=0.2)
    assert isinstance(ours, torch.nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.weight.data.normal_()
    theirs.running_mean.normal_()
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.running_mean, theirs.running_mean)
    assert "fused" in repr(ours) and "eps=0.001" in repr(ours)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_module_training_steps_then_eval(momentum, channels_last):
    torch.manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours, theirs = fastattn.nn.BatchNormAddReLU(6, momentum=momentum), _EagerBlockTail(6, momentum=momentum)
    theirs.weight.data.normal_()
    theirs.bias.data.normal_()
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = dev(ours), dev(theirs)
    for step in range(3):
        x = dev(torch.randn(4, 6, 5, 3)).to(memory_format=fmt)
        identity = dev(torch.randn(4, 6, 5, 3)) if step != 1 else None
        with _runtime.record_launches() as n:
            out = ours(x, identity)
        assert n["_bn_fwd_reduce"] == 1
        torch.testing.assert_close(out, theirs(x, identity))
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    x = dev(torch.randn(1, 6, 1, 1))
    with _runtime.record_launches() as n:
        out = ours(x)
    assert n["_bn_fwd_apply"] == 1 and n["_bn_fwd_reduce"] == 0
    torch.testing.assert_close(out, theirs(x))
    assert ours.num_batches_tracked.item() == 3


def test_module_without_running_stats_uses_batch_stats_in_eval():
    ours, theirs = fastattn.nn.BatchNormAddReLU(5, track_running_stats=False), _EagerBlockTail(5,
                                                                                          track_running_stats=False)
    assert ours.running_mean is None and ours.num_batches_tracked is None
    ours, theirs = dev(ours), dev(theirs)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        x, identity = dev(torch.randn(3, 5, 4, 4)), dev(torch.randn(3, 5, 4, 4))
        with _runtime.record_launches() as n:
            out = ours(x, identity)
        assert n["_bn_fwd_reduce"] == 1
        torch.testing.assert_close(out, theirs(x, identity))


def test_module_torch_compile_fullgraph_cumulative_momentum():
    ours, theirs = dev(fastattn.nn.BatchNormAddReLU(6, momentum=None)), dev(_EagerBlockTail(6, momentum=None))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x, identity = dev(torch.randn(4, 6, 3, 3)), dev(torch.randn(4, 6, 3, 3))
        torch.testing.assert_close(compiled(x, identity), theirs(x, identity))
    assert ours.num_batches_tracked.item() == 2
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("activation,act_module", [("silu", torch.nn.SiLU()), ("leaky_relu", torch.nn.LeakyReLU(0.2)),
                                                 ("hardswish", torch.nn.Hardswish())], ids=["silu", "leaky", "hswish"])
def test_batch_norm_act2d_module(activation, act_module):
    """fastattn.nn.BatchNormAct2d: nn.BatchNorm2d's constructor and state_dict, act(bn(x) + identity) in training
    (running statistics and num_batches_tracked as nn.BatchNorm2d's) and eval."""
    ours = fastattn.nn.BatchNormAct2d(6, momentum=0.2, activation=activation, negative_slope=0.2)
    theirs = torch.nn.BatchNorm2d(6, momentum=0.2)
    assert isinstance(ours, torch.nn.BatchNorm2d) and list(ours.state_dict()) == list(theirs.state_dict())
    assert f"activation={activation}" in repr(ours) and "fused=batch_norm+add+act" in repr(ours)
    theirs.weight.data.normal_()
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = dev(ours), dev(theirs)
    for step in range(2):
        x, identity = dev(torch.randn(4, 6, 5, 3)), (dev(torch.randn(4, 6, 5, 3)) if step else None)
        with _runtime.record_launches() as n:
            out = ours(x, identity)
        assert n["_bn_fwd_reduce"] == 1
        ref = theirs(x)
        torch.testing.assert_close(out, act_module(ref if identity is None else ref + identity))
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 2
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    x = dev(torch.randn(2, 6, 3, 3))
    torch.testing.assert_close(ours(x), act_module(theirs(x)))
    torch.testing.assert_close(ours(x, activation="identity"), theirs(x))  # a per-call override


def test_batch_norm_act2d_swapped_in_is_a_plain_batch_norm():
    """An nn.BatchNorm2d that fastattn.patch swapped to BatchNormAct2d has no activation of its own."""
    bn = dev(torch.nn.BatchNorm2d(5))
    ref = copy.deepcopy(bn)
    bn.__class__ = fastattn.nn.BatchNormAct2d
    x = dev(torch.randn(3, 5, 4, 4))
    torch.testing.assert_close(bn(x), ref(x))
    assert "activation=identity (the enclosing block passes its own)" in repr(bn)
    with pytest.raises(ValueError, match="activation must be one of"):
        fastattn.nn.BatchNormAct2d(5, activation="swish")


def test_torch_compile_fullgraph_batch_norm_act():
    x, w = dev(torch.randn(4, 8, 5, 3)).requires_grad_(), dev(torch.randn(8)).requires_grad_()

    def f(x, w, rm, rv):
        return fastattn.batch_norm_act(x, None, rm, rv, w, None, True, activation="silu").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with _runtime.record_launches() as n:
        got = torch.autograd.grad(compiled(x, w, dev(torch.zeros(8)), dev(torch.ones(8))), (x, w))
    assert n["_bn_fwd_apply"] == 1 and n["_bn_bwd_dx"] == 1
    for a, e in zip(got, torch.autograd.grad(f(x, w, dev(torch.zeros(8)), dev(torch.ones(8))), (x, w))):
        assert torch.equal(a, e)  # the same kernels: bitwise


# -- bad input -----------------------------------------------------------------------------------------------------

def _args(shape=(2, 3, 4, 4), **over):
    C = shape[1]
    a = {"x": dev(torch.randn(shape)), "identity": None, "running_mean": dev(torch.zeros(C)),
         "running_var": dev(torch.ones(C)), "weight": dev(torch.ones(C)), "bias": dev(torch.zeros(C)),
         "training": True, "momentum": 0.1}
    a.update(over)
    return a


BAD = [
    ("x_rank", _args(x=dev(torch.randn(2, 3, 4))), ValueError, "x must be 4-D"),
    ("x_dtype", _args(x=dev(torch.ones(2, 3, 4, 4, dtype=torch.int32))), TypeError, "x must have dtype"),
    ("x_type", _args(x=[[1.0]]), TypeError, "x must be a Tensor"),
    ("identity_shape", _args(identity=dev(torch.randn(2, 3, 4, 5))), ValueError, "identity must have x's shape"),
    ("identity_dtype", _args(identity=dev(torch.randn(2, 3, 4, 4, dtype=torch.float16))), TypeError,
     "identity must have x's dtype"),
    ("weight_shape", _args(weight=dev(torch.ones(4))), ValueError, r"weight must have shape \(3,\)"),
    ("bias_dtype", _args(bias=dev(torch.zeros(3, dtype=torch.int64))), TypeError, "bias must have dtype"),
    ("running_var_shape", _args(running_var=dev(torch.ones(3, 1))), ValueError, "running_var must have shape"),
    ("running_pair", _args(running_var=None), ValueError, "running_mean and running_var must both"),
    ("eval_no_stats", _args(running_mean=None, running_var=None, training=False), RuntimeError,
     "running_mean must be defined in evaluation mode"),
    ("momentum_none", _args(momentum=None), TypeError, "momentum=None"),
    ("momentum_type", _args(momentum="0.1"), TypeError, "momentum must be a float"),
    ("batch1_1x1", _args(shape=(1, 3, 1, 1)), ValueError, "Expected more than 1 value per channel"),
    ("activation", _args(activation="swish"), ValueError, "activation must be one of identity, relu"),
    ("negative_slope", _args(negative_slope="0.1"), TypeError, "negative_slope must be a float"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_naming_the_argument(case):
    _, kwargs, exc, text = case
    with pytest.raises(exc, match=text):
        if "activation" in kwargs or "negative_slope" in kwargs:
            fastattn.batch_norm_act(**kwargs)
        else:
            fastattn.batch_norm_add_relu(**kwargs)


def test_device_mix_is_rejected():
    with pytest.raises(RuntimeError, match="weight is on meta"):
        fastattn.batch_norm_add_relu(**_args(weight=torch.ones(3, device="meta")))


# -- visible fallback ----------------------------------------------------------------------------------------------

def test_cpu_without_interpreter_runs_eager_reference_visibly():
    cpu_only("the eager fallback of CPU tensors without Triton's interpreter")
    code = textwrap.dedent("""
        import os, warnings
        os.environ.pop("TRITON_INTERPRET", None)
        import torch, fastattn, torch.nn.functional as F
        x, i = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        rm, rv = torch.zeros(3), torch.ones(3)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = fastattn.batch_norm_add_relu(x, i, rm, rv, None, None, True)
        assert any(issubclass(x.category, fastattn.FallbackWarning) and "interpreter" in str(x.message) for x in w)
        rm2, rv2 = torch.zeros(3), torch.ones(3)
        torch.testing.assert_close(out, F.relu(F.batch_norm(x, rm2, rv2, training=True) + i))
        torch.testing.assert_close(rm, rm2)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr

