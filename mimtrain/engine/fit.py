"""The one training loop: pretraining, fine-tuning, linear probes (cached and streamed), detection and segmentation
all run `fit`.

A task (`Task`) supplies what differs between them: its model and optimizer (after `accelerator.prepare`), its lr
schedule (a timm scheduler), a resumable batch source (`engine.sources`), its loss, its evaluation, an update after
each optimizer step (an EMA), monitors (image grids, a k-NN probe) and any state of its own (the best metric so far)
as JSON. `fit` does everything else the same way for all of them:

- the lr: `schedule.step_update(step)` before each optimizer step, then `encoder.on_step(step, lr)` with lr the
  largest group's (the scheduled lr itself: layer decay only scales groups down);
- gradient accumulation (`accelerator.accumulate`), autocast (`accelerator.autocast`, except under DeepSpeed, whose
  engine holds half-precision weights and gets half-precision inputs), gradient clipping;
- logging every `log_every` steps: the mean of each loss since the last log, lr, images/s and data wait, with one
  host sync (the losses and a non-finite flag stay on the device in between);
- the non-finite stop: any NaN/inf loss stops the run (`NonFiniteLoss`, the CLI exits 3) before the next checkpoint,
  so a bad state never becomes the latest;
- evaluation every `eval_every_steps` steps or `eval_every_epochs` epochs and after the last step, each before that
  step's checkpoint (a resumed run never evaluates a step twice);
- checkpoints every `ckpt_every` steps, at the end, on preemption and when the task reports a new best
  (`checkpoint.state.Checkpoints`: `checkpoints/step-N` + `latest`, verified, pruned to keep_last / keep_every,
  the best one kept beside them and named by `checkpoints/best`);
- exact resume: weights, optimizer, RNG states, registered task objects (EMA), the data position, the loss sums of
  the open logging window and the number of metrics rows written are all in the checkpoint;
- preemption (`engine.preempt`): SIGTERM, SIGUSR1, SIGINT or SIGHUP -> a checkpoint at the next step boundary and a
  normal return with `preempted` set.

The run directory itself (lock, refusals, config.yaml, logger, results.json) is `engine.rundir.Run`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import Tensor, nn
from tqdm.auto import tqdm

from mimtrain.checkpoint.state import Checkpoints
from mimtrain.engine.distributed import is_deepspeed
from mimtrain.engine.preempt import Preemption
from mimtrain.engine.resume import TrainState, restore
from mimtrain.engine.sources import BatchSource


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops (the CLI exits 3) instead of training on garbage."""


# Test hook (tests/test_task_runs.py): "STEP:NAME,..." sends signal NAME (TERM, USR1, INT, HUP, KILL) to this process
# right after step STEP is done (logged, evaluated, checkpointed); NAME "die" raises `Killed` there instead, an
# in-process kill -9 (nothing after that point runs; files stay as a killed process leaves them). Unset in real runs.
SIGNAL_ENV = "MIMTRAIN_TEST_SIGNAL_AT"


class Killed(BaseException):
    """Raised by the SIGNAL_ENV test hook ("die")."""


def _test_signals() -> dict[int, str]:
    spec = os.environ.get(SIGNAL_ENV, "")
    return {int(step): name for step, name in (item.split(":") for item in spec.split(",") if item)}


def _send(name: str, step: int) -> None:
    if name == "die":
        raise Killed(f"test hook: killed after step {step}")
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


@dataclass
class Plan:
    """How long, how loudly and how safely to train. `batch_size`: images per micro-batch of one process (for
    images/s). Evaluation runs every `eval_every_steps` steps, every `eval_every_epochs` epochs and after the last
    step; a checkpoint every `ckpt_every` steps and after the last step."""
    stop_step: int
    grad_accum: int = 1
    clip_grad: float = 0.0
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    keep_every: int = 0
    batch_size: int = 1
    eval_every_steps: int = 0
    eval_every_epochs: int = 0
    preempt_check_every: int = 1
    dist_timeout_s: int = 0
    progress: bool = True
    desc: str = "train"

    @classmethod
    def of(cls, t, stop_step: int, clip_grad: float, desc: str, **when) -> "Plan":
        """The plan of a command from its `train` section, whose run keys mean the same for every command; `when`:
        the command's evaluation points (eval_every_steps / eval_every_epochs) and dist_timeout_s."""
        return cls(stop_step, grad_accum=t.grad_accum, clip_grad=clip_grad, log_every=t.log_every,
                   ckpt_every=t.ckpt_every, keep_last=t.keep_last, keep_every=t.keep_every, batch_size=t.batch_size,
                   preempt_check_every=t.preempt_check_every, progress=t.progress, desc=desc, **when)


