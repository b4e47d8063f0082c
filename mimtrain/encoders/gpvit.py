"""GPViT: a plain, high-resolution (stride 8) vision transformer with group propagation, as a fill-mode MIM encoder.

Written from "GPViT: A High Resolution Non-Hierarchical Vision Transformer with Group Propagation" (ICLR 2023),
Sec. 3, Fig. 3 and Table 11:

- convolutional stem (7x7 conv stride 2, 4x4 conv stride 4) -> image tokens at stride 8, plus a learned position
  embedding;
- 12 layers at stride 8: GP blocks at layers {1, 4, 7, 10} counted from 0 (Fig. 3a reads L GP L L GP L L GP L L GP L)
  with {64, 32, 32, 16} group tokens, the rest local attention blocks using LePE attention (CSWin's cross-shaped
  strips, strip size 2, 12 heads, FFN x4);
- GP block = feature grouping (cross-attention of learnable group tokens over image tokens, identity Q/V),
  group propagation (MLP-Mixer), feature ungrouping (image tokens query the groups; concatenation + projection
  instead of the first residual), FFN, depth-wise conv.

Local attention and convolutions need the whole token grid, so masked tokens are FILLED (SimMIM): hidden pixels are
blanked before the overlapping conv stem, and hidden stride-8 tokens are replaced by a learned mask token.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, LayerNorm2d, Mlp, to_2tuple, trunc_normal_
from torch import Tensor, nn

from mimtrain.encoders import timm_glue
from mimtrain.encoders.base import blank_hidden_pixels, fill_tokens, resolve_mask_unit, strip_timm_kwargs


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, L, C] -> [B, heads, L, C / heads]."""
    B, L, C = x.shape
    return x.view(B, L, num_heads, C // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[B, heads, L, d] -> [B, L, heads * d]."""
    B, h, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, h * d)


