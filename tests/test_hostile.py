"""Hostile and odd input for every public function and module forward, table-driven against torch.

Each row gives fresh arguments, our call and torch's equivalent call on the same arguments, and one of:

- ``raises``: ours raises this exception with a message naming the argument (the regex); ``torch_raises`` pins down
  what torch does with the same input (True: torch raises too; False: torch returns, i.e. we are stricter, and
  bench/README.md's "Robustness" section says why);
- ``MATCH``: ours returns what torch returns (shape, dtype, values with NaN where torch has NaN) and, when the
  output can be differentiated, the same gradients (empty tensors included);
- ``EMPTY``: torch raises but ours returns the empty result the shapes imply (documented).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

import fastattn
from fastattn import reference

MATCH = "match"
EMPTY = "empty"


@dataclass(frozen=True)
class Case:
    op: str
    name: str
    args: Callable[[], tuple]
    ours: Callable[..., Any]
    torch: Callable[..., Any] | None
    expect: Any  # (exception type, regex) | MATCH | EMPTY
    torch_raises: bool | None = None
    no_grad: tuple[int, ...] = ()  # arguments that must not require grad (running statistics)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.name}"


def r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


def ints(*shape, dtype=torch.int64):
    return torch.ones(*shape, dtype=dtype)


NAN, INF = float("nan"), float("inf")
CASES: list[Case] = []


def case(op, name, args, ours, torch_fn, expect, torch_raises=None, no_grad=()):
    CASES.append(Case(op, name, args, ours, torch_fn, expect, torch_raises, no_grad))


# -- scaled_dot_product_attention / attention ------------------------------------------------------------------------

SDPA = "scaled_dot_product_attention"


def ours_sdpa(*a, **kw):
    return fastattn.scaled_dot_product_attention(*a, **kw)


def torch_sdpa(*a, **kw):
    return F.scaled_dot_product_attention(*a, **kw)


def qkv(q=(2, 3, 5, 8), k=(2, 3, 7, 8), v=None, dtype=torch.float32):
    return r(*q, dtype=dtype), r(*k, dtype=dtype), r(*(v or k), dtype=dtype)


def sdpa_case(name, args, expect, torch_raises=None, **kw):
    case(SDPA, name, args, lambda *a: ours_sdpa(*a, **kw), lambda *a: torch_sdpa(*a, **kw), expect, torch_raises)


sdpa_case("query_none", lambda: (None, r(1, 5, 8), r(1, 5, 8)), (TypeError, "query must be a Tensor"), True)
sdpa_case("rank_1", lambda: (r(8), r(5, 8), r(5, 8)), (ValueError, "query must have at least 2 dims"), True)
sdpa_case("head_dim_mismatch", lambda: qkv(k=(2, 3, 7, 6)), (ValueError, "query and key must have the same head dim"),
          True)
sdpa_case("kv_length_mismatch", lambda: qkv(v=(2, 3, 6, 8)), (ValueError, "key and value must have the same length"),
          False)  # torch's CPU kernel does not check
sdpa_case("batch_not_broadcast", lambda: qkv(k=(3, 3, 7, 8)), (ValueError, "query, key and value do not broadcast"),
          True)
sdpa_case("dtype_mix", lambda: (r(1, 5, 8), r(1, 7, 8).half(), r(1, 7, 8)), (TypeError, "one dtype"), True)
sdpa_case("int_inputs", lambda: (ints(1, 5, 8), ints(1, 7, 8), ints(1, 7, 8)), (TypeError, "query must be a floating"),
          True)
sdpa_case("complex_inputs", lambda: tuple(t.cfloat() for t in qkv()), (TypeError, "query must be a floating"), True)
sdpa_case("mask_int", lambda: (*qkv(), ints(5, 7)), (TypeError, "attn_mask must be bool"), True)
sdpa_case("mask_float64_for_fp32", lambda: (*qkv(), r(5, 7, dtype=torch.float64)),
          (TypeError, "attn_mask must be bool"), True)
sdpa_case("mask_not_broadcast", lambda: (*qkv(), r(4, 7)), (ValueError, "attn_mask of shape"), True)
sdpa_case("mask_rank_5", lambda: (*qkv(), torch.ones(1, 2, 3, 5, 7, dtype=torch.bool)),
          (ValueError, "attn_mask of shape"), True)
sdpa_case("mask_list", lambda: (*qkv(), [[0.0]]), (TypeError, "attn_mask must be a Tensor"), True)
sdpa_case("device_mix", lambda: (r(1, 5, 8), r(1, 7, 8, device="meta"), r(1, 7, 8)), (RuntimeError, "key is on meta"),
          True)
sdpa_case("dropout_negative", lambda: qkv(), (ValueError, "dropout_p must be a float in"), True, dropout_p=-0.1)
sdpa_case("dropout_one", lambda: qkv(), (ValueError, "dropout_p must be a float in"), False, dropout_p=1.0)
sdpa_case("dropout_nan", lambda: qkv(), (ValueError, "dropout_p must be a float in"), True, dropout_p=NAN)
sdpa_case("scale_nan", lambda: qkv(), (ValueError, "scale must be finite"), False, scale=NAN)
sdpa_case("scale_inf", lambda: qkv(), (ValueError, "scale must be finite"), False, scale=INF)
sdpa_case("scale_str", lambda: qkv(), (TypeError, "scale must be a float"), True, scale="0.5")
sdpa_case("is_causal_none", lambda: qkv(), (TypeError, "is_causal must be a bool"), True, is_causal=None)
sdpa_case("enable_gqa_int", lambda: qkv(), (TypeError, "enable_gqa must be a bool"), True, enable_gqa=1)
sdpa_case("gqa_heads_not_divisible", lambda: qkv(q=(2, 4, 5, 8), k=(2, 3, 7, 8)), (ValueError, "multiple of the key"),
          True, enable_gqa=True)
sdpa_case("gqa_without_heads_dim", lambda: qkv(q=(5, 8), k=(7, 8)), (ValueError, "enable_gqa=True needs a heads dim"),
          True, enable_gqa=True)
sdpa_case("causal_bias_lengths", lambda: (*qkv(q=(1, 3, 8), k=(1, 5, 8)), causal_lower_right(4, 5)),
          (ValueError, "CausalBias attn_mask is for lengths"), True)
sdpa_case("causal_bias_and_is_causal", lambda: (*qkv(q=(1, 3, 8), k=(1, 5, 8)), causal_lower_right(3, 5)),
          (ValueError, "not both"), True, is_causal=True)
case(SDPA, "int_mask_requires_grad", lambda: (), lambda: ints(5, 7).requires_grad_(),
     lambda: torch.ones(5, 7, dtype=torch.bool).requires_grad_(), (RuntimeError, "only Tensors of floating point"),
     True)
sdpa_case("batch_0", lambda: qkv(q=(0, 3, 5, 8), k=(0, 3, 7, 8)), MATCH)
sdpa_case("query_length_0", lambda: qkv(q=(2, 3, 0, 8)), MATCH)
sdpa_case("key_length_0", lambda: qkv(k=(2, 3, 0, 8)), MATCH)
sdpa_case("key_length_0_causal", lambda: qkv(k=(2, 3, 0, 8)), MATCH, is_causal=True)
sdpa_case("heads_0", lambda: qkv(q=(2, 0, 5, 8), k=(2, 0, 7, 8)), MATCH)
sdpa_case("value_dim_0", lambda: qkv(v=(2, 3, 7, 0)), MATCH)
sdpa_case("head_dim_0", lambda: qkv(q=(2, 3, 5, 0), k=(2, 3, 7, 0), v=(2, 3, 7, 4)), MATCH)
sdpa_case("head_dim_0_causal", lambda: qkv(q=(2, 3, 5, 0), k=(2, 3, 7, 0), v=(2, 3, 7, 4)), MATCH, is_causal=True)
sdpa_case("scale_negative", lambda: qkv(), MATCH, scale=-0.5)
sdpa_case("scale_zero", lambda: qkv(), MATCH, scale=0.0)
sdpa_case("scale_0dim_tensor", lambda: qkv(), MATCH, scale=torch.tensor(0.3))
sdpa_case("rows_fully_masked", lambda: (*qkv(), torch.rand(5, 7) > torch.arange(5.0)[:, None] / 4), MATCH)
sdpa_case("float_mask_all_-inf_row", lambda: (*qkv(), torch.zeros(5, 7).index_fill_(0, torch.tensor([1]), -INF)), MATCH)


def torch_sdpa_math(*a, **kw):
    with sdpa_kernel(SDPBackend.MATH):  # torch's reference semantics (its CPU kernel returns 0 for NaN rows)
        return F.scaled_dot_product_attention(*a, **kw)


case(SDPA, "nan_in_query", lambda: (r(1, 5, 8).index_fill_(1, torch.tensor([2]), NAN), r(1, 7, 8), r(1, 7, 8)),
     ours_sdpa, torch_sdpa_math, MATCH)
case(SDPA, "meta_tensors_fall_back", lambda: tuple(t.to("meta") for t in qkv()), ours_sdpa, torch_sdpa, MATCH)


def ours_lse(*a, **kw):
    return fastattn.attention(*a, return_lse=True, **kw)


def ref_lse(*a, **kw):
    return reference.scaled_dot_product_attention(*a, return_lse=True, **kw)


# attention(): the same checks; return_lse against the eager reference (torch has no lse output)
case("attention", "scale_nan", lambda: qkv(), lambda *a: ours_lse(*a, scale=NAN), lambda *a: ref_lse(*a, scale=NAN),
     (ValueError, "scale must be finite"), False)
case("attention", "dropout_one", lambda: qkv(), lambda *a: ours_lse(*a, dropout_p=1.0),
     lambda *a: torch_sdpa(*a, dropout_p=1.0), (ValueError, "dropout_p"), False)
case("attention", "lse_key_length_0", lambda: qkv(k=(2, 3, 0, 8)), ours_lse, ref_lse, MATCH)
case("attention", "lse_batch_0", lambda: qkv(q=(0, 3, 5, 8), k=(0, 3, 7, 8)), ours_lse, ref_lse, MATCH)
case("attention", "lse_rows_fully_masked", lambda: (*qkv(), torch.arange(7) < torch.arange(5)[:, None]), ours_lse,
     ref_lse, MATCH)


# -- add_layer_norm / add_rms_norm / layer_norm / rms_norm -------------------------------------------------------------

def ln_args(x=(3, 8), residual=True, dtype=torch.float32):
    n = x[-1] if x else 1
    return r(*x, dtype=dtype), (r(*x, dtype=dtype) if residual else None), r(n, dtype=dtype), r(n, dtype=dtype)


def torch_add_ln(x, res, w, b, eps=1e-5, dropout_p=0.0, residual_in_fp32=False):
    z = F.dropout(x, dropout_p) if dropout_p else x
    z = z + res if res is not None else z
    return F.layer_norm(z, z.shape[-1:], w, b, eps), z


def ours_add_ln(*a, **kw):
    return fastattn.add_layer_norm(*a, **kw)


def add_ln_case(name, args, expect, torch_raises=None, **kw):
    case("add_layer_norm", name, args, lambda *a: ours_add_ln(*a, **kw), lambda *a: torch_add_ln(*a, **kw), expect,
         torch_raises)


add_ln_case("x_none", lambda: (None, None, None, None), (TypeError, "x must be a Tensor"), True)
add_ln_case("x_int", lambda: (ints(3, 8), ints(3, 8), None, None), (TypeError, "x must be a floating-point"), True)
add_ln_case("x_complex", lambda: tuple(t.cfloat() for t in ln_args()), (TypeError, "x must be a floating-point"), True)
add_ln_case("x_0dim", lambda: (r(), r(), None, None), (ValueError, "x must have at least one dim"), True)
add_ln_case("residual_shape", lambda: (r(3, 8), r(4, 8), None, None), (ValueError, "residual must have x's shape"),
            True)
add_ln_case("residual_broadcast", lambda: (r(3, 8), r(8), None, None), (ValueError, "residual must have x's shape"),
            False)
add_ln_case("residual_int", lambda: (r(3, 8), ints(3, 8), None, None), (TypeError, "residual must have dtype"), False)
add_ln_case("residual_fp32_without_flag", lambda: (r(3, 8).half(), r(3, 8), None, None),
            (TypeError, "residual_in_fp32=True"), False)
add_ln_case("weight_shape", lambda: (r(3, 8), None, r(7), None), (ValueError, r"weight must have shape \(8,\)"), True)
add_ln_case("weight_int", lambda: (r(3, 8), None, ints(8), None), (TypeError, "weight must have x's dtype float32;"),
            True)
add_ln_case("weight_float64", lambda: (r(3, 8), None, r(8, dtype=torch.float64), None),
            (TypeError, "weight must have x's dtype"), True)
add_ln_case("bias_shape", lambda: (r(3, 8), None, None, r(8, 1)), (ValueError, "bias must have shape"), True)
add_ln_case("device_mix", lambda: (r(3, 8), r(3, 8, device="meta"), None, None), (RuntimeError, "residual is on meta"),
            True)
add_ln_case("eps_zero", lambda: ln_args(), (ValueError, "eps must be a positive finite float"), False, eps=0.0)
add_ln_case("eps_negative", lambda: ln_args(), (ValueError, "eps must be a positive finite float"), False, eps=-1e-5)
add_ln_case("eps_nan", lambda: ln_args(), (ValueError, "eps must be a positive finite float"), False, eps=NAN)
add_ln_case("eps_inf", lambda: ln_args(), (ValueError, "eps must be a positive finite float"), False, eps=INF)
add_ln_case("eps_str", lambda: ln_args(), (ValueError, "eps must be a positive finite float"), True, eps="1e-5")
add_ln_case("dropout_one", lambda: ln_args(), (ValueError, r"dropout_p must be a float in \[0, 1\)"), False,
            dropout_p=1.0)
add_ln_case("dropout_negative", lambda: ln_args(), (ValueError, "dropout_p must be a float in"), True, dropout_p=-0.1)
add_ln_case("dropout_nan", lambda: ln_args(), (ValueError, "dropout_p must be a float in"), True, dropout_p=NAN)
add_ln_case("residual_in_fp32_int", lambda: ln_args(), (TypeError, "residual_in_fp32 must be a bool"), False,
            residual_in_fp32=1)
add_ln_case("rows_0", lambda: ln_args(x=(0, 8)), MATCH)
add_ln_case("rows_0_3d", lambda: ln_args(x=(2, 0, 8)), MATCH)
add_ln_case("hidden_0", lambda: ln_args(x=(3, 0)), MATCH)
add_ln_case("x_1d", lambda: ln_args(x=(8,)), MATCH)
add_ln_case("nan_row", lambda: (r(3, 8).index_fill_(0, torch.tensor([1]), NAN), r(3, 8), r(8), r(8)), MATCH)
add_ln_case("inf_in_row", lambda: (r(3, 8).index_fill_(1, torch.tensor([2]), INF), r(3, 8), r(8), r(8)), MATCH)
add_ln_case("eps_huge", lambda: ln_args(), MATCH, eps=1e30)


def torch_add_rms(x, res, w, eps=1e-6):
    z = x + res if res is not None else x
    return F.rms_norm(z, z.shape[-1:], w, eps), z


def add_rms_case(name, args, expect, torch_raises=None, **kw):
    case("add_rms_norm", name, args, lambda *a: fastattn.add_rms_norm(*a, **kw), lambda *a: torch_add_rms(*a, **kw),
         expect, torch_raises)


add_rms_case("weight_shape", lambda: (r(3, 8), None, r(9)), (ValueError, "weight must have shape"), True)
add_rms_case("eps_negative", lambda: ln_args()[:3], (ValueError, "eps must be a positive"), False, eps=-1.0)
add_rms_case("x_int", lambda: (ints(3, 8), None, None), (TypeError, "x must be a floating-point"), True)
add_rms_case("rows_0", lambda: ln_args(x=(0, 8))[:3], MATCH)
add_rms_case("hidden_0", lambda: ln_args(x=(3, 0))[:3], MATCH)
add_rms_case("zero_row", lambda: (r(3, 8).index_fill_(0, torch.tensor([0]), 0.0), None, r(8)), MATCH)


def ln_case(name, args, expect, torch_raises=None, **kw):
    case("layer_norm", name, args, lambda *a: fastattn.layer_norm(*a, **kw), lambda *a: F.layer_norm(*a, **kw), expect,
         torch_raises)


ln_case("normalized_shape_empty", lambda: (r(3, 8), ()), (ValueError, "normalized_shape must have at least one dim"),
        True)
ln_case("normalized_shape_negative", lambda: (r(3, 8), (-1,)), (ValueError, "normalized_shape"), True)
ln_case("normalized_shape_mismatch", lambda: (r(3, 8), (4,)), (ValueError, "normalized_shape"), True)
ln_case("normalized_shape_float", lambda: (r(3, 8), 8.0), (TypeError, "normalized_shape must be an int"), True)
ln_case("normalized_shape_none", lambda: (r(3, 8), None), (TypeError, "normalized_shape must be an int"), True)
ln_case("normalized_shape_str", lambda: (r(3, 8), "8"), (TypeError, "normalized_shape must be an int"), True)
ln_case("weight_shape", lambda: (r(3, 8), (8,), r(4, 2)), (ValueError, "weight must have shape"), True)
ln_case("weight_meta", lambda: (r(3, 8), (8,), r(8, device="meta")), (RuntimeError, "weight is on meta"), True)
ln_case("input_0dim", lambda: (r(), ()), (ValueError, "x must have at least one dim"), True)
ln_case("rows_0", lambda: (r(0, 8), (8,)), MATCH)
ln_case("hidden_0", lambda: (r(3, 0), (0,), r(0), r(0)), MATCH)
ln_case("multi_dim_shape", lambda: (r(2, 3, 4), (3, 4), r(3, 4), r(3, 4)), MATCH)
ln_case("fp16_input_fp32_params", lambda: (r(3, 8).half(), (8,), r(8), r(8)), MATCH)
ln_case("eps_str", lambda: (r(3, 8), (8,)), (ValueError, "eps must be a positive"), True, eps="a")


def rms_case(name, args, expect, torch_raises=None, **kw):
    case("rms_norm", name, args, lambda *a: fastattn.rms_norm(*a, **kw), lambda *a: F.rms_norm(*a, **kw), expect,
         torch_raises)


rms_case("normalized_shape_empty", lambda: (r(3, 8), ()), (ValueError, "normalized_shape must have at least one dim"),
         True)
rms_case("eps_zero", lambda: (r(3, 8), (8,)), (ValueError, "eps must be a positive"), False, eps=0.0)
rms_case("eps_nan", lambda: (r(3, 8), (8,)), (ValueError, "eps must be a positive"), False, eps=NAN)
rms_case("eps_none_is_finfo_eps", lambda: (r(3, 8).half(), (8,), r(8).half()), MATCH)
rms_case("rows_0", lambda: (r(0, 8), (8,)), MATCH)
rms_case("hidden_0", lambda: (r(3, 0), (0,)), MATCH)


# -- patch_embed -------------------------------------------------------------------------------------------------------

def pe(B=2, C=3, H=16, W=16, P=8, D=8, pos=False, cls=False, **over):
    """(images, weight, bias, pos_embed, cls_token); ``over`` replaces any of them by name."""
    N = (H // P) * (W // P)
    a = {"images": r(B, C, H, W), "weight": r(D, C, P, P), "bias": r(D),
         "pos_embed": r(1, N + int(cls), D) if pos else None, "cls_token": r(1, 1, D) if cls else None}
    a.update(over)
    return tuple(a.values())


def pe_case(name, args, expect, torch_raises=None):
    case("patch_embed", name, args, fastattn.patch_embed, reference.patch_embed, expect, torch_raises)


pe_case("images_none", lambda: pe(images=None), (TypeError, "images must be a Tensor"), True)
pe_case("images_3d", lambda: pe(images=r(3, 16, 16)), (ValueError, "images must be 4-D"), False)
pe_case("images_5d", lambda: pe(images=r(1, 2, 3, 16, 16)), (ValueError, "images must be 4-D"), True)
pe_case("images_int", lambda: (ints(2, 3, 16, 16), ints(8, 3, 8, 8), None, None, None),
        (TypeError, "images must have dtype"), False)
pe_case("weight_3d", lambda: pe(weight=r(8, 3, 64)), (ValueError, "weight must be a Conv2d weight"), True)
pe_case("weight_not_square", lambda: pe(weight=r(8, 3, 8, 4)), (ValueError, "square"), False)
pe_case("channels_mismatch", lambda: pe(images=r(2, 4, 16, 16)), (ValueError, "images have 4 channels"), True)
pe_case("channels_0", lambda: pe(images=r(2, 0, 16, 16), weight=r(8, 0, 8, 8)), (ValueError, "images have 0 channels"),
        False)
pe_case("patch_0", lambda: pe(weight=r(8, 3, 0, 0)), (ValueError, "patch size 0"), True)
pe_case("height_below_patch", lambda: pe(images=r(2, 3, 4, 16)), (ValueError, "image height 4 is smaller"), True)
pe_case("height_0", lambda: pe(images=r(2, 3, 0, 16)), (ValueError, "image height 0 is smaller"), True)
pe_case("width_not_multiple", lambda: pe(images=r(2, 3, 16, 20)), (ValueError, "image width 20 is not a multiple"),
        False)
pe_case("bias_shape", lambda: pe(bias=r(1, 8)), (ValueError, "bias must have shape"), True)
pe_case("bias_int", lambda: pe(bias=ints(8)), (TypeError, "images, weight and bias must have one dtype"), True)
pe_case("weight_half", lambda: pe(weight=r(8, 3, 8, 8).half()), (TypeError, "one dtype"), True)
pe_case("pos_rows", lambda: pe(pos=True, pos_embed=r(1, 3, 8)), (ValueError, "pos_embed must have shape"), True)
pe_case("pos_4d", lambda: pe(pos=True, cls=True, pos_embed=r(1, 1, 5, 8)), (ValueError, "pos_embed must have shape"),
        False)
pe_case("pos_float64", lambda: pe(pos=True, pos_embed=r(1, 4, 8, dtype=torch.float64)),
        (TypeError, "pos_embed must have the images' dtype"), False)
pe_case("cls_2d", lambda: pe(cls=True, cls_token=r(1, 8)), (ValueError, "cls_token must have shape"), False)
pe_case("weight_meta", lambda: pe(weight=r(8, 3, 8, 8, device="meta")), (RuntimeError, "weight is on meta"), False)
pe_case("batch_0", lambda: pe(B=0, pos=True, cls=True), MATCH)
pe_case("nan_pixel", lambda: pe(images=r(2, 3, 16, 16).index_fill_(2, torch.tensor([3]), NAN)), MATCH)
pe_case("features_0", lambda: pe(D=0, pos=True, cls=True), EMPTY, True)


# -- batch_norm_add_relu -----------------------------------------------------------------------------------------------

def bn(shape=(2, 3, 4, 4), with_identity=False, running=True, **over):
    """(x, identity, running_mean, running_var, weight, bias); ``over`` replaces any of them by name."""
    C = shape[1] if len(shape) > 1 else 1
    a = {"x": r(*shape), "identity": r(*shape) if with_identity else None,
         "running_mean": torch.zeros(C) if running else None, "running_var": torch.ones(C) if running else None,
         "weight": r(C), "bias": r(C)}
    a.update(over)
    return tuple(a.values())


def torch_bn(x, identity, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    return F.relu(y + identity if identity is not None else y), rm, rv


def ours_bn(x, identity, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5):
    return fastattn.batch_norm_add_relu(x, identity, rm, rv, w, b, training, momentum, eps), rm, rv


def bn_case(name, args, expect, torch_raises=None, **kw):
    case("batch_norm_add_relu", name, args, lambda *a: ours_bn(*a, **kw), lambda *a: torch_bn(*a, **kw), expect,
         torch_raises, no_grad=(2, 3))


bn_case("x_none", lambda: bn(x=None), (TypeError, "x must be a Tensor"), True)
bn_case("x_3d", lambda: bn(shape=(2, 3, 4)), (ValueError, "x must be 4-D"), False)
bn_case("x_int", lambda: bn(x=ints(2, 3, 4, 4)), (TypeError, "x must have dtype"), True)
bn_case("identity_shape", lambda: bn(identity=r(2, 3, 4, 5)), (ValueError, "identity must have x's shape"), True)
bn_case("identity_broadcast", lambda: bn(identity=r(3, 1, 1)), (ValueError, "identity must have x's shape"), False)
bn_case("identity_dtype", lambda: bn(identity=r(2, 3, 4, 4).half()), (TypeError, "identity must have x's dtype"), False)
bn_case("weight_shape", lambda: bn(weight=r(4)), (ValueError, r"weight must have shape \(3,\)"), True)
bn_case("bias_int", lambda: bn(bias=ints(3)), (TypeError, "bias must have dtype"), True)
bn_case("running_var_shape", lambda: bn(running_var=torch.ones(3, 1)), (ValueError, "running_var must have shape"),
        True)
bn_case("running_mean_only", lambda: bn(running_var=None), (ValueError, "running_mean and running_var must both"),
        True)
bn_case("eval_without_running", lambda: bn(running=False), (RuntimeError, "running_mean must be defined"), True,
        training=False)
bn_case("momentum_none_no_count", lambda: bn(), (TypeError, "num_batches_tracked"), True, momentum=None)
bn_case("momentum_str", lambda: bn(), (TypeError, "momentum must be a float"), True, momentum="0.1")
bn_case("eps_zero_training", lambda: bn(), (ValueError, "eps must be positive during training"), True, eps=0.0)
bn_case("eps_negative_eval", lambda: bn(), (ValueError, "eps must be non-negative"), True, eps=-1e-5, training=False)
bn_case("eps_str", lambda: bn(), (TypeError, "eps must be a float"), True, eps="1e-5")
bn_case("training_none", lambda: bn(), (TypeError, "training must be a bool"), True, training=None)
bn_case("batch_1_spatial_1x1", lambda: bn(shape=(1, 3, 1, 1)), (ValueError, "Expected more than 1 value per channel"),
        True)
bn_case("device_mix", lambda: bn(weight=r(3, device="meta")), (RuntimeError, "weight is on meta"), True)
bn_case("batch_0_training", lambda: bn(shape=(0, 3, 4, 4)), MATCH)
bn_case("batch_0_eval", lambda: bn(shape=(0, 3, 4, 4)), MATCH, training=False)
bn_case("height_0_training", lambda: bn(shape=(2, 3, 0, 4), with_identity=True), MATCH)
bn_case("channels_0_eval", lambda: bn(shape=(2, 0, 4, 4)), EMPTY, True, training=False)  # torch: IndexError
bn_case("channels_0_training", lambda: bn(shape=(2, 0, 4, 4)), EMPTY, True)
bn_case("momentum_nan", lambda: bn(), MATCH, momentum=NAN)
bn_case("momentum_negative", lambda: bn(), MATCH, momentum=-0.5)
bn_case("eps_nan", lambda: bn(), MATCH, eps=NAN)
bn_case("eps_zero_eval", lambda: bn(), MATCH, eps=0.0, training=False)
bn_case("running_var_negative_eval", lambda: bn(running_var=-torch.ones(3)), MATCH, training=False)
bn_case("nan_in_x", lambda: bn(x=r(2, 3, 4, 4).index_fill_(1, torch.tensor([1]), NAN)), MATCH)


# -- nn modules --------------------------------------------------------------------------------------------------------

def module_case(name, make, x_args, expect, torch_raises=None):
    """``make(fused)`` builds the module (ours for True, torch's for False) with equal state; both get x_args()."""
    case(f"nn.{name.split(':')[0]}", name.split(":")[1], x_args, lambda *a: _module(make, True)(*a),
         lambda *a: _module(make, False)(*a), expect, torch_raises)


def _module(make, fused):
    torch.manual_seed(3)  # equal parameters in both
    return make(fused)


class _BlockTail(torch.nn.BatchNorm2d):
    def forward(self, x, identity=None):
        y = super().forward(x)
        return F.relu(y if identity is None else y + identity)


def ln_module(fused, n=8, **kw):
    m = (fastattn.nn.LayerNorm if fused else torch.nn.LayerNorm)(n, **kw)
    torch.nn.init.normal_(m.weight)
    return m


def rms_module(fused, n=8, **kw):
    m = (fastattn.nn.RMSNorm if fused else torch.nn.RMSNorm)(n, **kw)
    torch.nn.init.normal_(m.weight)
    return m


def pe_module(fused):
    if fused:
        return fastattn.nn.PatchEmbed(3, 8, 8)
    conv = torch.nn.Conv2d(3, 8, 8, 8)
    return lambda x: conv(x).flatten(2).transpose(1, 2) if x.dim() == 4 else conv(x)


def bn_module(fused, eval_mode=False):
    m = (fastattn.nn.BatchNormAddReLU if fused else _BlockTail)(3)
    return m.eval() if eval_mode else m


module_case("LayerNorm:wrong_trailing_dim", ln_module, lambda: (r(3, 7),), (ValueError, "normalized_shape"), True)
module_case("LayerNorm:normalized_shape_empty", lambda f: ln_module(f, n=()), lambda: (r(3, 7),),
            (ValueError, "normalized_shape must have at least one dim"), True)
module_case("LayerNorm:rows_0", ln_module, lambda: (r(0, 8),), MATCH)
module_case("LayerNorm:hidden_0", lambda f: ln_module(f, n=0), lambda: (r(3, 0),), MATCH)
module_case("LayerNorm:x_1d", ln_module, lambda: (r(8),), MATCH)
module_case("LayerNorm:fp16_input_fp32_params", ln_module, lambda: (r(3, 8).half(),), MATCH)
module_case("LayerNorm:eps_zero", lambda f: ln_module(f, eps=0.0), lambda: (r(3, 8),), (ValueError, "eps"), False)
module_case("RMSNorm:wrong_trailing_dim", rms_module, lambda: (r(3, 7),), (ValueError, "normalized_shape"), True)
module_case("RMSNorm:eps_none", rms_module, lambda: (r(3, 8).half(),), MATCH)
module_case("RMSNorm:hidden_0", lambda f: rms_module(f, n=0), lambda: (r(3, 0),), MATCH)
module_case("PatchEmbed:channels_mismatch", pe_module, lambda: (r(2, 4, 16, 16),),
            (ValueError, "images have 4 channels"), True)
module_case("PatchEmbed:unbatched_3d", pe_module, lambda: (r(3, 16, 16),), (ValueError, "images must be 4-D"), False)
module_case("PatchEmbed:height_not_multiple", pe_module, lambda: (r(2, 3, 12, 16),), (ValueError, "not a multiple"),
            False)
module_case("PatchEmbed:fp16_images_fp32_params", pe_module, lambda: (r(2, 3, 16, 16).half(),),
            (TypeError, "one dtype"), True)
module_case("PatchEmbed:batch_0", pe_module, lambda: (r(0, 3, 16, 16),), MATCH)
module_case("BatchNormAddReLU:x_3d", bn_module, lambda: (r(2, 3, 4),), (ValueError, "expected 4D input"), True)
module_case("BatchNormAddReLU:channels_mismatch", bn_module, lambda: (r(2, 4, 4, 4),),
            (ValueError, "running_mean must have"), True)
module_case("BatchNormAddReLU:identity_shape", bn_module, lambda: (r(2, 3, 4, 4), r(2, 3, 4, 5)),
            (ValueError, "identity must have x's shape"), True)
module_case("BatchNormAddReLU:batch_0", bn_module, lambda: (r(0, 3, 4, 4),), MATCH)
module_case("BatchNormAddReLU:eval_batch_1_1x1", lambda f: bn_module(f, eval_mode=True), lambda: (r(1, 3, 1, 1),),
            MATCH)
module_case("BatchNormAddReLU:fp16_input_fp32_params", bn_module, lambda: (r(2, 3, 4, 4).half(),), MATCH)


# -- the checks --------------------------------------------------------------------------------------------------------

def _leaves(args, no_grad=()):
    """Fresh copies of the arguments, floating-point tensors requiring grad (meta tensors, ``no_grad`` positions and
    non-tensors as they are)."""
    out = []
    for i, a in enumerate(args):
        if type(a) is torch.Tensor:  # not CausalBias, a Tensor subclass that .clone() would strip
            a = a.detach().clone()
            if a.is_floating_point() and a.device.type != "meta" and i not in no_grad:
                a.requires_grad_()
        out.append(a)
    return out


def _tensors(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for t in result if isinstance(t, torch.Tensor)]
    raise AssertionError(f"unexpected result {type(result).__name__}")


def _run(fn, args, no_grad=()):
    """fn on fresh leaves; backward of the sum of its differentiable outputs; (outputs, leaves)."""
    leaves = _leaves(args, no_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FallbackWarning (meta), torch's CausalBias warnings
        outs = _tensors(fn(*leaves))
        diff = [o for o in outs if o.requires_grad]
        if diff:
            torch.autograd.backward([o.float().nansum() for o in diff])
    return outs, leaves


def _same(a, b, what, half):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != torch's {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != torch's {b.dtype}"
    if a.device.type == "meta" or a.numel() == 0:
        return
    torch.testing.assert_close(a, b, atol=1e-2 if half else 1e-5, rtol=1e-2 if half else 1e-4, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _torch_raised(c: Case) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c.torch(*_leaves(c.args(), c.no_grad))
    except Exception:  # noqa: BLE001  (any exception: torch refuses the input)
        return True
    return False


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile_input(c: Case):
    if isinstance(c.expect, tuple):
        exc, text = c.expect
        with pytest.raises(exc, match=text):
            _run(c.ours, c.args(), c.no_grad)
        assert _torch_raised(c) is c.torch_raises, f"torch {'does not raise' if c.torch_raises else 'raises'} here"
    elif c.expect == EMPTY:
        assert _torch_raised(c), "torch returns here: this case should be MATCH"
        outs, leaves = _run(c.ours, c.args(), c.no_grad)
        assert outs and all(o.numel() == 0 for o in outs[:1]), "ours should return an empty result"
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                assert leaf.grad is None or (leaf.grad.shape == leaf.shape and not leaf.grad.any())
    else:
        args = c.args()  # one set of values for both (_run copies them)
        # fp16 inputs: two implementations' results (fp32 parameter gradients included) a few fp16 roundings apart
        half = any(isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) for a in args)
        outs, leaves = _run(c.ours, args, c.no_grad)
        t_outs, t_leaves = _run(c.torch, args, c.no_grad)
        assert len(outs) == len(t_outs), f"{len(outs)} outputs, torch {len(t_outs)}"
        for i, (a, b) in enumerate(zip(outs, t_outs)):
            _same(a.detach(), b.detach(), f"output {i}", half)
        for i, (a, b) in enumerate(zip(leaves, t_leaves)):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                ga = a.grad if a.grad is not None else torch.zeros_like(a)
                gb = b.grad if b.grad is not None else torch.zeros_like(b)
                _same(ga, gb, f"gradient of argument {i}", half)


def test_case_counts():
    """The table in bench/README.md ("Robustness") is generated from these numbers; keep them in sync."""
    raises = [c for c in CASES if isinstance(c.expect, tuple)]
    assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"
    assert all(c.torch_raises is not None for c in raises)
    assert len(CASES) >= 100