class Task:
    """What one command trains. Set `model`, `optimizer`, `schedule`, `source` and `encoder` (whose `on_step` the
    loop calls); override what the command needs. Objects with a state (an EMA) are registered with
    `accelerator.register_for_checkpointing` by the task, so that they travel in every checkpoint."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: object  # timm scheduler: step_update(step)
    source: BatchSource
    encoder: nn.Module

    def loss(self, batch) -> dict[str, Tensor]:
        """Named losses of one micro-batch (on the device); their sum is back-propagated."""
        raise NotImplementedError

    def to_device(self, batch, device: torch.device):
        return send_to_device(batch, device, non_blocking=True)

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (1-based), before logging and checkpointing: e.g. an EMA update."""

    def monitor(self, step: int, log) -> None:
        """After the step's log line, untimed: image grids, a k-NN probe."""

    def log_extras(self, state: TrainState) -> dict:
        """Further scalars of a logged step (may sync: it runs only on logged steps)."""
        return {}

    has_evaluation = False

    def evaluate(self, step: int, epochs: int) -> dict:
        """Metrics at `step`; epochs: epochs completed at an epoch end and at the end, the running epoch's index
        (from 0) otherwise. The loop puts the model back in train mode afterwards."""
        return {}

    def is_best(self, metrics: dict) -> bool:
        """True when `metrics` (just evaluated) beat every earlier evaluation: that step's checkpoint is kept."""
        return False

    metrics: dict = {}  # the last evaluation; `evaluate` rebinds it (never mutated in place)

    def state_dict(self) -> dict:
        """JSON-able state of the task (the last evaluation, the best metric), saved in every checkpoint."""
        return {"metrics": self.metrics}

    def load_state_dict(self, state: dict) -> None:
        self.metrics = state.get("metrics", {})

    def check_resume(self, saved_config: dict) -> None:
        """Raise CheckpointError when a checkpoint's config is another run's (another encoder, task)."""


class Meter:
    """The losses between two logged steps, summed on the device, and the first non-finite step (no sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.sums: dict[str, Tensor] = {}
        self.n_micro = 0
        self.reset_clock()

    def reset_clock(self) -> None:
        self.wait, self.t0 = 0.0, time.perf_counter()

    def add(self, losses: dict[str, Tensor], total: Tensor, step: int) -> None:
        self.bad_step = torch.where(torch.isfinite(total) | (self.bad_step >= 0), self.bad_step, step + 1)
        for k, v in losses.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n_micro += 1

    def state(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "n_micro": self.n_micro}

    def load(self, state: dict | None) -> None:
        if state:
            self.sums = {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in state["sums"].items()}
            self.n_micro = state["n_micro"]

    def check_finite(self, acc: Accelerator, desc: str) -> None:
        worst = int(acc.reduce(self.bad_step.clone(), "max").item())
        if worst >= 0:
            raise NonFiniteLoss(f"{desc}: non-finite loss at step {worst}: stopping; the latest checkpoint is still "
                                "the last good one (lower the lr, lengthen the warm-up, clip gradients, or try "
                                "train.precision=bf16)")

    def record(self, acc: Accelerator, epoch: int, lr: float, images_per_micro: int, desc: str) -> dict:
        """The host syncs of a logged step: the non-finite flag and the mean losses over every process."""
        self.check_finite(acc, desc)
        elapsed = time.perf_counter() - self.t0
        keys = sorted(self.sums)
        means = acc.reduce(torch.stack([self.sums[k] for k in keys]) / max(1, self.n_micro), "mean").tolist()
        losses = dict(zip(keys, means))
        if "loss" not in losses:
            losses["loss"] = sum(means)
        rec = {"epoch": epoch, **losses, "lr": lr, "images_per_sec": self.n_micro * images_per_micro / elapsed,
               "data_wait_frac": self.wait / elapsed}
        self.sums, self.n_micro = {}, 0
        self.reset_clock()
        return rec


def scheduled_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr the schedule set for this step: the largest group's (layer decay scales the others down)."""
    return max(g["lr"] for g in optimizer.param_groups)


def autocast_for(acc: Accelerator):
    """The loss's autocast context: accelerate's, except under DeepSpeed (half weights, half inputs)."""
    return contextlib.nullcontext if is_deepspeed(acc) else acc.autocast


def train_step(task: Task, acc: Accelerator, batch, step: int, first: bool, clip_grad: float = 0.0,
               autocast=None) -> tuple[dict[str, Tensor], Tensor]:
    """One micro-batch of the loop, on the device: at the first micro-batch of an optimizer step (`first`) the
    scheduled lr and the encoder's hook; forward under autocast, backward, clipping, and the optimizer step at the
    last micro-batch. Returns (named losses, their sum). `mimtrain bench` times exactly this."""
    if first:
        task.schedule.step_update(step)  # lr for the optimizer step this micro-batch belongs to
        task.encoder.on_step(step, scheduled_lr(task.optimizer))  # e.g. DGT's centroid EMA rate follows the lr
    with acc.accumulate(task.model):  # no all-reduce on non-final micro-batches
        with (autocast or autocast_for(acc))():
            losses = task.loss(batch)
        total = losses["loss"] if len(losses) == 1 and "loss" in losses else sum(losses.values())
        acc.backward(total)  # under DeepSpeed this also clips and steps at the boundary
        if acc.sync_gradients and clip_grad > 0:
            acc.clip_grad_norm_(task.model.parameters(), clip_grad)
        task.optimizer.step()  # a no-op on non-final micro-batches (the prepared optimizer)
        task.optimizer.zero_grad(set_to_none=True)
    return losses, total


