"""The whole timm model contract: the same calls on every registered family and on timm's own ViT and Swin
(`vit_tiny_patch16_224`, `swin_tiny_patch4_window7_224`, random weights, shrunk), and what comes back compared:
types, shapes, attribute presence, gradient coverage."""
from __future__ import annotations

import importlib
import pathlib

import pytest
import timm
import torch
from torch import nn

import mimtrain  # noqa: F401  (registers the encoders)
from encoder_cases import EncoderCase

OURS = [importlib.import_module(p.stem).CASES[0] for p in sorted(pathlib.Path(__file__).parent.glob("cases_*.py"))]
# timm's own models, shrunk as far as their constructors allow (the architecture is what is compared).
REFERENCES = {
    "vit_tiny_patch16_224": (dict(img_size=32, depth=3, embed_dim=48, num_heads=2), (32, 32)),
    "swin_tiny_patch4_window7_224": (dict(img_size=64, window_size=2, embed_dim=16, depths=(1, 1, 1, 1),
                                          num_heads=(1, 2, 2, 4)), (64, 64)),
}
METHODS = ("forward_features", "forward_head", "forward_intermediates", "get_classifier", "reset_classifier",
           "no_weight_decay", "group_matcher", "set_grad_checkpointing", "prune_intermediate_layers")
NUM_CLASSES = 5


def _create(name: str, **kwargs) -> tuple[nn.Module, tuple[int, int]]:
    """(model, input hw) for a reference name or one of our cases' names."""
    torch.manual_seed(0)
    if name in REFERENCES:
        args, hw = REFERENCES[name]
        return timm.create_model(name, pretrained=False, **args, **kwargs), hw
    case: EncoderCase = next(c for c in OURS if c.name == name)
    model = timm.create_model(name, pretrained=False, img_size=case.img_size, mask_mode=case.mask_mode,
                              **case.kwargs, **kwargs)
    return model, case.hw


def _channels(t: torch.Tensor, fmt: str) -> int:
    """Channel count of a forward_features output in the model's format (timm's ViT: tokens [B, N, C])."""
    return t.shape[1] if fmt == "NCHW" else t.shape[-1]


