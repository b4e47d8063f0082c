"""GLNet (GLMix blocks) as a SimMIM fill-mode encoder, written from the GLMix paper (Sec. 3, Fig. 4, App. A).

A GLMix block sees the feature map twice: as a fine grid, processed by a depth-wise conv branch, and as a small set
of semantic slots, processed by MHSA. Soft clustering (grid -> slots) and dispatching (slots -> grid) are two dense
matrix products sharing one correspondence-logit matrix, so no iteration and no loop over slots is involved.

GLNet-STL keeps Swin-T's macro layout (4x4 patch embedding, 2x2 patch merging, [2, 2, 6, 2] blocks, FFN x4) with the
window attention of stages 1-3 replaced by GLMix and full attention in stage 4. GLNet-4G/9G/16G add the paper's
"advanced designs": overlapped 3x3 stride-2 convs for every down-sampling, a hybrid stage 3 (GLMix and full MHSA
alternate), a 3x3 depth-wise conv position encoding before every mixer, a deeper [4, 4, 18, 4] layout with FFN x3,
and a 3x3 depth-wise conv inside the FFN.

Blocks work channels-last ([B, H, W, C]) so LayerNorm, the FFN and the slot products are plain matmuls; only the
depth-wise convs see NCHW. Masking is SimMIM's: hidden 32-px cells become a learned mask token at stride 4.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention, DropPath, LayerNorm, LayerNorm2d, Mlp, PatchEmbed, trunc_normal_
from timm.models.swin_transformer import PatchMerging
from timm.models.vision_transformer import init_weights_vit_timm
from torch import Tensor, nn

from mimtrain.encoders import timm_glue
from mimtrain.encoders.base import (blank_hidden_pixels, fill_tokens, resolve_mask_unit, staged_group_matcher,
                                    strip_timm_kwargs)

MIXERS = ("glmix", "attn", "hybrid")  # per-stage spatial mixer: GLMix, full MHSA, or the two alternating


def _nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


class GLMix(nn.Module):
    """Local conv branch on the grid + global MHSA branch on semantic slots, fused by addition (Fig. 4).

    Args:
        dim: channels C.
        num_heads: heads of the MHSA over the slots.
        num_slots: M, a perfect square; slots are initialised by adaptive average pooling to sqrt(M) x sqrt(M).
        kernel_size: depth-wise kernel of the local branch.
        init_scale: initial value of the learnable scale that multiplies the cosine-similarity logits.
    """

    def __init__(self, dim: int, num_heads: int, num_slots: int = 64, kernel_size: int = 5, init_scale: float = 10.0):
        super().__init__()
        side = math.isqrt(num_slots)
        if side * side != num_slots:
            raise ValueError(f"num_slots must be a perfect square (slots come from a square pooling grid), "
                             f"got {num_slots}")
        self.slot_grid = (side, side)
        # Local branch: 1x1 conv -> depth-wise kxk -> 1x1 conv; the 1x1 convs are Linear layers on [B, H, W, C].
        self.local_in = nn.Linear(dim, dim)
        self.local_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.local_out = nn.Linear(dim, dim)
        # Log-parameterised so the scale stays positive; clamped in `assign` (at 100) so the softmax cannot collapse
        # to one-hot and stop passing gradient.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.slot_attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.keep_assign = False  # when set, forward stores the clustering weights in `last_assign` (for logging)
        self.last_assign: Tensor | None = None

    def assign(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Soft assignment between the grid and the slots, Eq. (1)-(2) and the two softmaxes of Eq. (3)-(4).

        Args:
            x: [B, H, W, C] normalised block input.

        Returns:
            cluster: [B, M, H*W], softmax over positions (each slot is a convex combination of grid features).
            dispatch: [B, H*W, M], softmax over slots (each position is a convex combination of slots).
        """
        init = F.adaptive_avg_pool2d(_nchw(x), self.slot_grid).flatten(2).transpose(1, 2)  # [B, M, C]
        grid = x.flatten(1, 2)  # [B, N, C]
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        logits = scale * (F.normalize(init, dim=-1) @ F.normalize(grid, dim=-1).transpose(1, 2))  # [B, M, N]
        return logits.softmax(dim=-1), logits.transpose(1, 2).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        B, H, W, C = x.shape
        local = self.local_out(_nhwc(self.local_dw(_nchw(self.local_in(x)))))
        cluster, dispatch = self.assign(x)
        slots = self.slot_attn(cluster @ x.flatten(1, 2))  # clustering, then MHSA over the M slots: [B, M, C]
        glob = (dispatch @ slots).view(B, H, W, C)  # dispatching back to the grid
        if self.keep_assign:
            self.last_assign = cluster.detach().view(B, -1, H, W)
        return local + glob


