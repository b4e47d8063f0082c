"""SimMIM and its fill-mode timm wrappers (Swin, GC ViT): the loss by hand, shapes, exactness against plain timm with
nothing hidden, loading across window sizes, and gradients through SimMIM for Swin, GC ViT and ViT."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.gcvit import GlobalContextVit
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from mimtrain.encoders import build_encoder
from mimtrain.methods.simmim import SimMIM

SWIN_TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=2)
GCVIT_TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
VIT_TINY = dict(embed_dim=32, depth=2, num_heads=2)


class _ZeroEncoder(nn.Module):
    """Fill-mode stand-in whose features are all zero, so the decoder's bias alone is the prediction."""

    mask_mode, mask_unit, patch_size, embed_dim, num_prefix_tokens = "fill", 2, 2, 4, 0
    feature_info = [dict(num_chs=4, reduction=2, module="")]

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 4, x.shape[2] // 2, x.shape[3] // 2)


def _constant_decoder(model: SimMIM, per_channel: list[float]) -> None:
    """Make the decoder predict `per_channel[c]` at every pixel of channel c."""
    r = model.stride
    with torch.no_grad():
        model.decoder[0].weight.zero_()
        model.decoder[0].bias.copy_(torch.tensor(per_channel).repeat_interleave(r * r))  # PixelShuffle: c*r*r + i*r + j


def _mask(b: int, gh: int, gw: int, n_hide: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.zeros(gh * gw, dtype=torch.bool).index_fill_(0, torch.randperm(gh * gw, generator=g)[:n_hide], True)
            for _ in range(b)]
    return torch.stack(rows).view(b, gh, gw)


def test_loss_by_hand_hidden_pixels_only_normalized_over_the_batch():
    model = SimMIM(_ZeroEncoder())
    _constant_decoder(model, [0.0, 1.0, 2.0])
    mask = torch.tensor([[[True, False], [False, False]],  # image 0 hides 1 cell (4 px), image 1 hides 3 (12 px)
                         [[True, True], [True, False]]])
    pix = mask.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None].expand(-1, 3, -1, -1)
    images = torch.full((2, 3, 4, 4), 100.0)  # visible pixels are far off, and must not count
    images[0][pix[0]] = 2.0
    images[1][pix[1]] = 5.0
    out = model(images, mask)
    # image 0: 4 px x (|2-0| + |2-1| + |2-2|) = 12; image 1: 12 px x (5 + 4 + 3) = 144; 16 hidden px x 3 channels.
    torch.testing.assert_close(out["loss"], torch.tensor(156.0 / 48.0))
    assert out["pred"].shape == images.shape and out["mask"] is mask


def test_norm_pix_target_is_per_unit_affine_invariant():
    model = SimMIM(_ZeroEncoder(), norm_pix_loss=True)
    _constant_decoder(model, [0.0, 0.0, 0.0])
    images, mask = torch.randn(2, 3, 8, 8), _mask(2, 4, 4, 10)
    scale = torch.rand(2, 1, 4, 4).add(0.5).repeat_interleave(2, 2).repeat_interleave(2, 3)
    shift = torch.randn(2, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)
    loss, loss_affine = model(images, mask)["loss"], model(images * scale + shift, mask)["loss"]
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss_affine, loss, rtol=1e-4, atol=1e-4)


def test_refuses_drop_encoder_and_wrong_mask_grid():
    drop = build_encoder("mim_vit_tiny_patch16", 32, mask_mode="drop", **VIT_TINY)
    with pytest.raises(ValueError, match="fill mode"):
        SimMIM(drop)
    model = SimMIM(_ZeroEncoder())
    with pytest.raises(ValueError, match="does not tile"):
        model(torch.randn(1, 3, 8, 8), torch.zeros(1, 2, 2, dtype=torch.bool))


def test_pred_and_visualize_shapes_and_content():
    torch.manual_seed(0)
    model = SimMIM(build_encoder("simmim_swin_tiny_patch4_window6", 64, **SWIN_TINY), norm_pix_loss=True).eval()
    images, mask = torch.randn(2, 3, 64, 64), _mask(2, 2, 2, 2)
    out = model(images, mask)
    assert out["pred"].shape == (2, 3, 64, 64) and out["loss"].ndim == 0
    vis = model.visualize(images, out)
    assert set(vis) == {"original", "masked", "reconstruction"}
    pix = mask.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, None].expand(-1, 3, -1, -1)
    for v in vis.values():
        assert v.shape == images.shape
    assert (vis["masked"][pix] == 0).all() and torch.equal(vis["masked"][~pix], images[~pix])
    assert torch.equal(vis["reconstruction"][~pix], images[~pix])
    assert not torch.equal(vis["reconstruction"][pix], images[pix])


def test_no_weight_decay_names_are_parameters():
    model = SimMIM(build_encoder("simmim_gcvit_xxtiny", 64, **GCVIT_TINY))
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert "encoder.mask_token" in nwd and any("relative_position_bias_table" in n for n in nwd)
    assert nwd <= set(names)


def _plain_swin(img_size: int) -> SwinTransformer:
    return SwinTransformer(img_size=img_size, patch_size=4, num_classes=5, **SWIN_TINY)


def _plain_gcvit(img_size: int) -> GlobalContextVit:
    return GlobalContextVit(img_size=img_size, num_classes=5, **GCVIT_TINY)


