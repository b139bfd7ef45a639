"""torchvision: ViT's ``EncoderBlock`` and ``VisionTransformer``, the ResNets' ``BasicBlock``, ``Bottleneck`` and
``ResNet`` (stem), the CNNs' ``Conv2dNormActivation`` and block tails (EfficientNet's ``MBConv``, MobileNetV2/V3's
``InvertedResidual``, RegNet's ``ResBottleneckBlock``) and ConvNeXt's ``LayerNorm2d``; ``SqueezeExcitation`` is
left alone (reported).

Each fused class is ``Fused<Torchvision><Class>(mixin, torchvision's class)``, built on first use and kept here
(``fastattn.patching.torchvision.FusedTorchvisionBasicBlock``), where pickling finds it. The mixin replaces one
method, whose torchvision signature is checked first (tested with torchvision 0.28):

- ``EncoderBlock.forward``: the attention branch's dropout + residual add fused into ``ln_2``.
- ``VisionTransformer.forward``: ``conv_proj`` + class token + ``encoder.pos_embedding`` in one ``patch_embed``.
- ``BasicBlock`` / ``Bottleneck.forward`` and ``ResNet._forward_impl`` (the stem): each BN + ReLU, and the block's
  tail BN + add + ReLU, as one ``fastattn.nn.BatchNormAddReLU``.
- ``Conv2dNormActivation`` (and RegNet's ``SimpleStemIN``): Sequential's forward with its BN + activation (ReLU,
  ReLU6, SiLU, Hardswish, Hardsigmoid, GELU, LeakyReLU) as one ``fastattn.nn.BatchNormAct2d`` op.
- ``MBConv`` / ``InvertedResidual.forward``: the projection's BN + the residual add as one op (MBConv: when its
  stochastic depth is off, i.e. in eval or at p = 0; otherwise torchvision's own path, stochastic depth included).
- ``ResBottleneckBlock.forward``: the last BN + the shortcut + the block's activation as one op.
- ``LayerNorm2d.forward``: ``fastattn.layer_norm2d`` (the channel dim at stride H*W, no permuted copy).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

import fastattn
from fastattn.nn import BatchNormAct2d, LayerNorm2d, activation_of, add_then_norm, bn_act, bn_relu, run_sequential
from fastattn.patching.checks import (
    BLOCK_BNS,
    BOTTLENECK_BNS,
    STEM_BNS,
    act_label,
    bn_swaps,
    child,
    exact,
    no_hooks,
    norm_detail,
    norm_kernel,
    patchify,
    relu_block,
    sequential,
)
from fastattn.patching.rules import Options, Rule, Skip, Swap, fused_class_getattr, register

__getattr__ = fused_class_getattr(__name__)  # the fused classes, built on first access (also when unpickling)


class _TVEncoderBlock:
    """torchvision ViT ``EncoderBlock``: attention-branch dropout + residual add fused into ``ln_2``."""

    def forward(self, input: Tensor) -> Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        h = self.ln_1(input)
        a, _ = self.self_attention(h, h, h, need_weights=False)
        h, x = add_then_norm(self.ln_2, a, input, self.dropout)
        return x + self.mlp(h)


class _TVVisionTransformer:
    """torchvision ``VisionTransformer``: ``conv_proj`` + flatten + class token + ``encoder.pos_embedding`` in one
    ``fastattn.patch_embed``; then ``encoder.dropout``, ``encoder.layers``, ``encoder.ln`` and ``heads`` as torch."""

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        enc = self.encoder
        x = fastattn.patch_embed(x, self.conv_proj.weight, self.conv_proj.bias, enc.pos_embedding, self.class_token)
        x = enc.ln(enc.layers(enc.dropout(x)))
        return self.heads(x[:, 0])


class _TVBasicBlock:
    """torchvision ``BasicBlock``: ``bn1`` + ReLU, then ``bn2`` + the shortcut + ReLU, each one fused op."""

    def forward(self, x: Tensor) -> Tensor:
        out = bn_relu(self.bn1, self.conv1(x))
        out = self.conv2(out)
        identity = x if self.downsample is None else self.downsample(x)
        return bn_relu(self.bn2, out, identity)


class _TVBottleneck:
    """torchvision ``Bottleneck`` (stride on the 3x3 conv): ``bn1`` and ``bn2`` + ReLU, then ``bn3`` + the shortcut
    + ReLU, each one fused op."""

    def forward(self, x: Tensor) -> Tensor:
        out = bn_relu(self.bn1, self.conv1(x))
        out = bn_relu(self.bn2, self.conv2(out))
        out = self.conv3(out)
        identity = x if self.downsample is None else self.downsample(x)
        return bn_relu(self.bn3, out, identity)


class _TVResNet:
    """torchvision ``ResNet``: the stem's ``bn1`` + ReLU as one fused op (the blocks are patched on their own)."""

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.maxpool(bn_relu(self.bn1, self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _TVSequential:
    """torchvision's ``Conv2dNormActivation`` (a Sequential): its BN + activation as one fused op."""

    def forward(self, input: Tensor) -> Tensor:
        return run_sequential(self, input)


def _tail(layers, x: Tensor, identity: Tensor, act: nn.Module | None = None) -> Tensor:
    """Run ``layers`` (a Sequential) whose last layer is a (conv, BN) Conv2dNormActivation, the residual ``identity``
    (and ``act``) fused into that BN."""
    *body, (conv, bn) = layers
    for layer in body:
        x = layer(x)
    return bn_act(bn, conv(x), act, identity)


class _TVMBConv:
    """torchvision ``MBConv``: the projection's BN + the residual add as one op while stochastic depth is off."""

    def forward(self, input: Tensor) -> Tensor:
        if self.use_res_connect and not (self.training and self.stochastic_depth.p > 0.0):
            return _tail(self.block, input, input)
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class _TVInvertedResidualV2:
    """torchvision MobileNetV2 ``InvertedResidual``: the projection's BN + the residual add as one op."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.use_res_connect:
            return self.conv(x)
        *body, bn = self.conv
        h = x
        for layer in body:
            h = layer(h)
        return bn_act(bn, h, None, x)


class _TVInvertedResidualV3:
    """torchvision MobileNetV3 ``InvertedResidual``: the projection's BN + the residual add as one op."""

    def forward(self, input: Tensor) -> Tensor:
        return _tail(self.block, input, input) if self.use_res_connect else self.block(input)


class _TVResBottleneckBlock:
    """torchvision RegNet ``ResBottleneckBlock``: ``f``'s last BN + the shortcut + ``activation`` as one op."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.proj(x) if self.proj is not None else x
        return _tail(self.f, x, shortcut, self.activation)


class _TVLayerNorm2d(LayerNorm2d):
    """torchvision ConvNeXt ``LayerNorm2d``: ``fastattn.layer_norm2d``, no permuted copy."""


def _encoder_block(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    return [rule.swap(name, m, f"dropout + residual add + ln_2 {norm_detail(m.ln_2)}")]


def _vit(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    patchify(m.conv_proj, "conv_proj (conv_stem_configs)")
    exact(m, "encoder", sys.modules["torchvision.models.vision_transformer"].Encoder, "torchvision's Encoder")
    no_hooks(m, ("conv_proj", "encoder"))
    return [rule.swap(name, m, "conv_proj + class token + pos_embedding in one patch_embed kernel")]


_SE = ("squeeze-excitation: a global pool, two 1x1 convs and a gate that multiplies the feature map; nothing "
       "fastattn fuses, so it stays torchvision's (the convs and BatchNorms around it are fused on their own)")


def _left_alone(reason: str):
    def check(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
        raise Skip(reason)
    return check


def _conv_bn(layer: nn.Module, what: str) -> nn.Module:
    """``layer`` is exactly torchvision's Conv2dNormActivation of an nn.Conv2d and an nn.BatchNorm2d (no
    activation): its BN, into which a block fuses its residual add."""
    cna = sys.modules["torchvision.ops.misc"].Conv2dNormActivation
    if type(layer) is not cna or len(layer) != 2 or type(layer[0]) is not nn.Conv2d:
        raise Skip(f"{what} is not a Conv2dNormActivation of a Conv2d and a BatchNorm2d")
    return layer[1]


def _tail_swaps(rule: Rule, name: str, m: nn.Module, seq_attr: str, detail: str, conv_bn_last: bool = True
                ) -> list[Swap]:
    """The block and the BN its fused forward adds the residual into: the last BN of ``m.<seq_attr>``, inside its
    last layer (a (conv, BN) Conv2dNormActivation) or, ``conv_bn_last=False``, that last layer itself."""
    seq = getattr(m, seq_attr)
    last = list(seq._modules)[-1]
    no_hooks(m, (seq_attr,))  # their forwards are bypassed
    if conv_bn_last:
        no_hooks(seq, (last,))
        owner, owner_name, bn_attr = seq[-1], child(name, f"{seq_attr}.{last}"), "1"
    else:
        owner, owner_name, bn_attr = seq, child(name, seq_attr), last
    return [rule.swap(name, m, detail)] + bn_swaps(owner_name, owner, {bn_attr: detail}, BatchNormAct2d)


def _mbconv(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    if not m.use_res_connect:
        return []  # no residual: its layers are fused on their own
    exact(m, "stochastic_depth", sys.modules["torchvision.ops.stochastic_depth"].StochasticDepth, "StochasticDepth")
    _conv_bn(m.block[-1], "block's last layer")
    return _tail_swaps(rule, name, m, "block", "BN + add fused (in eval, or with stochastic depth 0)")


def _inverted_residual_v2(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    if not m.use_res_connect:
        return []
    if len(m.conv) < 2 or type(m.conv[-2]) is not nn.Conv2d:
        raise Skip("conv does not end in a Conv2d and its BatchNorm2d")
    return _tail_swaps(rule, name, m, "conv", "BN + add fused", conv_bn_last=False)


def _inverted_residual_v3(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    if not m.use_res_connect:
        return []
    _conv_bn(m.block[-1], "block's last layer")
    return _tail_swaps(rule, name, m, "block", "BN + add fused")


def _res_bottleneck(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    if activation_of(m.activation) is None:
        raise Skip(f"activation is {type(m.activation).__qualname__}, not an activation fastattn fuses")
    _conv_bn(m.f[-1], "f's last layer")
    no_hooks(m, ("activation",))
    return _tail_swaps(rule, name, m, "f", f"BN + add + {act_label(m.activation)} fused")


_VIT = "torchvision.models.vision_transformer"
_RESNET = "torchvision.models.resnet"
register(
    Rule("torchvision", f"{_VIT}.EncoderBlock", _encoder_block, option="layer_norm", mixin=_TVEncoderBlock,
         params=("input",)),
    Rule("torchvision", f"{_VIT}.VisionTransformer", _vit, option="patch_embed", mixin=_TVVisionTransformer,
         params=("x",)),
    Rule("torchvision", f"{_RESNET}.BasicBlock", relu_block(("relu",), BLOCK_BNS), option="batch_norm",
         mixin=_TVBasicBlock, params=("x",)),
    Rule("torchvision", f"{_RESNET}.Bottleneck", relu_block(("relu",), BOTTLENECK_BNS), option="batch_norm",
         mixin=_TVBottleneck, params=("x",)),
    Rule("torchvision", f"{_RESNET}.ResNet", relu_block(("relu",), STEM_BNS, "stem BN + ReLU fused"),
         option="batch_norm", mixin=_TVResNet, method="_forward_impl", params=("x",)),
    Rule("torchvision", "torchvision.ops.misc.Conv2dNormActivation", sequential, mixin=_TVSequential,
         params=("input",)),
    Rule("torchvision", "torchvision.models.regnet.SimpleStemIN", sequential, mixin=_TVSequential, params=("input",)),
    Rule("torchvision", "torchvision.models.efficientnet.MBConv", _mbconv, option="batch_norm", mixin=_TVMBConv,
         params=("input",)),
    Rule("torchvision", "torchvision.models.mobilenetv2.InvertedResidual", _inverted_residual_v2, option="batch_norm",
         mixin=_TVInvertedResidualV2, params=("x",), fused_name="FusedTorchvisionInvertedResidualV2"),
    Rule("torchvision", "torchvision.models.mobilenetv3.InvertedResidual", _inverted_residual_v3, option="batch_norm",
         mixin=_TVInvertedResidualV3, params=("input",), fused_name="FusedTorchvisionInvertedResidualV3"),
    Rule("torchvision", "torchvision.models.regnet.ResBottleneckBlock", _res_bottleneck, option="batch_norm",
         mixin=_TVResBottleneckBlock, params=("x",)),
    Rule("torchvision", "torchvision.models.convnext.LayerNorm2d", norm_kernel, option="layer_norm",
         mixin=_TVLayerNorm2d, params=("x",)),
    Rule("torchvision", "torchvision.ops.misc.SqueezeExcitation", _left_alone(_SE), left_alone=_SE),
    Rule("torchvision", f"{_VIT}.Encoder"),  # containers: their children are patched on their own
    Rule("torchvision", f"{_VIT}.MLPBlock"),
    Rule("torchvision", "torchvision.models.regnet.BottleneckTransform"),
    Rule("torchvision", "torchvision.models.convnext.CNBlock"),
)
