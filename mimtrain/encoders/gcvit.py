"""GC ViT (Global Context ViT) as a SimMIM (fill-mode) encoder: a wrapper around timm's GlobalContextVit.

Paper components (Hatamizadeh et al., GC ViT) and where they live in timm's model, held here as `self.gcvit`:
- stem: 3x3 stride-2 conv, then a Fused-MBConv downsampler (LN, DW-conv 3x3 + GELU + SE + 1x1 conv, 3x3 stride-2
  conv, LN) -> stride 4, C channels (`gcvit.stem`);
- four stages of alternating local / global window attention with relative position bias (`gcvit.stages[i].blocks`),
  global queries made once per stage by the global token generator, Fused-MBConv + max-pool repeated until the map
  is one window large (`gcvit.stages[i].global_block`), a Fused-MBConv downsampler in front of stages 2-4.

Masking: windows, convolutions and the global query generator all need the full grid, so hidden positions get a
learned mask token at the first token level (after the stem, stride 4). The stem's convolutions overlap cell borders,
so hidden pixels are blanked at the input first; otherwise visible tokens at a mask border would see the answer.

Resolution: timm sizes the windows from the input size (window = img_size / window_ratio, ratios 32, 32, 16, 32), so
the generator depth per stage is the same at every size that is a multiple of 32, and only the relative position
bias tables depend on it. The wrapper builds timm's model for its configured img_size and `adapt_state_dict` resizes
the tables of a checkpoint trained at another size.
"""
from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.gcvit import GlobalContextVit
from torch import Tensor, nn

from mimtrain.encoders import timm_glue
from mimtrain.encoders.base import (blank_hidden_pixels, fill_tokens, resolve_mask_unit, staged_group_matcher,
                                    strip_timm_kwargs)
from mimtrain.encoders.swin import resize_rel_pos_tables


