"""UperNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", 2018) decode head on four feature
levels, and the auxiliary FCN head the ADE20K recipes train beside it.

In the paper's order: a pyramid pooling module (PSPNet's PPM) on the coarsest map; an FPN top-down path from it
through lateral 1x1 convs of the finer maps, each merged map refined by a 3x3 conv; every level up-sampled to stride 4,
concatenated and fused by a 3x3 conv; a 1x1 classifier. Conv + BatchNorm + ReLU throughout (timm's ConvNormAct), as
MMSegmentation's UPerHead, whose channel width (512) and pool scales (1, 2, 3, 6) are the defaults.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import Tensor, nn


def conv_bn_relu(cin: int, cout: int, k: int) -> ConvNormAct:
    """k x k conv (same padding, no bias) + BatchNorm + ReLU: [B, cin, h, w] -> [B, cout, h, w]."""
    return ConvNormAct(cin, cout, k, padding=k // 2, bias=False, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU)


def _resize(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PPM. x: [B, C, h, w] -> [B, channels, h, w]: x concatenated with its average pools at `scales` bins (each a
    1x1 conv, up-sampled back), fused by a 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, scales: tuple[int, ...]):
        super().__init__()
        self.pools = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels, channels, 1))
                                    for s in scales])
        self.bottleneck = conv_bn_relu(in_channels + len(scales) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        pooled = [_resize(p(x), x.shape[-2:]) for p in self.pools]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """feats: four maps [B, C_i, H/s_i, W/s_i], finest first -> logits [B, num_classes, H/s_0, W/s_0]."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 512,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.lateral = nn.ModuleList([conv_bn_relu(c, channels, 1) for c in in_channels[:-1]])
        self.smooth = nn.ModuleList([conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1]])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        maps = [lat(f) for lat, f in zip(self.lateral, feats)] + [self.ppm(feats[-1])]
        for i in range(len(maps) - 1, 0, -1):  # top-down: each coarser map is added to the next finer one
            maps[i - 1] = maps[i - 1] + _resize(maps[i], maps[i - 1].shape[-2:])
        outs = [sm(m) for sm, m in zip(self.smooth, maps[:-1])] + [maps[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: x [B, C, h, w] -> logits [B, num_classes, h, w] (one 3x3 conv, dropout, 1x1 classifier)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))
