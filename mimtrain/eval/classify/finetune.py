"""`mimtrain finetune`: end-to-end classification from a pretrained encoder (MAE / BEiT fine-tuning protocol).

The encoder is rebuilt from the checkpoint at the fine-tuning resolution (position tables resized), gets a new head
with `data.num_classes` outputs (ViT and HiViT: MAE's, the average of the patch tokens without the pretrained final
norm, a fresh `fc_norm` LayerNorm, head weights drawn with std 2e-5) and is trained with timm's RandAugment + random
erasing, Mixup/CutMix with soft-target cross-entropy (label smoothing), drop path, AdamW with layer-wise lr decay,
warm-up + cosine, and optionally an EMA of the weights. Top-1/top-5 on `data.val_shards` go to `metrics.jsonl`,
TensorBoard and `results.json`; the fine-tuned model is written as an export (`final/encoder.safetensors` +
`config.yaml`).
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from mimtrain.checkpoint.export import write_classifier_export
from mimtrain.config.classify import EvalConfig
from mimtrain.config.pretrain import derive
from mimtrain.data.stream import ShardStream, count_samples, make_loader
from mimtrain.data.transforms import PythonSeeded
from mimtrain.engine.distributed import make_accelerator, unwrap
from mimtrain.engine.fit import FitPlan, fit, forever
from mimtrain.engine.optim import build_schedule, layer_decay_groups
from mimtrain.engine.rundir import TaskRun
from mimtrain.eval.classify.source import (build_from_checkpoint, eval_pass, follow_source,
                                           labelled_shards)
from mimtrain.features import evaluate, logits, resolve_pool


def train_transform(cfg: EvalConfig):
    """timm's ImageNet training pipeline: RandomResizedCrop (bicubic), flip, RandAugment, normalize, random erasing."""
    ft, d = cfg.finetune, cfg.data
    t = create_transform(d.img_size, is_training=True, scale=tuple(d.crop_scale), hflip=0.5 if d.hflip else 0.0,
                         auto_augment=ft.auto_augment or None, color_jitter=None if ft.auto_augment else 0.4,
                         interpolation="bicubic", re_prob=ft.re_prob, re_mode="pixel", re_count=1,
                         mean=tuple(d.mean), std=tuple(d.std))
    return PythonSeeded(t)


class Classifier(nn.Module):
    """The encoder with its head, pooled as configured: x [B, 3, H, W] -> logits [B, classes]. One module, so that
    DDP and the EMA see a plain forward whatever the pooling."""

    def __init__(self, encoder: nn.Module, pool: str):
        super().__init__()
        self.encoder, self.pool = encoder, pool

    def forward(self, x: Tensor) -> Tensor:
        return logits(self.encoder, x, self.pool)


