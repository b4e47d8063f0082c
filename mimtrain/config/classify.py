"""Typed configuration of the evaluation runs (fine-tune, linear probe, k-NN).

One root dataclass, `EvalConfig`, with three sets of defaults: `finetune_defaults()` (MAE ViT-B's fine-tuning recipe),
`linprobe_defaults()` (MAE's linear probe) and `knn_defaults()`. Recipes under `recipes/finetune|linprobe/` state only
what differs; merging, strict keys and overrides are the pretraining config's (`mimtrain.config.pretrain.merge`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mimtrain.config.pretrain import ConfigError, OptimConfig, default_workers, load_config, ranged


@dataclass
class EncoderSourceConfig:
    """Which architecture a checkpoint is loaded into, and at which geometry (every evaluation kind, dense ones too)."""
    name: str = ""  # "" = the encoder the checkpoint was trained with; a name that differs from it is refused
    kwargs: dict = field(default_factory=dict)  # architecture arguments, only for plain state dicts (no config inside)
    geometry: dict = field(default_factory=dict)  # size-bound kwargs over the checkpoint's, e.g. {window_size: 7};
    # the tables they size (relative position bias) are resized on load


@dataclass
class EvalEncoderConfig(EncoderSourceConfig):
    drop_path_rate: float = ranged(0.0, ge=0, lt=1)  # stochastic depth rate of the last block
    pool: str = "auto"  # "auto" | "avg" (global average of the last map) | "cls" (ViT class token)


@dataclass
class EvalDataConfig:
    train_shards: str = ""  # labelled shards (`.cls`), same spec forms as pretraining
    val_shards: str = ""  # labelled shards scored after training; their classes must be among the train classes
    img_size: int | None = ranged(None, gt=0)  # None = the source's pretraining size (224 for a plain weights file)
    num_classes: int = ranged(0, ge=0)  # 0 = from classes.json beside the train shards (written by make-shards)
    crop_scale: tuple[float, float] = ranged((0.08, 1.0), gt=0, le=1, ordered=True)  # training crops;
    # MAE uses 0.08-1 for fine-tuning and linear probing alike
    hflip: bool = True  # random horizontal flips of the training crops
    crop_pct: float = ranged(0.875, gt=0, le=1)  # evaluation: resize to img_size / crop_pct, center-crop img_size
    mean: tuple[float, float, float] | None = ranged(None, ge=0, le=1)  # None = the source's;
    # ImageNet's for a plain weights file
    std: tuple[float, float, float] | None = ranged(None, gt=0)  # None = the source's;
    # ImageNet's for a plain weights file
    shuffle_buffer: int = ranged(2000, ge=0)  # samples held for shuffling across shards (0 = off)
    num_workers: int = ranged(default_factory=default_workers, ge=0)  # min(8, CPUs per process on this node)
    samples_per_epoch: int = ranged(0, ge=0)  # 0 = from the shards' index


@dataclass
class EvalTrainConfig:
    epochs: int = ranged(100, gt=0)  # length of the schedule
    max_steps: int = ranged(0, ge=0)  # hard stop (optimizer steps); the schedule still follows epochs
    batch_size: int = ranged(32, gt=0)  # per process; MAE fine-tune: 32 x 32 GPUs = 1024
    grad_accum: int = ranged(1, gt=0)  # micro-batches per optimizer step
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp16" | "fp32"
    grad_checkpointing: bool = False  # recompute each encoder block's activations in backward (memory for compute)
    log_every: int = ranged(20, gt=0)  # optimizer steps between logged scalars
    eval_every: int = ranged(10, ge=0)  # epochs between validation passes;
    # the last epoch is always evaluated; 0 = only the last
    eval_batch_size: int = ranged(128, gt=0)  # images per forward at evaluation
    progress: bool = True  # a tqdm progress bar on the main process
    # run safety, as in pretraining (docs/training.md): checkpoints, retention, preemption
    ckpt_every: int = ranged(1000, gt=0)  # optimizer steps between checkpoints (one is also written at the end)
    keep_last: int = ranged(3, ge=0)  # latest checkpoints kept (0 = all); fine-tuning's best one is kept besides
    keep_every: int = ranged(0, ge=0)  # also keep every checkpoint whose step is a multiple of this (0 = none)
    preempt_check_every: int = ranged(1, gt=0)  # steps between the processes' agreement on a stop signal


@dataclass
class FinetuneOptions:
    layer_decay: float = ranged(0.65, gt=0, le=1)  # lr of layer i = lr x decay^(L - i); 1.0 = off
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec ("" = off)
    re_prob: float = ranged(0.25, ge=0, le=1)  # random erasing probability
    mixup: float = ranged(0.8, ge=0)  # Mixup alpha (0 = off)
    cutmix: float = ranged(1.0, ge=0)  # CutMix alpha (0 = off)
    smoothing: float = ranged(0.1, ge=0, lt=1)  # label smoothing
    ema: bool = False  # keep an EMA of the weights (timm ModelEmaV3) and evaluate it too
    ema_decay: float = ranged(0.9999, ge=0, lt=1)  # EMA weight of the previous average per step


@dataclass
class LinprobeOptions:
    cache_features: bool = False  # compute features once (no augmentation) and train the head on them
    momentum: float = ranged(0.9, ge=0, lt=1)  # LARS momentum


@dataclass
class KnnOptions:
    k: int = ranged(20, ge=1)  # neighbours that vote (at most the bank size)
    temperature: float = ranged(0.07, gt=0)  # of the exp(similarity / T) vote weights


@dataclass
class EvalConfig:
    output_dir: str = "runs/finetune"  # the run directory: results.json, logs, config.yaml
    resume: str = ""  # "" (start fresh) | "auto" (newest complete checkpoint in output_dir) | a checkpoint dir
    overwrite: bool = False  # a used output_dir is moved aside to <output_dir>.old-<time> (never deleted)
    seed: int = ranged(0, ge=0, le=2**32 - 1)  # of every random draw (numpy takes 32 bits)
    encoder: EvalEncoderConfig = field(default_factory=EvalEncoderConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: EvalTrainConfig = field(default_factory=EvalTrainConfig)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    linprobe: LinprobeOptions = field(default_factory=LinprobeOptions)
    knn: KnnOptions = field(default_factory=KnnOptions)


def finetune_defaults() -> EvalConfig:
    """MAE ViT-B fine-tuning (He et al. 2022, Table 9): 100 epochs, batch 1024, AdamW (0.9, 0.999), blr 5e-4
    (lr = blr x batch / 256), wd 0.05, layer decay 0.65, 5 warm-up epochs, drop path 0.1, RandAugment (9, 0.5),
    random erasing 0.25, mixup 0.8, cutmix 1.0, label smoothing 0.1, global average pool."""
    return EvalConfig(
        output_dir="runs/finetune", encoder=EvalEncoderConfig(drop_path_rate=0.1),
        optim=OptimConfig(blr=5e-4, min_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.999), warmup_epochs=5.0))


def linprobe_defaults() -> EvalConfig:
    """MAE linear probing (Table 10): LARS, blr 0.1, batch 16384 (512 x 32), wd 0, 90 epochs, 10 warm-up,
    RandomResizedCrop + flip only, BatchNorm (no affine) in front of the linear head."""
    return EvalConfig(
        output_dir="runs/linprobe",
        data=EvalDataConfig(crop_scale=(0.08, 1.0)),
        optim=OptimConfig(blr=0.1, min_lr=0.0, weight_decay=0.0, warmup_epochs=10.0, fused=False),
        train=EvalTrainConfig(epochs=90, batch_size=512))


def knn_defaults() -> EvalConfig:
    return EvalConfig(output_dir="runs/knn")


DEFAULTS = {"finetune": finetune_defaults, "linprobe": linprobe_defaults, "knn": knn_defaults}


def load_eval_config(kind: str, recipe: str | None = None, overrides: list[str] = ()) -> EvalConfig:
    """Defaults of `kind` ("finetune" | "linprobe" | "knn") <- recipe YAML <- dotted overrides; the ranges and the
    settings only `kind` reads (`check_kind`) are checked before anything runs."""
    cfg = load_config(recipe, overrides, base=DEFAULTS[kind]())
    check_kind(cfg, kind)
    return cfg


def check_kind(cfg: EvalConfig, kind: str) -> None:
    """Refuse what a range cannot express: for fine-tuning, an odd batch under Mixup/CutMix (they pair images
    within a batch) and an augmentation policy timm cannot parse (it fails with a bare AssertionError otherwise)."""
    if kind != "finetune":
        return
    ft = cfg.finetune
    if (ft.mixup > 0 or ft.cutmix > 0) and cfg.train.batch_size % 2:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be even: Mixup/CutMix pair images within a "
                          "batch (or set finetune.mixup=0 finetune.cutmix=0)")
    if ft.auto_augment:
        from timm.data import create_transform

        try:
            create_transform(32, is_training=True, auto_augment=ft.auto_augment)
        except Exception as e:  # noqa: BLE001 -- timm asserts, or fails deeper, on a spec it cannot read
            raise ConfigError(f"finetune.auto_augment={ft.auto_augment!r} is not a timm augmentation policy (e.g. "
                              f"'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', 'original'; '' = off): "
                              f"{type(e).__name__} {e}".rstrip()) from None

