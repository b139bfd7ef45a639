"""A ViT-B/16, a ResNet-50, an EfficientNet-B0 block and a ConvNeXt-T stage written against an *op table*, for
block-level memory and end-to-end timing.

Each model calls the fusable patterns through ``self.ops[<pattern>]`` (a dict of callables), so the same module
runs eager PyTorch (:data:`EAGER_OPS`), torch's SDPA (:data:`TORCH_SDPA_OPS`) or fastattn's kernels
(:data:`FUSED_OPS`) with identical parameters. Patterns and their eager meaning:

- ``attention(q, k, v)``: softmax(q k^T / sqrt(d)) v on (B, H, L, D); eager = ``fastattn.reference`` (the math
  path that materialises the scores, as a plain PyTorch model does).
- ``layer_norm(norm, x)``: ``norm(x)`` for an ``nn.LayerNorm``.
- ``add_layer_norm(norm, x, residual)``: ``(norm(x + residual), x + residual)``, the pre-norm junction
  ``x = x + attn(ln1(x))`` followed by ``ln2(x)``: one op gives both the new residual stream and ln2's output.
- ``patch_embed(conv, x, pos, cls)``: ``cat([cls, conv(x).flatten(2).transpose(1, 2)], 1) + pos``:
  (B, C, H, W) -> (B, 1 + L, dim).
- ``bn_relu(bn, x)`` and ``bn_add_relu(bn, x, identity)``: ``relu(bn(x))`` and ``relu(bn(x) + identity)``.
- ``bn_act(bn, x, activation)`` and ``bn_add(bn, x, identity)``: ``act(bn(x))`` (``activation`` a name of
  ``fastattn.batch_norm_act``) and ``bn(x) + identity`` (an MBConv's tail).
- ``layer_norm2d(norm, x)``: ConvNeXt's channels-first LayerNorm of (B, C, H, W), ``norm`` an ``nn.LayerNorm(C)``.

:data:`FUSED_OPS` replaces every pattern with its fastattn op (under autocast with the casts autocast would have
applied to the eager ops it replaces); :func:`fused_patterns` says which patterns a table fuses, so reports never
claim a fusion that did not run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastattn
from fastattn import reference
from fastattn.nn import bn_forward


def _attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return reference.scaled_dot_product_attention(q, k, v)


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return norm(x)


def _add_layer_norm(norm: nn.LayerNorm, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    z = x + residual
    return norm(z), z


def _patch_embed(conv: nn.Conv2d, x: Tensor, pos: Tensor, cls: Tensor) -> Tensor:
    t = conv(x).flatten(2).transpose(1, 2)  # (B, L, dim)
    return torch.cat([cls.expand(t.size(0), -1, -1), t], dim=1) + pos


def _bn_relu(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    return F.relu(bn(x))


def _bn_add_relu(bn: nn.BatchNorm2d, x: Tensor, identity: Tensor) -> Tensor:
    return F.relu(bn(x) + identity)


def _bn_act(bn: nn.BatchNorm2d, x: Tensor, activation: str) -> Tensor:
    return reference.ACTIVATIONS[activation](bn(x), 0.01)


def _bn_add(bn: nn.BatchNorm2d, x: Tensor, identity: Tensor) -> Tensor:
    return bn(x) + identity


def _layer_norm2d(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return reference.layer_norm2d(x, norm.weight, norm.bias, norm.eps)


EAGER_OPS: dict[str, Callable] = {
    "attention": _attention,
    "layer_norm": _layer_norm,
    "add_layer_norm": _add_layer_norm,
    "patch_embed": _patch_embed,
    "bn_relu": _bn_relu,
    "bn_add_relu": _bn_add_relu,
    "bn_act": _bn_act,
    "bn_add": _bn_add,
    "layer_norm2d": _layer_norm2d,
}

TORCH_SDPA_OPS: dict[str, Callable] = {**EAGER_OPS, "attention": F.scaled_dot_product_attention}


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _fused_layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return fastattn.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _fused_add_layer_norm(norm: nn.LayerNorm, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    # Under autocast x (a Linear's output) is half precision and the residual stream float32, as eager's type
    # promotion keeps it: the fused op then keeps the stream in float32 too.
    fp32_stream = residual.dtype == torch.float32 and x.dtype != torch.float32
    return fastattn.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, residual_in_fp32=fp32_stream)


def _fused_patch_embed(conv: nn.Conv2d, x: Tensor, pos: Tensor, cls: Tensor) -> Tensor:
    weight, bias = conv.weight, conv.bias
    dtype = _autocast_dtype(x.device)
    if dtype is not None:  # autocast runs the conv it replaces in half precision; pos and cls stay float32
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None
    return fastattn.patch_embed(x, weight, bias, pos, cls)


def _fused_bn_add_relu(bn: nn.BatchNorm2d, x: Tensor, identity: Tensor | None = None) -> Tensor:
    """relu(bn(x) + identity) with ``nn.BatchNorm2d.forward``'s bookkeeping (running statistics tracked)."""
    return bn_forward(bn, x, identity, "relu", 0.0)


