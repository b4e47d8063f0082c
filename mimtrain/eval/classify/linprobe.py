"""`mimtrain linprobe`: a linear classifier on frozen features (MAE's linear-probing protocol).

Features are the class token for ViT encoders and the global average of the last map for the others (hierarchical
encoders have no class token). The head is BatchNorm1d without affine parameters (eps 1e-6; it only standardises the
features, so the probe stays linear) followed by a Linear layer, trained with LARS (timm's, trust ratio on the weight
matrix as MAE's LARS), lr = blr x batch / 256, warm-up + cosine, on crop + flip augmentation. With
`linprobe.cache_features`, augmentation is off: features are computed once per image and the head trains on them.
"""
from __future__ import annotations

import math
import sys
import time

import torch
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch import Tensor, nn

from mimtrain.config.classify import EvalConfig
from mimtrain.config.pretrain import derive, describe_lr, to_dict
from mimtrain.data.stream import ShardStream, count_samples
from mimtrain.data.transforms import pretrain_transform
from mimtrain.engine.distributed import make_accelerator
from mimtrain.engine.fit import Plan, Task, fit
from mimtrain.engine.optim import build_schedule
from mimtrain.engine.rundir import Run
from mimtrain.engine.sources import ShardSource, TensorSource
from mimtrain.eval.classify.source import eval_pass, follow_source, frozen_encoder, labelled_shards
from mimtrain.features import evaluate, extract, pooled, score


LARS_TRUST = 0.001  # timm Lars' default trust_coeff (as MAE's LARS), used by `lars` below


class ProbeHead(nn.Sequential):
    """[B, C] features -> [B, classes]: BatchNorm1d(affine=False, eps=1e-6) + Linear (weights ~ N(0, 0.01))."""

    def __init__(self, dim: int, n_cls: int):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, n_cls))
        trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def lars(head: nn.Module, lr: float, weight_decay: float, momentum: float) -> Lars:
    """LARS with the trust ratio on the weight matrix only (MAE excludes biases and norms from adaptation)."""
    weights = [p for p in head.parameters() if p.ndim > 1]
    others = [p for p in head.parameters() if p.ndim <= 1]
    return Lars([{"params": weights, "always_adapt": True, "weight_decay": weight_decay},
                 {"params": others, "always_adapt": False, "weight_decay": 0.0}], lr=lr, momentum=momentum,
                trust_coeff=LARS_TRUST)


def scheduled_lrs(d, min_lr: float) -> Tensor:
    """The lr of each of the `d.stop_step` steps the head takes: linear warm-up from 0, cosine to min_lr at
    `d.total_steps`, min_lr after it (`engine.optim.build_schedule`, written out)."""
    t = torch.arange(d.stop_step, dtype=torch.float64)
    warm = d.lr * t / max(d.warmup_steps, 1)
    span = max(1, d.total_steps - d.warmup_steps)
    progress = ((t - d.warmup_steps) / span).clamp(0, 1)
    cosine = min_lr + 0.5 * (d.lr - min_lr) * (1 + torch.cos(math.pi * progress))
    return torch.where(t < d.warmup_steps, warm, cosine)


def head_budget(d, min_lr: float, momentum: float, trust_coeff: float = LARS_TRUST) -> float:
    """How far the head's weight can travel, in units of its own norm, over the whole schedule.

    LARS scales each step of the weight matrix to lr x trust_coeff x |w| (momentum adds up to 1 / (1 - momentum) of
    it), so sum(lr) x trust_coeff / (1 - momentum) bounds the relative distance from the random initialisation.
    Below 1 the head cannot leave its random direction: accuracy stays near or below chance (the old tiny recipe:
    12 steps at lr 0.0016, 0.0002). MAE's ImageNet probe: about 220; the demo recipe: about 6."""
    return float(scheduled_lrs(d, min_lr).sum()) * trust_coeff / (1.0 - momentum)


def short_schedule_warning(budget: float, d) -> str:
    return (f"warning: linear probe schedule too short for the head to train: {d.stop_step} steps at peak lr "
            f"{d.lr:.3g} let LARS move the head {budget:.2g}x its initial norm (needs >= 1; expect chance-level "
            f"accuracy); raise optim.lr / optim.blr or train.epochs, or use linprobe.cache_features=true for cheap "
            f"steps (recipes/linprobe/tiny_cpu.yaml)")


def linprobe(cfg: EvalConfig, source: str, random_init: bool = False) -> dict:
    """Linear-probe the encoder in `source`; `random_init` probes the same architecture untrained (a baseline)."""
    acc = make_accelerator(cfg.train.grad_accum, cfg.train.precision, seed=cfg.seed)
    cfg = follow_source(cfg, source, acc)  # unset img_size / mean / std: the source's
    train_urls, val_urls, n_cls = labelled_shards(cfg)
    encoder, spec, pool = frozen_encoder(cfg, source, acc, random_init)
    n_train = cfg.data.samples_per_epoch or count_samples(train_urls)
    d = derive(cfg, acc.num_processes, n_train)
    head = ProbeHead(encoder.embed_dim, n_cls).to(acc.device)
    optimizer = lars(head, d.lr, cfg.optim.weight_decay, cfg.linprobe.momentum)
    schedule = build_schedule(optimizer, d, cfg.optim)
    budget = head_budget(d, cfg.optim.min_lr, cfg.linprobe.momentum)
    if budget < 1.0 and acc.is_main_process:
        print(short_schedule_warning(budget, d), file=sys.stderr, flush=True)
    derived = {**d.as_dict(), "task": "linprobe", "num_classes": n_cls, "pool": pool, "random_init": random_init,
               "head_budget": budget}
    run = Run(acc, cfg, sources=(source,))  # refusals and lock before anything is written (or features computed)
    try:
        config_text = run.start({**to_dict(cfg), "derived": derived})
        lr_text = describe_lr(cfg.optim, d.effective_batch, d.lr)
        acc.print(f"linear probe of {'randomly initialised ' if random_init else ''}{spec.describe()} ({pool} "
                  f"features, dim {encoder.embed_dim}): {lr_text}; {d.steps_per_epoch} steps/epoch, stop at "
                  f"{d.stop_step}")
        t = cfg.train
        plan = Plan.of(t, d.stop_step, 0.0, "linprobe")
        task = ProbeTask(cfg, acc, run, encoder, head, optimizer, schedule, pool, val_urls)
        if cfg.linprobe.cache_features:
            out = _train_cached(task, plan, cfg, d, train_urls, config_text)
        else:
            out = _train_streamed(task, plan, cfg, d, train_urls, config_text)
        if out["preempted"]:
            return {"task": "linprobe", "preempted": True, "step": out["step"]}
        return run.finish({"task": "linprobe", "source": str(source), "encoder": spec.name,
                           "random_init": random_init, "pool": pool, "num_classes": n_cls, "step": out["step"],
                           **task.metrics})
    finally:
        run.close()


