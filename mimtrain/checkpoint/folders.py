"""What a folder on disk is to mimtrain: a run directory, a training checkpoint, an export, or none of them.

One recogniser for every writer that must not land in another's folder: the run-directory claim
(`engine/rundir.py`) and `mimtrain export` (`checkpoint/export.py`). It sits in the checkpoint layer because the
markers are the files that layer and the run writer put there, and export (below engine) needs it too.
"""
from __future__ import annotations

from pathlib import Path

# What makes a directory a used run directory (claimed by a run, or written by one).
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "tensorboard")
CHECKPOINT_MARKER = "trainer_state_0.json"  # in every mimtrain training checkpoint, whatever engine wrote the model
EXPORT_MARKERS = ("encoder.safetensors", "model.safetensors")  # ours, and timm's layout (a DDP checkpoint's too)


def holds_run(out: Path) -> list[str]:
    """The run files `out` holds (empty: a new or unused directory)."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()] + sorted(p.name for p in out.glob("keys_rank*.txt"))


def folder_kind(folder: Path) -> str | None:
    """What `folder` holds that no other command may write into: "a training checkpoint", "an export", "a run", or
    None (not a directory, or none of them). A checkpoint is told by its training state or its `step-N` name (a
    `tmp-step-N` one is being written), before the weights file it shares with an export."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / CHECKPOINT_MARKER).is_file() or folder.name.startswith(("step-", "tmp-step-")):
        return "a training checkpoint"
    if any((folder / name).is_file() for name in EXPORT_MARKERS):
        return "an export"
    return "a run" if holds_run(folder) else None
