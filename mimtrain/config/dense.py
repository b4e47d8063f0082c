"""Typed configuration of the dense transfer runs: COCO Mask R-CNN (`mimtrain detect`) and ADE20K UperNet
(`mimtrain segment`).

Two roots, `DetectConfig` and `SegmentConfig`, whose defaults are the standard schedules every seed paper builds on:
MMDetection's Mask R-CNN 1x (12 epochs, lr x0.1 after epochs 8 and 11, 500 warm-up iterations, 16 images a batch)
and the Swin/GPViT UperNet recipe (160k iterations, crop 512, AdamW lr 6e-5, wd 0.01, poly with 1500 warm-up
iterations). Recipes under `recipes/detect|segment/` state only what differs; merging, strict keys and dotted
overrides are the pretraining config's (`mimtrain.config.pretrain.load_config`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mimtrain.config.pretrain import default_workers, load_config
from mimtrain.config.classify import EncoderSourceConfig


@dataclass
class DenseEncoderConfig(EncoderSourceConfig):
    drop_path_rate: float = 0.1


@dataclass
class DenseOptimConfig:
    lr: float = 1e-4  # absolute peak lr for the recipe's total batch (not scaled with the batch size)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.9  # encoder layer i trains with lr x decay^(L + 1 - i); neck and head with lr; 1.0 = off
    warmup_iters: int = 500  # linear warm-up from warmup_ratio x lr (MMDetection/MMSegmentation's rule)
    warmup_ratio: float = 0.001
    clip_grad: float = 0.0  # 0 = off


@dataclass
class DenseTrainConfig:
    max_steps: int = 0  # hard stop (optimizer steps); the schedule still follows the full length
    batch_size: int = 2  # per process; the papers' 16 images = 2 x 8 GPUs
    grad_accum: int = 1
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp16" | "fp32"
    log_every: int = 50  # optimizer steps between logged scalars (and the only host syncs of the loss)
    progress: bool = True


@dataclass
class DenseRunConfig:
    """The top-level keys both dense runs share; each run adds its data, model, optim and train sections."""
    output_dir: str = "runs/dense"
    seed: int = 0
    encoder: DenseEncoderConfig = field(default_factory=DenseEncoderConfig)


# ---------------------------------------------------------------------------------------------------------- detect

@dataclass
class CocoDataConfig:
    root: str = ""  # holds annotations/instances_{split}.json and the {split}/ image folders
    train_split: str = "train2017"
    val_split: str = "val2017"
    min_size: tuple[int, int] = (800, 800)  # training shorter side drawn from [lo, hi] in steps of 32 (3x: 480-800);
    # evaluation uses hi
    max_size: int = 1333  # longer side cap
    canvas: int = 0  # square size the encoder is built for; inputs are padded to it; 0 = max_size rounded up to 32
    hflip: bool = True
    # Swin/HiViT 3x resize + crop (training): with probability crop_prob, resize the shorter side to one of
    # crop_scales, cut a random h x w window (h, w drawn from crop_range), then the multi-scale resize above; 0 = off
    crop_prob: float = 0.0
    crop_scales: tuple[int, int, int] = (400, 500, 600)
    crop_range: tuple[int, int] = (384, 600)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = field(default_factory=lambda: default_workers(4))  # min(4, CPUs per process on this node)
    max_images: int = 0  # use only the first N images of each split (smoke runs); 0 = all


@dataclass
class MaskRCNNConfig:
    fpn_channels: int = 256
    representation_size: int = 1024  # box head: two FC layers of this width
    mask_channels: int = 256  # mask head: four 3x3 convs of this width
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    detections_per_image: int = 100


@dataclass
class DetectTrainConfig(DenseTrainConfig):
    epochs: int = 12  # 1x; 3x = 36
    lr_steps: tuple[int, int] = (8, 11)  # epochs after which the lr drops x0.1 (3x: 27, 33)
    eval_every: int = 0  # epochs between COCO evaluations (the last epoch is always evaluated; 0 = only the last)
    eval_batch_size: int = 2


@dataclass
class DetectConfig(DenseRunConfig):
    output_dir: str = "runs/detect"
    data: CocoDataConfig = field(default_factory=CocoDataConfig)
    model: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)
    optim: DenseOptimConfig = field(default_factory=DenseOptimConfig)
    train: DetectTrainConfig = field(default_factory=DetectTrainConfig)


# ---------------------------------------------------------------------------------------------------------- segment

@dataclass
class Ade20kDataConfig:
    root: str = ""  # ADEChallengeData2016/ itself, or the folder that holds it
    num_classes: int = 150  # label PNGs: 0 = ignore, 1..num_classes -> training labels 0..num_classes-1
    crop_size: int = 512  # training crop and sliding window; the encoder is built for crop_size x crop_size
    scale: tuple[int, int] = (2048, 512)  # (long, short) bound of the resize, x a ratio drawn from ratio_range
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # re-draw a crop (up to 10 times) where one class covers more than this
    hflip: bool = True
    photometric: bool = True  # colour jitter (brightness, contrast, saturation, hue)
    slide_stride: int = 341  # sliding-window stride at evaluation (MMSegmentation's 512 / 341)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = field(default_factory=lambda: default_workers(4))  # min(4, CPUs per process on this node)
    check_labels: bool = True  # read every label PNG once before training to refuse out-of-range class ids
    max_images: int = 0  # use only the first N images of each split (smoke runs); 0 = all


@dataclass
class UperNetConfig:
    channels: int = 512
    pool_scales: tuple[int, int, int, int] = (1, 2, 3, 6)  # pyramid pooling bins
    dropout: float = 0.1
    aux_weight: float = 0.4  # auxiliary FCN head on the stride-16 level (0 = no auxiliary head)
    aux_channels: int = 256


@dataclass
class SegmentTrainConfig(DenseTrainConfig):
    iters: int = 160000  # length of the poly schedule (optimizer steps)
    poly_power: float = 1.0
    eval_every: int = 16000  # iterations between ADE20K evaluations (the last is always evaluated; 0 = only the last)
    eval_batch_size: int = 8  # sliding windows per forward


@dataclass
class SegmentConfig(DenseRunConfig):
    output_dir: str = "runs/segment"
    data: Ade20kDataConfig = field(default_factory=Ade20kDataConfig)
    model: UperNetConfig = field(default_factory=UperNetConfig)
    optim: DenseOptimConfig = field(default_factory=lambda: DenseOptimConfig(
        lr=6e-5, weight_decay=0.01, warmup_iters=1500, warmup_ratio=1e-6))
    train: SegmentTrainConfig = field(default_factory=SegmentTrainConfig)


DEFAULTS = {"detect": DetectConfig, "segment": SegmentConfig}


def load_dense_config(kind: str, recipe: str | None = None, overrides: list[str] = ()) -> DetectConfig | SegmentConfig:
    """Defaults of `kind` ("detect" | "segment") <- recipe YAML <- dotted overrides."""
    return load_config(recipe, overrides, base=DEFAULTS[kind]())