def contract(name: str) -> dict:
    """What the timm API gives back for `name`, reduced to what must agree between models: a dict of facts."""
    model, hw = _create(name, num_classes=NUM_CLASSES)
    model.eval()
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    facts = {"methods": all(callable(getattr(model, m, None)) for m in METHODS)}
    for attr in ("num_classes", "num_features", "head_hidden_size"):
        facts[f"{attr} is int"] = isinstance(getattr(model, attr, None), int)
    facts["num_classes"] = model.num_classes
    info = model.feature_info
    facts["feature_info"] = isinstance(info, list) and all({"num_chs", "reduction", "module"} <= set(i) for i in info)
    facts["feature levels >= 2"] = len(info) >= 2
    fmt = getattr(model, "output_fmt", "NLC" if name.startswith("vit_") else "NCHW")
    with torch.no_grad():
        feats = model.forward_features(x)
        facts["forward_features is a tensor"] = isinstance(feats, torch.Tensor)
        facts["forward_features channels = num_features"] = _channels(feats, fmt) == model.num_features
        facts["logits"] = tuple(model.forward_head(feats).shape)
        facts["pre_logits = head_hidden_size"] = tuple(model.forward_head(feats, pre_logits=True).shape) == (
            2, model.head_hidden_size)
        torch.testing.assert_close(model.forward_head(feats), model(x), rtol=0, atol=1e-5)
        final, inter = model.forward_intermediates(x, indices=2)
        facts["intermediates"] = (type(final).__name__, type(inter).__name__, len(inter),
                                  [m.ndim for m in inter])
        facts["intermediate channels"] = [m.shape[1] for m in inter] == [i["num_chs"] for i in info[-2:]]
        only = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        facts["intermediates_only"] = (type(only).__name__, len(only), only[0].shape[1] == info[0]["num_chs"])
    facts["classifier"] = isinstance(model.get_classifier(), nn.Linear) and \
        model.get_classifier().out_features == NUM_CLASSES
    facts["no_weight_decay is a set"] = isinstance(model.no_weight_decay(), set)
    facts["group_matcher"] = {"stem", "blocks"} <= set(model.group_matcher())
    facts["pretrained_cfg keys"] = set(model.pretrained_cfg) - {"tag"}  # our untagged names carry no tag

    # Gradient coverage of the classifier: every trainable parameter, from the classification loss alone.
    model.train()
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    facts["all parameters trainable"] = len(params) == len(list(model.parameters()))
    facts["gradient coverage"] = sum(p.grad is not None and bool(p.grad.any()) for _, p in params) / len(params)

    # Checkpointing changes nothing in the output.
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        facts["checkpointed output equal"] = bool(torch.allclose(model(x), ref, atol=1e-6))

    model.reset_classifier(3)
    facts["reset 3"] = tuple(model(x).shape)
    model.reset_classifier(0)
    facts["reset 0 = head_hidden_size"] = tuple(model(x).shape) == (2, model.head_hidden_size)

    feat_net, _ = _create(name, features_only=True)
    with torch.no_grad():
        maps = feat_net(x)
        picked = _create(name, features_only=True, out_indices=(1,))[0](x)
    net_fmt = "NHWC" if getattr(feat_net, "output_fmt", "NCHW") == "NHWC" else "NCHW"  # timm's Swin: NHWC
    facts["features_only"] = (type(maps).__name__, len(maps) == len(info), [m.ndim for m in maps] == [4] * len(maps),
                              [_channels(m, net_fmt) for m in maps] == feat_net.feature_info.channels())
    facts["out_indices"] = (len(picked), _channels(picked[0], net_fmt) == info[1]["num_chs"])
    return facts


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    return {name: contract(name) for name in REFERENCES}


@pytest.mark.parametrize("case", OURS, ids=[c.name for c in OURS])
def test_our_encoder_answers_the_timm_api_as_timms_vit_and_swin_do(case, references):
    ours = contract(case.name)
    for ref_name, ref in references.items():
        for key, want in ref.items():
            if key == "pretrained_cfg keys":
                missing = want - ours[key]
                assert not missing, f"{case.name}: pretrained_cfg lacks {sorted(missing)} ({ref_name} has them)"
            else:
                assert ours[key] == want, f"{case.name} vs {ref_name}: {key}: {ours[key]!r} != {want!r}"


# ---------------------------------------------------------------------------------- scripting, tracing, export

def _ours(case: EncoderCase) -> tuple[nn.Module, torch.Tensor]:
    model, hw = _create(case.name, num_classes=3)
    return model.eval(), torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("case", OURS, ids=[c.name for c in OURS])
def test_script_and_fx_work_or_say_why_not(case):
    """ViT, HiViT and Swin script and trace (as timm's ViT and Swin do); the others refuse in one line that says
    why, as they declare (`script_limits`, `fx_limits`) and their docs pages list."""
    model, x = _ours(case)
    with torch.no_grad():
        want = model(x)
        for kind, limits, convert in (("scripted with torch.jit.script", model.script_limits, torch.jit.script),
                                      ("traced with torch.fx", model.fx_limits, torch.fx.symbolic_trace)):
            if limits:
                with pytest.raises(TypeError, match=f"cannot be {kind}.*torch.export"):
                    convert(model)
            else:
                torch.testing.assert_close(convert(model)(x), want, rtol=0, atol=1e-5)
    if case.name.startswith(("mim_vit", "hivit", "simmim_swin")):
        assert not model.script_limits and not model.fx_limits


@pytest.mark.parametrize("case", OURS, ids=[c.name for c in OURS])
def test_torch_export_works_for_every_encoder(case):
    model, x = _ours(case)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-5)
