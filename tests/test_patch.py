"""fastattn.patch on torch.nn, torchvision, timm and fastattn models: outputs and every gradient against the
unpatched model (tests/modelcheck.py: float64 copy of the unpatched model as the reference), the Triton kernels
launched, state_dict unchanged, unpatch exact, other instances untouched, torch.compile.

Tiny configs only (width <= 64, depth 1-2, images <= 32 px, batch 2): every kernel launch goes through Triton's
interpreter on a CPU. Dropout is 0 wherever gradients are compared: fused dropout draws its own random stream.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from modelcheck import (
    ATTN,
    ATTN_BWD,
    BN_BWD,
    BN_EVAL,
    BN_TRAIN,
    DEVICE,
    LN,
    LN_BWD,
    PE,
    PE_BWD,
    assert_kernels,
    compare_models,
    import_or_skip,
    to_device,
)
from torch import nn

import fastattn
from fastattn.patching import PatchReport, Rule, Skip
from fastattn.patching.rules import REGISTRY
from fastattn.patching.torch_nn import FusedMultiheadAttention, FusedTransformerDecoderLayer


def check_patched(model: nn.Module, inputs: tuple, kwargs: dict | None = None, *, eval_kernels=(),
                  train_kernels=(), train: bool = True, evaluate: bool = True, **patch_kw) -> nn.Module:
    """fastattn.patch(deepcopy(model)) against ``model`` and a float64 copy of it (``compare_models``)."""
    ours = fastattn.patch(copy.deepcopy(model), **patch_kw)
    compare_models(ours, model, inputs, kwargs, eval_kernels=eval_kernels, train_kernels=train_kernels, train=train,
                   evaluate=evaluate)
    return ours


# ---------------------------------------------------------------------------------------------------------------
# torch.nn
# ---------------------------------------------------------------------------------------------------------------


def _padding(B: int, S: int, lengths: list[int]) -> torch.Tensor:
    pad = torch.zeros(B, S, dtype=torch.bool)
    for i, n in enumerate(lengths):
        pad[i, n:] = True
    return pad


@pytest.mark.parametrize("batch_first,norm_first,masks", [
    (True, False, "padding"),
    (False, True, "causal"),
    (True, True, "bool+padding"),
])
def test_transformer_encoder_layer(batch_first, norm_first, masks):
    layer = nn.TransformerEncoderLayer(32, 2, 48, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    B, S = 2, 7
    x = torch.randn(B, S, 32) if batch_first else torch.randn(S, B, 32)
    kw = {}
    if "padding" in masks:
        kw["src_key_padding_mask"] = _padding(B, S, [7, 4])
    if masks == "causal":
        kw.update(src_mask=nn.Transformer.generate_square_subsequent_mask(S), is_causal=True)
    if "bool" in masks:  # True = masked out (torch's MultiheadAttention convention); the diagonal stays visible
        kw["src_mask"] = (torch.rand(S, S) > 0.5).fill_diagonal_(False)
    check_patched(layer, (x,), kw, eval_kernels=ATTN + LN, train_kernels=ATTN + LN + ATTN_BWD + LN_BWD)


def test_encoder_layer_eval_fast_path_still_fused(monkeypatch, device):
    """In eval under no_grad torch's own layer calls torch._transformer_encoder_layer_fwd and never
    self_attn.forward; the patched layer runs the fused kernels instead, with the same result."""
    layer = nn.TransformerEncoderLayer(32, 2, 48, dropout=0.0, batch_first=True).eval().to(device)
    ours = fastattn.patch(copy.deepcopy(layer))
    x = torch.randn(2, 5, 32, device=device)
    fast_path = []
    torch_fwd = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: fast_path.append(1) or torch_fwd(*a))
    with torch.no_grad():
        torch_out = layer(x)
        assert fast_path == [1], "torch's layer did not take its fast path; the test proves nothing"
        with fastattn.record_launches() as launches:
            out = ours(x)
    assert fast_path == [1]
    assert_kernels(launches, ATTN + LN, "eval under no_grad")
    torch.testing.assert_close(out, torch_out, rtol=1e-5, atol=1e-5)


def test_transformer_encoder_nested_fast_path(device):
    """torch's TransformerEncoder in eval turns padded input into a nested tensor and returns zeros at the padded
    positions; the patched encoder never does that conversion but returns the same values."""
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 48, dropout=0.0, batch_first=True), 2,
                                norm=nn.LayerNorm(32)).eval().to(device)
    x = torch.randn(2, 6, 32, device=device)
    pad = _padding(2, 6, [6, 3]).to(device)
    ours = fastattn.patch(copy.deepcopy(enc))
    with torch.no_grad(), fastattn.record_launches() as launches:
        out = ours(x, src_key_padding_mask=pad)
        torch_out = enc(x, src_key_padding_mask=pad)
    assert_kernels(launches, ATTN + LN, "encoder")
    ln_of_zero = enc.norm(torch.zeros(32, device=device))
    torch.testing.assert_close(torch_out[1, 3:], ln_of_zero.expand(3, 32))  # torch did take its nested path
    torch.testing.assert_close(out, torch_out, rtol=1e-5, atol=1e-5)
    # with grad enabled torch takes the regular path (no zeroing); so does ours
    check_patched(enc, (x,), {"src_key_padding_mask": pad}, eval_kernels=ATTN + LN, train=False)


def test_transformer_encoder_decoder():
    model = nn.Transformer(32, 2, 1, 1, 48, dropout=0.0)  # sequence-first
    S, T, B = 6, 5, 2
    src, tgt = torch.randn(S, B, 32), torch.randn(T, B, 32)
    kw = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(T), "tgt_is_causal": True,
          "src_key_padding_mask": _padding(B, S, [6, 4]), "memory_key_padding_mask": _padding(B, S, [6, 4]),
          "tgt_key_padding_mask": _padding(B, T, [5, 4])}
    ours = check_patched(model, (src, tgt), kw, eval_kernels=ATTN + LN, train_kernels=ATTN + LN + ATTN_BWD + LN_BWD)
    assert type(ours.decoder.layers[0]) is FusedTransformerDecoderLayer


def test_decoder_layer_pre_norm_cross_attention():
    layer = nn.TransformerDecoderLayer(32, 4, 48, dropout=0.0, batch_first=True, norm_first=True)
    tgt, memory = torch.randn(2, 3, 32), torch.randn(2, 5, 32)
    check_patched(layer, (tgt, memory), {"memory_key_padding_mask": _padding(2, 5, [5, 2])},
                  eval_kernels=ATTN + LN, train_kernels=ATTN + LN + ATTN_BWD + LN_BWD)


@pytest.mark.parametrize("case", ["kdim_vdim", "cross_unbatched", "mixed_masks_3d"])
def test_multihead_attention(case):
    E, H = 32, 4
    if case == "kdim_vdim":  # separate q/k/v projection weights, sequence-first
        mha = nn.MultiheadAttention(E, H, kdim=24, vdim=16)
        q, k, v = torch.randn(5, 2, E), torch.randn(7, 2, 24), torch.randn(7, 2, 16)
        kw = {"key_padding_mask": _padding(2, 7, [7, 3])}
    elif case == "cross_unbatched":  # key is value (one k/v projection), no batch dim
        mha = nn.MultiheadAttention(E, H, batch_first=True)
        q, k = torch.randn(5, E), torch.randn(7, E)
        v = k
        kw = {"attn_mask": torch.rand(5, 7) > 0.3}
        kw["attn_mask"][:, 0] = False  # every query keeps at least one key
    else:  # bool padding mask + float per-head mask (N * H, L, S)
        mha = nn.MultiheadAttention(E, H, batch_first=True)
        q = k = v = torch.randn(2, 6, E)
        kw = {"key_padding_mask": _padding(2, 6, [6, 4]), "attn_mask": torch.randn(2 * H, 6, 6)}
    kw["need_weights"] = False
    check_patched(mha, (q, k, v), kw, eval_kernels=ATTN, train_kernels=ATTN + ATTN_BWD)


def test_multihead_attention_need_weights_falls_back(device):
    mha = nn.MultiheadAttention(32, 2, batch_first=True).eval().to(device)
    ours = fastattn.patch(copy.deepcopy(mha))
    x = torch.randn(2, 5, 32, device=device)
    with pytest.warns(fastattn.FallbackWarning, match="need_weights"):
        out, weights = ours(x, x, x)
    ref_out, ref_weights = mha(x, x, x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)


def test_multihead_attention_bias_kv_left_alone():
    model = nn.Sequential(nn.MultiheadAttention(32, 2, add_bias_kv=True))
    fastattn.patch(model)
    assert type(model[0]) is nn.MultiheadAttention
    report = fastattn.patch_report(model)
    assert [(e.name, e.fused_as) for e in report.left_alone] == [("0", None)]
    assert "add_bias_kv" in report.left_alone[0].detail


# ---------------------------------------------------------------------------------------------------------------
# torchvision and timm
# ---------------------------------------------------------------------------------------------------------------


def test_torchvision_vit():
    tv = import_or_skip("torchvision")
    vit = tv.models.vision_transformer.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                                         hidden_dim=32, mlp_dim=64, num_classes=5)
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head: no gradient would flow
    images = torch.randn(2, 3, 16, 16)
    check_patched(vit, (images,), eval_kernels=ATTN + LN + PE,
                  train_kernels=ATTN + LN + PE + ATTN_BWD + LN_BWD + PE_BWD)


def test_torchvision_resnet():
    tv = import_or_skip("torchvision")
    model = tv.models.resnet.ResNet(tv.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5)
    images = torch.randn(2, 3, 64, 64)  # layer4 at 2x2: 8 values per channel (tests/modelcheck.py: conditioning)
    ours = check_patched(model, (images,), eval_kernels=BN_EVAL, train_kernels=BN_TRAIN + BN_BWD)
    report = fastattn.patch_report(ours)
    assert {e.name for e in report.left_alone} == {"layer2.0.downsample.1", "layer3.0.downsample.1",
                                                   "layer4.0.downsample.1"}


def test_torchvision_bottleneck():
    tv = import_or_skip("torchvision")
    block = tv.models.resnet.Bottleneck(8, 4, stride=2, downsample=nn.Sequential(
        nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)))
    check_patched(block, (torch.randn(2, 8, 7, 7),), eval_kernels=BN_EVAL, train_kernels=BN_TRAIN + BN_BWD)


def test_timm_vit():
    timm = import_or_skip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2,
                                                           num_heads=2, mlp_ratio=2.0, num_classes=5,
                                                           init_values=0.5)  # LayerScale on
    check_patched(vit, (torch.randn(2, 3, 16, 16),), eval_kernels=ATTN + LN + PE,
                  train_kernels=ATTN + LN + PE + ATTN_BWD + LN_BWD + PE_BWD)


def test_timm_vit_variants_and_attention_mask():
    """no_embed_class without a class token (mean pooling) is fused; register tokens are not (reported), while its
    blocks still are; a bool attention mask reaches the fused attention."""
    timm = import_or_skip("timm")
    VisionTransformer = timm.models.vision_transformer.VisionTransformer
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                            class_token=False, no_embed_class=True, global_pool="avg")
    mask = torch.rand(2, 1, 16, 16) > 0.2
    mask[..., 0] = True
    check_patched(vit, (torch.randn(2, 3, 16, 16),), {"attn_mask": mask}, eval_kernels=ATTN + LN + PE, train=False)
    reg = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                            reg_tokens=2)
    ours = check_patched(reg, (torch.randn(2, 3, 16, 16),), eval_kernels=ATTN + LN, train=False)
    left = {e.name: e.detail for e in fastattn.patch_report(ours).left_alone}
    assert "register tokens" in left[""]


def test_timm_resnet():
    timm = import_or_skip("timm")
    model = timm.models.resnet.ResNet(timm.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=5,
                                      channels=(8, 16, 32, 64), zero_init_last=False)
    # 64 px: layer4's BatchNorms see 2x2 positions of 2 images; at 32 px they would normalise 2 values per channel,
    # the ill-conditioned case tests/modelcheck.py rules out (it failed on torch's scalar CPU path)
    check_patched(model, (torch.randn(2, 3, 64, 64),), eval_kernels=BN_EVAL, train_kernels=BN_TRAIN + BN_BWD)


def test_timm_block_with_se_left_alone():
    import_or_skip("timm")
    from timm.models.resnet import BasicBlock

    block = BasicBlock(8, 8, attn_layer="se")
    model = nn.Sequential(block)
    fastattn.patch(model)
    assert type(model[0]) is BasicBlock and type(model[0].bn1) is nn.BatchNorm2d
    left = {e.name: e.detail for e in fastattn.patch_report(model).left_alone}
    assert "attention module" in left["0"]


# ---------------------------------------------------------------------------------------------------------------
# fastattn's own models: patching an eager one gives the fused one
# ---------------------------------------------------------------------------------------------------------------


def test_own_models_patch_to_fused_layers():
    vit = fastattn.models.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=32,
                                            depth=1, num_heads=2, fused=False)
    built = fastattn.models.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=32,
                                              depth=1, num_heads=2, fused=True)
    ours = check_patched(vit, (torch.randn(2, 1, 8, 8),), eval_kernels=ATTN + LN + PE,
                         train_kernels=ATTN + LN + PE + ATTN_BWD + LN_BWD + PE_BWD)
    assert [type(m) for m in ours.modules()] == [type(m) for m in built.modules()]
    res = fastattn.models.ResNet(fastattn.models.BasicBlock, [1, 1, 1, 1], num_classes=3, width=4, fused=False)
    ours = fastattn.patch(copy.deepcopy(res))
    built = fastattn.models.ResNet(fastattn.models.BasicBlock, [1, 1, 1, 1], num_classes=3, width=4, fused=True)
    assert [type(m) for m in ours.modules()] == [type(m) for m in built.modules()]
    again = fastattn.patch(built)  # built fused: nothing to do, everything reported as fused
    assert not fastattn.patch_report(again).left_alone or all(
        "shortcut" in e.detail for e in fastattn.patch_report(again).left_alone)


# ---------------------------------------------------------------------------------------------------------------
# the patch contract: state_dict, unpatch, idempotence, other instances, report, options
# ---------------------------------------------------------------------------------------------------------------


def _state(model: nn.Module):
    return [(name, type(m), dict(m.__dict__)) for name, m in model.named_modules()]


def test_patch_keeps_parameters_unpatch_is_exact(device):
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 48, batch_first=True), 1).to(device)
    params = [(n, p, p.data_ptr(), p.dtype) for n, p in model.named_parameters()]
    before = _state(model)
    x = torch.randn(2, 4, 32, device=device)
    with torch.no_grad():
        ref = model.eval()(x)
    assert fastattn.patch(model) is model
    assert [(n, p, p.data_ptr(), p.dtype) for n, p in model.named_parameters()] == params
    twin = nn.TransformerEncoderLayer(32, 2, 48, batch_first=True)  # another instance of a patched class
    assert type(twin) is nn.TransformerEncoderLayer
    assert nn.TransformerEncoderLayer.forward.__module__ == "torch.nn.modules.transformer"
    first = [(name, type(m)) for name, m in model.named_modules()]
    fastattn.patch(model)  # idempotent
    assert [(name, type(m)) for name, m in model.named_modules()] == first
    assert all(e.detail == "already fused" for e in fastattn.patch_report(model).fused)
    fresh = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 48, batch_first=True), 1).to(device)
    fresh.load_state_dict(model.state_dict())  # checkpoints load either way
    model.load_state_dict(fresh.state_dict())
    assert fastattn.unpatch(model) is model
    assert fastattn.patch_report(model) is None
    after = _state(model)
    assert [(n, t) for n, t, _ in after] == [(n, t) for n, t, _ in before]
    for (name, _, d0), (_, _, d1) in zip(before, after):
        assert d0.keys() == d1.keys(), f"{name}: attributes changed by patch + unpatch"
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_save_and_load_whole_patched_model():
    """torch.save(model) of a patched model: the fused library classes are found (and rebuilt) in fastattn.patching."""
    import io
    import sys

    tv = import_or_skip("torchvision")
    model = fastattn.patch(nn.Sequential(tv.models.resnet.BasicBlock(4, 4), nn.LayerNorm(6)))
    buf = io.BytesIO()
    torch.save(model, buf)
    del sys.modules["fastattn.patching.torchvision"].FusedTorchvisionBasicBlock  # as in a fresh process
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded[0]).__name__ == "FusedTorchvisionBasicBlock" and type(loaded[1]) is fastattn.nn.LayerNorm
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    assert type(fastattn.unpatch(loaded)[0]) is tv.models.resnet.BasicBlock


def test_pickles_from_before_the_patching_package_load():
    """Models pickled when the patcher was the module fastattn.patch name their fused classes
    ``fastattn.patch.FusedTimmBlock`` etc.; such a stream loads (the library classes rebuilt on access, as in a fresh
    process) into the classes of fastattn.patching. The old stream is this model's own pickle with its class
    references written as they were then (torch.save's protocol 2 names each class by a GLOBAL opcode,
    ``c<module>\\n<name>\\n``)."""
    import pickle
    import sys

    timm = import_or_skip("timm")
    tv = import_or_skip("torchvision")
    model = nn.ModuleList([timm.models.vision_transformer.Block(8, 2), nn.MultiheadAttention(8, 2, batch_first=True),
                           tv.models.resnet.BasicBlock(4, 4)]).eval()
    fastattn.patch(model)
    stream = pickle.dumps(model, protocol=2)
    for home in ("torch_nn", "torchvision", "timm"):
        stream = stream.replace(f"cfastattn.patching.{home}\n".encode(), b"cfastattn.patch\n")
    assert b"fastattn.patching" not in stream
    assert b"cfastattn.patch\nFusedTimmBlock\n" in stream and b"cfastattn.patch\nFusedMultiheadAttention\n" in stream
    for home, name in (("timm", "FusedTimmBlock"), ("timm", "FusedTimmAttention"), ("timm", "FusedTimmLayerNorm"),
                       ("torchvision", "FusedTorchvisionBasicBlock")):
        vars(sys.modules[f"fastattn.patching.{home}"]).pop(name, None)  # as in a fresh process
    loaded = pickle.loads(stream)
    assert [type(m).__module__ for m in loaded] == ["fastattn.patching.timm", "fastattn.patching.torch_nn",
                                                    "fastattn.patching.torchvision"]
    assert [type(m).__name__ for m in loaded] == ["FusedTimmBlock", "FusedMultiheadAttention",
                                                  "FusedTorchvisionBasicBlock"]
    x, images = torch.randn(2, 5, 8), torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded[0](x), model[0](x))
        torch.testing.assert_close(loaded[1](x, x, x, need_weights=False)[0], model[1](x, x, x, need_weights=False)[0])
        torch.testing.assert_close(loaded[2](images), model[2](images))
    fastattn.unpatch(loaded)
    assert [type(m) for m in loaded] == [timm.models.vision_transformer.Block, nn.MultiheadAttention,
                                         tv.models.resnet.BasicBlock]


def test_old_import_paths():
    """``fastattn.patch`` is the function, ``sys.modules["fastattn.patch"]`` the compatibility module, also after
    ``import fastattn.patch``; the names it exported still import from it."""
    import sys

    import fastattn.patch
    from fastattn.patch import FusedMultiheadAttention as OldMHA
    from fastattn.patch import PatchEntry
    from fastattn.patch import PatchReport as OldReport

    assert fastattn.patch is fastattn.patching.patch and callable(fastattn.patch)
    assert OldReport is PatchReport and PatchEntry is fastattn.PatchEntry and OldMHA is FusedMultiheadAttention
    old = sys.modules["fastattn.patch"]
    assert old.patch_report is fastattn.patch_report and old.unpatch is fastattn.unpatch
    import importlib

    import fastattn.patch as as_name  # the package attribute: the function, as before the patching package
    assert as_name is fastattn.patching.patch and importlib.import_module("fastattn.patch") is old
    with pytest.raises(AttributeError, match="FusedNothing"):
        old.FusedNothing  # noqa: B018


class ToyNorm(nn.Module):  # a class of a library fastattn does not know, for test_registry_takes_new_libraries
    def forward(self, x):
        return x


class _ToyMixin:
    def forward(self, x):
        return x + 1


class _Sharded:  # stands for FSDP's FSDPModule: fully_shard puts a generated FSDP<Class> subclass in its place
    pass


def _toy_check(rule, name, m, opts):
    return [rule.swap(name, m, "toy kernel")]


def _sharded_check(rule, name, m, opts):
    raise Skip("sharded by FSDP: patch before fully_shard")


@pytest.fixture
def extra_rules():
    added = []

    def add(*rules):
        fastattn.patching.register(*rules)
        added.extend(rules)
    yield add
    for rule in added:
        REGISTRY.rules.remove(rule)


def test_registry_takes_new_libraries(extra_rules):
    """A library is a module of Rules: an exact class with a mixin (its fused class built and named from the rule,
    its method's signature checked), and a rule matching by structure, tried after the exact ones."""
    extra_rules(Rule("toy", f"{__name__}.ToyNorm", _toy_check, option="layer_norm", mixin=_ToyMixin, params=("x",)),
                Rule("torch.distributed.fsdp", None, _sharded_check, matches=lambda m: isinstance(m, _Sharded)))
    sharded = nn.LayerNorm(4)
    sharded.__class__ = type("FSDPLayerNorm", (_Sharded, nn.LayerNorm), {})
    model = nn.Sequential(ToyNorm(), sharded, nn.LayerNorm(4))
    fastattn.patch(model, layer_norm=False)
    left = {e.name: e.detail for e in fastattn.patch_report(model).left_alone}
    assert left == {"0": "layer_norm=False", "1": "sharded by FSDP: patch before fully_shard", "2": "layer_norm=False"}
    fastattn.patch(model)
    assert type(model[0]).__name__ == "FusedToyToyNorm" and isinstance(model[0], ToyNorm)
    assert type(model[0]) is globals()["FusedToyToyNorm"]  # kept beside its mixin, where pickling looks
    assert torch.equal(model[0](torch.zeros(2)), torch.ones(2))
    report = fastattn.patch_report(model)
    assert [(e.name, e.detail) for e in report.fused] == [("0", "toy kernel"), ("2", "LayerNorm kernel")]
    assert fastattn.unpatch(model)[0].__class__ is ToyNorm


def test_registry_checks_the_replaced_signature(extra_rules):
    extra_rules(Rule("toy", f"{__name__}.ToyNorm", _toy_check, mixin=_ToyMixin, params=("x", "residual")))
    model = fastattn.patch(nn.Sequential(ToyNorm()))
    assert type(model[0]) is ToyNorm
    assert fastattn.patch_report(model).left_alone[0].detail == (
        "this library version's ToyNorm.forward('x',) is not the ('x', 'residual') fastattn knows")
    with pytest.raises(ValueError, match="option 'norm'"):
        Rule("toy", f"{__name__}.ToyNorm", _toy_check, option="norm")
    with pytest.raises(ValueError, match="target"):
        Rule("toy", None, _toy_check)


def test_report_and_options():
    class MyAttention(nn.Module):  # unknown: reported
        def forward(self, x):
            return x

    class MyNorm(nn.LayerNorm):  # a subclass: reported, left alone
        pass

    model = nn.Sequential(nn.LayerNorm(8), MyNorm(8), MyAttention(), nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    fastattn.patch(model, attention=False)
    report = fastattn.patch_report(model)
    assert isinstance(report, PatchReport)
    assert [e.name for e in report.fused] == ["0"]
    left = {e.name: e.detail for e in report.left_alone}
    assert left == {"1": left["1"], "2": "not recognised by fastattn.patch", "3": "attention=False"}
    assert "subclass" in left["1"]
    text = str(report)
    assert "1 module(s) fused, 3 left alone" in text and "MyAttention" in text
    assert type(model[3]) is nn.MultiheadAttention
    fastattn.patch(model)  # now with attention
    assert type(model[3]) is FusedMultiheadAttention
    with pytest.raises(TypeError, match="model"):
        fastattn.patch("not a module")


def test_verbose_prints_report(capsys):
    fastattn.patch(nn.Sequential(nn.LayerNorm(8)), verbose=True)
    assert "fastattn.patch: 1 module(s) fused" in capsys.readouterr().out


def test_fused_dropout(device):
    """With dropout > 0 the fused add + LayerNorm (and attention) draw their own masks: in training the patched
    layer differs from torch's but is reproducible under a seed; in eval the two are equal."""
    layer = nn.TransformerEncoderLayer(32, 2, 48, dropout=0.3, batch_first=True).to(device)
    ours = fastattn.patch(copy.deepcopy(layer))
    x = torch.randn(2, 5, 32, device=device)
    torch.manual_seed(1)
    with fastattn.record_launches() as launches:
        a = ours(x)
    assert_kernels(launches, ATTN + LN, "dropout")
    torch.manual_seed(1)
    torch.testing.assert_close(ours(x), a)
    torch.manual_seed(1)
    assert not torch.allclose(layer(x), a)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), layer.eval()(x), rtol=1e-5, atol=1e-5)