class ConvStem(nn.Module):
    """Fig. 3a stem: 7x7 conv (stride 2) -> LN -> GELU -> (p/2)x(p/2) conv (stride p/2) -> LN. x: [B, 3, H, W] ->
    [B, C, H/p, W/p].

    LayerNorm instead of BatchNorm so that a token never depends on other images of the batch (masked or not).
    """

    def __init__(self, embed_dim: int, patch_size: int = 8, stem_chs: int = 64):
        super().__init__()
        if patch_size % 2 or patch_size < 2:
            raise ValueError(f"GPViT's stem needs an even patch_size (2 x a strided patch conv), got {patch_size}")
        self.conv1 = nn.Conv2d(3, stem_chs, 7, stride=2, padding=3)
        self.norm1 = LayerNorm2d(stem_chs)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(stem_chs, embed_dim, patch_size // 2, stride=patch_size // 2)
        self.norm2 = LayerNorm2d(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class LePEAttention(nn.Module):
    """Cross-shaped strip attention with locally-enhanced positional encoding (CSWin's LePE attention).

    Half of the heads (and channels) attend within horizontal strips of `strip_size` rows spanning the full width,
    the other half within vertical strips of `strip_size` columns spanning the full height. LePE adds a 3x3
    depth-wise conv of the values, applied inside each strip (zero padding at strip borders). Every strip of a
    branch is one batch entry of a single `scaled_dot_product_attention` call. A grid side that `strip_size` does
    not divide is zero-padded and the padded keys are masked out, so results never depend on the padding.
    """

    def __init__(self, dim: int, num_heads: int = 12, strip_size: int = 2, qkv_bias: bool = True):
        super().__init__()
        if num_heads % 2 or dim % num_heads:
            raise ValueError(f"LePE attention needs an even head count dividing dim; got dim={dim}, heads={num_heads}")
        self.num_heads = num_heads
        self.strip_size = strip_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        half = dim // 2
        self.lepe_h = nn.Conv2d(half, half, 3, padding=1, groups=half)  # horizontal-strip branch
        self.lepe_v = nn.Conv2d(half, half, 3, padding=1, groups=half)  # vertical-strip branch
        self.proj = nn.Linear(dim, dim)

    def _row_strips(self, q: Tensor, k: Tensor, v: Tensor, lepe_weight: Tensor, lepe_bias: Tensor) -> Tensor:
        """Attention inside horizontal strips. q, k, v: [B, H, W, c] (c = half the channels) -> [B, H, W, c]."""
        B, H, W, c = q.shape
        s, heads = self.strip_size, self.num_heads // 2
        pad = (-H) % s
        if pad:  # zero rows: zero values keep LePE's zero padding at the strip border exact
            q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        n = (H + pad) // s  # strips per image
        L, d = s * W, c // heads

        def windows(t: Tensor) -> Tensor:  # [B, Hp, W, c] -> [B*n, heads, s*W, d]
            return t.reshape(B, n, s, W, heads, d).permute(0, 1, 4, 2, 3, 5).reshape(B * n, heads, L, d)

        attn_mask = None
        if pad:
            valid = (torch.arange(n * s, device=q.device) < H).view(n, s, 1).expand(n, s, W).reshape(1, n, 1, 1, L)
            attn_mask = valid.expand(B, n, 1, 1, L).reshape(B * n, 1, 1, L)
        out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v), attn_mask=attn_mask)
        v_img = v.reshape(B * n, s, W, c).permute(0, 3, 1, 2)  # [B*n, c, s, W]: one strip per batch entry
        lepe = F.conv2d(v_img, lepe_weight, lepe_bias, padding=lepe_weight.shape[-1] // 2, groups=c)
        out = out + lepe.view(B * n, heads, d, L).transpose(-1, -2)
        out = out.view(B, n, heads, s, W, d).permute(0, 1, 3, 4, 2, 5).reshape(B, n * s, W, c)
        return out[:, :H]

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        C = x.shape[-1]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        half = C // 2
        rows = self._row_strips(q[..., :half], k[..., :half], v[..., :half], self.lepe_h.weight, self.lepe_h.bias)
        # Vertical strips are row strips of the transposed grid; the kernel is transposed with it so it keeps
        # acting in image orientation.
        qt, kt, vt = (t[..., half:].transpose(1, 2) for t in (q, k, v))
        cols = self._row_strips(qt, kt, vt, self.lepe_v.weight.transpose(-1, -2), self.lepe_v.bias).transpose(1, 2)
        return self.proj(torch.cat([rows, cols], dim=-1))


class LocalBlock(nn.Module):
    """Pre-norm transformer block with LePE attention. x: [B, N, C] on an (H, W) grid -> [B, N, C]."""

    def __init__(self, dim: int, num_heads: int, strip_size: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = LePEAttention(dim, num_heads, strip_size)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        x = x + self.drop_path(self.attn(self.norm1(x).view(B, *hw, C)).view(B, N, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class GroupPropagationBlock(nn.Module):
    """GP block (Sec. 3.1): group -> propagate -> ungroup (concat + project) -> FFN -> depth-wise conv.

    x: [B, N, C] on an (H, W) grid -> [B, N, C]. Cost is linear in N: the only N-sized attentions are N x M.
    """

    def __init__(self, dim: int, num_groups: int, num_heads: int = 6, mlp_ratio: float = 4.0,
                 token_ratio: float = 0.5, channel_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"grouping heads ({num_heads}) must divide the channels ({dim})")
        self.num_heads = num_heads
        # Feature grouping (Eq. 2): queries are the group tokens themselves, values the (normed) image features.
        self.group_tokens = nn.Parameter(torch.zeros(num_groups, dim))
        self.norm_group = LayerNorm(dim)
        self.group_k = nn.Linear(dim, dim)
        # Group propagation (Eqs. 3-4): MLP-Mixer over the M groups, then over channels.
        self.norm_token = LayerNorm(dim)
        self.token_mlp = Mlp(num_groups, max(1, int(num_groups * token_ratio)))
        self.norm_channel = LayerNorm(dim)
        self.channel_mlp = Mlp(dim, int(dim * channel_ratio))
        # Feature ungrouping (Eqs. 5-6): image tokens query the groups; W_proj maps concat(U, X) back to C.
        self.norm_query = LayerNorm(dim)
        self.norm_kv = LayerNorm(dim)
        self.ungroup_q = nn.Linear(dim, dim)
        self.ungroup_kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim * 2, dim)
        self.norm_ffn = LayerNorm(dim)
        self.ffn = Mlp(dim, int(dim * mlp_ratio))
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def group(self, x: Tensor) -> Tensor:
        """Feature grouping. x: [B, N, C] -> grouped features Y: [B, M, C], per head a softmax-weighted sum of x."""
        xn = self.norm_group(x)
        q = _heads(self.group_tokens.unsqueeze(0).to(x.dtype), self.num_heads).expand(x.shape[0], -1, -1, -1)
        out = F.scaled_dot_product_attention(q, _heads(self.group_k(xn), self.num_heads), _heads(xn, self.num_heads))
        return _merge_heads(out)

    def propagate(self, y: Tensor) -> Tensor:
        """Group propagation (MLP-Mixer). y: [B, M, C] -> [B, M, C]."""
        y = y + self.drop_path(self.token_mlp(self.norm_token(y).transpose(1, 2)).transpose(1, 2))
        return y + self.drop_path(self.channel_mlp(self.norm_channel(y)))

    def ungroup(self, x: Tensor, y: Tensor) -> Tensor:
        """Feature ungrouping. x: [B, N, C] image tokens, y: [B, M, C] groups -> U: [B, N, C] (before the concat)."""
        q = _heads(self.ungroup_q(self.norm_query(x)), self.num_heads)
        k, v = self.ungroup_kv(self.norm_kv(y)).chunk(2, dim=-1)
        return _merge_heads(F.scaled_dot_product_attention(q, _heads(k, self.num_heads), _heads(v, self.num_heads)))

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        y = self.propagate(self.group(x))
        z = self.proj(torch.cat([self.ungroup(x, y), x], dim=-1))  # Eq. 6: concatenation replaces the residual
        z = z + self.drop_path(self.ffn(self.norm_ffn(z)))
        z = self.dwconv(z.transpose(1, 2).reshape(B, C, *hw))
        return z.flatten(2).transpose(1, 2)


class GPViT(timm_glue.TimmNative, nn.Module):
    """GPViT encoder + the mimtrain encoder contract (fill mode only; see `encoders/base.py`).

    Plain: every level is at stride 8, one per block (`feature_info`, as timm's ViT; the last one the final normed
    map); `forward_pyramid` derives strides 4/8/16/32 from the final map for dense heads.
    """

    classifier_modules = ("head",)  # `base.classifier_keys`: what a new task replaces
    pretraining_only = ("mask_token",)  # SimMIM's; a classifier (num_classes > 0) has none
    script_limits = fx_limits = ("shape-dependent control flow: LePE strips pad the token grid by its size, and the "
                                 "position table is resized when the input size differs")

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 8, embed_dim: int = 216,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, strip_size: int = 2,
                 gp_positions: tuple[int, ...] = (1, 4, 7, 10), group_nums: tuple[int, ...] = (64, 32, 32, 16),
                 group_heads: int = 6, mixer_token_ratio: float = 0.5, mixer_channel_ratio: float = 4.0,
                 stem_chs: int = 64, num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 mask_unit: int | None = None, mask_mode: str = "fill"):
        super().__init__()
        if mask_mode != "fill":
            raise ValueError(f"GPViT supports only mask_mode='fill' (its local attention and convolutions need the "
                             f"whole token grid, so hidden tokens cannot be dropped); got {mask_mode!r}")
        if len(gp_positions) != len(group_nums):
            raise ValueError(f"gp_positions {gp_positions} and group_nums {group_nums} must have the same length")
        if any(not 0 <= p < depth for p in gp_positions) or len(set(gp_positions)) != len(gp_positions):
            raise ValueError(f"gp_positions {gp_positions} are distinct layer indices counted from 0 and must lie in "
                             f"[0, {depth - 1}]")
        self.patch_size = patch_size
        self.mask_unit = resolve_mask_unit(mask_unit, 32, patch_size, "GPViT")
        self.mask_mode = mask_mode
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 0
        self.num_classes = num_classes
        img_size = to_2tuple(img_size)
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)

        self.stem = ConvStem(embed_dim, patch_size, stem_chs)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *self.grid_size))
        self.mask_token = nn.Parameter(torch.zeros(embed_dim)) if num_classes == 0 else None
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # plain floats: meta-device safe
        groups = dict(zip(gp_positions, group_nums))
        self.blocks = nn.ModuleList([
            GroupPropagationBlock(embed_dim, groups[i], group_heads, mlp_ratio, mixer_token_ratio,
                                  mixer_channel_ratio, dpr[i]) if i in groups
            else LocalBlock(embed_dim, num_heads, strip_size, mlp_ratio, dpr[i])
            for i in range(depth)])
        self.norm = LayerNorm(embed_dim)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}")
                             for i in range(depth - 1)] + [dict(num_chs=embed_dim, reduction=patch_size, module="norm")]
        self.pyramid_info = [dict(num_chs=embed_dim, reduction=patch_size * f) for f in (0.5, 1, 2, 4)]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)
        for blk in self.blocks:
            if isinstance(blk, GroupPropagationBlock):
                trunc_normal_(blk.group_tokens, std=0.02)
                # Eq. 6 ends on a depth-wise conv with no residual; starting it as the identity keeps the residual
                # stream intact at initialisation (a random kernel would shrink and blur every GP block's output).
                with torch.no_grad():
                    blk.dwconv.weight.zero_()
                    blk.dwconv.weight[:, :, 1, 1] = 1.0
                    blk.dwconv.bias.zero_()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-wise lr decay: stem, position table and mask token 0, block i -> i + 1; final norm and head last."""
        return dict(stem=r"^(?:stem|pos_embed|mask_token)", blocks=r"^blocks\.(\d+)\.")

    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed"} | self._mask_token_name()
        return names | {f"blocks.{i}.group_tokens" for i, b in enumerate(self.blocks)
                        if isinstance(b, GroupPropagationBlock)}

    def _pos_embed(self, hw: tuple[int, int]) -> Tensor:
        """The learned table at the token grid hw: [1, C, h, w], bicubically resized when the input size differs."""
        if tuple(hw) == self.grid_size:
            return self.pos_embed
        return F.interpolate(self.pos_embed, size=hw, mode="bicubic", align_corners=False)

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resize a checkpoint's position embedding to this model's grid (e.g. pretrained at 224, fine-tuned at 512).

        Any 4-D entry whose key ends in `pos_embed` is resized bicubically; other entries pass through untouched.
        """
        out = dict(state_dict)
        for key, value in state_dict.items():
            if key.endswith("pos_embed") and value.ndim == 4 and tuple(value.shape[-2:]) != self.grid_size:
                out[key] = F.interpolate(value.float(), size=self.grid_size, mode="bicubic",
                                         align_corners=False).to(value.dtype)
        return out

    def _transform(self, tokens: Tensor, every_block: bool = False) -> list[Tensor]:
        """tokens: [B, C, h, w] stem output (hidden positions already filled) -> [final map [B, C, h, w]], or with
        every_block each block's output map, the last one after the final norm."""
        self._refuse_fx(tokens)
        B, C, h, w = tokens.shape
        x = (tokens + self._pos_embed((h, w)).to(tokens.dtype)).flatten(2).transpose(1, 2)  # [B, N, C]
        maps = []
        for blk in self.blocks:
            x = self._run_block(blk, x, (h, w))
            if every_block:
                maps.append(x)
        maps = maps[:-1] + [self.norm(x)]
        return [m.transpose(1, 2).reshape(B, C, h, w) for m in maps]

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: [B, 3, H, W]; mask: [B, H/u, W/u] (True = hidden) -> [B, C, H/8, W/8].

        The stem's 13-px receptive field crosses token and cell borders, so hidden pixels are zeroed first; hidden
        tokens then become the learned mask token (SimMIM).
        """
        tokens = self.stem(blank_hidden_pixels(x, mask))
        return self._transform(fill_tokens(tokens, mask, self._mask_token()))[-1]

    def forward_features(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] -> [B, C, H/8, W/8], unmasked."""
        return self._transform(self.stem(x))[-1]

    def _feature_maps(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] -> depth maps [B, C, H/8, W/8], one per block (the last one normed)."""
        return self._transform(self.stem(x), every_block=True)

    def forward_pyramid(self, x: Tensor) -> list[Tensor]:
        """Simple parameter-free feature pyramid for dense heads (ViTDet-style, from the single stride-8 map).

        x: [B, 3, H, W] -> maps at strides 4, 8, 16, 32, each [B, C, ceil(H/s), ceil(W/s)] (`pyramid_info`):
        bilinear x2 upsampling, identity, 2x2 and 4x4 max-pooling. Learned up-sampling (deconvs) belongs in the
        dense neck, so that the encoder's parameter count and checkpoint stay those of the classification model.
        """
        f = self.forward_features(x)
        up = F.interpolate(f, scale_factor=2, mode="bilinear", align_corners=False)
        down2 = F.max_pool2d(f, 2, ceil_mode=True)
        down4 = F.max_pool2d(f, 4, ceil_mode=True)
        return [up, f, down2, down4]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average of the final stride-8 map [B, C, h, w] (the paper's output) -> logits [B, num_classes]."""
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _gpvit(channels: int, **kwargs) -> GPViT:
    """Table 11 variants differ only in width; kwargs (tests, recipes) may override anything, width included."""
    return GPViT(**{"embed_dim": channels, **strip_timm_kwargs(kwargs)})


