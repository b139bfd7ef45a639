"""fastattn.patch on the CNNs beyond ResNet (issue 16): torchvision's EfficientNet-B0, MobileNetV3-Small,
MobileNetV2, RegNetY-400MF and ConvNeXt-T, timm's EfficientNet-B0, ResNet-26D and ConvNeXt-Atto, as their builders
make them. Eval and a training step against the unpatched model and its float64 copy (tests/modelcheck.py: the
output, every gradient, the running statistics and num_batches_tracked after the step), the Triton kernels
launched, and the report showing every BatchNorm + activation pair (and each fused residual) fused.

Dropout and stochastic depth stay on (they are torch's and timm's, untouched by fastattn): each training run is
reseeded, so the three draw the same masks. 64 px images wherever a BatchNorm normalises the last stage (2x2
positions of 2 images: at 32 px it would see 2 values per channel, the ill-conditioned case tests/modelcheck.py rules
out); 32 px for the ConvNeXts (LayerNorm over channels). Batch 2, every kernel through the interpreter.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from modelcheck import BN_BWD, BN_EVAL, BN_TRAIN, LN, LN_BWD, compare_models, import_or_skip
from torch import nn

import fastattn
from fastattn.nn import activation_of


def check_patched(model: nn.Module, px: int, eval_kernels, train_kernels, kinks: bool = False
                  ) -> fastattn.PatchReport:
    """fastattn.patch(deepcopy(model)) against ``model`` (eval and a training step); returns the patch report.
    ``kinks``: ReLU-type activations throughout, so the training step runs ours in float64 (tests/modelcheck.py)."""
    model.eval()
    ours = fastattn.patch(copy.deepcopy(model))
    report = fastattn.patch_report(ours)
    compare_models(ours, model, (torch.randn(2, 3, px, px),), eval_kernels=eval_kernels, train_kernels=train_kernels,
                   seed=0, train_dtype=torch.float64 if kinks else torch.float32)
    return report


def expected_pairs(model: nn.Module) -> dict[str, str]:
    """Qualified BatchNorm name -> the activation class fused with it, for every BatchNorm2d directly followed by an
    activation fastattn fuses inside a Sequential (torchvision's Conv2dNormActivation, timm's deep stem) and every
    timm BatchNormAct2d with one; from the unpatched model's structure."""
    pairs = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            kids = list(m.named_children())
            for (a, bn), (_, act) in itertools.pairwise(kids):
                if type(bn) is nn.BatchNorm2d and type(act) is not nn.Identity and activation_of(act) is not None:
                    pairs[f"{name}.{a}" if name else a] = type(act).__name__
        elif type(m).__name__ == "BatchNormAct2d" and type(m.act) is not nn.Identity:
            pairs[name] = type(m.act).__name__
    return pairs


def assert_pairs_fused(report: fastattn.PatchReport, pairs: dict[str, str], residuals: int) -> None:
    fused = {e.name: e.detail for e in report.fused}
    for name, act in pairs.items():
        assert name in fused and f"BN + {act}" in fused[name], f"{name} (BN + {act}) not fused: {fused.get(name)}"
    adds = [e for e in report.fused if "add" in e.detail and "BatchNorm" not in e.module]  # the blocks
    assert len(adds) == residuals, f"{len(adds)} residual adds fused, expected {residuals}"


def _torchvision():
    tv = import_or_skip("torchvision")
    return tv


def _timm():
    return import_or_skip("timm")


TRAIN = BN_TRAIN + BN_BWD


def _residual_blocks(model: nn.Module, block: str) -> int:
    """How many ``block`` modules (a torchvision class path under ``torchvision.models``) fuse a residual add."""
    tv = _torchvision()
    module, _, name = block.rpartition(".")
    cls = getattr(getattr(tv.models, module), name)
    return sum(getattr(m, "use_res_connect", True) for m in model.modules() if type(m) is cls)


# (builder, activations of its BN pairs, the block whose residual is fused, ReLU-type kinks: tests/modelcheck.py)
TORCHVISION_BN = [
    ("efficientnet_b0", {"SiLU"}, "efficientnet.MBConv", False),  # stochastic depth 0.2, dropout 0.2 stay on
    ("mobilenet_v3_small", {"ReLU", "Hardswish"}, "mobilenetv3.InvertedResidual", True),
    ("mobilenet_v2", {"ReLU6"}, "mobilenetv2.InvertedResidual", True),
    ("regnet_y_400mf", {"ReLU"}, "regnet.ResBottleneckBlock", True),  # the last BN + shortcut + ReLU
]


@pytest.mark.parametrize("builder,acts,block,kinks", TORCHVISION_BN, ids=[c[0] for c in TORCHVISION_BN])
def test_torchvision_batch_norm_models(builder, acts, block, kinks):
    tv = _torchvision()
    model = getattr(tv.models, builder)(num_classes=5)
    report = check_patched(model, 64, BN_EVAL, TRAIN, kinks=kinks)
    pairs = expected_pairs(model)
    assert set(pairs.values()) == acts and len(pairs) > 10
    assert_pairs_fused(report, pairs, _residual_blocks(model, block))
    assert "SqueezeExcitation" in {e.module for e in report.left_alone} or builder == "mobilenet_v2"


