"""The encoder contract every backbone honours, and the one factory that builds them.

A method (MAE, SimMIM) talks to an encoder only through `MIMEncoder`; the masking service reads `mask_unit` and
`mask_mode` from it. Masks are `BoolTensor[B, Gh, Gw]` on the mask-unit grid, True = hidden.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterable, Literal, Protocol, runtime_checkable

import timm
import torch
import torch.utils.checkpoint
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models._manipulate import MATCH_PREV_GROUP
import torch.nn.functional as F
from torch import Tensor, nn

from mimtrain.config.errors import ConfigError
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

    def forward_features(self, x: Tensor) -> Tensor:
        """Unmasked forward, timm's meaning: the final unpooled map [B, C, h, w] (`output_fmt` NCHW)."""
        ...

    def forward_intermediates(self, x: Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Multi-level output: the maps of the `feature_info` entries `indices` (timm's API)."""
        ...

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Classification head on `forward_features`' output: [B, num_classes] (or [B, head_hidden_size])."""
        ...

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (dict of 'stem' / 'blocks' regexes, `timm.models.group_with_matcher`): layer
        0 the stem, then the blocks in forward order; names no regex matches (final norm, head) come last. It is
        what layer-wise lr decay (`engine.optim.layer_decay_groups`) reads."""
        ...

    def on_step(self, step: int, lr: float) -> None:
        """Called once before every optimizer step (see `EncoderBase.on_step`)."""
        ...

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch for activation checkpointing of every block stack."""
        ...


@contextmanager
def keep_running_stats(block: Callable[..., Tensor]):
    """Restore the running statistics of the batch norms inside `block` on exit (an activation-checkpointing rerun
    must not update them a second time)."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
        if isinstance(block, nn.Module) else []
    kept = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, kept):
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


class EncoderBase:
    """The optional hooks of the encoder contract, declared with no-op defaults so that code above (methods, the
    engine, features, eval) calls them unconditionally instead of probing encoders with hasattr/getattr.

    An encoder overrides what applies to it: DGT's `on_step`, GLNet's `extra_views`, ViT's class token, MAE-style
    classifiers' `unused_by_classifier`. Mixed in ahead of nn.Module (through `timm_glue.TimmNative`).
    """

    # Plain class attributes, not annotations: TorchScript would try to type annotations. Python-side declarations
    # TorchScript need not type (`torch.jit.script` compiles forward and what it calls).
    __jit_ignored_attributes__ = ["hidden_units", "classifier_modules", "pretraining_only", "pretrained_cfg",
                                  "feature_info", "default_cfg", "pyramid_info", "script_limits", "fx_limits"]
    __jit_unused_properties__ = ["num_classes", "num_features", "head_hidden_size"]

    # Drop mode: hidden mask units per image when the caller fixes it ahead (the fast path sets it from the mask
    # ratio), so the visible count is a Python constant (`visible_order`). None = read from each mask.
    hidden_units = None  # int | None
    # Parameter-name prefixes of the classification head (`classifier_keys`); empty = timm's pretrained_cfg.
    classifier_modules = ()  # tuple[str, ...]
    # Whether `forward_cls` exists: a class token that linear probes and k-NN pool by default (MAE's protocol).
    has_class_token = False
    # Why torch.jit.script / torch.fx.symbolic_trace cannot handle the encoder ("" = they can; the contract tests
    # check both ways). torch.export works for every encoder.
    script_limits = ""
    fx_limits = ""
    # Activation checkpointing of the block stacks (`set_grad_checkpointing`).
    grad_checkpointing = False
    # Parameter-name prefixes that only a pretraining encoder has (a fill-mode mask token, a final norm that MAE's
    # classifier bypasses): a classifier is built without them and loading drops them from a checkpoint.
    pretraining_only = ()  # tuple[str, ...]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # nn.Module's
        self.grad_checkpointing = False  # an instance attribute, which torch.jit.script sees (a class one it does not)

    def on_step(self, step: int, lr: float) -> None:
        """Engine hook before each optimizer step, with that step's learning rate (the max over param groups).
        Default: nothing (DGT's centroid EMA rate follows the lr)."""

    def extra_views(self, images: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Extra images for the pretraining visualisation, {tag: [N, 1 or 3, h, w]} in [0, 1]. Default: none."""
        return {}

    def unused_by_classifier(self) -> list[nn.Module]:
        """Modules the classifier's `forward` skips, frozen by fine-tuning so that DDP sees no parameter without a
        gradient. Default: none (classifiers are built without such modules)."""
        return []

    def no_weight_decay(self) -> set[str]:
        """Parameter names trained without weight decay (timm's hook). Default: none."""
        return set()

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Another key layout or geometry -> this model's keys (before the generic table resizing). Default: as is."""
        return state_dict

    def forward_cls(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] -> [B, C]: the class-token feature (encoders with `has_class_token`)."""
        raise ValueError(f"{type(self).__name__} has no class token (has_class_token=False); pool with 'avg'")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing: each block's activations are recomputed in backward instead of kept, for
        memory; outputs and gradients are unchanged. Encoders run their blocks through `self._run_block`."""
        self.grad_checkpointing = bool(enable)

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: an encoder that cannot be scripted says so, in one line."""
        if self.script_limits:
            raise TypeError(f"{type(self).__name__} cannot be scripted with torch.jit.script: {self.script_limits}; "
                            "use torch.export.export, which handles it")
        return self

    def _refuse_fx(self, x: Tensor) -> None:
        """Called first in the forward of encoders with `fx_limits`: torch.fx symbolic tracing stops with one line
        instead of a TraceError deep inside."""
        if not torch.jit.is_scripting():
            if self.fx_limits and isinstance(x, torch.fx.Proxy):
                raise TypeError(f"{type(self).__name__} cannot be traced with torch.fx.symbolic_trace: "
                                f"{self.fx_limits}; use torch.export.export, which handles it")

    def _mask_token_name(self) -> set[str]:
        """{"mask_token"} where the encoder has one (pretraining), for `no_weight_decay`."""
        return {"mask_token"} if getattr(self, "mask_token", None) is not None else set()

    def _mask_token(self) -> Tensor:
        """The fill-mode mask token; a classifier (num_classes > 0) is built without one and cannot encode masks."""
        token = self.mask_token
        if token is None:
            raise ValueError(f"this {type(self).__name__} was built as a classifier (num_classes > 0), which has no "
                             "mask token; build it with num_classes=0 to pretrain")
        return token

    def _recompute_context(self, block: Callable[..., Tensor]) -> tuple:
        """(forward, recompute) context managers for one checkpointed `block` call (`torch.utils.checkpoint`'s
        context_fn). The rerun leaves batch-norm running statistics as the forward left them (it would count the
        batch twice); DGT also replays the centroids its forward saw."""
        return nullcontext(), keep_running_stats(block)

    def _run_block(self, block: Callable[..., Tensor], *args) -> Tensor:
        """block(*args), checkpointed when enabled and gradients are being recorded."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False,
                                                     context_fn=lambda: self._recompute_context(block))
        return block(*args)

    def _run_blocks(self, blocks: Iterable[nn.Module], x: Tensor, *args) -> Tensor:
        """x through `blocks` in order (each `blk(x, *args)`), each one checkpointed when enabled."""
        for blk in blocks:
            x = self._run_block(blk, x, *args)
        return x


def resolve_mask_unit(mask_unit: int | None, default: int, step: int, name: str) -> int:
    """The encoder's mask unit: None = its default; otherwise a positive multiple of `step` (its token size), or a
    ValueError. Zero and negative units are refused rather than mapped to the default or to negative grids."""
    if mask_unit is None:
        return default
    if isinstance(mask_unit, bool) or not isinstance(mask_unit, int) or mask_unit <= 0:
        raise ConfigError(f"{name}: mask_unit must be a positive number of pixels (a multiple of {step}), got "
                          f"{mask_unit!r}; leave encoder.mask_unit unset for the default ({default})")
    if mask_unit % step:
        raise ConfigError(f"{name}: mask_unit {mask_unit} must be a multiple of the patch size {step}")
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
    package, whose `__init__` imports each encoder module. Unlike `timm.create_model` (1000 classes), the default is
    the pretraining encoder, num_classes=0; a classifier (num_classes > 0) has no pretraining-only parts."""
    if not timm.is_model(name):
        close = [m for m in timm.list_models(f"*{name.split('_')[0]}*") if m.startswith(("mim_", "hivit", "gpvit",
                                                                                         "dgt", "glnet", "simmim"))]
        raise ConfigError(f"encoder.name: unknown encoder '{name}'" +
                          (f"; did you mean one of {close[:8]}?" if close else ""))
    if mask_unit is not None:
        kwargs["mask_unit"] = mask_unit
    kwargs.setdefault("num_classes", 0)
    try:
        model = timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)
    except TypeError as e:  # a typo in encoder.kwargs, or a value of the wrong kind: one line naming it
        raise ConfigError(_kwargs_problem(name, kwargs, e)) from None
    except ConfigError:  # already one line naming its key (encoder.mask_unit, ...)
        raise
    except (ValueError, RuntimeError, AssertionError, ZeroDivisionError, IndexError) as e:
        # a value the architecture cannot take (negative depth, a width the heads do not divide, ...): the family's
        # own check, or torch refusing a shape deeper down; either way one line naming the kwarg and the encoder
        raise ConfigError(_unbuildable(name, img_size, kwargs, e)) from None
    if not isinstance(model, MIMEncoder):
        raise ConfigError(f"'{name}' is a timm model but not a mimtrain encoder (see base.MIMEncoder: encode, "
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


def _unbuildable(name: str, img_size, kwargs: dict, err: Exception) -> str:
    """'encoder.kwargs.depth=-1: mim_vit_tiny_patch16 cannot be built with it (...)': the kwargs the error names,
    else those with a negative (then a zero) number, the usual culprits of a shape error; with no kwargs to blame,
    the image size the encoder was asked for."""
    import re

    # the caller's own arguments (num_classes=0 is a valid headless build) are never the culprit
    given = {k: v for k, v in kwargs.items() if k not in ("mask_unit", "mask_mode", "num_classes", "drop_path_rate")}
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    named = [k for k in given if re.search(rf"\b{re.escape(k)}\b", text)]

    def below(v, bound: float) -> bool:
        values = v if isinstance(v, (list, tuple)) else [v]
        return any(isinstance(x, (int, float)) and not isinstance(x, bool) and x < bound for x in values)
    culprits = (named or [k for k, v in given.items() if below(v, 0)] or [k for k, v in given.items() if below(v, 1)]
                or list(given))
    if not culprits:
        return f"{name} cannot be built at image size {img_size} ({text})"
    keys = ", ".join(f"encoder.kwargs.{k}={given[k]!r}" for k in culprits)
    return f"{keys}: {name} cannot be built with {'them' if len(culprits) > 1 else 'it'} ({text})"


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
    ours = isinstance(model, EncoderBase) or (isinstance(model, type) and issubclass(model, EncoderBase))
    names = model.classifier_modules if ours else None
    if not names:
        names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not names:
        raise ValueError(f"{getattr(model, '__name__', type(model).__name__)} names no classifier: give it "
                         "`classifier_modules` (or a pretrained_cfg with 'classifier')")
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))
