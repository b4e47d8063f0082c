"""`mimtrain bench --compare hf`: HF transformers' `ViTMAEForPreTraining` at a recipe's sizes, the reference our MAE
ViT step is timed against (built offline, no pretrained weights)."""
from __future__ import annotations

import torch

from mimtrain.config.errors import ConfigError

HF_NAME = "HF ViTMAEForPreTraining"


def is_hf_comparable(cfg) -> bool:
    """HF ViTMAE is a plain ViT MAE: only MAE recipes with a mim_vit_* encoder have a counterpart."""
    return cfg.encoder.name.startswith("mim_vit_") and cfg.method.name == "mae"


def check_hf_comparable(cfg, item: str) -> None:
    if not is_hf_comparable(cfg):
        raise ConfigError(f"--compare hf needs an MAE recipe with a mim_vit_* encoder (HF ViTMAEForPreTraining is a "
                          f"plain ViT MAE); '{item}' is {cfg.method.name} with {cfg.encoder.name}")


def hf_config(cfg):
    """A `ViTMAEConfig` with the recipe's sizes (encoder read from our ViT, built on the meta device)."""
    from transformers import ViTMAEConfig

    from mimtrain.encoders import build_encoder

    with torch.device("meta"):
        enc = build_encoder(cfg.encoder.name, cfg.data.img_size, mask_unit=cfg.encoder.mask_unit,
                            mask_mode="drop", num_classes=0, **cfg.encoder.kwargs)
    if enc.mask_unit != enc.patch_size:
        raise ConfigError(f"HF ViTMAE masks single patches: encoder.mask_unit ({enc.mask_unit}) must equal the patch "
                          f"size ({enc.patch_size}) for --compare hf")
    blk = enc.vit.blocks[0]
    m = cfg.method
    return ViTMAEConfig(
        hidden_size=enc.embed_dim, num_hidden_layers=len(enc.vit.blocks), num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features, image_size=cfg.data.img_size, patch_size=enc.patch_size,
        num_channels=3, qkv_bias=True, layer_norm_eps=1e-6, decoder_hidden_size=m.decoder_dim,
        decoder_num_hidden_layers=m.decoder_depth, decoder_num_attention_heads=m.decoder_heads,
        decoder_intermediate_size=4 * m.decoder_dim, mask_ratio=cfg.mask.ratio, norm_pix_loss=m.norm_pix_loss,
        attn_implementation="sdpa")


class HFLoss(torch.nn.Module):
    """`model(images) -> {"loss"}` like our methods (HF draws its own random mask inside the forward)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict:
        return {"loss": self.model(pixel_values=images).loss}


def build_hf(cfg, batch: int, dev: torch.device, lr: float):
    """HF ViTMAEForPreTraining at the recipe's sizes, no pretrained weights, torch AdamW with default settings at the
    recipe's lr, betas and weight decay -> (model, optimizer, [(images [batch, 3, S, S],)])."""
    from transformers import ViTMAEForPreTraining

    model = HFLoss(ViTMAEForPreTraining(hf_config(cfg))).to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    S = cfg.data.img_size
    return model, optimizer, [(torch.randn(batch, 3, S, S).to(dev),)]
