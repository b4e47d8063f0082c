import math

import pytest
import torch

from mimtrain.config.pretrain import load_config, derive
from mimtrain.engine.optim import build_optimizer, build_schedule
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
