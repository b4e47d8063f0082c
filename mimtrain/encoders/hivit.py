"""HiViT (hierarchical ViT) as a MIM encoder, written from the paper (Zhang et al., "HiViT: a simpler and more
efficient design of hierarchical vision transformer").

The network, in the paper's order:
1. 4x4 patch embedding (a non-overlapping conv): stride-4 tokens.
2. Hierarchical patch embedding: stage 1 (stride 4) and stage 2 (stride 8) hold only MLP blocks, so no token ever
   looks at another; 2x2 patch merging (concat + norm + linear, as Swin) between them and into the main stage.
3. Main stage at stride 16: plain transformer blocks (global self-attention) with a learned relative position bias
   per block and head (step (b) of the paper) on top of an absolute position embedding (see docs for why both).
   There is no stage 4, so every stride-16 token is symmetric.

Because nothing before the main stage mixes tokens across a 16x16 pixel cell, a cell's main-stage token depends
only on that cell's pixels. Drop mode (MAE) therefore gathers the visible 16x16 cells right at the pixels and runs
every stage on them alone: all compute scales with the visible fraction, and hidden pixels cannot leak.

Reading of Table 7's "Depth" column (checked against its param/FLOP counts and Table 9's ablation): a stage-1/2
"block" is a transformer block whose attention sub-layer is replaced by a second MLP, i.e. two residual MLPs of
ratio 3 (12 d^2 parameters, the same as attention + ratio-4 MLP). Depth 2-2-20 is thus 4 + 4 MLPs + 20 blocks.
"""
from __future__ import annotations

import torch
from timm.layers import DropPath, LayerNorm, Mlp, PatchEmbed, trunc_normal_
from timm.layers.pos_embed_rel import gen_relative_position_index
from timm.models.swin_transformer import PatchMerging
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mimtrain.encoders import timm_glue
from mimtrain.encoders.base import (fill_tokens, mae_sincos_pos_embed, mask_to_tokens, resolve_mask_unit,
                                    strip_timm_kwargs, visible_order)

CELL = 16  # pixels per main-stage token: the unit that drop mode can remove exactly
PATCH = 4  # pixels per stage-1 token


class MlpBlock(nn.Module):
    """A transformer block with its attention sub-layer swapped for a second MLP: no token mixing at all.

    x: [..., C] -> [..., C] (works on any leading shape, since each token is processed alone).
    """

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1, self.mlp1 = LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))
        self.norm2, self.mlp2 = LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.mlp1(self.norm1(x)))
        return x + self.drop_path(self.mlp2(self.norm2(x)))


