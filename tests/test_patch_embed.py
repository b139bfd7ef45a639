"""fastattn.patch_embed against eager conv2d + flatten + cat + add: the output and every gradient (2x-eager rule,
fastattn.testing), layouts, the class-token / position-embedding variants, the module, compile and bad input.

Each case runs three times: the eager reference (fastattn.reference.patch_embed, i.e. torch's conv2d) in float64,
the same eager code in the low precision (eager's error), and ours in the low precision, with a check that the
Triton kernels, not the eager fallback, ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from harness import cpu_only, dev, spy_launches, three_way

import fastattn
from fastattn import _runtime, reference
from fastattn.ops import _common as common
from fastattn.ops import patch_embed as pe_ops
from fastattn.testing import patch_embed_floors

NAMES = ("out", "dimages", "dweight", "dbias", "dpos_embed", "dcls_token")


def randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


def make_inputs(B, C, H, W, P, D, *, bias=True, pos="cls", cls=True):
    """Float64 masters on the CPU. pos: None, "cls" (N + 1 rows with a class token, N without) or "patches" (N rows)."""
    N = (H // P) * (W // P)
    rows = N + 1 if (pos == "cls" and cls) else N
    return {
        "images": randn(B, C, H, W),
        "weight": randn(D, C, P, P, scale=(C * P * P) ** -0.5),
        "bias": randn(D) if bias else None,
        "pos_embed": randn(1, rows, D, scale=0.5) if pos is not None else None,
        "cls_token": randn(1, 1, D) if cls else None,
    }


def check_case(inputs, dtype, *, channels_last=False, images_grad=True, lowp_pos_dtype=None, frozen=()):
    """Output and every gradient of ours vs eager in ``dtype`` vs eager float64. ``lowp_pos_dtype`` overrides the
    dtype of pos_embed / cls_token in the low-precision runs (float32 with half images: AMP master weights);
    ``frozen`` names inputs besides the images that take no gradient."""
    order = ("images", "weight", "bias", "pos_embed", "cls_token")
    grad_out = None
    seen = {}

    def run(label, lowp):
        nonlocal grad_out
        fn = fastattn.patch_embed if label == "ours" else reference.patch_embed
        leaves = {}
        for name in order:
            t = inputs[name]
            if t is None:
                leaves[name] = None
                continue
            tdt = lowp_pos_dtype if (lowp_pos_dtype and name in ("pos_embed", "cls_token") and label != "ref") \
                else lowp
            t = dev(t, tdt)
            if name == "images" and channels_last:
                t = t.to(memory_format=torch.channels_last)
            leaves[name] = t.detach().requires_grad_((name != "images" or images_grad) and name not in frozen)
        out = fn(**leaves)
        if grad_out is None:
            grad_out = randn(*out.shape)
        out.backward(dev(grad_out, out.dtype))
        seen[label] = {n: leaves[n] for n in order}
        grads = {d: leaves[n].grad for d, n in zip(NAMES[1:], order)
                 if leaves[n] is not None and leaves[n].requires_grad}
        return {"out": out, **grads}

    def floors(results):
        low = [t.detach().cpu().double() if t is not None else None for t in seen["eager"].values()]
        return patch_embed_floors(*low, grad_out, dtype=dtype)

    expect = {"_pe_fwd": 1, "_pe_bwd_dw": 1, "_pe_bwd_dx": int(images_grad),
              "_pe_bwd_dpos": int(inputs["pos_embed"] is not None or inputs["cls_token"] is not None)}
    results = three_way(run, dtype, kernels=expect, floors=floors)
    for name, ours in results["ours"].items():
        eager = results["eager"][name]
        assert ours.dtype == eager.dtype, f"{name}: dtype {ours.dtype} != eager {eager.dtype}"
    return results


# -- shapes: channel counts, patch sizes, rectangular images ------------------------------------------------------

SHAPES = [  # (B, C, H, W, P, D)
    (2, 3, 28, 21, 7, 24),
    (1, 4, 32, 64, 16, 40),
    (1, 2, 32, 64, 32, 40),
    (2, 1, 16, 12, 4, 96),
    (1, 3, 28, 28, 14, 64),
    (1, 3, 24, 24, 8, 40),
]


@pytest.mark.parametrize("B,C,H,W,P,D", SHAPES, ids=[f"{b}x{c}x{h}x{w}-P{p}-D{d}" for b, c, h, w, p, d in SHAPES])
def test_shapes_fp16(B, C, H, W, P, D):
    check_case(make_inputs(B, C, H, W, P, D), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dtypes(dtype):
    check_case(make_inputs(2, 3, 28, 21, 7, 40), dtype)


VARIANTS = {  # (bias, pos, cls)
    "plain": (False, None, False),
    "bias": (True, None, False),
    "pos": (True, "cls", False),
    "cls": (True, None, True),
    "cls+pos": (True, "cls", True),
    "cls+pos_no_embed_class": (True, "patches", True),
    "no_bias_cls+pos": (False, "cls", True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_class_token_and_position_embedding_variants(variant):
    bias, pos, cls = VARIANTS[variant]
    check_case(make_inputs(2, 3, 24, 16, 8, 24, bias=bias, pos=pos, cls=cls), torch.float32)


def test_no_embed_class_semantics():
    """A pos_embed of N rows with a class token is added to the patch tokens only (timm's no_embed_class)."""
    x = {k: dev(v) for k, v in make_inputs(1, 3, 16, 16, 8, 16, pos="patches").items()}
    out = fastattn.patch_embed(**{k: v.float() for k, v in x.items()})
    t = F.conv2d(x["images"], x["weight"], x["bias"], stride=8).flatten(2).transpose(1, 2)
    expect = torch.cat([x["cls_token"], t + x["pos_embed"]], 1)
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)


