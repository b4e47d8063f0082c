"""The encoder contract every backbone honours, and the one factory that builds them.

A method (MAE, SimMIM) talks to an encoder only through `MIMEncoder`; the masking service reads `mask_unit` and
`mask_mode` from it. Masks are `BoolTensor[B, Gh, Gw]` on the mask-unit grid, True = hidden.
"""
from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import timm
import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models._manipulate import MATCH_PREV_GROUP
import torch.nn.functional as F
from torch import Tensor, nn

from mimtrain.masking import check_image_size  # noqa: F401  (the mask grid must tile the image)


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

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (dict of 'stem' / 'blocks' regexes, `timm.models.group_with_matcher`): layer
        0 the stem, then the blocks in forward order; names no regex matches (final norm, head) come last. It is
        what layer-wise lr decay (`engine.optim.layer_decay_groups`) reads."""
        ...


def resolve_mask_unit(mask_unit: int | None, default: int, step: int, name: str) -> int:
    """The encoder's mask unit: None = its default; otherwise a positive multiple of `step` (its token size), or a
    ValueError. Zero and negative units are refused rather than mapped to the default or to negative grids."""
    if mask_unit is None:
        return default
    if isinstance(mask_unit, bool) or not isinstance(mask_unit, int) or mask_unit <= 0:
        raise ValueError(f"{name}: mask_unit must be a positive number of pixels (a multiple of {step}), got "
                         f"{mask_unit!r}; leave encoder.mask_unit unset for the default ({default})")
    if mask_unit % step:
        raise ValueError(f"{name}: mask_unit {mask_unit} must be a multiple of the patch size {step}")
    return mask_unit


def mae_init_linear(m: nn.Module) -> None:
    """MAE's per-module init (`module.apply`): xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def mae_sincos_pos_embed(grid: tuple[int, int], dim: int) -> Tensor:
    """MAE's fixed 2-D sin-cos table: [gh * gw, dim], tokens in raster order, channels [sin w | cos w | sin h | cos h]
    (each a quarter, frequencies 1 / 10000^(i / (dim/4))), the layout of MAE's `get_2d_sincos_pos_embed`, so that
    official MAE checkpoints (decoder included) see the positions they were trained with."""
    # timm's interleaved layout is [sin h | cos h | sin w | cos w]: swapping the halves gives MAE's (w first).
    table = build_sincos2d_pos_embed(list(grid), dim=dim, interleave_sin_cos=True)
    return torch.cat([table[:, dim // 2:], table[:, :dim // 2]], dim=1)


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
    one host sync, and refuses rows that hide different counts: a rectangular gather of such a batch would carry
    some rows' hidden tokens into the output.
    """
    if hidden_units is None:
        counts = hidden.sum(1)
        low, high = (int(c) for c in torch.aminmax(counts))  # host sync: one per step
        if low != high:
            raise ValueError(f"drop mode needs every image to hide the same number of tokens, but this batch hides "
                             f"between {low} and {high} (per image: {counts.tolist()[:16]}); build masks with "
                             "mimtrain's masking service, which fixes the count per image")
        n_visible = hidden.shape[1] - low
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
    """Build a registered encoder by timm name, checking the mask grid before anything else runs.

    Every mimtrain encoder is registered by then: this module is reached only through the `mimtrain.encoders`
    package, whose `__init__` imports each encoder module."""
    if not timm.is_model(name):
        close = [m for m in timm.list_models(f"*{name.split('_')[0]}*") if m.startswith(("mim_", "hivit", "gpvit",
                                                                                         "dgt", "glnet", "simmim"))]
        raise ValueError(f"unknown encoder '{name}'" + (f"; did you mean one of {close[:8]}?" if close else ""))
    if mask_unit is not None:
        kwargs["mask_unit"] = mask_unit
    try:
        model = timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)
    except TypeError as e:  # a typo in encoder.kwargs, or a value of the wrong kind: one line naming it
        raise ValueError(_kwargs_problem(name, kwargs, e)) from None
    if not isinstance(model, MIMEncoder):
        raise TypeError(f"'{name}' is a timm model but not a mimtrain encoder (see base.MIMEncoder: encode, "
                        "mask_mode, group_matcher, ...); "
                        "use one of mimtrain's registered encoders")
    check_image_size(img_size, model.mask_unit, name)
    return model


def _kwargs_problem(name: str, kwargs: dict, err: TypeError) -> str:
    """The TypeError of a model __init__ as a config message: the bad key and the encoder, no traceback."""
    import re

    bad = re.search(r"unexpected keyword argument '(\w+)'", str(err))
    if bad:
        return (f"encoder.kwargs: {name} has no argument '{bad.group(1)}' ({type_name(err)}); check its spelling "
                f"in the recipe or override (given: {sorted(k for k in kwargs if k != 'mask_unit')})")
    return f"encoder.kwargs: cannot build {name} with {kwargs}: {err}"


def type_name(err: TypeError) -> str:
    """'VisionTransformer.__init__() got ...' -> 'VisionTransformer.__init__'."""
    return str(err).split("(")[0].strip() or "its constructor"


def strip_timm_kwargs(kwargs: dict) -> dict:
    """Drop the bookkeeping arguments timm's factory adds (pretrained_cfg, ...); our encoders take none of them."""
    return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------- what an encoder declares

def staged_group_matcher(stem: str, stages: str, coarse: bool = False, entry: str = "downsample",
                         closing: str | None = None) -> dict:
    """timm's `group_matcher` for an encoder of stages `{stages}.{s}` holding `blocks.{b}` (layer-wise lr decay).

    Layers in forward order: the stem (group 'stem'), then one per block, stage after stage. What opens a stage
    (`entry`, e.g. its downsampler) feeds its first block, so it shares that block's layer (ordinal (s, 0)); what
    closes it (`closing`, e.g. a stage norm) joins the stage's last block (timm's MATCH_PREV_GROUP). Names no regex
    matches (final norm, classifier) form the last layer. coarse: one group per stage.
    """
    if coarse:
        return dict(stem=stem, blocks=rf"^{stages}\.(\d+)\.")
    blocks = [(rf"^{stages}\.(\d+)\.(?:{entry})\.", (0,)), (rf"^{stages}\.(\d+)\.blocks\.(\d+)\.", None)]
    if closing:
        blocks.append((rf"^{stages}\.(\d+)\.(?:{closing})\.", MATCH_PREV_GROUP))
    return dict(stem=stem, blocks=blocks)


def classifier_keys(model: nn.Module | type | str) -> tuple[str, ...]:
    """Parameter-name prefixes (each ending in '.') of the classification head: what a new task replaces, what
    loading drops from a checkpoint, what dense tasks freeze, what trains at the full lr under layer decay.

    model: an encoder, its class, or a registered name. An encoder lists its head modules in `classifier_modules`
    (MAE's fc_norm and DGT's hidden head_fc are part of the head); otherwise timm's `pretrained_cfg['classifier']`.
    """
    if isinstance(model, str):  # registered: see build_encoder
        with torch.device("meta"):
            model = timm.create_model(model, pretrained=False)
    names = getattr(model, "classifier_modules", None)
    if names is None:
        names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not names:
        raise ValueError(f"{getattr(model, '__name__', type(model).__name__)} names no classifier: give it "
                         "`classifier_modules` (or a pretrained_cfg with 'classifier')")
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))