class GCViTEncoder(timm_glue.TimmNative, nn.Module):
    """timm GlobalContextVit + the mimtrain encoder contract (see `encoders/base.py`), fill mode only.

    Args:
        img_size: input size timm builds the windows and global query grids for (a multiple of 32).
        embed_dim: channels of the stem and first stage; stage i has embed_dim * 2**i.
        depths: blocks per stage (local and global attention alternate).
        num_heads: attention heads per stage.
        num_classes: classes of the fine-tuning head (0 for none).
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        mask_unit: pixels per mask cell, a multiple of the 4-px stem stride (SimMIM: 32).
        mask_mode: must be "fill".
        **kwargs: passed to timm's GlobalContextVit (mlp_ratio, layer_scale, window_ratio, ...).
    """

    classifier_modules = ("gcvit.head",)  # `base.classifier_keys`: what a new task replaces
    pretraining_only = ("mask_token",)  # SimMIM's; a classifier (num_classes > 0) has none
    script_limits = fx_limits = ("shape-dependent control flow: the input-size check and timm's global query "
                                 "generator branch on tensor shapes in Python")

    patch_size = 4  # the stem's stride

    def __init__(self, img_size: int | tuple[int, int] = 224, embed_dim: int = 64,
                 depths: tuple[int, ...] = (3, 4, 19, 5), num_heads: tuple[int, ...] = (2, 4, 8, 16),
                 num_classes: int = 1000, drop_path_rate: float = 0.0, mask_unit: int | None = None,
                 mask_mode: str = "fill", **kwargs):
        super().__init__()
        if mask_mode != "fill":
            raise ValueError(
                f"GC ViT supports only mask_mode='fill' (got {mask_mode!r}): its windows, convolutions and global "
                "query generator need the full token grid, so hidden positions get a mask token instead of being "
                "dropped; pretrain it with SimMIM, or use a drop-mode encoder (mim_vit_*, hivit_*) for MAE")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.gcvit = GlobalContextVit(img_size=self.img_size, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                                      num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs)
        self.mask_unit = resolve_mask_unit(mask_unit, 32, self.patch_size, "GC ViT")
        self.mask_mode = mask_mode
        self.num_prefix_tokens = 0
        self.embed_dim = self.gcvit.num_features
        self.feature_info = [dict(info, module=f"gcvit.{info['module']}") for info in self.gcvit.feature_info]
        self.mask_token = None
        if num_classes == 0:
            self.mask_token = nn.Parameter(torch.zeros(embed_dim))
            trunc_normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {f"gcvit.{n}" for n in self.gcvit.no_weight_decay()} | self._mask_token_name()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's own per-stage checkpointing (each block of every stage)."""
        super().set_grad_checkpointing(enable)
        self.gcvit.set_grad_checkpointing(enable)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-wise lr decay: stem 0, then the blocks stage by stage. The downsampler and the global query
        generator feed the stage's blocks (they join its first block); the stage's closing norm joins its last."""
        return staged_group_matcher(r"^(?:gcvit\.stem|mask_token)", r"gcvit\.stages", coarse,
                                    entry="downsample|global_block", closing="norm")

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resize a checkpoint trained at another img_size (other windows) to this model's relative position tables."""
        return resize_rel_pos_tables(state_dict, self)

    def _check_size(self, x: Tensor) -> None:
        self._refuse_fx(x)
        # timm's global queries are one window large only at the size the model was built for; fail clearly instead
        # of with a reshape error deep inside attention.
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"GC ViT was built for {self.img_size[0]}x{self.img_size[1]} inputs, got "
                             f"{x.shape[-2]}x{x.shape[-1]}; build it with img_size={tuple(x.shape[-2:])} and load the "
                             "weights through adapt_state_dict")

    def _stages(self, x: Tensor) -> list[Tensor]:
        """x: [B, C, H/4, W/4] stem tokens -> one NCHW map per stage (strides 4, 8, 16, 32)."""
        feats = []
        for stage in self.gcvit.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: [B, 3, H, W]; mask: [B, H/u, W/u] (True = hidden) -> [B, 8C, H/32, W/32]."""
        self._check_size(x)
        tokens = self.gcvit.stem(blank_hidden_pixels(x, mask))  # [B, C, H/4, W/4]
        return self._stages(fill_tokens(tokens, mask, self._mask_token()))[-1]

    def _feature_maps(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] -> [[B, C, H/4, W/4], [B, 2C, H/8, W/8], [B, 4C, H/16, W/16], [B, 8C, H/32, W/32]]."""
        self._check_size(x)
        return self._stages(self.gcvit.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """x: [B, C, h, w] last map -> average pool -> logits [B, num_classes] (or the pooled [B, C])."""
        return self.gcvit.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# GC ViT paper Tables 1 and S.2 (C, heads, depths); MLP ratio 2 and layer scale 1e-5 for S/B as in timm's models.
_SIZES = {
    "xxtiny": dict(embed_dim=64, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16)),
    "xtiny": dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16)),
    "tiny": dict(embed_dim=64, depths=(3, 4, 19, 5), num_heads=(2, 4, 8, 16)),
    "small": dict(embed_dim=96, depths=(3, 4, 19, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2, layer_scale=1e-5),
    "base": dict(embed_dim=128, depths=(3, 4, 19, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2, layer_scale=1e-5),
}


def _gcvit(size: str, **kwargs) -> GCViTEncoder:
    return GCViTEncoder(**{**_SIZES[size], **strip_timm_kwargs(kwargs)})


# timm reads `default_cfgs` when `register` runs: the preprocessing and the names of the stem and the classifier.
default_cfgs = timm_glue.default_cfgs({
    "simmim_gcvit_xxtiny": timm_glue.cfg("gcvit.stem.conv1", "gcvit.head.fc"),
    "simmim_gcvit_xtiny": timm_glue.cfg("gcvit.stem.conv1", "gcvit.head.fc"),
    "simmim_gcvit_tiny": timm_glue.cfg("gcvit.stem.conv1", "gcvit.head.fc"),
    "simmim_gcvit_small": timm_glue.cfg("gcvit.stem.conv1", "gcvit.head.fc"),
    "simmim_gcvit_base": timm_glue.cfg("gcvit.stem.conv1", "gcvit.head.fc"),
})


@timm_glue.register
def simmim_gcvit_xxtiny(pretrained: bool = False, **kwargs) -> GCViTEncoder:
    return _gcvit("xxtiny", **kwargs)


@timm_glue.register
def simmim_gcvit_xtiny(pretrained: bool = False, **kwargs) -> GCViTEncoder:
    return _gcvit("xtiny", **kwargs)


@timm_glue.register
def simmim_gcvit_tiny(pretrained: bool = False, **kwargs) -> GCViTEncoder:
    return _gcvit("tiny", **kwargs)


@timm_glue.register
def simmim_gcvit_small(pretrained: bool = False, **kwargs) -> GCViTEncoder:
    return _gcvit("small", **kwargs)


@timm_glue.register
def simmim_gcvit_base(pretrained: bool = False, **kwargs) -> GCViTEncoder:
    return _gcvit("base", **kwargs)
