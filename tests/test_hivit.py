"""HiViT beyond the shared contract: Table 7's sizes, drop mode's compute and exactness, no leakage."""
from __future__ import annotations

import pytest
import timm
import torch

import mimtrain.encoders  # noqa: F401  (registers hivit_*)
from mimtrain.bench.flops import count_macs, count_params_and_macs

TINY = dict(dims=(16, 32, 64), depths=(1, 1, 2), num_heads=2, num_classes=5)

# Table 7 of the paper: params (M) with a 1000-class head, FLOPs (G multiply-adds) at 224x224.
TABLE7 = {"hivit_tiny": (19.2, 4.6), "hivit_small": (37.5, 9.1), "hivit_base": (66.4, 15.9),
          "hivit_large": (266.8, 63.8)}


def _random_mask(batch: int, grid: tuple[int, int], ratio: float, seed: int = 0) -> torch.Tensor:
    """[B, gh, gw], the same hidden count per image (as the masking service draws for drop mode)."""
    g = torch.Generator().manual_seed(seed)
    n, n_hide = grid[0] * grid[1], round(ratio * grid[0] * grid[1])
    rows = [torch.zeros(n, dtype=torch.bool).index_fill_(0, torch.randperm(n, generator=g)[:n_hide], True)
            for _ in range(batch)]
    return torch.stack(rows).view(batch, *grid)


@pytest.mark.parametrize("name", sorted(TABLE7))
def test_table7_params_and_flops(name):
    params, macs = count_params_and_macs(name, 224, device="meta")
    paper_params, paper_gflops = TABLE7[name]
    assert abs(params / 1e6 / paper_params - 1) < 0.02, f"{name}: {params / 1e6:.2f}M vs paper {paper_params}M"
    assert abs(macs / 1e9 / paper_gflops - 1) < 0.05, f"{name}: {macs / 1e9:.2f}G vs paper {paper_gflops}G"


def test_drop_mode_compute_scales_with_visible_fraction():
    """MAE's 75% mask leaves a quarter of the cells; every stage runs on them only (attention a bit less)."""
    torch.manual_seed(0)
    model = timm.create_model("hivit_tiny", num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        full = count_macs(lambda: model.forward_features(x))
        masked = count_macs(lambda: model.encode(x, _random_mask(1, (14, 14), 0.75)))
    assert 0.20 < masked / full < 0.30, f"encode at 75% masking costs {masked / full:.1%} of the unmasked forward"


def test_drop_mode_no_leakage_and_all_visible_equals_unmasked():
    """The issue's statement: noise under hidden units changes nothing; nothing hidden = the unmasked main stage."""
    torch.manual_seed(0)
    model = timm.create_model("hivit_base", img_size=64, **TINY).eval()
    x = torch.randn(3, 3, 64, 64)
    mask = _random_mask(3, (4, 4), 0.75, seed=1)
    pix = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].expand_as(x)
    noisy = torch.where(pix, 10 * torch.randn_like(x), x)
    with torch.no_grad():
        out = model.encode(x, mask)
        assert out.shape == (3, 4, 64)
        torch.testing.assert_close(model.encode(noisy, mask), out, rtol=0, atol=0)
        everything = model.encode(x, torch.zeros_like(mask))
        ref = model.forward_features(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(everything, ref, rtol=1e-5, atol=1e-5)


def test_hierarchical_embedding_is_local_to_each_cell():
    """Stages 1-2 never mix tokens across a 16x16 cell: the property that makes dropping cells exact."""
    torch.manual_seed(0)
    model = timm.create_model("hivit_tiny", img_size=(32, 64), **TINY).eval()
    x = torch.randn(1, 3, 32, 64)
    y = x.clone()
    y[..., 16:32, 32:48] = torch.randn(1, 3, 16, 16)  # cell (1, 2) of the 2x4 grid
    with torch.no_grad():
        fx, fy = (model.forward_intermediates(v, intermediates_only=True) for v in (x, y))
    for a, b, stride in zip(fx[:2], fy[:2], (4, 8)):
        changed = (a - b).abs().amax(1)[0] > 0  # [h, w]
        expected = torch.zeros_like(changed)
        expected[16 // stride:32 // stride, 32 // stride:48 // stride] = True
        assert torch.equal(changed, expected)


def test_drop_gathers_visible_cells_in_raster_order():
    """With no main-stage blocks, each visible token must equal the unmasked token at its cell."""
    torch.manual_seed(0)
    model = timm.create_model("hivit_tiny", img_size=(32, 64), **{**TINY, "depths": (1, 1, 0)}).eval()
    x = torch.randn(2, 3, 32, 64)
    mask = _random_mask(2, (2, 4), 0.5, seed=3)
    with torch.no_grad():
        out = model.encode(x, mask)
        ref = model.forward_features(x).flatten(2).transpose(1, 2)  # [B, 8, C]
    for b in range(2):
        torch.testing.assert_close(out[b], ref[b][~mask[b].flatten()], rtol=1e-5, atol=1e-5)


def test_relative_position_index_on_non_square_grid():
    model = timm.create_model("hivit_tiny", img_size=(32, 64), **TINY)
    gh, gw = model.grid_size
    assert (gh, gw) == (2, 4)
    ys, xs = torch.arange(gh * gw) // gw, torch.arange(gh * gw) % gw
    expected = (ys[:, None] - ys[None] + gh - 1) * (2 * gw - 1) + (xs[:, None] - xs[None] + gw - 1)
    assert torch.equal(model.rel_index, expected)
    assert model.blocks[0].relative_position_bias_table.shape == ((2 * gh - 1) * (2 * gw - 1), 2)


def test_refuses_bad_mask_units_and_sizes():
    with pytest.raises(ValueError, match="multiple of 16"):
        timm.create_model("hivit_tiny", img_size=64, mask_unit=8, **TINY)  # drop needs whole 16-px tokens
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        timm.create_model("hivit_tiny", img_size=64, mask_unit=6, mask_mode="fill", **TINY)
    with pytest.raises(ValueError, match="divisible by its main-stage stride"):
        timm.create_model("hivit_tiny", img_size=40, **TINY)
    model = timm.create_model("hivit_tiny", img_size=64, **TINY)
    with pytest.raises(ValueError, match="does not match"):
        model.forward_features(torch.randn(1, 3, 32, 32))


def test_no_weight_decay_names_are_parameters():
    model = timm.create_model("hivit_tiny", img_size=64, mask_mode="fill", **{**TINY, "num_classes": 0})  # pretraining
    names = dict(model.named_parameters())
    skip = model.no_weight_decay()
    assert skip <= set(names) and {"pos_embed", "mask_token", "blocks.0.relative_position_bias_table"} <= skip
