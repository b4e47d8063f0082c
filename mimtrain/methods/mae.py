"""MAE (He et al., 2022): encode the visible units, decode all units with a light transformer, regress the pixels
of the hidden ones. Works with any drop-mode encoder whose output token is one mask unit.

Shapes: B images, L = Gh x Gw mask units, V visible units, P prefix (class) tokens, u = mask unit in pixels.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mimtrain.config.errors import ConfigError
from mimtrain.encoders.base import mae_init_linear, mae_sincos_pos_embed


def patchify(images: Tensor, u: int) -> Tensor:
    """[B, 3, H, W] -> [B, L, u*u*3], units in raster order, pixels (row, col, channel) within a unit."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // u, u, W // u, u)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // u) * (W // u), u * u * C)


def unpatchify(x: Tensor, u: int, grid: tuple[int, int]) -> Tensor:
    """[B, L, u*u*3] -> [B, 3, H, W] (inverse of `patchify`)."""
    B = x.shape[0]
    gh, gw = grid
    x = x.reshape(B, gh, gw, u, u, -1)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, -1, gh * u, gw * u)


class MAE(nn.Module):
    """Masked autoencoder around a drop-mode encoder. `forward(images, mask) -> {"loss", "pred", "mask"}`."""

    def __init__(self, encoder: nn.Module, img_size: int | tuple[int, int], decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True, mlp_ratio: float = 4.0):
        super().__init__()
        if encoder.mask_mode != "drop":
            raise ConfigError(f"MAE needs an encoder in drop mode, but {type(encoder).__name__} fills masked tokens; "
                              "pretrain fill-mode encoders (Swin, GC ViT, GPViT, DGT, GLNet) with method.name=simmim")
        stride = encoder.feature_info[-1]["reduction"]
        if encoder.mask_unit != stride:
            raise ConfigError(f"MAE's decoder predicts one token per mask unit: encoder.mask_unit must equal the "
                              f"encoder's output stride {stride} (got {encoder.mask_unit})")
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        self.encoder = encoder
        self.unit, self.grid = encoder.mask_unit, (h // encoder.mask_unit, w // encoder.mask_unit)
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed sin-cos positions for the units in MAE's channel layout; prefix tokens get position zero, as in MAE.
        pos = mae_sincos_pos_embed(self.grid, decoder_dim)
        self.register_buffer("decoder_pos_embed", pos[None], persistent=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.unit ** 2 * 3)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            m.apply(mae_init_linear)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def decode(self, latent: Tensor, mask: Tensor) -> Tensor:
        """latent: [B, P + V, C]; mask: [B, Gh, Gw] -> pred: [B, L, u*u*3]."""
        P = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)
        prefix, visible = x[:, :P], x[:, P:]
        B, V, D = visible.shape
        hidden = mask.flatten(1)
        # Put each visible token back at its unit: the same stable order the encoder gathered them in.
        where = torch.argsort(hidden.to(torch.int8), dim=1, stable=True)[:, :V]
        full = torch.scatter(self.mask_token.to(x.dtype).expand(B, hidden.shape[1], D), 1,
                             where[..., None].expand(-1, -1, D), visible)
        x = torch.cat([prefix, full + self.decoder_pos_embed.to(x.dtype)], dim=1)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, P:])

    def target(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, L, u*u*3]: pixels per unit, normalized per unit when norm_pix_loss."""
        t = patchify(images, self.unit)
        if self.norm_pix_loss:
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1e-6) ** 0.5
        return t

    def loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per unit, averaged over hidden units only."""
        per_unit = (pred.float() - self.target(images.float())).pow(2).mean(dim=-1)
        hidden = mask.flatten(1).to(per_unit.dtype)
        return (per_unit * hidden).sum() / hidden.sum()

    def forward(self, images: Tensor, mask: Tensor) -> dict[str, Tensor]:
        latent = self.encoder.encode(images, mask)
        pred = self.decode(latent, mask)
        return {"loss": self.loss(images, pred, mask), "pred": pred, "mask": mask}

    @torch.no_grad()
    def visualize(self, images: Tensor, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Original | masked input | reconstruction with visible units pasted back, all [B, 3, H, W] in the input's
        normalized space. Norm-pix predictions are mapped back with each unit's own mean/std (raw predictions
        look like noise)."""
        pred = out["pred"].float()
        if self.norm_pix_loss:
            t = patchify(images.float(), self.unit)
            pred = pred * (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
        recon = unpatchify(pred, self.unit, self.grid)
        hidden = out["mask"].repeat_interleave(self.unit, 1).repeat_interleave(self.unit, 2)[:, None]
        views = {"original": images, "masked": images.masked_fill(hidden, 0.0),
                 "reconstruction": torch.where(hidden, recon.to(images.dtype), images)}
        return {**views, **self.encoder.extra_views(images, out["mask"])}
