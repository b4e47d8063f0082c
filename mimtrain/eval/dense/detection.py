"""`mimtrain detect`: COCO object detection and instance segmentation with Mask R-CNN on any pretrained encoder.

The detector is torchvision's `MaskRCNN` (RPN, RoIAlign box and mask heads, its resize-and-normalise transform) on our
backbone: the encoder built for a square canvas (`backbone.DenseBackbone`, strides 4-32) under torchvision's
`FeaturePyramidNetwork` with a max-pooled stride-64 level for the RPN, as in the Mask R-CNN FPN baseline. Training is
AdamW with layer-wise lr decay over the encoder, linear warm-up and x0.1 steps (1x: 12 epochs, steps after 8 and 11;
3x: 36 epochs, 27 and 33, multi-scale shorter side 480-800, and in the Swin/HiViT-style 3x recipes a random resize
+ crop before it, `coco.ResizeCrop`). Box and mask AP on the validation split come from pycocotools' COCOeval and go
to `metrics.jsonl` and `results.json`; the trained detector to `final/model.safetensors`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mimtrain.config.dense import DetectConfig
from mimtrain.config.errors import DataError
from mimtrain.config.pretrain import ConfigError, to_dict
from mimtrain.data.coco import CocoInstances, ResizeCrop, coco_metrics, collate, to_coco_results
from mimtrain.engine.distributed import make_accelerator, unwrap
from mimtrain.engine.fit import Plan, Task, fit
from mimtrain.engine.optim import step_schedule
from mimtrain.engine.rundir import Run
from mimtrain.engine.sources import MapSource
from mimtrain.eval.dense.backbone import DenseBackbone
from mimtrain.eval.dense.encoder import build_dense_encoder, dense_param_groups
from mimtrain.eval.dense.run import process_share, save_final


class FPNBackbone(nn.Module):
    """DenseBackbone + FPN, in torchvision's backbone shape. x: [B, 3, H, W] -> OrderedDict "0".."3" (strides 4-32)
    and "pool" (stride 64), each [B, out_channels, ., .]."""

    def __init__(self, body: DenseBackbone, out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels  # MaskRCNN reads it

    def forward(self, x: Tensor) -> OrderedDict:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def train_sizes(lo: int, hi: int) -> tuple[int, ...]:
    """Shorter sides torchvision draws from in training (steps of 32 from lo, ending on hi; it evaluates at hi)."""
    if not 0 < lo <= hi:
        raise ConfigError(f"data.min_size must be [lo, hi] with 0 < lo <= hi, got [{lo}, {hi}]")
    return tuple(range(lo, hi, 32)) + (hi,)


def canvas_size(cfg: DetectConfig) -> int:
    """The square the encoder is built for: every resized, 32-padded batch fits inside it."""
    need = -(-cfg.data.max_size // 32) * 32
    canvas = cfg.data.canvas or need
    if canvas < need or canvas % 32:
        raise ConfigError(f"data.canvas {canvas} must be a multiple of 32 and at least data.max_size rounded up to "
                          f"32 ({need})")
    return canvas


def build_detector(encoder: nn.Module, num_classes: int, cfg: DetectConfig, canvas: int) -> MaskRCNN:
    """Mask R-CNN over `encoder` (built for canvas x canvas) for `num_classes` object classes (+ background)."""
    m, d = cfg.model, cfg.data
    backbone = FPNBackbone(DenseBackbone(encoder, (canvas, canvas)), m.fpn_channels)
    return MaskRCNN(
        backbone, num_classes=None, min_size=train_sizes(*d.min_size), max_size=d.max_size,
        image_mean=list(d.mean), image_std=list(d.std), size_divisible=32,
        rpn_batch_size_per_image=m.rpn_batch_size_per_image,
        box_head=TwoMLPHead(m.fpn_channels * 7 * 7, m.representation_size),  # RoIAlign 7x7 per box
        box_predictor=FastRCNNPredictor(m.representation_size, num_classes + 1),
        box_batch_size_per_image=m.box_batch_size_per_image, box_detections_per_img=m.detections_per_image,
        mask_head=MaskRCNNHeads(m.fpn_channels, [m.mask_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(m.mask_channels, m.mask_channels, num_classes + 1))


def detection_losses(model: nn.Module, batch: tuple[list[Tensor], list[dict]]) -> dict[str, Tensor]:
    """torchvision's five losses: RPN objectness and box, classifier, box regression, mask."""
    images, targets = batch
    return model(images, targets)


@torch.no_grad()
def evaluate_detection(model: nn.Module, data: CocoInstances, cfg: DetectConfig, acc: Accelerator) -> tuple[dict, str]:
    """COCO box and mask AP of `model` on `data` (each process runs its share; the main process scores all).

    Returns ({"bbox": {...}, "segm": {...}, "num_val_images": n}, COCOeval's summary); empty on other processes.
    """
    model.eval()
    loader = DataLoader(Subset(data, process_share(len(data), acc)), batch_size=cfg.train.eval_batch_size,
                        num_workers=cfg.data.num_workers, collate_fn=collate)
    results, ids = [], []
    for images, targets in loader:
        with acc.autocast():
            outputs = model([im.to(acc.device) for im in images])
        img_ids = [t["image_id"] for t in targets]
        results += to_coco_results(outputs, img_ids, data.cat_ids)
        ids += img_ids
    results, ids = gather_object(results), gather_object(ids)
    if not acc.is_main_process:
        return {}, ""
    metrics, text = coco_metrics(data.coco, results, ids)
    return {**metrics, "num_val_images": len(set(ids))}, text


