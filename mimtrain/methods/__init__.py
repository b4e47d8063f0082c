"""Pretraining methods: `forward(images, mask) -> {"loss", ...}`; a method never calls backward."""
from __future__ import annotations

from torch import nn

from .mae import MAE
from .simmim import SimMIM

# The form of the mask each method consumes; the encoder is built in this mode and the masking service follows it.
MASK_MODE = {"mae": "drop", "simmim": "fill"}


def mask_mode_for(method: str) -> str:
    if method not in MASK_MODE:
        raise ValueError(f"unknown method.name '{method}' (known: {', '.join(MASK_MODE)})")
    return MASK_MODE[method]


def build_method(cfg, encoder: nn.Module, img_size: int) -> nn.Module:
    """cfg: `MethodConfig`. A recipe that pairs a method with an encoder of the wrong mask mode is refused here,
    before any data is read."""
    mask_mode_for(cfg.name)
    if cfg.name == "mae":
        return MAE(encoder, img_size, decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                   decoder_heads=cfg.decoder_heads, norm_pix_loss=cfg.norm_pix_loss)
    return SimMIM(encoder, norm_pix_loss=cfg.norm_pix_loss)
