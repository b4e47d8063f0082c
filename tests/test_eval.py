"""Evaluation on CPU with tiny encoders: export/load round trip, strict loading errors, timm-style ViT weights,
fine-tune / linear probe / k-NN runs, and layer-wise lr decay groups for every registered encoder."""
import json
import math

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import mimtrain.encoders  # noqa: F401  (registers the encoders)
from helpers import TINY_MAE, make_test_shards, run_cli
from mimtrain.encoders import build_encoder
from mimtrain.encoders.base import classifier_keys
from mimtrain.engine.optim import layer_decay_groups
from mimtrain.config.classify import load_eval_config
from mimtrain.checkpoint.encoder import LoadError, load_encoder
from mimtrain.eval.classify.knn import knn
from mimtrain.features import knn_classify
from mimtrain.eval.classify.linprobe import linprobe

VIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
HIVIT = {"dims": [16, 32, 64], "depths": [1, 1, 2], "num_heads": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    train = make_test_shards(root / "train", classes=3, per_class=8, shard_size=6)
    val = make_test_shards(root / "val", classes=3, per_class=4, shard_size=6)
    return {"root": root, "train": str(train), "val": str(val)}


@pytest.fixture(scope="module")
def pretrained(data):
    """A 2-step MAE pretraining run of a tiny ViT (the real CLI), and its export."""
    run = data["root"] / "mae"
    run_cli("pretrain", *TINY_MAE, f"data.train_shards={data['train']}", f"output_dir={run}", "data.num_workers=0",
            "train.max_steps=2", "train.image_every=0")
    export = data["root"] / "export"
    run_cli("export", str(run), str(export))
    return run, export


def _probe_cfg(kind, data, out, *extra):
    recipe = {"finetune": "recipes/finetune/tiny_cpu.yaml", "linprobe": "recipes/linprobe/tiny_cpu.yaml"}.get(kind)
    return load_eval_config(kind, recipe, [f"data.train_shards={data['train']}", f"data.val_shards={data['val']}",
                                           f"output_dir={out}", "data.img_size=32", "data.num_workers=0", *extra])


def test_export_round_trip_gives_identical_features(pretrained):
    run, export = pretrained
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    meta = yaml.safe_load((export / "config.yaml").read_text())["encoder"]
    assert meta["name"] == "mim_vit_tiny_patch16" and meta["kwargs"] == VIT
    assert (meta["img_size"], meta["mask_unit"], meta["mask_mode"]) == (32, 8, "drop")
    # reference: the encoder part of the method's state dict, loaded by hand
    ref = build_encoder("mim_vit_tiny_patch16", 32, num_classes=0, **VIT)
    ref.load_state_dict({k[8:]: v for k, v in load_file(str(ckpt / "model.safetensors")).items()
                         if k.startswith("encoder.")})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.eval().forward_features(x)
        for src in (run, ckpt, export):  # run dir (latest), checkpoint dir, export dir
            model, _ = load_encoder(src, num_classes=0)
            assert torch.equal(model.eval().forward_features(x), want), src
    assert set(load_file(str(export / "encoder.safetensors"))) == set(ref.state_dict())


def test_architecture_mismatch_is_refused_naming_both(tmp_path, data, pretrained):
    base = build_encoder("hivit_base", 32, num_classes=0, **HIVIT)
    exp = tmp_path / "hivit_base_export"
    exp.mkdir()
    save_file(base.state_dict(), str(exp / "encoder.safetensors"))
    spec = {"name": "hivit_base", "kwargs": HIVIT, "img_size": 32, "mask_unit": 16, "mask_mode": "drop"}
    (exp / "config.yaml").write_text(yaml.safe_dump({"encoder": spec}))
    with pytest.raises(LoadError, match=r"hivit_base .* asks for hivit_small"):
        load_encoder(exp, name="hivit_small")
    # a plain state dict of a wider model: every differing tensor is named with both shapes
    plain = tmp_path / "hivit_base.safetensors"
    save_file(base.state_dict(), str(plain))
    small = {"dims": [8, 16, 32], "depths": [1, 1, 2], "num_heads": 2}
    with pytest.raises(LoadError, match=r"into hivit_small .*differ in shape, e.g. .*checkpoint \[.*\] vs model"):
        load_encoder(plain, name="hivit_small", kwargs=small, img_size=32)
    # through the CLI: one clear line, exit code 2, before any training
    proc = run_cli("linprobe", "--recipe", "recipes/linprobe/tiny_cpu.yaml", "--from", str(exp),
                   "encoder.name=hivit_small", f"data.train_shards={data['train']}", f"data.val_shards={data['val']}",
                   f"output_dir={tmp_path / 'refused'}", check=False, timeout=120)
    assert proc.returncode == 2 and "architecture mismatch" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "refused" / "results.json").exists()


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = build_encoder("mim_vit_tiny_patch16", 32, num_classes=0, **VIT).state_dict()
    sd.pop("vit.blocks.1.mlp.fc2.weight")
    sd["vit.blocks.9.extra"] = torch.zeros(1)
    f = tmp_path / "partial.safetensors"
    save_file(sd, str(f))
    with pytest.raises(LoadError) as err:
        load_encoder(f, name="mim_vit_tiny_patch16", kwargs=VIT, img_size=32)
    msg = str(err.value)
    assert "missing from the checkpoint: vit.blocks.1.mlp.fc2.weight" in msg
    assert "not in the model: vit.blocks.9.extra" in msg
    with pytest.raises(LoadError, match="plain state dict with no config: set encoder.name"):
        load_encoder(f)


