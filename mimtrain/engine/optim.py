"""AdamW with MAE's weight-decay split, and the per-step warm-up + cosine schedule (timm's)."""
from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn


def build_optimizer(model: nn.Module, cfg, lr: float, device_type: str = "cpu") -> torch.optim.Optimizer:
    """cfg: `OptimConfig`. No weight decay on 1-D parameters (norms, biases) or on the names the model lists in
    `no_weight_decay()` (position tables, class/mask tokens)."""
    skip = set(getattr(model, "no_weight_decay", set)())
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    fused = cfg.fused and device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), fused=fused or None)


def build_schedule(optimizer: torch.optim.Optimizer, derived, cfg) -> CosineLRScheduler:
    """Linear warm-up from 0 to `derived.lr` over `warmup_steps`, then cosine to `min_lr` at `total_steps`.
    Call `step_update(step)` before each optimizer step (step = optimizer steps already taken)."""
    return CosineLRScheduler(
        optimizer, t_initial=max(1, derived.total_steps - derived.warmup_steps), lr_min=cfg.min_lr,
        warmup_t=derived.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False, cycle_limit=1)
