"""`mimtrain segment`: ADE20K semantic segmentation with an UperNet head on any pretrained encoder.

The encoder is built for the crop size (`backbone.DenseBackbone`, strides 4-32); UperNet decodes at stride 4 and
an auxiliary FCN head on the stride-16 level adds 0.4 x its loss, as in the UperNet recipes of Swin, BEiT and MAE.
Training: random-scale 512 crops, flip, colour jitter (`ade20k.Ade20kTrain`), cross-entropy ignoring 255, AdamW with
layer-wise lr decay over the encoder, linear warm-up then poly decay for 160k iterations. Evaluation: sliding 512
windows (stride 341) over the image resized to fit (2048, 512), logits averaged where windows overlap and resized to
the label's size; mIoU, mAcc and pixel accuracy go to `metrics.jsonl` and `results.json`.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from mimtrain.config.dense import SegmentConfig, UperNetConfig
from mimtrain.config.pretrain import ConfigError, to_dict
from mimtrain.data.ade20k import IGNORE, SPLITS, Ade20kTrain, Ade20kVal, IoUMeter, check_labels, find_root, list_pairs
from mimtrain.engine.distributed import make_accelerator
from mimtrain.engine.fit import Plan, Task, fit
from mimtrain.engine.optim import poly_schedule
from mimtrain.engine.rundir import Run
from mimtrain.engine.sources import MapSource
from mimtrain.eval.dense.backbone import BEIT_BLOCKS, DenseBackbone
from mimtrain.eval.dense.encoder import build_dense_encoder, dense_param_groups
from mimtrain.eval.dense.run import process_share, save_final
from mimtrain.eval.dense.upernet import FCNHead, UperNetHead


class Segmentor(nn.Module):
    """Backbone + UperNet (+ auxiliary FCN head). forward: x [B, 3, H, W] -> logits [B, K, H, W]."""

    def __init__(self, backbone: DenseBackbone, num_classes: int, cfg: UperNetConfig):
        super().__init__()
        self.backbone = backbone
        chs = backbone.out_channels
        self.decode = UperNetHead(chs, num_classes, cfg.channels, tuple(cfg.pool_scales), cfg.dropout)
        self.aux = FCNHead(chs[2], num_classes, cfg.aux_channels, cfg.dropout) if cfg.aux_weight > 0 else None
        self.aux_weight = cfg.aux_weight

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.decode(self.backbone(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


class SegmentationLoss(nn.Module):
    """The training forward, one module so that DDP sees it: (x [B, 3, H, W], y [B, H, W]) -> named losses."""

    def __init__(self, segmentor: Segmentor):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        s = self.segmentor
        feats = s.backbone(x)

        def ce(logits: Tensor) -> Tensor:  # logits at stride 4 (or 16), scored at the label's full resolution
            up = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
            return F.cross_entropy(up.float(), y, ignore_index=IGNORE)

        losses = {"loss_seg": ce(s.decode(feats))}
        if s.aux is not None:
            losses["loss_aux"] = s.aux_weight * ce(s.aux(feats[2]))
        return losses


def windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Sliding windows (y1, y2, x1, x2) covering an h x w image, the last ones flush with the border; a side shorter
    than the crop gets one window over all of it."""
    def starts(n: int) -> list[int]:
        count = max(n - crop + stride - 1, 0) // stride + 1
        return sorted({max(min(i * stride, n - crop), 0) for i in range(count)})
    return [(y, min(y + crop, h), x, min(x + crop, w)) for y in starts(h) for x in starts(w)]


@torch.no_grad()
def slide_logits(model: nn.Module, img: Tensor, crop: int, stride: int, batch: int) -> Tensor:
    """img: [3, h, w] -> logits [K, h, w], averaged over overlapping crop x crop windows (each zero-padded to the
    crop, which is the size the encoder was built for)."""
    h, w = img.shape[-2:]
    boxes = windows(h, w, crop, stride)
    total, count = None, torch.zeros(1, h, w, device=img.device)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        x = torch.stack([F.pad(img[:, y1:y2, x1:x2], (0, crop - (x2 - x1), 0, crop - (y2 - y1)))
                         for y1, y2, x1, x2 in chunk])
        logits = model(x).float()
        if total is None:
            total = torch.zeros(logits.shape[1], h, w, device=img.device)
        for (y1, y2, x1, x2), lg in zip(chunk, logits):
            total[:, y1:y2, x1:x2] += lg[:, :y2 - y1, :x2 - x1]
            count[:, y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, data: Ade20kVal, cfg: SegmentConfig, acc: Accelerator) -> dict:
    """mIoU, mAcc, aAcc and per-class IoU of `model` (a Segmentor) over `data`, each process scoring its share."""
    model.eval()
    meter = IoUMeter(cfg.data.num_classes, acc.device)
    loader = DataLoader(Subset(data, process_share(len(data), acc)), batch_size=None, num_workers=cfg.data.num_workers)
    for img, label, _ in loader:
        with acc.autocast():
            logits = slide_logits(model, img.to(acc.device), cfg.data.crop_size, cfg.data.slide_stride,
                                  cfg.train.eval_batch_size)
        pred = F.interpolate(logits[None], size=label.shape, mode="bilinear", align_corners=False).argmax(1)[0]
        meter.update(pred, label.to(acc.device))
    meter.areas = acc.reduce(meter.areas, "sum")
    return {**meter.results(), "num_val_images": len(data)}