class RelPosBlock(Block):
    """timm's pre-norm ViT block plus a learned relative position bias per head (Swin/BEiT style table).

    The bias is looked up from an index of (query, key) grid offsets, so drop mode passes the index rows/columns
    of the visible tokens only.
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid[0] - 1) * (2 * grid[1] - 1), num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, rel_index: Tensor) -> Tensor:
        """x: [B, N, C]; rel_index: [B or 1, N, N] long offsets into the table -> [B, N, C]."""
        bias = self.relative_position_bias_table[rel_index].permute(0, 3, 1, 2)  # [B, heads, N, N]
        # timm's Block.forward with the bias as attention mask (written out: TorchScript has no super()).
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=bias.to(x.dtype))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class HiViT(timm_glue.TimmNative, nn.Module):
    """HiViT encoder + the mimtrain encoder contract (see `encoders/base.py`).

    Args:
        img_size: input size the position embedding and relative-position index are built for (multiple of 16).
        dims: channels of stage 1 (stride 4), stage 2 (stride 8) and the main stage (stride 16).
        depths: Table 7's depths: stage-1/2 MLP blocks (two MLPs each) and main-stage transformer blocks.
        num_heads: attention heads of the main stage.
        mlp_ratio: MLP ratio of the main-stage blocks.
        stem_mlp_ratio: MLP ratio of the stage-1/2 MLPs.
        mask_unit: pixels per mask cell (None = 16); drop mode needs a multiple of 16, fill mode a multiple of 4.
        mask_mode: "drop" (MAE: hidden cells never enter) or "fill" (SimMIM: mask token after the patch embedding).
        fixed_pos_embed: absolute position embedding as a frozen 2-D sin-cos table (MAE's layout) instead of a
            learned one.

    Built with a head (num_classes > 0) it is MAE's fine-tuning classifier: average of the stride-16 tokens, a fresh
    `fc_norm` in place of the pretrained final norm (which the classifier does not have), a learnable position table
    (initialised from the fixed one or the checkpoint), no mask token, head weights drawn with std 2e-5.
    """

    # MAE's fine-tuning fc_norm is part of the head.
    classifier_modules = ("head", "fc_norm")  # `base.classifier_keys`: what a new task replaces

    pretraining_only = ("mask_token", "norm.")

    def __init__(self, img_size: int | tuple[int, int] = 224, dims: tuple[int, int, int] = (128, 256, 512),
                 depths: tuple[int, int, int] = (2, 2, 20), num_heads: int = 8, mlp_ratio: float = 4.0,
                 stem_mlp_ratio: float = 3.0, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, mask_unit: int | None = None, mask_mode: str = "drop",
                 fixed_pos_embed: bool = True):
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if h % CELL or w % CELL:
            raise ValueError(f"HiViT needs an image size divisible by its main-stage stride {CELL}, got {h}x{w}")
        if mask_mode not in ("drop", "fill"):
            raise ValueError(f"mask_mode must be 'drop' or 'fill', got {mask_mode!r}")
        mask_unit = resolve_mask_unit(mask_unit, CELL, PATCH, "HiViT")
        if mask_mode == "drop" and mask_unit % CELL:
            raise ValueError(f"HiViT drop mode removes whole {CELL}x{CELL} main-stage tokens: mask_unit must be a "
                             f"multiple of {CELL}, got {mask_unit} (use mask_mode='fill' for finer masks)")
        self.patch_size, self.mask_unit, self.mask_mode = PATCH, mask_unit, mask_mode
        self.cell_tokens = CELL // PATCH  # stride-4 tokens per main-stage cell side
        self.embed_dim = self.num_features = dims[2]
        self.num_prefix_tokens = 0
        self.num_classes = num_classes
        self.grid_size = (h // CELL, w // CELL)
        self.feature_info = [dict(num_chs=dims[0], reduction=4, module="stage1"),
                             dict(num_chs=dims[1], reduction=8, module="stage2"),
                             dict(num_chs=dims[2], reduction=16, module="norm")]

        n_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linear in depth, as Swin
        self.patch_embed = PatchEmbed(img_size=None, patch_size=PATCH, embed_dim=dims[0], norm_layer=LayerNorm,
                                      flatten=False, output_fmt="NHWC")
        classifier = num_classes > 0
        self.mask_token = nn.Parameter(torch.zeros(dims[0])) if mask_mode == "fill" and not classifier else None
        self.stage1 = nn.Sequential(*[MlpBlock(dims[0], stem_mlp_ratio, d) for d in dpr[:depths[0]]])
        self.merge1 = PatchMerging(dims[0], dims[1], norm_layer=LayerNorm)
        self.stage2 = nn.Sequential(*[MlpBlock(dims[1], stem_mlp_ratio, d) for d in dpr[depths[0]:sum(depths[:2])]])
        self.merge2 = PatchMerging(dims[1], dims[2], norm_layer=LayerNorm)

        self.pos_embed = nn.Parameter(torch.zeros(self.grid_size[0] * self.grid_size[1], dims[2]),
                                      requires_grad=classifier or not fixed_pos_embed)
        self.register_buffer("rel_index", gen_relative_position_index(self.grid_size), persistent=False)
        self.blocks = nn.ModuleList([
            RelPosBlock(dims[2], num_heads, self.grid_size, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=d,
                        norm_layer=LayerNorm) for d in dpr[sum(depths[:2]):]])
        # MAE fine-tuning: the pooled tokens get a fresh LayerNorm in place of the pretrained final norm.
        self.norm = nn.Identity() if classifier else LayerNorm(dims[2])
        self.fc_norm = LayerNorm(dims[2]) if classifier else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[2], num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(fixed_pos_embed)

    def _init_weights(self, fixed_pos_embed: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            if fixed_pos_embed:
                self.pos_embed.copy_(mae_sincos_pos_embed(self.grid_size, self.embed_dim))
            else:
                trunc_normal_(self.pos_embed, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=2e-5)  # MAE's fine-tuning head

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters()
                if n in ("pos_embed", "mask_token") or n.endswith("relative_position_bias_table")}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping for layer-wise lr decay: embeddings 0, then the MLP blocks of stages 1 and 2 and the
        attention blocks, in forward order. A merge feeds the next stage, so it shares the layer of that stage's
        first block (ordinal (stage, 0)); the stages are separate groups because their names carry no stage index."""
        if coarse:
            return dict(stem=r"^(?:pos_embed|patch_embed|mask_token)", stage1=r"^stage1\.",
                        stage2=r"^(?:merge1|stage2)\.", blocks=r"^(?:merge2|blocks)\.")
        return dict(stem=r"^(?:pos_embed|patch_embed|mask_token)", stage1=r"^stage1\.(\d+)\.",
                    stage2=[(r"^merge1\.", (0,)), (r"^stage2\.(\d+)\.", None)],
                    blocks=[(r"^merge2\.", (0,)), (r"^blocks\.(\d+)\.", None)])

    # -- the algorithm, in order ---------------------------------------------------------------------------------

    def _check_size(self, x: Tensor) -> None:
        # Scripted and fx-traced graphs hold no Python check (the input shape is symbolic there); export sees it.
        if not torch.jit.is_scripting():
            if not isinstance(x, torch.fx.Proxy) and tuple(x.shape[-2:]) != (self.grid_size[0] * CELL,
                                                                             self.grid_size[1] * CELL):
                raise ValueError(f"input {tuple(x.shape[-2:])} does not match the HiViT built for "
                                 f"{self.grid_size[0] * CELL}x{self.grid_size[1] * CELL} (position tables are per "
                                 "grid)")

    def _pixel_cells(self, x: Tensor, keep: Tensor) -> Tensor:
        """x: [B, 3, H, W]; keep: [B, n] cell ids in raster order -> [B*n, 3, 16, 16], the kept cells' pixels."""
        B, C = x.shape[:2]
        gh, gw = self.grid_size
        cells = x.reshape(B, C, gh, CELL, gw, CELL).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * CELL * CELL)
        cells = torch.gather(cells, 1, keep[..., None].expand(-1, -1, cells.shape[-1]))
        return cells.reshape(-1, C, CELL, CELL)

    def _token_cells(self, tokens: Tensor) -> Tensor:
        """Regroup stride-4 tokens by main-stage cell. tokens: [B, H/4, W/4, C] -> [B*N, 4, 4, C]."""
        B, C = tokens.shape[0], tokens.shape[-1]
        (gh, gw), k = self.grid_size, self.cell_tokens
        return tokens.reshape(B, gh, k, gw, k, C).transpose(2, 3).reshape(B * gh * gw, k, k, C)

    def _cells_to_map(self, t: Tensor, batch: int) -> Tensor:
        """Inverse of the cell grouping, to NCHW. t: [B*N, k, k, C] -> [B, C, gh*k, gw*k]."""
        (gh, gw), k, C = self.grid_size, t.shape[1], t.shape[-1]
        return t.reshape(batch, gh, gw, k, k, C).permute(0, 5, 1, 3, 2, 4).reshape(batch, C, gh * k, gw * k)

    def _hierarchical_embed(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Stages 1 and 2, each 16x16 cell on its own (2x2 merging inside a 4x4 cell never crosses its border).

        t: [B*n, 4, 4, C0] -> (stage 1 [B*n, 4, 4, C0], stage 2 [B*n, 2, 2, C1], main-stage input [B*n, C2]).
        """
        # Loops written out (not `_run_blocks`) so that torch.jit.script compiles them.
        s1 = t
        for blk in self.stage1:
            s1 = self._run_block(blk, s1) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(s1)
        s2 = self.merge1(s1)
        for blk in self.stage2:
            s2 = self._run_block(blk, s2) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(s2)
        return s1, s2, self.merge2(s2).flatten(1)

    def _main_stage(self, x: Tensor, keep: Tensor | None) -> Tensor:
        """x: [B, n, C] main-stage tokens at the cells `keep` ([B, n]; None = all, raster order) -> [B, n, C]."""
        if keep is None:
            x, rel_index = x + self.pos_embed, self.rel_index[None]
        else:
            x = x + self.pos_embed[keep]
            rel_index = self.rel_index[keep[:, :, None], keep[:, None, :]]  # [B, n, n]: offsets among kept cells
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = self._run_block(blk, x, rel_index)
            else:
                x = blk(x, rel_index)
        return self.norm(x)

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: [B, 3, H, W]; mask: [B, H/u, W/u] (True = hidden).

        drop -> [B, N_visible, C] (visible stride-16 tokens, raster order); fill -> [B, C, H/16, W/16].
        """
        self._check_size(x)
        B = x.shape[0]
        if self.mask_mode == "fill":
            if self.mask_token is None:
                raise ValueError("this HiViT was built as a classifier (num_classes > 0), which has no mask token; "
                                 "build it with num_classes=0 to pretrain")
            tokens = fill_tokens(self.patch_embed(x), mask, self.mask_token, channels_last=True)
            _, _, t = self._hierarchical_embed(self._token_cells(tokens))
            out = self._main_stage(t.view(B, -1, self.embed_dim), None)
            return out.transpose(1, 2).reshape(B, self.embed_dim, *self.grid_size)
        hidden = mask_to_tokens(mask, self.mask_unit // CELL).flatten(1)  # [B, N] on the stride-16 grid
        # Every image must hide the same count (the masking service guarantees it; `visible_order` refuses other
        # batches), so the gather stays rectangular.
        keep = visible_order(hidden, self.hidden_units, (self.mask_unit // CELL) ** 2)  # [B, V]
        _, _, t = self._hierarchical_embed(self.patch_embed(self._pixel_cells(x, keep)))
        return self._main_stage(t.view(B, keep.shape[1], self.embed_dim), keep)

    def _feature_maps(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] -> [[B, C0, H/4, W/4], [B, C1, H/8, W/8], [B, C2, H/16, W/16]], unmasked (the last after
        the final norm, none in a classifier)."""
        self._check_size(x)
        B = x.shape[0]
        s1, s2, t = self._hierarchical_embed(self._token_cells(self.patch_embed(x)))
        out = self._main_stage(t.view(B, -1, self.embed_dim), None)
        s3 = out.transpose(1, 2).reshape(B, self.embed_dim, *self.grid_size)
        return [self._cells_to_map(s1, B), self._cells_to_map(s2, B), s3]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """x: [B, C, h, w] stride-16 map -> average pool -> fc_norm -> logits (MAE fine-tuning's global pool)."""
        x = self.head_drop(self.fc_norm(x.mean(dim=(2, 3))))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """As a classifier (num_classes > 0), MAE's: pool the blocks' output (the classifier has no final norm)."""
        return self.forward_head(self.forward_features(x))


def _hivit(defaults: dict, kwargs: dict) -> HiViT:
    return HiViT(**{**defaults, **strip_timm_kwargs(kwargs)})


# timm reads `default_cfgs` when `register` runs: the preprocessing and the names of the stem and the classifier.
default_cfgs = timm_glue.default_cfgs({
    "hivit_tiny": timm_glue.cfg("patch_embed.proj", "head"),
    "hivit_small": timm_glue.cfg("patch_embed.proj", "head"),
    "hivit_base": timm_glue.cfg("patch_embed.proj", "head"),
    "hivit_large": timm_glue.cfg("patch_embed.proj", "head"),
})


@timm_glue.register
def hivit_tiny(pretrained: bool = False, **kwargs) -> HiViT:
    """Table 7 HiViT-T: 19.2M params, 4.6 GFLOPs."""
    return _hivit(dict(dims=(96, 192, 384), depths=(1, 1, 10), num_heads=6), kwargs)


@timm_glue.register
def hivit_small(pretrained: bool = False, **kwargs) -> HiViT:
    """Table 7 HiViT-S: 37.5M params, 9.1 GFLOPs."""
    return _hivit(dict(dims=(96, 192, 384), depths=(2, 2, 20), num_heads=6), kwargs)


@timm_glue.register
def hivit_base(pretrained: bool = False, **kwargs) -> HiViT:
    """Table 7 HiViT-B: 66.4M params, 15.9 GFLOPs."""
    return _hivit(dict(dims=(128, 256, 512), depths=(2, 2, 20), num_heads=8), kwargs)


@timm_glue.register
def hivit_large(pretrained: bool = False, **kwargs) -> HiViT:
    """Table 7 HiViT-L: 266.8M params, 63.8 GFLOPs."""
    return _hivit(dict(dims=(192, 384, 768), depths=(4, 4, 36), num_heads=12), kwargs)
