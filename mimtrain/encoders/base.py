"""The encoder contract every backbone honours, and the one factory that builds them.

A method (MAE, SimMIM) talks to an encoder only through `MIMEncoder`; the masking service reads `mask_unit` and
`mask_mode` from it. Masks are `BoolTensor[B, Gh, Gw]` on the mask-unit grid, True = hidden.
"""
from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@runtime_checkable
class MIMEncoder(Protocol):
    """What every registered encoder exposes (checked by `tests/test_encoder_contract.py`)."""

    patch_size: int  # pixels per token at the encoder's first token level (ViT 16, Swin/HiViT 4, GPViT 8)
    mask_unit: int  # pixels per mask cell; a multiple of patch_size
    mask_mode: Literal["drop", "fill"]  # drop: only visible units enter (MAE); fill: mask token in place (SimMIM)
    embed_dim: int  # channels of `encode`'s output
    num_prefix_tokens: int  # drop mode: class/register tokens in front of the visible tokens (0 in fill mode)
    feature_info: list[dict]  # timm shape: dict(num_chs=, reduction=, module=)

    def encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """Pretraining forward. x: [B, 3, H, W]; mask: [B, H/u, W/u] bool, True = hidden.

        drop: [B, num_prefix_tokens + N_visible, C], visible units in raster order.
        fill: [B, C, H/r, W/r], the final feature map.
        """
        ...

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Unmasked forward: one NCHW map per `feature_info` entry."""
        ...

    def forward_head(self, feats: list[Tensor], pre_logits: bool = False) -> Tensor:
        """Classification head on `forward_features`' output: [B, num_classes] (or pooled features)."""
        ...


def check_image_size(img_size: int | tuple[int, int], mask_unit: int, name: str = "encoder") -> tuple[int, int]:
    """Refuse an image size the mask grid does not tile, before any expensive work."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h % mask_unit or w % mask_unit:
        raise ValueError(
            f"image size {h}x{w} is not divisible by the mask unit of {name} ({mask_unit} px); "
            f"choose data.img_size as a multiple of {mask_unit} or set encoder.mask_unit"
        )
    return h, w


def mask_to_tokens(mask: Tensor, factor: int) -> Tensor:
    """Upsample a mask-unit grid to a finer token grid. mask: [B, Gh, Gw] -> [B, Gh*f, Gw*f]."""
    if factor == 1:
        return mask
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def visible_order(hidden: Tensor, hidden_units: int | None, tokens_per_unit: int = 1) -> Tensor:
    """Indices of the visible tokens of a drop-mode batch, in raster order: [B, L] bool (True = hidden; every row
    hides the same count) -> [B, V].

    `hidden_units` is the hidden mask units per image where the caller fixes it ahead (the fast path sets it from the
    mask ratio): V is then a Python constant, so there is no host sync and torch.compile sees one static shape; a
    batch that hides another count fails loudly (an asynchronous device check). None reads V from the mask, with
    one host sync.
    """
    if hidden_units is None:
        n_visible = hidden.shape[1] - int(hidden[0].sum())  # host sync: one per step
    else:
        n_visible = hidden.shape[1] - hidden_units * tokens_per_unit
        torch._assert_async((hidden.sum(1) == hidden.shape[1] - n_visible).all(),
                            f"every image must hide {hidden_units} mask units (encoder.hidden_units)")
    return torch.argsort(hidden.to(torch.int8), dim=1, stable=True)[:, :n_visible]


def blank_hidden_pixels(x: Tensor, mask: Tensor) -> Tensor:
    """Zero the pixels under hidden cells, for stems whose receptive field crosses cell borders.

    x: [B, 3, H, W]; mask: [B, Gh, Gw] -> [B, 3, H, W]. Zero is the dataset mean after normalisation.
    """
    keep = F.interpolate((~mask)[:, None].to(x.dtype), size=x.shape[-2:], mode="nearest")
    return x * keep


def fill_tokens(tokens: Tensor, mask: Tensor, mask_token: Tensor, channels_last: bool = False) -> Tensor:
    """Replace hidden token positions by a learned token (SimMIM).

    tokens: [B, C, h, w], or [B, h, w, C] with channels_last; mask: [B, Gh, Gw] with h % Gh == 0; mask_token: [C].
    """
    h = tokens.shape[1] if channels_last else tokens.shape[2]
    m = mask_to_tokens(mask, h // mask.shape[1]).to(tokens.dtype)
    m = m[..., None] if channels_last else m[:, None]
    tok = mask_token.view(1, 1, 1, -1) if channels_last else mask_token.view(1, -1, 1, 1)
    return tokens * (1 - m) + tok.to(tokens.dtype) * m


def build_encoder(name: str, img_size: int, mask_unit: int | None = None, **kwargs) -> nn.Module:
    """Build a registered encoder by timm name, checking the mask grid before anything else runs."""
    import mimtrain.encoders  # noqa: F401  (registers our models with timm)

    if not timm.is_model(name):
        close = [m for m in timm.list_models(f"*{name.split('_')[0]}*") if m.startswith(("mim_", "hivit", "gpvit",
                                                                                         "dgt", "glnet", "simmim"))]
        raise ValueError(f"unknown encoder '{name}'" + (f"; did you mean one of {close[:8]}?" if close else ""))
    if mask_unit is not None:
        kwargs["mask_unit"] = mask_unit
    model = timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)
    if not isinstance(model, MIMEncoder):
        raise TypeError(f"'{name}' is a timm model but not a mimtrain encoder (no encode/mask_mode); "
                        "use one of mimtrain's registered encoders")
    check_image_size(img_size, model.mask_unit, name)
    return model


def strip_timm_kwargs(kwargs: dict) -> dict:
    """Drop the bookkeeping arguments timm's factory adds (pretrained_cfg, ...); our encoders take none of them."""
    return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


