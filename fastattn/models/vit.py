"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021), with fastattn's fused ops
as switchable layers.

- Patch embedding: a ``P x P`` convolution with stride ``P`` flattened to tokens, a learnt class token prepended,
  learnt position embeddings added, dropout (eq. 1).
- ``depth`` pre-norm blocks: ``x = x + MSA(LN(x))``, ``x = x + MLP(LN(x))`` with a GELU MLP (eq. 2-3).
- A final LayerNorm and a linear head on the class token (eq. 4).

``fused=True`` builds it from ``fastattn.nn.PatchEmbed`` (projection, class token and position embedding in one
kernel), ``fastattn.nn.LayerNorm`` (the residual add of the attention branch fused into the second norm) and
:class:`~fastattn.models.layers.FusedMultiHeadAttention`; ``fused=False`` from ``nn.Conv2d``, ``nn.LayerNorm`` and
:class:`~fastattn.models.layers.MultiHeadAttention`. Both have the same parameters and ``state_dict``.
Configs: :func:`vit_tiny` (ViT-Ti/16), :func:`vit_small`, :func:`vit_base`, :func:`vit_large`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

import fastattn.nn as fnn
from fastattn.models.layers import FeedForward, FusedMultiHeadAttention, MultiHeadAttention
from fastattn.nn import add_then_norm


class Block(nn.Module):
    """Pre-norm encoder block: ``x = x + drop(MSA(LN1(x)))``, then ``x = x + drop(MLP(LN2(x)))``.

    The first residual add is fused into ``norm2`` (``add_then_norm``); the second is a plain add (the next block's
    contract is ``x -> x``).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 attn_dropout: float = 0.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 attn_layer: Callable[..., nn.Module] = MultiHeadAttention) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads, dropout=attn_dropout)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = norm_layer(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), activation=nn.GELU, dropout=dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h, x = add_then_norm(self.norm2, self.attn(self.norm1(x)), x, self.drop1)   # (B, 1 + N, dim)
        return x + self.drop2(self.mlp(h))


class VisionTransformer(nn.Module):
    """ViT classifier on the class token. ``img_size`` must be a multiple of ``patch_size``."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, attn_dropout: float = 0.0, fused: bool = True,
                 norm_layer: Callable[[int], nn.Module] | None = None,
                 attn_layer: Callable[..., nn.Module] | None = None,
                 embed_layer: Callable[..., nn.Module] | None = None, block: Callable[..., nn.Module] = Block) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"VisionTransformer: img_size {img_size} must be a multiple of patch_size {patch_size}")
        norm_layer = norm_layer or partial(fnn.LayerNorm if fused else nn.LayerNorm, eps=1e-6)
        attn_layer = attn_layer or (FusedMultiHeadAttention if fused else MultiHeadAttention)
        embed_layer = embed_layer or (fnn.PatchEmbed if fused else nn.Conv2d)
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = embed_layer(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[block(embed_dim, num_heads, mlp_ratio, dropout, attn_dropout, norm_layer,
                                            attn_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def embed(self, images: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> tokens ``(B, 1 + N, D)``: [class token, patches] + position embedding."""
        if isinstance(self.patch_embed, fnn.PatchEmbed):
            x = self.patch_embed(images, pos_embed=self.pos_embed, cls_token=self.cls_token)
        else:
            x = self.patch_embed(images).flatten(2).transpose(1, 2)                     # (B, N, D)
            x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1) + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, images: Tensor) -> Tensor:
        return self.norm(self.blocks(self.embed(images)))                              # (B, 1 + N, D)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images)[:, 0])                          # (B, num_classes)


def _vit(embed_dim: int, depth: int, num_heads: int, **kwargs) -> VisionTransformer:
    return VisionTransformer(**{"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, **kwargs})


def vit_tiny(**kwargs) -> VisionTransformer:
    """ViT-Ti/16: width 192, depth 12, 3 heads (DeiT-Ti)."""
    return _vit(192, 12, 3, **kwargs)


def vit_small(**kwargs) -> VisionTransformer:
    """ViT-S/16: width 384, depth 12, 6 heads."""
    return _vit(384, 12, 6, **kwargs)


def vit_base(**kwargs) -> VisionTransformer:
    """ViT-B/16: width 768, depth 12, 12 heads."""
    return _vit(768, 12, 12, **kwargs)


def vit_large(**kwargs) -> VisionTransformer:
    """ViT-L/16: width 1024, depth 24, 16 heads."""
    return _vit(1024, 24, 16, **kwargs)