def _data(cfg: SegmentConfig) -> tuple[Ade20kTrain, Ade20kVal]:
    d = cfg.data
    if not d.root:
        raise ConfigError("set data.root to the folder holding ADEChallengeData2016/")
    if d.crop_size % 32:
        raise ConfigError(f"data.crop_size must be a multiple of 32 (the coarsest stride), got {d.crop_size}")
    root = find_root(d.root)
    train = list_pairs(root, SPLITS["train"], d.max_images)
    val = list_pairs(root, SPLITS["val"], d.max_images)
    if d.check_labels:
        check_labels(train + val, d.num_classes, d.num_workers)
    return Ade20kTrain(train, d), Ade20kVal(val, d)


def segment(cfg: SegmentConfig, source: str) -> dict:
    """Train and evaluate UperNet on the encoder in `source` (run dir, checkpoint, export or weights file)."""
    # DDP looks for unused parameters: some encoders' classification layers (DGT's head_fc) never take part
    acc = make_accelerator(cfg.train.grad_accum, cfg.train.precision, find_unused_parameters=True, seed=cfg.seed)
    t, d, o = cfg.train, cfg.data, cfg.optim
    # Everything that can be refused (data layout, label ids, checkpoint fit) is checked before the first step.
    train_set, val_set = _data(cfg)
    encoder, spec = build_dense_encoder(cfg.encoder, source, d.crop_size, cfg.train.grad_checkpointing)
    blocks = BEIT_BLOCKS if cfg.model.block_levels else ()
    segmentor = Segmentor(DenseBackbone(encoder, (d.crop_size, d.crop_size), blocks), d.num_classes, cfg.model)
    if acc.num_processes > 1:  # batch statistics over all processes' crops, as MMSegmentation's SyncBN
        segmentor = nn.SyncBatchNorm.convert_sync_batchnorm(segmentor)
    data = MapSource(train_set, t.batch_size, seed=cfg.seed, rank=acc.process_index, world_size=acc.num_processes,
                     num_workers=d.num_workers, grad_accum=t.grad_accum)
    if data.batches_per_epoch < 1:
        raise ConfigError(f"{len(train_set)} training images give no optimizer step of train.batch_size="
                          f"{t.batch_size} x grad_accum={t.grad_accum} on {acc.num_processes} processes")
    if t.iters < 1:
        raise ConfigError(f"train.iters (the length of the poly schedule) must be at least 1, got {t.iters}")
    stop = t.max_steps or t.iters
    optimizer = torch.optim.AdamW(dense_param_groups(segmentor, encoder, o.weight_decay, o.layer_decay), lr=o.lr,
                                  betas=tuple(o.betas))
    schedule = poly_schedule(optimizer, o.warmup_iters, o.warmup_ratio, t.iters, t.poly_power)
    derived = {"task": "segment", "world_size": acc.num_processes, "canvas": d.crop_size,
               "train_images": len(train_set), "val_images": len(val_set), "stop_step": stop,
               "effective_batch": t.batch_size * acc.num_processes * t.grad_accum, "encoder": asdict(spec)}
    run = Run(acc, cfg, sources=(source,))  # refusals and lock before anything is written
    try:
        config_text = run.start({**to_dict(cfg), "derived": derived})
        acc.print(f"segment: UperNet on {spec.describe()} from {source}: {d.num_classes} classes, {len(train_set)} "
                  f"train / {len(val_set)} val images, crop {d.crop_size}, {t.iters} iterations (stop at {stop}); "
                  f"lr {o.lr:g}, layer decay {o.layer_decay}")
        model, optimizer = acc.prepare(SegmentationLoss(segmentor), optimizer)
        task = SegmentTask(cfg, acc, run, model, optimizer, schedule, encoder, data, segmentor, val_set)
        plan = Plan.of(t, stop, o.clip_grad, "segment", eval_every_steps=t.eval_every)
        out = fit(task, plan, acc, run, config_text)
        if out["preempted"]:
            return {"task": "segment", "preempted": True, "step": out["step"]}
        results = {"task": "segment", "source": str(source), "encoder": spec.name, "step": out["step"],
                   **task.metrics}
        save_final(segmentor, run.dir, acc)
        return run.finish(results)
    finally:
        run.close()


class SegmentTask(Task):
    """UperNet's cross-entropy (+ the auxiliary head's); mIoU, mAcc and pixel accuracy by sliding windows."""
    has_evaluation = True

    def __init__(self, cfg: SegmentConfig, acc, run, model, optimizer, schedule, encoder, source: MapSource,
                 segmentor: Segmentor, val_set: Ade20kVal):
        self.cfg, self.acc, self.run, self.model, self.optimizer = cfg, acc, run, model, optimizer
        self.schedule, self.encoder, self.source = schedule, encoder, source
        self.segmentor, self.val_set = segmentor, val_set
        self.metrics: dict = {}

    def loss(self, batch) -> dict:
        return self.model(*batch)

    def evaluate(self, step: int, epochs: int) -> dict:
        metrics = evaluate_segmentation(self.segmentor, self.val_set, self.cfg, self.acc)  # unwrapped: no DDP
        self.run.log.scalars(step, {f"val/{k}": metrics[k] for k in ("mIoU", "mAcc", "aAcc")})
        self.run.say(f"step {step}: mIoU {metrics['mIoU']:.4f}, mAcc {metrics['mAcc']:.4f}, "
                     f"aAcc {metrics['aAcc']:.4f}")
        self.metrics = metrics
        return metrics
