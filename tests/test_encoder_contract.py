"""One contract every registered encoder passes: builds by name, shapes, gradients, all-visible = unmasked,
no leakage from hidden pixels.

Cases come from `tests/cases_*.py` (each defines `CASES: list[EncoderCase]`), so a new backbone adds a file and
touches nothing here.
"""
from __future__ import annotations

import importlib
import pathlib

import pytest
import timm
import torch

from encoder_cases import EncoderCase
from mimtrain.encoders import MIMEncoder, build_encoder


def _collect() -> list[EncoderCase]:
    cases = []
    for path in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):
        cases += importlib.import_module(path.stem).CASES
    return cases


CASES = _collect()
IDS = [c.id for c in CASES]


def _build(case: EncoderCase) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_encoder(case.name, case.img_size, mask_mode=case.mask_mode, num_classes=5, **case.kwargs)
    return model.eval()


def _mask(model, case: EncoderCase, ratio: float = 0.5, seed: int = 0) -> torch.Tensor:
    gh, gw = (s // model.mask_unit for s in case.hw)
    n_hide = round(ratio * gh * gw)
    g = torch.Generator().manual_seed(seed)
    rows = [torch.zeros(gh * gw, dtype=torch.bool).index_fill_(0, torch.randperm(gh * gw, generator=g)[:n_hide], True)
            for _ in range(2)]
    return torch.stack(rows).view(2, gh, gw)


def _tokens_as_map(model, out: torch.Tensor, case: EncoderCase) -> torch.Tensor:
    """drop output with nothing hidden [B, P + L, C] -> [B, C, h, w] at the last feature stride."""
    r = model.feature_info[-1]["reduction"]
    body = out[:, model.num_prefix_tokens:]
    return body.transpose(1, 2).reshape(out.shape[0], -1, case.hw[0] // r, case.hw[1] // r)


@pytest.mark.parametrize("name", sorted({c.name for c in CASES}))
def test_registered_name_builds_at_full_size(name):
    assert timm.is_model(name)
    model = timm.create_model(name, pretrained=False)
    assert isinstance(model, MIMEncoder)
    assert model.mask_unit % model.patch_size == 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shapes_and_feature_info(case):
    model = _build(case)
    x = torch.randn(2, 3, *case.hw)
    feats = model.forward_features(x)
    assert len(feats) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info):
        assert f.shape == (2, info["num_chs"], case.hw[0] // info["reduction"], case.hw[1] // info["reduction"])
        assert torch.isfinite(f).all()
    assert model.forward_head(feats).shape == (2, 5)
    mask = _mask(model, case)
    out = model.encode(x, mask)
    if model.mask_mode == "drop":
        n_visible = int((~mask[0]).sum()) * (model.mask_unit // model.feature_info[-1]["reduction"]) ** 2
        assert out.shape == (2, model.num_prefix_tokens + n_visible, model.embed_dim)
    else:
        r = model.feature_info[-1]["reduction"]
        assert out.shape == (2, model.embed_dim, case.hw[0] // r, case.hw[1] // r)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_parameter_gets_a_gradient(case):
    model = _build(case).train()
    x = torch.randn(2, 3, *case.hw)
    loss = model.encode(x, _mask(model, case)).pow(2).mean() + model.forward_head(model.forward_features(x)).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reached: {missing}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_all_visible_equals_unmasked(case):
    model = _build(case)
    x = torch.randn(2, 3, *case.hw)
    nothing = torch.zeros_like(_mask(model, case))
    with torch.no_grad():
        out = model.encode(x, nothing)
        ref = model.forward_features(x)[-1]
    if model.mask_mode == "drop":
        out = _tokens_as_map(model, out, case)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_leakage_from_hidden_pixels(case):
    """Noise under hidden cells must not change what the encoder outputs."""
    model = _build(case)
    x = torch.randn(2, 3, *case.hw)
    mask = _mask(model, case)
    pix = torch.nn.functional.interpolate(mask[:, None].float(), size=case.hw, mode="nearest").bool()
    noisy = torch.where(pix, torch.randn_like(x) * 3, x)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(noisy, mask), model.encode(x, mask), rtol=1e-4, atol=1e-5)
