"""What fine-tuning, linear probing and k-NN read: the source's preprocessing, the labelled shards and their classes,
one evaluation pass, and the encoder from a checkpoint."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from accelerate import Accelerator
from torch import nn

from mimtrain.checkpoint.encoder import CONFIG_FILE, EncoderSpec, load_encoder, resolve
from mimtrain.config.classify import EvalConfig
from mimtrain.config.pretrain import ConfigError
from mimtrain.data.stream import (class_names, expand_shards, labelled_pass, match_classes, num_classes,
                                  require_labels, require_samples)
from mimtrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from mimtrain.features import resolve_pool


def source_preprocessing(source: str) -> dict:
    """What the source was pretrained on, where it says: {img_size, mean, std} from a run's or checkpoint's
    config.yaml (`data`), an export's config.yaml (`encoder.img_size`, `data`) or its timm config.json
    (`pretrained_cfg`); {} for a plain weights file."""
    import yaml

    p = resolve(source)
    if p.is_file():
        return {}
    found = {}
    timm_cfg = p / "config.json"
    if timm_cfg.is_file():
        pre = json.loads(timm_cfg.read_text()).get("pretrained_cfg") or {}
        found.update({k: pre[k] for k in ("mean", "std") if k in pre})
        if "input_size" in pre:
            found["img_size"] = pre["input_size"][-2:]
    if (p / CONFIG_FILE).is_file():
        meta = yaml.safe_load((p / CONFIG_FILE).read_text()) or {}
        if "img_size" in (meta.get("encoder") or {}):
            found["img_size"] = meta["encoder"]["img_size"]
        found.update({k: v for k, v in (meta.get("data") or {}).items() if k in ("img_size", "mean", "std")})
    return found


def follow_source(cfg: EvalConfig, source: str, acc: Accelerator) -> EvalConfig:
    """data.img_size, mean and std left unset (None) take the source's (`source_preprocessing`), so a 32 px run is
    evaluated at 32 px with its own normalisation; a plain weights file says nothing: 224 px and ImageNet's
    statistics. One line says what was taken from where. (Interpolation is bicubic in pretraining and evaluation.)"""
    data, found = cfg.data, None
    fill, said = {}, []
    for key, fallback in (("img_size", 224), ("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        if getattr(data, key) is not None:
            continue
        if found is None:
            found = source_preprocessing(source)
        value = found.get(key, fallback)
        if key == "img_size" and isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ConfigError(f"{source} was pretrained at {value[0]}x{value[1]} px; set data.img_size (evaluation "
                                  "crops are square)")
            value = value[0]
        fill[key] = tuple(value) if isinstance(value, list) else value
        said.append(f"{key} {fill[key]} ({'the source' if key in found else 'default: the source records none'})")
    if not fill:
        return cfg
    acc.print(f"data: {'; '.join(said)}; set data.img_size / data.mean / data.std to override")
    return dataclasses.replace(cfg, data=dataclasses.replace(data, **fill))


class ValShards(list):
    """The validation shard URLs, with the map that numbers their labels by the training classes (None: the same
    numbering); `eval_pass` applies it."""
    label_map: list[int] | None = None


def labelled_shards(cfg: EvalConfig, need_val: bool = True) -> tuple[list[str], ValShards, int]:
    """(train urls, val urls, number of classes); refuses, before any work, shards that are missing, empty or
    unlabelled, val classes that the training shards lack or number differently, and a data.num_classes below the
    training classes. A val set with fewer classes is mapped by name and says which ones it lacks."""
    if need_val and not cfg.data.val_shards:
        raise ConfigError("set data.val_shards (labelled validation shards) for an evaluation run")
    train = expand_shards(cfg.data.train_shards)
    val = ValShards(expand_shards(cfg.data.val_shards, key="data.val_shards") if cfg.data.val_shards else [])
    require_samples(train, "data.train_shards")
    require_labels(train, "data.train_shards")
    if val:
        require_samples(val, "data.val_shards")
        require_labels(val, "data.val_shards")
        val.label_map, missing = match_classes(train, val)
        if missing:
            _say(f"data.val_shards lacks {len(missing)} of the {len(class_names(train))} training classes "
                 f"({', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}); its labels are mapped by name")
    n = num_classes(train, cfg.data.num_classes)
    names = class_names(train)
    if names is not None and n > len(names):
        _say(f"warning: data.num_classes={n} is above the {len(names)} classes of the training shards; the extra "
             "outputs are never trained towards")
    return train, val, n


def _say(line: str) -> None:
    """One line on the main process (before the Accelerator may exist: RANK is set by every launcher)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr)


def eval_pass(cfg: EvalConfig, urls: list[str], acc: Accelerator):
    """One full, unshuffled pass over this process's share of `urls` with the evaluation transform."""
    t = eval_transform(cfg.data.img_size, cfg.data.mean, cfg.data.std, cfg.data.crop_pct)
    return labelled_pass(urls, t, cfg.train.eval_batch_size, acc.process_index, acc.num_processes,
                         cfg.data.num_workers, pin_memory=acc.device.type == "cuda",
                         label_map=urls.label_map if isinstance(urls, ValShards) else None)


def build_from_checkpoint(cfg: EvalConfig, source: str, random_init: bool = False,
                          **build_kwargs) -> tuple[nn.Module, EncoderSpec]:
    """The checkpoint's encoder at data.img_size, weights loaded strictly (or left random for a baseline)."""
    model, spec = load_encoder(source, cfg.encoder.name, cfg.encoder.kwargs, cfg.data.img_size,
                               random_init=random_init, **cfg.encoder.geometry, **build_kwargs)
    if getattr(model, "mask_token", None) is not None:
        model.mask_token.requires_grad_(False)  # pretraining-only; unused by forward_features
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)  # the one place eval classifiers get it
    return model, spec


def frozen_encoder(cfg: EvalConfig, source: str, acc: Accelerator,
                   random_init: bool = False) -> tuple[nn.Module, EncoderSpec, str]:
    """The checkpoint's encoder frozen in eval mode on the device, and its feature pooling (cls token where it has
    one): what the linear probe and k-NN read features from."""
    encoder, spec = build_from_checkpoint(cfg, source, random_init=random_init, num_classes=0)
    encoder.requires_grad_(False)
    encoder.eval().to(acc.device)
    return encoder, spec, resolve_pool(cfg.encoder.pool, encoder, default_cls=True)

