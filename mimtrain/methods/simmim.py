"""SimMIM (Xie et al., 2022): fill hidden positions with a mask token, encode the whole image, predict the raw pixels
with a linear decoder, and regress the hidden pixels only with an L1 loss.

Works with any fill-mode encoder (Swin, GC ViT, GPViT, DGT, GLNet, and ViT/HiViT built with mask_mode='fill'); the
mask token itself lives in the encoder, at its first token level, so the method stays encoder-agnostic.

Shapes: B images, H x W pixels, u = mask unit in pixels, Gh x Gw = H/u x W/u mask cells, r = encoder output stride.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimtrain.config.errors import ConfigError
from mimtrain.encoders.base import mask_to_tokens


def unit_stats(images: Tensor, u: int, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per mask-unit mean and std over its u*u*3 values (MAE's norm-pix statistics), broadcast back to pixels.

    images: [B, 3, H, W] -> (mean, std), each [B, 1, H, W], constant over every u x u cell.
    """
    B, C, H, W = images.shape
    cells = images.reshape(B, C, H // u, u, W // u, u)
    mean = cells.mean(dim=(1, 3, 5), keepdim=True)
    std = (cells.var(dim=(1, 3, 5), keepdim=True) + eps).sqrt()
    expand = (B, 1, H // u, u, W // u, u)
    return mean.expand(expand).reshape(B, 1, H, W), std.expand(expand).reshape(B, 1, H, W)


def hidden_pixels(mask: Tensor, u: int) -> Tensor:
    """mask: [B, Gh, Gw] bool -> [B, 1, Gh*u, Gw*u] bool, True on the pixels of hidden cells."""
    return mask_to_tokens(mask, u)[:, None]


class SimMIM(nn.Module):
    """Masked image modeling around a fill-mode encoder. `forward(images, mask) -> {"loss", "pred", "mask"}`.

    Args:
        encoder: a mimtrain encoder with `mask_mode == "fill"`; its `encode` returns [B, C, H/r, W/r].
        norm_pix_loss: regress pixels normalized per mask unit (mean/var over the unit's pixels and channels) instead
            of the raw (dataset-normalized) pixels. SimMIM's default is raw pixels.
    """

    def __init__(self, encoder: nn.Module, norm_pix_loss: bool = False):
        super().__init__()
        if encoder.mask_mode != "fill":
            raise ConfigError(
                f"SimMIM needs an encoder in fill mode (mask token in place of hidden positions), but "
                f"{type(encoder).__name__} has mask_mode={encoder.mask_mode!r}; use a fill-only "
                "encoder (Swin, GC ViT, GPViT, DGT, GLNet) or build ViT/HiViT with mask_mode='fill', or pretrain "
                "drop-mode encoders with method.name=mae")
        self.encoder = encoder
        self.norm_pix_loss = norm_pix_loss
        self.unit = encoder.mask_unit
        self.stride = encoder.feature_info[-1]["reduction"]
        # SimMIM's one-layer prediction head: each output position predicts its r x r x 3 pixels, and PixelShuffle
        # lays them out back on the image grid.
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.embed_dim, self.stride ** 2 * 3, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def _check(self, images: Tensor, mask: Tensor) -> None:
        H, W = images.shape[-2:]
        if mask.shape[-2:] != (H // self.unit, W // self.unit) or H % self.unit or W % self.unit:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not tile {H}x{W} images in cells of "
                             f"{self.unit} px (the encoder's mask_unit); expected [B, {H // self.unit}, "
                             f"{W // self.unit}]")

    def target(self, images: Tensor) -> Tensor:
        """images: [B, 3, H, W] -> [B, 3, H, W] float32 regression target (normalized per unit with norm_pix_loss)."""
        images = images.float()
        if not self.norm_pix_loss:
            return images
        mean, std = unit_stats(images, self.unit)
        return (images - mean) / std

    def loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """L1 over hidden pixels only: sum of |pred - target| there / (hidden pixel count x channels), over the
        whole batch as in SimMIM (images hiding more cells weigh more)."""
        hidden = hidden_pixels(mask, self.unit).float()  # [B, 1, H, W]
        err = F.l1_loss(pred.float(), self.target(images), reduction="none") * hidden
        return err.sum() / (hidden.sum() * images.shape[1]).clamp_min(1.0)

    def forward(self, images: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """images: [B, 3, H, W] (normalized); mask: [B, H/u, W/u] bool, True = hidden.

        Returns:
            loss: scalar; pred: [B, 3, H, W] predicted pixels (in the target's space); mask: the input mask.
        """
        self._check(images, mask)
        latent = self.encoder.encode(images, mask)  # [B, C, H/r, W/r]
        pred = self.decoder(latent)  # [B, 3, H, W]
        return {"loss": self.loss(images, pred, mask), "pred": pred, "mask": mask}

    @torch.no_grad()
    def visualize(self, images: Tensor, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Original | masked input | reconstruction, all [B, 3, H, W] in the input's normalized space.

        masked: hidden pixels set to 0 (the dataset mean); reconstruction: predicted pixels on hidden cells pasted into
        the visible original. Norm-pix predictions are mapped back with each unit's own mean/std.
        """
        pred = out["pred"].float()
        if self.norm_pix_loss:
            mean, std = unit_stats(images.float(), self.unit)
            pred = pred * std + mean
        hidden = hidden_pixels(out["mask"], self.unit)
        views = {"original": images, "masked": images.masked_fill(hidden, 0.0),
                 "reconstruction": torch.where(hidden, pred.to(images.dtype), images)}
        return {**views, **self.encoder.extra_views(images, out["mask"])}  # e.g. GLNet's slot maps
