"""timm: ``LayerNorm``, ``Attention``, the ViT's ``Block`` and ``VisionTransformer``, the ResNets' ``BasicBlock``,
``Bottleneck`` and ``ResNet`` (stem), ``BatchNormAct2d`` and the EfficientNet blocks built on it
(``InvertedResidual``, ``DepthwiseSeparableConv``), and ConvNeXt's ``LayerNorm2d``; the squeeze-excitation modules
are left alone (reported).

Each fused class is ``FusedTimm<Class>(mixin, timm's class)``, built on first use and kept here
(``fastattn.patching.timm.FusedTimmBlock``), where pickling finds it. The mixin replaces one method, whose timm
signature is checked first (tested with timm 1.0.31):

- ``LayerNorm.forward``: ``fastattn.nn.LayerNorm``'s (so a ``Block`` fuses its residual add into it).
- ``Attention.forward``: the same projections, qk-norm, gate and scale-norm around
  ``fastattn.scaled_dot_product_attention`` (``is_causal`` takes precedence over ``attn_mask``, as timm documents).
- ``Block.forward``: the attention branch (after LayerScale ``ls1`` and ``drop_path1``) added to the residual
  inside ``norm2``.
- ``VisionTransformer.forward_features``: ``patch_embed`` + ``_pos_embed`` (class token, ``no_embed_class``, no
  register tokens, a fixed image size) in one ``patch_embed``.
- ``BasicBlock`` / ``Bottleneck.forward`` and ``ResNet.forward_features`` (the stem): each BN + ReLU, and the
  block's tail BN + add + ReLU, as one ``fastattn.nn.BatchNormAddReLU``.
- ``BatchNormAct2d.forward``: BN + its ``act`` as one ``fastattn.batch_norm_act`` (an optional ``identity`` added
  before the activation, for the blocks below).
- ``InvertedResidual`` / ``DepthwiseSeparableConv.forward``: the last BN + the residual add as one op while the
  block's ``drop_path`` is off (eval, or rate 0); otherwise timm's own path, drop path included.
- ``LayerNorm2d.forward``: ``fastattn.layer_norm2d`` (the channel dim at stride H*W, no permuted copy).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

import fastattn
from fastattn.nn import (
    ACTIVATION_MODULES,
    FusedBatchNorm,
    LayerNorm,
    LayerNorm2d,
    activation_of,
    add_then_norm,
    bn_add,
    bn_forward,
    bn_relu,
)
from fastattn.patching.checks import (
    BLOCK_BNS,
    BOTTLENECK_BNS,
    STEM_BNS,
    act_label,
    child,
    exact,
    identity,
    no_hooks,
    norm_detail,
    norm_kernel,
    patchify,
    relu_block,
)
from fastattn.patching.rules import REGISTRY, Options, Rule, Skip, Swap, fused_class_getattr, register
from fastattn.patching.wrappers import SHARDED, sharded

__getattr__ = fused_class_getattr(__name__)  # the fused classes, built on first access (also when unpickling)


class _TimmLayerNorm(LayerNorm):
    """timm ``LayerNorm``: ``fastattn.nn.LayerNorm``'s forward (a ``Block`` fuses its residual add into it)."""


class _TimmAttention:
    """timm ``Attention``: its forward with ``fastattn.scaled_dot_product_attention``. ``is_causal`` takes precedence
    over ``attn_mask``, as timm documents."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                                   # (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        x = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=None if is_causal else attn_mask,
                                                  is_causal=is_causal,
                                                  dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, getattr(self, "attn_dim", C)))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class _TimmBlock:
    """timm ``Block``: the attention branch (after ``ls1``, ``drop_path1``) added to the residual inside ``norm2``."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        a = self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        h, x = add_then_norm(self.norm2, a, x)
        return x + self.drop_path2(self.ls2(self.mlp(h)))


class _TimmVisionTransformer:
    """timm ``VisionTransformer.forward_features`` with ``patch_embed`` + ``_pos_embed`` in one ``fastattn.patch_embed``
    (class token, ``no_embed_class``, no register tokens, fixed image size)."""

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        pe = self.patch_embed
        _, _, H, W = x.shape
        if pe.img_size is not None and pe.strict_img_size:
            torch._assert(H == pe.img_size[0], f"Input height ({H}) doesn't match model ({pe.img_size[0]}).")
            torch._assert(W == pe.img_size[1], f"Input width ({W}) doesn't match model ({pe.img_size[1]}).")
        x = fastattn.patch_embed(x, pe.proj.weight, pe.proj.bias, self.pos_embed, self.cls_token)
        x = self.norm_pre(self.patch_drop(self.pos_drop(x)))
        if attn_mask is not None or is_causal:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            x = sys.modules["timm.models.vision_transformer"].checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


