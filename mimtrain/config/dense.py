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

from mimtrain.config.pretrain import default_workers, load_config, ranged
from mimtrain.config.classify import EncoderSourceConfig


@dataclass
class DenseEncoderConfig(EncoderSourceConfig):
    drop_path_rate: float = ranged(0.1, ge=0, lt=1)  # stochastic depth rate of the last block


@dataclass
class DenseOptimConfig:
    lr: float = ranged(1e-4, gt=0)  # absolute peak lr for the recipe's total batch (not scaled with the batch size)
    weight_decay: float = ranged(0.05, ge=0)  # AdamW decoupled weight decay
    betas: tuple[float, float] = ranged((0.9, 0.999), ge=0, lt=1)  # AdamW (beta1, beta2)
    layer_decay: float = ranged(0.9, gt=0, le=1)  # encoder layer i trains with lr x decay^(L + 1 - i);
    # neck and head with lr; 1.0 = off
    warmup_iters: int = ranged(500, ge=0)  # linear warm-up from warmup_ratio x lr (MMDetection/MMSegmentation's rule)
    warmup_ratio: float = ranged(0.001, gt=0, le=1)  # warm-up starts at this fraction of lr
    clip_grad: float = ranged(0.0, ge=0)  # 0 = off


@dataclass
class DenseTrainConfig:
    max_steps: int = ranged(0, ge=0)  # hard stop (optimizer steps); the schedule still follows the full length
    batch_size: int = ranged(2, gt=0)  # per process; the papers' 16 images = 2 x 8 GPUs
    grad_accum: int = ranged(1, gt=0)  # micro-batches per optimizer step
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp16" | "fp32"
    grad_checkpointing: bool = False  # recompute each encoder block's activations in backward (memory for compute)
    log_every: int = ranged(50, gt=0)  # optimizer steps between logged scalars (and the only host syncs of the loss)
    progress: bool = True  # a tqdm progress bar on the main process
    # run safety, as in pretraining (docs/training.md): checkpoints, retention, preemption
    ckpt_every: int = ranged(1000, gt=0)  # optimizer steps between checkpoints (one is also written at the end)
    keep_last: int = ranged(3, ge=0)  # latest checkpoints kept (0 = all)
    keep_every: int = ranged(0, ge=0)  # also keep every checkpoint whose step is a multiple of this (0 = none)
    preempt_check_every: int = ranged(1, gt=0)  # steps between the processes' agreement on a stop signal


@dataclass
class DenseRunConfig:
    """The top-level keys both dense runs share; each run adds its data, model, optim and train sections."""
    output_dir: str = "runs/dense"  # the run directory: results.json, logs, config.yaml
    resume: str = ""  # "" (start fresh) | "auto" (newest complete checkpoint in output_dir) | a checkpoint dir
    overwrite: bool = False  # a used output_dir is moved aside to <output_dir>.old-<time> (never deleted)
    seed: int = ranged(0, ge=0, le=2**32 - 1)  # of every random draw (numpy takes 32 bits)
    encoder: DenseEncoderConfig = field(default_factory=DenseEncoderConfig)


# ---------------------------------------------------------------------------------------------------------- detect

@dataclass
class CocoDataConfig:
    root: str = ""  # holds annotations/instances_{split}.json and the {split}/ image folders
    train_split: str = "train2017"  # annotations/instances_{train_split}.json and its image folder
    val_split: str = "val2017"  # the split scored
    min_size: tuple[int, int] = ranged((800, 800), gt=0, ordered=True)  # training shorter side drawn from [lo, hi];
    # in steps of 32 (3x: 480-800);
    # evaluation uses hi
    max_size: int = ranged(1333, gt=0)  # longer side cap
    canvas: int = ranged(0, ge=0)  # square size the encoder is built for;
    # inputs are padded to it; 0 = max_size rounded up to 32
    hflip: bool = True  # random horizontal flips (boxes and masks follow)
    # Swin/HiViT 3x resize + crop (training): with probability crop_prob, resize the shorter side to one of
    # crop_scales, cut a random h x w window (h, w drawn from crop_range), then the multi-scale resize above; 0 = off
    crop_prob: float = ranged(0.0, ge=0, le=1)  # probability of the 3x resize + crop above (0 = off)
    crop_scales: tuple[int, int, int] = ranged((400, 500, 600), gt=0)  # shorter sides of the crop's first resize
    crop_range: tuple[int, int] = ranged((384, 600), gt=0, ordered=True)  # crop window h and w drawn from [lo, hi]
    mean: tuple[float, float, float] = ranged((0.485, 0.456, 0.406), ge=0, le=1)  # per channel, on [0, 1] pixels
    std: tuple[float, float, float] = ranged((0.229, 0.224, 0.225), gt=0)  # per channel (a 0 divides by zero)
    num_workers: int = ranged(default_factory=lambda: default_workers(4), ge=0)  # min(4, CPUs per process on this node)
    max_images: int = ranged(0, ge=0)  # use only the first N images of each split (smoke runs); 0 = all


@dataclass
class MaskRCNNConfig:
    fpn_channels: int = ranged(256, gt=0)  # FPN width
    representation_size: int = ranged(1024, gt=0)  # box head: two FC layers of this width
    mask_channels: int = ranged(256, gt=0)  # mask head: four 3x3 convs of this width
    rpn_batch_size_per_image: int = ranged(256, gt=0)  # anchors sampled per image for the RPN loss
    box_batch_size_per_image: int = ranged(512, gt=0)  # proposals sampled per image for the box head loss
    detections_per_image: int = ranged(100, gt=0)  # kept after NMS at evaluation


