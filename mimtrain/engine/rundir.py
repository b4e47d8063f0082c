"""Taking possession of `output_dir` before a run writes anything: one run at a time, no silent restart, nothing
written into what another run or command owns. Every command does it the same way (`Run`).

- Refused before anything is written (the directory stays byte-identical): an output_dir that is, or lies inside,
  the command's `--from` source; one inside another run, training checkpoint or export, or that is a checkpoint or
  export itself; a used one without `resume=` / `overwrite=true`.

- An exclusive lock (a POSIX record lock, `fcntl.lockf`, on `output_dir/.mimtrain.lock`, taken by the main process
  only: the processes of one launch share the directory). The kernel drops it when its holder exits or is killed, so
  a lock left by a dead run is never in the way; the file records host and pid so that a refusal can name a live
  holder. A record lock belongs to one process: DataLoader workers forked from the holder do not inherit it (with
  flock they would, and a killed run's lingering workers would keep the directory locked), and NFS enforces it across
  hosts (a SLURM requeue while the old job still runs). It is also dropped when the holder closes any descriptor of
  the file, so only `RunLock` opens it.
- A directory that already holds a run (checkpoints, metrics, logs) is continued only with `resume=`, or moved aside
  whole to `<output_dir>.old-<UTC time>` with `overwrite=true`; nothing is deleted.
- `resume=auto` takes the newest checkpoint that reads back whole (`Checkpoints.newest_complete`). Newer ones that do
  not are renamed `rejected-step-N`, and a checkpoint newer than an explicitly chosen one `superseded-step-N`, so that
  neither retention nor a later save of the same step can delete them.
"""
from __future__ import annotations

import errno
import json
import fcntl
import os
import socket
import time
from pathlib import Path

from accelerate.utils import broadcast_object_list

from mimtrain.checkpoint.folders import RUN_FILES, holds_run  # noqa: F401  (RUN_FILES: re-exported)
from mimtrain.checkpoint.folders import folder_kind as _kind
from mimtrain.checkpoint.state import CheckpointError, Checkpoints, read_rank_state, verify
from mimtrain.config.errors import UserError

LOCK_FILE = ".mimtrain.lock"


