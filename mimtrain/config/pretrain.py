"""Typed configuration: dataclass defaults (= the MAE ViT-B recipe), YAML recipes that state only differences,
dotted command-line overrides, strict keys and types, and every derived value computed in `derive`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mimtrain.config.errors import ConfigError
from mimtrain.config.ranges import check_ranges, ranged

__all__ = ["ConfigError", "ranged"]  # re-exported: configs and callers import them from here


def default_workers(cap: int = 8) -> int:
    """DataLoader workers per process when the recipe sets none: the CPUs this process may use, shared by the
    processes of this node (LOCAL_WORLD_SIZE, set by accelerate/torchrun), at most `cap` (8 on a GPU host, 2 on a
    2-core laptop, not 8 fighting over 2 cores)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cap, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


@dataclass
class EncoderConfig:
    name: str = "mim_vit_base_patch16"  # any registered mimtrain encoder (timm name)
    mask_unit: int | None = ranged(None, gt=0)  # pixels per mask cell; None = the encoder's default
    drop_path_rate: float = ranged(0.0, ge=0, lt=1)  # stochastic depth rate of the last block
    kwargs: dict = field(default_factory=dict)  # extra architecture arguments (ablations, tiny test models)


@dataclass
class MaskConfig:
    ratio: float = ranged(0.75, gt=0, lt=1)  # fraction of mask units hidden
    generator: str = "random"  # "random" (MAE, uniform) | "block" (BEiT-style block-wise)
    min_block: int = ranged(4, ge=1)  # block generator: smallest block, in mask units
    max_aspect: float = ranged(3.0, ge=1)  # block generator: aspect ratios drawn log-uniformly in [1/a, a]


@dataclass
class MethodConfig:
    name: str = "mae"  # "mae" | "simmim"
    decoder_dim: int = ranged(512, gt=0)  # MAE decoder width
    decoder_depth: int = ranged(8, ge=1)  # MAE decoder blocks
    decoder_heads: int = ranged(16, ge=1)  # MAE decoder attention heads (divide decoder_dim)
    norm_pix_loss: bool = True  # MAE: each target patch normalised by its own mean and variance


@dataclass
class DataConfig:
    train_shards: str = ""  # brace pattern, file list (comma-separated), directory, pipe: command or http(s) URL
    val_shards: str = ""  # labelled: the k-NN queries when train.knn_every > 0
    knn_train_shards: str = ""  # labelled shards (`.cls`): the k-NN bank when train.knn_every > 0
    img_size: int = ranged(224, gt=0)  # square training crops, pixels
    crop_scale: tuple[float, float] = ranged((0.2, 1.0), gt=0, le=1, ordered=True)  # RandomResizedCrop area range
    hflip: bool = True  # random horizontal flips
    mean: tuple[float, float, float] = ranged((0.485, 0.456, 0.406), ge=0, le=1)  # per channel, on [0, 1] pixels
    std: tuple[float, float, float] = ranged((0.229, 0.224, 0.225), gt=0)  # per channel (a 0 divides by zero)
    shuffle_buffer: int = ranged(2000, ge=0)  # samples held for shuffling across shards (0 = off)
    num_workers: int = ranged(default_factory=default_workers, ge=0)  # default: min(8, CPUs per process on this node)
    samples_per_epoch: int = ranged(0, ge=0)  # 0 = from the shards' index (make-shards writes it) or counted once


@dataclass
class OptimConfig:
    blr: float = ranged(1.5e-4, gt=0)  # base lr for a batch of `lr_base_batch`
    lr: float = ranged(0.0, ge=0)  # absolute lr; 0 = derived from blr (see `derive`)
    lr_base_batch: int = ranged(256, gt=0)  # MAE scales by batch/256; SimMIM by batch/512
    min_lr: float = ranged(0.0, ge=0)  # where the cosine schedule ends
    weight_decay: float = ranged(0.05, ge=0)  # AdamW decoupled weight decay
    betas: tuple[float, float] = ranged((0.9, 0.95), ge=0, lt=1)  # AdamW (beta1, beta2)
    warmup_epochs: float = ranged(40.0, ge=0)  # linear warm-up length, in epochs
    clip_grad: float = ranged(0.0, ge=0)  # 0 = off
    fused: bool = True  # torch's fused AdamW kernel where the device supports it


