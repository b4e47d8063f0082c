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

import time
from dataclasses import asdict

import torch
import yaml
from safetensors.torch import save_file
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from tqdm.auto import tqdm

from mimtrain.config.pretrain import derive
from mimtrain.data.stream import ShardStream, count_samples
from mimtrain.engine.distributed import unwrap
from mimtrain.engine.logging import RunLogger
from mimtrain.engine.optim import build_schedule
from mimtrain.eval.classify.common import (PythonSeeded, accelerator_for, batches, build_from_checkpoint, eval_stream, evaluate,
                     follow_source, logits, num_classes, resolve_pool, say, shard_urls, start_run,
                     write_results)
from mimtrain.config.classify import EvalConfig
from mimtrain.checkpoint.encoder import CONFIG_FILE, ENCODER_FILE
from mimtrain.eval.layer_decay import param_groups


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
    acc = accelerator_for(cfg)
    cfg = follow_source(cfg, source, acc)  # unset img_size / mean / std: the source's
    # Everything that can be refused (shards, classes, checkpoint fit, schedule) is checked before any step.
    train_urls, val_urls = shard_urls(cfg)
    n_cls = num_classes(cfg, train_urls)
    encoder, spec = build_from_checkpoint(cfg, source, num_classes=n_cls, drop_path_rate=cfg.encoder.drop_path_rate)
    pool = resolve_pool(cfg.encoder.pool, encoder, default_cls=False)
    if pool == "avg":  # MAE: fc_norm after the pool replaces the pretrained final norm, which then gets no gradient
        for module in getattr(encoder, "unused_by_classifier", list)():
            module.requires_grad_(False)
    d = derive(cfg, acc.num_processes, cfg.data.samples_per_epoch or count_samples(train_urls))
    groups = param_groups(encoder, cfg.optim.weight_decay, cfg.finetune.layer_decay, set(encoder.no_weight_decay()))
    for g in groups:
        g.pop("param_names")
        g.pop("layer")
    optimizer = torch.optim.AdamW(groups, lr=d.lr, betas=tuple(cfg.optim.betas))
    schedule = build_schedule(optimizer, d, cfg.optim)
    ft = cfg.finetune
    mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.smoothing, num_classes=n_cls) \
        if ft.mixup > 0 or ft.cutmix > 0 else None
    criterion = SoftTargetCrossEntropy() if mixup else \
        LabelSmoothingCrossEntropy(ft.smoothing) if ft.smoothing > 0 else torch.nn.CrossEntropyLoss()
    if mixup and cfg.train.batch_size % 2:
        raise ValueError(f"Mixup/CutMix pair images within a batch: train.batch_size must be even "
                         f"(got {cfg.train.batch_size})")

    out = start_run(cfg, acc, {**d.as_dict(), "num_classes": n_cls, "pool": pool, "encoder": asdict(spec)})
    acc.print(f"fine-tune {spec.describe()} from {source}: {n_cls} classes, lr = blr {cfg.optim.blr:g} x "
              f"{d.effective_batch} / {cfg.optim.lr_base_batch} = {d.lr:.3g}, layer decay {ft.layer_decay} over "
              f"{len({g['lr_scale'] for g in groups})} layers; {d.steps_per_epoch} steps/epoch, stop at {d.stop_step}")
    model, optimizer = acc.prepare(Classifier(encoder, pool), optimizer)
    ema = ModelEmaV3(unwrap(acc, model), decay=ft.ema_decay) if ft.ema else None
    streams = max(1, cfg.data.num_workers)
    data = ShardStream(train_urls, train_transform(cfg), cfg.train.batch_size, seed=cfg.seed,
                       rank=acc.process_index, world_size=acc.num_processes, num_streams=streams,
                       num_batches=d.micro_batches_per_epoch, shuffle_buffer=cfg.data.shuffle_buffer)
    val = eval_stream(cfg, val_urls, acc)
    log = RunLogger(cfg.output_dir, enabled=acc.is_main_process)
    bar = tqdm(total=d.stop_step, disable=not (acc.is_main_process and cfg.train.progress), desc="finetune",
               dynamic_ncols=True)
    step, epoch, metrics, best = 0, 0, {}, 0.0
    on_step = getattr(encoder, "on_step", None)
    loss_sum, n_micro, t0 = torch.zeros((), device=acc.device), 0, time.perf_counter()
    while step < d.stop_step:
        data.set_epoch(epoch)
        model.train()
        for i, batch in enumerate(batches(data, cfg, acc)):
            x, y = batch["images"].to(acc.device), batch["label"].to(acc.device)
            if mixup:
                x, y = mixup(x, y)
            if i % cfg.train.grad_accum == 0:
                schedule.step_update(step)
                if on_step is not None:  # encoder hook, as in pretraining (DGT's centroid rate follows the lr)
                    on_step(step, max(g["lr"] for g in optimizer.param_groups))
            with acc.accumulate(model):
                with acc.autocast():
                    loss = criterion(model(x), y)
                acc.backward(loss)
                if acc.sync_gradients and cfg.optim.clip_grad > 0:
                    acc.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum, n_micro = loss_sum + loss.detach(), n_micro + 1
            if not acc.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if ema is not None:
                ema.update(unwrap(acc, model), step=step)
            if step % cfg.train.log_every == 0 or step >= d.stop_step:
                mean_loss = acc.reduce(loss_sum / n_micro, "mean").item()
                lr = max(g["lr"] for g in optimizer.param_groups)
                log.scalars(step, {"epoch": epoch, "loss": mean_loss, "lr": lr,
                                   "images_per_sec": n_micro * cfg.train.batch_size * d.world_size /
                                   (time.perf_counter() - t0)})
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                loss_sum, n_micro, t0 = torch.zeros((), device=acc.device), 0, time.perf_counter()
            if step >= d.stop_step:
                break
        epoch += 1
        last = step >= d.stop_step
        if last or (cfg.train.eval_every and epoch % cfg.train.eval_every == 0):
            metrics = _validate(model, ema, val, cfg, acc)
            best = max(best, metrics["top1"])
            shown = {k: v for k, v in metrics.items() if k != "num_val" and v is not None}  # top5 None: < 5 classes
            log.scalars(step, {"epoch": epoch, **{f"val/{k}": v for k, v in shown.items()}})
            say(acc, f"epoch {epoch} step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))
    bar.close()
    results = {"task": "finetune", "source": str(source), "encoder": spec.name, "pool": pool, "num_classes": n_cls,
               "step": step, "epochs": epoch, **metrics, "best_top1": best}
    write_results(out, results, acc)
    _save_final(encoder, spec, n_cls, cfg, out, acc, train_urls)
    log.close()
    acc.end_training()
    return results


def _validate(model, ema, val: ShardStream, cfg: EvalConfig, acc) -> dict:
    model.eval()
    metrics = evaluate(model, val, cfg, acc)
    if ema is not None:
        ema.eval()
        metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module, val, cfg, acc).items() if k != "num_val"})
    model.train()
    return metrics


def _save_final(model, spec, n_cls: int, cfg: EvalConfig, out, acc, train_urls: list[str]) -> None:
    """The fine-tuned classifier as an export directory (the spec carries num_classes, so it rebuilds with head)."""
    if not acc.is_main_process:
        return
    final = out / "final"
    final.mkdir(exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(final / ENCODER_FILE))
    meta = {"encoder": {**asdict(spec), "img_size": cfg.data.img_size,
                        "kwargs": {**spec.kwargs, "num_classes": n_cls}}, "source": "finetune",
            "data": {"mean": list(cfg.data.mean), "std": list(cfg.data.std)}}  # what evaluation of it follows
    (final / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
    from mimtrain.checkpoint.encoder import EncoderSpec
    from mimtrain.checkpoint.formats import label_names, write_timm_layout

    # timm's config.json + model.safetensors beside, with the class names (docs/export.md)
    write_timm_layout(final, EncoderSpec(**meta["encoder"]), meta["data"], label_names(train_urls, n_cls))