@dataclass
class DetectTrainConfig(DenseTrainConfig):
    epochs: int = ranged(12, gt=0)  # 1x; 3x = 36
    lr_steps: tuple[int, int] = ranged((8, 11), ge=0, ordered=True)  # epochs after which the lr drops x0.1 (3x: 27, 33)
    eval_every: int = ranged(0, ge=0)  # epochs between COCO evaluations;
    # the last epoch is always evaluated; 0 = only the last
    eval_batch_size: int = ranged(2, gt=0)  # images per forward at evaluation


@dataclass
class DetectConfig(DenseRunConfig):
    output_dir: str = "runs/detect"  # the run directory: results.json, logs, config.yaml
    data: CocoDataConfig = field(default_factory=CocoDataConfig)
    model: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)
    optim: DenseOptimConfig = field(default_factory=DenseOptimConfig)
    train: DetectTrainConfig = field(default_factory=DetectTrainConfig)


# ---------------------------------------------------------------------------------------------------------- segment

@dataclass
class Ade20kDataConfig:
    root: str = ""  # ADEChallengeData2016/ itself, or the folder that holds it
    num_classes: int = ranged(150, ge=1)  # label PNGs: 0 = ignore, 1..num_classes -> training labels 0..num_classes-1
    crop_size: int = ranged(512, gt=0)  # training crop and sliding window;
    # the encoder is built for crop_size x crop_size
    scale: tuple[int, int] = ranged((2048, 512), gt=0)  # (long, short) bound of the resize;
    # times a ratio drawn from ratio_range
    ratio_range: tuple[float, float] = ranged((0.5, 2.0), gt=0, ordered=True)  # resize ratio drawn from [lo, hi]
    cat_max_ratio: float = ranged(0.75, gt=0, le=1)  # re-draw a crop (up to 10 times);
    # where one class covers more than this fraction
    hflip: bool = True  # random horizontal flips of image and label
    photometric: bool = True  # colour jitter (brightness, contrast, saturation, hue)
    slide_stride: int = ranged(341, gt=0)  # sliding-window stride at evaluation (MMSegmentation's 512 / 341)
    mean: tuple[float, float, float] = ranged((0.485, 0.456, 0.406), ge=0, le=1)  # per channel, on [0, 1] pixels
    std: tuple[float, float, float] = ranged((0.229, 0.224, 0.225), gt=0)  # per channel (a 0 divides by zero)
    num_workers: int = ranged(default_factory=lambda: default_workers(4), ge=0)  # min(4, CPUs per process on this node)
    check_labels: bool = True  # read every label PNG once before training to refuse out-of-range class ids
    max_images: int = ranged(0, ge=0)  # use only the first N images of each split (smoke runs); 0 = all


@dataclass
class UperNetConfig:
    channels: int = ranged(512, gt=0)  # UperNet width
    pool_scales: tuple[int, int, int, int] = ranged((1, 2, 3, 6), gt=0)  # pyramid pooling bins
    dropout: float = ranged(0.1, ge=0, lt=1)  # before the classifier
    aux_weight: float = ranged(0.4, ge=0)  # auxiliary FCN head on the stride-16 level (0 = no auxiliary head)
    aux_channels: int = ranged(256, gt=0)  # auxiliary FCN head width
    # Plain encoders (ViT, GPViT): strides 4/8/16/32 read blocks 4/6/8/12 of 12, rescaled 4x/2x/1x/0.5x (BEiT/MAE's
    # UperNet protocol); false = the final map for every stride (ViTDet's simple pyramid). Hierarchical: stage maps.
    block_levels: bool = True


@dataclass
class SegmentTrainConfig(DenseTrainConfig):
    iters: int = ranged(160000, gt=0)  # length of the poly schedule (optimizer steps)
    poly_power: float = ranged(1.0, gt=0)  # exponent of the poly lr decay
    eval_every: int = ranged(16000, ge=0)  # iterations between ADE20K evaluations;
    # the last is always evaluated; 0 = only the last
    eval_batch_size: int = ranged(8, gt=0)  # sliding windows per forward


@dataclass
class SegmentConfig(DenseRunConfig):
    output_dir: str = "runs/segment"  # the run directory: results.json, logs, config.yaml
    data: Ade20kDataConfig = field(default_factory=Ade20kDataConfig)
    model: UperNetConfig = field(default_factory=UperNetConfig)
    optim: DenseOptimConfig = field(default_factory=lambda: DenseOptimConfig(
        lr=6e-5, weight_decay=0.01, warmup_iters=1500, warmup_ratio=1e-6))
    train: SegmentTrainConfig = field(default_factory=SegmentTrainConfig)


DEFAULTS = {"detect": DetectConfig, "segment": SegmentConfig}


def load_dense_config(kind: str, recipe: str | None = None, overrides: list[str] = ()) -> DetectConfig | SegmentConfig:
    """Defaults of `kind` ("detect" | "segment") <- recipe YAML <- dotted overrides."""
    return load_config(recipe, overrides, base=DEFAULTS[kind]())
