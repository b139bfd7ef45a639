"""fastattn's own reference models (``fastattn.models``): patching one built with ``fused=False`` gives the modules
it has when built with ``fused=True``.

- ``models.MultiHeadAttention`` -> ``models.FusedMultiHeadAttention`` (the same module calling
  ``fastattn.scaled_dot_product_attention``);
- the ViT's patchify ``nn.Conv2d`` -> ``fastattn.nn.PatchEmbed`` (projection, class token and position embedding in
  one kernel);
- the ResNets' BatchNorms followed by a ReLU -> ``fastattn.nn.BatchNormAddReLU``.

Their norms are ``nn.LayerNorm`` (the torch.nn rules swap them) and their blocks are written against
``fastattn.nn.add_norm`` / ``add_then_norm`` / ``bn_relu``, so nothing else needs a fused class.
"""

from __future__ import annotations

from torch import nn

from fastattn.models import FusedMultiHeadAttention
from fastattn.nn import PatchEmbed
from fastattn.patching.checks import BLOCK_BNS, BOTTLENECK_BNS, STEM_BNS, bn_swaps, child, patchify
from fastattn.patching.rules import REGISTRY, Options, Rule, Swap, register


def _attention(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    return [rule.swap(name, m, "attention kernel")]


def _vit(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
    if isinstance(m.patch_embed, PatchEmbed):
        return []
    patchify(m.patch_embed, "patch_embed")
    return [Swap(child(name, "patch_embed"), m.patch_embed, PatchEmbed,
                 "projection + class token + pos_embed in one patch_embed kernel")]


def _bns(bns: dict[str, str]):
    def check(rule: Rule, name: str, m: nn.Module, opts: Options) -> list[Swap]:
        return bn_swaps(name, m, bns)
    return check


register(
    Rule("fastattn", "fastattn.models.layers.MultiHeadAttention", _attention, option="attention",
         fused=FusedMultiHeadAttention),
    Rule("fastattn", "fastattn.models.vit.VisionTransformer", _vit, option="patch_embed"),
    Rule("fastattn", "fastattn.models.resnet.BasicBlock", _bns(BLOCK_BNS), option="batch_norm"),
    Rule("fastattn", "fastattn.models.resnet.Bottleneck", _bns(BOTTLENECK_BNS), option="batch_norm"),
    Rule("fastattn", "fastattn.models.resnet.ResNet", _bns(STEM_BNS), option="batch_norm"),
    Rule("fastattn", "fastattn.models.vit.Block"),  # containers: their children are patched on their own
    Rule("fastattn", "fastattn.models.transformer.Transformer"),
    Rule("fastattn", "fastattn.models.transformer.EncoderLayer"),
    Rule("fastattn", "fastattn.models.transformer.DecoderLayer"),
)
REGISTRY.add_built_fused(FusedMultiHeadAttention)
