"""Every training command runs the one loop (engine.fit) and is as safe to leave running as pretraining:

- a signal (SIGTERM, SIGUSR1, SIGINT, SIGHUP) writes a checkpoint at the next step and the command exits 0;
- killed (kill -9; in-process: the loop's test hook raising at the same point), `resume=auto` continues, and the
  final weights, the metrics rows and results.json equal an uninterrupted run's (max weight difference <= 1e-6);
- a used output_dir, a concurrent run, and an output_dir in a source, run, checkpoint or export are refused with
  one line before anything is written (every file byte-identical).

One interrupted run per task does both: signal at step A (checkpoint A + 1, exit 0), resume killed after step B
(rows after the last checkpoint already logged), resume to the end; compared with a straight run.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from helpers import PY, REPO, TINY_MAE, make_test_shards
from mimtrain import cli
from mimtrain.engine.fit import SIGNAL_ENV, Killed
from test_dense import _export, write_ade, write_coco

TIMING = {"images_per_sec", "data_wait_frac"}  # wall-clock figures: the only fields two equal runs may differ in


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    shards = make_test_shards(root)  # 3 classes x 8 images, 32 px
    pre = root / "pre"
    cli.main(["pretrain", *TINY_MAE, f"data.train_shards={shards}", f"output_dir={pre}", "train.max_steps=2",
              "data.num_workers=0", "train.image_every=0"])
    write_coco(root / "coco", "train2017", 6, seed=0)
    write_coco(root / "coco", "val2017", 2, seed=1)
    write_ade(root / "ade")
    return {"root": root, "shards": shards, "pre": pre, "dense": _export(root, "swin", 32)}


def _argv(task: str, w: dict, out: Path) -> list[str]:
    """The command line of `task` (a few steps of its tiny recipe) into `out`."""
    data = [f"data.train_shards={w['shards']}", f"data.val_shards={w['shards']}"]
    if task == "pretrain":
        return ["pretrain", *TINY_MAE, f"data.train_shards={w['shards']}", f"output_dir={out}", "data.num_workers=0",
                "train.max_steps=8", "train.ckpt_every=4", "train.log_every=3", "train.image_every=0"]
    if task == "finetune":  # Mixup + CutMix, RandAugment, random erasing, drop path 0.1 (the recipe's) and an EMA
        return ["finetune", "--recipe", "recipes/finetune/tiny_cpu.yaml", "--from", str(w["pre"]), *data,
                f"output_dir={out}", "finetune.ema=true", "finetune.ema_decay=0.9", "train.ckpt_every=4",
                "train.log_every=3", "train.keep_last=1"]
    if task.startswith("linprobe"):
        cached = task == "linprobe_cached"
        return ["linprobe", "--recipe", "recipes/linprobe/tiny_cpu.yaml", "--from", str(w["pre"]), *data,
                f"output_dir={out}", f"linprobe.cache_features={str(cached).lower()}",
                f"train.epochs={4 if cached else 2}", f"train.ckpt_every={4 if cached else 2}",
                f"train.log_every={3 if cached else 1}"]
    if task == "detect":  # 6 images, 3 steps an epoch: the signal's checkpoint (step 2) is inside the first epoch
        return ["detect", "--recipe", "recipes/detect/tiny_cpu.yaml", "--from", str(w["dense"]),
                f"data.root={w['root'] / 'coco'}", f"output_dir={out}", "train.epochs=2", "train.max_steps=4",
                "train.ckpt_every=2"]
    return ["segment", "--recipe", "recipes/segment/tiny_cpu.yaml", "--from", str(w["dense"]),
            f"data.root={w['root'] / 'ade'}", f"output_dir={out}", "train.iters=4", "train.ckpt_every=2",
            "train.eval_every=3"]


# task -> (signal, the step after which it arrives, the step after which the resumed run is killed, stop step)
PLANS = {"pretrain": ("HUP", 2, 6, 8), "finetune": ("TERM", 3, 9, 12), "linprobe_cached": ("USR1", 3, 9, 12),
         "linprobe_streamed": ("INT", 1, 5, 6), "detect": ("HUP", 1, 3, 4), "segment": ("TERM", 1, 3, 4)}
REAL_KILL = {"pretrain", "finetune"}  # killed by a real SIGKILL in a subprocess; the others in-process


def _run(argv: list[str], monkeypatch, hook: str = "") -> None:
    with monkeypatch.context() as m:
        if hook:
            m.setenv(SIGNAL_ENV, hook)
        cli.main(argv)  # returns: exit status 0


def _straight(w: dict, task: str, monkeypatch) -> Path:
    """The uninterrupted run of `task` (made once per module, shared by the tests that need it)."""
    out = w["root"] / f"{task}_straight"
    if not (out / "checkpoints").exists():
        _run(_argv(task, w, out), monkeypatch)
    return out


def _latest(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict:
    ckpt = _latest(out)
    found = {f.name: load_file(str(f)) for f in ckpt.glob("*.safetensors")}
    return {f"{name}/{k}": v for name, sd in found.items() for k, v in sd.items()}


@pytest.mark.parametrize("task", list(PLANS))
def test_signal_then_kill_then_resume_equals_an_uninterrupted_run(world, task, monkeypatch, capsys):
    sig, at, kill_at, stop = PLANS[task]
    straight, cut = _straight(world, task, monkeypatch), world["root"] / f"{task}_cut"

    _run(_argv(task, world, cut), monkeypatch, hook=f"{at}:{sig}")  # a signal: checkpoint at the next step, exit 0
    assert _latest(cut).name == f"step-{at + 1:08d}" and not (cut / "results.json").exists()
    assert "continue with" in capsys.readouterr().out

    argv = _argv(task, world, cut) + ["resume=auto"]
    if task in REAL_KILL:  # kill -9 of a real process, right after step kill_at
        proc = subprocess.run([PY, "-m", "mimtrain", *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, SIGNAL_ENV: f"{kill_at}:KILL", "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == -9, proc.stderr[-2000:]
    else:
        with pytest.raises(Killed):
            _run(argv, monkeypatch, hook=f"{kill_at}:die")
    saved = int(_latest(cut).name[5:])
    assert saved < kill_at and max(r["step"] for r in _rows(cut)) > saved  # rows the resumed run must not repeat

    _run(argv, monkeypatch)
    assert f"at step {saved}" in capsys.readouterr().out
    a, b = _weights(straight), _weights(cut)
    assert a.keys() == b.keys() and a
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert diff <= 1e-6, diff
    rows = _rows(cut)
    assert rows == _rows(straight)
    train_steps = [r["step"] for r in rows if "lr" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == stop  # no step logged twice
    if task != "pretrain":
        assert json.loads((cut / "results.json").read_text()) == json.loads((straight / "results.json").read_text())
    if task == "finetune":  # the best validation top-1's checkpoint is kept beside the latest (keep_last=1)
        res = json.loads((cut / "results.json").read_text())
        assert (cut / res["best"]["checkpoint"]).is_dir() and (cut / res["last"]["checkpoint"]).is_dir()
        for export in ("best", "final"):  # the classifier exports of both, as the uninterrupted run wrote them
            x, y = (load_file(str(o / export / "encoder.safetensors")) for o in (straight, cut))
            assert x.keys() == y.keys() and all(float((x[k] - y[k]).abs().max()) <= 1e-6 for k in x)
        assert res["best_top1"] == max(r["val/top1"] for r in rows if "val/top1" in r)
        kept = sorted(p.name for p in (cut / "checkpoints").glob("step-*"))
        assert kept == sorted({Path(res["best"]["checkpoint"]).name, Path(res["last"]["checkpoint"]).name})


# ---------------------------------------------------------------------------------------------------- refusals

def _tree(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _hold(path: Path, ready, done) -> None:  # a forked child: a POSIX lock belongs to a process
    from mimtrain.engine.rundir import RunLock

    lock = RunLock(path).acquire()
    ready.set()
    done.wait(60)
    lock.release()


def _probe(w: dict, out: Path, *extra: str) -> list[str]:
    return _argv("linprobe_cached", w, out) + ["train.epochs=100", *extra]  # the recipe's length: no short warning


def test_used_busy_and_nested_output_dirs_are_refused_leaving_every_file_as_it_was(world, capsys, monkeypatch):
    w, root = world, world["root"]
    ft, probe = _straight(w, "finetune", monkeypatch), _straight(w, "linprobe_cached", monkeypatch)
    capsys.readouterr()
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(probe, ready, done))  # a run still going in `probe`
    holder.start()
    try:
        assert ready.wait(30)
        before = _tree(root)
        assert "in use by another mimtrain run" in _refused(_probe(w, probe, "resume=auto"), capsys)
        assert "already holds a run" in _refused(_argv("finetune", w, ft), capsys)
        for out, why in ((w["pre"], "is the --from source"), (w["pre"] / "probe", "inside the --from source"),
                         (w["dense"], "is an export"), (_latest(ft) / "probe", "lies inside a training checkpoint"),
                         (ft / "probe", "lies inside a run")):
            assert why in _refused(_probe(w, out, "overwrite=true"), capsys), out
        assert "lies inside a run" in _refused(_argv("pretrain", w, ft / "pre"), capsys)
        assert _tree(root) == before
    finally:
        done.set()
        holder.join(30)


def test_bench_times_the_loops_own_step(monkeypatch):
    """`mimtrain bench` holds no step of its own: each timed (and warm-up) step is one call of engine.fit.train_step."""
    import mimtrain.engine.fit as engine_fit
    from mimtrain.bench.step import measure

    calls = []
    real = engine_fit.train_step
    monkeypatch.setattr(engine_fit, "train_step", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    row = measure({"kind": "ours", "recipe": str(REPO / "recipes/pretrain/mae_vit_tiny_cpu.yaml"),
                   "overrides": ["data.img_size=32", "encoder.kwargs={patch_size: 8, embed_dim: 32, depth: 1, "
                                 "num_heads: 2}", "method.decoder_depth=1", "method.decoder_dim=32"],
                   "batch": 2, "steps": 2, "warmup": 1, "precision": "fp32", "data": ""})
    assert calls == [0, 1, 2] and row["images_per_sec"] > 0


def test_export_takes_a_finetunes_best_or_final_and_names_them_for_its_run(world, capsys, monkeypatch):
    """`mimtrain export RUN/best` (or final) rewrites the classifier export whole: same tensors, same spec; the run
    folder itself (its training state is a classifier's, not a pretraining checkpoint) is refused naming both."""
    ft = _straight(world, "finetune", monkeypatch)
    for which in ("best", "final"):
        out = world["root"] / f"exported_{which}"
        cli.main(["export", str(ft / which), str(out)])
        x, y = (load_file(str(d / "encoder.safetensors")) for d in (ft / which, out))
        assert x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)
        spec = yaml.safe_load((out / "config.yaml").read_text())["encoder"]
        assert spec == yaml.safe_load((ft / which / "config.yaml").read_text())["encoder"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(ft), str(world["root"] / "exported_run")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 3 and len(err.splitlines()) == 1, err
    assert "finetune checkpoint, not a pretraining one" in err and str(ft / "best") in err and str(ft / "final") in err
    assert not (world["root"] / "exported_run").exists()
