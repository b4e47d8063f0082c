"""Swin Transformer as a SimMIM (fill-mode) encoder: a wrapper around timm's SwinTransformer.

Shifted-window attention needs every position of the 4-px token grid, so hidden positions are never dropped: SimMIM
replaces their patch embeddings by one learned mask token and runs the whole grid. The 4x4 patch embedding does not
overlap, and a mask cell (32 px) covers whole patches, so no visible token ever sees a hidden pixel.

SimMIM pretrains Swin at 192 px with window 6 and fine-tunes at 224 px with window 7; `adapt_state_dict` resizes the
window-bound relative position bias tables (bicubic) so such a checkpoint loads into the other geometry.
"""
from __future__ import annotations

import torch
from timm.layers import resize_rel_pos_bias_table_simple, trunc_normal_
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from mimtrain.encoders import timm_glue
from mimtrain.encoders.base import fill_tokens, resolve_mask_unit, staged_group_matcher, strip_timm_kwargs

# Non-persistent, size-bound buffers: the target model rebuilds them for its own window; old checkpoints carry them.
_SIZE_BOUND_BUFFERS = ("relative_position_index", "attn_mask")


def resize_rel_pos_tables(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Fit a checkpoint's window-bound tensors to `model`'s windows, so `model.load_state_dict(out)` works.

    Every `*.relative_position_bias_table` whose shape differs from the model's is resized bicubically on its
    (2Wh-1) x (2Ww-1) offset grid to the window of the module that owns it (the owner has a `window_size`), as SimMIM
    does when it fine-tunes a window-6 checkpoint with window 7. Relative position indices and shifted-window attention
    masks are dropped: they are buffers the model computes for its own geometry.

    Args:
        state_dict: the checkpoint, keyed like `model.state_dict()`.
        model: the model it will be loaded into (any module whose attention owners expose `window_size`).

    Returns:
        A new dict; tensors that need no change are passed through untouched.
    """
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] in _SIZE_BOUND_BUFFERS:
            continue
        if key.endswith("relative_position_bias_table") and key in own and value.shape != own[key].shape:
            owner = model.get_submodule(key.rsplit(".", 1)[0])
            window = tuple(owner.window_size)
            value = resize_rel_pos_bias_table_simple(
                value.float(), new_window_size=window, new_bias_shape=tuple(own[key].shape)).to(value.dtype)
        out[key] = value
    return out


class SwinEncoder(timm_glue.TimmNative, nn.Module):
    """timm SwinTransformer + the mimtrain encoder contract (see `encoders/base.py`), fill mode only.

    Args:
        img_size: input size the windows and shift masks are built for (SimMIM: 192 with window 6, 224 with 7).
        patch_size: pixels per token of the patch embedding (4).
        window_size: attention window in tokens, the same for every stage (timm clamps it to a smaller stage grid).
        embed_dim: channels of the first stage; stage i has embed_dim * 2**i.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        num_classes: classes of the fine-tuning head (0 for none).
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        mask_unit: pixels per mask cell, a multiple of patch_size (SimMIM: 32).
        mask_mode: must be "fill".
        **kwargs: passed to timm's SwinTransformer (mlp_ratio, qkv_bias, ...).
    """

    classifier_modules = ("swin.head",)  # `base.classifier_keys`: what a new task replaces
    pretraining_only = ("mask_token",)  # SimMIM's; a classifier (num_classes > 0) has none

    def __init__(self, img_size: int | tuple[int, int] = 192, patch_size: int = 4, window_size: int = 6,
                 embed_dim: int = 128, depths: tuple[int, ...] = (2, 2, 18, 2),
                 num_heads: tuple[int, ...] = (4, 8, 16, 32), num_classes: int = 1000, drop_path_rate: float = 0.0,
                 mask_unit: int | None = None, mask_mode: str = "fill", **kwargs):
        super().__init__()
        if mask_mode != "fill":
            raise ValueError(
                f"Swin supports only mask_mode='fill' (got {mask_mode!r}): shifted windows need the full token grid, "
                "so hidden positions get a mask token instead of being dropped; pretrain it with SimMIM, or use a "
                "drop-mode encoder (mim_vit_*, hivit_*) for MAE")
        self.swin = SwinTransformer(
            img_size=img_size, patch_size=patch_size, window_size=window_size, embed_dim=embed_dim, depths=depths,
            num_heads=num_heads, num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs)
        self.patch_size = patch_size
        self.mask_unit = resolve_mask_unit(mask_unit, 32, patch_size, "Swin")
        self.mask_mode = mask_mode
        self.window_size = window_size
        self.num_prefix_tokens = 0
        self.embed_dim = self.swin.num_features
        self.feature_info = [dict(info, module=f"swin.{info['module']}") for info in self.swin.feature_info]
        self.feature_info[-1]["module"] = "swin.norm"  # the last map is returned after the final norm
        self.mask_token = None
        if num_classes == 0:
            self.mask_token = nn.Parameter(torch.zeros(self.swin.patch_embed.proj.out_channels))
            trunc_normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {f"swin.{n}" for n in self.swin.no_weight_decay()} | self._mask_token_name()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's own per-stage checkpointing (each block of every stage)."""
        super().set_grad_checkpointing(enable)
        self.swin.set_grad_checkpointing(enable)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-wise lr decay: patch embedding 0, then the blocks stage by stage (a patch merging joins the first
        block after it); unlike timm's Swin, the final norm trains with the head."""
        return staged_group_matcher(r"^(?:swin\.patch_embed|swin\.absolute_pos_embed|mask_token)", r"swin\.layers",
                                    coarse)

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resize a checkpoint trained with other windows (e.g. 192 px / window 6) to this model's windows."""
        return resize_rel_pos_tables(state_dict, self)

    def _stages(self, tokens: Tensor) -> list[Tensor]:
        """tokens: [B, H/4, W/4, C0] (NHWC, as timm's Swin runs) -> one NCHW map per stage, the last normed."""
        feats = []
        for i, stage in enumerate(self.swin.layers):
            tokens = stage(tokens)
            out = self.swin.norm(tokens) if i == len(self.swin.layers) - 1 else tokens
            feats.append(out.permute(0, 3, 1, 2).contiguous())
        return feats

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: [B, 3, H, W]; mask: [B, H/u, W/u] (True = hidden) -> [B, C, H/32, W/32].

        The mask token replaces hidden patch embeddings (after the patch-embedding norm, as in SimMIM).
        """
        tokens = fill_tokens(self.swin.patch_embed(x), mask, self._mask_token(), channels_last=True)
        return self._stages(tokens)[-1]

    def _feature_maps(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] -> [[B, C0, H/4, W/4], [B, 2C0, H/8, W/8], [B, 4C0, H/16, W/16], [B, 8C0, H/32, W/32]]."""
        return self._stages(self.swin.patch_embed(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """x: [B, C, h, w] last map -> average pool -> logits [B, num_classes] (or the pooled [B, C])."""
        return self.swin.forward_head(x.permute(0, 2, 3, 1), pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


_SIZES = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}


def _swin(size: str, window: int, **kwargs) -> SwinEncoder:
    """SimMIM's pairing: the window-6 names default to 192-px inputs, the window-7 names to 224 px."""
    defaults = dict(img_size=192 if window == 6 else 224, window_size=window, **_SIZES[size])
    return SwinEncoder(**{**defaults, **strip_timm_kwargs(kwargs)})


# timm reads `default_cfgs` when `register` runs: the preprocessing and the names of the stem and the classifier.
default_cfgs = timm_glue.default_cfgs({
    "simmim_swin_tiny_patch4_window6": timm_glue.cfg("swin.patch_embed.proj", "swin.head.fc", img_size=192),
    "simmim_swin_tiny_patch4_window7": timm_glue.cfg("swin.patch_embed.proj", "swin.head.fc"),
    "simmim_swin_small_patch4_window6": timm_glue.cfg("swin.patch_embed.proj", "swin.head.fc", img_size=192),
    "simmim_swin_small_patch4_window7": timm_glue.cfg("swin.patch_embed.proj", "swin.head.fc"),
    "simmim_swin_base_patch4_window6": timm_glue.cfg("swin.patch_embed.proj", "swin.head.fc", img_size=192),
    "simmim_swin_base_patch4_window7": timm_glue.cfg("swin.patch_embed.proj", "swin.head.fc"),
    "simmim_swin_large_patch4_window6": timm_glue.cfg("swin.patch_embed.proj", "swin.head.fc", img_size=192),
    "simmim_swin_large_patch4_window7": timm_glue.cfg("swin.patch_embed.proj", "swin.head.fc"),
})


@timm_glue.register
def simmim_swin_tiny_patch4_window6(pretrained: bool = False, **kwargs) -> SwinEncoder:
    return _swin("tiny", 6, **kwargs)


@timm_glue.register
def simmim_swin_tiny_patch4_window7(pretrained: bool = False, **kwargs) -> SwinEncoder:
    return _swin("tiny", 7, **kwargs)


@timm_glue.register
def simmim_swin_small_patch4_window6(pretrained: bool = False, **kwargs) -> SwinEncoder:
    return _swin("small", 6, **kwargs)


@timm_glue.register
def simmim_swin_small_patch4_window7(pretrained: bool = False, **kwargs) -> SwinEncoder:
    return _swin("small", 7, **kwargs)


@timm_glue.register
def simmim_swin_base_patch4_window6(pretrained: bool = False, **kwargs) -> SwinEncoder:
    """SimMIM's main model: Swin-B pretrained at 192 px with window 6."""
    return _swin("base", 6, **kwargs)


@timm_glue.register
def simmim_swin_base_patch4_window7(pretrained: bool = False, **kwargs) -> SwinEncoder:
    return _swin("base", 7, **kwargs)


@timm_glue.register
def simmim_swin_large_patch4_window6(pretrained: bool = False, **kwargs) -> SwinEncoder:
    return _swin("large", 6, **kwargs)


@timm_glue.register
def simmim_swin_large_patch4_window7(pretrained: bool = False, **kwargs) -> SwinEncoder:
    return _swin("large", 7, **kwargs)
