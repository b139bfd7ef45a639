"""``torch.autograd.gradcheck`` in float64 through the Triton kernels themselves (float64 runs the kernels in the
interpreter), for every op, every differentiable input and the main feature flags.

Each case asserts with ``fastattn.record_launches()`` that the forward and backward kernels, not the eager
fallback, ran. ``fast_mode=True`` checks one random direction per output (a vector-Jacobian product against the
finite difference along a random input direction), which covers every input at once. Cases already in the per-op
files (attention with dropout + float-mask gradient + causal; add_layer_norm / add_rms_norm with dropout, residual,
weight and bias on the tile and looped paths; patch_embed with all five inputs; batch_norm train and eval with
identity, weight and bias) are not repeated here.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

import fastattn
from fastattn import _runtime
from fastattn.ops import attention as attn_ops
from fastattn.ops import batch_norm as bn_ops
from fastattn.ops import layer_norm as ln_ops
from fastattn.ops import patch_embed as pe_ops

pytestmark = pytest.mark.skipif(not _runtime.interpreting(),
                                reason="float64 runs the Triton kernels only under the interpreter")

ATTN = attn_ops.FORWARD_KERNELS + attn_ops.BACKWARD_KERNELS
LN = ln_ops.FORWARD_KERNELS + ln_ops.BACKWARD_KERNELS[:1]
PE = pe_ops.FORWARD_KERNELS + pe_ops.BACKWARD_KERNELS[:1]
BN_TRAIN = bn_ops.FORWARD_KERNELS + bn_ops.BACKWARD_KERNELS[:1]
BN_EVAL = bn_ops.FORWARD_KERNELS[-1:] + bn_ops.BACKWARD_KERNELS[:1]
BN_TRAIN_ALL = bn_ops.FORWARD_KERNELS + bn_ops.BACKWARD_KERNELS  # with dx: the combine and the dx pass too


def t64(*shape, requires_grad=True, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_(requires_grad)


def _seeded(fn, seed=11):
    def f(*args):
        torch.manual_seed(seed)  # the same dropout mask on every evaluation
        return fn(*args)
    return f


# Each case: () -> (function, inputs, kernels that must run). Inputs that require grad are checked.

def _attn_plain():
    return (lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v),
            (t64(2, 2, 5, 8), t64(2, 2, 7, 8), t64(2, 2, 7, 6)), ATTN)


def _attn_lower_right_empty_rows():
    # Lq > Lk, bottom-right causal: the first two query rows see no key (zero output and gradient)
    return (lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 3)),
            (t64(1, 2, 5, 8), t64(1, 2, 3, 8), t64(1, 2, 3, 8)), ATTN)


def _attn_bool_mask_causal():
    keep = torch.rand(5, 7) > 0.4
    keep[:, 0] = True  # every causal row keeps a key, so the finite differences stay finite
    keep[2] = False  # ... but one row is fully masked out
    return (lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=True),
            (t64(2, 1, 5, 8), t64(2, 1, 7, 8), t64(2, 1, 7, 8)), ATTN)


def _attn_float_mask_grad_broadcast_scale():
    return (lambda q, k, v, m: fastattn.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3),
            (t64(2, 3, 5, 8), t64(2, 3, 7, 8), t64(2, 3, 7, 8), t64(2, 1, 5, 7)), ATTN)


def _attn_gqa_causal_dropout():
    return (_seeded(lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True,
                                                                          enable_gqa=True)),
            (t64(1, 4, 6, 8), t64(1, 2, 7, 8), t64(1, 2, 7, 8)), ATTN)


def _attn_lse():
    def f(q, k, v):
        return fastattn.attention(q, k, v, is_causal=True, return_lse=True)
    return f, (t64(1, 2, 6, 8), t64(1, 2, 6, 8), t64(1, 2, 6, 8)), ATTN


def _attn_views_rank3_broadcast():
    q = t64(7, 2, 5, requires_grad=False).transpose(0, 1).detach().requires_grad_()  # (2, 7, 5): strided
    return (lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v),
            (q, t64(1, 6, 5), t64(1, 6, 4)), ATTN)  # key/value batch 1 broadcast to 2


def _ln_multi_dim_shape():
    return (lambda x, w, b: fastattn.layer_norm(x, (3, 4), w, b, 1e-3),
            (t64(2, 3, 4), t64(3, 4), t64(3, 4)), LN + ("_layer_norm_bwd_reduce",))


def _rms_functional():
    return (lambda x, w: fastattn.rms_norm(x, (9,), w), (t64(4, 9), t64(9)), LN + ("_layer_norm_bwd_reduce",))


def _ln_no_params_post_norm():
    return (lambda x, r: fastattn.add_layer_norm(x, r, return_residual=False), (t64(5, 11), t64(5, 11)), LN)


def _ln_weight_only_both_outputs():
    return (lambda x, r, w: fastattn.add_layer_norm(x, r, w), (t64(3, 2, 13), t64(3, 2, 13), t64(13)),
            LN + ("_layer_norm_bwd_reduce",))


def _rms_residual_no_weight_views():
    x = t64(6, 4, requires_grad=False).t().detach().requires_grad_()  # (4, 6), the normalised dim strided
    r = t64(5, 6, requires_grad=False)[1:].detach().requires_grad_()  # a row slice
    return (lambda x, r: fastattn.add_rms_norm(x, r), (x, r), LN)


def _pe_channels_last_no_embed_class():
    images = t64(2, 3, 8, 12, requires_grad=False).to(memory_format=torch.channels_last).requires_grad_()
    return (lambda im, w, b, pos, cls: fastattn.patch_embed(im, w, b, pos, cls),
            (images, t64(5, 3, 4, 4, scale=0.3), t64(5), t64(1, 6, 5), t64(1, 1, 5)),  # pos: N = 6 rows, no cls row
            PE + ("_pe_bwd_dx", "_pe_bwd_dpos"))


def _pe_odd_patch_no_bias_pos_2d():
    return (lambda im, w, pos: fastattn.patch_embed(im, w, None, pos),
            (t64(1, 1, 9, 6), t64(4, 1, 3, 3, scale=0.3), t64(6, 4)), PE + ("_pe_bwd_dx", "_pe_bwd_dpos"))


def _pe_transposed_images_weight_only():
    images = t64(2, 2, 8, 4, requires_grad=False).transpose(2, 3).detach()  # frozen images: no dx kernel
    return (lambda w, b: fastattn.patch_embed(images, w, b), (t64(3, 2, 4, 4, scale=0.3), t64(3)), PE)


def _pe_split_dweight_in_dimages():
    # 32 tokens, 4 features: two token ranges whose float64 partials of dweight and dbias sit in dimages' buffer
    return (lambda im, w, b: fastattn.patch_embed(im, w, b), (t64(2, 1, 16, 16), t64(4, 1, 4, 4, scale=0.3), t64(4)),
            PE + ("_pe_bwd_reduce", "_pe_bwd_dx"))


def _bn_channels_last_no_affine():
    x = t64(3, 4, 3, 2, requires_grad=False).to(memory_format=torch.channels_last).requires_grad_()
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    return (lambda x, i: fastattn.batch_norm_add_relu(x, i, rm.clone(), rv.clone(), None, None, True),
            (x, t64(3, 4, 3, 2)), BN_TRAIN_ALL)


def _bn_no_identity_no_running_cumulative():
    def f(x, w, b):
        return fastattn.batch_norm_add_relu(x, None, None, None, w, b, True, None)
    return f, (t64(2, 3, 4, 3), t64(3), t64(3)), BN_TRAIN_ALL


def _bn_momentum_none_running():
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def f(x, w):
        return fastattn.batch_norm_add_relu(x, None, rm.clone(), rv.clone(), w, None, True, None,
                                            num_batches_tracked=torch.tensor(4))
    return f, (t64(4, 3, 2, 2), t64(3)), BN_TRAIN_ALL


def _bn_eval_channels_last_weight_only():
    x = t64(2, 5, 2, 3, requires_grad=False).to(memory_format=torch.channels_last).requires_grad_()
    rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    return (lambda x, i, w: fastattn.batch_norm_add_relu(x, i, rm, rv, w, None, False),
            (x, t64(2, 5, 2, 3), t64(5)), BN_EVAL + ("_bn_bwd_combine",))


CASES = {
    "attention-plain-dv6": _attn_plain,
    "attention-lower-right-empty-rows": _attn_lower_right_empty_rows,
    "attention-bool-mask-causal": _attn_bool_mask_causal,
    "attention-float-mask-grad-broadcast-scale": _attn_float_mask_grad_broadcast_scale,
    "attention-gqa-causal-dropout": _attn_gqa_causal_dropout,
    "attention-lse": _attn_lse,
    "attention-views-rank3-broadcast": _attn_views_rank3_broadcast,
    "layer_norm-multi-dim-shape": _ln_multi_dim_shape,
    "rms_norm-functional": _rms_functional,
    "add_layer_norm-no-params-post-norm": _ln_no_params_post_norm,
    "add_layer_norm-weight-only": _ln_weight_only_both_outputs,
    "add_rms_norm-residual-views": _rms_residual_no_weight_views,
    "patch_embed-channels-last-no-embed-class": _pe_channels_last_no_embed_class,
    "patch_embed-odd-patch-no-bias": _pe_odd_patch_no_bias_pos_2d,
    "patch_embed-transposed-frozen-images": _pe_transposed_images_weight_only,
    "patch_embed-split-dweight-in-dimages": _pe_split_dweight_in_dimages,
    "batch_norm-channels-last-no-affine": _bn_channels_last_no_affine,
    "batch_norm-no-identity-no-running": _bn_no_identity_no_running_cumulative,
    "batch_norm-momentum-none": _bn_momentum_none_running,
    "batch_norm-eval-channels-last": _bn_eval_channels_last_weight_only,
}


@pytest.fixture
def no_slow_mode_rerun(monkeypatch):
    """A failing fast-mode gradcheck recomputes the full numerical Jacobian for its message: 2 x numel forward
    passes, many minutes in the interpreter. The fast-mode message (the two directional derivatives) is enough."""
    module = sys.modules["torch.autograd.gradcheck"]
    monkeypatch.setattr(module, "_run_slow_mode_and_get_error",
                        lambda *args, **kwargs: "\n(slow-mode Jacobians not computed: tests/test_gradcheck.py)",
                        raising=False)


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_float64_through_the_kernels(case, no_slow_mode_rerun):
    fn, inputs, kernels = CASES[case]()
    with _runtime.record_launches() as launches:
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    for name in kernels:
        assert launches[name] > 0, f"Triton kernel {name} did not run: {dict(launches)}"