@pytest.mark.parametrize("name,kwargs,plain,attr", [
    ("simmim_swin_tiny_patch4_window6", SWIN_TINY, _plain_swin, "swin"),
    ("simmim_gcvit_xxtiny", GCVIT_TINY, _plain_gcvit, "gcvit"),
])
def test_fill_with_nothing_hidden_equals_plain_timm(name, kwargs, plain, attr):
    """Same weights, nothing hidden: encode, forward_features and the logits are exactly plain timm's (the
    pretraining encoder for encode, the classifier, which has no mask token, for the logits)."""
    torch.manual_seed(0)
    ours = build_encoder(name, 64, num_classes=5, **kwargs).eval()
    pretraining = build_encoder(name, 64, num_classes=0, **kwargs).eval()
    ref = plain(64).eval()
    ref.load_state_dict(getattr(ours, attr).state_dict())
    getattr(pretraining, attr).load_state_dict(getattr(ours, attr).state_dict(), strict=False)  # all but the head
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref.forward_features(x)
        want = want.permute(0, 3, 1, 2) if attr == "swin" else want  # timm's Swin runs NHWC
        got = pretraining.encode(x, torch.zeros(2, 2, 2, dtype=torch.bool))
        assert torch.equal(got, want)
        assert torch.equal(ours.forward_features(x), want)
        assert torch.equal(ours(x), ref(x))


def test_swin_192_window6_checkpoint_loads_into_224_window7():
    torch.manual_seed(0)
    tiny = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
    src = build_encoder("simmim_swin_tiny_patch4_window6", 192, **tiny)
    dst = build_encoder("simmim_swin_tiny_patch4_window7", 224, **tiny)
    sd = src.state_dict()
    sd["swin.layers.0.blocks.1.attn_mask"] = torch.zeros(64, 36, 36)  # a checkpoint that still carries buffers
    adapted = dst.adapt_state_dict(sd)
    dst.load_state_dict(adapted)  # strict
    key = "swin.layers.3.blocks.1.attn.relative_position_bias_table"
    assert sd[key].shape == (11 * 11, 4) and dst.state_dict()[key].shape == (13 * 13, 4)
    assert torch.equal(dst.mask_token, src.mask_token)
    with torch.no_grad():
        out = dst.encode(torch.randn(1, 3, 224, 224), _mask(1, 7, 7, 29))
    assert out.shape == (1, 128, 7, 7) and torch.isfinite(out).all()


def test_gcvit_checkpoint_loads_at_another_size_and_refuses_wrong_input():
    torch.manual_seed(0)
    src = build_encoder("simmim_gcvit_xxtiny", 64, **GCVIT_TINY)
    dst = build_encoder("simmim_gcvit_xxtiny", 96, **GCVIT_TINY)
    with pytest.raises(RuntimeError):
        dst.load_state_dict(src.state_dict())  # 3x3 vs 5x5 offset tables
    dst.load_state_dict(dst.adapt_state_dict(src.state_dict()))
    key = "gcvit.stages.0.blocks.0.attn.rel_pos.relative_position_bias_table"
    assert dst.state_dict()[key].shape == (5 * 5, 1)
    with torch.no_grad():
        assert torch.isfinite(dst.encode(torch.randn(1, 3, 96, 96), _mask(1, 3, 3, 5))).all()
        with pytest.raises(ValueError, match="built for 96x96"):
            dst.forward_features(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name,kwargs", [
    ("simmim_swin_tiny_patch4_window6", SWIN_TINY),
    ("simmim_gcvit_xxtiny", GCVIT_TINY),
    ("mim_vit_tiny_patch16", {**VIT_TINY, "mask_mode": "fill", "mask_unit": 32}),
])
def test_simmim_loss_is_finite_and_reaches_every_parameter(name, kwargs):
    torch.manual_seed(0)
    model = SimMIM(build_encoder(name, 64, num_classes=0, **kwargs)).train()
    out = model(torch.randn(2, 3, 64, 64), _mask(2, 2, 2, 2))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reached: {missing}"


# Paper parameter counts (millions, 224 px, 1000 classes): Swin paper Table 1 (window 7); GC ViT paper Table 2.
PAPER_PARAMS_M = {
    "simmim_swin_tiny_patch4_window7": 29, "simmim_swin_small_patch4_window7": 50,
    "simmim_swin_base_patch4_window7": 88, "simmim_swin_large_patch4_window7": 197,
    "simmim_gcvit_xxtiny": 12, "simmim_gcvit_xtiny": 20, "simmim_gcvit_tiny": 28, "simmim_gcvit_small": 51,
    "simmim_gcvit_base": 90,
}


@pytest.mark.parametrize("name", sorted(timm.list_models("simmim_swin_*") + timm.list_models("simmim_gcvit_*")))
def test_every_registered_size_builds_with_the_paper_param_count(name):
    with torch.device("meta"):  # shapes only: full-size builds in seconds, not minutes
        model = timm.create_model(name, pretrained=False, img_size=224)
    assert model.mask_mode == "fill" and model.mask_unit == 32 and model.patch_size == 4
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    paper = PAPER_PARAMS_M.get(name, PAPER_PARAMS_M.get(name.replace("window6", "window7")))
    assert abs(params_m - paper) < 1.0, f"{name}: {params_m:.2f}M vs the paper's {paper}M"
