"""Step-numbered training checkpoints that a kill can never leave half-written as the latest.

Layout: `output_dir/checkpoints/step-00001000/` (accelerate `save_state`: model as safetensors, optimizer, RNG states,
plus `trainer_state_<rank>.json` and the resolved `config.yaml`) and `checkpoints/latest`, a one-line pointer.
A checkpoint is written into `tmp-step-...`, renamed into place only when every process has finished writing, and
only then does the pointer move (rename over the old pointer), so `latest` always names a complete directory.
Under DeepSpeed, `save_state` writes the engine's checkpoint (`pytorch_model/`: module states, one ZeRO optimizer
partition per process); under FSDP, sharded model/optimizer directories (`pytorch_model_fsdp_0/`, ...).

Retention: the last `keep_last` checkpoints, plus every one whose step is a multiple of `keep_every`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import yaml

POINTER = "latest"
# Test hook (tests/test_distributed.py): seconds to sleep inside `save` after the model and optimizer are written and
# before the checkpoint is complete, so a test can SIGKILL a process mid-save. Unset in real runs.
PAUSE_ENV = "MIMTRAIN_TEST_PAUSE_IN_SAVE"


class CheckpointError(RuntimeError):
    pass


class Checkpoints:
    def __init__(self, output_dir: str | Path, keep_last: int = 3, keep_every: int = 0):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last, self.keep_every = keep_last, keep_every

    def latest(self) -> Path | None:
        ptr = self.root / POINTER
        if not ptr.exists():
            return None
        path = self.root / ptr.read_text().strip()
        return path if path.is_dir() else None

    def resolve(self, resume: str) -> Path | None:
        """'' -> None; 'auto' -> the latest complete checkpoint (None if there is none); a path -> that path."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / "trainer_state_0.json").exists():
            raise CheckpointError(f"resume={resume}: not a mimtrain training checkpoint (no trainer_state_0.json)")
        return path

    def save(self, accelerator, step: int, rank_state: dict, config_text: str) -> Path:
        """Collective: every process calls it. Returns the final directory."""
        name = f"step-{step:08d}"
        tmp, final = self.root / f"tmp-{name}", self.root / name
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if os.environ.get(PAUSE_ENV):
            time.sleep(float(os.environ[PAUSE_ENV]))
        _atomic_write(tmp / f"trainer_state_{accelerator.process_index}.json", json.dumps(rank_state))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "config.yaml").write_text(config_text)
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _atomic_write(self.root / POINTER, name + "\n")
            self._prune(keep=final)
        accelerator.wait_for_everyone()
        return final

    def _prune(self, keep: Path) -> None:
        steps = {int(p.name.split("-")[1]): p for p in self.root.glob("step-*") if p.is_dir()}
        kept = retained(list(steps), self.keep_last, self.keep_every)
        for step, old in steps.items():
            if step not in kept and old != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("tmp-step-*"):  # left by a process killed mid-save
            shutil.rmtree(stale, ignore_errors=True)


def retained(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The checkpoint steps to keep: the `keep_last` latest (all when 0) and every multiple of `keep_every`."""
    ordered = sorted(steps)
    keep = set(ordered[-keep_last:] if keep_last > 0 else ordered)
    return keep | ({s for s in ordered if s % keep_every == 0} if keep_every > 0 else set())


def saved_with(ckpt: Path) -> str:
    """"deepspeed" | "fsdp" | "ddp": which engine wrote the checkpoint (their files differ)."""
    if (ckpt / "pytorch_model").is_dir():
        return "deepspeed"
    if any(ckpt.glob("pytorch_model_fsdp*")):
        return "fsdp"
    return "ddp"


def read_rank_state(ckpt: Path, rank: int) -> dict:
    path = ckpt / f"trainer_state_{rank}.json"
    if not path.exists():
        raise CheckpointError(f"{ckpt} has no state for process {rank} (saved with fewer processes?)")
    return json.loads(path.read_text())


def checkpoint_config(ckpt: Path) -> dict:
    return yaml.safe_load((ckpt / "config.yaml").read_text())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
