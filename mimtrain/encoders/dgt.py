"""Dynamic Group Transformer (DGT-T/S/B, Liu et al.) as a SimMIM-style fill encoder.

No official code exists; this is written from the paper. Layout (paper Fig. 2, Table 1):
conv stem (3x3 s2 + two 3x3, stride 2) -> four stages, each a 3x3 s2 conv patch merging plus blocks [1, 2, 17, 2]
-> head (global pool, FC 1280, classifier). A block is CPE (depth-wise 3x3) + attention + IRFFN (Eqs. 8-10);
stages 1-3 use DG-attention (G groups, top-k keys per group), stage 4 global self-attention. DGT-S/B use
res-post-norm and cosine attention (Swin V2), as the paper says for training stability.

DG-attention is batched with no loop over images, heads or groups (see `dynamic_group_attention`, `dg_plan`):
queries are sorted by group into fixed-size padded blocks that attend to their group's k gathered keys/values, or,
for few tokens, dense logits are masked to each query's group keys.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, DropPath, trunc_normal_
from torch import Tensor, nn

from mimtrain.encoders import timm_glue
from mimtrain.encoders.base import (blank_hidden_pixels, fill_tokens, resolve_mask_unit, staged_group_matcher,
                                    strip_timm_kwargs)

__all__ = ["DGT", "DGAttention", "GlobalAttention", "dg_plan", "dynamic_group_attention", "group_layout",
           "nearest_centroid"]


# ----------------------------------------------------------------------------------------------------------------------
# DG-attention, batched
# ----------------------------------------------------------------------------------------------------------------------
def _num_blocks(N: int, num_groups: int, block: int) -> int:
    """Upper bound on one-group blocks: every non-empty group (at most min(G, N)) wastes under one block."""
    return math.ceil(N / block) + min(num_groups, N)


def group_layout(assign: Tensor, num_groups: int, block: int) -> tuple[Tensor, Tensor, int]:
    """Place every query in a padded block that holds queries of one group only.

    Queries are stably sorted by group; each group's run is cut into chunks of `block` slots, so a group of n queries
    fills ceil(n / block) blocks and wastes fewer than `block` slots. At most min(G, N) groups are non-empty, which
    bounds the block count by ceil(N / block) + min(G, N) for every image and head alike: the layout is rectangular.

    Args:
        assign: [Z, N] group id of each query (Z = images x heads).
        num_groups: G.
        block: query slots per block.

    Returns:
        slot: [Z, N] flat slot (block * `block` + position) of each query, unique within a row.
        block_group: [Z, nb] group served by each block (unused blocks say 0; their slots hold no query).
        nb: number of blocks.
    """
    Z, N = assign.shape
    nb = _num_blocks(N, num_groups, block)
    counts = torch.zeros(Z, num_groups, dtype=torch.long, device=assign.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign))
    chunks = (counts + block - 1) // block
    first_block = chunks.cumsum(1) - chunks  # [Z, G] index of each group's first block
    first_query = counts.cumsum(1) - counts  # [Z, G] where each group's run starts in sorted order
    order = torch.argsort(assign, dim=1, stable=True)  # [Z, N] query ids, grouped
    g_sorted = assign.gather(1, order)
    rank = torch.arange(N, device=assign.device) - first_query.gather(1, g_sorted)  # position inside its group
    blk = first_block.gather(1, g_sorted) + rank // block
    slot = torch.empty_like(assign).scatter_(1, order, blk * block + rank % block)
    block_group = torch.zeros(Z, nb, dtype=torch.long, device=assign.device).scatter_(1, blk, g_sorted)
    return slot, block_group, nb


@torch.no_grad()
def nearest_centroid(q: Tensor, centroids: Tensor) -> Tensor:
    """Group of each query: the unit centroid at the largest cosine (= nearest to Norm(q); the norm of q cannot change
    the argmax, so it is not computed). q: [B, h, N, d]; centroids: [h, G, d] -> [B, h, N]."""
    return torch.einsum("bhnd,hgd->bhng", q, centroids.to(q.dtype)).argmax(-1)


def dg_plan(N: int, num_groups: int, topk: int, block: int | None = None,
            layout: str = "auto") -> tuple[str, int, int]:
    """Choose how to lay out DG-attention for N tokens; depends on shapes only (no host sync, compile-friendly).

    "blocks": queries sorted by group into nb padded blocks of `block` slots (default ceil(N / min(G, N))), each
    attending to its group's k gathered keys. Per image and head it holds nb * block <= 2N + block + G query slots,
    logits nb * block * k (~2 N k; window attention with k keys: N k) and gathered keys/values 2 nb k d (nb <= 2G + 1).
    "dense": full [N, N] logits with each query's row masked to its group's k keys. Both are exact; "auto" takes
    dense when its logits are no larger than the blocked ones (N^2 <= nb * block * k, e.g. 224 px stage 3, where
    G * k > N and the gathered keys would dwarf everything else), else blocks.

    Returns:
        (layout, block, nb).
    """
    if layout not in ("auto", "blocks", "dense"):
        raise ValueError(f"layout must be 'auto', 'blocks' or 'dense', got {layout!r}")
    topk = min(topk, N)
    block = block or math.ceil(N / min(num_groups, N))
    nb = _num_blocks(N, num_groups, block)
    if layout == "auto":
        layout = "dense" if N * N <= nb * block * topk else "blocks"
    return layout, block, nb


def dynamic_group_attention(q: Tensor, k: Tensor, v: Tensor, centroids: Tensor, topk: int, scale: float | None = None,
                            block: int | None = None, layout: str = "auto") -> tuple[Tensor, Tensor]:
    """DG-attention (paper Eqs. 1-2) for all images and heads at once, with no loop.

    Each query joins the group of its nearest unit centroid (max cosine); each group keeps the `topk` keys/values with
    the largest centroid-key dot product; each query attends only to its group's keys; outputs land at the queries'
    own positions. See `dg_plan` for the two exact layouts and their memory.

    Args:
        q, k, v: [B, h, N, d].
        centroids: [h, G, d], unit norm.
        topk: keys per group; clamped to N (then every group sees every key: global attention).
        scale: logit scale (d^-0.5 if None).
        block: query slots per padded block ("blocks" layout).
        layout: "auto", "blocks" or "dense".

    Returns:
        out: [B, h, N, d]; assign: [B, h, N] group of each query (for the centroid update).
    """
    B, h, N, d = q.shape
    G = centroids.shape[1]
    topk = min(topk, N)
    layout, block, nb = dg_plan(N, G, topk, block, layout)
    with torch.no_grad():
        assign = nearest_centroid(q, centroids)  # [B, h, N]
        key_idx = torch.einsum("hgd,bhnd->bhgn", centroids.to(k.dtype), k).topk(topk, dim=-1).indices  # [B, h, G, k]
    if layout == "dense":
        with torch.no_grad():
            selected = torch.zeros(B, h, G, N, dtype=torch.bool, device=q.device).scatter_(-1, key_idx, True)
            allowed = selected.gather(2, assign[..., None].expand(-1, -1, -1, N))  # [B, h, N, N], k True per row
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale), assign
    Z = B * h
    with torch.no_grad():
        slot, block_group, _ = group_layout(assign.flatten(0, 1), G, block)
        block_keys = key_idx.flatten(0, 1).gather(1, block_group[..., None].expand(-1, -1, topk))  # [Bh, nb, k]
    kv_idx = block_keys.flatten(1)[..., None].expand(-1, -1, d)  # [Bh, nb*k, d]
    kb = k.flatten(0, 1).gather(1, kv_idx).view(Z, nb, topk, d)
    vb = v.flatten(0, 1).gather(1, kv_idx).view(Z, nb, topk, d)
    q_idx = slot[..., None].expand(-1, -1, d)  # [Bh, N, d]
    # Empty slots stay zero: uniform attention, finite, and never read back.
    qb = q.new_zeros(Z, nb * block, d).scatter(1, q_idx, q.flatten(0, 1)).view(Z, nb, block, d)
    ob = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)  # [Bh, nb, block, d]
    out = ob.reshape(Z, nb * block, d).gather(1, q_idx)
    return out.view(B, h, N, d), assign


class GlobalAttention(nn.Module):
    """Multi-head self-attention over all tokens (stage 4's GSA); optionally cosine attention (Swin V2)."""

    def __init__(self, dim: int, num_heads: int, cosine: bool = False, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.cosine = cosine
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # Swin V2: per-head learnable temperature for cosine logits, starting at 10, capped at 100.
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0))) if cosine else None

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, float | None]:
        """x: [B, N, C] -> q, k, v: [B, h, N, d] and the scale to pass to attention.

        Cosine attention normalises q and k and folds the per-head temperature into q, so the attention call takes
        scale 1 and DG grouping / key selection see the same vectors the logits are made of.
        """
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.cosine:
            return q, k, v, None
        temp = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        return F.normalize(q, dim=-1) * temp, F.normalize(k, dim=-1), v, 1.0

    def _merge(self, out: Tensor) -> Tensor:
        """[B, h, N, d] -> [B, N, C]."""
        return self.proj(out.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, N, C] -> [B, N, C]."""
        q, k, v, scale = self._qkv(x)
        return self._merge(F.scaled_dot_product_attention(q, k, v, scale=scale))


class DGAttention(GlobalAttention):
    """Dynamic group attention with EMA-updated centroids (paper Sec. 3.1).

    Centroids are a persistent buffer [h, G, d] (unit vectors) so they travel in checkpoints. In training mode they
    are updated by Eq. 3-4: e_j <- Norm(tau * e_j + (1 - tau) * mean_i Norm(q_i in group j)), pooled over the
    batch; empty groups keep their centroid. The paper updates once per iteration: once a trainer drives the
    encoder's `on_step` hook (once per optimizer step), each hook call arms one update, made by the step's first
    training forward, so gradient accumulation does not multiply the updates. Without the hook every training
    forward updates. The paper sets tau = 0.1 x learning rate; `DGT.set_centroid_tau` lets a trainer follow it.
    """

    def __init__(self, dim: int, num_heads: int, num_groups: int = 48, topk: int = 98, cosine: bool = False,
                 qkv_bias: bool = True, centroid_tau: float = 1e-4):
        super().__init__(dim, num_heads, cosine=cosine, qkv_bias=qkv_bias)
        self.num_groups = num_groups
        self.topk = topk
        self.centroid_tau = centroid_tau
        self.update_armed: bool | None = None  # None: no step hook, update every training forward (see above)
        # Activation checkpointing re-runs forward in backward: that rerun must see the centroids the forward saw
        # (before its own update) and must not update again. `replay` holds them during the rerun (`DGT`).
        self.replay: Tensor | None = None
        self.register_buffer("centroids", F.normalize(torch.randn(num_heads, num_groups, self.head_dim), dim=-1))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, N, C] -> [B, N, C]."""
        q, k, v, scale = self._qkv(x)
        N = x.shape[1]
        centroids = self.centroids if self.replay is None else self.replay
        update = self._take_update()
        if self.topk >= N:
            # Every group would select every key: exactly global attention, computed directly.
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            if update:
                self._update_centroids(q, nearest_centroid(q, centroids))
            return self._merge(out)
        out, assign = dynamic_group_attention(q, k, v, centroids, self.topk, scale)
        if update:
            self._update_centroids(q, assign)
        return self._merge(out)

    def _take_update(self) -> bool:
        """Whether this forward updates the centroids (training only; at most once per armed step; never in a
        checkpointing rerun)."""
        if not self.training or self.update_armed is False or self.replay is not None:
            return False
        if self.update_armed:
            self.update_armed = False
        return True

    @torch.no_grad()
    def _update_centroids(self, q: Tensor, assign: Tensor) -> None:
        """q: [B, h, N, d]; assign: [B, h, N]. EMA of each group's mean normalised query (Eqs. 3-4)."""
        h, G, d = self.centroids.shape
        qn = F.normalize(q.detach().float(), dim=-1).transpose(0, 1).reshape(h, -1, d)  # [h, B*N, d]
        idx = assign.transpose(0, 1).reshape(h, -1)  # [h, B*N]
        sums = torch.zeros(h, G, d, device=q.device).scatter_add_(1, idx[..., None].expand(-1, -1, d), qn)
        counts = torch.zeros(h, G, device=q.device).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float))
        mean = sums / counts.clamp(min=1)[..., None]
        tau = self.centroid_tau
        new = F.normalize(tau * self.centroids.float() + (1 - tau) * mean, dim=-1)
        self.centroids.copy_(torch.where(counts[..., None] > 0, new, self.centroids.float()))