class GridAttention(Attention):
    """Full MHSA over every grid position (stage 4, and every other block of the hybrid stage 3).

    No position bias: position comes from the convs (local branch, conv position encoding), and the block then
    works at any resolution and aspect ratio.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        B, H, W, C = x.shape
        return super().forward(x.reshape(B, H * W, C)).view(B, H, W, C)


class ConvFfn(nn.Module):
    """FFN with a residual 3x3 depth-wise conv between the two projections (App. A, design 5). x: [B, H, W, C]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = x + _nhwc(self.dw(_nchw(x)))
        return self.fc2(self.act(x))


class GLNetBlock(nn.Module):
    """[conv position encoding] -> pre-norm spatial mixer (GLMix or full MHSA) -> pre-norm FFN, all residual.

    x: [B, H, W, C] -> [B, H, W, C].
    """

    def __init__(self, dim: int, num_heads: int, mixer: str = "glmix", mlp_ratio: float = 4.0, conv_pos: bool = False,
                 conv_ffn: bool = False, num_slots: int = 64, local_kernel: int = 5, drop_path: float = 0.0):
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if conv_pos else None
        self.norm1 = LayerNorm(dim)
        if mixer == "glmix":
            self.mixer = GLMix(dim, num_heads, num_slots=num_slots, kernel_size=local_kernel)
        else:
            self.mixer = GridAttention(dim, num_heads=num_heads, qkv_bias=True)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.ffn = ConvFfn(dim, hidden) if conv_ffn else Mlp(dim, hidden)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.pos is not None:
            x = x + _nhwc(self.pos(_nchw(x)))
        x = x + self.drop_path1(self.mixer(self.norm1(x)))
        return x + self.drop_path2(self.ffn(self.norm2(x)))