def test_vit_b16_like_shape_bf16():
    """The real ViT-B/16 token count (14 x 14 + 1 = 197) at a reduced width, with every feature."""
    check_case(make_inputs(1, 3, 224, 224, 16, 32), torch.bfloat16, images_grad=False)


# -- layouts: channels_last, views, pos_embed without its leading 1, mixed dtypes ----------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_channels_last(dtype, monkeypatch):
    calls = spy_launches(monkeypatch)
    res = check_case(make_inputs(2, 3, 32, 16, 8, 40), dtype, channels_last=True)
    seen = [(name, kw.get("KORDER"), kw.get("X_FLAT")) for name, _, kw in calls]
    assert ("_pe_fwd", 1, 1) in seen and ("_pe_bwd_dx", 1, 1) in seen  # (i, j, c) order, contiguous pixel rows
    dimages = res["ours"]["dimages"]
    assert dimages.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_weight_and_images():
    """A model converted with .to(memory_format=channels_last) has a channels_last weight too."""
    x = make_inputs(1, 4, 16, 24, 8, 24)
    x["weight"] = x["weight"].to(memory_format=torch.channels_last)
    res = check_case(x, torch.float16, channels_last=True)
    assert res["ours"]["dweight"].stride() == x["weight"].stride()  # dweight in the weight's own layout


def test_views_read_through_strides_without_copies(monkeypatch):
    calls = spy_launches(monkeypatch, "_pe_fwd")
    big = dev(torch.randn(2, 5, 40, 30))
    images = big[:, 1:4, 4:36, 3:27]  # a crop of a larger batch: (2, 3, 32, 24), no stride is contiguous
    wt = dev(torch.randn(3, 24, 8, 8))
    weight = wt.transpose(0, 1)  # (24, 3, 8, 8) view
    bias = dev(torch.randn(24))
    out = fastattn.patch_embed(images, weight, bias)
    [(_, args, _)] = calls
    assert (args[0].data_ptr(), args[1].data_ptr()) == (images.data_ptr(), weight.data_ptr())
    torch.testing.assert_close(out, reference.patch_embed(images, weight, bias), atol=1e-5, rtol=1e-5)


def test_transposed_images_view():
    x = make_inputs(2, 3, 21, 28, 7, 24)
    x["images"] = x["images"].transpose(2, 3)  # (2, 3, 28, 21), H and W strides swapped
    check_case(x, torch.float16)


