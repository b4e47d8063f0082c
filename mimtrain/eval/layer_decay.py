"""Layer-wise learning-rate decay (BEiT / MAE fine-tuning) mapped for every encoder family.

Layer 0 holds the embeddings (patch/conv stem, position tables, class and mask tokens), layers 1..L the blocks in
forward order (across stages for hierarchical encoders), layer L+1 the final norm and the head; layer i trains with
lr x decay^(L+1-i). A downsampling / patch-merging module joins the first block after it (it feeds that block), and
GC ViT's global query generator joins its stage's first block. An encoder may define its own `layer_ids()`.
"""
from __future__ import annotations

import math
import re
from typing import Callable

from torch import nn

# Per encoder class: (regex on the parameter name, match -> ordinal tuple), first match wins. Ordinals sort into
# forward order and equal ordinals share a layer; (0,) is the stem, names that match nothing (final norm, head) come
# last. A downsample module gets the ordinal of the first block after it, so it shares that block's layer.
_Rule = tuple[str, Callable[[re.Match, nn.Module], tuple]]
_STEM: Callable = lambda m, model: (0,)  # noqa: E731
_SEQ: Callable = lambda m, model: (1, int(m[1]))  # noqa: E731  one flat sequence of blocks
_STAGED: Callable = lambda m, model: (1, int(m[1]), int(m[2]))  # noqa: E731  stage s, block b
_STAGE_ENTRY: Callable = lambda m, model: (1, int(m[1]), 0)  # noqa: E731  joins block 0 of stage s

_RULES: dict[str, list[_Rule]] = {
    "ViTEncoder": [(r"^(?:vit\.(?:cls_token|reg_token|pos_embed|patch_embed)|mask_token)", _STEM),
                   (r"^vit\.blocks\.(\d+)\.", _SEQ)],
    "HiViT": [(r"^(?:pos_embed|patch_embed|mask_token)", _STEM),
              (r"^stage1\.(\d+)\.", lambda m, model: (1, 0, int(m[1]))),
              (r"^merge1\.", lambda m, model: (1, 1, 0)), (r"^stage2\.(\d+)\.", lambda m, model: (1, 1, int(m[1]))),
              (r"^merge2\.", lambda m, model: (1, 2, 0)), (r"^blocks\.(\d+)\.", lambda m, model: (1, 2, int(m[1])))],
    "SwinEncoder": [(r"^(?:swin\.patch_embed|swin\.absolute_pos_embed|mask_token)", _STEM),
                    (r"^swin\.layers\.(\d+)\.downsample\.", _STAGE_ENTRY),
                    (r"^swin\.layers\.(\d+)\.blocks\.(\d+)\.", _STAGED)],
    # GC ViT: the downsampler and the global query generator feed the stage's blocks; the stage's closing norm
    # joins its last block.
    "GCViTEncoder": [(r"^(?:gcvit\.stem|mask_token)", _STEM),
                     (r"^gcvit\.stages\.(\d+)\.(?:downsample|global_block)\.", _STAGE_ENTRY),
                     (r"^gcvit\.stages\.(\d+)\.blocks\.(\d+)\.", _STAGED),
                     (r"^gcvit\.stages\.(\d+)\.norm\.",
                      lambda m, model: (1, int(m[1]), len(model.gcvit.stages[int(m[1])].blocks) - 1))],
    "DGT": [(r"^(?:stem|mask_token)", _STEM), (r"^stages\.(\d+)\.downsample\.", _STAGE_ENTRY),
            (r"^stages\.(\d+)\.blocks\.(\d+)\.", _STAGED)],
    "GLNet": [(r"^(?:patch_embed|mask_token)", _STEM), (r"^stages\.(\d+)\.downsample\.", _STAGE_ENTRY),
              (r"^stages\.(\d+)\.blocks\.(\d+)\.", _STAGED)],
    "GPViT": [(r"^(?:stem|pos_embed|mask_token)", _STEM), (r"^blocks\.(\d+)\.", _SEQ)],
}


def _ordinal(model: nn.Module, name: str, rules: list[_Rule]) -> tuple:
    for pattern, key in rules:
        m = re.match(pattern, name)
        if m:
            return key(m, model)
    return (math.inf,)  # final norm, head


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name -> layer id (0 = embeddings, max = final norm and head); every parameter gets exactly one.

    An encoder may define `layer_ids()` itself (it wins over the table here), which is how new encoders plug in.
    """
    if hasattr(model, "layer_ids"):
        return model.layer_ids()
    rules = _RULES.get(type(model).__name__)
    if rules is None:
        raise ValueError(f"no layer-wise lr decay mapping for {type(model).__name__}: give the encoder a "
                         "layer_ids() method or add its rules to mimtrain/eval/layer_decay.py")
    ordinals = {n: _ordinal(model, n, rules) for n, _ in model.named_parameters()}
    rank = {o: i for i, o in enumerate(sorted(set(ordinals.values())))}
    return {n: rank[o] for n, o in ordinals.items()}


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                 no_weight_decay: set[str] = frozenset()) -> list[dict]:
    """AdamW groups with an `lr_scale` per layer (timm's schedulers multiply the lr by it) and MAE's weight-decay
    split: no decay on 1-D parameters (norms, biases) and on `no_weight_decay` names (position tables, tokens).
    Frozen parameters (requires_grad False) are left out."""
    ids = layer_ids(model)
    top = max(ids.values())
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in no_weight_decay
        layer = ids[name]
        g = groups.setdefault((layer, decay), {"params": [], "param_names": [], "layer": layer,
                                               "lr_scale": layer_decay ** (top - layer),
                                               "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
        g["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
