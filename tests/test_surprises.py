"""Issue 19: no silent surprises. Overrides merge as recipes do, evaluation follows the source run, probes that
cannot train say so, a --cpu launch that would run one process is refused, summaries print once and above the
progress bar, and every bad input ends in one line naming the key, file or value (never a traceback)."""
import io
import os
import subprocess
import sys

import pytest
import torch
import yaml

from helpers import PY, REPO, TINY_VIT, make_test_shards, write_tiny_vit_checkpoint
from mimtrain import cli
from mimtrain.config.pretrain import ConfigError, derive, load_config, merge
from mimtrain.encoders import build_encoder
from mimtrain.config.classify import load_eval_config

TINY_RECIPE = REPO / "recipes/pretrain/mae_vit_tiny_cpu.yaml"  # kwargs {patch_size: 4, embed_dim: 96, depth: 4, ...}
VIT = TINY_VIT


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Labelled shards (3 classes: 24 train, 12 val) and a tiny ViT 'pretraining checkpoint' at 32 px with its own
    normalisation (model.safetensors + the resolved config.yaml, as the trainer writes them), and its export."""
    from mimtrain.checkpoint.export import export

    root = tmp_path_factory.mktemp("surprises")
    train = make_test_shards(root / "train", classes=3, per_class=8, shard_size=6)
    val = make_test_shards(root / "val", classes=3, per_class=4, shard_size=6)
    ckpt = write_tiny_vit_checkpoint(root / "ckpt", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]")
    exp = export(ckpt, root / "export")
    return {"root": root, "train": str(train), "val": str(val), "ckpt": ckpt, "export": exp}


def _one_line_error(capsys, argv, code=2) -> str:
    """Run the CLI in-process; it must exit with `code` and one stderr line, no traceback."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == code, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------- overrides that merge

def test_dotted_override_merges_into_the_recipes_kwargs():
    """Before: `encoder.kwargs.depth=2` left {depth: 2} alone (patch_size/embed_dim/num_heads silently dropped)."""
    recipe = load_config(TINY_RECIPE).encoder.kwargs
    assert recipe["embed_dim"] == 96
    for override in ("encoder.kwargs.depth=2", "encoder.kwargs={depth: 2}"):
        assert load_config(TINY_RECIPE, [override]).encoder.kwargs == {**recipe, "depth": 2}, override


def test_replacing_a_mapping_is_explicit_and_inheritance_uses_the_same_merge(tmp_path):
    assert load_config(TINY_RECIPE, ["encoder.kwargs!={depth: 2}"]).encoder.kwargs == {"depth": 2}
    (tmp_path / "child.yaml").write_text(f"inherit: {TINY_RECIPE}\nencoder:\n  kwargs: {{depth: 2}}\n")
    (tmp_path / "replace.yaml").write_text(f"inherit: {TINY_RECIPE}\nencoder:\n  kwargs!: {{depth: 2}}\n")
    by_override = load_config(TINY_RECIPE, ["encoder.kwargs.depth=2"])
    assert load_config(tmp_path / "child.yaml") == by_override  # one merge: recipes and overrides agree
    assert load_config(tmp_path / "replace.yaml").encoder.kwargs == {"depth": 2}
    with pytest.raises(ConfigError, match=r"train!: only mapping values"):
        load_config(None, ["train!={epochs: 1}"])
    # nested mappings merge too, and `k!` inside a mapping replaces that entry only
    nested = {"a": {"x": 1, "y": 2}}
    assert merge(load_config(), {"encoder": {"kwargs": nested}}).encoder.kwargs == nested
    cfg = load_config(None, ["encoder.kwargs={a: {x: 1, y: 2}}", "encoder.kwargs.a.x=3"])
    assert cfg.encoder.kwargs == {"a": {"x": 3, "y": 2}}
    cfg = load_config(None, ["encoder.kwargs={a: {x: 1, y: 2}}", "encoder.kwargs.a!={x: 3}"])
    assert cfg.encoder.kwargs == {"a": {"x": 3}}


# ------------------------------------------------------------------------------- evaluation follows the source run