def test_pos_embed_2d_shape():
    x = make_inputs(2, 3, 16, 24, 8, 24)
    x["pos_embed"] = x["pos_embed"][0]  # (N + 1, D)
    check_case(x, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_pos_and_cls_with_half_images(dtype):
    """AMP-style fp32 pos_embed / cls_token: tokens come out in fp32 as torch's promotion gives."""
    res = check_case(make_inputs(2, 3, 24, 16, 8, 24), dtype, lowp_pos_dtype=torch.float32)
    assert res["ours"]["out"].dtype == torch.float32 and res["ours"]["dpos_embed"].dtype == torch.float32


def test_expanded_grad_out():
    """A zero-stride incoming gradient (from .sum()) is read through its strides."""
    x = make_inputs(2, 3, 16, 16, 8, 24)
    leaves = {k: dev(v, torch.float32).requires_grad_() for k, v in x.items()}
    with _runtime.record_launches() as n:
        fastattn.patch_embed(**leaves).sum().backward()
    assert n["_pe_bwd_dw"] == 1
    ref = {k: dev(v, torch.float32).requires_grad_() for k, v in x.items()}
    reference.patch_embed(**ref).sum().backward()
    for k, leaf in leaves.items():
        torch.testing.assert_close(leaf.grad, ref[k].grad, atol=1e-4, rtol=1e-4)


# -- backward: which kernels run, split reduction, determinism, float64 gradcheck ----------------------------------

def test_frozen_inputs_skip_kernels():
    x = make_inputs(2, 3, 16, 16, 8, 24)
    images, pos, cls = (dev(x[k], torch.float32) for k in ("images", "pos_embed", "cls_token"))
    weight = dev(x["weight"], torch.float32).requires_grad_()
    with _runtime.record_launches() as n:
        fastattn.patch_embed(images, weight, None, pos, cls).square().sum().backward()
    assert n["_pe_bwd_dw"] == 1 and n["_pe_bwd_dpos"] == 0 and n["_pe_bwd_dx"] == 0
    ref_w = dev(x["weight"], torch.float32).requires_grad_()
    reference.patch_embed(images, ref_w, None, pos, cls).square().sum().backward()
    torch.testing.assert_close(weight.grad, ref_w.grad, atol=1e-4, rtol=1e-4)


def test_split_reduction_only_inside_the_dimages_buffer():
    """The dW reduction splits over token ranges only as far as their fp32 partials fit in the dimages buffer (which
    they occupy before dimages is written): with dimages the fixed-order split sum runs, without it one range per
    tile writes dweight itself, and with dbias alone no program runs the GEMM. Every result under the 2x rule."""
    cpu_only("the split follows the interpreter's schedule; test_dw_schedule_on_a_gpu checks a GPU's")
    x = make_inputs(2, 3, 28, 21, 7, 8)  # 24 tokens; the partials of 2 ranges fit in the fp32 images' 14 KB

    def schedule(images_grad, dweight=True):
        room = x["images"].numel() * 4 if images_grad else 0
        return pe_ops.dw_schedule(24, 147, 8, room=room, acc_bytes=4, dw=dweight, sms=common.sm_count(torch.device(
            "cpu")), cuda=False)

    assert schedule(True).split == 2 and schedule(True).partial_bytes == 2 * (8 * 147 + 8) * 4
    assert schedule(False) == (1, 32, 0)
    split = check_case(x, torch.float32)
    assert split["launches"]["_pe_bwd_reduce"] == 1
    single = check_case(x, torch.float32, images_grad=False)
    assert single["launches"]["_pe_bwd_reduce"] == 0
    assert schedule(True, dweight=False).split == 2  # dbias alone: (D,) partials per range
    bias_only = check_case(x, torch.float32, frozen=("weight",))
    assert bias_only["launches"]["_pe_bwd_reduce"] == 1 and "dweight" not in bias_only["ours"]


def test_dw_schedule_on_a_gpu():
    """ViT-B/16 at batch 64 on a 132-SM GPU: 8 token ranges whose partials fit in the fp16 images' buffer, or one
    range per tile when the images take no gradient; ranges never hold more than the buffer."""
    M, K, D, images_bytes = 64 * 196, 768, 768, 2 * 64 * 3 * 224 * 224
    with_dx = pe_ops.dw_schedule(M, K, D, room=images_bytes, acc_bytes=4, sms=132)
    assert with_dx.split == 8 and with_dx.partial_bytes == 8 * (D * K + D) * 4 <= images_bytes
    assert pe_ops.dw_schedule(M, K, D, room=0, acc_bytes=4, sms=132) == (1, 12544, 0)
    for room in (0, 10**5, 3 * (D * K + D) * 4 - 1, images_bytes, 10**12):
        for dw, dbias in ((True, True), (True, False), (False, True)):
            s = pe_ops.dw_schedule(M, K, D, room=room, acc_bytes=4, dw=dw, dbias=dbias, sms=132)
            assert s.partial_bytes <= room and (s.split - 1) * s.rows < M <= s.split * s.rows


def test_backward_is_deterministic():
    x = make_inputs(3, 3, 24, 24, 4, 40)
    grads = []
    for _ in range(2):
        leaves = {k: dev(v, torch.float16).requires_grad_() for k, v in x.items()}
        g = dev(torch.randn(3, 37, 40, generator=torch.Generator().manual_seed(5)), torch.float16)
        fastattn.patch_embed(**leaves).backward(g)
        grads.append([leaves[k].grad for k in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_gradcheck_float64_through_the_kernels():
    if not _runtime.interpreting():
        pytest.skip("float64 runs the Triton kernels only under the interpreter")
    x = make_inputs(2, 2, 8, 12, 4, 8)
    leaves = [x[k].requires_grad_() for k in ("images", "weight", "bias", "pos_embed", "cls_token")]
    with _runtime.record_launches() as n:
        assert torch.autograd.gradcheck(fastattn.patch_embed, leaves, eps=1e-6, atol=1e-7, rtol=1e-5,
                                        fast_mode=True)
    assert n["_pe_fwd"] > 0 and n["_pe_bwd_dw"] > 0 and n["_pe_bwd_dx"] > 0 and n["_pe_bwd_dpos"] > 0


# -- torch.compile, custom ops ---------------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    x = make_inputs(2, 3, 16, 24, 8, 24)
    leaves = [dev(x[k], torch.float32).requires_grad_() for k in ("images", "weight", "bias", "pos_embed", "cls_token")]

    def f(images, weight, bias, pos, cls):
        return fastattn.patch_embed(images, weight, bias, pos, cls).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with _runtime.record_launches() as n:
        loss = compiled(*leaves)
        grads = torch.autograd.grad(loss, leaves)
    assert n["_pe_fwd"] == 1 and n["_pe_bwd_dw"] == 1 and n["_pe_bwd_dx"] == 1
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    ref_loss = reference.patch_embed(*ref).square().sum()
    ref_grads = torch.autograd.grad(ref_loss, ref)
    torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_registered_custom_ops():
    assert hasattr(torch.ops.fastattn, "patch_embed") and hasattr(torch.ops.fastattn, "patch_embed_backward")
    images, weight = dev(torch.randn(1, 3, 16, 16)), dev(torch.randn(8, 3, 8, 8))
    out = torch.ops.fastattn.patch_embed(images, weight, None, None, None)
    torch.testing.assert_close(out, reference.patch_embed(images, weight), atol=1e-5, rtol=1e-5)


def test_empty_batch():
    x = make_inputs(0, 3, 16, 16, 8, 24)
    leaves = {k: dev(v, torch.float32).requires_grad_() for k, v in x.items()}
    out = fastattn.patch_embed(**leaves)
    assert out.shape == (0, 5, 24)
    out.sum().backward()
    for k, t in leaves.items():
        assert t.grad.shape == t.shape and not t.grad.any(), k


# -- the module ------------------------------------------------------------------------------------------------------

def test_module_state_dict_matches_conv2d():
    conv = torch.nn.Conv2d(3, 24, kernel_size=8, stride=8)
    mod = fastattn.nn.PatchEmbed(3, 24, kernel_size=8, stride=8)
    assert isinstance(mod, torch.nn.Conv2d)
    assert list(mod.state_dict()) == list(conv.state_dict()) == ["weight", "bias"]
    mod.load_state_dict(conv.state_dict())
    assert "patch_size=8" in repr(mod)
    conv, mod = dev(conv), dev(mod)
    images, pos, cls = dev(torch.randn(2, 3, 16, 24)), dev(torch.randn(1, 7, 24)), dev(torch.randn(1, 1, 24))
    with _runtime.record_launches() as n:
        out = mod(images, pos_embed=pos, cls_token=cls)
    assert n["_pe_fwd"] == 1
    expect = torch.cat([cls.expand(2, -1, -1), conv(images).flatten(2).transpose(1, 2)], 1) + pos
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    assert fastattn.nn.PatchEmbed(3, 24, 8).stride == (8, 8)  # stride defaults to the patch size


def test_module_from_conv_shares_parameters():
    conv = dev(torch.nn.Conv2d(4, 16, kernel_size=4, stride=4, bias=False))
    mod = fastattn.nn.PatchEmbed.from_conv(conv)
    assert mod.weight is conv.weight and mod.bias is None
    images = dev(torch.randn(1, 4, 8, 12))
    out = mod(images)
    out.square().sum().backward()
    assert conv.weight.grad is not None
    torch.testing.assert_close(out, conv(images).flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{"stride": 4}, {"padding": 1}, {"dilation": 2}, {"groups": 2},
                                {"kernel_size": (8, 4), "stride": (8, 4)}], ids=str)
def test_module_rejects_non_patchify_conv(kw):
    args = {"in_channels": 4, "out_channels": 8, "kernel_size": 8, "stride": 8}
    args.update(kw)
    with pytest.raises(ValueError, match="patchify"):
        fastattn.nn.PatchEmbed(**args)
    with pytest.raises(ValueError, match="patchify"):
        fastattn.nn.PatchEmbed.from_conv(torch.nn.Conv2d(**args))


def _import_or_skip(name):
    try:
        return __import__(name)
    except Exception as e:  # noqa: BLE001  (torchvision's CUDA wheel can fail to load its ops beside a CPU torch)
        pytest.skip(f"{name} not usable here: {type(e).__name__}: {e}")


def test_swap_into_torchvision_vit():
    tv = _import_or_skip("torchvision")
    vit = dev(tv.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32,
                                          mlp_dim=64).eval())
    images = dev(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        expect = vit(images)
    keys = list(vit.state_dict())
    vit.conv_proj = fastattn.nn.PatchEmbed.from_conv(vit.conv_proj)
    assert list(vit.state_dict()) == keys
    with torch.no_grad(), _runtime.record_launches() as n:
        x = vit.conv_proj(images, pos_embed=vit.encoder.pos_embedding, cls_token=vit.class_token)
        out = vit.heads(vit.encoder.ln(vit.encoder.layers(vit.encoder.dropout(x)))[:, 0])
    assert n["_pe_fwd"] == 1
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)


def test_swap_into_timm_vit():
    timm = _import_or_skip("timm")
    vit = dev(timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1,
                                                               num_heads=2, num_classes=5).eval())
    images = dev(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        expect = vit(images)
    keys = list(vit.state_dict())
    vit.patch_embed.proj = fastattn.nn.PatchEmbed.from_conv(vit.patch_embed.proj)
    assert list(vit.state_dict()) == keys
    with torch.no_grad(), _runtime.record_launches() as n:
        x = vit.patch_embed.proj(images, pos_embed=vit.pos_embed, cls_token=vit.cls_token)
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        out = vit.forward_head(vit.norm(vit.blocks(x)))
    assert n["_pe_fwd"] == 1
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)