@dataclass
class TrainConfig:
    epochs: int = ranged(800, gt=0)  # length of the cosine schedule
    max_steps: int = ranged(0, ge=0)  # hard stop (optimizer steps) over epochs; the schedule still follows epochs
    batch_size: int = ranged(64, gt=0)  # per process; MAE ViT-B: 64 x 64 GPUs = 4096
    grad_accum: int = ranged(1, gt=0)  # micro-batches per optimizer step
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp16" | "fp32"
    grad_checkpointing: bool = False  # recompute each encoder block's activations in backward (memory for compute)
    log_every: int = ranged(20, gt=0)  # steps between logged scalars (and the only host syncs of the loss)
    log_with: str = "tensorboard"  # accelerate tracker: tensorboard | wandb | mlflow (the last two: pip install them)
    image_every: int = ranged(500, ge=0)  # steps between TensorBoard reconstruction grids (0 = off)
    ckpt_every: int = ranged(1000, gt=0)  # steps between checkpoints (one is also written at the end)
    keep_last: int = ranged(3, ge=0)  # latest checkpoints kept (older ones go once a newer one is complete; 0 = all)
    keep_every: int = ranged(0, ge=0)  # also keep for good every checkpoint whose step is a multiple of this (0 = none)
    preempt_check_every: int = ranged(1, gt=0)  # steps between the processes' agreement on SIGTERM/SIGUSR1 (host-only)
    knn_every: int = ranged(0, ge=0)  # steps between k-NN top-1 probes, knn_train_shards -> val_shards (0 = off)
    progress: bool = True  # a tqdm progress bar on the main process
    trace_keys: bool = False  # write the sample keys each process trains on to output_dir/keys_rank<r>.txt (audits)
    dist_timeout_s: int = ranged(0, ge=0)  # seconds before a stalled process fails its peers; 0 = torch's (30 min)
    # GPU fast path switches (engine/fastpath.py; `mimtrain bench` measures each on and off)
    compile: bool = False  # torch.compile the method's forward (encoder, drop-mode gather, decoder, loss)
    compile_mode: str = "default"  # "default" | "reduce-overhead" | "max-autotune" | "max-autotune-no-cudagraphs"
    channels_last: bool = False  # conv weights and input images in channels-last (conv-heavy encoders)
    sdpa: bool = True  # every timm attention layer on F.scaled_dot_product_attention (false: the explicit softmax)


@dataclass
class Config:
    output_dir: str = "runs/mae_vit_base"  # the run directory: checkpoints, logs, config.yaml
    resume: str = ""  # "" (start fresh) | "auto" (newest complete checkpoint in output_dir) | a checkpoint dir
    overwrite: bool = False  # a used output_dir is moved aside to <output_dir>.old-<time> (never deleted)
    seed: int = ranged(0, ge=0, le=2**32 - 1)  # of every random draw (numpy takes 32 bits)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------------------- merging

def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads '1e-6' (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _unknown(key: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], choices, n=1)
    hint = f"; did you mean '{'.'.join(key.split('.')[:-1] + [close[0]])}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


REPLACE = "!"  # `key!` (recipe key or `key!=value` override) replaces a mapping instead of merging into it


def merge(cfg: Any, updates: dict, prefix: str = "") -> Any:
    """Return `cfg` with `updates` (a nested dict) applied; unknown keys and wrong types raise ConfigError.

    The one merge of recipes, their `inherit`ed parents and command-line overrides: sections merge key by key, and
    so do mapping values such as `encoder.kwargs` (`encoder.kwargs.depth=2` keeps the recipe's other kwargs). A key
    written `name!` replaces the mapping `name` as a whole (`encoder.kwargs!={depth: 2}`).
    """
    hints = typing.get_type_hints(type(cfg))
    fields = _fields(type(cfg))
    changes = {}
    for key, value in (updates or {}).items():
        replace = isinstance(key, str) and key.endswith(REPLACE)
        name = key[:-1] if replace else key
        full = f"{prefix}{name}"
        if name not in fields:
            raise _unknown(full, list(fields))
        current = changes.get(name, getattr(cfg, name))
        if replace and not isinstance(current, dict):
            raise ConfigError(f"{full}{REPLACE}: only mapping values (e.g. encoder.kwargs) can be replaced whole; "
                              f"set {full} without '{REPLACE}'")
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {list(_fields(type(current)))}, got {value!r}")
            changes[name] = merge(current, value, full + ".")
        elif isinstance(current, dict) and not replace:
            changes[name] = merge_mapping(current, _coerce(value, hints[name], full))
        else:
            changes[name] = _coerce(value, hints[name], full)
    return dataclasses.replace(cfg, **changes)