def test_eval_takes_size_and_normalisation_from_the_source(world, capsys):
    """Before: knn/linprobe/finetune --from a 32 px run used 224 px and ImageNet's mean/std."""
    from mimtrain.eval.classify.source import source_preprocessing
    from mimtrain.eval.classify.knn import knn

    want = {"img_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    assert source_preprocessing(str(world["ckpt"])) == want
    assert source_preprocessing(str(world["export"])) == want  # the export carries the run's normalisation
    out = world["root"] / "knn"
    cfg = load_eval_config("knn", None, [f"data.train_shards={world['train']}", f"data.val_shards={world['val']}",
                                         f"output_dir={out}", "data.num_workers=0", "knn.k=5"])
    assert cfg.data.img_size is None and cfg.data.mean is None  # unset: "the source's"
    knn(cfg, str(world["export"]))
    saved = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (saved["img_size"], saved["mean"], saved["std"]) == (32, want["mean"], want["std"])
    captured = capsys.readouterr()
    assert "img_size 32 (the source)" in captured.out
    assert "k-NN bank" in captured.err  # the feature passes show progress (tqdm, stderr)
    # given on the command line: the user's value wins
    cfg = load_eval_config("knn", None, [f"data.train_shards={world['train']}", f"data.val_shards={world['val']}",
                                         f"output_dir={out}", "data.num_workers=0", "data.img_size=64",
                                         "overwrite=true"])  # every command refuses a used output_dir otherwise
    knn(cfg, str(world["export"]))
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["img_size"] == 64


def test_workers_default_to_what_the_machine_has(monkeypatch):
    """Before: 8 DataLoader workers whatever the machine (a 2-core laptop included)."""
    from mimtrain.config.pretrain import default_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert default_workers() == 2
    from mimtrain.config.dense import load_dense_config

    assert load_eval_config("knn").data.num_workers == 2 and load_config().data.num_workers == 2
    assert load_dense_config("segment").data.num_workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_workers() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes share the node's 16 CPUs
    assert default_workers() == 2


# ----------------------------------------------------------------------------------------- probes that can train

def test_head_budget_follows_the_real_schedule():
    """The warning's lr sum is checked against timm's scheduler as the probe builds it (an independent count)."""
    from mimtrain.engine.optim import build_schedule
    from mimtrain.eval.classify.linprobe import scheduled_lrs

    cfg = load_eval_config("linprobe", None, ["train.epochs=7", "train.batch_size=8", "optim.warmup_epochs=2",
                                              "optim.min_lr=0.01", "train.max_steps=50"])
    d = derive(cfg, 1, 80)  # 10 steps an epoch: 20 warm-up, 70 in the schedule, stop at 50
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=d.lr)
    sched = build_schedule(opt, d, cfg.optim)
    ref = []
    for step in range(d.stop_step):
        sched.step_update(step)
        ref.append(opt.param_groups[0]["lr"])
    assert torch.allclose(scheduled_lrs(d, cfg.optim.min_lr), torch.tensor(ref, dtype=torch.float64), atol=1e-9)


def test_tiny_probe_recipe_trains_and_short_schedules_warn(world, capsys):
    """Before: recipes/linprobe/tiny_cpu.yaml gave its head 12 steps at lr 0.0016 and scored at or below chance
    (0-25% on 3 classes), silently."""
    from mimtrain.eval.classify.linprobe import linprobe

    common = [f"data.train_shards={world['train']}", f"data.val_shards={world['val']}"]
    res = linprobe(load_eval_config("linprobe", "recipes/linprobe/tiny_cpu.yaml",
                                    [*common, f"output_dir={world['root'] / 'lp'}"]), str(world["export"]))
    assert res["top1"] > 100 / 3 + 20, res  # well above chance (100% measured)
    assert "warning" not in capsys.readouterr().err
    linprobe(load_eval_config("linprobe", "recipes/linprobe/tiny_cpu.yaml",
                              [*common, f"output_dir={world['root'] / 'lp_short'}", "optim.lr=0", "train.epochs=2"]),
             str(world["export"]))
    assert "linear probe schedule too short for the head to train" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- launches and printing

