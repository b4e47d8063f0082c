"""What makes every mimtrain encoder a timm-native model: default cfgs, `build_model_with_cfg`, pretrained loading of
our exports, `features_only`, `forward_intermediates`, and the classifier API.

Each encoder file lists its `default_cfgs` (timm reads that module attribute when `register_model` runs) and registers
its factories with `@timm_glue.register`; `TimmNative` is a base class that adds what timm expects of a model on top of
the encoder contract of `base.py`, with timm's meanings: `forward_features` is the final map, `forward_head` pools it,
`forward_intermediates` gives every `feature_info` level.
"""
from __future__ import annotations

import functools
import logging

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table_simple
from timm.models import build_model_with_cfg, generate_default_cfgs, load_pretrained, register_model
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch import Tensor, nn

from mimtrain.encoders.base import EncoderBase, classifier_keys

_logger = logging.getLogger(__name__)

# Index buffers every model rebuilds for its own geometry: a checkpoint's copy is dropped when the shapes differ.
DERIVED_BUFFERS = ("relative_position_index", "attn_mask", "rel_index")


def cfg(first_conv: str, classifier: str, img_size: int = 224, **overrides) -> dict:
    """A default pretrained cfg: the preprocessing our recipes use (ImageNet mean/std, bicubic, 0.875 centre crop).

    fixed_input_size: absolute position tables and attention windows are built for one input size.
    """
    return dict(url="", num_classes=1000, input_size=(3, img_size, img_size), pool_size=None, crop_pct=0.875,
                interpolation="bicubic", fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv=first_conv, classifier=classifier, license="apache-2.0", hf_hub_id="", **overrides)


def default_cfgs(cfgs: dict[str, dict]) -> dict:
    """{model name: cfg(...)} -> timm's DefaultCfg table (assign it to the encoder module's `default_cfgs`)."""
    return generate_default_cfgs(cfgs)


def register(factory):
    """`@register_model` for a mimtrain factory `fn(pretrained=False, **kwargs) -> model`.

    The factory becomes the model constructor of `build_model_with_cfg`, so `create_model` gains the default cfg,
    `pretrained=True` (+ `pretrained_cfg_overlay=dict(file=...)`), `features_only=True` and `out_indices`.
    """
    @functools.wraps(factory)
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return build(factory, factory.__name__, pretrained, **kwargs)
    return register_model(entrypoint)


def build(factory, variant: str, pretrained: bool, **kwargs) -> nn.Module:
    in_chans = kwargs.pop("in_chans", 3)
    if in_chans != 3:  # the pixel targets and the masking service assume RGB
        raise ValueError(f"{variant}: mimtrain encoders take 3-channel images (got in_chans={in_chans})")

    if kwargs.get("features_only"):
        kwargs.setdefault("num_classes", 0)  # no classifier (nor its fc_norm) in a feature extractor

    def construct(**model_kwargs) -> nn.Module:
        model_kwargs.pop("in_chans", None)
        return factory(**model_kwargs)

    model = build_model_with_cfg(construct, variant, False, feature_cfg=dict(feature_cls="getter", out_indices=None),
                                 **kwargs)
    if pretrained:
        # timm loads non-strictly whenever num_classes differs from the cfg's; we load strictly and let
        # `checkpoint_filter_fn` decide, loudly, what a new task replaces (the classifier, MAE's fc_norm).
        target = model.model if isinstance(model, FeatureGetterNet) else model  # features_only: the wrapped
        load_pretrained(target, pretrained_cfg=target.pretrained_cfg, num_classes=target.pretrained_cfg["num_classes"],
                        filter_fn=checkpoint_filter_fn, strict=True)
    return model


# ------------------------------------------------------------------------------------------------ pretrained loading

def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Our export (`model.safetensors`/`encoder.safetensors`), a training checkpoint's method state, or a plain timm
    ViT state dict -> this model's keys, with input-size-bound tables resized to the model.

    A checkpoint without a classifier that fits (a pretrained encoder, or another class count) leaves the model's
    freshly initialised head, as timm does when num_classes changes; anything else that does not fit fails the strict
    load.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("encoder.") for k in sd):  # MAE/SimMIM state: encoder + decoder
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    own = model.state_dict()
    sd = fit_state_dict(model, sd)
    sd = {k: v for k, v in sd.items() if not (k.endswith(DERIVED_BUFFERS) and k in own and v.shape != own[k].shape)}
    return _new_task_modules(model, sd, own)