class ProbeTask(Task):
    """Cross-entropy of the head on frozen features: cached ((features, labels) batches) or computed from the
    images of each batch under no_grad (streamed); scored once, after the last step."""
    has_evaluation = True

    def __init__(self, cfg: EvalConfig, acc, run, encoder, head, optimizer, schedule, pool: str, val_urls):
        self.cfg, self.acc, self.run, self.encoder, self.model = cfg, acc, run, encoder, head
        self.optimizer, self.schedule, self.pool, self.val_urls = optimizer, schedule, pool, val_urls
        self.val = None  # cached: (features, labels) of the validation set
        self.metrics: dict = {}

    def loss(self, batch) -> dict:
        if isinstance(batch, dict):  # images: features recomputed every step (MAE's protocol)
            with torch.no_grad():
                features = pooled(self.encoder, batch["images"], self.pool).float()
            labels = batch["label"]
        else:
            features, labels = batch
        return {"loss": nn.functional.cross_entropy(self.model(features), labels)}

    def evaluate(self, step: int, epochs: int) -> dict:
        head = self.model
        head.eval()
        if self.val is not None:
            with torch.no_grad():
                scores = head(self.val[0])
            metrics = score(scores, self.val[1], scores.shape[1])
        else:
            metrics = evaluate(lambda x: head(pooled(self.encoder, x, self.pool).float()),
                               eval_pass(self.cfg, self.val_urls, self.acc), self.acc)
        self.run.log.scalars(step, {f"val/{k}": v for k, v in metrics.items() if k in ("top1", "top5")
                                    and v is not None})
        self.metrics = metrics
        return metrics


def _train_cached(task: ProbeTask, plan: Plan, cfg, d, train_urls, config_text: str) -> dict:
    """Features once (evaluation transform), then the head on shuffled feature batches; every process trains the
    same head on the same gathered features (the head is tiny), so DDP's gradient average changes nothing; the head
    is prepared like every model so that checkpoints hold it the same way. A resumed run computes the features again
    (the same ones)."""
    acc, encoder = task.acc, task.encoder
    t0 = time.perf_counter()
    progress = cfg.train.progress
    f_train, y_train = extract(encoder, eval_pass(cfg, train_urls, acc), task.pool, acc, "features (train)", progress)
    task.val = extract(encoder, eval_pass(cfg, task.val_urls, acc), task.pool, acc, "features (val)", progress)
    acc.print(f"features: {len(f_train)} train, {len(task.val[0])} val in {time.perf_counter() - t0:.1f}s")
    task.source = TensorSource(f_train, y_train, d.effective_batch, d.steps_per_epoch, cfg.seed)
    task.model, task.optimizer = acc.prepare(task.model, task.optimizer)
    # Each process trains the same head on the same batches (images/s counts one process's share); a feature batch
    # is already the whole effective batch.
    plan.grad_accum, plan.batch_size = 1, max(1, d.effective_batch // acc.num_processes)
    threads, accum = torch.get_num_threads(), acc.gradient_accumulation_steps
    if acc.device.type == "cpu":  # the head's ops are tiny: thread sync costs more than it saves (10x on busy hosts)
        torch.set_num_threads(1)
    acc.gradient_accumulation_steps = 1
    try:
        return fit(task, plan, acc, task.run, config_text)
    finally:
        torch.set_num_threads(threads)
        acc.gradient_accumulation_steps = accum


def _train_streamed(task: ProbeTask, plan: Plan, cfg, d, train_urls, config_text: str) -> dict:
    """MAE's protocol: crop + flip, features recomputed every step under no_grad, head trained (DDP across
    processes)."""
    acc = task.acc
    transform = pretrain_transform(cfg.data.img_size, cfg.data.crop_scale, cfg.data.hflip, cfg.data.mean,
                                   cfg.data.std)
    stream = ShardStream(train_urls, transform, cfg.train.batch_size, seed=cfg.seed, rank=acc.process_index,
                         world_size=acc.num_processes, num_streams=max(1, cfg.data.num_workers),
                         num_batches=d.micro_batches_per_epoch, shuffle_buffer=cfg.data.shuffle_buffer)
    task.source = ShardSource(stream, cfg.data.num_workers, acc.device.type == "cuda")
    task.model, task.optimizer = acc.prepare(task.model, task.optimizer)
    return fit(task, plan, acc, task.run, config_text)