def fit(task: Task, plan: Plan, acc: Accelerator, run, config_text: str) -> dict:
    """Optimizer steps up to `plan.stop_step`, from `run.resume_from` if set. `run`: the claimed `rundir.Run`
    (logger, checkpoint to resume from); config_text: the resolved config saved in every checkpoint.

    Returns {"step", "epochs" (completed, counting the running one at the end), "losses" (every loss logged by
    this process's run), "preempted" (a signal stopped it after a checkpoint), "skipped" (undecodable samples),
    "checkpoint" (the latest)}; the last evaluation is the task's own state."""
    state = TrainState(num_streams=task.source.num_streams, world_size=acc.num_processes)
    meter = Meter(acc.device)
    ckpts = Checkpoints(run.dir, plan.keep_last, plan.keep_every)
    if run.resume_from is not None:
        state = restore(run.resume_from, run.cfg, acc, state, task.check_resume, task.source.shard_stream)
        task.load_state_dict(state.extra.get("task", {}))
        meter.load(state.extra.get("meter"))
        acc.print(f"resumed from {run.resume_from} at step {state.step} (epoch {state.epoch})")
    preempt = Preemption(plan.preempt_check_every, plan.dist_timeout_s).install()
    try:
        return _loop(task, plan, acc, run, config_text, state, meter, ckpts, preempt)
    finally:
        preempt.uninstall()


def _loop(task: Task, plan: Plan, acc: Accelerator, run, config_text: str, state: TrainState, meter: Meter,
          ckpts: Checkpoints, preempt: Preemption) -> dict:
    bar = tqdm(total=plan.stop_step, initial=state.step, disable=not (acc.is_main_process and plan.progress),
               dynamic_ncols=True, desc=plan.desc)
    autocast = autocast_for(acc)
    losses_logged, stop, dev, hooks = [], False, acc.device, _test_signals()
    task.model.train()
    while state.step < plan.stop_step and not stop:
        tw = time.perf_counter()
        for batch in task.source.batches(state):
            meter.wait += time.perf_counter() - tw
            batch = task.to_device(batch, dev)
            losses, total = train_step(task, acc, batch, state.step, state.consumed % plan.grad_accum == 0,
                                       plan.clip_grad, autocast)
            meter.add(losses, total.detach(), state.step)
            task.source.take(state, batch)
            if not acc.sync_gradients:
                tw = time.perf_counter()
                continue
            state.step += 1
            bar.update(1)
            task.after_step(state.step)
            end = state.step >= plan.stop_step
            epoch_end = state.consumed >= task.source.batches_per_epoch
            stop = preempt.should_stop(state.step) and not end  # the same answer on every process (host-only)
            # the only host syncs of the loop; not at a preemption stop: the open window's sums go into the checkpoint
            # and the resumed run logs it where the uninterrupted run would have
            if state.step % plan.log_every == 0 or end:
                rec = meter.record(acc, state.epoch, scheduled_lr(task.optimizer),
                                   plan.batch_size * acc.num_processes, plan.desc)
                rec.update(task.log_extras(state))
                run.log.scalars(state.step, rec)
                losses_logged.append(rec["loss"])
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
            paused = time.perf_counter()  # evaluation, monitors and saves do not count as training time
            task.monitor(state.step, run.log)
            best = False
            if task.has_evaluation and not stop and (
                    end or (plan.eval_every_steps and state.step % plan.eval_every_steps == 0)
                    or (epoch_end and plan.eval_every_epochs and (state.epoch + 1) % plan.eval_every_epochs == 0)):
                metrics = task.evaluate(state.step, state.epoch + 1 if epoch_end or end else state.epoch)
                task.model.train()
                best = task.is_best(metrics)
            if state.step % plan.ckpt_every == 0 or end or stop or best:
                meter.check_finite(acc, plan.desc)  # a bad state never becomes the latest checkpoint
                state.extra = {"task": task.state_dict(), "meter": meter.state(), "logged": run.log.rows}
                ckpts.save(acc, state.step, asdict(state), config_text, best=best)
            meter.t0 += time.perf_counter() - paused
            if state.step in hooks:
                _send(hooks[state.step], state.step)
            if end or stop:
                break
            tw = time.perf_counter()
        else:
            state.next_epoch()
    bar.close()
    if stop:
        acc.print(f"preempted: stopped after step {state.step} with a checkpoint; continue with resume=auto")
    epochs = state.epoch + (1 if state.consumed else 0)
    return {"step": state.step, "epochs": epochs, "losses": losses_logged, "preempted": stop,
            "skipped": state.total_skipped, "checkpoint": str(ckpts.latest()) if ckpts.latest() else None}

