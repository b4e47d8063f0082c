"""Typed configuration of the evaluation runs (fine-tune, linear probe, k-NN).

One root dataclass, `EvalConfig`, with three sets of defaults: `finetune_defaults()` (MAE ViT-B's fine-tuning recipe),
`linprobe_defaults()` (MAE's linear probe) and `knn_defaults()`. Recipes under `recipes/finetune|linprobe/` state only
what differs; merging, strict keys and overrides are the pretraining config's (`mimtrain.config.pretrain.merge`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mimtrain.config.pretrain import OptimConfig, default_workers, load_config


@dataclass
class EncoderSourceConfig:
    """Which architecture a checkpoint is loaded into, and at which geometry (every evaluation kind, dense ones too)."""
    name: str = ""  # "" = the encoder the checkpoint was trained with; a name that differs from it is refused
    kwargs: dict = field(default_factory=dict)  # architecture arguments, only for plain state dicts (no config inside)
    geometry: dict = field(default_factory=dict)  # size-bound kwargs over the checkpoint's, e.g. {window_size: 7};
    # the tables they size (relative position bias) are resized on load


@dataclass
class EvalEncoderConfig(EncoderSourceConfig):
    drop_path_rate: float = 0.0
    pool: str = "auto"  # "auto" | "avg" (global average of the last map) | "cls" (ViT class token)


@dataclass
class EvalDataConfig:
    train_shards: str = ""  # labelled shards (`.cls`), same spec forms as pretraining
    val_shards: str = ""
    img_size: int | None = None  # None = the source's pretraining size (224 for a plain weights file)
    num_classes: int = 0  # 0 = from classes.json beside the train shards (written by make-shards)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # training crops (fine-tune: 0.08-1; linear probe: MAE uses the same)
    hflip: bool = True
    crop_pct: float = 0.875  # evaluation: resize to img_size / crop_pct, center-crop img_size
    mean: tuple[float, float, float] | None = None  # None = the source's (ImageNet's for a plain weights file)
    std: tuple[float, float, float] | None = None  # None = the source's (ImageNet's for a plain weights file)
    shuffle_buffer: int = 2000
    num_workers: int = field(default_factory=default_workers)  # min(8, CPUs per process on this node)
    samples_per_epoch: int = 0  # 0 = from the shards' index


@dataclass
class EvalTrainConfig:
    epochs: int = 100
    max_steps: int = 0  # hard stop (optimizer steps); the schedule still follows epochs
    batch_size: int = 32  # per process; MAE fine-tune: 32 x 32 GPUs = 1024
    grad_accum: int = 1
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp16" | "fp32"
    log_every: int = 20  # optimizer steps between logged scalars
    eval_every: int = 10  # epochs between validation passes (the last epoch is always evaluated; 0 = only the last)
    eval_batch_size: int = 128
    progress: bool = True


@dataclass
class FinetuneOptions:
    layer_decay: float = 0.65  # lr of layer i = lr x decay^(L - i); 1.0 = off
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec ("" = off)
    re_prob: float = 0.25  # random erasing probability
    mixup: float = 0.8  # Mixup alpha (0 = off)
    cutmix: float = 1.0  # CutMix alpha (0 = off)
    smoothing: float = 0.1  # label smoothing
    ema: bool = False  # keep an EMA of the weights (timm ModelEmaV3) and evaluate it too
    ema_decay: float = 0.9999


@dataclass
class LinprobeOptions:
    cache_features: bool = False  # compute features once (no augmentation) and train the head on them
    momentum: float = 0.9


@dataclass
class KnnOptions:
    k: int = 20
    temperature: float = 0.07


@dataclass
class EvalConfig:
    output_dir: str = "runs/finetune"
    seed: int = 0
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
    """Defaults of `kind` ("finetune" | "linprobe" | "knn") <- recipe YAML <- dotted overrides."""
    return load_config(recipe, overrides, base=DEFAULTS[kind]())