# -- TF32 policy ------------------------------------------------------------------------------------------------------

def test_fp32_uses_tf32_exactly_where_conv_would():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with torch.backends.cudnn.flags(allow_tf32=True):
        assert pe_ops._kernel_flags(torch.float32, cuda)["PRECISION"] == "tf32"
        assert pe_ops._kernel_flags(torch.float32, cpu)["PRECISION"] == "ieee"  # CPU conv2d is exact fp32
        assert pe_ops._kernel_flags(torch.float16, cuda)["PRECISION"] == "ieee"
    with torch.backends.cudnn.flags(allow_tf32=False):
        assert pe_ops._kernel_flags(torch.float32, cuda)["PRECISION"] == "ieee"


# -- bad input -------------------------------------------------------------------------------------------------------

def _args(B=1, C=3, H=16, W=16, P=8, D=8, **over):
    shapes = {"images": (B, C, H, W), "weight": (D, C, P, P), "bias": (D,),
              "pos_embed": (1, (H // P) * (W // P) + 1, D), "cls_token": (1, 1, D)}
    a = {name: dev(torch.randn(*shape)) for name, shape in shapes.items()}
    a.update(over)
    return a


BAD = [
    ("height", lambda: _args(H=225, P=16, W=224), ValueError, "image height 225 is not a multiple of patch size 16"),
    ("width", lambda: _args(W=20), ValueError, "image width 20 is not a multiple of patch size 8"),
    ("too_small", lambda: _args(images=dev(torch.randn(1, 3, 4, 16))), ValueError, "image height 4 is smaller"),
    ("images_rank", lambda: _args(images=dev(torch.randn(3, 16, 16))), ValueError, "images must be 4-D"),
    ("weight_rank", lambda: _args(weight=dev(torch.randn(8, 192))), ValueError, "weight must be a Conv2d weight"),
    ("weight_rect", lambda: _args(weight=dev(torch.randn(8, 3, 8, 4))), ValueError, "square"),
    ("channels", lambda: _args(images=dev(torch.randn(1, 4, 16, 16))), ValueError, "images have 4 channels"),
    ("bias_shape", lambda: _args(bias=dev(torch.randn(9))), ValueError, "bias must have shape"),
    ("cls_shape", lambda: _args(cls_token=dev(torch.randn(1, 8))), ValueError, "cls_token must have shape"),
    ("pos_rows", lambda: _args(pos_embed=dev(torch.randn(1, 3, 8))), ValueError, "pos_embed must have shape"),
    ("pos_width", lambda: _args(pos_embed=dev(torch.randn(1, 5, 7))), ValueError, "pos_embed must have shape"),
    ("pos_batch", lambda: _args(pos_embed=dev(torch.randn(2, 5, 8))), ValueError, "pos_embed must have shape"),
    ("pos_rows_no_cls", lambda: _args(cls_token=None), ValueError, r"pos_embed must have shape \(1, 4, 8\)"),
    ("dtype_mix", lambda: _args(weight=dev(torch.randn(8, 3, 8, 8).half())), TypeError, "one dtype"),
    ("bias_dtype", lambda: _args(bias=dev(torch.randn(8).double())), TypeError, "bias float64"),
    ("pos_dtype", lambda: _args(pos_embed=dev(torch.randn(1, 5, 8).half())), TypeError, "pos_embed must have"),
    ("cls_dtype", lambda: _args(cls_token=dev(torch.randn(1, 1, 8).bfloat16())), TypeError, "cls_token must have"),
    ("int_images", lambda: _args(images=dev(torch.ones(1, 3, 16, 16, dtype=torch.int64))), TypeError,
     "images must have"),
    ("not_tensor", lambda: _args(pos_embed=[[0.0]]), TypeError, "pos_embed must be a Tensor or None"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_naming_the_argument(case):
    _, make, exc, text = case
    with pytest.raises(exc, match=text):
        fastattn.patch_embed(**make())


def test_device_mix_raises():
    with pytest.raises(RuntimeError, match="weight is on meta"):
        fastattn.patch_embed(dev(torch.randn(1, 3, 16, 16)), torch.empty(8, 3, 8, 8, device="meta"))


# -- visible fallback --------------------------------------------------------------------------------------------------

def test_cpu_without_interpreter_runs_eager_reference_visibly():
    cpu_only("the eager fallback of CPU tensors without Triton's interpreter")
    code = textwrap.dedent("""
        import os, warnings
        os.environ.pop("TRITON_INTERPRET", None)
        import torch, fastattn
        from fastattn import reference
        x, w = torch.randn(1, 3, 16, 16), torch.randn(8, 3, 8, 8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fastattn.patch_embed(x, w)
        assert any(issubclass(c.category, fastattn.FallbackWarning) and "interpreter" in str(c.message)
                   for c in caught)
        torch.testing.assert_close(out, reference.patch_embed(x, w))
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_no_warning_on_the_kernel_path():
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastattn.FallbackWarning)
        fastattn.patch_embed(dev(torch.randn(1, 3, 16, 16)), dev(torch.randn(8, 3, 8, 8)))
