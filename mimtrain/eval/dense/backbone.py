"""Any mimtrain encoder as a dense backbone: feature maps at strides 4, 8, 16 and 32 for an FPN or an UperNet head.

The encoder's `feature_info` says which strides it produces; every missing stride is derived from the ones it has:
- coarser than the finest available map: max pooling from the nearest finer map (HiViT's stride 32 from its stride-16
  main stage; the stride-32 level of plain ViTs, as in ViTDet);
- finer than every available map (plain encoders only): a ViTDet simple feature pyramid, i.e. 2x2 stride-2
  transposed convolutions from the nearest coarser map, halving the channels at each step (LayerNorm + GELU between
  steps): ViT's stride 4 and 8 from its stride-16 map, GPViT's stride 4 from its stride-8 map.
Hierarchical encoders with all four strides (Swin, GC ViT, DGT, GLNet) pass their maps through unchanged. Every level
then gets its own LayerNorm, as Swin's detection backbone adds: intermediate stage outputs are not normalised.

Plain encoders (one feature level per block, all at one stride: ViT, GPViT) read the final map for every stride by
default (ViTDet's simple pyramid, detection). With `blocks` they read one block per stride instead, the BEiT / MAE
UperNet protocol for ADE20K: blocks 4, 6, 8 and 12 of 12 (scaled to other depths), rescaled 4x, 2x, 1x and 0.5x
(BEiT `semantic_segmentation/backbone/beit.py`, `out_indices=[3, 5, 7, 11]` with its fpn1-fpn4).

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
BEIT_BLOCKS = (4, 6, 8, 12)  # of 12: the blocks BEiT's / MAE's UperNet reads for strides 4, 8, 16, 32


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


def plan_levels(feature_info: list[dict], blocks: tuple[int, ...] = ()) -> list[tuple[int, str, int]]:
    """For each stride in STRIDES: (index of the source map in `forward_intermediates`' output, "same"|"up"|"down",
    factor). A missing stride is pooled from the nearest finer map when there is one, else up-sampled from the
    nearest coarser one; of several maps at one stride (a plain encoder's blocks) the last, the final map.

    blocks: for a plain encoder (every level at one stride), the block (1-based, of 12; scaled to its depth) each
    stride reads, BEiT's (4, 6, 8, 12); () or a hierarchical encoder: as above."""
    strides = [int(i["reduction"]) for i in feature_info]
    if blocks and len(set(strides)) == 1:
        if len(blocks) != len(STRIDES) or any(not 1 <= b <= 12 for b in blocks):
            raise ValueError(f"blocks must give one block of 12 (1..12) per stride {STRIDES}, got {list(blocks)}")
        depth, r = len(strides), strides[0]
        picks = [max(round(b * depth / 12), 1) - 1 for b in blocks]
        return [(i, "same" if s == r else "up" if s < r else "down", max(s, r) // min(s, r))
                for i, s in zip(picks, STRIDES)]
    last = {r: i for i, r in enumerate(strides)}  # stride -> index of its last (final) map
    plan = []
    for s in STRIDES:
        if s in last:
            plan.append((last[s], "same", 1))
            continue
        finer = [r for r in strides if r < s]
        if finer:
            src = max(finer)
            plan.append((last[src], "down", s // src))
        else:
            src = min(r for r in strides if r > s)
            plan.append((last[src], "up", src // s))
        if s % src and src % s:
            raise ValueError(f"encoder strides {strides} do not divide into {STRIDES}")
    return plan


class DenseBackbone(nn.Module):
    """encoder + the adapter above. x: [B, 3, H, W] with H, W <= canvas -> [[B, C_s, ceil(H/s), ceil(W/s)]] for
    s in (4, 8, 16, 32); `out_channels` lists C_s.

    Args:
        encoder: any mimtrain encoder built for `canvas` (its `forward_intermediates` runs unmasked).
        canvas: (height, width) the encoder was built for.
        blocks: plain encoders only: the block of 12 each stride reads (BEiT's (4, 6, 8, 12)); () = the final map.
    """

    def __init__(self, encoder: nn.Module, canvas: tuple[int, int], blocks: tuple[int, ...] = ()):
        super().__init__()
        self.encoder = encoder
        self.canvas = tuple(canvas)
        self.plan = plan_levels(encoder.feature_info, tuple(blocks))
        self.take = sorted({src for src, _, _ in self.plan})  # the levels forward_intermediates returns
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
        maps = self.encoder.forward_intermediates(F.pad(x, (0, cw - W, 0, ch - H)), indices=self.take,
                                                  intermediates_only=True)
        feats = dict(zip(self.take, maps))
        out = []
        for (src, _, _), stride, resample, norm in zip(self.plan, STRIDES, self.resample, self.norms):
            y = norm(resample(feats[src]))
            out.append(y[..., :math.ceil(H / stride), :math.ceil(W / stride)])
        return out