def test_official_mae_style_vit_state_dict_is_accepted(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()
    sd = dict(ref.state_dict())
    sd["decoder_embed.weight"] = torch.zeros(16, 32)  # MAE pretraining checkpoints carry the decoder ...
    sd["mask_token"] = torch.zeros(1, 1, 16)  # ... and its mask token
    f = tmp_path / "mae_pretrain_vit.pth"
    torch.save({"model": sd, "epoch": 799}, f)
    model, _ = load_encoder(f, name="mim_vit_tiny_patch16", kwargs=VIT, img_size=32, num_classes=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval().forward_cls(x), ref.forward_features(x)[:, 0], atol=1e-6)
    # Into a classifier: the final norm, which MAE's head bypasses, is dropped on load; the blocks are the same.
    classifier, _ = load_encoder(f, name="mim_vit_tiny_patch16", kwargs=VIT, img_size=32, num_classes=5)
    with torch.no_grad():
        torch.testing.assert_close(classifier.eval().forward_intermediates(x, indices=[0], intermediates_only=True)[0],
                                   model.forward_intermediates(x, indices=[0], intermediates_only=True)[0])
    model64, _ = load_encoder(f, name="mim_vit_tiny_patch16", kwargs=VIT, img_size=64, num_classes=0)
    assert model64.vit.pos_embed.shape[1] == 1 + 64  # 4x4 grid resized to 8x8, class token kept


def test_position_tables_resize_to_the_evaluation_resolution(tmp_path):
    hivit = build_encoder("hivit_tiny", 32, num_classes=0, **HIVIT)
    f = tmp_path / "hivit.safetensors"
    save_file(hivit.state_dict(), str(f))
    model, _ = load_encoder(f, name="hivit_tiny", kwargs=HIVIT, img_size=64, num_classes=3)
    assert model.pos_embed.shape[0] == 16 and model.forward(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    swin_kw = {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4], "window_size": 2}
    swin = build_encoder("simmim_swin_tiny_patch4_window6", 64, **swin_kw)
    f = tmp_path / "swin.safetensors"
    save_file({k: v for k, v in swin.state_dict().items()}, str(f))
    model, _ = load_encoder(f, name="simmim_swin_tiny_patch4_window6", kwargs=swin_kw, img_size=64,
                            window_size=4, num_classes=3)  # larger windows: bias tables resized
    assert model.forward(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_finetune_runs_and_writes_results(pretrained, data, tmp_path):
    _, export = pretrained
    out = tmp_path / "ft"
    stdout = run_cli("finetune", "--recipe", "recipes/finetune/tiny_cpu.yaml", "--from", str(export),
                     f"data.train_shards={data['train']}", f"data.val_shards={data['val']}", f"output_dir={out}",
                     "train.max_steps=3", "finetune.ema=true", "finetune.ema_decay=0.5").stdout
    assert "top-1" in stdout and "top-5 n/a" in stdout  # 3 classes: top-5 is not applicable, not 100%
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "finetune" and res["num_classes"] == 3 and res["step"] == 3 and res["num_val"] == 12
    assert 0 <= res["top1"] <= 100 and res["top5"] is None and "ema_top1" in res
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in recs) and any("val/top1" in r for r in recs)
    assert (out / "tensorboard").is_dir() and (out / "final" / "encoder.safetensors").is_file()
    model, _ = load_encoder(out / "final", new_head=False)  # the fine-tuned classifier reloads strictly, head too
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("cached", [False, True])
def test_linprobe_runs_and_writes_results(pretrained, data, tmp_path, cached):
    run, _ = pretrained
    cfg = _probe_cfg("linprobe", data, tmp_path / "lp", "train.max_steps=3", f"linprobe.cache_features={cached}")
    res = linprobe(cfg, str(run))
    saved = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert saved == res and res["pool"] == "cls" and res["num_val"] == 12 and res["step"] == 3
    assert 0 <= res["top1"] <= 100


def test_knn_separable_toy_set_is_perfect():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 16) * 10
    labels = torch.arange(4).repeat_interleave(25)
    train = centers[labels] + torch.randn(100, 16, generator=g)
    test = centers[labels] + torch.randn(100, 16, generator=g)
    scores = knn_classify(train, labels, test, n_cls=4, k=20, temperature=0.07)
    assert (scores.argmax(1) == labels).all()


