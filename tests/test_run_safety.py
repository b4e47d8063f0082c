"""Run directories and checkpoints a user can trust (issue 18, items 2-5, 8, 9): resume=auto never starts over
silently, a used output_dir is never overwritten by accident, one run per directory, nothing unpickles code, damaged
files are named, a full disk says so, a stalled process cannot block its peers for half an hour.

One real tiny run (module fixture) writes three checkpoints; each test damages a copy of it. Processes are started
and ended by the tests.
"""
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import PY, REPO, TINY_MAE, make_test_shards, run_cli
from mimtrain.checkpoint.state import CheckpointError, Checkpoints, pickle_imports, tensors_only, verify
from mimtrain.engine.rundir import open_run_dir
from mimtrain.checkpoint.encoder import LoadError, load_encoder, read_source, resolve

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
FAST = ["data.num_workers=0", "train.image_every=0", "train.ckpt_every=2", "train.keep_last=0"]
DAMAGE = {  # file -> how it is damaged (a copy cut short, as by a full disk or an interrupted rsync)
    "model.safetensors": 1000, "optimizer.bin": 3000, "trainer_state_0.json": 20, "config.yaml": 200}


def _args(shards, out, *extra):
    return ["pretrain", *TINY_MAE, f"data.train_shards={shards}", f"output_dir={out}", *FAST, *extra]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("data"), classes=2, per_class=6, shard_size=6)  # 12 samples


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("base") / "run"
    run_cli(*_args(shards, out, "train.max_steps=6"))
    assert [p.name for p in Checkpoints(out).steps()] == [f"step-0000000{s}" for s in (6, 4, 2)]
    return out


@pytest.fixture
def copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    (dst / ".mimtrain.lock").unlink(missing_ok=True)
    return dst


def _truncate(path: Path, size: int) -> None:
    assert path.stat().st_size > size
    os.truncate(path, size)


def _step(out: Path, s: int) -> Path:
    return out / "checkpoints" / f"step-{s:08d}"


# ---------------------------------------------------------------------------------------------------------- item 8

@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_by_name_and_resolution_falls_back(copy, name):
    bad = _step(copy, 6)
    _truncate(bad / name, DAMAGE[name])
    with pytest.raises(CheckpointError, match=re.escape(str(bad / name))):
        verify(bad)
    ckpt, rejected = Checkpoints(copy).newest_complete()
    assert ckpt == _step(copy, 4) and [r[0] for r in rejected] == [bad] and name in rejected[0][1]
    assert resolve(copy) == ckpt  # `mimtrain export` / `--from` resolve the run exactly as resume=auto does
    with pytest.raises(CheckpointError, match=re.escape(name)):  # an explicit resume is refused by name
        open_run_dir(str(copy), str(bad), overwrite=False, say=lambda _: None)[0].release()
    if name in ("model.safetensors", "config.yaml"):  # what export reads: refused by name too
        with pytest.raises(CheckpointError, match=re.escape(name)):
            read_source(bad)


def test_no_complete_checkpoint_is_refused_not_restarted(copy):
    for s in (2, 4, 6):
        _truncate(_step(copy, s) / "model.safetensors", 1000)
    with pytest.raises(CheckpointError, match="no complete checkpoint.*overwrite=true"):
        open_run_dir(str(copy), "auto", overwrite=False, say=lambda _: None)
    assert all(_step(copy, s).is_dir() for s in (2, 4, 6))  # nothing moved or deleted