def test_cpu_launch_of_several_processes_is_refused(monkeypatch):
    """Before: `accelerate launch --cpu --num_processes 2` trained one process (world_size 1), silently."""
    from mimtrain.engine.distributed import refuse_cpu_launch

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = [PY, "/x/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "mimtrain", "pretrain"]
    with pytest.raises(ConfigError, match=r"accelerate launch --multi_gpu --num_processes 2 -m mimtrain pretrain"):
        refuse_cpu_launch(argv)
    with pytest.raises(ConfigError, match=r"--num_processes 3"):
        refuse_cpu_launch([PY, "-m", "accelerate.commands.launch", "--cpu", "--num_processes=3", "-m", "mimtrain"])
    refuse_cpu_launch([PY, "/x/bin/accelerate", "launch", "--cpu", "--num_processes=1", "-m", "mimtrain"])
    refuse_cpu_launch([PY, "/x/bin/torchrun", "--nproc_per_node", "2", "-m", "mimtrain"])  # not accelerate's
    monkeypatch.setenv("WORLD_SIZE", "2")  # a real multi-process launch
    refuse_cpu_launch(argv)


def test_cpu_launch_refused_through_accelerate(world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([PY, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m", "mimtrain",
                           "pretrain", "--recipe", str(TINY_RECIPE), f"data.train_shards={world['train']}",
                           f"output_dir={tmp_path / 'run'}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "starts ONE process" in proc.stderr and "--multi_gpu --num_processes 2" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_summary_prints_on_the_main_process_only(monkeypatch, capsys):
    """Before: `done:` was printed once per process."""
    import mimtrain.engine.trainer as trainer

    summary = {"losses": [1.0, 0.5], "step": 2, "skipped": 0, "output_dir": "o", "tensorboard": "o/tb"}
    monkeypatch.setattr(trainer, "pretrain", lambda cfg: summary)
    monkeypatch.setenv("RANK", "1")
    cli.main(["pretrain"])
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    cli.main(["pretrain"])
    assert "done: step 2" in capsys.readouterr().out


def test_eval_lines_go_above_the_progress_bar(monkeypatch):
    """Before: acc.print wrote the validation line into the middle of the running bar's line."""
    from tqdm import tqdm

    from mimtrain.engine.rundir import TaskRun

    class Main:
        is_main_process = True

    run = object.__new__(TaskRun)  # only its `say`: no run directory needed
    run.acc = Main()

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    bar = tqdm(total=10, file=out, desc="finetune", ascii=True)
    bar.update(3)
    run.say("epoch 1 step 3: top1 50.00")
    bar.close()
    text = out.getvalue()
    before = text.split("epoch 1 step 3")[0]
    assert before.endswith("\r"), repr(text)  # the bar was cleared first, so the line stands on its own
    assert "3/10" in text.split("epoch 1 step 3")[1]  # ... and redrawn below it


# ---------------------------------------------------------------------------------------- one clear line, no trace

def test_bench_recipe_with_unquoted_mapping_is_one_line(capsys):
    err = _one_line_error(capsys, ["bench", "--recipe", f"{TINY_RECIPE} encoder.kwargs={{embed_dim: 24}}"])
    assert "'24}' is not a key=value override" in err and "encoder.kwargs={embed_dim: 24}" in err
    err = _one_line_error(capsys, ["pretrain", "encoder.kwargs={embed_dim:"])
    assert "not valid YAML" in err and "line 1" in err


def test_encoder_kwargs_typo_names_key_and_encoder(world, capsys, tmp_path):
    err = _one_line_error(capsys, ["pretrain", "--recipe", str(TINY_RECIPE), f"data.train_shards={world['train']}",
                                   "encoder.kwargs.embed_dimm=24", f"output_dir={tmp_path / 'run'}"])
    assert "mim_vit_tiny_patch16 has no argument 'embed_dimm'" in err and "encoder.kwargs" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_recipe_file_errors_name_the_file(tmp_path, capsys):
    (tmp_path / "orphan.yaml").write_text("inherit: missing_parent.yaml\n")
    err = _one_line_error(capsys, ["pretrain", "--recipe", str(tmp_path / "orphan.yaml")])
    assert "inherit: missing_parent.yaml not found" in err and str(tmp_path / "missing_parent.yaml") in err
    (tmp_path / "broken.yaml").write_text("train:\n  epochs: 3\n batch_size: [1\n")
    err = _one_line_error(capsys, ["pretrain", "--recipe", str(tmp_path / "broken.yaml")])
    assert "broken.yaml: not valid YAML: line 3" in err
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    err = _one_line_error(capsys, ["pretrain", "--recipe", str(tmp_path / "a.yaml")])
    assert "inherit cycle" in err and "a.yaml -> " in err


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=0", "train.batch_size must be > 0, got 0"),
    ("train.grad_accum=-1", "train.grad_accum must be > 0"),
    ("train.log_every=0", "train.log_every must be > 0"),
    ("train.ckpt_every=0", "train.ckpt_every must be > 0"),
    ("train.max_steps=-5", "train.max_steps must be >= 0, got -5"),
    ("data.crop_scale=[1.5, 0.1]", "data.crop_scale must be [lo, hi] with lo <= hi, each in (0, 1]"),
    ("mask.ratio=1.0", "mask.ratio must be in (0, 1)"),
])
def test_out_of_range_values_are_refused_before_any_work(override, message, capsys):
    """Before: ZeroDivisionError (some after training started), the whole schedule for max_steps<0, a worker error
    for crop_scale. The shards do not even exist: values are checked first."""
    err = _one_line_error(capsys, ["pretrain", "data.train_shards=/nonexistent/shards", override])
    assert message in err
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_eval_config("finetune", None, [override]) if not override.startswith(("mask", "train.ckpt")) else \
            load_config(None, [override])


def test_mask_ratio_that_hides_nothing_is_refused(world, capsys, tmp_path):
    """Before: mask.ratio=0.005 on a 4x4 grid rounded to 0 hidden units, then NaN loss at step 1."""
    from mimtrain.config.pretrain import MaskConfig
    from mimtrain.masking import MaskingService

    enc = build_encoder("mim_vit_tiny_patch16", 32, num_classes=0, **VIT)
    with pytest.raises(ValueError, match=r"hides 0 of the 16 mask units .* \[1/16, 15/16\]"):
        MaskingService.for_encoder(enc, 32, MaskConfig(ratio=0.005), 0)
    assert MaskingService.for_encoder(enc, 32, MaskConfig(ratio=1 / 16), 0).n_hidden == 1
    err = _one_line_error(capsys, ["pretrain", "--recipe", str(TINY_RECIPE), f"data.train_shards={world['train']}",
                                   "mask.ratio=0.005", f"output_dir={tmp_path / 'run'}"])
    assert "mask.ratio=0.005 hides 0 of the 64 mask units" in err


def test_make_shards_zero_shard_size_is_refused(capsys, tmp_path):
    """Before: accepted, then a ZeroDivisionError once the first sample was written. Now argparse's usage and one
    error line, before the source is read."""
    with pytest.raises(SystemExit) as e:
        cli.main(["make-shards", str(tmp_path), str(tmp_path / "out"), "--shard-size", "0"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == "mimtrain make-shards: error: argument --shard-size: must be > 0, got 0"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- help and version

def test_help_points_at_what_exists_and_version(capsys):
    for kind in ("knn", "linprobe", "finetune", "detect", "segment"):
        with pytest.raises(SystemExit):
            cli.main([kind, "--help"])
        for word in capsys.readouterr().out.replace("\n", " ").split():
            word = word.lstrip("(")
            if word.startswith("recipes/"):
                assert (REPO / word.split("...")[0].rstrip("/;,)")).exists(), (kind, word)
    proc = subprocess.run([PY, "-m", "mimtrain", "--version"], cwd=REPO, capture_output=True, text=True, timeout=120)
    from importlib.metadata import version
    assert proc.returncode == 0 and proc.stdout.strip() == f"mimtrain {version('mimtrain')}"


def test_docs_cite_papers_not_seed_files():
    """Encoder docs named `shared/seeds/00x_<hash>.txt`, files that are not in the repository."""
    import re

    seed_file = re.compile(r"seeds/|\b\d{3}_[0-9a-f]{16}\.txt")
    offenders = [str(p.relative_to(REPO)) for p in [*REPO.glob("docs/**/*.md"), REPO / "README.md"]
                 if seed_file.search(p.read_text())]
    assert not offenders
    for name, arxiv in (("hivit", "2205.14949"), ("gpvit", "2212.06795"), ("gcvit", "2206.09959"),
                        ("dgt", "2203.03937"), ("glnet", "2411.14429")):
        assert f"arXiv:{arxiv}" in (REPO / "docs/encoders" / f"{name}.md").read_text(), name
