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
from mimtrain.config.pretrain import derive
from mimtrain.data.stream import ShardStream, count_samples, make_loader
from mimtrain.data.transforms import pretrain_transform
from mimtrain.engine.distributed import make_accelerator
from mimtrain.engine.fit import FitPlan, fit, forever
from mimtrain.engine.optim import build_schedule
from mimtrain.engine.rundir import TaskRun
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
    run = TaskRun(cfg, acc, {**d.as_dict(), "num_classes": n_cls, "pool": pool, "random_init": random_init,
                             "head_budget": budget})
    lr_text = f"lr = {d.lr:.3g} (optim.lr)" if cfg.optim.lr > 0 else \
        f"lr = blr {cfg.optim.blr:g} x {d.effective_batch} / {cfg.optim.lr_base_batch} = {d.lr:.3g}"
    acc.print(f"linear probe of {'randomly initialised ' if random_init else ''}{spec.describe()} ({pool} "
              f"features, dim {encoder.embed_dim}): {lr_text}; {d.steps_per_epoch} steps/epoch, stop at {d.stop_step}")
    train = _train_cached if cfg.linprobe.cache_features else _train_streamed
    step, metrics = train(cfg, d, acc, encoder, head, optimizer, schedule, pool, train_urls, val_urls, run)
    run.log.scalars(step, {f"val/{k}": v for k, v in metrics.items() if k in ("top1", "top5") and v is not None})
    return run.finish({"task": "linprobe", "source": str(source), "encoder": spec.name, "random_init": random_init,
                       "pool": pool, "num_classes": n_cls, "step": step, **metrics})


def _cross_entropy(head: nn.Module, batch: tuple) -> dict:
    features, labels = batch
    return {"loss": nn.functional.cross_entropy(head(features), labels)}


def _train_cached(cfg, d, acc, encoder, head, optimizer, schedule, pool, train_urls, val_urls, run) -> tuple[int, dict]:
    """Features once (evaluation transform), then the head on shuffled feature batches; every process trains the
    same head on the gathered features (the head is tiny), so no gradient exchange is needed."""
    t0 = time.perf_counter()
    progress = cfg.train.progress
    f_train, y_train = extract(encoder, eval_pass(cfg, train_urls, acc), pool, acc, "features (train)", progress)
    f_val, y_val = extract(encoder, eval_pass(cfg, val_urls, acc), pool, acc, "features (val)", progress)
    acc.print(f"features: {len(f_train)} train, {len(f_val)} val in {time.perf_counter() - t0:.1f}s")
    g = torch.Generator().manual_seed(cfg.seed)
    batch = d.effective_batch

    def epoch_batches(epoch: int):
        order = torch.randperm(len(f_train), generator=g).to(f_train.device)
        for i in range(d.steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            yield f_train[idx], y_train[idx]

    # Each process trains the same head on the same batches (images/s counts one process's share).
    plan = FitPlan(d.stop_step, log_every=cfg.train.log_every, batch_size=max(1, batch // acc.num_processes),
                   progress=progress, desc="linprobe")
    threads, accum = torch.get_num_threads(), acc.gradient_accumulation_steps
    if acc.device.type == "cpu":  # the head's ops are tiny: thread sync costs more than it saves (10x on busy hosts)
        torch.set_num_threads(1)
    acc.gradient_accumulation_steps = 1  # a feature batch is already the whole effective batch
    try:
        step, _, _ = fit(head, optimizer, schedule, forever(epoch_batches), _cross_entropy, acc, plan, run.log)
    finally:
        torch.set_num_threads(threads)
        acc.gradient_accumulation_steps = accum
    head.eval()
    with torch.no_grad():
        scores = head(f_val)
    return step, score(scores, y_val, scores.shape[1])


def _train_streamed(cfg, d, acc, encoder, head, optimizer, schedule, pool, train_urls, val_urls, run
                    ) -> tuple[int, dict]:
    """MAE's protocol: crop + flip, features recomputed every step under no_grad, head trained (DDP across
    processes)."""
    transform = pretrain_transform(cfg.data.img_size, cfg.data.crop_scale, cfg.data.hflip, cfg.data.mean,
                                   cfg.data.std)
    data = ShardStream(train_urls, transform, cfg.train.batch_size, seed=cfg.seed, rank=acc.process_index,
                       world_size=acc.num_processes, num_streams=max(1, cfg.data.num_workers),
                       num_batches=d.micro_batches_per_epoch, shuffle_buffer=cfg.data.shuffle_buffer)
    head, optimizer = acc.prepare(head, optimizer)

    def epoch_batches(epoch: int):
        data.set_epoch(epoch)
        return make_loader(data, cfg.data.num_workers, pin_memory=acc.device.type == "cuda")

    def loss(head: nn.Module, batch: dict) -> dict:
        with torch.no_grad():
            features = pooled(encoder, batch["images"], pool).float()
        return {"loss": nn.functional.cross_entropy(head(features), batch["label"])}

    plan = FitPlan(d.stop_step, grad_accum=cfg.train.grad_accum, log_every=cfg.train.log_every,
                   batch_size=cfg.train.batch_size, progress=cfg.train.progress, desc="linprobe")
    step, _, _ = fit(head, optimizer, schedule, forever(epoch_batches), loss, acc, plan, run.log)
    head.eval()
    return step, evaluate(lambda x: head(pooled(encoder, x, pool).float()), eval_pass(cfg, val_urls, acc), acc)