def test_disk_full_during_a_save_names_the_path_and_keeps_the_last_checkpoint(shards, tmp_path):
    out = tmp_path / "full"
    proc = subprocess.Popen([PY, "-m", "mimtrain", *_args(shards, out, "train.max_steps=6")], cwd=REPO,
                            env={**ENV, "MIMTRAIN_TEST_PAUSE_IN_SAVE": "2"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        partial = out / "checkpoints" / "tmp-step-00000004"
        deadline = time.time() + 240
        while not (partial / "optimizer.bin").exists():  # the save sleeps after save_state: now the disk "fills"
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        (partial / "trainer_state_0.json.tmp").symlink_to("/dev/full")  # every write to it fails with ENOSPC
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, err[-3000:]
    assert "No space left on device" in err and str(partial) in err and "step-00000002" in err, err[-2000:]
    assert "Traceback" not in err
    assert Checkpoints(out).latest() == _step(out, 2) and not partial.exists()
    verify(_step(out, 2))


# ---------------------------------------------------------------------------------------------------------- item 2

def test_resume_auto_skips_a_damaged_newest_checkpoint_and_keeps_it(copy, shards):
    _truncate(_step(copy, 6) / "model.safetensors", 1000)
    (copy / "checkpoints" / "latest").write_text("step-00000099\n")  # dangling pointer: not trusted either
    out = run_cli(*_args(shards, copy, "train.max_steps=8", "resume=auto")).stdout
    assert "skipping step-00000006" in out and "model.safetensors" in out and "at step 4" in out, out
    ckpts = copy / "checkpoints"
    assert (ckpts / "rejected-step-00000006" / "model.safetensors").stat().st_size == 1000  # kept, not deleted
    assert {p.name for p in Checkpoints(copy).steps()} == {f"step-0000000{s}" for s in (2, 4, 6, 8)}
    assert Checkpoints(copy).latest() == _step(copy, 8)
    verify(_step(copy, 6))  # step 6 written again by this run, complete


def test_an_explicit_older_checkpoint_sets_the_newer_ones_aside(copy):
    lock, ckpt = open_run_dir(str(copy), str(_step(copy, 2)), overwrite=False, say=lambda _: None)
    lock.release()
    names = {p.name for p in (copy / "checkpoints").iterdir()}
    assert ckpt == _step(copy, 2) and {"superseded-step-00000004", "superseded-step-00000006"} <= names


# ---------------------------------------------------------------------------------------------------------- item 3

def test_a_used_output_dir_without_resume_is_refused_then_overwrite_moves_it_aside(copy, shards):
    before = {p.relative_to(copy): p.stat().st_size for p in copy.rglob("*") if p.is_file()}
    metrics = (copy / "metrics.jsonl").read_text()
    proc = run_cli(*_args(shards, copy, "train.max_steps=2"), check=False)
    assert proc.returncode == 2 and "resume=auto" in proc.stderr and "overwrite=true" in proc.stderr, proc.stderr
    after = {p.relative_to(copy): p.stat().st_size for p in copy.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.name != ".mimtrain.lock"} == before  # untouched

    out = run_cli(*_args(shards, copy, "train.max_steps=2", "overwrite=true")).stdout
    (old,) = copy.parent.glob("run.old-*")
    assert f"moved the previous run to {old}" in out
    assert [p.name for p in Checkpoints(old).steps()] == ["step-00000006", "step-00000004", "step-00000002"]
    assert [p.name for p in Checkpoints(copy).steps()] == ["step-00000002"]
    assert (old / "metrics.jsonl").read_text() == metrics and len((copy / "metrics.jsonl").read_text()) < len(metrics)


# ---------------------------------------------------------------------------------------------------------- item 4

def _hold_lock(path: Path) -> subprocess.Popen:
    code = ("import sys, time; from mimtrain.engine.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([PY, "-c", code, str(path)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(copy, shards):
    holder = _hold_lock(copy)
    try:
        proc = run_cli(*_args(shards, copy, "train.max_steps=8", "resume=auto"), check=False)
        assert proc.returncode == 2 and "in use by another mimtrain run" in proc.stderr, proc.stderr
        assert f"pid {holder.pid}" in proc.stderr and f"host {os.uname().nodename}" in proc.stderr
        assert Checkpoints(copy).latest() == _step(copy, 6)  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel drops the lock
        holder.wait()
    lock, ckpt = open_run_dir(str(copy), "auto", overwrite=False, say=lambda _: None)
    lock.release()  # before reading the file: closing any descriptor of it would drop this process's lock anyway
    assert ckpt == _step(copy, 6) and f"pid {os.getpid()}" in (copy / ".mimtrain.lock").read_text()


# ---------------------------------------------------------------------------------------------------------- item 5

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what a malicious pickle does on load: here, create a directory
        return (os.mkdir, (str(self.marker),))


def _deepspeed_layout(root: Path, marker: Path, run: Path) -> Path:
    """A checkpoint in DeepSpeed's layout whose module states run code when unpickled."""
    ckpt = root / "ds" / "step-00000002"
    (ckpt / "pytorch_model").mkdir(parents=True)
    for name in ("config.yaml", "trainer_state_0.json"):
        shutil.copy(_step(run, 2) / name, ckpt / name)
    torch.save({"module": {"w": torch.zeros(2)}, "x": _RunsCode(marker)},
               ckpt / "pytorch_model" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, ckpt / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return ckpt


def test_a_deepspeed_layout_that_would_run_code_is_refused(run, tmp_path, shards):
    marker = tmp_path / "code-ran"
    ckpt = _deepspeed_layout(tmp_path, marker, run)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt.*would run code.*zero_to_fp32.py"):
        read_source(ckpt)
    with pytest.raises(CheckpointError, match="would run code"):  # what `linprobe/finetune/knn --from` call
        load_encoder(ckpt)
    proc = run_cli("export", str(ckpt), str(tmp_path / "exported"), check=False)
    assert proc.returncode == 3 and "would run code" in proc.stderr and not (tmp_path / "exported").exists()
    # DeepSpeed's own loads ask for weights_only=False: inside tensors_only they still load weights only
    with tensors_only(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(ckpt / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)
    assert not marker.exists()
    torch.load(ckpt / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)  # the control: it does run
    assert marker.exists()


def test_a_dcp_index_that_would_run_code_is_refused(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    from mimtrain.checkpoint.encoder import _refuse_code_in_dcp_index

    dcp.save({"w": torch.zeros(3)}, checkpoint_id=tmp_path / "good")
    _refuse_code_in_dcp_index(tmp_path / "good" / ".metadata")  # a real index passes
    for proto in (2, 4, 5):
        evil = tmp_path / f"evil{proto}"
        evil.write_bytes(pickle.dumps([_RunsCode(tmp_path / "ran")], protocol=proto))
        assert pickle_imports(evil.read_bytes()) == {f"{os.mkdir.__module__}.mkdir"}
        with pytest.raises(LoadError, match="would run code"):
            _refuse_code_in_dcp_index(evil)


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in (REPO / "mimtrain").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines()):
            if "torch.load(" in line and not line.lstrip().startswith("#") and "`" not in line:
                calls.append((path.name, i + 1, line))
    assert calls and all("weights_only=True" in line for _, _, line in calls), calls


# ---------------------------------------------------------------------------------------------------------- item 9

def test_a_stalled_process_fails_its_peer_after_dist_timeout_s(shards, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "two"
    args = _args(shards, out, "train.max_steps=1000", "train.ckpt_every=1000", "train.log_every=1",
                 "train.dist_timeout_s=10")
    procs = [subprocess.Popen([PY, "-m", "mimtrain", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in (0, 1)]
    try:
        metrics, deadline = out / "metrics.jsonl", time.time() + 240
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert procs[0].poll() is None and time.time() < deadline, procs[0].communicate()[1][-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGSTOP)  # rank 1 stalls (as a swapped-out or frozen node does)
        stalled = time.time()
        _, err = procs[0].communicate(timeout=120)  # torch's default would block it for 30 minutes
        waited = time.time() - stalled
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode != 0 and waited < 60, (waited, err[-3000:])
    assert "timed out" in err.lower() or "timeout" in err.lower(), err[-3000:]
