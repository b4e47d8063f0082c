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
from accelerate.utils import DistributedType
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from mimtrain.checkpoint.export import write_classifier_export
from mimtrain.config.classify import EvalConfig
from mimtrain.config.pretrain import ConfigError, derive, describe_lr, to_dict
from mimtrain.data.stream import ShardStream, count_samples
from mimtrain.data.transforms import finetune_transform
from mimtrain.engine.distributed import full_state_dict, in_lockstep, make_accelerator, unwrap
from mimtrain.engine.fit import Plan, Task, fit
from mimtrain.engine.optim import build_schedule, layer_decay_groups
from mimtrain.engine.rundir import Run
from mimtrain.engine.sources import ShardSource
from mimtrain.eval.classify.source import (build_from_checkpoint, eval_pass, follow_source,
                                           labelled_shards)
from mimtrain.features import evaluate, logits, resolve_pool

# timm's EMA deep-copies the prepared model and updates it from whole parameters: FSDP2 refuses the copy ("FSDP does
# not support deepcopy") and each process holds only a shard of every parameter.
FSDP_NO_EMA = ("finetune.ema is not available under FSDP (the EMA is a whole copy of the model; FSDP keeps a shard "
               "of each parameter per process): set finetune.ema=false, or launch with multi_gpu.yaml (DDP)")


def train_transform(cfg: EvalConfig):
    """timm's ImageNet training pipeline: RandomResizedCrop (bicubic), flip, RandAugment, normalize, random erasing
    (`data.transforms.finetune_transform`: posterize kept in the pinned Pillow's range, seeded per sample)."""
    return finetune_transform(cfg.data, cfg.finetune)


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
    if cfg.finetune.ema and acc.distributed_type == DistributedType.FSDP:
        raise ConfigError(FSDP_NO_EMA)
    cfg = follow_source(cfg, source, acc)  # unset img_size / mean / std: the source's
    # Everything that can be refused (shards, classes, checkpoint fit, schedule) is checked before any step.
    train_urls, val_urls, n_cls = labelled_shards(cfg)
    encoder, spec = build_from_checkpoint(cfg, source, num_classes=n_cls, drop_path_rate=cfg.encoder.drop_path_rate)
    pool = resolve_pool(cfg.encoder.pool, encoder, default_cls=False)
    if pool == "avg":  # MAE: fc_norm after the pool replaces the pretrained final norm, which then gets no gradient
        for module in encoder.unused_by_classifier():  # declared hook: none for our encoders' classifiers
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

    derived = {**d.as_dict(), "task": "finetune", "num_classes": n_cls, "pool": pool, "encoder": asdict(spec)}
    run = Run(acc, cfg, sources=(source,))  # refusals and lock before anything is written
    try:
        config_text = run.start({**to_dict(cfg), "derived": derived})
        acc.print(f"fine-tune {spec.describe()} from {source}: {n_cls} classes, "
                  f"{describe_lr(cfg.optim, d.effective_batch, d.lr)}, layer decay {ft.layer_decay} over "
                  f"{len({g['lr_scale'] for g in groups})} layers; {d.steps_per_epoch} steps/epoch, stop at "
                  f"{d.stop_step}")
        model, optimizer = acc.prepare(Classifier(encoder, pool), optimizer)
        ema = ModelEmaV3(unwrap(acc, model), decay=ft.ema_decay) if ft.ema else None
        if ema is not None:
            acc.register_for_checkpointing(ema)  # the EMA weights travel in every checkpoint
        stream = ShardStream(train_urls, train_transform(cfg), cfg.train.batch_size, seed=cfg.seed,
                             rank=acc.process_index, world_size=acc.num_processes,
                             num_streams=max(1, cfg.data.num_workers), num_batches=d.micro_batches_per_epoch,
                             shuffle_buffer=cfg.data.shuffle_buffer)

        def export(name: str) -> None:  # the classifier as an export (its spec carries num_classes: it has a head)
            state = full_state_dict(acc, model)  # under FSDP a collective: every process gathers the shards
            if acc.is_main_process:
                state = {k.removeprefix("encoder."): v for k, v in state.items()}
                write_classifier_export(run.dir / name, state, spec, cfg.data.img_size, n_cls,
                                        {"mean": list(cfg.data.mean), "std": list(cfg.data.std)}, train_urls)

        task = FinetuneTask(cfg, acc, run, model, optimizer, schedule, encoder, val_urls, mixup, criterion, ema,
                            ShardSource(stream, cfg.data.num_workers, acc.device.type == "cuda"), export)
        t = cfg.train
        plan = Plan.of(t, d.stop_step, cfg.optim.clip_grad, "finetune", eval_every_epochs=t.eval_every)
        out = fit(task, plan, acc, run, config_text)
        if out["preempted"]:
            return {"task": "finetune", "preempted": True, "step": out["step"]}
        best = task.best
        results = {"task": "finetune", "source": str(source), "encoder": spec.name, "pool": pool,
                   "num_classes": n_cls, "step": out["step"], "epochs": out["epochs"], **task.metrics,
                   "best_top1": best["top1"],
                   "best": {**best, "checkpoint": f"checkpoints/step-{best['step']:08d}", "export": "best"},
                   "last": {"step": out["step"], "epoch": out["epochs"], "top1": task.metrics.get("top1"),
                            "checkpoint": f"checkpoints/step-{out['step']:08d}", "export": "final"}}
        export("final")
        return run.finish(results)
    finally:
        run.close()