def finetune(cfg: EvalConfig, source: str) -> dict:
    """Fine-tune the encoder in `source` (run dir, checkpoint, export or weights file). Returns the results dict."""
    acc = make_accelerator(cfg.train.grad_accum, cfg.train.precision, seed=cfg.seed)
    cfg = follow_source(cfg, source, acc)  # unset img_size / mean / std: the source's
    # Everything that can be refused (shards, classes, checkpoint fit, schedule) is checked before any step.
    train_urls, val_urls, n_cls = labelled_shards(cfg)
    encoder, spec = build_from_checkpoint(cfg, source, num_classes=n_cls, drop_path_rate=cfg.encoder.drop_path_rate)
    pool = resolve_pool(cfg.encoder.pool, encoder, default_cls=False)
    if pool == "avg":  # MAE: fc_norm after the pool replaces the pretrained final norm, which then gets no gradient
        for module in getattr(encoder, "unused_by_classifier", list)():
            module.requires_grad_(False)
    d = derive(cfg, acc.num_processes, cfg.data.samples_per_epoch or count_samples(train_urls))
    ft = cfg.finetune
    groups = layer_decay_groups(encoder, cfg.optim.weight_decay, ft.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=d.lr, betas=tuple(cfg.optim.betas))
    schedule = build_schedule(optimizer, d, cfg.optim)
    mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.smoothing, num_classes=n_cls) \
        if ft.mixup > 0 or ft.cutmix > 0 else None
    criterion = SoftTargetCrossEntropy() if mixup else \
        LabelSmoothingCrossEntropy(ft.smoothing) if ft.smoothing > 0 else torch.nn.CrossEntropyLoss()
    if mixup and cfg.train.batch_size % 2:
        raise ValueError(f"Mixup/CutMix pair images within a batch: train.batch_size must be even "
                         f"(got {cfg.train.batch_size})")

    run = TaskRun(cfg, acc, {**d.as_dict(), "num_classes": n_cls, "pool": pool, "encoder": asdict(spec)})
    acc.print(f"fine-tune {spec.describe()} from {source}: {n_cls} classes, lr = blr {cfg.optim.blr:g} x "
              f"{d.effective_batch} / {cfg.optim.lr_base_batch} = {d.lr:.3g}, layer decay {ft.layer_decay} over "
              f"{len({g['lr_scale'] for g in groups})} layers; {d.steps_per_epoch} steps/epoch, stop at {d.stop_step}")
    model, optimizer = acc.prepare(Classifier(encoder, pool), optimizer)
    ema = ModelEmaV3(unwrap(acc, model), decay=ft.ema_decay) if ft.ema else None
    data = ShardStream(train_urls, train_transform(cfg), cfg.train.batch_size, seed=cfg.seed,
                       rank=acc.process_index, world_size=acc.num_processes, num_streams=max(1, cfg.data.num_workers),
                       num_batches=d.micro_batches_per_epoch, shuffle_buffer=cfg.data.shuffle_buffer)
    best = 0.0

    def epoch_batches(epoch: int):
        data.set_epoch(epoch)
        return make_loader(data, cfg.data.num_workers, pin_memory=acc.device.type == "cuda")

    def loss(model: nn.Module, batch: dict) -> dict:
        x, y = batch["images"], batch["label"]
        if mixup:
            x, y = mixup(x, y)
        return {"loss": criterion(model(x), y)}

    def validate(step: int, epochs: int) -> dict:
        nonlocal best
        model.eval()
        metrics = evaluate(model, eval_pass(cfg, val_urls, acc), acc)
        if ema is not None:
            ema.eval()
            metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module, eval_pass(cfg, val_urls, acc), acc).items()
                            if k != "num_val"})
        best = max(best, metrics["top1"])
        shown = {k: v for k, v in metrics.items() if k != "num_val" and v is not None}  # top5 None: < 5 classes
        run.log.scalars(step, {"epoch": epochs, **{f"val/{k}": v for k, v in shown.items()}})
        run.say(f"epoch {epochs} step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))
        return metrics

    plan = FitPlan(d.stop_step, grad_accum=cfg.train.grad_accum, clip_grad=cfg.optim.clip_grad,
                   log_every=cfg.train.log_every, batch_size=cfg.train.batch_size,
                   eval_every_epochs=cfg.train.eval_every, progress=cfg.train.progress, desc="finetune")
    step, epochs, metrics = fit(
        model, optimizer, schedule, forever(epoch_batches), loss, acc, plan, run.log, evaluate=validate,
        before_step=getattr(encoder, "on_step", None),  # encoder hook, as in pretraining (DGT's centroid rate)
        after_step=None if ema is None else lambda step: ema.update(unwrap(acc, model), step=step))
    results = {"task": "finetune", "source": str(source), "encoder": spec.name, "pool": pool, "num_classes": n_cls,
               "step": step, "epochs": epochs, **metrics, "best_top1": best}
    if acc.is_main_process:  # the fine-tuned classifier as an export (its spec carries num_classes: it has a head)
        write_classifier_export(run.dir / "final", encoder, spec, cfg.data.img_size, n_cls,
                                {"mean": list(cfg.data.mean), "std": list(cfg.data.std)}, train_urls)
    return run.finish(results)
