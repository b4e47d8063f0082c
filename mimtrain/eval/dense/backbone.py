"""Any mimtrain encoder as a dense backbone: feature maps at strides 4, 8, 16 and 32 for an FPN or an UperNet head.

The encoder's `feature_info` says which strides it produces; every missing stride is derived from the ones it has:
- coarser than the finest available map: max pooling from the nearest finer map (HiViT's stride 32 from its stride-16
  main stage; the stride-32 level of plain ViTs, as in ViTDet);
- finer than every available map (plain encoders only): a ViTDet simple feature pyramid, i.e. 2x2 stride-2
  transposed convolutions from the nearest coarser map, halving the channels at each step (LayerNorm + GELU between
  steps): ViT's stride 4 and 8 from its stride-16 map, GPViT's stride 4 from its stride-8 map.
Hierarchical encoders with all four strides (Swin, GC ViT, DGT, GLNet) pass their maps through unchanged. Every level
then gets its own LayerNorm, as Swin's detection backbone adds: intermediate stage outputs are not normalised.

Input size: several encoders are bound to the size they are built for (timm's Swin and GC ViT build attention masks
and window grids for it; ViT and HiViT position tables are per grid). The backbone is therefore built once for a fixed
`canvas` (the largest input: COCO's 1333 px rounded up to 1344, ADE20K's 512 crop), every input is zero-padded at the
bottom/right to the canvas, and each output map is cropped back to the input's extent (ceil(H / s) x ceil(W / s)).
Zero is the dataset mean after normalisation. As in MMDetection's padded batches, padded tokens take part in global
attention (ViT, HiViT), in windows that straddle the border and in convolutions near it; nothing else about them
reaches the cropped outputs. The cost is compute on the padding: an 800 x 1333 image fills 59% of a 1344 canvas.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

STRIDES = (4, 8, 16, 32)


def _upsampler(channels: int, factor: int) -> tuple[nn.Module, int]:
    """ViTDet's up-sampling branch: log2(factor) transposed convs. [B, C, h, w] -> [B, C / f, h * f, w * f]."""
    steps = int(math.log2(factor))
    if 2 ** steps != factor or channels % factor:
        raise ValueError(f"cannot up-sample {channels} channels by {factor}: needs a power of two dividing them")
    layers: list[nn.Module] = []
    for i in range(steps):
        if i:
            layers += [LayerNorm2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
        channels //= 2
    return nn.Sequential(*layers), channels


def _downsampler(factor: int) -> nn.Module:
    """Max pooling by `factor` (ceil mode, so odd sizes keep their last row). [B, C, h, w] -> [B, C, h / f, w / f]."""
    return nn.MaxPool2d(kernel_size=factor, stride=factor, ceil_mode=True)


def plan_levels(feature_info: list[dict]) -> list[tuple[int, str, int]]:
    """For each stride in STRIDES: (index of the source map in `forward_features`' output, "same"|"up"|"down",
    factor). A missing stride is pooled from the nearest finer map when there is one, else up-sampled from the
    nearest coarser one."""
    strides = [int(i["reduction"]) for i in feature_info]
    plan = []
    for s in STRIDES:
        if s in strides:
            plan.append((strides.index(s), "same", 1))
            continue
        finer = [r for r in strides if r < s]
        if finer:
            src = max(finer)
            plan.append((strides.index(src), "down", s // src))
        else:
            src = min(r for r in strides if r > s)
            plan.append((strides.index(src), "up", src // s))
        if s % src and src % s:
            raise ValueError(f"encoder strides {strides} do not divide into {STRIDES}")
    return plan


class DenseBackbone(nn.Module):
    """encoder + the adapter above. x: [B, 3, H, W] with H, W <= canvas -> [[B, C_s, ceil(H/s), ceil(W/s)]] for
    s in (4, 8, 16, 32); `out_channels` lists C_s.

    Args:
        encoder: any mimtrain encoder built for `canvas` (its `forward_features` runs unmasked).
        canvas: (height, width) the encoder was built for.
    """

    def __init__(self, encoder: nn.Module, canvas: tuple[int, int]):
        super().__init__()
        self.encoder = encoder
        self.canvas = tuple(canvas)
        self.plan = plan_levels(encoder.feature_info)
        self.resample = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.out_channels: list[int] = []
        for src, kind, factor in self.plan:
            chs = int(encoder.feature_info[src]["num_chs"])
            if kind == "up":
                module, chs = _upsampler(chs, factor)
            else:
                module = _downsampler(factor) if kind == "down" else nn.Identity()
            self.resample.append(module)
            self.norms.append(LayerNorm2d(chs))
            self.out_channels.append(chs)

    def forward(self, x: Tensor) -> list[Tensor]:
        H, W = x.shape[-2:]
        ch, cw = self.canvas
        if H > ch or W > cw:
            raise ValueError(f"input {H}x{W} is larger than the canvas {ch}x{cw} the encoder was built for; raise "
                             "data.canvas (detection) or lower the input size")
        feats = self.encoder.forward_features(F.pad(x, (0, cw - W, 0, ch - H)))
        out = []
        for (src, _, _), stride, resample, norm in zip(self.plan, STRIDES, self.resample, self.norms):
            y = norm(resample(feats[src]))
            out.append(y[..., :math.ceil(H / stride), :math.ceil(W / stride)])
        return out
