"""engine.fit, the one supervised loop: against a loop written out in the test, and its evaluation / stop rules."""
from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from timm.scheduler import CosineLRScheduler
from torch import nn

from mimtrain.engine.fit import FitPlan, NonFiniteLoss, fit, forever
from mimtrain.engine.logging import RunLogger


def _data(n_batches: int, batch: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, generator=g), torch.randn(batch, 1, generator=g)) for _ in range(n_batches)]


def _mse(model: nn.Module, batch) -> dict:
    x, y = batch
    return {"loss": nn.functional.mse_loss(model(x), y)}


def _setup(lr: float = 0.1):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = CosineLRScheduler(opt, t_initial=100, warmup_t=2, warmup_lr_init=0.0, warmup_prefix=True,
                              t_in_epochs=False)
    return model, opt, sched


@pytest.mark.parametrize("accum", [1, 2])
def test_fit_matches_a_loop_written_out(tmp_path, accum):
    """Same weights as: for each optimizer step, set the scheduled lr, average the micro-batch gradients, step."""
    data = _data(8)
    model, opt, sched = _setup()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    model, opt = acc.prepare(model, opt)  # the prepared optimizer skips the steps inside an accumulation window
    log = RunLogger(tmp_path, enabled=True)
    steps = 8 // accum
    plan = FitPlan(stop_step=steps, grad_accum=accum, log_every=1, batch_size=4, progress=False)
    taken, epochs, _ = fit(model, opt, sched, forever(lambda e: data), _mse, acc, plan, log)
    log.close()
    assert taken == steps and epochs == 1

    ref, ref_opt, ref_sched = _setup()
    for s in range(steps):
        ref_sched.step_update(s)
        ref_opt.zero_grad()
        for x, y in data[s * accum:(s + 1) * accum]:
            (nn.functional.mse_loss(ref(x), y) / accum).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == steps  # log_every=1


def test_fit_evaluates_at_epoch_ends_and_once_at_the_end(tmp_path):
    data = _data(3)  # 3 steps per epoch
    model, opt, sched = _setup()
    calls = []

    def evaluate(step: int, epochs: int) -> dict:
        calls.append((step, epochs))
        return {"step": step}

    plan = FitPlan(stop_step=8, log_every=100, eval_every_epochs=1, progress=False)
    acc = Accelerator(cpu=True)
    _, epochs, metrics = fit(model, opt, sched, forever(lambda e: data), _mse, acc, plan,
                             RunLogger(tmp_path, enabled=False), evaluate=evaluate)
    # after epochs 1 and 2 (steps 3, 6), then at the stop (step 8, in epoch 3)
    assert calls == [(3, 1), (6, 2), (8, 3)] and epochs == 3 and metrics == {"step": 8}

    calls.clear()
    plan = FitPlan(stop_step=6, log_every=100, eval_every_steps=2, progress=False)
    fit(model, opt, sched, forever(lambda e: data), _mse, acc, plan, RunLogger(tmp_path, enabled=False),
        evaluate=evaluate)
    assert calls == [(2, 0), (4, 1), (6, 2)]  # every 2 steps, the last one only once


def test_fit_stops_loudly_on_a_non_finite_loss(tmp_path):
    data = [(torch.full((4, 3), float("nan")), torch.zeros(4, 1))]
    model, opt, sched = _setup()
    plan = FitPlan(stop_step=5, log_every=1, progress=False, desc="probe")
    with pytest.raises(NonFiniteLoss, match="probe: loss is nan at step 1"):
        fit(model, opt, sched, forever(lambda e: data), _mse, Accelerator(cpu=True), plan,
            RunLogger(tmp_path, enabled=False))


def test_hooks_see_the_scheduled_lr_before_and_the_step_after(tmp_path):
    data = _data(4)
    model, opt, sched = _setup()
    seen = []
    plan = FitPlan(stop_step=4, log_every=100, progress=False)
    fit(model, opt, sched, forever(lambda e: data), _mse, Accelerator(cpu=True), plan,
        RunLogger(tmp_path, enabled=False), before_step=lambda s, lr: seen.append(("before", s, round(lr, 6))),
        after_step=lambda s: seen.append(("after", s)))
    # warm-up over 2 steps from 0 to 0.1, then cosine over 100 steps (written out: lr(s) for s = 0..3)
    lrs = [0.0, 0.05] + [0.5 * 0.1 * (1 + math.cos(math.pi * (s - 2) / 100)) for s in (2, 3)]
    assert seen == [x for s in range(4) for x in (("before", s, round(lrs[s], 6)), ("after", s + 1))]
