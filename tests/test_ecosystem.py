"""Backbones that plug into the ecosystem: timm-native models, exports that load in timm and HF, Hub-style save/load,
light imports. Every loading path is checked by comparing outputs with the source model."""
from __future__ import annotations

import importlib
import json
import pathlib
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

import mimtrain  # noqa: F401  (registers the encoders: nothing else is imported for that)
from encoder_cases import EncoderCase

REPO = pathlib.Path(__file__).resolve().parents[1]


def _first_case_per_family() -> list[EncoderCase]:
    out = []
    for path in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):
        out.append(importlib.import_module(path.stem).CASES[0])
    return out


FAMILIES = _first_case_per_family()
IDS = [c.name for c in FAMILIES]


def _create(case: EncoderCase, **kwargs) -> torch.nn.Module:
    return timm.create_model(case.name, img_size=case.img_size, mask_mode=case.mask_mode,
                             **{**case.kwargs, **kwargs}).eval()


def _image(case: EncoderCase, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *case.hw, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------- imports

def test_import_registers_every_encoder_without_heavy_imports():
    code = ("import sys, mimtrain, timm; timm.create_model('hivit_base'); "
            "import mimtrain.cli; mimtrain.cli.build_parser(); "
            "print(sorted(m for m in ('deepspeed', 'transformers', 'pycocotools') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "Setting accelerator" not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------- timm-native

@pytest.mark.parametrize("case", FAMILIES, ids=IDS)
def test_default_cfg_describes_the_model_and_its_preprocessing(case):
    with torch.device("meta"):
        model = timm.create_model(case.name)
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["input_size"][0] == 3
    assert isinstance(model.get_submodule(model.pretrained_cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_classifier() is model.get_submodule(model.pretrained_cfg["classifier"])
    assert model.num_classes == model.pretrained_cfg["num_classes"] == 1000


@pytest.mark.parametrize("case", FAMILIES, ids=IDS)
def test_classifier_api_forward_backward(case):
    torch.manual_seed(0)
    model = _create(case, num_classes=7)
    x = _image(case)
    out = model(x)
    assert out.shape == (2, 7) and model.num_classes == 7
    out.sum().backward()
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, model.head_hidden_size)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (2, model._classifier_in_features())


@pytest.mark.parametrize("case", FAMILIES, ids=IDS)
def test_forward_backward_at_the_default_cfg_input_size(case):
    model = timm.create_model(case.name, mask_mode=case.mask_mode, num_classes=2, **case.kwargs)  # cfg's img_size
    size = model.pretrained_cfg["input_size"]
    out = model(torch.randn(1, *size))
    out.sum().backward()
    assert out.shape == (1, 2) and all(p.grad is not None for p in model.get_classifier().parameters())


@pytest.mark.parametrize("case", FAMILIES, ids=IDS)
def test_features_only_and_forward_intermediates_give_the_dense_maps(case):
    torch.manual_seed(0)
    model = _create(case, num_classes=0)
    x = _image(case)
    with torch.no_grad():
        ref = model.forward_intermediates(x, intermediates_only=True)
        feat_net = _create(case, features_only=True)
        feat_net.model.load_state_dict(model.state_dict())
        maps = feat_net(x)
        last = _create(case, features_only=True, out_indices=(-1,))
        last.model.load_state_dict(model.state_dict())
        final, inter = model.forward_intermediates(x, indices=[-1])
        last_map = last(x)[0]
    assert len(maps) == len(ref) == len(model.feature_info)
    assert feat_net.feature_info.channels() == [f["num_chs"] for f in model.feature_info]
    assert feat_net.feature_info.reduction() == [f["reduction"] for f in model.feature_info]
    for a, b in zip(maps, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(last_map, ref[-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(inter[0], ref[-1], rtol=0, atol=1e-5)
    assert model.forward_head(final, pre_logits=True).shape == (2, model.head_hidden_size)


@pytest.mark.parametrize("case", FAMILIES, ids=IDS)
def test_pretrained_overlay_file_loads_our_weights(case, tmp_path):
    """Before: `pretrained=True` + an overlay file silently returned random weights (53 of 54 ViT tensors differed)."""
    torch.manual_seed(0)
    src = _create(case, num_classes=0)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "model.safetensors"))
    torch.manual_seed(123)  # a different initialisation, so an unloaded tensor shows
    loaded = _create(case, num_classes=0, pretrained=True,
                     pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))
    x = _image(case)
    with torch.no_grad():
        for a, b in zip(*(m.forward_intermediates(x, intermediates_only=True) for m in (loaded, src))):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # A checkpoint without a classifier into a model with one: the body loads, the head is new.
    with_head = _create(case, num_classes=4, pretrained=True,
                        pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(with_head.forward_intermediates(x, intermediates_only=True)[-2],
                                   src.forward_intermediates(x, intermediates_only=True)[-2], rtol=0, atol=1e-5)
    assert with_head(x).shape == (2, 4)


# Tracing needs shape-independent control flow: DGT (group plan), GC ViT (size check), GPViT and HiViT (grid
# arithmetic on input shapes) branch on tensor shapes in Python, so torch.fx cannot trace them.
FX_TRACEABLE = ("mim_vit_tiny_patch16", "simmim_swin_tiny_patch4_window6", "glnet_stl")


@pytest.mark.parametrize("case", [c for c in FAMILIES if c.name in FX_TRACEABLE], ids=lambda c: c.name)
def test_fx_tracing_where_the_architecture_allows(case):
    model = _create(case, num_classes=3)
    graph = torch.fx.symbolic_trace(model)
    x = _image(case)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=0, atol=1e-5)


def test_pretrained_without_weights_and_wrong_architecture_are_refused(tmp_path):
    case = FAMILIES[[c.name for c in FAMILIES].index("mim_vit_tiny_patch16")]
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model(case.name, pretrained=True)
    src = _create(case, num_classes=0)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        _create(case, num_classes=0, depth=3, pretrained=True,
                pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))


# ---------------------------------------------------------------------------------------------------- exports

@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    """A 2-step MAE pretraining run of a tiny ViT (the real CLI) and its default export."""
    from helpers import TINY_MAE, make_test_shards, run_cli

    root = tmp_path_factory.mktemp("eco")
    shards = make_test_shards(root / "train", classes=3, per_class=4, shard_size=6)
    run = root / "mae"
    proc = run_cli("pretrain", *TINY_MAE, f"data.train_shards={shards}", f"output_dir={run}", "data.num_workers=0",
                   "train.max_steps=2", "train.image_every=1", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]")
    (root / "pretrain.log").write_text(proc.stdout + proc.stderr)
    export = root / "export"
    run_cli("export", str(run), str(export))
    return root, run, export


def _ours(export):
    from mimtrain.checkpoint.encoder import load_encoder

    model, _ = load_encoder(export, num_classes=0)
    return model.eval()


def test_a_plain_pretraining_run_does_not_import_deepspeed(mae_run):
    """accelerate's unwrap_model imports DeepSpeed whenever it is installed; DeepSpeed then printed its line."""
    log = (mae_run[0] / "pretrain.log").read_text()
    assert "done: step 2" in log and "Setting accelerator" not in log and "DeepSpeed" not in log


def test_export_loads_in_timm_with_the_runs_preprocessing(mae_run):
    _, _, export = mae_run
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["architecture"] == "mim_vit_tiny_patch16" and cfg["num_classes"] == 0
    assert cfg["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5] and cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    ref = _ours(export)
    model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0, **cfg["model_args"],
                              pretrained_cfg_overlay=dict(file=str(export / "model.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), rtol=0, atol=1e-5)

    backbone = timm.create_model(cfg["architecture"], pretrained=True, features_only=True, **cfg["model_args"],
                                 pretrained_cfg_overlay=dict(file=str(export / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)[-1], ref.forward_features(x), rtol=0, atol=1e-5)  # one map a block

    if "local-dir" in getattr(timm.models._factory, "_MODEL_SOURCES", ()):  # timm's own reader of config.json
        local = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(local.forward_features(x), ref.forward_features(x), rtol=0, atol=1e-5)

    from mimtrain.checkpoint import hub

    loaded = hub.from_pretrained(export)
    assert timm.data.resolve_data_config(model=loaded)["mean"] == (0.5, 0.5, 0.5)
    saved = hub.save_pretrained(loaded, export.parent / "saved")
    again = hub.from_pretrained(saved, num_classes=3)  # a new head on the same body
    with torch.no_grad():
        # A classifier has no final norm (MAE's head pools before it): compare the blocks' outputs.
        torch.testing.assert_close(again.forward_intermediates(x, intermediates_only=True)[0],
                                   ref.forward_intermediates(x, intermediates_only=True)[0], rtol=0, atol=1e-5)
    assert again(x).shape == (2, 3)


def test_timm_vit_export_loads_strictly_into_plain_timm(mae_run):
    from helpers import run_cli

    root, _, export = mae_run
    out = root / "timm_vit"
    run_cli("export", "--format", "timm-vit", str(export), str(out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"].startswith("vit_")
    vit = timm.create_model(cfg["architecture"], num_classes=0, **cfg["model_args"]).eval()
    from safetensors.torch import load_file

    vit.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    x = torch.randn(2, 3, 32, 32)
    ref = _ours(export)
    with torch.no_grad():
        tokens = vit.forward_features(x)[:, vit.num_prefix_tokens:]  # [B, N, C]
        ours = ref.forward_features(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens, ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(vit.forward_head(vit.forward_features(x), pre_logits=True),
                                   ref.forward_head(ref.forward_features(x), pre_logits=True), rtol=0, atol=1e-5)


def test_hf_export_matches_vitmae_and_vitmodel(mae_run):
    from helpers import run_cli
    from transformers import ViTMAEForPreTraining, ViTModel

    from mimtrain.checkpoint.encoder import method_state, resolve
    from mimtrain.checkpoint.formats import _training_mae

    root, run, export = mae_run
    out = root / "hf"
    run_cli("export", "--format", "hf", str(run), str(out))
    ckpt = resolve(run)
    mae = _training_mae(ckpt, _ours(export))
    assert mae is not None and set(mae.state_dict()) == set(method_state(ckpt))
    x = torch.randn(2, 3, 32, 32)
    vit = ViTModel.from_pretrained(out / "vit", add_pooling_layer=False).eval()
    hf_mae = ViTMAEForPreTraining.from_pretrained(out / "vitmae").eval()
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, ::2, 1::2] = True  # with the next line, 8 of 16 units hidden in each image
    mask[:, 1, :] = True
    hf_mae.config.mask_ratio = float(mask[0].sum()) / 16
    # HF keeps the tokens with the smallest noise, in that order: visible units first, in raster order, as ours does.
    noise = mask.flatten(1).float() + torch.arange(16) / 32
    with torch.no_grad():
        torch.testing.assert_close(vit(pixel_values=x).last_hidden_state[:, 1:],
                                   mae.encoder.forward_features(x).flatten(2).transpose(1, 2), rtol=0, atol=1e-5)
        hf_out = hf_mae(pixel_values=x, noise=noise)
        ours = mae(x, mask)
    torch.testing.assert_close(hf_out.mask.bool(), mask.flatten(1))
    torch.testing.assert_close(hf_out.logits, ours["pred"], rtol=0, atol=1e-5)
    torch.testing.assert_close(hf_out.loss, ours["loss"], rtol=1e-5, atol=1e-6)


def test_finetuned_export_carries_class_names_and_reloads_with_its_head(mae_run):
    from helpers import run_cli

    from mimtrain.checkpoint import hub
    from mimtrain.checkpoint.encoder import load_encoder

    root, _, export = mae_run
    shards, out = root / "train" / "shards", root / "ft"
    run_cli("finetune", "--recipe", "recipes/finetune/tiny_cpu.yaml", "--from", str(export),
            f"data.train_shards={shards}", f"data.val_shards={shards}", f"output_dir={out}", "train.max_steps=2")
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["num_classes"] == 3 and cfg["label_names"] == ["class_0", "class_1", "class_2"]
    model = hub.from_pretrained(out / "final").eval()
    ref, _ = load_encoder(out / "final", new_head=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x), rtol=0, atol=1e-5)
    assert model.label_names == cfg["label_names"]


# ---------------------------------------------------------------------------------------------------- logging

def test_tensorboard_tracker_logs_scalars_and_the_resolved_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mimtrain.engine.logging import RunLogger

    log = RunLogger(tmp_path, log_with="tensorboard",
                    hparams={"train": {"batch_size": 4, "log_with": "tensorboard"}, "data": {"mean": [0.5, 0.5, 0.5]}})
    log.scalars(3, {"loss": 0.25, "lr": 1e-3, "step": 3})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 0.25)]
    hparams = "".join(p.read_text() for p in (tmp_path / "tensorboard").rglob("hparams.yml"))
    assert "train.batch_size: 4" in hparams and "data.mean: '[0.5, 0.5, 0.5]'" in hparams
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 0.25


def test_unknown_or_missing_tracker_is_refused(tmp_path):
    from accelerate.utils import is_wandb_available

    from mimtrain.config.pretrain import ConfigError
    from mimtrain.engine.logging import RunLogger

    with pytest.raises(ConfigError, match="one of"):
        RunLogger(tmp_path, log_with="tensorbored")
    if not is_wandb_available():
        with pytest.raises(ConfigError, match="not installed"):
            RunLogger(tmp_path, log_with="wandb")