# timm reads `default_cfgs` when `register` runs: the preprocessing and the names of the stem and the classifier.
default_cfgs = timm_glue.default_cfgs({
    "gpvit_l1": timm_glue.cfg("stem.conv1", "head"),
    "gpvit_l2": timm_glue.cfg("stem.conv1", "head"),
    "gpvit_l3": timm_glue.cfg("stem.conv1", "head"),
    "gpvit_l4": timm_glue.cfg("stem.conv1", "head"),
})


@timm_glue.register
def gpvit_l1(pretrained: bool = False, **kwargs) -> GPViT:
    """GPViT-L1: 216 channels (Table 11: 9.3M params, 5.8 GFLOPs at 224)."""
    return _gpvit(216, **kwargs)


@timm_glue.register
def gpvit_l2(pretrained: bool = False, **kwargs) -> GPViT:
    """GPViT-L2: 348 channels (Table 10: 23.8M params; 15.0 GFLOPs at 224)."""
    return _gpvit(348, **kwargs)


@timm_glue.register
def gpvit_l3(pretrained: bool = False, **kwargs) -> GPViT:
    """GPViT-L3: 432 channels (Table 11: 36.2M params, 22.9 GFLOPs at 224)."""
    return _gpvit(432, **kwargs)


@timm_glue.register
def gpvit_l4(pretrained: bool = False, **kwargs) -> GPViT:
    """GPViT-L4: 624 channels (Table 11: 75.4M params, 48.2 GFLOPs at 224)."""
    return _gpvit(624, **kwargs)
