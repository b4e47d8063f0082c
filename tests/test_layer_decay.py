"""Layer-wise lr decay (`engine.optim.layer_decay_groups`, timm's `param_groups_layer_decay` over each encoder's
`group_matcher`) against a reference written here: BEiT / MAE appendix A.3, lr scale decay^(L + 1 - i) for layer i,
where layer 0 is the stem, layers 1..L the blocks in forward order and L + 1 the final norm and classifier.

The reference reads the model's structure, not its grouping: blocks are the `blocks.<i>` (HiViT: `stage1/2.<i>`)
modules in registration order, what opens a stage (downsampler, patch merging, GC ViT's global query generator) shares
the layer of the next block, a stage's closing norm that of the block before it.
"""
from __future__ import annotations

import re

import pytest
import timm
import torch
from torch import nn

import mimtrain.encoders  # noqa: F401  (registers the encoders)
from mimtrain.encoders.base import classifier_keys
from mimtrain.engine.optim import layer_decay_groups

DECAY, WD = 0.75, 0.05
BLOCK = re.compile(r"(?:^|\.)(?:blocks|stage1|stage2)\.\d+$")
ENTRY = re.compile(r"(?:^|\.)(?:downsample|merge\d|global_block)$")  # feeds the next block
CLOSING = re.compile(r"(?:^|\.)stages\.\d+\.norm$")  # closes the stage its last block belongs to


def _registered() -> list[str]:
    return sorted(n for n in timm.list_models() if n.startswith(("mim_", "hivit", "simmim_", "gpvit", "dgt", "glnet")))


def _scales(model: nn.Module, decay: float = DECAY) -> dict[str, tuple[float, float]]:
    """Parameter name -> (lr_scale, weight_decay) of its group; each trainable parameter in exactly one group."""
    names = {id(p): n for n, p in model.named_parameters()}
    got = [(names[id(p)], (g["lr_scale"], g["weight_decay"])) for g in layer_decay_groups(model, WD, decay)
           for p in g["params"]]
    assert len(got) == len(dict(got)), "a parameter sits in two groups"
    return dict(got)


def _block_layers(model: nn.Module) -> tuple[dict[str, int], int]:
    """Module name -> layer (1..L) for blocks, stage entries and stage norms, from registration order; and L."""
    order, blocks = [], []
    for name, module in model.named_modules():
        if BLOCK.search(name) and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)
            order.append(name)
        elif (ENTRY.search(name) or CLOSING.search(name)) and any(True for _ in module.parameters()):
            order.append(name)
    layer, layers = 0, {}
    for name in order:
        if name in blocks:
            layer += 1
            layers[name] = layer
        else:  # an entry takes the next block's layer, a closing norm the previous block's
            layers[name] = layer + 1 if ENTRY.search(name) else layer
    return layers, len(blocks)


def _reference(model: nn.Module) -> tuple[dict[str, int], int]:
    """Parameter name -> layer: inside a block (or what joins one) its layer; the mask token and everything
    registered before the first block 0 (embeddings); everything after the last block L + 1 (final norm, head)."""
    layers, L = _block_layers(model)
    out, after_blocks = {}, False
    for n, _ in model.named_parameters():
        owner = next((m for m in layers if n.startswith(m + ".")), None)
        if owner is not None:
            out[n], after_blocks = layers[owner], True
        else:
            out[n] = 0 if n == "mask_token" or not after_blocks else L + 1
    return out, L


# Every registered size, plus fill mode where drop mode is the default (the mask token is an embedding: layer 0).
CASES = [(n, {}) for n in _registered()] + [(n, {"mask_mode": "fill"}) for n in ("mim_vit_tiny_patch16", "hivit_tiny")]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[n + "-" + "-".join(k.values()) for n, k in CASES])
def test_layer_decay_follows_the_appendix_formula(name, kwargs):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=10, **kwargs)
    got = _scales(model)
    layer, L = _reference(model)
    assert L >= 2 and set(layer.values()) == set(range(L + 2))
    no_wd = set(model.no_weight_decay())
    want = {n: (pytest.approx(DECAY ** (L + 1 - layer[n])), 0.0 if p.ndim <= 1 or n in no_wd else WD)
            for n, p in model.named_parameters() if p.requires_grad}
    assert got == want
    head = [n for n in got if n.startswith(classifier_keys(model))]
    assert head and all(got[n][0] == 1.0 for n in head), "the classifier trains at the full lr"
    assert got[model.pretrained_cfg["first_conv"] + ".weight"][0] == pytest.approx(DECAY ** (L + 1))


class ToyEncoder(nn.Module):
    """A backbone the project has never seen: two stages of (downsample, blocks), a final norm and a head; it only
    says how its parameters group (timm's format)."""

    def __init__(self, depths=(2, 3), dim=8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, dim, 2, 2))
        self.stages = nn.ModuleList(
            nn.ModuleDict(dict(downsample=nn.Conv2d(dim, dim, 1),
                               blocks=nn.ModuleList(nn.Linear(dim, dim) for _ in range(d))))
            for d in depths)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^(?:stem|pos)", blocks=[(r"^stages\.(\d+)\.downsample\.", (0,)),
                                                   (r"^stages\.(\d+)\.blocks\.(\d+)\.", None)])

    def no_weight_decay(self) -> set[str]:
        return {"pos"}


def test_a_new_backbone_needs_only_a_group_matcher():
    model = ToyEncoder()
    model.stem.requires_grad_(False)  # frozen: left out, but the layers keep their numbers
    got = _scales(model, decay=0.5)
    L = 5  # blocks 1..5: stage 0 blocks 0, 1; stage 1 blocks 0, 1, 2
    layer = {"pos": 0, "stages.0.downsample.weight": 1, "stages.0.blocks.0.weight": 1, "stages.0.blocks.1.weight": 2,
             "stages.1.downsample.weight": 3, "stages.1.blocks.0.weight": 3, "stages.1.blocks.2.weight": 5,
             "norm.weight": L + 1, "head.weight": L + 1, "head.bias": L + 1}
    for n, i in layer.items():
        assert got[n][0] == pytest.approx(0.5 ** (L + 1 - i)), n
    assert not any(n.startswith("stem.") for n in got)
    assert got["pos"][1] == 0.0 and got["head.bias"][1] == 0.0 and got["head.weight"][1] == WD
    assert got["stages.1.blocks.1.bias"] == (pytest.approx(0.5 ** 2), 0.0)  # layer 4, no decay on biases


def test_an_encoder_without_group_matcher_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="group_matcher"):
        layer_decay_groups(model, WD, DECAY)


@pytest.mark.parametrize("name", ["mim_vit_tiny_patch16", "dgt_tiny", "simmim_swin_tiny_patch4_window7"])
def test_classifier_keys_name_the_head(name):
    """The prefixes name exactly the modules `reset_classifier(0)` removes (plus what always stays, DGT's head_fc)."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=10)
    head = classifier_keys(name)
    assert head == classifier_keys(model) == classifier_keys(type(model))
    before = {n for n in model.state_dict() if n.startswith(head)}
    model.reset_classifier(0)
    removed = before - set(model.state_dict())
    assert removed and removed <= before
    assert model.pretrained_cfg["classifier"] + ".weight" in removed
