"""Data at scale (issue 17) and runs that always exit (issue 18, items 1 and 8): class mixing in batches, true epochs
for any shard/process/worker count, worker errors, a worker killed by the OS and SIGINT, broken shards named."""
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from helpers import PY, REPO, TINY_MAE, run_cli, write_image_folder
from mimtrain.data.shards import make_shards
from mimtrain.data.stream import ShardStream, count_samples, expand_shards, make_loader

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _read_epoch(urls, world, workers, batch, num_batches, epoch=0):
    """Every rank's batches of one epoch, read through the real DataLoader workers (ranks simulated in turn)."""
    out = []
    for rank in range(world):
        s = ShardStream(urls, T.ToTensor(), batch, seed=3, rank=rank, world_size=world, num_streams=workers,
                        num_batches=num_batches, shuffle_buffer=100, epoch=epoch)
        out.append(list(make_loader(s, workers)))
    return out


def test_class_sorted_imagefolder_gives_mixed_batches_and_a_true_epoch(tmp_path):
    """100 classes x 40 images, class-sorted; 200 per shard; 2 processes x 2 workers at batch 64."""
    src = write_image_folder(tmp_path / "imgs", classes=100, per_class=40, size=8)
    make_shards(src, tmp_path / "shards", shard_size=200, verbose=False, workers=2)
    urls = expand_shards(str(tmp_path / "shards"))
    n, world, batch = 4000, 2, 64
    k = n // (batch * world)  # batches per process per epoch, as `derive` computes them
    ranks = _read_epoch(urls, world, 2, batch, k)
    batches = [b for r in ranks for b in r]
    assert [len(r) for r in ranks] == [k, k] and all(len(b["key"]) == batch for b in batches)
    iid = 100 * (1 - 0.99 ** 64)  # 47.4 distinct classes expected in an i.i.d. batch of 64
    mixed = np.mean([len(set(b["label"].tolist())) for b in batches])
    assert mixed >= 0.9 * iid, mixed
    keys = [key for b in batches for key in b["key"]]
    assert len(set(keys)) == len(keys) and len(keys) >= 0.99 * n  # none twice, >= 99% read

    # The same reader on shards in source order: the test tells the difference (about 4 classes per batch).
    make_shards(src, tmp_path / "sorted", shard_size=200, verbose=False, shuffle=False)
    ranks = _read_epoch(expand_shards(str(tmp_path / "sorted")), world, 2, batch, k)
    assert np.mean([len(set(b["label"].tolist())) for r in ranks for b in r]) < 0.3 * iid


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _uneven_shards(folder: Path, sizes, garbage_after: int | None = None) -> list[str]:
    """Shards of the given sample counts (no index.json: counted from the tar headers); with `garbage_after`, the
    samples from that index on carry bytes that are no image."""
    folder.mkdir(parents=True, exist_ok=True)
    png, i = _tiny_png(), 0
    for j, size in enumerate(sizes):
        with wds.TarWriter(str(folder / f"s-{j:03d}.tar")) as sink:
            for _ in range(size):
                data = b"no image here" if garbage_after is not None and i >= garbage_after else png
                sink.write({"__key__": f"{i:06d}", "png": data, "cls": b"0"})
                i += 1
    return expand_shards(str(folder))