def _new_task_modules(model: nn.Module, sd: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each classifier module (`base.classifier_keys`: the classifier, MAE's fine-tuning `fc_norm`, DGT's `head_fc`)
    comes from the model when the checkpoint's does not fit it: absent (a pretrained encoder), another class count,
    or a model without it (features_only, num_classes=0)."""
    for prefix in classifier_keys(model):
        theirs = {k for k in sd if k.startswith(prefix)}
        ours = {k for k in own if k.startswith(prefix)}
        if theirs == ours and all(sd[k].shape == own[k].shape for k in ours):
            continue
        if theirs:
            _logger.warning("checkpoint's %s does not fit the model (%d classes): a new one is initialised",
                            prefix[:-1], model.num_classes)
        sd = {k: v for k, v in sd.items() if k not in theirs}
        sd.update({k: own[k] for k in ours})
    return sd


def _grid(model: nn.Module) -> tuple[int, int]:
    return tuple(model.grid_size)  # token grid of the encoders with position tables (ViT, HiViT, GPViT)


def fit_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Resize the input-size-bound tables of `sd` to `model` (the encoder's own `adapt_state_dict` first: other key
    layouts, e.g. timm's ViT, and its own tables; then absolute position embeddings [1, P+N, C] / [N, C] and relative
    position bias tables [(2h-1)(2w-1), heads]). Pretraining-only parts the model lacks are dropped."""
    if isinstance(model, EncoderBase):
        sd = model.adapt_state_dict(sd)
    own = model.state_dict()
    # A classifier is built without the pretraining-only parts (mask token, bypassed final norm): drop them.
    drop = tuple(model.pretraining_only) if isinstance(model, EncoderBase) else ()
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(drop) or not drop}
    out = {}
    for key, value in sd.items():
        target = own.get(key)
        if target is not None and value.shape != target.shape and value.ndim == target.ndim:
            if key.endswith("pos_embed") and value.ndim in (2, 3):
                grid = _grid(model)
                v = value if value.ndim == 3 else value[None]
                prefix = v.shape[-2] - int(round(v.shape[-2] ** 0.5)) ** 2  # class tokens in front of a square grid
                v = resample_abs_pos_embed(v.float(), list(grid), num_prefix_tokens=prefix).to(value.dtype)
                value = v if value.ndim == 3 else v[0]
            elif key.endswith("relative_position_bias_table") and value.ndim == 2:
                owner = model.get_submodule(key.rsplit(".", 1)[0])
                window = tuple(getattr(owner, "window_size", None) or _grid(model))
                value = resize_rel_pos_bias_table_simple(value.float(), window, tuple(target.shape)).to(value.dtype)
        out[key] = value
    return out



# ------------------------------------------------------------------------------------------------ the model API

class TimmNative(EncoderBase):
    """What timm expects of a model, on top of the encoder contract (`base.MIMEncoder`, hooks in `base.EncoderBase`).

    timm's meanings: `forward_features(x)` is the final unpooled map (NCHW, `output_fmt`), `forward_head` pools it,
    `forward_intermediates` gives the `feature_info` levels (what `features_only`, dense backbones and the k-NN
    monitor read). An encoder implements `_feature_maps(x)`: one map per `feature_info` entry, the last one the
    final (normed) map.

    The classifier is the module named by the model's pretrained cfg (`classifier`); it is the one source of truth for
    `num_classes`, so the value a constructor assigns is not stored separately.
    """

    output_fmt = "NCHW"  # and `pretrained_cfg`: set by timm's `build_model_with_cfg`

    @property
    def num_classes(self) -> int:
        head = self.get_classifier()
        return head.out_features if isinstance(head, nn.Linear) else 0

    @num_classes.setter
    def num_classes(self, value: int) -> None:
        pass  # constructors assign it before the head exists; the head decides (see the class docstring)

    @property
    def num_features(self) -> int:
        """Channels of `forward_features`' map (timm: the features before pooling)."""
        return self.feature_info[-1]["num_chs"]

    @num_features.setter
    def num_features(self, value: int) -> None:
        pass  # derived from feature_info, which the constructors set

    @property
    def head_hidden_size(self) -> int:
        """Width of `forward_head(x, pre_logits=True)`: what feeds the classifier (timm's attribute)."""
        return self.num_features

    def _classifier_name(self) -> str:
        cfg = getattr(self, "pretrained_cfg", None) or {}  # absent when the class is constructed directly
        if cfg.get("classifier"):
            return cfg["classifier"]
        names = dict(self.named_modules())
        return next(n for n in ("head", "vit.head", "swin.head.fc", "gcvit.head.fc") if n in names)

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self._classifier_name())

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised classifier with `num_classes` outputs (0: none, `forward` gives features)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"{type(self).__name__} pools by averaging the last map; global_pool={global_pool!r}")
        name = self._classifier_name()
        old = self.get_submodule(name)
        parent_name, _, leaf = name.rpartition(".")
        in_dim = old.in_features if isinstance(old, nn.Linear) else self._classifier_in_features()
        new = nn.Linear(in_dim, num_classes) if num_classes > 0 else nn.Identity()
        setattr(self.get_submodule(parent_name) if parent_name else self, leaf, new)
        for owner in (self.get_submodule(parent_name),) if parent_name else ():
            if hasattr(owner, "num_classes"):  # a wrapped timm module that reads its own count
                owner.num_classes = num_classes

    def _classifier_in_features(self) -> int:
        return self.head_hidden_size

    def prune_intermediate_layers(self, indices: int | list[int] | None = None, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """`features_only`: drop the classifier; every level stays (the last one is the final map).

        indices: None = every `feature_info` entry; an int n = the last n; a list = those (negative from the end).
        """
        take, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_head:
            self.reset_classifier(0)
        return list(take)

    def _feature_maps(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] -> the final map [B, num_features, H/r, W/r] (r: the last `feature_info` reduction)."""
        return self._feature_maps(x)[-1]

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's multi-level API: the maps of `feature_info` entries `indices` (default all; an int n = the last n).

        The last entry is the final normed map (`forward_features`), earlier ones are raw stage/block outputs;
        `norm` and `stop_early` change nothing (every level is computed). Without `intermediates_only` it returns
        (forward_features(x), maps), so that `forward_head` accepts the first element as it does in timm.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt!r}")
        take, _ = feature_take_indices(len(self.feature_info), indices)
        feats = self._feature_maps(x)
        maps = [feats[i] if output_fmt == "NCHW" else feats[i].permute(0, 2, 3, 1) for i in take]
        return maps if intermediates_only else (feats[-1], maps)
