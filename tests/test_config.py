import pytest

from mimtrain.config.pretrain import (Config, ConfigError, derive, load_config, merge, parse_override, read_config,
                                      save_config)


def test_defaults_are_the_mae_vit_base_recipe():
    c = Config()
    assert (c.mask.ratio, c.method.norm_pix_loss, c.optim.blr, c.optim.betas) == (0.75, True, 1.5e-4, (0.9, 0.95))
    assert (c.method.decoder_depth, c.method.decoder_dim, c.train.epochs, c.optim.warmup_epochs) == (8, 512, 800, 40)


def test_unknown_key_is_an_error_with_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'; did you mean 'train.max_steps'"):
        load_config(None, ["train.max_step=20"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        merge(Config(), {"trian": {"epochs": 1}})


def test_wrong_types_are_errors():
    with pytest.raises(ConfigError, match="train.batch_size: expected int"):
        load_config(None, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match="expected a list of 2"):
        load_config(None, ["data.crop_scale=[0.2]"])
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(None, ["train=3"])


def test_recipe_overlay_inherit_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: 10}\noptim: {blr: 1.0e-3}\n")
    (tmp_path / "child.yaml").write_text("inherit: base.yaml\ntrain: {batch_size: 8}\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.epochs=3", "optim.warmup_epochs=1", "data.crop_scale=[0.5, 1]"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.blr, cfg.optim.warmup_epochs) == (3, 8, 1e-3, 1.0)
    assert cfg.data.crop_scale == (0.5, 1.0)
    save_config(cfg, tmp_path / "resolved.yaml", derived={"lr": 1.0})
    assert read_config(tmp_path / "resolved.yaml") == cfg


def test_parse_override_values_are_yaml():
    assert parse_override("encoder.kwargs={depth: 2}") == {"encoder": {"kwargs": {"depth": 2}}}
    with pytest.raises(ConfigError):
        parse_override("no_equals_sign")


def test_derived_lr_and_steps_in_one_place():
    cfg = load_config(None, ["train.batch_size=64", "train.grad_accum=2", "train.epochs=10",
                             "optim.warmup_epochs=2", "train.max_steps=7"])
    d = derive(cfg, world_size=4, samples_per_epoch=10_000)
    assert d.effective_batch == 512 and d.lr == pytest.approx(1.5e-4 * 512 / 256)
    assert (d.steps_per_epoch, d.total_steps, d.warmup_steps, d.stop_step) == (19, 190, 38, 7)
    assert d.micro_batches_per_epoch == 38
    with pytest.raises(ConfigError, match="smaller than one effective batch"):
        derive(cfg, world_size=4, samples_per_epoch=100)


def test_every_shipped_recipe_loads():
    """Each recipe folder is read with its own schema; a folder without one is an error, not a silent skip."""
    import pathlib

    from mimtrain.config.classify import load_eval_config
    from mimtrain.config.dense import load_dense_config

    loaders = {"pretrain": load_config, "finetune": lambda r: load_eval_config("finetune", r),
               "linprobe": lambda r: load_eval_config("linprobe", r), "knn": lambda r: load_eval_config("knn", r),
               "detect": lambda r: load_dense_config("detect", r), "segment": lambda r: load_dense_config("segment", r)}
    recipes = sorted(pathlib.Path(__file__).parents[1].glob("recipes/**/*.yaml"))
    assert len(recipes) > 40
    for recipe in recipes:
        loaders[recipe.parent.name](recipe)


def test_every_shipped_recipe_builds_its_encoder_method_and_masks():
    """Full-size models on the meta device (no memory, no init): names, mask units and method pairing are valid."""
    import pathlib

    import torch

    from mimtrain.methods import build_pretraining, mask_mode_for

    for recipe in sorted(pathlib.Path(__file__).parents[1].glob("recipes/pretrain/*.yaml")):
        cfg = load_config(recipe)
        with torch.device("meta"):
            method, svc = build_pretraining(cfg)
        assert svc.mode == method.encoder.mask_mode == mask_mode_for(cfg.method.name), recipe
        assert svc.grid == (cfg.data.img_size // method.encoder.mask_unit,) * 2, recipe