class _TimmBasicBlock:
    """timm ``BasicBlock``: ``bn1`` + ReLU (before ``aa``), then ``bn2`` + the shortcut + ReLU, each one fused op."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.aa(bn_relu(self.bn1, self.conv1(x)))
        return bn_relu(self.bn2, self.conv2(x), shortcut)


class _TimmBottleneck:
    """timm ``Bottleneck``: ``bn1`` and ``bn2`` + ReLU (``aa`` after ``bn2``), then ``bn3`` + the shortcut + ReLU,
    each one fused op."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = bn_relu(self.bn1, self.conv1(x))
        x = self.aa(bn_relu(self.bn2, self.conv2(x)))
        return bn_relu(self.bn3, self.conv3(x), shortcut)


class _TimmResNet:
    """timm ``ResNet.forward_features``: the stem's ``bn1`` + ReLU as one fused op (the blocks are patched on their
    own), ``grad_checkpointing`` as timm."""

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(bn_relu(self.bn1, self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            layers = [self.layer1, self.layer2, self.layer3, self.layer4]
            return sys.modules["timm.models.resnet"].checkpoint_seq(layers, x, flatten=True)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class _TimmBatchNormAct2d(FusedBatchNorm):
    """timm ``BatchNormAct2d``: BN + ``act`` as one ``fastattn.batch_norm_act``; ``forward(x, identity=None)`` adds
    ``identity`` before the activation (the blocks fuse their residual into a BN whose ``act`` is the identity)."""

    def forward(self, x: Tensor, identity: Tensor | None = None) -> Tensor:
        activation, slope = activation_of(self.act)
        return bn_forward(self, x, identity, activation, slope)


def _path_kept(drop_path: nn.Module, training: bool) -> bool:
    """timm's ``drop_path`` passes its input through: an ``nn.Identity``, or a ``DropPath`` in eval or at rate 0."""
    return type(drop_path) is nn.Identity or not training or drop_path.drop_prob == 0.0


class _TimmInvertedResidual:
    """timm ``InvertedResidual`` (MBConv): ``bn3`` + the residual add as one op while ``drop_path`` is off."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        if self.conv_s2d is not None:
            x = self.bn_s2d(self.conv_s2d(x))
        x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        x = self.conv_pwl(self.se(self.aa(x)))
        if self.has_skip and _path_kept(self.drop_path, self.training):
            return bn_add(self.bn3, x, shortcut)
        x = self.bn3(x)
        return self.drop_path(x) + shortcut if self.has_skip else x


class _TimmDepthwiseSeparableConv:
    """timm ``DepthwiseSeparableConv``: ``bn2`` + the residual add as one op while ``drop_path`` is off."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        if self.conv_s2d is not None:
            x = self.bn_s2d(self.conv_s2d(x))
        x = self.conv_pw(self.se(self.aa(self.bn1(self.conv_dw(x)))))
        if self.has_skip and _path_kept(self.drop_path, self.training):
            return bn_add(self.bn2, x, shortcut)
        x = self.bn2(x)
        return self.drop_path(x) + shortcut if self.has_skip else x


class _TimmLayerNorm2d(LayerNorm2d):
    """timm ``LayerNorm2d``: ``fastattn.layer_norm2d``, no permuted copy."""


def _attention(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    exact(m, "attn_drop", nn.Dropout, "nn.Dropout")
    return [rule.swap(name, m, "attention kernel")]


def _block(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    return [rule.swap(name, m, f"attention-branch residual add + norm2 {norm_detail(m.norm2)}")]


def _vit(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    pe = m.patch_embed
    timm_pe = sys.modules.get("timm.layers.patch_embed")
    if sharded(pe):
        raise Skip(f"patch_embed is {SHARDED}")
    if timm_pe is None or type(pe) is not timm_pe.PatchEmbed:
        raise Skip(f"patch_embed is {type(pe).__qualname__}, not timm's PatchEmbed")
    patchify(pe.proj, "patch_embed.proj")
    identity(pe, "norm", "a norm after the patch projection is not fused")
    if not getattr(pe, "flatten", False) or getattr(pe, "dynamic_img_pad", False):
        raise Skip("patch_embed does not flatten to tokens, or pads images dynamically")
    if m.dynamic_img_size:
        raise Skip("dynamic_img_size=True (position embeddings resampled per image size)")
    if m.reg_token is not None:
        raise Skip("register tokens are not fused")
    if m.pos_embed is not None:
        n = pe.num_patches
        rows = n + (1 if m.cls_token is not None and not m.no_embed_class else 0)
        if m.pos_embed.shape[-2] != rows:
            raise Skip(f"pos_embed has {m.pos_embed.shape[-2]} rows, not the {rows} of a fixed {pe.grid_size} grid")
    no_hooks(m, ("patch_embed",))
    no_hooks(pe, ("proj",))
    return [rule.swap(name, m, "patch_embed + class token + pos_embed in one patch_embed kernel")]


def _nothing_before_the_add(m: nn.Module) -> None:
    identity(m, "drop_block", "it runs between the BN and its ReLU")
    if getattr(m, "se", None) is not None:
        raise Skip(f"an attention module ({type(m.se).__qualname__}) sits between the last BN and the add")
    if getattr(m, "drop_path", None) is not None:
        raise Skip("drop_path sits between the last BN and the add")


def _bn_act(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    identity(m, "drop", "it runs between the BN and its activation")
    if activation_of(m.act) is None:
        raise Skip(f"act is {type(m.act).__qualname__}, not an activation fastattn fuses")
    no_hooks(m, ("drop", "act"))
    return [rule.swap(name, m, f"BN + {act_label(m.act)} fused")]


def _residual_bn(bn_attr: str):
    """The check of a timm EfficientNet block whose last BN (``bn_attr``, a BatchNormAct2d without activation) the
    residual add is fused into."""
    def check(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
        if not m.has_skip:
            return []  # no residual: its BatchNormAct2d layers are fused on their own
        bn = getattr(m, bn_attr)
        norm_act = sys.modules["timm.layers.norm_act"].BatchNormAct2d
        exact(m, bn_attr, norm_act, "timm's BatchNormAct2d")
        if type(bn.act) is not nn.Identity:
            raise Skip(f"{bn_attr} applies {type(bn.act).__qualname__} before the residual add")
        exact(m, "drop_path", (nn.Identity, sys.modules["timm.layers.drop"].DropPath), "nn.Identity or DropPath")
        bn_rule = REGISTRY.rule_for(bn)
        return [rule.swap(name, m, f"{bn_attr} + add fused (drop_path off: eval, or rate 0)")] + \
            bn_rule.plan(child(name, bn_attr), bn, opts)
    return check


_SE = ("squeeze-excitation: a global pool, two 1x1 convs and a gate that multiplies the feature map; nothing "
       "fastattn fuses, so it stays timm's (the convs and BatchNorms around it are fused on their own)")


def _se(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    raise Skip(_SE)


_VIT = "timm.models.vision_transformer"
_RESNET = "timm.models.resnet"
_EFFNET = "timm.models._efficientnet_blocks"
_TOKENS = ("x", "attn_mask", "is_causal")
register(
    Rule("timm", "timm.layers.norm.LayerNorm", norm_kernel, option="layer_norm", mixin=_TimmLayerNorm, params=("x",)),
    Rule("timm", "timm.layers.attention.Attention", _attention, option="attention", mixin=_TimmAttention,
         params=_TOKENS),
    Rule("timm", f"{_VIT}.Block", _block, option="layer_norm", mixin=_TimmBlock, params=_TOKENS),
    Rule("timm", f"{_VIT}.VisionTransformer", _vit, option="patch_embed", mixin=_TimmVisionTransformer,
         method="forward_features", params=_TOKENS),
    Rule("timm", f"{_RESNET}.BasicBlock", relu_block(("act1", "act2"), BLOCK_BNS, also=_nothing_before_the_add),
         option="batch_norm", mixin=_TimmBasicBlock, params=("x",)),
    Rule("timm", f"{_RESNET}.Bottleneck",
         relu_block(("act1", "act2", "act3"), BOTTLENECK_BNS, also=_nothing_before_the_add),
         option="batch_norm", mixin=_TimmBottleneck, params=("x",)),
    Rule("timm", f"{_RESNET}.ResNet", relu_block(("act1",), STEM_BNS, "stem BN + ReLU fused"), option="batch_norm",
         mixin=_TimmResNet, method="forward_features", params=("x",)),
    Rule("timm", "timm.layers.norm_act.BatchNormAct2d", _bn_act, option="batch_norm", mixin=_TimmBatchNormAct2d,
         params=("x",)),
    Rule("timm", f"{_EFFNET}.InvertedResidual", _residual_bn("bn3"), option="batch_norm",
         mixin=_TimmInvertedResidual, params=("x",)),
    Rule("timm", f"{_EFFNET}.DepthwiseSeparableConv", _residual_bn("bn2"), option="batch_norm",
         mixin=_TimmDepthwiseSeparableConv, params=("x",)),
    Rule("timm", "timm.layers.norm.LayerNorm2d", norm_kernel, option="layer_norm", mixin=_TimmLayerNorm2d,
         params=("x",)),
    Rule("timm", f"{_EFFNET}.SqueezeExcite", _se, left_alone=_SE),
    Rule("timm", "timm.layers.squeeze_excite.SEModule", _se, left_alone=_SE),
    Rule("timm", "timm.layers.patch_embed.PatchEmbed"),  # containers: their children are patched on their own
    Rule("timm", "timm.layers.mlp.Mlp"),
    Rule("timm", "timm.models.convnext.ConvNeXtBlock"),
    Rule("timm", "timm.layers.classifier.NormMlpClassifierHead"),
)
# timm's own activation classes that batch_norm_act computes (create_act_layer returns torch's for the others)
ACTIVATION_MODULES["timm.layers.activations.GELU"] = lambda m: ("gelu", 0.0)
ACTIVATION_MODULES["timm.layers.activations.GELUTanh"] = lambda m: ("gelu_tanh", 0.0)
