"""The rule of fastattn.testing can fail: results with a small, real defect are rejected, in fp32 (where the floors
are largest against eager's error) and in half precision, for every op's outputs and gradients.

Each "defective kernel" is the eager reference with one thing wrong -- a scale off by 0.1% (2% in fp16), one key
dropped, eps ten times too large, a bias missing from one channel, the position embedding shifted -- run in the low
precision like a fused result would be. The rule with each op's floor must reject it, and accept eager itself (which
is within twice its own error).
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import eager_sdpa

from fastattn import reference
from fastattn.testing import (
    assert_close_to_reference,
    attention_floors,
    batch_norm_floors,
    norm_floors,
    patch_embed_floors,
)


def _lowp(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).double()


def _grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out] + [t.grad for t in leaves]


def _rejects(name, ours, eager, ref, dtype, floor):
    with pytest.raises(AssertionError, match=name):
        assert_close_to_reference(ours, eager, ref, dtype, name=name, floor=floor)


DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("defect", ["scale", "dropped_key"])
def test_attention_defects_are_rejected(dtype, defect):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_lowp(2, 3, 29, 32, dtype=dtype, gen=gen) for _ in range(3))
    do = _lowp(2, 3, 29, 32, dtype=torch.float64, gen=gen)
    keep = torch.ones(29, 29, dtype=torch.bool)
    if defect == "dropped_key":
        keep[:, 7] = False

    def good(q, k, v):
        return eager_sdpa(q, k, v)

    off = 1e-3 if dtype == torch.float32 else 2e-2  # 0.1% in fp32, 2% in fp16 (its resolution is 0.05%)

    def bad(q, k, v):
        scale = (1.0 + off) / math.sqrt(32) if defect == "scale" else None
        return eager_sdpa(q, k, v, attn_mask=keep, scale=scale)

    inputs = (q, k, v)
    ref = _grads(good, inputs, do)
    eager = _grads(good, [t.to(dtype) for t in inputs], do)
    wrong = _grads(bad, [t.to(dtype) for t in inputs], do)
    floors = attention_floors(q, k, v, do, dtype=dtype, out=wrong[0])
    for name, e, w, r in zip(("out", "dq", "dk", "dv"), eager, wrong, ref):
        assert_close_to_reference(e, e, r, dtype, name=name, floor=floors[name])  # eager itself passes
        _rejects(name, w, e, r, dtype, floors[name])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_norm_eps_defect_is_rejected(dtype, rms):
    """eps 1e-4 instead of 1e-5 (rows of variance ~1: a 5e-5 relative change of rstd)."""
    gen = torch.Generator().manual_seed(1)
    n = 768
    x, r = _lowp(4, n, dtype=dtype, gen=gen), _lowp(4, n, dtype=dtype, gen=gen)
    w, b = _lowp(n, dtype=dtype, gen=gen), _lowp(n, dtype=dtype, gen=gen)
    dy = _lowp(4, n, dtype=torch.float64, gen=gen)
    eps = 1e-5

    def norm(e):
        if rms:
            return lambda x, r, w, b: reference.add_rms_norm(x, r, w, e)[0]
        return lambda x, r, w, b: reference.add_layer_norm(x, r, w, b, e)[0]

    inputs = (x, r, w, b)
    ref = _grads(norm(eps), inputs, dy)
    eager = _grads(norm(eps), [t.to(dtype) for t in inputs], dy)
    wrong = _grads(norm(10 * eps), [t.to(dtype) for t in inputs], dy)
    floors = norm_floors(x, r, w, None if rms else b, dy, dtype=dtype, eps=eps, rms=rms)
    names = ("out", "dx", "dresidual", "dweight")
    for name, e, wr, rf in zip(names, eager[:4], wrong[:4], ref[:4]):
        assert_close_to_reference(e, e, rf, dtype, name=name, floor=floors[name])
        if dtype == torch.float32:  # in fp16 a 5e-5 change is below the format's resolution (u = 4.9e-4)
            _rejects(name, wr, e, rf, dtype, floors[name])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_bias_defect_is_rejected(dtype):
    """The bias of one channel missing (a kernel reading the wrong channel's parameters)."""
    gen = torch.Generator().manual_seed(2)
    x = _lowp(4, 6, 5, 5, dtype=dtype, gen=gen, scale=2.0)
    w = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    b = _lowp(6, dtype=torch.float32, gen=gen)
    b_wrong = b.clone()
    b_wrong[3] = 0.0
    dy = _lowp(4, 6, 5, 5, dtype=torch.float64, gen=gen)

    def bn(bias):
        return lambda x: reference.batch_norm_add_relu(x, None, None, None, w.to(x.dtype), bias.to(x.dtype), True)

    ref = _grads(bn(b), [x], dy)
    eager = _grads(bn(b), [x.to(dtype)], dy)
    wrong = _grads(bn(b_wrong), [x.to(dtype)], dy)
    floors = batch_norm_floors(x, None, None, None, w, b, dy, dtype=dtype, training=True)
    for name, e, wr, rf in zip(("out", "dx"), eager, wrong, ref):
        assert_close_to_reference(e, e, rf, dtype, name=name, floor=floors[name])
        _rejects(name, wr, e, rf, dtype, floors[name])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_patch_embed_position_defect_is_rejected(dtype):
    """The position embedding shifted by one token (a kernel adding row n + 1 to token n)."""
    gen = torch.Generator().manual_seed(3)
    images = _lowp(2, 3, 16, 16, dtype=dtype, gen=gen)
    weight = _lowp(24, 3, 8, 8, dtype=dtype, gen=gen, scale=(3 * 64) ** -0.5)
    pos = _lowp(1, 4, 24, dtype=dtype, gen=gen, scale=0.5)
    grad = _lowp(2, 4, 24, dtype=torch.float64, gen=gen)

    def embed(shift):
        return lambda im, wt: reference.patch_embed(im, wt, None, pos.roll(shift, 1).to(im.dtype))

    ref = _grads(embed(0), [images, weight], grad)
    eager = _grads(embed(0), [images.to(dtype), weight.to(dtype)], grad)
    wrong = _grads(embed(1), [images.to(dtype), weight.to(dtype)], grad)
    floors = patch_embed_floors(images, weight, None, pos, None, grad, dtype=dtype)
    assert_close_to_reference(eager[0], eager[0], ref[0], dtype, name="out", floor=floors["out"])
    _rejects("out", wrong[0], eager[0], ref[0], dtype, floors["out"])
