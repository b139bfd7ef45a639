"""ResNet ("Deep Residual Learning for Image Recognition", He et al., 2016; the v1.5 variant with the stride on the
3x3 convolution of the bottleneck, as torchvision), with fastattn's fused BatchNorm + add + ReLU as a switchable
layer.

- Stem: 7x7 convolution with stride 2, BN, ReLU, 3x3 max pool with stride 2.
- Four stages of :class:`BasicBlock` (two 3x3 convs) or :class:`Bottleneck` (1x1, 3x3, 1x1 with 4x expansion);
  the first block of a stage may downsample, with a 1x1 convolution + BN on the shortcut.
- Each block ends in ``relu(bn(conv(x)) + shortcut)``; the inner convolutions are followed by ``relu(bn(.))``.
- Global average pool and a linear classifier.

``fused=True`` builds every BN that a ReLU follows (the stem's and the blocks') as ``fastattn.nn.BatchNormAddReLU``,
which computes ``relu(bn(x) + identity)`` in one fused op; ``fused=False`` as ``nn.BatchNorm2d``. The shortcut's BN
has no ReLU and stays ``nn.BatchNorm2d``. Parameter and buffer names are torchvision's (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``, ...), so a torchvision ResNet's ``state_dict`` loads as it is.
Configs: :func:`resnet18`, :func:`resnet34`, :func:`resnet50` (``width=64`` is the standard width; smaller widths
make small test models).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import fastattn.nn as fnn
from fastattn.nn import bn_relu


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = bn_relu(self.bn1, self.conv1(x))                                   # (B, planes, H/s, W/s)
        return bn_relu(self.bn2, self.conv2(out), identity)


class Bottleneck(nn.Module):
    """``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``, 4x channel expansion."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = bn_relu(self.bn1, self.conv1(x))
        out = bn_relu(self.bn2, self.conv2(out))                                 # (B, planes, H/s, W/s)
        return bn_relu(self.bn3, self.conv3(out), identity)                      # (B, 4 planes, H/s, W/s)


class ResNet(nn.Module):
    """ResNet classifier. ``norm_layer`` is the BN that a ReLU follows (default: ``fastattn.nn.BatchNormAddReLU``
    when ``fused``, else ``nn.BatchNorm2d``); the shortcut's BN is ``nn.BatchNorm2d`` whenever ``norm_layer`` is
    ``BatchNormAddReLU`` (it has no ReLU), else ``norm_layer``."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 width: int = 64, in_chans: int = 3, fused: bool = True,
                 norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or (fnn.BatchNormAddReLU if fused else nn.BatchNorm2d)
        self._shortcut_norm = nn.BatchNorm2d if norm_layer is fnn.BatchNormAddReLU else norm_layer
        self._norm_layer = norm_layer
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.in_planes, planes * block.expansion, stride),
                                       self._shortcut_norm(planes * block.expansion))
        layers = [block(self.in_planes, planes, stride, downsample, self._norm_layer)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes, norm_layer=self._norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(bn_relu(self.bn1, self.conv1(x)))                       # (B, width, H/4, W/4)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)
