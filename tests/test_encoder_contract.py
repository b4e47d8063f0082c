"""One contract every registered encoder passes: builds by name, shapes, gradients, all-visible = unmasked,
no leakage from hidden pixels, the declared hooks, classifiers that hold only what they train.

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
from mimtrain.encoders.base import EncoderBase, classifier_keys


def _collect() -> list[EncoderCase]:
    cases = []
    for path in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):
        cases += importlib.import_module(path.stem).CASES
    return cases


CASES = _collect()
IDS = [c.id for c in CASES]


def _build(case: EncoderCase, num_classes: int = 0) -> torch.nn.Module:
    """num_classes=0: the pretraining encoder (mask token, final norm); > 0: the classifier."""
    torch.manual_seed(0)
    model = build_encoder(case.name, case.img_size, mask_mode=case.mask_mode, num_classes=num_classes, **case.kwargs)
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
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert isinstance(model, MIMEncoder)
    assert model.mask_unit % model.patch_size == 0
    assert len(model.feature_info) >= 3  # features_only levels: stages, or one per block for plain encoders


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shapes_and_feature_info(case):
    model = _build(case)
    x = torch.randn(2, 3, *case.hw)
    final, feats = model.forward_intermediates(x)
    assert len(feats) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info):
        assert f.shape == (2, info["num_chs"], case.hw[0] // info["reduction"], case.hw[1] // info["reduction"])
        assert torch.isfinite(f).all()
    torch.testing.assert_close(model.forward_features(x), final, rtol=0, atol=1e-6)
    torch.testing.assert_close(feats[-1], final, rtol=0, atol=1e-6)
    assert model.forward_head(final, pre_logits=True).shape == (2, model.head_hidden_size)
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
    loss = model.encode(x, _mask(model, case)).pow(2).mean() + model.forward_features(x).pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reached: {missing}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_classifier_holds_only_what_it_trains(case):
    """num_classes > 0: no pretraining-only part (mask token, bypassed final norm), nothing frozen, and the
    classification loss alone reaches every parameter."""
    model = _build(case, num_classes=5).train()
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.startswith(model.pretraining_only)], "pretraining-only parts in a classifier"
    assert all(p.requires_grad for p in model.parameters()), "a classifier freezes nothing by itself"
    assert model.unused_by_classifier() == []
    logits = model(torch.randn(2, 3, *case.hw))
    assert logits.shape == (2, 5)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reached: {missing}"
    if model.mask_mode == "fill":
        with pytest.raises(ValueError, match="classifier.*no mask token"):
            model.encode(torch.randn(2, 3, *case.hw), _mask(model, case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_all_visible_equals_unmasked(case):
    model = _build(case)
    x = torch.randn(2, 3, *case.hw)
    nothing = torch.zeros_like(_mask(model, case))
    with torch.no_grad():
        out = model.encode(x, nothing)
        ref = model.forward_features(x)
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


# ------------------------------------------------------------------------------------------ the declared hooks


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_hooks_are_declared_with_working_defaults(case):
    """Code above the encoders calls these unconditionally (no hasattr): each exists and does what it says."""
    model = _build(case).train()
    assert isinstance(model, EncoderBase)
    assert model.on_step(3, 1e-3) is None  # the engine calls it before every optimizer step
    assert model.hidden_units is None  # the fast path fixes it for drop mode; nothing fixed by default
    assert isinstance(model.no_weight_decay(), set)
    assert set(model.no_weight_decay()) <= {n for n, _ in model.named_parameters()} | {"mask_token"}
    keys = classifier_keys(model)
    assert keys and all(k.endswith(".") for k in keys)
    assert model.get_classifier() is model.get_submodule(model._classifier_name())
    x = torch.randn(2, 3, *case.hw)
    mask = _mask(model, case)
    views = model.extra_views(x, mask)
    assert isinstance(views, dict) and all(v.ndim == 4 and torch.isfinite(v).all() for v in views.values())
    if model.has_class_token:
        assert model.forward_cls(x).shape == (2, model.embed_dim)
    else:
        with pytest.raises(ValueError, match="no class token"):
            model.forward_cls(x)
    assert model.grad_checkpointing is False
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing is True