def merge_mapping(base: dict, new: dict) -> dict:
    """`new` merged into `base` key by key, nested mappings too; a key `k!` replaces `base[k]` whole."""
    out = dict(base)
    for k, v in new.items():
        if isinstance(k, str) and k.endswith(REPLACE):
            out[k[:-1]] = v
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_mapping(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> dict:
    """'train.max_steps=20' -> {'train': {'max_steps': 20}} (the value is parsed as YAML); 'a.b!=...' -> {'a': {'b!':
    ...}} (replace, see `merge`)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)}); quote the whole "
                          "override as one shell argument, e.g. \"encoder.kwargs={depth: 2, embed_dim: 24}\"") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{item}': empty key part in '{key}'")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(recipe: str | Path | None = None, overrides: list[str] = (), base: Any = None) -> Any:
    """Defaults <- recipe YAML (and the recipes it `inherit`s, parents first) <- dotted overrides, all through
    `merge`; then every value's range is checked (`check_values`) before anything expensive runs."""
    cfg = base or Config()
    if recipe:
        for path, layer in recipe_layers(Path(recipe)):
            try:
                cfg = merge(cfg, layer)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    for item in overrides:
        cfg = merge(cfg, parse_override(item))
    check_values(cfg)
    return cfg


def recipe_layers(path: Path, _chain: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """[(file, its mapping without `inherit`)], the farthest parent first. `inherit:` is relative to the file."""
    if not path.is_file():
        if _chain:
            raise ConfigError(f"{_chain[-1]}: inherit: {path.name} not found (looked at {path.resolve()})")
        raise ConfigError(f"recipe not found: {path} (looked at {path.resolve()})")
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"inherit cycle: {cycle}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping")
    parent = data.pop("inherit", None)
    if not parent:
        return [(path, data)]
    return recipe_layers(path.parent / parent, (*_chain, path.resolve())) + [(path, data)]


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'line L, column C: problem' from a PyYAML error (no multi-line snippet)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def check_values(cfg: Any) -> None:
    """Refuse values outside their declared ranges (`ranged` on each field), naming the key, before any data is
    read or model built. Works on every config root (pretraining, evaluation, dense)."""
    check_ranges(cfg)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def from_dict(data: dict) -> Config:
    return merge(Config(), data)


def save_config(cfg: Config, path: str | Path, derived: dict | None = None) -> None:
    data = to_dict(cfg)
    if derived:
        data["derived"] = derived
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def read_config(path: str | Path) -> Config:
    data = yaml.safe_load(Path(path).read_text())
    data.pop("derived", None)
    return from_dict(data)


# ---------------------------------------------------------------------------------------------------------- derived

@dataclass
class Derived:
    """Every value computed from the config, in one place; logged and saved with the config."""
    world_size: int
    effective_batch: int  # batch_size x processes x grad_accum
    lr: float
    steps_per_epoch: int  # optimizer steps
    total_steps: int  # of the schedule (epochs x steps_per_epoch)
    warmup_steps: int
    stop_step: int  # where training stops: max_steps if set, else total_steps
    micro_batches_per_epoch: int  # per process

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def describe_lr(optim: OptimConfig, effective_batch: int, lr: float) -> str:
    """Where the peak lr comes from, for the run's log: the explicit optim.lr, or the scaling rule."""
    if optim.lr > 0:
        return f"lr = {lr:.3g} (optim.lr)"
    return f"lr = blr {optim.blr:g} x {effective_batch} / {optim.lr_base_batch} = {lr:.3g}"


def derive(cfg: Config, world_size: int, samples_per_epoch: int) -> Derived:
    check_values(cfg)  # configs built in code (not through load_config) meet the same ranges
    t, o = cfg.train, cfg.optim
    eff = t.batch_size * world_size * t.grad_accum
    # optim.lr >= 0 is its declared range, so an explicit lr is never replaced: only 0 means "derive it"
    lr = o.lr if o.lr > 0 else o.blr * eff / o.lr_base_batch
    steps_per_epoch = samples_per_epoch // eff
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch of {samples_per_epoch} samples is smaller than one effective batch of {eff} "
                          f"(train.batch_size={t.batch_size} x {world_size} processes x grad_accum={t.grad_accum})")
    total = steps_per_epoch * t.epochs
    stop = t.max_steps if t.max_steps > 0 else total
    return Derived(world_size=world_size, effective_batch=eff, lr=lr, steps_per_epoch=steps_per_epoch,
                   total_steps=total, warmup_steps=int(math.ceil(o.warmup_epochs * steps_per_epoch)),
                   stop_step=stop, micro_batches_per_epoch=steps_per_epoch * t.grad_accum)