class OverlapStem(nn.Module):
    """Two overlapped 3x3 stride-2 convs (App. A, design 1). x: [B, 3, H, W] -> [B, H/4, W/4, C]."""

    def __init__(self, dim: int, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(dim // 2)  # LayerNorm, not BatchNorm: batch statistics would mix hidden pixels in
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(_nhwc(self.conv2(self.act(self.norm1(self.conv1(x))))))


class ConvDownsample(nn.Module):
    """Overlapped 3x3 stride-2 conv between stages (App. A, design 1). x: [B, H, W, C] -> [B, H/2, W/2, C']."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(_nhwc(self.conv(_nchw(x))))


class GLNetStage(nn.Module):
    """Optional 2x down-sampling, then `depth` blocks. x: [B, H, W, C_in] -> [B, H', W', C]."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, mixer: str, downsample: str | None,
                 drop_path: Sequence[float], **block_kwargs):
        super().__init__()
        if downsample == "merge":
            self.downsample = PatchMerging(in_dim, out_dim=dim)  # Swin's 2x2 concat + LN + linear
        elif downsample == "conv":
            self.downsample = ConvDownsample(in_dim, dim)
        else:
            self.downsample = nn.Identity()
        # "hybrid": GLMix first (as in the STL stage 3 the paper visualises), then full MHSA, alternating.
        kinds = [("glmix" if i % 2 == 0 else "attn") if mixer == "hybrid" else mixer for i in range(depth)]
        self.blocks = nn.Sequential(*[
            GLNetBlock(dim, num_heads, mixer=kind, drop_path=drop_path[i], **block_kwargs)
            for i, kind in enumerate(kinds)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class GLNet(timm_glue.TimmNative, nn.Module):
    """GLNet + the mimtrain encoder contract (fill mode only; see `encoders/base.py`).

    Args:
        img_size: nominal input size; the network itself works at any size divisible by 32.
        embed_dim: base channels C (stage i has C * 2**i).
        depths: blocks per stage.
        num_heads: heads per stage; default C * 2**i / 32 (head dim 32, as Swin).
        mlp_ratio: FFN expansion e.
        stage_mixers: per stage one of "glmix", "attn" (full MHSA), "hybrid" (GLMix and full MHSA alternating).
        overlap_embed: overlapped 3x3 s2 conv stem and down-sampling instead of 4x4 patches and 2x2 merging.
        conv_pos: 3x3 depth-wise residual conv before every block's mixer.
        conv_ffn: 3x3 depth-wise residual conv inside every FFN.
        num_slots: semantic slots per GLMix block.
        local_kernel: depth-wise kernel of the GLMix local branch.
        num_classes: classification classes (0: no head).
        drop_path_rate: stochastic depth, linear over all blocks.
        mask_unit: pixels per mask cell, a multiple of 4 (None = 32).
        mask_mode: only "fill" (local convs need the full grid).
    """

    classifier_modules = ("head",)  # `base.classifier_keys`: what a new task replaces
    pretraining_only = ("mask_token",)  # SimMIM's; a classifier (num_classes > 0) has none
    script_limits = "GLMix blocks keep their slot assignment as module state for `slot_maps`"

    patch_size = 4
    num_prefix_tokens = 0

    def __init__(self, img_size: int | tuple[int, int] = 224, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] | None = None, mlp_ratio: float = 4.0,
                 stage_mixers: Sequence[str] = ("glmix", "glmix", "glmix", "attn"), overlap_embed: bool = False,
                 conv_pos: bool = False, conv_ffn: bool = False, num_slots: int = 64, local_kernel: int = 5,
                 num_classes: int = 1000, drop_path_rate: float = 0.0, mask_unit: int | None = None,
                 mask_mode: str = "fill"):
        super().__init__()
        if mask_mode != "fill":
            raise ValueError(f"GLNet supports only mask_mode='fill' (its convs and slot pooling need the whole grid), "
                             f"got {mask_mode!r}")
        if len(depths) != 4 or len(stage_mixers) != 4 or any(m not in MIXERS for m in stage_mixers):
            raise ValueError(f"GLNet needs 4 depths and 4 stage_mixers from {MIXERS}, got {depths}, {stage_mixers}")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.mask_unit = resolve_mask_unit(mask_unit, 32, self.patch_size, "GLNet")
        self.mask_mode = mask_mode
        dims = [embed_dim * 2 ** i for i in range(4)]
        num_heads = list(num_heads) if num_heads is not None else [max(1, d // 32) for d in dims]
        self.embed_dim = dims[-1]
        self.num_classes = num_classes

        if overlap_embed:
            self.patch_embed = OverlapStem(embed_dim)
        else:
            self.patch_embed = PatchEmbed(None, self.patch_size, 3, embed_dim, norm_layer=LayerNorm,
                                          output_fmt="NHWC", strict_img_size=False)
        self.mask_token = nn.Parameter(torch.zeros(embed_dim)) if num_classes == 0 else None
        n_blocks = sum(depths)
        rates = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linear, as Swin
        block_kwargs = dict(mlp_ratio=mlp_ratio, conv_pos=conv_pos, conv_ffn=conv_ffn, num_slots=num_slots,
                            local_kernel=local_kernel)
        stages, start = [], 0
        for i in range(4):
            down = None if i == 0 else ("conv" if overlap_embed else "merge")
            stages.append(GLNetStage(dims[max(i - 1, 0)], dims[i], depths[i], num_heads[i], stage_mixers[i], down,
                                     rates[start:start + depths[i]], **block_kwargs))
            start += depths[i]
        self.stages = nn.ModuleList(stages)
        self.norm = LayerNorm(dims[-1])
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}") for i in range(3)]
        self.feature_info.append(dict(num_chs=dims[-1], reduction=32, module="norm"))
        self.apply(partial(init_weights_vit_timm, needs_reset=False))  # trunc-normal Linear, zero bias
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return self._mask_token_name() | {n for n, _ in self.named_parameters() if n.endswith("logit_scale")}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-wise lr decay: stem 0, then the blocks stage by stage (a downsampler joins the first block after
        it); final norm and head last."""
        return staged_group_matcher(r"^(?:patch_embed|mask_token)", "stages", coarse)

    def _glmix_blocks(self, stage: int) -> list[GLMix]:
        return [b.mixer for b in self.stages[stage].blocks if isinstance(b.mixer, GLMix)]

    def _tokens(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x: [B, 3, H, W]; mask: [B, H/u, W/u] or None -> stride-4 tokens [B, H/4, W/4, C], hidden ones filled."""
        if mask is None:
            return self.patch_embed(x)
        if isinstance(self.patch_embed, OverlapStem):
            # The stem's 3x3 convs straddle cell borders: blank hidden pixels so visible tokens never see them.
            x = blank_hidden_pixels(x, mask)
        return fill_tokens(self.patch_embed(x), mask, self._mask_token(), channels_last=True)

    def _features(self, t: Tensor) -> list[Tensor]:
        """t: [B, H/4, W/4, C] -> 4 NCHW maps at strides 4, 8, 16, 32 (the last one normalised)."""
        feats = []
        for i, stage in enumerate(self.stages):
            t = self._run_blocks(stage.blocks, stage.downsample(t))
            feats.append(_nchw(self.norm(t) if i == 3 else t).contiguous())
        return feats

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """SimMIM forward. x: [B, 3, H, W]; mask: [B, H/u, W/u], True = hidden -> [B, 8C, H/32, W/32]."""
        return self._features(self._tokens(x, mask))[-1]

    def _feature_maps(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] -> [[B, C, H/4, W/4], [B, 2C, H/8, W/8], [B, 4C, H/16, W/16], [B, 8C, H/32, W/32]]."""
        return self._features(self._tokens(x, None))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """x: [B, 8C, h, w] last map -> global average pool -> [B, num_classes] (or [B, 8C] with pre_logits)."""
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def extra_views(self, images: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Where each semantic slot looks, for the first image: {"slot_maps": [M, 1, h, w]}, each scaled to max 1."""
        was_training = self.training
        self.eval()  # no drop path, no RNG draws: logging must not change the training run
        try:
            maps = self.slot_maps(images[:1], mask[:1])[0].float()  # [M, h, w], sums to 1 per slot
        finally:
            self.train(was_training)
        return {"slot_maps": (maps / maps.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12))[:, None]}

    @torch.no_grad()
    def slot_maps(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Soft-clustering weights of the last GLMix block of stage 3 (the paper's Fig. 5 visualisation).

        Args:
            x: [B, 3, H, W] images.
            mask: optional [B, H/u, W/u] SimMIM mask, to see the maps of the masked input the encoder trains on.

        Returns:
            [B, M, H/16, W/16]; each slot's map sums to 1 over positions.
        """
        stage = 2 if self._glmix_blocks(2) else max((i for i in range(4) if self._glmix_blocks(i)), default=None)
        if stage is None:
            raise ValueError("this GLNet has no GLMix block, so it has no slot maps")
        block = self._glmix_blocks(stage)[-1]
        block.keep_assign = True
        try:
            t = self._tokens(x, mask)
            for s in self.stages[:stage + 1]:
                t = s(t)
            return block.last_assign
        finally:
            block.keep_assign, block.last_assign = False, None


def _glnet(**kwargs) -> GLNet:
    return GLNet(**strip_timm_kwargs(kwargs))


_ADVANCED = dict(depths=(4, 4, 18, 4), mlp_ratio=3.0, stage_mixers=("glmix", "glmix", "hybrid", "attn"),
                 overlap_embed=True, conv_pos=True, conv_ffn=True)


# timm reads `default_cfgs` when `register` runs: the preprocessing and the names of the stem and the classifier.
default_cfgs = timm_glue.default_cfgs({
    "glnet_stl": timm_glue.cfg("patch_embed.proj", "head"),  # STL: a single-conv stem
    "glnet_4g": timm_glue.cfg("patch_embed.conv1", "head"),
    "glnet_9g": timm_glue.cfg("patch_embed.conv1", "head"),
    "glnet_16g": timm_glue.cfg("patch_embed.conv1", "head"),
})


@timm_glue.register
def glnet_stl(pretrained: bool = False, **kwargs) -> GLNet:
    """GLNet-STL: Swin-T layout, C 96, [2, 2, 6, 2], FFN x4 (30.3M params, 4.4G FLOPs in the paper)."""
    return _glnet(**{**dict(embed_dim=96, depths=(2, 2, 6, 2), mlp_ratio=4.0), **kwargs})


@timm_glue.register
def glnet_4g(pretrained: bool = False, **kwargs) -> GLNet:
    """GLNet-4G: advanced designs, C 64, [4, 4, 18, 4], FFN x3 (27.0M, 4.5G)."""
    return _glnet(**{**_ADVANCED, "embed_dim": 64, **kwargs})


@timm_glue.register
def glnet_9g(pretrained: bool = False, **kwargs) -> GLNet:
    """GLNet-9G: as 4G with C 96 (61M, 9.7G)."""
    return _glnet(**{**_ADVANCED, "embed_dim": 96, **kwargs})


@timm_glue.register
def glnet_16g(pretrained: bool = False, **kwargs) -> GLNet:
    """GLNet-16G: as 4G with C 128 (106M in the paper's Table 3, 16.7G)."""
    return _glnet(**{**_ADVANCED, "embed_dim": 128, **kwargs})
