"""torchvision: the ViT's ``EncoderBlock`` and ``VisionTransformer``, the ResNets' ``BasicBlock``, ``Bottleneck`` and
``ResNet`` (stem).

Each fused class is ``Fused<Torchvision><Class>(mixin, torchvision's class)``, built on first use and kept here
(``fastattn.patching.torchvision.FusedTorchvisionBasicBlock``), where pickling finds it. The mixin replaces one
method, whose torchvision signature is checked first (tested with torchvision 0.28):

- ``EncoderBlock.forward``: the attention branch's dropout + residual add fused into ``ln_2``.
- ``VisionTransformer.forward``: ``conv_proj`` + class token + ``encoder.pos_embedding`` in one ``patch_embed``.
- ``BasicBlock`` / ``Bottleneck.forward`` and ``ResNet._forward_impl`` (the stem): each BN + ReLU, and the block's
  tail BN + add + ReLU, as one ``fastattn.nn.BatchNormAddReLU``.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

import fastattn
from fastattn.nn import add_then_norm, bn_relu
from fastattn.patching.checks import (
    BLOCK_BNS,
    BOTTLENECK_BNS,
    STEM_BNS,
    exact,
    no_hooks,
    norm_detail,
    patchify,
    relu_block,
)
from fastattn.patching.rules import Options, Rule, Swap, fused_class_getattr, register

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


def _encoder_block(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    return [rule.swap(name, m, f"dropout + residual add + ln_2 {norm_detail(m.ln_2)}")]


def _vit(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    patchify(m.conv_proj, "conv_proj (conv_stem_configs)")
    exact(m, "encoder", sys.modules["torchvision.models.vision_transformer"].Encoder, "torchvision's Encoder")
    no_hooks(m, ("conv_proj", "encoder"))
    return [rule.swap(name, m, "conv_proj + class token + pos_embedding in one patch_embed kernel")]


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
    Rule("torchvision", f"{_VIT}.Encoder"),  # containers: their children are patched on their own
    Rule("torchvision", f"{_VIT}.MLPBlock"),
)
