"""Parameter and multiply-add counts of registered encoders, as papers report them.

Papers' "FLOPs" are multiply-adds (MACs) for one image: `torch.utils.flop_counter` counts 2 per multiply-add for
matmuls and convolutions, so MACs = counted flops / 2. Elementwise ops (norms, activations, softmax) are not
counted, as in the papers' tools (fvcore, mmcv).
"""
from __future__ import annotations

from typing import Callable

import timm
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _conv_backward(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                   _output_padding, _groups, output_mask, out_shape=None) -> int:
    """Each of grad_input and grad_weight costs what the forward conv costs. torch's own formula drops `groups` from
    the grad_weight term, which counts a depth-wise conv's weight gradient C times over (GLNet, GPViT, DGT)."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


# torch registers formulas for the CUDA attention kernels only; without these, fused attention on CPU counts as 0.
CPU_ATTENTION_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}
FLOP_FORMULAS = {**CPU_ATTENTION_FORMULAS, _aten.convolution_backward: _conv_backward}


def count_macs(fn: Callable[[], object]) -> int:
    """Multiply-adds of everything `fn()` runs (forward, and backward if it calls one)."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops() // 2


def model_macs(model: nn.Module, x: Tensor) -> int:
    """Multiply-adds of one eval-mode, no-grad `model(x)`."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs = count_macs(lambda: model(x))
    model.train(was_training)
    return macs


def count_params_and_macs(name: str, img_size: int | tuple[int, int] = 224, device: str = "auto",
                          **kwargs) -> tuple[int, int]:
    """Build registered model `name` with a 1000-class head; return (parameters, MACs for one image).

    Args:
        name: registered timm name.
        img_size: input size, int or (H, W).
        device: "meta" builds and runs on shapes only (no weights allocated: seconds even for large models),
            "cpu" runs for real, "auto" tries meta and falls back to cpu for models that need real values
            (e.g. a host sync in the forward). Both give the same counts.
        **kwargs: passed to `timm.create_model` (e.g. `mask_mode`); `num_classes` defaults to 1000.
    """
    import mimtrain.encoders  # noqa: F401  (registers our models with timm)

    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    kwargs = {"num_classes": 1000, **kwargs}
    if device == "auto":
        try:
            return count_params_and_macs(name, (h, w), "meta", **kwargs)
        except (NotImplementedError, RuntimeError):
            device = "cpu"
    with torch.device(device):
        model = timm.create_model(name, pretrained=False, img_size=(h, w), **kwargs)
        x = torch.randn(1, 3, h, w)
    params = sum(p.numel() for p in model.parameters())
    return params, model_macs(model, x)
