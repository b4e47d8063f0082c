"""The GPU fast path: switches applied to a built method in one place, each on or off from `TrainConfig` so that
`mimtrain bench` can measure it (`train.compile=true`, `train.channels_last=true`, `train.sdpa=false`, ...).

Applied here, in this order:
- Static visible count (always, in drop mode): the encoder learns how many mask units every image hides, so the
  visible-token gather has a Python-constant length: no host sync per step and one static shape for the compiler.
- `train.sdpa`: every timm attention layer on `F.scaled_dot_product_attention` (flash / memory-efficient kernels on
  GPU). timm already does so for ViT and HiViT blocks and the MAE decoder, but keeps Swin's and GC ViT's window
  attention on the explicit softmax path; `false` puts every timm layer there, to measure the gain. Our own layers
  (DGT, GPViT, GLNet) always call SDPA.
- `train.channels_last`: 4-D weights and the input images in channels-last memory format, for conv-heavy encoders.
- `train.compile`: `torch.compile` of the whole method forward (encoder, gather, decoder, loss: one graph once the
  visible count is static), in place (`nn.Module.compile`: parameter names, checkpoints and exports unchanged),
  `dynamic=False` (fixed batch, image and mask sizes), `train.compile_mode` passed on.

The rest of the fast path lives where it acts: bf16 autocast (`train.precision`, through accelerate), fused AdamW
(`optim.fused`), pinned memory and non-blocking copies, masks drawn in the loader workers (`data.stream`; the gather
indices are then a sync-free sort on the device), host syncs only at log steps (`engine.trainer`).
"""
from __future__ import annotations

import torch
from torch import nn

from mimtrain.config.pretrain import ConfigError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def apply_fast_path(method: nn.Module, train_cfg, masking=None, backend: str = "inductor") -> nn.Module:
    """Apply the switches of `train_cfg` (a `TrainConfig`) to `method`, in place; returns it.

    Args:
        method: a built method (`forward(images, mask) -> {"loss", ...}`), before `accelerator.prepare`.
        masking: the run's `MaskingService`; in drop mode it fixes the hidden count per image.
        backend: torch.compile backend (tests use "aot_eager" to exercise the wrapping without code generation).
    """
    if train_cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}; got "
                          f"'{train_cfg.compile_mode}'")
    if masking is not None and masking.mode == "drop":  # every method has an encoder, every encoder hidden_units
        method.encoder.hidden_units = masking.n_hidden
    for module in method.modules():
        if hasattr(module, "fused_attn"):  # timm's attention layers read this flag in forward
            module.fused_attn = train_cfg.sdpa
    if train_cfg.channels_last:
        method.to(memory_format=torch.channels_last)
        method.register_forward_pre_hook(_images_channels_last)
    if train_cfg.compile:
        mode = None if train_cfg.compile_mode == "default" else train_cfg.compile_mode
        method.compile(backend=backend, mode=mode, dynamic=False)
    return method


def _images_channels_last(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: (images [B, 3, H, W], mask, ...) with the images in channels-last memory format."""
    images, *rest = args
    return (images.contiguous(memory_format=torch.channels_last), *rest)
