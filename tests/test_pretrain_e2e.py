"""End to end through the real CLI: resume after a kill, 2 processes over gloo, bad input, non-finite loss, logs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from helpers import PY, REPO, TINY_MAE, make_test_shards, run_cli


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 40 samples in 8 shards
    return make_test_shards(tmp_path_factory.mktemp("data"), classes=4, per_class=10, shard_size=5)


def _args(shards, out, *extra):
    return ["pretrain", *TINY_MAE, f"data.train_shards={shards}", f"output_dir={out}", "data.num_workers=2", *extra]


def _final_params(out):
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    return load_file(str(ckpt / "model.safetensors"))


def test_resume_after_kill_matches_an_uninterrupted_run(shards, tmp_path):
    straight = tmp_path / "straight"
    run_cli(*_args(shards, straight, "train.max_steps=20", "train.ckpt_every=20"))

    killed = tmp_path / "killed"
    cmd = [PY, "-m", "mimtrain", *_args(shards, killed, "train.max_steps=20", "train.ckpt_every=5")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and pointer.read_text().strip() >= "step-00000010":
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    step_at_kill = int(pointer.read_text().strip().split("-")[1])
    assert 10 <= step_at_kill < 20

    out = run_cli(*_args(shards, killed, "train.max_steps=20", "train.ckpt_every=5", "resume=auto")).stdout
    assert "resumed from" in out and f"at step {step_at_kill}" in out
    a, b = _final_params(straight), _final_params(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}

    la, lb = losses(straight), losses(killed)
    assert la[20] == pytest.approx(lb[20], abs=1e-6)


def test_two_processes_over_gloo_read_disjoint_shards(shards, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "mimtrain", *_args(shards, out, "train.max_steps=4", "train.trace_keys=true", "data.num_workers=1")]
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shards_of = [{k.split("/")[0] for k in (out / f"keys_rank{r}.txt").read_text().split()} for r in (0, 1)]
    assert shards_of[0] and shards_of[1] and shards_of[0].isdisjoint(shards_of[1])
    cfg = (out / "config.yaml").read_text()
    assert "world_size: 2" in cfg and "effective_batch: 8" in cfg
    saved = {p.name for p in (out / "checkpoints" / "step-00000004").iterdir()}
    assert {"trainer_state_0.json", "trainer_state_1.json"} <= saved


@pytest.mark.parametrize("override,message", [
    ("train.bacth_size=4", "did you mean 'train.batch_size'"),
    ("data.train_shards={tmp}/nothing-{{000..003}}.tar", "shard(s) not found"),
    ("data.img_size=36", "not divisible by the mask unit"),
    ("method.name=simmim_typo", "unknown method.name"),
])
def test_bad_input_fails_before_training(shards, tmp_path, override, message):
    out = tmp_path / "bad"
    proc = run_cli(*_args(shards, out), override.format(tmp=tmp_path), check=False, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shards, tmp_path):
    out = tmp_path / "nan"
    proc = run_cli(*_args(shards, out, "optim.lr=1e30", "optim.warmup_epochs=0", "train.ckpt_every=1",
                          "train.log_every=100", "train.max_steps=6"), check=False)
    assert proc.returncode == 3 and "non-finite loss at step" in proc.stderr, proc.stderr
    bad = int(proc.stderr.split("non-finite loss at step ")[1].split(":")[0])
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert int(latest.split("-")[1]) == bad - 1


def test_logs_scalars_images_and_resolved_config(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "logs"
    stdout = run_cli(*_args(shards, out, "train.max_steps=6")).stdout
    assert "run directory:" in stdout and "loss" in stdout
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "epoch", "loss", "lr", "images_per_sec", "data_wait_frac", "data/skipped"} <= set(rec)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "reconstruction" in acc.Tags()["images"]
    assert {"train/loss", "train/lr", "train/images_per_sec", "train/data_wait_frac", "data/skipped"} <= \
        set(acc.Tags()["scalars"])
    img = acc.Images("reconstruction")[0]
    assert (img.width, img.height) == (3 * 34 + 2, 4 * 34 + 2)  # columns original | masked | reconstruction; 4 rows
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["derived"]["lr"] > 0 and saved["encoder"]["name"] == "mim_vit_tiny_patch16"
    ckpt_cfg = yaml.safe_load((out / "checkpoints" / "step-00000006" / "config.yaml").read_text())
    assert ckpt_cfg["derived"] == saved["derived"]