class FinetuneTask(Task):
    """Cross-entropy (soft targets under Mixup/CutMix) of the classifier; top-1/top-5 (and the EMA's) on the
    validation shards; the best top-1 so far, and the last evaluation, as its state. A new best is also written as
    an export (`best/`, beside `final/`), which `--from` and `mimtrain export` read like any export."""
    has_evaluation = True

    def __init__(self, cfg: EvalConfig, acc, run, model, optimizer, schedule, encoder, val_urls, mixup, criterion,
                 ema, source: ShardSource, export):
        self.cfg, self.acc, self.run, self.model, self.optimizer, self.schedule = cfg, acc, run, model, optimizer, \
            schedule
        self.encoder, self.val_urls, self.mixup, self.criterion, self.ema = encoder, val_urls, mixup, criterion, ema
        self.source, self.export = source, export
        self.best: dict = {"top1": None, "step": None, "epoch": None}
        self.metrics: dict = {}

    def loss(self, batch: dict) -> dict:
        x, y = batch["images"], batch["label"]
        if self.mixup:
            x, y = self.mixup(x, y)
        return {"loss": self.criterion(self.model(x), y)}

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(unwrap(self.acc, self.model), step=step)

    def evaluate(self, step: int, epochs: int) -> dict:
        cfg, acc = self.cfg, self.acc
        self.model.eval()
        # pad: one blank image and no label, so it counts for nothing (FSDP: processes with fewer batches run it)
        size = cfg.data.img_size
        pad = {"images": torch.zeros(1, 3, size, size), "label": torch.zeros(0, dtype=torch.long)}
        metrics = evaluate(self.model, in_lockstep(eval_pass(cfg, self.val_urls, acc), acc, pad), acc)
        if self.ema is not None:
            self.ema.eval()
            metrics.update({f"ema_{k}": v for k, v in evaluate(self.ema.module, eval_pass(cfg, self.val_urls, acc),
                                                               acc).items() if k != "num_val"})
        shown = {k: v for k, v in metrics.items() if k != "num_val" and v is not None}  # top5 None: < 5 classes
        self.run.log.scalars(step, {"epoch": epochs, **{f"val/{k}": v for k, v in shown.items()}})
        self.run.say(f"epoch {epochs} step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))
        self.metrics, self.at = metrics, (step, epochs)
        return metrics

    def is_best(self, metrics: dict) -> bool:
        if self.best["top1"] is not None and metrics["top1"] <= self.best["top1"]:
            return False
        self.best = {"top1": metrics["top1"], "step": self.at[0], "epoch": self.at[1]}
        self.export("best")
        return True

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.best = state.get("best", self.best)