class RunDirError(UserError, ValueError):
    """output_dir cannot be used as asked (in use, or holding a run this command would overwrite)."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            held = e.errno in (errno.EACCES, errno.EAGAIN)
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            if held:
                raise RunDirError(f"{self.path.parent} is in use by another mimtrain run ({holder}): wait for it to "
                                  "end, or use another output_dir") from None
            raise RunDirError(f"cannot lock {self.path}: {os.strerror(e.errno)} (the filesystem must support POSIX "
                              "locks; use another output_dir)") from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {stamp}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def claim(accelerator, output_dir: str, resume: str, overwrite: bool, sources: tuple = ()
          ) -> tuple[RunLock | None, Path | None]:
    """Collective: the main process opens the run directory (`open_run_dir`) and every process learns the outcome,
    so a refusal ends the whole launch at once instead of leaving the other processes waiting on the main one."""
    lock, outcome = None, [None, None]  # [checkpoint to resume from, (error class, message)]
    if accelerator.is_main_process:
        try:
            lock, ckpt = open_run_dir(output_dir, resume, overwrite, say=accelerator.print, sources=sources)
            outcome = [str(ckpt) if ckpt else None, None]
        except (RunDirError, CheckpointError) as e:
            outcome = [None, (type(e).__name__, str(e))]
    outcome = broadcast_object_list(outcome)
    if outcome[1]:
        kind, message = outcome[1]
        raise (RunDirError if kind == "RunDirError" else CheckpointError)(message)
    return lock, Path(outcome[0]) if outcome[0] else None


def open_run_dir(output_dir: str, resume: str, overwrite: bool, say=print, sources: tuple = ()
                 ) -> tuple[RunLock, Path | None]:
    """Main process only: lock `output_dir`, apply the resume/overwrite rules and return the lock and the checkpoint
    to resume from (None: start at step 0). Raises RunDirError / CheckpointError with the ways forward; a refusal
    that needs no lock comes before anything is written (the directory stays byte-identical)."""
    if overwrite and resume:
        raise RunDirError(f"overwrite=true and resume={resume} contradict each other: choose one")
    refuse_output_dir(output_dir, sources)
    out = Path(output_dir)
    used = holds_run(out) if out.is_dir() else []
    if used and not (resume or overwrite):
        raise _used(out, used)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out).acquire()
    try:
        used = holds_run(out)
        if used and overwrite:
            lock = _move_aside(out, lock, say)
        elif used and not resume:
            raise _used(out, used)
        return lock, _checkpoint_to_resume(Checkpoints(out), resume, say)
    except BaseException:
        lock.release()
        raise


def _used(out: Path, used: list[str]) -> RunDirError:
    return RunDirError(f"output_dir {out} already holds a run ({', '.join(used)}). Continue it with resume=auto, or "
                       f"start over with overwrite=true (moves it to {out}.old-<time>; nothing is deleted)")


def _move_aside(out: Path, lock: RunLock, say) -> RunLock:
    """Rename the old run (held under its lock meanwhile) and lock the new, empty directory."""
    dest = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    os.replace(out, dest)
    out.mkdir()
    new = RunLock(out).acquire()
    lock.release()
    say(f"overwrite=true: moved the previous run to {dest}")
    return new


def _checkpoint_to_resume(ckpts: Checkpoints, resume: str, say) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        ckpt, rejected = ckpts.newest_complete()
        for bad, why in rejected:
            moved = ckpts.set_aside(bad, "rejected")
            say(f"resume=auto: skipping {bad.name}: {why}; kept as {moved.name}")
        if ckpt is None:
            say(f"resume=auto: no checkpoint in {ckpts.root}: starting at step 0")
        return ckpt
    ckpt = Path(resume)
    if not (ckpt / "trainer_state_0.json").exists():
        raise CheckpointError(f"resume={resume}: not a mimtrain training checkpoint (no trainer_state_0.json)")
    verify(ckpt)
    if ckpt.resolve().parent == ckpts.root.resolve() and ckpt.name[5:].isdigit():  # an older one of this run
        for newer in [p for p in ckpts.steps() if int(p.name[5:]) > int(ckpt.name[5:])]:
            say(f"resume={resume}: {newer.name} is newer than the checkpoint resumed from; kept as "
                f"{ckpts.set_aside(newer, 'superseded').name}")
    return ckpt


def refuse_output_dir(output_dir: str, sources: tuple = ()) -> None:
    """Refuse an output_dir that is (or lies inside) a command's `--from` source, or lies inside another run,
    checkpoint or export, or is itself a checkpoint or export: writing there would change what another run or
    command reads. Checked before anything is written."""
    out = Path(output_dir).resolve()
    for src in sources:
        s = Path(src).resolve()
        if out == s or s in out.parents:
            raise RunDirError(f"output_dir {output_dir} is {'' if out == s else 'inside '}the --from source {src}: "
                              "the run would write into what it reads; use another output_dir")
    for folder in out.parents:
        kind = _kind(folder)
        if kind:
            raise RunDirError(f"output_dir {output_dir} lies inside {kind} ({folder}): use a folder of its own")
    kind = _kind(out)
    if kind in ("a training checkpoint", "an export"):
        raise RunDirError(f"output_dir {output_dir} is {kind}, not a run directory: use another output_dir")


class Run:
    """The run directory of any training command, claimed before anything is written: refusals
    (`refuse_output_dir`, then `open_run_dir`'s used-directory rule), the lock, the checkpoint to resume from; then
    `start` writes config.yaml (resolved, with derived values) and opens the logger (`metrics.jsonl`, TensorBoard),
    `finish` writes results.json. `close` (always, in a `finally`) releases the lock."""

    def __init__(self, acc, cfg, sources: tuple = ()):
        self.acc, self.cfg, self.dir = acc, cfg, Path(cfg.output_dir)
        self.log = None
        self.lock, self.resume_from = claim(acc, cfg.output_dir, cfg.resume, cfg.overwrite, tuple(map(str, sources)))

    def start(self, config: dict, log_with: str = "tensorboard", hparams: bool = False) -> str:
        """Write config.yaml and open the logger; returns the config's YAML text (saved in every checkpoint)."""
        import yaml

        from mimtrain.engine.logging import RunLogger, keep_rows

        text = yaml.safe_dump(config, sort_keys=False)
        if self.acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.resume_from is not None:
                logged = read_rank_state(self.resume_from, 0).get("extra", {}).get("logged")
                if logged is not None:  # rows of steps after the checkpoint: they are trained (and logged) again
                    keep_rows(self.dir, logged)
            elif self.cfg.resume == "auto":  # nothing to resume: rows of a run killed before its first checkpoint
                keep_rows(self.dir, 0)
            (self.dir / "config.yaml").write_text(text)
        self.log = RunLogger(self.dir, enabled=self.acc.is_main_process, log_with=log_with,
                             hparams=config if hparams else None)
        return text

    def say(self, text: str) -> None:
        """Print on the main process above a running tqdm bar (tqdm.write), not into the middle of it."""
        if self.acc.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(text)

    def finish(self, results: dict) -> dict:
        """results.json (main process)."""
        if self.acc.is_main_process:
            (self.dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        return results

    def close(self) -> None:
        """Close the logger and the accelerator's trackers, release the lock (also dropped if the process dies)."""
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        self.acc.end_training()


TaskRun = Run  # the name the evaluation code used before every command had the same run directory
