"""Pretraining as a task of the one loop (`engine.fit`): the method built from the config, its shard stream, its
k-NN monitor and reconstruction grids. Lock, checkpoints, exact resume and preemption are the loop's.

The engine never names a model or a method: it builds them through `build_encoder`/`build_method` from the config
and talks to the method through `forward(images, mask) -> {"loss", ...}` (and `visualize` for image logs).
"""
from __future__ import annotations

from pathlib import Path

import torch

from mimtrain.checkpoint.state import CheckpointError
from mimtrain.config.pretrain import Config, derive, describe_lr, to_dict
from mimtrain.data.stream import ShardStream, count_samples, expand_shards
from mimtrain.data.transforms import pretrain_transform
from mimtrain.engine.distributed import configure_deepspeed, make_accelerator, module_dtype, unwrap
from mimtrain.engine.fastpath import apply_fast_path
from mimtrain.engine.fit import Plan, Task, fit
from mimtrain.engine.monitor import KnnMonitor
from mimtrain.engine.optim import build_optimizer, build_schedule
from mimtrain.engine.rundir import Run
from mimtrain.engine.sources import ShardSource
from mimtrain.methods import build_pretraining


def pretrain(cfg: Config) -> dict:
    """Run (or resume) a pretraining job. Returns a summary dict (first/last logged loss, run paths, whether a
    signal stopped it early after writing a checkpoint)."""
    accelerator = make_accelerator(cfg.train.grad_accum, cfg.train.precision, cfg.train.dist_timeout_s,
                                   seed=cfg.seed)
    # Everything that can be refused is checked before any data is read or any step runs.
    urls = expand_shards(cfg.data.train_shards)
    method, masking = build_pretraining(cfg)
    method = apply_fast_path(method, cfg.train, masking)  # compile, channels-last, SDPA, static visible count
    d = derive(cfg, accelerator.num_processes, cfg.data.samples_per_epoch or count_samples(urls))
    knn = KnnMonitor(cfg, accelerator)
    # Last of the checks, first of the writes: refusals, lock, the checkpoint to resume from.
    run = Run(accelerator, cfg)
    try:
        optim_cfg = configure_deepspeed(accelerator, cfg).optim
        optimizer = build_optimizer(method, optim_cfg, d.lr, accelerator.device.type)
        method, optimizer = accelerator.prepare(method, optimizer)
        # On the prepared optimizer: DeepSpeed may swap in its own (CPU-offload Adam); the lr must reach the one
        # that steps.
        schedule = build_schedule(optimizer, d, cfg.optim)
        resolved = {**to_dict(cfg), "derived": d.as_dict()}
        config_text = run.start(resolved, log_with=cfg.train.log_with, hparams=True)  # config as hyper-parameters
        accelerator.print(f"{describe_lr(cfg.optim, d.effective_batch, d.lr)}; {d.steps_per_epoch} steps/epoch, "
                          f"warm-up {d.warmup_steps}, stop at {d.stop_step}")
        trace = _trace_file(cfg, accelerator)
        stream = ShardStream(urls, pretrain_transform(cfg.data.img_size, cfg.data.crop_scale, cfg.data.hflip,
                                                      cfg.data.mean, cfg.data.std),
                             cfg.train.batch_size, seed=cfg.seed, rank=accelerator.process_index,
                             world_size=accelerator.num_processes, num_streams=max(1, cfg.data.num_workers),
                             masking=masking, num_batches=d.micro_batches_per_epoch,
                             shuffle_buffer=cfg.data.shuffle_buffer)
        source = ShardSource(stream, cfg.data.num_workers, accelerator.device.type == "cuda",
                             on_batch=(lambda b: trace.write("\n".join(b["key"]) + "\n")) if trace else None)
        task = PretrainTask(cfg, accelerator, method, optimizer, schedule, source, knn, run)
        t = cfg.train
        plan = Plan.of(t, d.stop_step, cfg.optim.clip_grad, "pretrain", dist_timeout_s=t.dist_timeout_s)
        try:
            out = fit(task, plan, accelerator, run, config_text)
        finally:
            if trace:
                trace.close()
    finally:
        run.close()
    return {"output_dir": cfg.output_dir, "step": out["step"], "losses": out["losses"], "preempted": out["preempted"],
            "tensorboard": f"{cfg.output_dir}/tensorboard", "skipped": out["skipped"]}


class PretrainTask(Task):
    """A method's loss on masked images from the shard stream; reconstruction grids and k-NN as monitors."""

    def __init__(self, cfg: Config, acc, method, optimizer, schedule, source: ShardSource, knn: KnnMonitor, run: Run):
        self.cfg, self.acc, self.model, self.optimizer, self.schedule = cfg, acc, method, optimizer, schedule
        self.source, self.knn, self.run = source, knn, run
        self.encoder = unwrap(acc, method).encoder
        self.in_dtype = module_dtype(acc)  # None: images stay fp32
        self.last = None  # (images, method outputs) of the last micro-batch, for the image log

    def to_device(self, batch: dict, device: torch.device) -> dict:
        return {**batch, "images": batch["images"].to(device, dtype=self.in_dtype, non_blocking=True),
                "mask": batch["mask"].to(device, non_blocking=True)}

    def loss(self, batch: dict) -> dict:
        out = self.model(batch["images"], batch["mask"])
        self.last = (batch["images"], out)
        return {"loss": out["loss"]}

    def log_extras(self, state) -> dict:
        skipped = self.acc.reduce(torch.tensor(state.total_skipped, device=self.acc.device), "sum")
        return {"data/skipped": int(skipped.item())}

    def monitor(self, step: int, log) -> None:
        t = self.cfg.train
        if t.image_every and (step % t.image_every == 0 or step == 1) and self.acc.is_main_process:
            images, out = self.last
            views = unwrap(self.acc, self.model).visualize(images[:8], {k: v[:8] for k, v in out.items()
                                                                         if v.dim() > 0})
            log.reconstruction(step, views, self.cfg.data.mean, self.cfg.data.std)
        self.knn(step, self.model, self.acc, log)

    def check_resume(self, saved: dict) -> None:
        cfg = self.cfg
        method = (saved.get("method") or {}).get("name")
        if saved["encoder"]["name"] != cfg.encoder.name or method != cfg.method.name:
            raise CheckpointError(f"{self.run.resume_from} holds a {method} {saved['encoder']['name']} run; this run "
                                  f"is {cfg.method.name} {cfg.encoder.name}: use another output_dir or resume=''")


def _trace_file(cfg, accelerator):
    """`train.trace_keys`: the sample keys this process trains on, one per line (audits of the data split)."""
    if not cfg.train.trace_keys:
        return None
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    return open(f"{cfg.output_dir}/keys_rank{accelerator.process_index}.txt", "a")
