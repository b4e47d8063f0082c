import math

import pytest
import torch

from mimtrain.config.pretrain import load_config, derive
from mimtrain.engine.optim import build_optimizer, build_schedule, poly_schedule, step_schedule
from mimtrain.encoders import build_encoder
from mimtrain.methods.mae import MAE


def test_linear_warmup_then_cosine_per_step():
    cfg = load_config(None, ["train.epochs=10", "optim.warmup_epochs=2", "optim.min_lr=1e-6", "optim.blr=1e-3",
                             "train.batch_size=256"])
    d = derive(cfg, 1, 256 * 5)  # 5 steps per epoch: 10 warm-up steps, 50 in all
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=d.lr)
    sched = build_schedule(opt, d, cfg.optim)
    lrs = []
    for step in range(d.total_steps + 1):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert d.lr == pytest.approx(1e-3) and lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5e-3) and lrs[10] == pytest.approx(1e-3)
    t = (30 - 10) / 40  # half-way down the cosine
    assert lrs[30] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * t)))
    assert lrs[50] == pytest.approx(1e-6)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_no_weight_decay_on_norms_biases_and_tokens():
    enc = build_encoder("mim_vit_tiny_patch16", 32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    mae = MAE(enc, 32, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    cfg = load_config(None, [])
    opt = build_optimizer(mae, cfg.optim, lr=1e-3)
    names = {id(p): n for n, p in mae.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "mask_token" not in decayed and "encoder.vit.cls_token" not in decayed
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)
    assert "encoder.vit.blocks.0.attn.qkv.weight" in decayed
    assert opt.defaults["betas"] == (0.9, 0.95)


# Dense transfer: MMCV's rules (mmcv/runner/hooks/lr_updater.py), written out here as the reference. The linear
# warm-up scales the regular lr of the step: regular x (1 - (1 - step / warmup) x (1 - ratio)), per param group.

def _two_groups(lr: float) -> torch.optim.AdamW:
    """Two param groups at scale 1 and 0.25 of `lr` (as layer decay gives them)."""
    return torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 1.0},
                              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.25}], lr=lr)


def _mmcv_warmup(step: int, warmup: int, ratio: float) -> float:
    return 1.0 if step >= warmup else 1 - (1 - step / warmup) * (1 - ratio)


def test_step_schedule_is_mmdetections_warmup_then_x01_at_each_milestone_per_group():
    lr, warmup, ratio, milestones = 2e-4, 10, 0.001, [30, 40]
    opt = _two_groups(lr)
    sched = step_schedule(opt, warmup, ratio, milestones)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-7, 0.5e-7])  # set at construction: step 0
    for step in (0, 1, 5, 9, 10, 29, 30, 31, 39, 40, 55):
        sched.step_update(step)
        regular = lr * 0.1 ** sum(step >= m for m in milestones)  # StepLrUpdaterHook by iteration
        want = [regular * _mmcv_warmup(step, warmup, ratio) * s for s in (1.0, 0.25)]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(want, rel=1e-12), step
    sched.step_update(29)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)  # the last step before the first milestone
    sched.step_update(30)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5e-5)


def test_poly_schedule_matches_mmsegmentation_after_the_warmup_and_within_its_bound_during_it():
    lr, warmup, ratio, total, power = 6e-5, 15, 1e-6, 100, 0.9
    opt = _two_groups(lr)
    sched = poly_schedule(opt, warmup, ratio, total, power)
    gap = 1 - (1 - warmup / total) ** power  # the largest (lr - MMSeg's) / lr, as poly_schedule documents
    for step in (0, 1, 7, 14, 15, 16, 50, 99, 100, 130):
        sched.step_update(step)
        poly = (1 - min(step, total) / total) ** power  # PolyLrUpdaterHook, min_lr 0
        mmseg = [lr * poly * _mmcv_warmup(step, warmup, ratio) * s for s in (1.0, 0.25)]
        got = [g["lr"] for g in opt.param_groups]
        if step >= warmup:
            assert got == pytest.approx(mmseg, rel=1e-12, abs=1e-20), step
        else:  # timm ramps linearly towards lr itself: a little above MMSeg's, by at most `gap`
            assert got == pytest.approx([lr * _mmcv_warmup(step, warmup, ratio) * s for s in (1.0, 0.25)]), step
            assert all(-1e-9 <= 1 - m / g <= gap for g, m in zip(got, mmseg)), step
    assert got == [0.0, 0.0]
    sched.step_update(0)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.25 * 6e-11)  # warmup_ratio x the group's own lr
    sched.step_update(50)
    assert opt.param_groups[0]["lr"] == pytest.approx(6e-5 * 0.5 ** 0.9)


def test_dense_schedules_refuse_groups_with_different_base_lrs():
    """timm's warm-up starts every group at one absolute lr: per-group lrs would all start at the same value."""
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3},
                             {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-4}])
    with pytest.raises(ValueError, match="lr_scale"):
        step_schedule(opt, 10, 0.001, [30])
    with pytest.raises(ValueError, match="lr_scale"):
        poly_schedule(opt, 10, 0.001, 100, 1.0)