@pytest.mark.parametrize("sizes,world,workers,batch", [
    ((7, 3, 12, 1, 9), 3, 2, 2),  # uneven shards, 6 streams
    ((32,), 2, 3, 3),  # 1 shard, 6 streams: split within the shard
    ((5, 6, 5, 6, 5, 5), 1, 4, 4),
])
def test_one_epoch_reads_each_sample_at_most_once_whatever_the_layout(tmp_path, sizes, world, workers, batch):
    urls = _uneven_shards(tmp_path / "s", sizes)
    n = sum(sizes)
    k = n // (batch * world)
    ranks = _read_epoch(urls, world, workers, batch, k, epoch=1)
    keys = [key for r in ranks for b in r for key in b["key"]]
    assert [len(r) for r in ranks] == [k] * world  # every process the same number of steps
    assert len(set(keys)) == len(keys) == k * batch * world >= n - batch * world + 1
    # evaluation (num_batches=None): every sample exactly once, partial batches allowed
    keys = [key for r in _read_epoch(urls, world, workers, batch, None) for b in r for key in b["key"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == n


def test_shards_without_index_that_are_broken_are_named(tmp_path):
    urls = _uneven_shards(tmp_path / "s", (4, 4))
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[:700])  # truncated inside the first member
    (tmp_path / "s" / "s-002.tar").write_text("this is not a tar file")
    with pytest.raises(ValueError, match="s-002.tar is not a readable tar file"):
        count_samples([urls[0], str(tmp_path / "s" / "s-002.tar")])
    with pytest.raises(ValueError, match="s-001.tar is not a readable tar file"):
        count_samples(urls)


# ---- the real CLI: training finishes for any layout; worker errors, a killed worker and SIGINT end the run
def _pretrain_args(shards, out, *extra):
    return ["pretrain", *TINY_MAE, f"data.train_shards={shards}", f"output_dir={out}", *extra]


def _group_alive(pgid: int) -> list[int]:
    """Processes still in the process group `pgid` (the run and every child it started)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _start(args, **kw) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "mimtrain", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _finish(proc, limit: float) -> tuple[int, str, str, float]:
    t0 = time.time()
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the run did not exit within {limit} s:\n{out}\n{err}")
    time.sleep(0.5)
    assert _group_alive(proc.pid) == [], "a child process survived the run"
    return proc.returncode, out, err, time.time() - t0


def _wait_for(path: Path, proc, limit: float = 240) -> None:
    deadline = time.time() + limit
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert path.exists(), f"{path} never appeared:\n{proc.communicate()}"


def test_one_shard_with_two_workers_trains_every_sample_once_per_epoch(tmp_path):
    src = write_image_folder(tmp_path / "imgs", classes=3, per_class=8)
    make_shards(src, tmp_path / "one", shard_size=100, verbose=False)  # 24 samples, 1 shard
    out = tmp_path / "run"
    res = run_cli(*_pretrain_args(tmp_path / "one", out, "data.num_workers=2", "train.trace_keys=true"), timeout=300)
    assert "done: step 24" in res.stdout  # 4 epochs x 6 steps
    keys = (out / "keys_rank0.txt").read_text().split()
    epochs = [keys[i:i + 24] for i in range(0, 96, 24)]
    assert all(len(set(e)) == 24 for e in epochs) and len(keys) == 96


def test_three_shards_with_two_processes_x_two_workers_train_and_finish(tmp_path):
    src = write_image_folder(tmp_path / "imgs", classes=3, per_class=10)
    make_shards(src, tmp_path / "three", shard_size=10, verbose=False)  # 30 samples, 3 shards < 4 streams
    out = tmp_path / "ddp"
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541", "-m", "mimtrain",
           *_pretrain_args(tmp_path / "three", out, "data.num_workers=2", "train.trace_keys=true")]
    proc = subprocess.run(cmd, cwd=REPO, env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done: step 12" in proc.stdout  # 30 // (4 x 2) = 3 steps per epoch, 4 epochs
    per_rank = [(out / f"keys_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert [len(k) for k in per_rank] == [48, 48]
    for e in range(4):  # 12 keys per process per epoch; no sample twice in an epoch across both processes
        epoch = per_rank[0][12 * e:12 * e + 12] + per_rank[1][12 * e:12 * e + 12]
        assert len(set(epoch)) == 24


def test_a_worker_that_raises_mid_epoch_ends_the_run_and_its_children(tmp_path):
    # One shard: worker 0's half decodes, worker 1's half is not images, so worker 1 raises after the first step.
    _uneven_shards(tmp_path / "bad", (32,), garbage_after=16)
    proc = _start(_pretrain_args(tmp_path / "bad", tmp_path / "run", "data.num_workers=2", "train.log_every=1"))
    code, out, err, _ = _finish(proc, 240)  # the start-up (imports, model) is most of it; see the next check
    # shards that decode to nothing are bad input: one line, exit 2 (the worker's traceback is not shown)
    assert code == 2 and "decoded no image" in err and "Traceback" not in err, err
    steps = [json.loads(r)["step"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # it failed mid-epoch, after the first step


def test_a_worker_killed_by_the_os_ends_the_run_within_seconds(tmp_path):
    src = write_image_folder(tmp_path / "imgs", classes=2, per_class=40)
    make_shards(src, tmp_path / "sh", shard_size=4, verbose=False)
    proc = _start(_pretrain_args(tmp_path / "sh", tmp_path / "run", "data.num_workers=2", "train.epochs=100000",
                                 "train.log_every=1"))
    _wait_for(tmp_path / "run" / "metrics.jsonl", proc)
    deadline, children = time.time() + 30, []
    while not children and time.time() < deadline:  # workers are started afresh each epoch: catch two alive
        children = [p for p in _group_alive(proc.pid) if p != proc.pid]
    assert children, "no DataLoader worker found"
    os.kill(children[0], signal.SIGKILL)  # what the OOM killer does
    code, out, err, took = _finish(proc, 30)
    assert code == 1 and "DataLoader worker" in err and took < 30, err


_FAIL_WHILE_STARTING = """
import time, torch
from torch.utils.data import DataLoader, IterableDataset, dataloader
from mimtrain.engine.preempt import shield_workers

class Endless(IterableDataset):
    def __iter__(self):
        while True:
            time.sleep(0.01)
            yield torch.zeros(2)

def fail(self):  # what a worker killed while the iterator starts looks like: its __init__ raises, workers are up
    raise RuntimeError("worker failed while the loader started")

dataloader._MultiProcessingDataLoaderIter._try_put_index = fail
for batch in shield_workers(DataLoader(Endless(), batch_size=None, num_workers=2)):
    pass
"""


def test_workers_of_a_loader_that_fails_while_starting_do_not_outlive_the_run():
    proc = subprocess.Popen([PY, "-c", _FAIL_WHILE_STARTING], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    code, out, err, took = _finish(proc, 60)  # without the guard: waits forever on the workers at exit
    assert code == 1 and "worker failed while the loader started" in err, err


def test_sigint_to_the_main_process_checkpoints_and_exits(tmp_path):
    src = write_image_folder(tmp_path / "imgs", classes=2, per_class=8)
    make_shards(src, tmp_path / "sh", shard_size=4, verbose=False)
    out = tmp_path / "run"
    proc = _start(_pretrain_args(tmp_path / "sh", out, "data.num_workers=2", "train.epochs=100000",
                                 "train.log_every=1", "train.ckpt_every=100000"))
    _wait_for(out / "metrics.jsonl", proc)
    os.kill(proc.pid, signal.SIGINT)  # the main process only, as `kill -INT <pid>` does
    code, stdout, err, took = _finish(proc, 30)
    assert code == 0 and "preempted: stopped after step" in stdout, stdout + err
    step = int(stdout.split("preempted: stopped after step ")[1].split()[0])
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"


def test_remote_shards_of_unknown_size_need_one_per_stream():
    with pytest.raises(ValueError, match="write at least 4 shards"):
        ShardStream(["pipe:cat a.tar", "pipe:cat b.tar", "pipe:cat c.tar"], T.ToTensor(), 2, world_size=2,
                    num_streams=2)
