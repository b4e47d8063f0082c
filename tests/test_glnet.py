"""GLNet specifics beyond the encoder contract: the soft clustering / dispatching maths, slot maps, sizes vs paper."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import mimtrain.encoders  # noqa: F401  (registers the models)
from mimtrain.encoders.base import num_params
from mimtrain.encoders.glnet import GLMix, GLNet
from mimtrain.bench.flops import count_params_and_macs

_TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 4), num_slots=16, num_classes=5)
# name: (params M, FLOPs G at 224) from the paper: Tables 1-3 (16G params: Table 3, 106M).
PAPER = {"glnet_stl": (30.3, 4.4), "glnet_4g": (27.0, 4.5), "glnet_9g": (61.0, 9.7), "glnet_16g": (106.0, 16.7)}
_HYBRID = ("glmix", "glmix", "hybrid", "attn")
# Table 7: the path from STL to 4G, one design added per row (params M).
EVOLUTION = [
    (dict(), 30.3),
    (dict(overlap_embed=True), 32.3),
    (dict(overlap_embed=True, stage_mixers=_HYBRID), 31.4),
    (dict(overlap_embed=True, stage_mixers=_HYBRID, conv_pos=True), 31.4),
    (dict(overlap_embed=True, stage_mixers=_HYBRID, conv_pos=True, embed_dim=64, depths=(4, 4, 18, 4),
          mlp_ratio=3.0), 26.8),
    (dict(overlap_embed=True, stage_mixers=_HYBRID, conv_pos=True, embed_dim=64, depths=(4, 4, 18, 4),
          mlp_ratio=3.0, conv_ffn=True), 27.0),
]


def _reference_global_branch(mix: GLMix, x: torch.Tensor) -> torch.Tensor:
    """Eq. (1)-(4) written slot by slot, position by position. x: [1, H, W, C] -> [1, H, W, C]."""
    _, H, W, C = x.shape
    grid = x[0].reshape(H * W, C)
    init = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), mix.slot_grid)[0].reshape(C, -1).T  # [M, C]
    scale = mix.logit_scale.exp()
    logits = torch.stack([scale * F.cosine_similarity(s[None], grid, dim=-1) for s in init])  # [M, N]
    slots = torch.stack([(row.softmax(0)[:, None] * grid).sum(0) for row in logits])  # [M, C]
    slots = mix.slot_attn(slots[None])[0]
    out = torch.stack([(col.softmax(0)[:, None] * slots).sum(0) for col in logits.T])  # [N, C]
    return out.reshape(1, H, W, C)


def test_assignment_weights_are_normalised():
    torch.manual_seed(0)
    mix = GLMix(dim=16, num_heads=2, num_slots=64)
    x = torch.randn(2, 12, 20, 16)
    cluster, dispatch = mix.assign(x)
    assert cluster.shape == (2, 64, 240) and dispatch.shape == (2, 240, 64)
    torch.testing.assert_close(cluster.sum(-1), torch.ones(2, 64))  # each slot: weights over positions
    torch.testing.assert_close(dispatch.sum(-1), torch.ones(2, 240))  # each position: weights over slots
    assert (cluster >= 0).all() and (dispatch >= 0).all()


def test_dense_global_branch_matches_per_slot_reference():
    torch.manual_seed(0)
    mix = GLMix(dim=16, num_heads=2, num_slots=16).eval()
    x = torch.randn(1, 6, 10, 16)
    with torch.no_grad():
        local = mix.local_out(mix.local_dw(mix.local_in(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        torch.testing.assert_close(mix(x) - local, _reference_global_branch(mix, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_params_and_flops_match_paper(name):
    params, flops = PAPER[name]
    n_params, macs = count_params_and_macs(name, 224, device="meta")  # shapes only: seconds even for 16G
    assert n_params / 1e6 == pytest.approx(params, rel=0.03)
    assert macs / 1e9 == pytest.approx(flops, rel=0.05)


@pytest.mark.parametrize("kwargs,params", EVOLUTION)
def test_table7_evolution_path_params(kwargs, params):
    with torch.device("meta"):
        model = timm.create_model("glnet_stl", **kwargs)
    assert num_params(model) / 1e6 == pytest.approx(params, rel=0.03)


@pytest.mark.parametrize("name,hw", [("glnet_stl", (64, 96)), ("glnet_4g", (96, 64))])
def test_slot_maps(name, hw):
    torch.manual_seed(0)
    model = timm.create_model(name, **{**_TINY, "num_classes": 0}).eval()  # pretraining: it has the mask token
    x = torch.randn(2, 3, *hw)
    maps = model.slot_maps(x)
    assert maps.shape == (2, 16, hw[0] // 16, hw[1] // 16)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 16))
    mask = torch.zeros(2, hw[0] // 32, hw[1] // 32, dtype=torch.bool)
    mask[:, 0, 0] = True
    assert model.slot_maps(x, mask).shape == maps.shape
    assert all(not m.keep_assign and m.last_assign is None for m in model.modules() if isinstance(m, GLMix))


def test_slot_maps_full_size_has_64_slots():
    model = timm.create_model("glnet_stl", depths=(1, 1, 1, 1)).eval()
    assert model.slot_maps(torch.randn(1, 3, 64, 96)).shape == (1, 64, 4, 6)


@pytest.mark.parametrize("name", ["glnet_stl", "glnet_4g"])
def test_non_square_forward(name):
    model = timm.create_model(name, **_TINY).eval()
    x = torch.randn(2, 3, 96, 160)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[-2:] for f in feats] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    assert model(x).shape == (2, 5)
    mask = torch.rand(2, 3, 5) > 0.5
    pretraining = timm.create_model(name, **{**_TINY, "num_classes": 0}).eval()
    assert pretraining.encode(x, mask).shape == (2, 128, 3, 5)


def test_refuses_bad_settings():
    with pytest.raises(ValueError, match="fill"):
        GLNet(mask_mode="drop")
    with pytest.raises(ValueError, match="multiple"):
        GLNet(mask_unit=30)
    with pytest.raises(ValueError, match="perfect square"):
        GLNet(num_slots=60)


def test_no_weight_decay_names_exist():
    model = timm.create_model("glnet_4g", **{**_TINY, "num_classes": 0})
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert "mask_token" in nwd and any(n.endswith("logit_scale") for n in nwd)
    assert nwd <= names.keys()
