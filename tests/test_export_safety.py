"""`mimtrain export` never lands in another writer's folder (issue 27, item 6): a non-empty folder only with
--overwrite (and then only the export's files change), never a run directory, a checkpoint (`step-N`, `latest`) or
a folder inside another run; each refusal is one line, exit 2, and leaves every file byte-identical."""
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_MAE, make_test_shards
from mimtrain import cli
from mimtrain.checkpoint.encoder import load_encoder
from mimtrain.checkpoint.export import ExportTargetError, export
from mimtrain.checkpoint.state import Checkpoints


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-step tiny MAE pretraining run with a checkpoint at each step (the real CLI, in-process), and its export."""
    root = tmp_path_factory.mktemp("export_safety")
    shards = make_test_shards(root / "data", classes=2, per_class=4, shard_size=4)
    run = root / "run"
    cli.main(["pretrain", *TINY_MAE, f"data.train_shards={shards}", f"output_dir={run}", "data.num_workers=0",
              "train.max_steps=2", "train.ckpt_every=1", "train.image_every=0"])
    steps = Checkpoints(run).steps()
    assert [p.name for p in steps] == ["step-00000002", "step-00000001"]
    exp = root / "export"
    cli.main(["export", str(run), str(exp)])
    return {"root": root, "run": run, "export": exp, "newest": steps[0]}


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under `root` -> a digest of its bytes ("dir" for a folder): equal trees are
    byte-identical and hold the same names."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _refused(capsys, *argv: str) -> str:
    """Run `mimtrain export ARGV` in-process: it must exit 2 with one stderr line and no traceback."""
    with pytest.raises(SystemExit) as e:
        cli.main(["export", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_non_empty_folder_is_refused_without_overwrite(world, capsys):
    mine = world["root"] / "mine"
    mine.mkdir(exist_ok=True)
    (mine / "notes.txt").write_text("my own file\n")
    before = _tree(world["root"])
    assert "is not empty (a folder holding notes.txt)" in _refused(capsys, str(world["run"]), str(mine))
    err = _refused(capsys, str(world["run"]), str(world["export"]))  # another export: the same rule
    assert "is not empty (an export holding" in err and "--overwrite" in err
    assert _tree(world["root"]) == before


def test_overwrite_replaces_the_export_files_and_nothing_else(world, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("my own file\n")
    (target / "encoder.safetensors").write_bytes(b"an older, broken export")
    cli.main(["export", str(world["run"]), str(target), "--overwrite"])
    assert (target / "notes.txt").read_text() == "my own file\n"
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "config.yaml", "encoder.safetensors",
                                                        "model.safetensors", "notes.txt"]  # no staging folder left
    want, got = load_file(str(world["export"] / "encoder.safetensors")), load_file(str(target / "encoder.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (target / "config.yaml").read_text() == (world["export"] / "config.yaml").read_text()
    load_encoder(target, num_classes=0)  # a whole export again


def test_run_directories_are_refused_even_with_overwrite(world, capsys, tmp_path):
    other = tmp_path / "other_run"
    shutil.copytree(world["run"], other)
    before = _tree(world["root"]), _tree(tmp_path)
    run = str(world["run"])
    assert "is a run" in _refused(capsys, run, run, "--overwrite")
    assert "is a run" in _refused(capsys, run, str(other), "--overwrite")
    assert "is a run" in _refused(capsys, str(world["export"]), str(other), "--overwrite")
    assert "inside another run" in _refused(capsys, run, str(other / "export"))
    assert "is tensorboard/ of the run" in _refused(capsys, run, str(world["run"] / "tensorboard"), "--overwrite")
    assert (_tree(world["root"]), _tree(tmp_path)) == before


@pytest.mark.parametrize("fmt", ["mimtrain", "timm-vit", "hf"])
def test_newest_checkpoint_is_refused_and_resume_still_takes_it(world, capsys, fmt):
    newest = world["newest"]
    before = _tree(world["root"])
    for src in (world["run"], world["export"]):  # the run itself, or another source
        err = _refused(capsys, str(src), str(newest), "--overwrite", "--format", fmt)
        assert "a training checkpoint" in err or "is the source being exported" in err, err
    assert "inside a training checkpoint" in _refused(capsys, str(world["export"]), str(newest / "sub"))
    assert _tree(world["root"]) == before
    # What resume=auto takes (the newest checkpoint that verifies) is still that one, with nothing rejected.
    assert Checkpoints(world["run"]).newest_complete() == (newest, [])


def test_latest_pointer_and_checkpoints_folder_are_refused(world, capsys):
    ckpts = world["run"] / "checkpoints"
    before = _tree(world["root"])
    _refused(capsys, str(world["export"]), str(ckpts / "latest"), "--overwrite")
    assert "holds the source being exported" in _refused(capsys, str(world["run"]), str(ckpts), "--overwrite")
    assert "inside another run" in _refused(capsys, str(world["export"]), str(ckpts), "--overwrite")
    assert "inside checkpoints/ of the run" in _refused(capsys, str(world["run"]), str(ckpts / "export"))
    with pytest.raises(ExportTargetError, match="inside another run|inside checkpoints/"):  # the function, no CLI
        export(world["export"], ckpts / "latest", overwrite=True)
    assert _tree(world["root"]) == before
    assert Checkpoints(world["run"]).newest_complete() == (world["newest"], [])


def test_a_folder_of_its_own_beside_the_run_files_is_allowed(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = _tree(run)
    export(run, run / "export")  # runs/X/export: the run's own files are untouched
    assert {k: v for k, v in _tree(run).items() if not k.startswith("export")} == before
    assert Checkpoints(run).newest_complete()[0].name == world["newest"].name