def _datasets(cfg: DetectConfig) -> tuple[CocoInstances, CocoInstances]:
    d = cfg.data
    if not d.root:
        raise ConfigError("set data.root to the COCO folder (annotations/instances_{train,val}2017.json, "
                          "train2017/, val2017/)")
    crop = ResizeCrop(d.crop_prob, d.crop_scales, d.crop_range, d.max_size) if d.crop_prob > 0 else None
    train = CocoInstances(d.root, d.train_split, train=True, hflip=d.hflip, max_images=d.max_images, crop=crop)
    val = CocoInstances(d.root, d.val_split, train=False, max_images=d.max_images)
    if train.cat_ids != val.cat_ids:
        raise DataError(f"{train.ann_file} and {val.ann_file} list different categories")
    return train, val


def detect(cfg: DetectConfig, source: str) -> dict:
    """Train and evaluate Mask R-CNN on the encoder in `source` (run dir, checkpoint, export or weights file)."""
    # DDP looks for unused parameters: the mask branch sits out a step without foreground RoIs, and some encoders'
    # classification layers (DGT's head_fc) never take part
    acc = make_accelerator(cfg.train.grad_accum, cfg.train.precision, find_unused_parameters=True, seed=cfg.seed)
    t = cfg.train
    # Everything that can be refused (data layout, checkpoint fit, schedule) is checked before the first step.
    train_set, val_set = _datasets(cfg)
    canvas = canvas_size(cfg)
    encoder, spec = build_dense_encoder(cfg.encoder, source, canvas, cfg.train.grad_checkpointing)
    model = build_detector(encoder, len(train_set.cat_ids), cfg, canvas)
    data = MapSource(train_set, t.batch_size, seed=cfg.seed, rank=acc.process_index, world_size=acc.num_processes,
                     num_workers=cfg.data.num_workers, collate_fn=collate, grad_accum=t.grad_accum)
    steps_per_epoch = data.batches_per_epoch // t.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(train_set)} training images give no optimizer step per epoch at train.batch_size="
                          f"{t.batch_size} x {acc.num_processes} processes x grad_accum={t.grad_accum}")
    total = t.epochs * steps_per_epoch
    stop = t.max_steps or total
    o = cfg.optim
    optimizer = torch.optim.AdamW(dense_param_groups(model, encoder, o.weight_decay, o.layer_decay), lr=o.lr,
                                  betas=tuple(o.betas))
    schedule = step_schedule(optimizer, o.warmup_iters, o.warmup_ratio, [e * steps_per_epoch for e in t.lr_steps])
    derived = {"task": "detect", "world_size": acc.num_processes, "canvas": canvas,
               "num_classes": len(train_set.cat_ids), "train_images": len(train_set), "val_images": len(val_set),
               "steps_per_epoch": steps_per_epoch, "total_steps": total, "stop_step": stop,
               "effective_batch": t.batch_size * acc.num_processes * t.grad_accum, "encoder": asdict(spec)}
    run = Run(acc, cfg, sources=(source,))  # refusals and lock before anything is written
    try:
        config_text = run.start({**to_dict(cfg), "derived": derived})
        acc.print(f"detect: Mask R-CNN on {spec.describe()} from {source}: {derived['num_classes']} classes, "
                  f"{len(train_set)} train / {len(val_set)} val images, canvas {canvas}, {steps_per_epoch} "
                  f"steps/epoch, stop at {stop}; lr {o.lr:g}, layer decay {o.layer_decay}")
        model, optimizer = acc.prepare(model, optimizer)
        task = DetectTask(cfg, acc, run, model, optimizer, schedule, encoder, data, val_set)
        plan = Plan.of(t, stop, o.clip_grad, "detect", eval_every_steps=t.eval_every * steps_per_epoch)
        out = fit(task, plan, acc, run, config_text)
        if out["preempted"]:
            return {"task": "detect", "preempted": True, "step": out["step"]}
        metrics = task.metrics
        results = {"task": "detect", "source": str(source), "encoder": spec.name, "step": out["step"],
                   "epochs": out["step"] / steps_per_epoch, **metrics}
        if metrics:
            results.update(box_ap=metrics["bbox"]["AP"], mask_ap=metrics["segm"]["AP"])
        save_final(model, run.dir, acc)
        return run.finish(results)
    finally:
        run.close()


class DetectTask(Task):
    """torchvision's five Mask R-CNN losses; COCO box and mask AP (main process) as the evaluation."""
    has_evaluation = True

    def __init__(self, cfg: DetectConfig, acc, run, model, optimizer, schedule, encoder, source: MapSource,
                 val_set: CocoInstances):
        self.cfg, self.acc, self.run, self.model, self.optimizer = cfg, acc, run, model, optimizer
        self.schedule, self.encoder, self.source, self.val_set = schedule, encoder, source, val_set
        self.metrics: dict = {}

    def loss(self, batch) -> dict:
        return detection_losses(self.model, batch)

    def evaluate(self, step: int, epochs: int) -> dict:
        acc = self.acc
        metrics, text = evaluate_detection(unwrap(acc, self.model), self.val_set, self.cfg, acc)  # no DDP collectives
        if metrics:
            self.run.log.scalars(step, {f"val/{k}_{n}": v for k in ("bbox", "segm") for n, v in metrics[k].items()})
            self.run.say(f"step {step}: box AP {metrics['bbox']['AP']:.4f}, mask AP {metrics['segm']['AP']:.4f}\n"
                         f"{text}")
        self.metrics = metrics
        return metrics