def _fused_bn_act(bn: nn.BatchNorm2d, x: Tensor, activation: str) -> Tensor:
    return bn_forward(bn, x, None, activation, 0.01)


def _fused_bn_add(bn: nn.BatchNorm2d, x: Tensor, identity: Tensor) -> Tensor:
    return bn_forward(bn, x, identity, "identity", 0.0)


def _fused_layer_norm2d(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return fastattn.layer_norm2d(x, norm.weight, norm.bias, norm.eps)


# One line per fastattn op that serves a pattern.
FUSED_OPS: dict[str, Callable] = {
    **EAGER_OPS,
    "attention": fastattn.scaled_dot_product_attention,
    "layer_norm": _fused_layer_norm,
    "add_layer_norm": _fused_add_layer_norm,
    "patch_embed": _fused_patch_embed,
    "bn_relu": _fused_bn_add_relu,
    "bn_add_relu": _fused_bn_add_relu,
    "bn_act": _fused_bn_act,
    "bn_add": _fused_bn_add,
    "layer_norm2d": _fused_layer_norm2d,
}


def fused_patterns(patterns: tuple[str, ...], ops: dict[str, Callable] = FUSED_OPS) -> list[str]:
    """The patterns among ``patterns`` that ``ops`` serves with something other than the eager code."""
    return [p for p in patterns if ops[p] is not EAGER_OPS[p]]


# -- ViT -------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, ops: dict[str, Callable]):
        super().__init__()
        self.heads, self.ops = heads, ops
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, C)
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, D)
        x = self.ops["attention"](q, k, v)  # (B, H, L, D)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class ViTBlock(nn.Module):
    patterns = ("layer_norm", "add_layer_norm", "attention")

    def __init__(self, dim: int, heads: int, ops: dict[str, Callable], mlp_ratio: float = 4.0):
        super().__init__()
        self.ops = ops
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, ops)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, C)
        # x + attn(norm1(x)) is the new residual stream x, and h = norm2(x): one add_layer_norm
        h, x = self.ops["add_layer_norm"](self.norm2, self.attn(self.ops["layer_norm"](self.norm1, x)), x)
        return x + self.fc2(F.gelu(self.fc1(h)))


class ViT(nn.Module):
    """ViT-B/16 by default: 224 px, 16 px patches (196 + 1 tokens), width 768, 12 blocks of 12 heads."""

    patterns = ("patch_embed", "layer_norm", "add_layer_norm", "attention")

    def __init__(self, ops: dict[str, Callable], image: int = 224, patch: int = 16, dim: int = 768, depth: int = 12,
                 heads: int = 12, classes: int = 1000):
        super().__init__()
        self.ops = ops
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, ops) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W)
        x = self.ops["patch_embed"](self.patch, x, self.pos, self.cls)  # (B, 1 + L, dim)
        x = self.blocks(x)
        return self.head(self.ops["layer_norm"](self.norm, x)[:, 0])


# -- ResNet-50 -------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    patterns = ("bn_relu", "bn_add_relu")

    def __init__(self, cin: int, mid: int, stride: int, ops: dict[str, Callable]):
        super().__init__()
        self.ops = ops
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, 4 * mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * mid)
        self.downsample = None
        if stride != 1 or cin != 4 * mid:
            self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * mid, 1, stride, bias=False), nn.BatchNorm2d(4 * mid))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.ops["bn_relu"](self.bn1, self.conv1(x))
        out = self.ops["bn_relu"](self.bn2, self.conv2(out))
        return self.ops["bn_add_relu"](self.bn3, self.conv3(out), identity)


class ResNet50(nn.Module):
    patterns = ("bn_relu", "bn_add_relu")

    def __init__(self, ops: dict[str, Callable], classes: int = 1000):
        super().__init__()
        self.ops = ops
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(cin, mid, stride if i == 0 else 1, ops))
                cin = 4 * mid
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W)
        x = F.max_pool2d(self.ops["bn_relu"](self.bn1, self.conv1(x)), 3, 2, 1)
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- EfficientNet-B0 and ConvNeXt-T ------------------------------------------------------------------------------