@contextmanager
def _replaying(seen: dict[DGAttention, Tensor], inner):
    for m, centroids in seen.items():
        m.replay = centroids
    try:
        with inner:
            yield
    finally:
        for m in seen:
            m.replay = None


# ----------------------------------------------------------------------------------------------------------------------
# Blocks and stages
# ----------------------------------------------------------------------------------------------------------------------
class IRFFN(nn.Module):
    """Inverted residual FFN (CMT): 1x1 expand -> depth-wise 3x3 with a shortcut -> 1x1 project, BN after each conv."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.expand = ConvNormAct(dim, hidden, 1, bias=True, act_layer=nn.GELU)
        self.dw = ConvNormAct(hidden, hidden, 3, groups=hidden, bias=True, act_layer=nn.GELU)
        self.project = ConvNormAct(hidden, dim, 1, bias=True, apply_act=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """x: [B, N, C] -> [B, N, C]."""
        B, N, C = x.shape
        y = self.expand(x.transpose(1, 2).reshape(B, C, *hw))
        y = self.project(y + self.dw(y))
        return y.flatten(2).transpose(1, 2)


class DGTBlock(nn.Module):
    """CPE + attention + IRFFN (Eqs. 8-10); pre-norm, or Swin V2 res-post-norm when `post_norm`."""

    def __init__(self, dim: int, num_heads: int, num_groups: int, topk: int, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, post_norm: bool = False, cosine: bool = False, centroid_tau: float = 1e-4):
        super().__init__()
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        if num_groups > 0:
            self.attn = DGAttention(dim, num_heads, num_groups, topk, cosine=cosine, centroid_tau=centroid_tau)
        else:
            self.attn = GlobalAttention(dim, num_heads, cosine=cosine)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = IRFFN(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.post_norm = post_norm

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        B, C, H, W = x.shape
        x = (x + self.cpe(x)).flatten(2).transpose(1, 2)  # [B, N, C]
        if self.post_norm:
            x = x + self.drop_path(self.norm1(self.attn(x)))
            x = x + self.drop_path(self.norm2(self.ffn(x, (H, W))))
        else:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            x = x + self.drop_path(self.ffn(self.norm2(x), (H, W)))
        return x.transpose(1, 2).reshape(B, C, H, W)


class PatchMerging(nn.Module):
    """3x3 stride-2 conv halving the resolution and changing the width, then LayerNorm over channels."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, Cin, H, W] -> [B, C, H/2, W/2]."""
        x = self.conv(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DGTStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, num_groups: int, topk: int,
                 drop_path: list[float], **block_kwargs):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim)
        self.blocks = nn.Sequential(*[DGTBlock(dim, num_heads, num_groups, topk, drop_path=drop_path[i],
                                               **block_kwargs) for i in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, Cin, H, W] -> [B, C, H/2, W/2]."""
        return self.blocks(self.downsample(x))


# ----------------------------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------------------------
class DGT(timm_glue.TimmNative, nn.Module):
    """Dynamic Group Transformer + the mimtrain encoder contract (fill mode only; see `encoders/base.py`).

    The first token level is stride 4 (stem s2, then stage 1's merging s2): that is `patch_size` and where hidden
    tokens become the mask token. The stem's 3x3 convs overlap cell borders, so hidden pixels are blanked first.
    """

    # The hidden head_fc between the pooled features and the classifier is part of the head.
    classifier_modules = ("head", "head_fc")  # `base.classifier_keys`: what a new task replaces
    pretraining_only = ("mask_token",)  # SimMIM's; a classifier (num_classes > 0) has none
    script_limits = fx_limits = ("data-dependent control flow: DG-attention picks its query layout and block count "
                                 "from the token count, and updates its centroids in place")

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 stem_dim: int = 32, dims: tuple[int, ...] = (64, 128, 256, 512),
                 depths: tuple[int, ...] = (1, 2, 17, 2), num_heads: tuple[int, ...] = (2, 4, 8, 16),
                 num_groups: int = 48, topk: int = 98,
                 mlp_ratio: float = 4.0, head_hidden: int = 1280, post_norm: bool = False, cosine_attn: bool = False,
                 centroid_tau: float = 1e-4, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 mask_unit: int | None = None, mask_mode: str = "fill"):
        super().__init__()
        if mask_mode != "fill":
            raise ValueError(f"DGT supports mask_mode 'fill' only (its convs and DG-attention need the full token "
                             f"grid), got {mask_mode!r}")
        if not len(dims) == len(depths) == len(num_heads) == 4:
            raise ValueError("DGT has four stages: dims, depths and num_heads need four entries each")
        self.patch_size = 4
        self.mask_unit = resolve_mask_unit(mask_unit, 32, self.patch_size, "DGT")
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if h % 32 or w % 32:
            raise ValueError(f"DGT image size {h}x{w} must be a multiple of 32 (its output stride)")
        self.img_size = (h, w)
        self.mask_mode = mask_mode
        self.num_prefix_tokens = 0
        self.embed_dim = self.num_features = dims[-1]
        self.num_classes = num_classes

        self.stem = nn.Sequential(
            ConvNormAct(in_chans, stem_dim, 3, stride=2, padding=1, bias=True, act_layer=nn.GELU),
            ConvNormAct(stem_dim, stem_dim, 3, padding=1, bias=True, act_layer=nn.GELU),
            ConvNormAct(stem_dim, stem_dim, 3, padding=1, bias=True, act_layer=nn.GELU),
        )
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # linear, as in Swin
        block_kwargs = dict(mlp_ratio=mlp_ratio, post_norm=post_norm, cosine=cosine_attn, centroid_tau=centroid_tau)
        stages, in_dim, start = [], stem_dim, 0
        for i in range(4):
            groups = num_groups if i < 3 else 0  # stage 4: global self-attention
            stages.append(DGTStage(in_dim, dims[i], depths[i], num_heads[i], groups, topk,
                                   dpr[start:start + depths[i]], **block_kwargs))
            in_dim, start = dims[i], start + depths[i]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}") for i in range(4)]
        self.mask_token = nn.Parameter(torch.zeros(dims[0])) if num_classes == 0 else None

        # Head (Table 1): FC to 1280, then the classifier.
        # Pretraining (num_classes=0) has no use for the hidden FC: only a classifier holds it.
        self.head_fc = nn.Linear(dims[-1], head_hidden) if num_classes > 0 else nn.Identity()
        self.head_act = nn.GELU() if num_classes > 0 else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(head_hidden, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return self._mask_token_name() | {n for n, _ in self.named_parameters() if n.endswith("logit_scale")}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-wise lr decay: stem 0, then the blocks stage by stage (a downsampler joins the first block after
        it); final norm, head_fc and head last."""
        return staged_group_matcher(r"^(?:stem|mask_token)", "stages", coarse)

    def set_centroid_tau(self, tau: float) -> None:
        """Set Eq. 4's tau in every DG-attention layer (the paper uses 0.1 x the current learning rate)."""
        for m in self.modules():
            if isinstance(m, DGAttention):
                m.centroid_tau = tau

    @property
    def head_hidden_size(self) -> int:
        hidden = self.head_fc  # the classifier follows the hidden FC (Table 1), which only a classifier has
        return hidden.out_features if isinstance(hidden, nn.Linear) else self.num_features

    def _recompute_context(self, block: nn.Module) -> tuple:
        """A checkpointed block's rerun in backward uses the centroids its forward saw (the forward updates them in
        place, and later forwards may too) and updates nothing."""
        seen = {m: m.centroids.clone() for m in block.modules() if isinstance(m, DGAttention)}
        forward, rerun = super()._recompute_context(block)
        return forward, _replaying(seen, rerun)

    def on_step(self, step: int, lr: float) -> None:
        """Engine hook before each optimizer step: Eq. 4's tau follows the learning rate (tau = 0.1 x lr), and each
        DG-attention layer may update its centroids once in this step (the paper's once per iteration), whatever
        the number of accumulated micro-batches."""
        self.set_centroid_tau(0.1 * lr)
        for m in self.modules():
            if isinstance(m, DGAttention):
                m.update_armed = True

    def _check_input(self, x: Tensor) -> None:
        self._refuse_fx(x)
        H, W = x.shape[-2:]
        if H % 32 or W % 32:
            raise ValueError(f"DGT input {H}x{W} must be a multiple of 32 (its output stride)")

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: [B, 3, H, W]; mask: [B, H/u, W/u] (True = hidden) -> [B, C4, H/32, W/32].

        Hidden tokens at stride 4 are replaced by the mask token before stage 1's blocks.
        """
        self._check_input(x)
        x = self.stem(blank_hidden_pixels(x, mask))
        x = fill_tokens(self.stages[0].downsample(x), mask, self._mask_token())
        x = self._run_blocks(self.stages[0].blocks, x)
        for stage in self.stages[1:]:
            x = self._run_blocks(stage.blocks, stage.downsample(x))
        return self._final_norm(x)

    def _final_norm(self, x: Tensor) -> Tensor:
        """LayerNorm over channels of the stage-4 map. x: [B, C, H, W] -> [B, C, H, W]."""
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _feature_maps(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] -> [[B, C1, H/4, W/4], ..., [B, C4, H/32, W/32]] (last one normalised), unmasked."""
        self._check_input(x)
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = self._run_blocks(stage.blocks, stage.downsample(x))
            feats.append(x)
        feats[-1] = self._final_norm(feats[-1])
        return feats

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """x: [B, C4, h, w] stage-4 map -> global average pool -> FC 1280 -> classifier: [B, num_classes].

        pre_logits returns what feeds the classifier, [B, head_hidden_size] (timm's meaning, as its MobileNetV3 with
        a hidden head FC); the pooled encoder features are `forward_features(x).mean((2, 3))`.
        """
        x = self.head_drop(self.head_act(self.head_fc(x.mean(dim=(2, 3)))))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _dgt(**kwargs) -> DGT:
    return DGT(**strip_timm_kwargs(kwargs))


# timm reads `default_cfgs` when `register` runs: the preprocessing and the names of the stem and the classifier.
default_cfgs = timm_glue.default_cfgs({
    "dgt_tiny": timm_glue.cfg("stem.0.conv", "head"),
    "dgt_small": timm_glue.cfg("stem.0.conv", "head"),
    "dgt_base": timm_glue.cfg("stem.0.conv", "head"),
})


@timm_glue.register
def dgt_tiny(pretrained: bool = False, **kwargs) -> DGT:
    """DGT-T: 24M params, 4.3G FLOPs (paper Table 1/2)."""
    return _dgt(**{**dict(stem_dim=32, dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16)), **kwargs})


@timm_glue.register
def dgt_small(pretrained: bool = False, **kwargs) -> DGT:
    """DGT-S: 51.76M params, 9.41G FLOPs; post-norm and cosine attention."""
    return _dgt(**{**dict(stem_dim=48, dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), post_norm=True,
                          cosine_attn=True), **kwargs})


@timm_glue.register
def dgt_base(pretrained: bool = False, **kwargs) -> DGT:
    """DGT-B: 90.28M params, 16.4G FLOPs; post-norm and cosine attention."""
    return _dgt(**{**dict(stem_dim=64, dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), post_norm=True,
                          cosine_attn=True), **kwargs})
