"""engine.fit, the one training loop: against a loop written out in the test, its evaluation, checkpoint and
non-finite rules, and the lr its encoder hook sees (every command runs this loop; tests/test_task_runs.py runs them
all end to end)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from timm.scheduler import CosineLRScheduler
from torch import nn

from mimtrain.engine.fit import NonFiniteLoss, Plan, Task, fit
from mimtrain.engine.rundir import Run
from mimtrain.engine.sources import BatchSource


def _data(n_batches: int, batch: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, generator=g), torch.randn(batch, 1, generator=g)) for _ in range(n_batches)]


class ListSource(BatchSource):
    def __init__(self, data):
        self.data, self.batches_per_epoch = data, len(data)

    def batches(self, state):
        return iter(self.data[state.consumed:])


class Hook(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_step(self, step: int, lr: float) -> None:
        self.seen.append((step, round(lr, 6)))


class Regression(Task):
    def __init__(self, acc, data, lr=0.1, groups=None):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        opt = torch.optim.SGD(groups(model) if groups else model.parameters(), lr=lr)
        self.model, self.optimizer = acc.prepare(model, opt)
        self.schedule = CosineLRScheduler(self.optimizer, t_initial=100, warmup_t=2, warmup_lr_init=0.0,
                                          warmup_prefix=True, t_in_epochs=False)
        self.source, self.encoder, self.calls, self.after = ListSource(data), Hook(), [], []
        self.has_evaluation = False

    def loss(self, batch):
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x), y)}

    def after_step(self, step):
        self.after.append(step)

    def evaluate(self, step, epochs):
        self.calls.append((step, epochs))
        return {"step": step}


def _run(tmp_path, name="run"):
    acc = Accelerator(cpu=True)
    cfg = SimpleNamespace(output_dir=str(tmp_path / name), resume="", overwrite=False,
                          train=SimpleNamespace(batch_size=4, grad_accum=1))
    run = Run(acc, cfg)
    text = run.start({"encoder": {"name": "linear"}, "data": {}, "train": {"batch_size": 4},
                      "derived": {"world_size": 1}})
    return acc, run, text


@pytest.mark.parametrize("accum", [1, 2])
def test_fit_matches_a_loop_written_out(tmp_path, accum):
    """Same weights as: for each optimizer step, set the scheduled lr, average the micro-batch gradients, step."""
    data = _data(8)
    acc, run, text = _run(tmp_path)
    acc.gradient_accumulation_steps = accum
    task = Regression(acc, data)
    steps = 8 // accum
    out = fit(task, Plan(stop_step=steps, grad_accum=accum, log_every=1, batch_size=4, progress=False), acc, run,
              text)
    run.close()
    assert out["step"] == steps and out["epochs"] == 1

    torch.manual_seed(0)
    ref = nn.Linear(3, 1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_sched = CosineLRScheduler(ref_opt, t_initial=100, warmup_t=2, warmup_lr_init=0.0, warmup_prefix=True,
                                  t_in_epochs=False)
    for s in range(steps):
        ref_sched.step_update(s)
        ref_opt.zero_grad()
        for x, y in data[s * accum:(s + 1) * accum]:
            (nn.functional.mse_loss(ref(x), y) / accum).backward()
        ref_opt.step()
    for p, q in zip(task.model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == steps  # log_every=1
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step-{steps:08d}"  # the final one


def test_evaluation_at_epoch_ends_every_n_steps_and_once_at_the_end(tmp_path):
    data = _data(3)  # 3 steps per epoch
    acc, run, text = _run(tmp_path)
    task = Regression(acc, data)
    task.has_evaluation = True
    fit(task, Plan(stop_step=8, log_every=100, eval_every_epochs=1, progress=False), acc, run, text)
    run.close()
    # after epochs 1 and 2 (steps 3, 6), then at the stop (step 8, in epoch 3)
    assert task.calls == [(3, 1), (6, 2), (8, 3)]

    acc, run, text = _run(tmp_path, "steps")
    task = Regression(acc, data)
    task.has_evaluation = True
    fit(task, Plan(stop_step=6, log_every=100, eval_every_steps=2, progress=False), acc, run, text)
    run.close()
    assert task.calls == [(2, 0), (4, 1), (6, 2)]  # every 2 steps, the last one only once


def test_a_non_finite_loss_stops_before_it_reaches_a_checkpoint(tmp_path):
    data = _data(6)
    data[3] = (torch.full((4, 3), float("nan")), torch.zeros(4, 1))  # step 4's batch
    acc, run, text = _run(tmp_path)
    task = Regression(acc, data)
    with pytest.raises(NonFiniteLoss, match="probe: non-finite loss at step 4"):
        fit(task, Plan(stop_step=6, log_every=100, ckpt_every=1, progress=False, desc="probe"), acc, run, text)
    run.close()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-00000003"


def test_the_encoder_hook_sees_the_scheduled_lr_before_each_step(tmp_path):
    """One lr convention: the largest group's, i.e. the schedule's own value under layer decay's smaller scales."""
    data = _data(4)
    acc, run, text = _run(tmp_path)
    task = Regression(acc, data, groups=lambda m: [{"params": [m.weight], "lr_scale": 1.0},
                                                   {"params": [m.bias], "lr_scale": 0.5}])
    fit(task, Plan(stop_step=4, log_every=100, progress=False), acc, run, text)
    run.close()
    # warm-up over 2 steps from 0 to 0.1, then cosine over 100 steps (written out: lr(s) for s = 0..3)
    lrs = [0.0, 0.05] + [0.5 * 0.1 * (1 + math.cos(math.pi * (s - 2) / 100)) for s in (2, 3)]
    assert task.encoder.seen == [(s, round(lrs[s], 6)) for s in range(4)]
    assert task.after == [1, 2, 3, 4]
    assert task.optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * task.optimizer.param_groups[0]["lr"])