class MBConv(nn.Module):
    """EfficientNet's inverted residual: 1x1 expansion, depthwise k x k, squeeze-excitation, 1x1 projection, each
    conv followed by its BatchNorm (+ SiLU), the projection's BN by the residual add."""

    patterns = ("bn_act", "bn_add")

    def __init__(self, cin: int, expand: int, k: int, ops: dict[str, Callable]):
        super().__init__()
        self.ops = ops
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, k, padding=k // 2, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.se_reduce = nn.Conv2d(mid, max(1, cin // 4), 1)
        self.se_expand = nn.Conv2d(max(1, cin // 4), mid, 1)
        self.conv_pwl = nn.Conv2d(mid, cin, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cin)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        h = self.ops["bn_act"](self.bn1, self.conv_pw(x), "silu")
        h = self.ops["bn_act"](self.bn2, self.conv_dw(h), "silu")
        h = h * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        return self.ops["bn_add"](self.bn3, self.conv_pwl(h), x)


class ConvNeXtStage(nn.Module):
    """A ConvNeXt stage's entry: the downsampling channels-first LayerNorm + 2x2 stride-2 conv, then a block
    (depthwise 7x7, channels-last LayerNorm, MLP with GELU, layer scale, residual)."""

    patterns = ("layer_norm2d", "layer_norm")

    def __init__(self, cin: int, dim: int, ops: dict[str, Callable]):
        super().__init__()
        self.ops = ops
        self.down_norm = nn.LayerNorm(cin, eps=1e-6)
        self.down = nn.Conv2d(cin, dim, 2, stride=2)
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        x = self.down(self.ops["layer_norm2d"](self.down_norm, x))
        h = self.ops["layer_norm"](self.norm, self.conv_dw(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        return x + (self.gamma * self.fc2(F.gelu(self.fc1(h)))).permute(0, 3, 1, 2)


# -- what the reports run --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    """A module and its input at a real shape: ``build(ops, device, dtype) -> (module, input)``."""

    label: str
    shape: str
    patterns: tuple[str, ...]
    build: Callable[[dict[str, Callable], torch.device, torch.dtype], tuple[nn.Module, Tensor]]
    batch: int = 0  # images per step (end-to-end workloads)
    classes: int = 1000  # labels of the end-to-end loss
    input_grad: bool = True  # memory report: the input is an activation (a block) rather than data (a model)


def construct(ctor: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``ctor()`` with parameters created on ``device`` in ``dtype`` (no ``.to()``: FakeTensor parameters cannot
    be swapped by ``Module.to``)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return ctor()
    finally:
        torch.set_default_dtype(old)


def _vit_block(ops, device, dtype):
    block = construct(lambda: ViTBlock(768, 12, ops), device, dtype)
    return block, torch.randn(64, 197, 768, device=device, dtype=dtype)


def _bottleneck(ops, device, dtype):
    block = construct(lambda: Bottleneck(256, 64, 1, ops), device, dtype)
    return block, torch.randn(64, 256, 56, 56, device=device, dtype=dtype)


def _mbconv(ops, device, dtype):
    block = construct(lambda: MBConv(24, 6, 3, ops), device, dtype)
    return block, torch.randn(64, 24, 56, 56, device=device, dtype=dtype)


def _convnext_stage(ops, device, dtype):
    stage = construct(lambda: ConvNeXtStage(96, 192, ops), device, dtype)
    return stage, torch.randn(64, 96, 56, 56, device=device, dtype=dtype)


def _vit_model(ops, device, dtype):
    return construct(lambda: ViT(ops), device, dtype), torch.randn(64, 3, 224, 224, device=device, dtype=dtype)


def _resnet_model(ops, device, dtype):
    return construct(lambda: ResNet50(ops), device, dtype), torch.randn(64, 3, 224, 224, device=device, dtype=dtype)


# The memory report's workloads: a block at a time (input: an activation) and whole models (input: images).
BLOCKS = [
    Workload("ViT-B/16 block", "B=64 L=197 C=768 H=12", ViTBlock.patterns, _vit_block),
    Workload("ResNet-50 bottleneck", "B=64 256x56x56 (mid 64)", Bottleneck.patterns, _bottleneck),
    Workload("EfficientNet-B0 MBConv", "B=64 24x56x56 (expand 144, k3, SE)", MBConv.patterns, _mbconv),
    Workload("ConvNeXt-T stage 2 entry", "B=64 96x56x56 -> 192x28x28", ConvNeXtStage.patterns, _convnext_stage),
    Workload("ViT-B/16 model", "B=64 224px, 12 blocks", ViT.patterns, _vit_model, input_grad=False),
    Workload("ResNet-50 model", "B=64 224px", ResNet50.patterns, _resnet_model, input_grad=False),
]


def end_to_end(batch_vit: int = 64, batch_resnet: int = 64) -> list[Workload]:
    """ViT-B/16 and ResNet-50 at 224 px (parameters in fp32; the step runs under autocast)."""

    def vit(ops, device, dtype):
        return construct(lambda: ViT(ops), device, torch.float32), torch.randn(batch_vit, 3, 224, 224, device=device)

    def resnet(ops, device, dtype):
        return (construct(lambda: ResNet50(ops), device, torch.float32),
                torch.randn(batch_resnet, 3, 224, 224, device=device))

    return [Workload("ViT-B/16 train step", f"B={batch_vit} 224px", ViT.patterns, vit, batch_vit),
            Workload("ResNet-50 train step", f"B={batch_resnet} 224px", ResNet50.patterns, resnet, batch_resnet)]