def test_autocast():
    """Under autocast the residual stream stays float32 beside bf16 sublayer outputs (post-norm: the fused norm keeps
    it, residual_in_fp32) and a ResNet block adds a float32 identity to a bf16 convolution as its in-place add."""
    tv = import_or_skip("torchvision")
    for model, x, kernels in ((nn.TransformerEncoderLayer(32, 2, 48, dropout=0.0, batch_first=True),
                               torch.randn(2, 5, 32), ATTN + LN),
                              (tv.models.resnet.BasicBlock(8, 8), torch.randn(2, 8, 6, 6), BN_TRAIN)):
        model, x = model.to(DEVICE), x.to(DEVICE)
        ours = fastattn.patch(copy.deepcopy(model))
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16), fastattn.record_launches() as launches:
            out, ref = ours(x), model(x)
        out.float().sum().backward()
        assert_kernels(launches, kernels, type(model).__name__)
        torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------------


def _compiled_matches(model: nn.Module, inputs: tuple, kwargs: dict | None = None):
    model, inputs, kwargs = (to_device(t, DEVICE) for t in (model, inputs, kwargs or {}))
    ours = fastattn.patch(copy.deepcopy(model)).train()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with fastattn.record_launches() as launches, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled(*inputs, **kwargs)
        out.sum().backward()
    ref = model.train()(*inputs, **kwargs)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    return launches


def test_compile_encoder_layer():
    layer = nn.TransformerEncoderLayer(32, 2, 48, dropout=0.0, batch_first=True)
    launches = _compiled_matches(layer, (torch.randn(2, 5, 32),), {"src_key_padding_mask": _padding(2, 5, [5, 3])})
    assert_kernels(launches, ATTN + LN + ATTN_BWD + LN_BWD, "compiled encoder layer")


def test_compile_vit_and_basic_block():
    vit = fastattn.models.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=32,
                                            depth=1, num_heads=2, fused=False)
    launches = _compiled_matches(vit, (torch.randn(2, 1, 8, 8),))
    assert_kernels(launches, ATTN + LN + PE + ATTN_BWD + LN_BWD + PE_BWD, "compiled ViT")
    tv = import_or_skip("torchvision")
    block = tv.models.resnet.BasicBlock(8, 8)
    launches = _compiled_matches(block, (torch.randn(2, 8, 6, 6),))
    assert_kernels(launches, BN_TRAIN + BN_BWD, "compiled BasicBlock")
