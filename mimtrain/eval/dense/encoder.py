"""The pretrained encoder inside a dense model: rebuilt from its checkpoint for the input canvas, with the parts dense
tasks never use frozen, and the layer-decayed AdamW groups that train it beside the neck and head."""
from __future__ import annotations

from torch import nn

from mimtrain.checkpoint.encoder import EncoderSpec, load_encoder
from mimtrain.config.dense import DenseEncoderConfig
from mimtrain.encoders.base import classifier_keys
from mimtrain.engine.optim import layer_decay_groups


def build_dense_encoder(enc: DenseEncoderConfig, source: str, canvas: int,
                        grad_checkpointing: bool = False) -> tuple[nn.Module, EncoderSpec]:
    """The checkpoint's encoder built for `canvas` x `canvas` (position and relative-bias tables resized on load),
    with the parameters dense tasks never use frozen: the SimMIM mask token and the classification head.
    grad_checkpointing: `train.grad_checkpointing`, applied here for detection and segmentation alike."""
    model, spec = load_encoder(source, enc.name, enc.kwargs, canvas, num_classes=0,
                               drop_path_rate=enc.drop_path_rate, **enc.geometry)
    model.set_grad_checkpointing(grad_checkpointing)
    head = classifier_keys(model)
    for name, p in model.named_parameters():
        if name == "mask_token" or name.startswith(head):
            p.requires_grad_(False)
    return model, spec


def dense_param_groups(model: nn.Module, encoder: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups for `model` (a detector or segmentor holding `encoder`): the encoder's with layer-wise lr decay
    (`engine.optim.layer_decay_groups`: no weight decay on 1-D parameters and `no_weight_decay()` names), then the
    rest (adapter, neck, heads) at scale 1, weight decay on matrices only. Frozen parameters are left out.

    Groups carry `lr_scale`, not `lr`: build the optimizer with the peak lr and the timm schedule
    (`engine.optim.step_schedule` / `poly_schedule`) sets each group to the scheduled lr x its lr_scale."""
    groups = layer_decay_groups(encoder, weight_decay, layer_decay)
    own = {id(p) for p in encoder.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    groups.append({"params": [p for p in rest if p.ndim > 1], "weight_decay": weight_decay, "lr_scale": 1.0})
    groups.append({"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": 1.0})
    return [g for g in groups if g["params"]]
