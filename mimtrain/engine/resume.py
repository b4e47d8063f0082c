"""What a checkpoint records about training progress, and how a run continues from it (every command's).

With the same layout (processes x DataLoader workers) the resume is exact: every worker's stream restarts where it
stopped. With another layout the streams' runs of samples differ (`data/stream.py`), so which
samples were read cannot carry over; the count of samples read this epoch does, and each new stream skips its share of
it (`rederive`). Only ZeRO's optimizer partitions are bound to the number of processes: such a change is refused.
"""
from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mimtrain.checkpoint.state import CheckpointError, checkpoint_config, read_rank_state, saved_with, tensors_only
from mimtrain.engine.distributed import is_deepspeed, launch_mode


@dataclass
class TrainState:
    """Where training stands; one per process, saved as JSON in every checkpoint (no pickles)."""
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    consumed: int = 0  # micro-batches consumed in this epoch (this process)
    streams: dict = field(default_factory=dict)  # stream -> [pass, raw samples read], at the last consumed batch
    skipped: dict = field(default_factory=dict)  # stream -> undecodable samples met this epoch
    skipped_before: int = 0  # skipped in earlier epochs / before the resume
    num_streams: int = 1
    world_size: int = 1
    extra: dict = field(default_factory=dict)  # the loop's meter and log position, and the task's own state

    @classmethod
    def from_saved(cls, saved: dict) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def position(self) -> dict:
        return {"consumed": self.consumed, "streams": self.streams}

    def take(self, batch: dict) -> None:
        """A shard stream's batch: where its stream stands after it (see `data.stream`)."""
        stream, pass_, raw = (int(v) for v in batch["pos"])
        self.streams[str(stream)] = [pass_, raw]
        self.skipped[str(stream)] = int(batch["skipped"])
        self.consumed += 1

    def next_epoch(self) -> None:
        self.skipped_before += sum(self.skipped.values())
        self.epoch, self.consumed, self.streams, self.skipped = self.epoch + 1, 0, {}, {}

    @property
    def total_skipped(self) -> int:
        return self.skipped_before + sum(self.skipped.values())


def restore(ckpt: Path, cfg, accelerator, fresh: TrainState, check: Callable[[dict], None] | None = None,
            shard_stream: bool = True) -> TrainState:
    """Load model, optimizer, RNG and registered states (EMA weights) from `ckpt`; return this process's state.

    check(saved config) raises CheckpointError when the checkpoint holds another run (another encoder, method or
    task). A run on a shard stream continues on another process/worker layout (`rederive`); other sources, whose
    position is a count of batches of one process, only on the same layout."""
    saved = checkpoint_config(ckpt)
    if check is not None:
        check(saved)
    old_world, kind, mode = saved["derived"]["world_size"], saved_with(ckpt), launch_mode()
    if kind != mode:
        raise CheckpointError(f"{ckpt} was written under {kind} and this launch is {mode}: their training states "
                              f"differ; resume with the {kind} launch config (or `mimtrain export` the encoder)")
    if is_deepspeed(accelerator) and old_world != accelerator.num_processes:
        raise CheckpointError(
            f"{ckpt} holds DeepSpeed ZeRO optimizer partitions of {old_world} processes; this launch has "
            f"{accelerator.num_processes}. ZeRO partitions are bound to the process count: resume with "
            f"--num_processes {old_world}, or convert the checkpoint to DeepSpeed's universal format "
            "(`python -m deepspeed.checkpoint.ds_to_universal`), which mimtrain does not load; "
            "`mimtrain export` still consolidates its encoder")
    if not shard_stream and old_world != accelerator.num_processes:
        raise CheckpointError(f"{ckpt} was written by {old_world} process(es) and this launch has "
                              f"{accelerator.num_processes}: this command's batch order depends on the process count; "
                              f"resume with --num_processes {old_world}")
    try:
        with tensors_only():  # DeepSpeed's engine asks torch.load for full unpickling; weights only, as everywhere
            accelerator.load_state(str(ckpt))
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{ckpt} holds objects other than tensors (refused: loading them would run code): "
                              f"{str(e).splitlines()[-1] if str(e) else e!r}") from None
    ranks = [TrainState.from_saved(read_rank_state(ckpt, r)) for r in range(old_world)]
    mine = ranks[min(accelerator.process_index, old_world - 1)]
    if (mine.world_size, mine.num_streams) == (fresh.world_size, fresh.num_streams):
        return mine
    state = rederive(ranks, saved["train"]["batch_size"], cfg, fresh, accelerator.process_index)
    state.extra = {k: v for k, v in mine.extra.items() if k != "meter"}  # the loss sums were another layout's
    accelerator.print(f"resume: {mine.world_size} processes x {mine.num_streams} workers -> {fresh.world_size} x "
                      f"{fresh.num_streams}; epoch {state.epoch} continues after ~{state.consumed} batches per process "
                      "(which samples: approximate; see docs/training.md)")
    return state


def rederive(ranks: list[TrainState], old_batch: int, cfg, fresh: TrainState, rank: int) -> TrainState:
    """This process's position under a new layout, from every old process's state.

    Exact: step, epoch, the number of samples read this epoch (rounded down to whole new accumulation windows) and
    the skipped-sample count. Approximate: which samples those were. Each new stream skips its share of the count from
    the front of its own (deterministic) order, so a few samples may be seen twice or not at all in this epoch.
    """
    batch, accum, w = cfg.train.batch_size, cfg.train.grad_accum, fresh.num_streams
    seen = sum(r.consumed for r in ranks) * old_batch  # samples read this epoch, all processes together
    consumed = seen // (batch * fresh.world_size) // accum * accum  # micro-batches of this process
    # Stream s of a process supplies batches s, s + w, ... (DataLoader round-robin), as in ShardStream._quota.
    streams = {str(s): [0, (consumed // w + (s < consumed % w)) * batch] for s in range(w)}
    skipped = sum(r.total_skipped for r in ranks) if rank == 0 else 0  # logs sum the processes' counts
    return TrainState(step=ranks[0].step, epoch=ranks[0].epoch, consumed=consumed, streams=streams,
                      skipped_before=skipped, num_streams=w, world_size=fresh.world_size)
