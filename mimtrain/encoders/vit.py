"""Plain ViT (patch 16) as a MIM encoder: a wrapper around timm's VisionTransformer.

Drop mode (MAE): only the visible patches enter the transformer. Fill mode (SimMIM's ViT baseline): hidden patches
are replaced by a learned mask token after the patch embedding. Position embeddings are fixed 2-D sin-cos, as in MAE.
"""
from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .base import mask_to_tokens, strip_timm_kwargs, visible_order


class ViTEncoder(nn.Module):
    """timm VisionTransformer + the mimtrain encoder contract (see `encoders/base.py`)."""

    hidden_units: int | None = None  # drop mode: hidden mask units per image, where fixed (`base.visible_order`)

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 drop_path_rate: float = 0.0, mask_unit: int | None = None, mask_mode: str = "drop",
                 fixed_pos_embed: bool = True, **kwargs):
        super().__init__()
        self.vit = VisionTransformer(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=num_classes, global_pool="token",
            drop_path_rate=drop_path_rate, **kwargs)
        self.patch_size = patch_size
        self.mask_unit = mask_unit or patch_size
        if self.mask_unit % patch_size:
            raise ValueError(f"mask_unit {self.mask_unit} must be a multiple of the patch size {patch_size}")
        if mask_mode not in ("drop", "fill"):
            raise ValueError(f"mask_mode must be 'drop' or 'fill', got {mask_mode!r}")
        self.mask_mode = mask_mode
        self.embed_dim = embed_dim
        self.num_prefix_tokens = self.vit.num_prefix_tokens if mask_mode == "drop" else 0
        self.grid_size = tuple(self.vit.patch_embed.grid_size)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module="vit.norm")]
        self.mask_token = nn.Parameter(torch.zeros(embed_dim)) if mask_mode == "fill" else None
        if fixed_pos_embed:
            # MAE: fixed sin-cos table, class token position zero; frozen so it never drifts.
            table = build_sincos2d_pos_embed(list(self.grid_size), dim=embed_dim)
            with torch.no_grad():
                self.vit.pos_embed.zero_()
                self.vit.pos_embed[0, self.vit.num_prefix_tokens:] = table
            self.vit.pos_embed.requires_grad_(False)
        self._init_tokens()

    def _init_tokens(self) -> None:
        nn.init.normal_(self.vit.cls_token, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"vit.pos_embed", "vit.cls_token", "mask_token"}

    def _embed(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] -> patch tokens with position: [B, L, C]."""
        x = self.vit.patch_embed(x)
        return x + self.vit.pos_embed[:, self.vit.num_prefix_tokens:]

    def _prepend_prefix(self, x: Tensor) -> Tensor:
        """[B, N, C] -> [B, 1 + N, C]: class token (with its own position) in front."""
        cls = (self.vit.cls_token + self.vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def _transform(self, x: Tensor) -> Tensor:
        return self.vit.norm(self.vit.blocks(self.vit.norm_pre(x)))

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: [B, 3, H, W]; mask: [B, Gh, Gw] (True = hidden).

        drop -> [B, 1 + N_visible, C]; fill -> [B, C, H/p, W/p].
        """
        tokens = self._embed(x)
        hidden = mask_to_tokens(mask, self.mask_unit // self.patch_size).flatten(1)  # [B, L]
        B, L, C = tokens.shape
        if self.mask_mode == "fill":
            tokens = torch.where(hidden[..., None], self.mask_token.to(tokens.dtype), tokens)
            out = self._transform(self._prepend_prefix(tokens))[:, self.vit.num_prefix_tokens:]
            return out.transpose(1, 2).reshape(B, C, *self.grid_size)
        # Every image hides the same count (the masking service guarantees it), so the gather stays rectangular.
        keep = visible_order(hidden, self.hidden_units, (self.mask_unit // self.patch_size) ** 2)  # [B, V]
        tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, C))
        return self._transform(self._prepend_prefix(tokens))

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] -> [[B, C, H/p, W/p]], unmasked."""
        out = self._transform(self._prepend_prefix(self._embed(x)))
        B, _, C = out.shape
        return [out[:, self.vit.num_prefix_tokens:].transpose(1, 2).reshape(B, C, *self.grid_size)]

    def forward_cls(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] -> [B, C]: the normed class token, unmasked (MAE's linear-probe feature)."""
        return self._transform(self._prepend_prefix(self._embed(x)))[:, 0]

    def forward_head(self, feats: list[Tensor], pre_logits: bool = False) -> Tensor:
        """Average-pooled patch tokens (MAE fine-tuning's global pool) -> logits."""
        x = self.vit.head_drop(feats[-1].mean(dim=(2, 3)))
        return x if pre_logits else self.vit.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _vit(img_size=224, **kwargs) -> ViTEncoder:
    return ViTEncoder(img_size=img_size, **strip_timm_kwargs(kwargs))


@register_model
def mim_vit_tiny_patch16(pretrained: bool = False, **kwargs) -> ViTEncoder:
    return _vit(**{**dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs})


@register_model
def mim_vit_small_patch16(pretrained: bool = False, **kwargs) -> ViTEncoder:
    return _vit(**{**dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs})


@register_model
def mim_vit_base_patch16(pretrained: bool = False, **kwargs) -> ViTEncoder:
    return _vit(**{**dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs})


@register_model
def mim_vit_large_patch16(pretrained: bool = False, **kwargs) -> ViTEncoder:
    return _vit(**{**dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), **kwargs})


@register_model
def mim_vit_huge_patch16(pretrained: bool = False, **kwargs) -> ViTEncoder:
    return _vit(**{**dict(patch_size=16, embed_dim=1280, depth=32, num_heads=16), **kwargs})


@register_model
def mim_vit_huge_patch14(pretrained: bool = False, **kwargs) -> ViTEncoder:
    """MAE's ViT-H/14 (the paper's huge model uses 14-px patches; 224 / 14 = 16 units a side)."""
    return _vit(**{**dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), **kwargs})
