"""Scale out and survive, on CPU through the real CLI: DeepSpeed ZeRO-2/3 (and offload) over gloo, a multi-node launch
on one host, preemption by SIGTERM/SIGUSR1, kill -9 in the middle of a checkpoint write, resuming on fewer processes,
checkpoint retention, export of ZeRO checkpoints, and k-NN during pretraining.

The reference for every distributed run is DDP over gloo with the same seed: same data, masks and schedule, so the
per-step losses agree to float noise (ZeRO reduces in another order).
"""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from helpers import PY, REPO, TINY_MAE, make_test_shards, run_cli, write_image_folder
from mimtrain.checkpoint.state import retained
from mimtrain.checkpoint.encoder import load_encoder
from mimtrain.checkpoint.export import export

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
LAUNCH = REPO / "launch" / "accelerate"
FAST = ["train.log_every=1", "train.image_every=0", "optim.lr=0.01", "optim.clip_grad=0.5"]  # lr/clip that matter


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mimtrain.data.shards import make_shards

    root = tmp_path_factory.mktemp("data")
    train = make_test_shards(root, classes=4, per_class=10, shard_size=5)  # 40 samples, 8 shards
    write_image_folder(root / "val_images", classes=4, per_class=3, seed=1)
    make_shards(root / "val_images", root / "val", shard_size=6, verbose=False)
    return {"train": train, "val": root / "val"}


