"""The one supervised training loop: fine-tuning, linear probing, detection and segmentation all run `fit`.

A task supplies a model, an optimizer, a timm scheduler, (epoch, batch) pairs and a loss function; `fit` does the
rest the same way for all of them: gradient accumulation, autocast, clipping, the encoder's per-step hook, logging
(one host sync per logged step), the non-finite-loss stop, and evaluation every N steps or epochs and at the end.
Pretraining keeps its own loop (`engine.trainer`): it also checkpoints, resumes mid-epoch and handles preemption.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import Tensor, nn
from tqdm.auto import tqdm

from mimtrain.engine.logging import RunLogger


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops (the CLI exits 3) instead of training on garbage."""


def forever(epoch_batches: Callable[[int], Iterable]) -> Iterator[tuple[int, object]]:
    """(epoch, batch) pairs without end: `epoch_batches(e)` gives epoch e's batches (it reshuffles for e)."""
    epoch = 0
    while True:
        for batch in epoch_batches(epoch):
            yield epoch, batch
        epoch += 1


@dataclass
class FitPlan:
    """How long and how loudly to train. `batch_size` is per process per micro-batch (for images/s);
    evaluation runs every `eval_every_steps` steps, every `eval_every_epochs` epochs, and always after the last step."""
    stop_step: int
    grad_accum: int = 1
    clip_grad: float = 0.0
    log_every: int = 10
    batch_size: int = 1
    eval_every_steps: int = 0
    eval_every_epochs: int = 0
    progress: bool = True
    desc: str = "train"


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, schedule, batches: Iterator[tuple[int, object]],
        loss_fn: Callable[[nn.Module, object], dict[str, Tensor]], acc: Accelerator, plan: FitPlan, log: RunLogger,
        evaluate: Callable[[int, int], dict] | None = None, before_step: Callable[[int, float], None] | None = None,
        after_step: Callable[[int], None] | None = None) -> tuple[int, int, dict]:
    """Optimizer steps 1..plan.stop_step; returns (steps taken, epochs completed, the last evaluation's metrics).

    batches: (epoch, batch) on the CPU, moved to the device here. loss_fn(model, batch) -> named losses, summed for the
    backward pass (one entry is fine). schedule: a timm scheduler; `step_update(step)` sets the lr before each
    optimizer step (step = optimizer steps already taken). before_step(step, lr): the encoder's hook (DGT's centroid
    rate follows the lr); after_step(step): e.g. an EMA update. evaluate(step, epoch) -> metrics, where epoch is the
    number of epochs completed at an epoch boundary and at the end, and the running epoch's index (from 0) otherwise.
    """
    step, n_micro, epoch, metrics, t0 = 0, 0, None, {}, time.perf_counter()
    sums: dict[str, Tensor] = {}
    bar = tqdm(total=plan.stop_step, disable=not (acc.is_main_process and plan.progress), desc=plan.desc,
               dynamic_ncols=True)
    model.train()
    while step < plan.stop_step:
        batch_epoch, batch = next(batches)
        if epoch is not None and batch_epoch != epoch and evaluate is not None and plan.eval_every_epochs \
                and batch_epoch % plan.eval_every_epochs == 0:  # epoch `epoch` has ended
            metrics = evaluate(step, batch_epoch)
            model.train()
        epoch = batch_epoch
        if n_micro % plan.grad_accum == 0:  # the first micro-batch of an optimizer step
            schedule.step_update(step)
            if before_step is not None:
                before_step(step, max(g["lr"] for g in optimizer.param_groups))
        with acc.accumulate(model):
            with acc.autocast():
                losses = loss_fn(model, send_to_device(batch, acc.device))
            acc.backward(sum(losses.values()))
            if acc.sync_gradients and plan.clip_grad > 0:
                acc.clip_grad_norm_(model.parameters(), plan.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        n_micro += 1
        if not acc.sync_gradients:
            continue
        step += 1
        bar.update(1)
        if after_step is not None:
            after_step(step)
        if step % plan.log_every == 0 or step == plan.stop_step:
            values = _log_step(step, epoch, sums, n_micro, t0, optimizer, acc, plan, log)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
            sums, n_micro, t0 = {}, 0, time.perf_counter()
        if evaluate is not None and step < plan.stop_step and plan.eval_every_steps \
                and step % plan.eval_every_steps == 0:
            metrics = evaluate(step, epoch)
            model.train()
    bar.close()
    epochs_done = epoch + 1 if epoch is not None else 0
    if evaluate is not None:
        metrics = evaluate(step, epochs_done)
    return step, epochs_done, metrics


def _log_step(step: int, epoch: int, sums: dict[str, Tensor], n_micro: int, t0: float, optimizer, acc: Accelerator,
              plan: FitPlan, log: RunLogger) -> dict:
    """Mean losses since the last log (averaged over processes: the one host sync), lr and images/s."""
    keys = sorted(sums)
    means = acc.reduce(torch.stack([sums[k] for k in keys]) / n_micro, "mean").tolist()
    values = dict(zip(keys, means))
    values["loss"] = sum(means) if "loss" not in values or len(keys) > 1 else values["loss"]
    if not math.isfinite(values["loss"]):
        raise NonFiniteLoss(f"{plan.desc}: loss is {values['loss']} at step {step} ({values}); lower the lr, "
                            "lengthen the warm-up or clip gradients")
    values["lr"] = max(g["lr"] for g in optimizer.param_groups)
    images = n_micro * plan.batch_size * acc.num_processes
    log.scalars(step, {"epoch": epoch, **values, "images_per_sec": images / (time.perf_counter() - t0)})
    return values
