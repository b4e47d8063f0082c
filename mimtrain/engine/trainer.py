"""The pretraining engine: Accelerate loop, schedule, logging, checkpoints, exact resume, preemption.

The engine never names a model or a method: it builds them through `build_encoder`/`build_method` from the config
and talks to the method through `forward(images, mask) -> {"loss", ...}` (and `visualize` for image logs).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from mimtrain.config.pretrain import Config, derive, to_dict
from mimtrain.data.stream import ShardStream, count_samples, expand_shards, make_loader
from mimtrain.data.transforms import pretrain_transform
from mimtrain.methods import build_pretraining
from mimtrain.checkpoint.state import Checkpoints
from mimtrain.engine.fastpath import apply_fast_path
from mimtrain.engine.fit import NonFiniteLoss
from mimtrain.engine.distributed import configure_deepspeed, make_accelerator, module_dtype, unwrap
from mimtrain.engine.logging import RunLogger
from mimtrain.engine.monitor import KnnMonitor
from mimtrain.engine.optim import build_optimizer, build_schedule
from mimtrain.engine.preempt import Preemption, shield_workers
from mimtrain.engine.resume import TrainState, restore
from mimtrain.engine.rundir import claim


def pretrain(cfg: Config) -> dict:
    """Run (or resume) a pretraining job. Returns a summary dict (first/last logged loss, run paths, whether a
    SIGTERM/SIGUSR1 stopped it early after writing a checkpoint)."""
    accelerator = make_accelerator(cfg.train.grad_accum, cfg.train.precision, cfg.train.dist_timeout_s,
                                   seed=cfg.seed)
    # Everything that can be refused is checked before any data is read or any step runs.
    urls = expand_shards(cfg.data.train_shards)
    method, masking = build_pretraining(cfg)
    method = apply_fast_path(method, cfg.train, masking)  # compile, channels-last, SDPA, static visible count
    d = derive(cfg, accelerator.num_processes, cfg.data.samples_per_epoch or count_samples(urls))
    ckpts = Checkpoints(cfg.output_dir, cfg.train.keep_last, cfg.train.keep_every)
    knn = KnnMonitor(cfg, accelerator)
    # Last of the checks, first of the writes: lock output_dir, refuse to overwrite a run, pick the checkpoint.
    lock, resume_from = claim(accelerator, cfg.output_dir, cfg.resume, cfg.overwrite)

    optim_cfg = configure_deepspeed(accelerator, cfg).optim
    optimizer = build_optimizer(method, optim_cfg, d.lr, accelerator.device.type)
    method, optimizer = accelerator.prepare(method, optimizer)
    # On the prepared optimizer: DeepSpeed may swap in its own (CPU-offload Adam); the lr must reach the one that steps.
    schedule = build_schedule(optimizer, d, cfg.optim)
    streams = max(1, cfg.data.num_workers)
    state = TrainState(num_streams=streams, world_size=accelerator.num_processes)
    if resume_from is not None:
        state = restore(resume_from, cfg, accelerator, state)
        accelerator.print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch})")
    resolved = {**to_dict(cfg), "derived": d.as_dict()}
    config_text = yaml.safe_dump(resolved, sort_keys=False)
    log = RunLogger(cfg.output_dir, enabled=accelerator.is_main_process, log_with=cfg.train.log_with,
                    hparams=resolved)  # the resolved config as hyper-parameters
    if accelerator.is_main_process:
        (log.dir / "config.yaml").write_text(config_text)
        accelerator.print(f"lr = blr {cfg.optim.blr:g} x {d.effective_batch} / {cfg.optim.lr_base_batch} = {d.lr:.3g}"
                          f"; {d.steps_per_epoch} steps/epoch, warm-up {d.warmup_steps}, stop at {d.stop_step}")

    data = ShardStream(urls, pretrain_transform(cfg.data.img_size, cfg.data.crop_scale, cfg.data.hflip,
                                                cfg.data.mean, cfg.data.std),
                       cfg.train.batch_size, seed=cfg.seed, rank=accelerator.process_index,
                       world_size=accelerator.num_processes, num_streams=streams, masking=masking,
                       num_batches=d.micro_batches_per_epoch, shuffle_buffer=cfg.data.shuffle_buffer)
    preempt = Preemption(cfg.train.preempt_check_every, cfg.train.dist_timeout_s).install()
    try:
        summary = _loop(cfg, d, accelerator, method, optimizer, schedule, data, state, ckpts, log, config_text,
                        preempt, knn)
    finally:
        preempt.uninstall()
        if lock is not None:  # also dropped by the kernel if this process dies
            lock.release()
    log.close()
    accelerator.end_training()
    return summary


class _Meter:
    """Loss, throughput and data wait between two logged steps; the loss stays on the device until then."""

    def __init__(self, device):
        self.device = device
        self.bad_step = torch.full((), -1, device=device, dtype=torch.long)  # first non-finite step, no sync
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.n_micro = torch.zeros((), device=self.device), 0
        self.wait, self.t0 = 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.bad_step = torch.where(torch.isfinite(loss) | (self.bad_step >= 0), self.bad_step, step + 1)
        self.loss_sum, self.n_micro = self.loss_sum + loss, self.n_micro + 1

    def record(self, accelerator, state: TrainState, lr: float, images_per_micro: int) -> dict:
        """Host syncs: the mean loss and skipped counts over every process."""
        _check_finite(accelerator, self.bad_step)
        elapsed = time.perf_counter() - self.t0
        skipped = accelerator.reduce(torch.tensor(state.total_skipped, device=self.device), "sum")
        rec = {"epoch": state.epoch, "loss": accelerator.reduce(self.loss_sum / self.n_micro, "mean").item(), "lr": lr,
               "images_per_sec": self.n_micro * images_per_micro / elapsed, "data_wait_frac": self.wait / elapsed,
               "data/skipped": int(skipped.item())}
        self.reset()
        return rec


def _loop(cfg, d, accelerator, method, optimizer, schedule, data, state, ckpts, log, config_text, preempt,
          knn) -> dict:
    t, dev = cfg.train, accelerator.device
    bar = tqdm(total=d.stop_step, initial=state.step, disable=not (accelerator.is_main_process and t.progress),
               dynamic_ncols=True, desc="pretrain")
    meter, history, stop = _Meter(dev), [], False
    on_step = getattr(unwrap(accelerator, method).encoder, "on_step", None)
    in_dtype = module_dtype(accelerator)  # None: images stay fp32
    trace = _trace_file(cfg, accelerator)
    while state.step < d.stop_step and not stop:
        data.set_epoch(state.epoch, state.position())
        tw = time.perf_counter()
        for batch in shield_workers(make_loader(data, cfg.data.num_workers, pin_memory=dev.type == "cuda")):
            meter.wait += time.perf_counter() - tw
            images = batch["images"].to(dev, dtype=in_dtype, non_blocking=True)
            mask = batch["mask"].to(dev, non_blocking=True)
            if state.consumed % t.grad_accum == 0:
                schedule.step_update(state.step)  # lr for the optimizer step this micro-batch belongs to
                if on_step is not None:  # optional encoder hook, e.g. DGT's centroid EMA rate follows the lr
                    on_step(state.step, optimizer.param_groups[0]["lr"])
            with accelerator.accumulate(method):  # no all-reduce on non-final micro-batches
                out = method(images, mask)
                accelerator.backward(out["loss"])  # under DeepSpeed this also clips and steps at the boundary
                if accelerator.sync_gradients and cfg.optim.clip_grad > 0:
                    accelerator.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad)
                optimizer.step()  # a no-op on non-final micro-batches
                optimizer.zero_grad(set_to_none=True)
            meter.add(out["loss"].detach(), state.step)
            state.take(batch)
            if trace:
                trace.write("\n".join(batch["key"]) + "\n")
            if not accelerator.sync_gradients:
                tw = time.perf_counter()
                continue
            state.step += 1
            bar.update(1)
            end = state.step >= d.stop_step
            stop = preempt.should_stop(state.step) and not end  # the same answer on every process (host-only)
            if state.step % t.log_every == 0 or end or stop:  # the only host syncs of the loop
                rec = meter.record(accelerator, state, optimizer.param_groups[0]["lr"], t.batch_size * d.world_size)
                log.scalars(state.step, rec)
                history.append(rec["loss"])
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
            if t.image_every and (state.step % t.image_every == 0 or state.step == 1) and accelerator.is_main_process:
                views = unwrap(accelerator, method).visualize(images[:8], {k: v[:8] for k, v in out.items()
                                                                                if v.dim() > 0})
                log.reconstruction(state.step, views, cfg.data.mean, cfg.data.std)
            paused = time.perf_counter()  # probes and saves do not count as training time
            knn(state.step, method, accelerator, log)
            if state.step % t.ckpt_every == 0 or end or stop:
                _check_finite(accelerator, meter.bad_step)  # a bad state never becomes the latest checkpoint
                ckpts.save(accelerator, state.step, asdict(state), config_text)
            meter.t0 += time.perf_counter() - paused
            if end or stop:
                break
            tw = time.perf_counter()
        else:
            state.next_epoch()
    bar.close()
    if trace:
        trace.close()
    if stop:
        accelerator.print(f"preempted: stopped after step {state.step} with a checkpoint; continue with resume=auto")
    return {"output_dir": cfg.output_dir, "step": state.step, "losses": history, "preempted": stop,
            "tensorboard": f"{cfg.output_dir}/tensorboard", "skipped": state.total_skipped}


def _trace_file(cfg, accelerator):
    """`train.trace_keys`: the sample keys this process trains on, one per line (audits of the data split)."""
    if not cfg.train.trace_keys:
        return None
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    return open(f"{cfg.output_dir}/keys_rank{accelerator.process_index}.txt", "a")


def _check_finite(accelerator, bad_step: torch.Tensor) -> None:
    worst = int(accelerator.reduce(bad_step.clone(), "max").item())
    if worst >= 0:
        raise NonFiniteLoss(f"non-finite loss at step {worst}: stopping; the latest checkpoint is still the last "
                            "good one (lower optim.blr, set optim.clip_grad, or try train.precision=bf16)")



