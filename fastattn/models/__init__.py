"""Reference models written to read like their papers, with fastattn's fused ops as switchable layers.

``fused=True`` (the default) builds them from fastattn's fused layers, ``fused=False`` from torch's; both have the
same parameters and ``state_dict``, so weights move between them (and into a ``fastattn.patch``-ed copy) as they are.

- :class:`Transformer`: the encoder-decoder of "Attention Is All You Need", with cached greedy ``generate``.
- :class:`VisionTransformer`: ViT with pre-norm blocks, class token, learnt positions (``vit_tiny`` ... ``vit_large``).
- :class:`ResNet`: BasicBlock / Bottleneck ResNets with torchvision's parameter names (``resnet18/34/50``).
"""

from fastattn.models.layers import FeedForward, FusedMultiHeadAttention, MultiHeadAttention, Varlen
from fastattn.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from fastattn.models.transformer import DecoderLayer, EncoderLayer, Transformer
from fastattn.models.vit import Block, VisionTransformer, vit_base, vit_large, vit_small, vit_tiny

__all__ = [
    "BasicBlock",
    "Block",
    "Bottleneck",
    "DecoderLayer",
    "EncoderLayer",
    "FeedForward",
    "FusedMultiHeadAttention",
    "MultiHeadAttention",
    "ResNet",
    "Transformer",
    "Varlen",
    "VisionTransformer",
    "resnet18",
    "resnet34",
    "resnet50",
    "vit_base",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