def _args(data, out, *extra):
    return ["pretrain", *TINY_MAE, f"data.train_shards={data['train']}", f"output_dir={out}", *FAST, *extra]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, nproc: int, args: list[str], check: bool = True):
    cmd = [PY, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / config), "--num_processes",
           str(nproc), "--main_process_port", str(_port()), "-m", "mimtrain", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _metrics(out: Path) -> dict[int, dict]:
    """step -> the training record (the last one logged for that step)."""
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def _latest(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


def _assert_same_losses(a: Path, b: Path, steps, tol: float) -> None:
    ma, mb = _metrics(a), _metrics(b)
    for s in steps:
        assert mb[s]["loss"] == pytest.approx(ma[s]["loss"], abs=tol), (s, ma[s], mb[s])
        assert mb[s]["lr"] == pytest.approx(ma[s]["lr"], rel=1e-9), (s, ma[s], mb[s])


@pytest.fixture(scope="module")
def ddp_reference(data, tmp_path_factory):
    """2 processes, DDP over gloo, 6 uninterrupted steps (the steps 3 -> 6 cross an epoch boundary at 5)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    _launch("multi_gpu.yaml", 2, _args(data, out, "train.max_steps=6", "data.num_workers=1"))
    export(out, out / "export")
    return out


@pytest.fixture
def start():
    """Start a run in its own process group, so a test can signal it (and its DataLoader workers) as SLURM does.
    Whatever is still running when the test ends (a failed or hung run) is killed, with every descendant (torchrun
    starts its trainers in sessions of their own)."""
    started = []

    def run(args: list[str], env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen([PY, "-m", "mimtrain", *args], cwd=REPO, env={**ENV, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        started.append(proc)
        return proc

    run.track = started.append
    yield run
    for proc in started:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()



# ---------------------------------------------------------------------------------------------------------- DeepSpeed

@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trains_resumes_and_matches_ddp(data, ddp_reference, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    config = f"deepspeed_zero{stage}.yaml"
    _launch(config, 2, _args(data, out, "train.max_steps=3", "data.num_workers=1"))
    ckpt = _latest(out)
    assert ckpt.name == "step-00000003" and (ckpt / "pytorch_model").is_dir()
    proc = _launch(config, 2, _args(data, out, "train.max_steps=6", "data.num_workers=1", "resume=auto"))
    assert "at step 3" in proc.stdout
    # lr schedule, clipping (optim.clip_grad -> DeepSpeed's gradient_clipping) and the resume all as under DDP
    _assert_same_losses(ddp_reference, out, range(1, 7), tol=2e-5)

    exported, reference = export(out, tmp_path / "export"), ddp_reference / "export"  # `mimtrain export`
    a, b = load_file(str(reference / "encoder.safetensors")), load_file(str(exported / "encoder.safetensors"))
    # Adam divides by sqrt(v): on weights whose gradients are near float noise, the reduction-order differences of
    # ZeRO vs DDP grow to ~3e-5 after 6 steps from MAE's xavier init (losses still agree within 2e-5 above).
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    if stage == 2:  # ZeRO-2 keeps whole parameters in the module states: the consolidated fp32 weights equal them
        module = torch.load(_latest(out) / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert all(torch.equal(module[f"encoder.{k}"], v) for k, v in b.items())
    else:  # ZeRO-3: the encoder rebuilt from the consolidated shards gives the DDP twin's features (to float noise)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            fa, fb = (load_encoder(p)[0].eval().forward_features(x) for p in (reference, exported))
        assert (fa - fb).abs().max().item() < 1e-4

    if stage == 2:  # ZeRO optimizer partitions are bound to the process count: a clear refusal, naming the options
        proc = _launch(config, 1, _args(data, out, "train.max_steps=8", "data.num_workers=1", "resume=auto"),
                       check=False)
        assert proc.returncode != 0 and "ZeRO partitions are bound to the process count" in proc.stderr
        assert "--num_processes 2" in proc.stderr and "ds_to_universal" in proc.stderr


@pytest.mark.parametrize("how", ["deepspeed_zero3_offload", "multi_node"])
def test_other_launch_configs_train_the_same_recipe(data, ddp_reference, tmp_path, how, start):
    out = tmp_path / how
    args = _args(data, out, "train.max_steps=2", "data.num_workers=1")
    if how == "multi_node":  # two "machines" on one host, each one process, meeting at the main address
        port = str(_port())
        cmds = [[PY, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "multi_node.yaml"),
                 "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(r), "--main_process_ip",
                 "127.0.0.1", "--main_process_port", port, "-m", "mimtrain", *args] for r in (0, 1)]
        procs = [subprocess.Popen(c, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True) for c in cmds]
        for p in procs:
            start.track(p)
        logs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    else:
        _launch(f"{how}.yaml", 2, args)
    assert "world_size: 2" in (out / "config.yaml").read_text()
    _assert_same_losses(ddp_reference, out, (1, 2), tol=2e-5)


# ---------------------------------------------------------------------------------------------------------- preemption

def _wait_for(cond, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, "the run ended before the test could interrupt it: " + proc.stderr.read()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigterm_checkpoints_exits_zero_and_resume_continues_step_for_step(data, tmp_path, start):
    straight = tmp_path / "straight"
    run_cli(*_args(data, straight, "train.max_steps=12", "data.num_workers=2", "train.ckpt_every=2",
                   "train.keep_last=2", "train.keep_every=4"))
    kept = sorted(p.name for p in (straight / "checkpoints").glob("step-*"))
    assert kept == [f"step-{s:08d}" for s in (4, 8, 10, 12)]  # the last 2, plus every 4th

    out = tmp_path / "preempted"
    args = _args(data, out, "train.max_steps=12", "data.num_workers=2", "train.ckpt_every=100")
    proc = start(args)
    _wait_for(lambda: _logged_steps(out) >= 4, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, DataLoader workers included (SLURM, torchrun do that)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = int(_latest(out).name.split("-")[1])
    assert 4 <= stopped < 12 and "preempted: stopped after step" in stdout
    assert (_latest(out) / "trainer_state_0.json").exists()

    resumed = run_cli(*args, "resume=auto").stdout
    assert f"at step {stopped}" in resumed
    _assert_same_losses(straight, out, range(1, 13), tol=1e-6)


def test_kill9_while_a_checkpoint_is_written_leaves_latest_complete(data, tmp_path, start):
    out = tmp_path / "killed"
    args = _args(data, out, "train.max_steps=8", "data.num_workers=1", "train.ckpt_every=2")
    proc = start(args, env={"MIMTRAIN_TEST_PAUSE_IN_SAVE": "1.5"})  # sleeps inside every save (checkpoint.py)
    ckpts = out / "checkpoints"
    _wait_for(lambda: (ckpts / "latest").exists() and (ckpts / "tmp-step-00000004" / "model.safetensors").exists(),
              proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    partial = ckpts / "tmp-step-00000004"
    assert partial.is_dir() and not (partial / "trainer_state_0.json").exists()  # killed in the middle of the save
    latest = _latest(out)
    assert latest.name == "step-00000002"
    assert {"model.safetensors", "optimizer.bin", "trainer_state_0.json", "config.yaml"} <= \
        {p.name for p in latest.iterdir()}

    assert "at step 2" in run_cli(*args, "resume=auto").stdout
    assert _latest(out).name == "step-00000008" and not partial.exists()


def test_sigusr1_on_one_rank_stops_both_then_one_process_resumes(data, tmp_path, start):
    out = tmp_path / "two"
    port = str(_port())
    knn = ["train.knn_every=2", f"data.knn_train_shards={data['train']}", f"data.val_shards={data['val']}"]
    args = _args(data, out, "train.max_steps=40", "data.num_workers=1", "train.ckpt_every=100", *knn)
    # The torchrun environment, without a launcher: each process is ours to signal.
    procs = [start(args, env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in (0, 1)]
    _wait_for(lambda: _logged_steps(out) >= 4, procs[0])
    procs[1].send_signal(signal.SIGUSR1)  # rank 1 only: rank 0 must stop at the same step
    for p in procs:
        _, err = p.communicate(timeout=60)  # a rank that stopped alone would leave the other hanging
        assert p.returncode == 0, err[-3000:]
    ckpt = _latest(out)
    states = [json.loads((ckpt / f"trainer_state_{r}.json").read_text()) for r in (0, 1)]
    assert states[0]["step"] == states[1]["step"] < 40
    _assert_knn_logged(out, range(2, states[0]["step"] + 1, 2))  # sharded over both processes, logged by rank 0

    # One process: effective batch 4 instead of 8, so 10 micro-batches per epoch instead of 5 per process.
    # The samples read this epoch carry over; the new position is re-derived from them, not restarted.
    step, more = states[0]["step"], 3
    res = run_cli(*_args(data, out, f"train.max_steps={step + more}", "data.num_workers=1", "resume=auto")).stdout
    assert "resume: 2 processes x 1 workers -> 1 x 1" in res and f"at step {step}" in res
    final = json.loads((_latest(out) / "trainer_state_0.json").read_text())
    consumed = (states[0]["consumed"] + states[1]["consumed"]) * 4 // 4 + more  # samples read / new batch, + more
    expected = (states[0]["epoch"], consumed) if consumed <= 10 else (states[0]["epoch"] + 1, consumed - 10)
    assert (final["step"], final["world_size"]) == (step + more, 1)
    assert (final["epoch"], final["consumed"]) == expected


FAKE_SRUN = """#!/bin/bash
# srun stand-in: the command once per node, SLURM_NODEID set, USR1 forwarded (as srun forwards it to the step)
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
rc=0
for p in "${pids[@]}"; do
    while true; do wait "$p"; r=$?; kill -0 "$p" 2>/dev/null || break; done
    [ "$r" -ne 0 ] && rc=$r
done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
# scontrol stand-in: this host is every node; a requeue is written down
case "$1" in show) echo 127.0.0.1 ;; requeue) echo "requeue $2" >> "$REQUEUE_LOG" ;; esac
"""


def test_slurm_script_checkpoints_on_usr1_requeues_and_resumes(data, tmp_path, start):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out, requeues = tmp_path / "slurm", tmp_path / "requeues.txt"
    env = {"PATH": f"{bin_dir}:{Path(PY).parent}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "GPUS_PER_NODE": "1", "MAIN_PORT": str(_port()),
           "REQUEUE_LOG": str(requeues)}
    job = ["bash", str(REPO / "launch" / "slurm" / "pretrain.sbatch"), "recipes/pretrain/mae_vit_tiny_cpu.yaml",
           str(out), *_args(data, out, "train.max_steps=40", "data.num_workers=1", "train.ckpt_every=100")[1:]]
    proc = subprocess.Popen(job, cwd=REPO, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    start.track(proc)
    _wait_for(lambda: _logged_steps(out) >= 3, proc)
    proc.send_signal(signal.SIGUSR1)  # the batch shell only, as `--signal=B:USR1@120` does
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log[-4000:]
    assert requeues.read_text().split() == ["requeue", "4242"]
    stopped = json.loads((_latest(out) / "trainer_state_1.json").read_text())["step"]
    assert 3 <= stopped < 40 and "preempted: stopped after step" in log

    job[job.index("train.max_steps=40")] = f"train.max_steps={stopped + 2}"  # the requeued job, shortened
    rerun = subprocess.run(job, cwd=REPO, env={**ENV, **env}, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and f"at step {stopped}" in rerun.stdout, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert _latest(out).name == f"step-{stopped + 2:08d}" and requeues.read_text().count("requeue") == 1


# ---------------------------------------------------------------------------------------------------------- the rest

def test_retention_keeps_the_last_n_and_every_mth():
    steps = [100, 200, 300, 400, 500, 600, 700]
    assert retained(steps, keep_last=2, keep_every=300) == {300, 600, 700}
    assert retained(steps, keep_last=3, keep_every=0) == {500, 600, 700}
    assert retained(steps, keep_last=0, keep_every=500) == set(steps)  # keep_last=0 keeps everything
    assert retained([], keep_last=2, keep_every=3) == set()


def _assert_knn_logged(out: Path, steps) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    knn = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "knn/top1" in r]
    assert [r["step"] for r in knn] == list(steps) and all(0 <= r["knn/top1"] <= 100 for r in knn)
    assert "knn/top1" in EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]


def test_knn_during_pretraining_needs_labelled_shards(data, tmp_path):
    bad = run_cli(*_args(data, tmp_path / "bad", "train.knn_every=2"), check=False, timeout=120)
    assert bad.returncode == 2 and "data.knn_train_shards" in bad.stderr
