"""Pretraining methods: `forward(images, mask) -> {"loss", ...}`; a method never calls backward."""
from __future__ import annotations

from torch import nn

from .mae import MAE


def build_method(cfg, encoder: nn.Module, img_size: int) -> nn.Module:
    """cfg: `MethodConfig`. A recipe that pairs a method with an encoder of the wrong mask mode is refused here,
    before any data is read."""
    if cfg.name == "mae":
        return MAE(encoder, img_size, decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                   decoder_heads=cfg.decoder_heads, norm_pix_loss=cfg.norm_pix_loss)
    raise ValueError(f"unknown method.name '{cfg.name}' (known: mae)")