def test_knn_command_on_shards(pretrained, data, tmp_path):
    run, _ = pretrained
    res = knn(_probe_cfg("knn", data, tmp_path / "knn", "knn.k=5"), str(run))
    assert res["num_train"] == 24 and res["num_val"] == 12 and 0 <= res["top1"] <= 100
    assert json.loads((tmp_path / "knn" / "results.json").read_text())["k"] == 5


def _registered() -> list[str]:
    return sorted(n for n in timm.list_models() if n.startswith(("mim_", "hivit", "simmim_", "gpvit", "dgt", "glnet")))


@pytest.mark.parametrize("name", _registered())
def test_layer_decay_groups_cover_every_parameter_once(name):
    """Every trainable parameter in one group; the scales are decay^(L + 1 - i) for layers i = 0..L + 1, each
    layer non-empty; the classifier (`classifier_keys`) at the full lr. The layer-by-layer reference per encoder is
    in tests/test_layer_decay.py."""
    decay = 0.75
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=10)
    groups = layer_decay_groups(model, 0.05, decay)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(grouped) == len(set(grouped))
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    exponents = sorted({round(math.log(s, decay)) for s in scale.values()})
    assert exponents[-1] >= 3 and exponents == list(range(exponents[-1] + 1)), "one scale per layer, none empty"
    head = [n for n in scale if n.startswith(classifier_keys(model))]
    assert head and all(scale[n] == 1.0 for n in head), "the head trains at the full lr"


def test_pretraining_knn_monitor_and_the_knn_command_agree(pretrained, data, tmp_path):
    """One k-NN implementation (`features`): the monitor's number during pretraining is `mimtrain knn`'s on the
    same weights, with the same defaults (k=20, T=0.07, evaluation crop, the run's size and normalisation)."""
    import dataclasses

    from accelerate import Accelerator

    from mimtrain.config.pretrain import read_config
    from mimtrain.engine.monitor import KnnMonitor

    run, _ = pretrained
    cfg = read_config(run / "config.yaml")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, knn_every=1), data=dataclasses.replace(
        cfg.data, knn_train_shards=data["train"], val_shards=data["val"]))
    acc = Accelerator(cpu=True)
    monitor = KnnMonitor(cfg, acc)
    encoder, _ = load_encoder(str(run))

    class Method(torch.nn.Module):  # the monitor reads `method.encoder`, as from the trainer's MAE / SimMIM
        def __init__(self):
            super().__init__()
            self.encoder = encoder

    logged = {}

    class Log:
        def scalars(self, step, values):
            logged.update(values)

    monitor(1, Method(), acc, Log())
    res = knn(_probe_cfg("knn", data, tmp_path / "knn"), str(run))
    assert logged["knn/top1"] == pytest.approx(res["top1"]) and res["k"] == 20
