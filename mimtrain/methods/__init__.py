"""Pretraining methods: `forward(images, mask) -> {"loss", ...}`; a method never calls backward."""
from __future__ import annotations

from torch import nn

from mimtrain.config.pretrain import ConfigError
from mimtrain.encoders import build_encoder
from mimtrain.masking import MaskingService
from mimtrain.methods.mae import MAE
from mimtrain.methods.simmim import SimMIM

# The form of the mask each method consumes; the encoder is built in this mode and the masking service follows it.
MASK_MODE = {"mae": "drop", "simmim": "fill"}


def mask_mode_for(method: str) -> str:
    if method not in MASK_MODE:
        raise ConfigError(f"unknown method.name '{method}' (known: {', '.join(MASK_MODE)})")
    return MASK_MODE[method]


# Method settings that only one method reads: set to anything but their default with another method, they would be
# accepted and silently ignored, so `build_method` refuses them.
ONLY_FOR = {"decoder_dim": "mae", "decoder_depth": "mae", "decoder_heads": "mae"}


def check_applicable(cfg) -> None:
    """Refuse method settings that the chosen method does not read (cfg: `MethodConfig`), naming the key."""
    defaults = type(cfg)()
    ignored = [f"method.{k}={getattr(cfg, k)!r}" for k, owner in ONLY_FOR.items()
               if owner != cfg.name and getattr(cfg, k) != getattr(defaults, k)]
    if ignored:
        raise ConfigError(f"{', '.join(ignored)}: not read by method.name={cfg.name} (they shape MAE's transformer "
                          "decoder, which it does not have); remove them from the recipe")


def build_method(cfg, encoder: nn.Module, img_size: int) -> nn.Module:
    """cfg: `MethodConfig`. A recipe that pairs a method with an encoder of the wrong mask mode, or sets a key the
    method does not read, is refused here, before any data is read."""
    mask_mode_for(cfg.name)
    check_applicable(cfg)
    if cfg.name == "mae":
        return MAE(encoder, img_size, decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                   decoder_heads=cfg.decoder_heads, norm_pix_loss=cfg.norm_pix_loss)
    return SimMIM(encoder, norm_pix_loss=cfg.norm_pix_loss)


def build_pretraining(cfg) -> tuple[nn.Module, MaskingService]:
    """cfg: pretraining `Config` -> (method, masking): what a pretraining run trains, for the trainer, `mimtrain bench`
    and the tests alike. The encoder is built headless (num_classes=0) in the mask mode its method consumes; the
    masking service draws [B, Gh, Gw] masks on that encoder's mask-unit grid at `cfg.data.img_size`. The masking
    service is built before the method so that a bad mask ratio is refused first. On the current device (CPU, or
    meta inside `torch.device("meta")`), in train mode, without the trainer's fast path (`apply_fast_path`)."""
    S = cfg.data.img_size
    encoder = build_encoder(cfg.encoder.name, S, mask_unit=cfg.encoder.mask_unit,
                            mask_mode=mask_mode_for(cfg.method.name), num_classes=0,
                            drop_path_rate=cfg.encoder.drop_path_rate, **cfg.encoder.kwargs)
    encoder.set_grad_checkpointing(cfg.train.grad_checkpointing)  # the one place pretraining gets it
    masking = MaskingService.for_encoder(encoder, S, cfg.mask, cfg.seed)
    return build_method(cfg.method, encoder, S), masking