def test_torchvision_convnext_tiny():
    tv = _torchvision()
    model = tv.models.convnext_tiny(num_classes=5)  # stochastic depth 0.1 stays on
    report = check_patched(model, 32, LN, LN + LN_BWD)
    norms2d = [n for n, m in model.named_modules() if type(m) is tv.models.convnext.LayerNorm2d]
    fused = {e.name: e.fused_as for e in report.fused}
    assert norms2d and all("LayerNorm2d" in fused[n] for n in norms2d)
    assert sum("FusedTorchvisionLayerNorm2d" in (e.fused_as or "") for e in report.fused) == len(norms2d)


def test_timm_efficientnet_b0():
    timm = _timm()
    model = timm.create_model("efficientnet_b0", num_classes=5, drop_rate=0.2)
    report = check_patched(model, 64, BN_EVAL, TRAIN)
    pairs = expected_pairs(model)
    assert set(pairs.values()) == {"SiLU"} and len(pairs) > 30
    blocks = timm.models._efficientnet_blocks
    residuals = sum(m.has_skip for m in model.modules()
                    if type(m) in (blocks.InvertedResidual, blocks.DepthwiseSeparableConv))
    assert_pairs_fused(report, pairs, residuals)
    assert "SqueezeExcite" in {e.module for e in report.left_alone}


def test_timm_resnet26d():
    timm = _timm()
    model = timm.create_model("resnet26d", num_classes=5)
    report = check_patched(model, 64, BN_EVAL, TRAIN, kinks=True)
    pairs = expected_pairs(model)  # the deep stem's two BN + ReLU
    assert list(pairs) == ["conv1.1", "conv1.4"]
    blocks = sum(type(m) is timm.models.resnet.Bottleneck for m in model.modules())  # BN + add + ReLU tails
    assert_pairs_fused(report, pairs, blocks)
    assert "stem" in {e.name: e.detail for e in report.fused}[""]  # the stem's bn1 + act1


def test_timm_convnext_atto():
    timm = _timm()
    model = timm.create_model("convnext_atto", num_classes=5)
    report = check_patched(model, 32, LN, LN + LN_BWD)
    norms2d = [n for n, m in model.named_modules() if type(m).__name__ == "LayerNorm2d"]
    assert norms2d and sum("FusedTimmLayerNorm2d" in (e.fused_as or "") for e in report.fused) == len(norms2d)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_stochastic_depth_and_drop_path_stay_torchs(training):
    """With stochastic depth (torchvision's MBConv) and drop path (timm's InvertedResidual) active, the patched block
    takes the library's own path: the same random draws give the same result as the unpatched block."""
    tv, timm = _torchvision(), _timm()
    blocks = [tv.models.efficientnet.MBConv(tv.models.efficientnet.MBConvConfig(1, 3, 1, 8, 8, 1), 0.5,
                                            nn.BatchNorm2d),
              timm.models._efficientnet_blocks.InvertedResidual(8, 8, exp_ratio=2.0, act_layer=nn.SiLU,
                                                                drop_path_rate=0.5)]
    for block in blocks:
        ours = fastattn.patch(copy.deepcopy(block))
        assert type(ours) is not type(block)
        x = torch.randn(4, 8, 5, 5)
        for m in (block, ours):
            m.train(training)
        outs = []
        for m in (block, ours):
            torch.manual_seed(3)
            outs.append(m(x))
        torch.testing.assert_close(outs[1], outs[0])  # fp32 both ways: BN kernels against torch's


def test_unpatch_pickle_options_and_hooks(tmp_path):
    """The new fused classes pickle (whole model) and unpatch exactly; the options and forward hooks leave modules
    alone, reported."""
    tv, timm = _torchvision(), _timm()
    cna = tv.ops.misc.Conv2dNormActivation
    model = nn.Sequential(cna(3, 8, activation_layer=nn.Hardswish), nn.Sequential(nn.BatchNorm2d(8), nn.GELU()),
                          timm.layers.BatchNormAct2d(8, act_layer=nn.LeakyReLU), tv.models.convnext.LayerNorm2d(8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    fastattn.patch(model)
    fused = {e.name: e.detail for e in fastattn.patch_report(model).fused}
    assert fused["0.1"] == "BN + Hardswish" and fused["1.0"] == "BN + GELU" and "LeakyReLU(0.01)" in fused["2"]
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        out = model.eval()(x)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    fastattn.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    off = fastattn.patch(copy.deepcopy(model), batch_norm=False, layer_norm=False)
    left = {e.name: e.detail for e in fastattn.patch_report(off).left_alone}
    assert left["0"] == left["1"] == left["2"] == "batch_norm=False" and left["3"] == "layer_norm=False"
    hooked = copy.deepcopy(model)
    hooked[0][2].register_forward_hook(lambda *a: None)
    fastattn.patch(hooked)
    assert "forward hooks" in {e.name: e.detail for e in fastattn.patch_report(hooked).left_alone}["0"]
