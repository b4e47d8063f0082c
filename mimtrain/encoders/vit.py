"""Plain ViT (patch 16) as a MIM encoder: a wrapper around timm's VisionTransformer.

Drop mode (MAE): only the visible patches enter the transformer. Fill mode (SimMIM's ViT baseline): hidden patch
embeddings are replaced by a learned mask token, and the position embedding is added after, as in SimMIM, so hidden
tokens at different places differ. Position embeddings are MAE's fixed 2-D sin-cos table, and the weights start from
MAE's initialisation. Built with a head (num_classes > 0) the model is MAE's fine-tuning classifier: global average
of the patch tokens, a fresh `fc_norm` in place of the pretrained final norm (which the classifier then does not
have), a learnable position table initialised from the fixed one (timm's, as MAE fine-tunes it), no mask token, head
weights drawn with std 2e-5.

Feature levels (`feature_info`, `forward_intermediates`, `features_only`): one per block, as timm's ViT; the last is
the final normed map, the others raw block outputs.
"""
from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from mimtrain.encoders import timm_glue
from mimtrain.encoders.base import (mae_init_linear, mae_sincos_pos_embed, mask_to_tokens, resolve_mask_unit,
                                    strip_timm_kwargs, visible_order)


class ViTEncoder(timm_glue.TimmNative, nn.Module):
    """timm VisionTransformer + the mimtrain encoder contract (see `encoders/base.py`)."""

    # MAE's fine-tuning fc_norm is part of the head; `vit.fc_norm` is where timm-layout checkpoints keep theirs.
    classifier_modules = ("vit.head", "fc_norm", "vit.fc_norm")

    has_class_token = True
    pretraining_only = ("mask_token", "vit.norm.")

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
        self.mask_unit = resolve_mask_unit(mask_unit, patch_size, patch_size, "ViT")
        if mask_mode not in ("drop", "fill"):
            raise ValueError(f"mask_mode must be 'drop' or 'fill', got {mask_mode!r}")
        self.mask_mode = mask_mode
        self.embed_dim = embed_dim
        self.num_prefix_tokens = self.vit.num_prefix_tokens if mask_mode == "drop" else 0
        self.grid_size = tuple(self.vit.patch_embed.grid_size)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"vit.blocks.{i}")
                             for i in range(depth - 1)] + [dict(num_chs=embed_dim, reduction=patch_size,
                                                                module="vit.norm")]
        classifier = num_classes > 0
        self.mask_token = nn.Parameter(torch.zeros(embed_dim)) if mask_mode == "fill" and not classifier else None
        # MAE fine-tuning: the pooled patch tokens get a fresh LayerNorm in place of the pretrained final norm.
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if classifier else nn.Identity()
        if classifier:
            self.vit.norm = nn.Identity()
        if fixed_pos_embed:
            # MAE: fixed sin-cos table in MAE's channel layout, class token position zero; frozen in pretraining so
            # it never drifts, learnable in the classifier (MAE's fine-tuning trains timm's table).
            with torch.no_grad():
                self.vit.pos_embed.zero_()
                self.vit.pos_embed[0, self.vit.num_prefix_tokens:] = mae_sincos_pos_embed(self.grid_size, embed_dim)
            self.vit.pos_embed.requires_grad_(classifier)
        self._init_mae()

    def _init_mae(self) -> None:
        """MAE's `initialize_weights`: xavier-uniform Linears with zero bias, the patch embedding initialised as a
        Linear on its flattened kernel, normal(0.02) class and mask tokens; the head as MAE's fine-tuning (2e-5)."""
        self.apply(mae_init_linear)
        w = self.vit.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(self.vit.cls_token, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        if isinstance(self.vit.head, nn.Linear):
            trunc_normal_(self.vit.head.weight, std=2e-5)

    def no_weight_decay(self) -> set[str]:
        return {"vit.pos_embed", "vit.cls_token"} | self._mask_token_name()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-wise lr decay as MAE's `get_layer_id_for_vit`: embeddings (and the mask token) 0, block i -> i + 1;
        the final norm, fc_norm and head match nothing, so they form the last layer (timm's ViT folds its final
        norm into the last block instead)."""
        return dict(stem=r"^(?:vit\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)|mask_token)",
                    blocks=r"^vit\.blocks\.(\d+)\.")

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """A timm / official-MAE ViT state dict -> our keys (`from_timm_keys`); ours pass unchanged."""
        return from_timm_keys(state_dict)

    def _embed(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] -> patch tokens with position: [B, L, C]."""
        return self._add_pos(self.vit.patch_embed(x))

    def _add_pos(self, tokens: Tensor) -> Tensor:
        """[B, L, C] patch tokens (all L, raster order) -> the same plus their position embedding."""
        return tokens + self.vit.pos_embed[:, self.vit.num_prefix_tokens:]

    def _prepend_prefix(self, x: Tensor) -> Tensor:
        """[B, N, C] -> [B, 1 + N, C]: class token (with its own position) in front."""
        cls = (self.vit.cls_token + self.vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def _transform(self, x: Tensor) -> Tensor:
        """[B, P + N, C] tokens -> the same after every block and the final norm."""
        x = self.vit.norm_pre(x)
        for blk in self.vit.blocks:  # written out (not `_run_blocks`) so that torch.jit.script compiles it
            x = self._run_block(blk, x) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(x)
        return self.vit.norm(x)

    def _tokens_map(self, tokens: Tensor) -> Tensor:
        """[B, P + N, C] -> [B, C, h, w]: the patch tokens on their grid."""
        B, _, C = tokens.shape
        gh, gw = self.grid_size
        return tokens[:, self.vit.num_prefix_tokens:].transpose(1, 2).reshape(B, C, gh, gw)

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: [B, 3, H, W]; mask: [B, Gh, Gw] (True = hidden).

        drop -> [B, 1 + N_visible, C]; fill -> [B, C, H/p, W/p].
        """
        hidden = mask_to_tokens(mask, self.mask_unit // self.patch_size).flatten(1)  # [B, L]
        if self.mask_token is None and self.mask_mode == "fill":
            raise ValueError("this ViT was built as a classifier (num_classes > 0), which has no mask token; build it "
                             "with num_classes=0 to pretrain")
        if self.mask_mode == "fill":
            # SimMIM: the mask token replaces the patch embedding BEFORE the position embedding is added, so hidden
            # tokens still say where they are (after it, every hidden token would be the same vector).
            tokens = self.vit.patch_embed(x)
            B, L, C = tokens.shape
            tokens = self._add_pos(torch.where(hidden[..., None], self.mask_token.to(tokens.dtype), tokens))
            out = self._transform(self._prepend_prefix(tokens))[:, self.vit.num_prefix_tokens:]
            return out.transpose(1, 2).reshape(B, C, *self.grid_size)
        tokens = self._embed(x)
        B, L, C = tokens.shape
        # Every image must hide the same count (the masking service guarantees it; `visible_order` refuses other
        # batches), so the gather stays rectangular.
        keep = visible_order(hidden, self.hidden_units, (self.mask_unit // self.patch_size) ** 2)  # [B, V]
        tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, C))
        return self._transform(self._prepend_prefix(tokens))

    def forward_features(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] -> [B, C, H/p, W/p], unmasked, after the final norm (none in a classifier)."""
        return self._tokens_map(self._transform(self._prepend_prefix(self._embed(x))))

    def _feature_maps(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] -> depth maps [B, C, H/p, W/p]: each block's output, the last one after the final norm."""
        t = self.vit.norm_pre(self._prepend_prefix(self._embed(x)))
        maps = []
        for blk in self.vit.blocks:
            t = self._run_block(blk, t)
            maps.append(t)
        maps[-1] = self.vit.norm(maps[-1])
        return [self._tokens_map(m) for m in maps]

    def forward_cls(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] -> [B, C]: the normed class token, unmasked (MAE's linear-probe feature)."""
        return self._transform(self._prepend_prefix(self._embed(x)))[:, 0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """x: [B, C, h, w] -> average of the patch tokens (no class token) -> fc_norm -> logits: MAE fine-tuning's
        global pool."""
        x = self.vit.head_drop(self.fc_norm(x.mean(dim=(2, 3))))
        return x if pre_logits else self.vit.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """As a classifier (num_classes > 0), MAE's: pool the blocks' output (the classifier has no final norm)."""
        return self.forward_head(self.forward_features(x))


def from_timm_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A plain timm / official-MAE ViT state dict (`blocks.0.attn.qkv.weight`, `pos_embed`, ...) -> our `vit.` keys;
    a state dict already in our layout (any `vit.` key) is returned as is.

    MAE's pretraining checkpoints also hold the decoder (`decoder_*`) and the decoder's mask token ([1, 1, C_dec]);
    neither belongs to the encoder.
    """
    if any(k.startswith("vit.") for k in sd):
        return sd
    return {f"vit.{k}": v for k, v in sd.items()
            if not k.startswith("decoder") and not (k == "mask_token" and v.ndim == 3)}


def to_timm_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ViT encoder's state dict -> timm VisionTransformer keys (the `vit.` part; our SimMIM mask token and MAE
    fc_norm have no place in timm's model)."""
    return {k[len("vit."):]: v for k, v in sd.items() if k.startswith("vit.")}


def _vit(img_size=224, **kwargs) -> ViTEncoder:
    return ViTEncoder(img_size=img_size, **strip_timm_kwargs(kwargs))


# timm reads `default_cfgs` when `register` runs: the preprocessing and the names of the stem and the classifier.
default_cfgs = timm_glue.default_cfgs({
    "mim_vit_tiny_patch16": timm_glue.cfg("vit.patch_embed.proj", "vit.head"),
    "mim_vit_small_patch16": timm_glue.cfg("vit.patch_embed.proj", "vit.head"),
    "mim_vit_base_patch16": timm_glue.cfg("vit.patch_embed.proj", "vit.head"),
    "mim_vit_large_patch16": timm_glue.cfg("vit.patch_embed.proj", "vit.head"),
    "mim_vit_huge_patch16": timm_glue.cfg("vit.patch_embed.proj", "vit.head"),
    "mim_vit_huge_patch14": timm_glue.cfg("vit.patch_embed.proj", "vit.head"),
})


@timm_glue.register
def mim_vit_tiny_patch16(pretrained: bool = False, **kwargs) -> ViTEncoder:
    return _vit(**{**dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs})


@timm_glue.register
def mim_vit_small_patch16(pretrained: bool = False, **kwargs) -> ViTEncoder:
    return _vit(**{**dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs})


@timm_glue.register
def mim_vit_base_patch16(pretrained: bool = False, **kwargs) -> ViTEncoder:
    return _vit(**{**dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs})


@timm_glue.register
def mim_vit_large_patch16(pretrained: bool = False, **kwargs) -> ViTEncoder:
    return _vit(**{**dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), **kwargs})


@timm_glue.register
def mim_vit_huge_patch16(pretrained: bool = False, **kwargs) -> ViTEncoder:
    return _vit(**{**dict(patch_size=16, embed_dim=1280, depth=32, num_heads=16), **kwargs})


@timm_glue.register
def mim_vit_huge_patch14(pretrained: bool = False, **kwargs) -> ViTEncoder:
    """MAE's ViT-H/14 (the paper's huge model uses 14-px patches; 224 / 14 = 16 units a side)."""
    return _vit(**{**dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), **kwargs})
