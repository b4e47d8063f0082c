"""Preemption: SIGTERM, SIGUSR1, SIGINT or SIGHUP makes every process finish its step, write one checkpoint and exit
0 (every training command: they all run `engine.fit`).

A signal lands on one host (SLURM signals every task; a node drain or `kill` may reach only one process), so the
processes agree on the stop step by a max-reduce of the local flags. The reduce runs on a gloo group of host (CPU)
tensors: under NCCL a device all-reduce + `.item()` would be a host-device sync every step; on the host it is one
small TCP round trip between processes that are already in step with each other (0.13 ms measured between two
processes on one 2-core host; about a network round trip across nodes). `train.preempt_check_every` spaces the checks
out for slow networks; the two minutes that launch/slurm/pretrain.sbatch asks for (`--signal=B:USR1@120`) are far
more than a few steps. SIGINT (Ctrl-C, or `kill -INT` of the main process) stops the same way; a second SIGINT quits
at once.

DataLoader workers never outlive the loop that reads them (`shield_workers`): they ignore the stop signals (the main
process decides when to stop), so whenever the loop ends, by a worker's error, a worker killed by the OS, an exception
in the step or at interpreter exit, the main process shuts them down itself and SIGKILLs any that do not go; and a
worker dies with its parent (Linux `PR_SET_PDEATHSIG`), so a main process killed outright leaves no orphan.
"""
from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import signal
import sys
import weakref
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)  # SIGHUP: a closed terminal or ssh session


class Preemption:
    """`install()` before the first step; every process calls `should_stop(step)` after every optimizer step."""

    def __init__(self, check_every: int = 1, timeout_s: int = 0):
        self.check_every = max(1, check_every)
        self.timeout_s = timeout_s  # train.dist_timeout_s, for the gloo group made under NCCL (0 = torch's default)
        self.requested: int | None = None  # the signal received on this host
        self._previous: dict = {}
        self._group = None

    def install(self) -> Preemption:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Collective: every process creates the group at the same point (here, before the first step).
            host_ok = "gloo" in dist.get_backend()  # "gloo", or "cuda:nccl,cpu:gloo" (CPU tensors go over gloo)
            timeout = timedelta(seconds=self.timeout_s) if self.timeout_s else None
            self._group = dist.group.WORLD if host_ok else dist.new_group(backend="gloo", timeout=timeout)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.requested == signal.SIGINT:  # the second Ctrl-C: quit now, without a checkpoint
                raise KeyboardInterrupt
            print("interrupted: finishing this step and writing a checkpoint (interrupt again to quit at once)",
                  file=sys.stderr, flush=True)
        self.requested = signum

    def should_stop(self, step: int) -> bool:
        """Called by every process after every optimizer step; True on all of them at the same step."""
        if step % self.check_every:
            return False
        flag = self.requested is not None
        if self._group is None:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)  # host-only collective (gloo), see module doc
        return bool(t.item())

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def shield_workers(loader) -> Iterator:
    """Iterate `loader` with workers that ignore the stop signals and never outlive the iteration.

    SLURM and torchrun signal the whole process group (SLURM's cgroup tracking even every process of the step), and
    torch's workers die on a SIGTERM that their parent did not send (DataLoader.cpp); the main process would then fail
    on the dead worker before it could checkpoint. So the workers ignore the stop signals (`SIGNALS`), and the main
    process must stop them itself on every way out: multiprocessing's own exit handler stops daemonic children with
    SIGTERM and then waits for them forever."""
    loader.worker_init_fn = _init_worker
    before = set(multiprocessing.active_children())
    try:
        it = iter(loader)
    except BaseException:  # e.g. a worker killed while they start: no iterator to stop, so stop what it started
        _kill_quietly(set(multiprocessing.active_children()) - before)
        raise
    _LIVE.add(it)
    try:
        yield from it
    finally:  # exhausted, closed (the caller's `break`) or a worker's error raised through `next`
        _LIVE.discard(it)
        stop_workers(it)


_LIVE: weakref.WeakSet = weakref.WeakSet()  # iterators whose loop may have ended by an exception in its body


def stop_workers(it) -> None:
    """Shut a DataLoader iterator's workers down (torch's own shutdown), then SIGKILL any still alive."""
    shutdown = getattr(it, "_shutdown_workers", None)  # single-process iterators have no workers
    if shutdown is None:
        return
    try:
        shutdown()
    finally:
        for w in getattr(it, "_workers", []):
            _kill(w)


def _kill(process) -> None:
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=5)


def _kill_quietly(processes) -> None:
    """SIGKILL `processes` while torch's SIGCHLD handler, which raises on each worker death it still tracks, is held
    off; the error it then raises is the one already being handled."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        for p in processes:
            _kill(p)
    finally:
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        except RuntimeError:
            pass


@atexit.register  # runs before multiprocessing's exit handler (registered earlier), which would wait on the workers
def _stop_all() -> None:
    for it in list(_LIVE):
        stop_workers(it)


def _init_worker(worker_id: int) -> None:  # module level: picklable for spawn/forkserver workers
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):  # die with the main process, even if it is SIGKILLed (torch polls ~5 s)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
