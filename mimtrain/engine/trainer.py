"""The pretraining engine: Accelerate loop, schedule, logging, checkpoints, exact resume.

The engine never names a model or a method: it builds them through `build_encoder`/`build_method` from the config
and talks to the method through `forward(images, mask) -> {"loss", ...}` (and `visualize` for image logs).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..config import Config, ConfigError, derive, to_dict
from ..data.stream import ShardStream, count_samples, expand_shards, make_loader
from ..data.transforms import pretrain_transform
from ..encoders import build_encoder
from ..masking import MaskingService
from ..methods import build_method, mask_mode_for
from .checkpoint import CheckpointError, Checkpoints, checkpoint_config, read_rank_state
from .logging import RunLogger
from .optim import build_optimizer, build_schedule


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainState:
    """Where training stands; one per process, saved as JSON in every checkpoint (no pickles)."""
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    consumed: int = 0  # micro-batches consumed in this epoch (this process)
    streams: dict = field(default_factory=dict)  # stream -> [pass, raw samples read], at the last consumed batch
    skipped: dict = field(default_factory=dict)  # stream -> undecodable samples met this epoch
    skipped_before: int = 0  # skipped in earlier epochs / before the resume
    num_streams: int = 1
    world_size: int = 1

    def position(self) -> dict:
        return {"consumed": self.consumed, "streams": self.streams}

    def take(self, batch: dict) -> None:
        stream, pass_, raw = (int(v) for v in batch["pos"])
        self.streams[str(stream)] = [pass_, raw]
        self.skipped[str(stream)] = int(batch["skipped"])
        self.consumed += 1

    def next_epoch(self) -> None:
        self.skipped_before += sum(self.skipped.values())
        self.epoch, self.consumed, self.streams, self.skipped = self.epoch + 1, 0, {}, {}

    @property
    def total_skipped(self) -> int:
        return self.skipped_before + sum(self.skipped.values())


def _precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}.get(name) or _bad_precision(name)


def _bad_precision(name: str):
    raise ConfigError(f"train.precision must be auto|bf16|fp16|fp32, got '{name}'")


def _restore(ckpts: Checkpoints, ckpt, cfg: Config, accelerator, state: TrainState) -> TrainState:
    saved = checkpoint_config(ckpt)
    if saved["encoder"]["name"] != cfg.encoder.name or saved["method"]["name"] != cfg.method.name:
        raise CheckpointError(f"{ckpt} holds a {saved['method']['name']} {saved['encoder']['name']} run; this run is "
                              f"{cfg.method.name} {cfg.encoder.name}: use another output_dir or resume=''")
    accelerator.load_state(str(ckpt))
    rank_state = read_rank_state(ckpt, min(accelerator.process_index, saved["derived"]["world_size"] - 1))
    restored = TrainState(**rank_state)
    if (restored.world_size, restored.num_streams) != (state.world_size, state.num_streams):
        # Positions are per (process, worker): with another layout this epoch's data restarts from its beginning.
        accelerator.print(f"resume: {restored.world_size} processes x {restored.num_streams} workers -> "
                          f"{state.world_size} x {state.num_streams}; epoch {restored.epoch} data restarts")
        restored = TrainState(step=restored.step, epoch=restored.epoch, skipped_before=restored.total_skipped,
                              num_streams=state.num_streams, world_size=state.world_size)
    return restored


def pretrain(cfg: Config) -> dict:
    """Run (or resume) a pretraining job. Returns a summary dict (first/last logged loss, run paths)."""
    # cpu=True on a machine without CUDA lets `accelerate launch --multi_gpu` run its processes over gloo.
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, cpu=not torch.cuda.is_available(),
                              mixed_precision=_precision(cfg.train.precision))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"launched {launched} processes but the accelerator joined {accelerator.num_processes}: "
                           "each would train alone (on CPU, launch with --multi_gpu, not --cpu)")
    set_seed(cfg.seed)
    # Everything that can be refused is checked before any data is read or any step runs.
    urls = expand_shards(cfg.data.train_shards)
    encoder = build_encoder(cfg.encoder.name, cfg.data.img_size, mask_unit=cfg.encoder.mask_unit or None,
                            mask_mode=mask_mode_for(cfg.method.name), num_classes=0,
                            drop_path_rate=cfg.encoder.drop_path_rate, **cfg.encoder.kwargs)
    masking = MaskingService.for_encoder(encoder, cfg.data.img_size, cfg.mask, cfg.seed)
    method = build_method(cfg.method, encoder, cfg.data.img_size)
    d = derive(cfg, accelerator.num_processes, cfg.data.samples_per_epoch or count_samples(urls))
    ckpts = Checkpoints(cfg.output_dir, cfg.train.keep_last)
    resume_from = ckpts.resolve(cfg.resume)

    optimizer = build_optimizer(method, cfg.optim, d.lr, accelerator.device.type)
    schedule = build_schedule(optimizer, d, cfg.optim)
    method, optimizer = accelerator.prepare(method, optimizer)
    streams = max(1, cfg.data.num_workers)
    state = TrainState(num_streams=streams, world_size=accelerator.num_processes)
    if resume_from is not None:
        state = _restore(ckpts, resume_from, cfg, accelerator, state)
        accelerator.print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch})")
    config_text = yaml.safe_dump({**to_dict(cfg), "derived": d.as_dict()}, sort_keys=False)
    log = RunLogger(cfg.output_dir, enabled=accelerator.is_main_process)
    if accelerator.is_main_process:
        (log.dir / "config.yaml").write_text(config_text)
        accelerator.print(f"lr = blr {cfg.optim.blr:g} x {d.effective_batch} / {cfg.optim.lr_base_batch} = {d.lr:.3g}"
                          f"; {d.steps_per_epoch} steps/epoch, warm-up {d.warmup_steps}, stop at {d.stop_step}")

    data = ShardStream(urls, pretrain_transform(cfg.data.img_size, cfg.data.crop_scale, cfg.data.hflip,
                                                cfg.data.mean, cfg.data.std),
                       cfg.train.batch_size, seed=cfg.seed, rank=accelerator.process_index,
                       world_size=accelerator.num_processes, num_streams=streams, masking=masking,
                       num_batches=d.micro_batches_per_epoch, shuffle_buffer=cfg.data.shuffle_buffer)
    summary = _loop(cfg, d, accelerator, method, optimizer, schedule, data, state, ckpts, log, config_text)
    log.close()
    accelerator.end_training()
    return summary


def _loop(cfg, d, accelerator, method, optimizer, schedule, data, state, ckpts, log, config_text) -> dict:
    t = cfg.train
    dev = accelerator.device
    bar = tqdm(total=d.stop_step, initial=state.step, disable=not (accelerator.is_main_process and t.progress),
               dynamic_ncols=True, desc="pretrain")
    loss_sum, n_micro, wait, t0 = torch.zeros((), device=dev), 0, 0.0, time.perf_counter()
    bad_step = torch.full((), -1, device=dev, dtype=torch.long)  # first non-finite step, tracked without a sync
    history: list[float] = []
    on_step = getattr(accelerator.unwrap_model(method).encoder, "on_step", None)
    trace = None
    if t.trace_keys:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        trace = open(f"{cfg.output_dir}/keys_rank{accelerator.process_index}.txt", "a")
    while state.step < d.stop_step:
        data.set_epoch(state.epoch, state.position())
        tw = time.perf_counter()
        for batch in make_loader(data, cfg.data.num_workers, pin_memory=dev.type == "cuda"):
            wait += time.perf_counter() - tw
            images = batch["images"].to(dev, non_blocking=True)
            mask = batch["mask"].to(dev, non_blocking=True)
            if state.consumed % t.grad_accum == 0:
                schedule.step_update(state.step)  # lr for the optimizer step this micro-batch belongs to
                if on_step is not None:  # optional encoder hook, e.g. DGT's centroid EMA rate follows the lr
                    on_step(state.step, optimizer.param_groups[0]["lr"])
            with accelerator.accumulate(method):  # no all-reduce on non-final micro-batches
                out = method(images, mask)
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients and cfg.optim.clip_grad > 0:
                    accelerator.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad)
                optimizer.step()  # a no-op on non-final micro-batches
                optimizer.zero_grad(set_to_none=True)
            loss = out["loss"].detach()
            bad_step = torch.where(torch.isfinite(loss) | (bad_step >= 0), bad_step, state.step + 1)
            loss_sum, n_micro = loss_sum + loss, n_micro + 1
            state.take(batch)
            if trace:
                trace.write("\n".join(batch["key"]) + "\n")
            if not accelerator.sync_gradients:
                tw = time.perf_counter()
                continue
            state.step += 1
            bar.update(1)
            end = state.step >= d.stop_step
            if state.step % t.log_every == 0 or end:  # the only host syncs of the loop
                _check_finite(accelerator, bad_step)
                elapsed = time.perf_counter() - t0
                mean_loss = accelerator.reduce(loss_sum / n_micro, "mean").item()
                skipped = int(accelerator.reduce(torch.tensor(state.total_skipped, device=dev), "sum").item())
                rec = {"epoch": state.epoch, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                       "images_per_sec": n_micro * t.batch_size * d.world_size / elapsed,
                       "data_wait_frac": wait / elapsed, "data/skipped": skipped}
                log.scalars(state.step, rec)
                history.append(mean_loss)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{rec['lr']:.2e}")
                loss_sum, n_micro, wait, t0 = torch.zeros((), device=dev), 0, 0.0, time.perf_counter()
            if t.image_every and (state.step % t.image_every == 0 or state.step == 1) and accelerator.is_main_process:
                views = accelerator.unwrap_model(method).visualize(images[:8], {k: v[:8] for k, v in out.items()
                                                                                if v.dim() > 0})
                log.reconstruction(state.step, views, cfg.data.mean, cfg.data.std)
            if state.step % t.ckpt_every == 0 or end:
                _check_finite(accelerator, bad_step)  # a bad state never becomes the latest checkpoint
                ckpts.save(accelerator, state.step, asdict(state), config_text)
            if end:
                break
            tw = time.perf_counter()
        else:
            state.next_epoch()
    bar.close()
    if trace:
        trace.close()
    return {"output_dir": cfg.output_dir, "step": state.step, "losses": history,
            "tensorboard": f"{cfg.output_dir}/tensorboard", "skipped": state.total_skipped}


def _check_finite(accelerator, bad_step: torch.Tensor) -> None:
    worst = int(accelerator.reduce(bad_step.clone(), "max").item())
    if worst >= 0:
        raise NonFiniteLoss(f"non-finite loss at step {worst}: stopping; the latest checkpoint is still the last "
                            "good one (lower optim.blr, set optim.clip_grad, or try train.precision=bf16)")



