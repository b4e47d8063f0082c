"""Step-numbered training checkpoints that a kill can never leave half-written as the latest.

Layout: `output_dir/checkpoints/step-00001000/` (accelerate `save_state`: model as safetensors, optimizer, RNG states,
plus `trainer_state_<rank>.json` and the resolved `config.yaml`) and `checkpoints/latest`, a one-line pointer.
A checkpoint is written into `tmp-step-...`, renamed into place only when every process has finished writing, and
only then does the pointer move (rename over the old pointer), so `latest` always names a complete directory.
Under DeepSpeed, `save_state` writes the engine's checkpoint (`pytorch_model/`: module states, one ZeRO optimizer
partition per process); under FSDP, sharded model/optimizer directories (`pytorch_model_fsdp_0/`, ...).

A checkpoint is trusted only after `verify` has read it back (a disk, a copy or another program can still damage
one after it was written), and the pointer is only a hint: `newest_complete` takes the newest step directory that
verifies, whatever `latest` says, so resuming and `mimtrain export` always pick the same one.

Retention: the last `keep_last` checkpoints, plus every one whose step is a multiple of `keep_every`, plus the one
`checkpoints/best` names (fine-tuning's best validation top-1; a one-line pointer like `latest`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickletools
import shutil
import struct
import time
import zipfile
from pathlib import Path

import torch
import yaml

from mimtrain.config.errors import BadFileError

POINTER = "latest"
BEST = "best"
# Test hook (tests/test_distributed.py): seconds to sleep inside `save` after the model and optimizer are written and
# before the checkpoint is complete, so a test can SIGKILL a process mid-save. Unset in real runs.
PAUSE_ENV = "MIMTRAIN_TEST_PAUSE_IN_SAVE"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # read by every torch.load call, even weights_only=False ones


class CheckpointError(BadFileError, RuntimeError):
    """A checkpoint that is incomplete, foreign or unsafe to load (the CLI: one line, exit 3)."""


class Checkpoints:
    def __init__(self, output_dir: str | Path, keep_last: int = 3, keep_every: int = 0):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last, self.keep_every = keep_last, keep_every

    def latest(self) -> Path | None:
        """The directory the pointer names (the last one this run completed), or None."""
        ptr = self.root / POINTER
        if not ptr.exists():
            return None
        path = self.root / ptr.read_text().strip()
        return path if path.is_dir() else None

    def best(self) -> Path | None:
        """The directory the best pointer names (kept by retention), or None."""
        ptr = self.root / BEST
        if not ptr.exists():
            return None
        path = self.root / ptr.read_text().strip()
        return path if path.is_dir() else None

    def steps(self) -> list[Path]:
        """Every `step-N` directory, newest first."""
        found = [p for p in self.root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)

    def newest_complete(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The newest checkpoint that reads back whole, and the newer ones that do not, each with the reason.

        Raises CheckpointError when there are checkpoints but none of them is complete: starting over would be
        silent data loss."""
        rejected = []
        for ckpt in self.steps():
            try:
                verify(ckpt)
                return ckpt, rejected
            except CheckpointError as e:
                rejected.append((ckpt, str(e)))
        if rejected:
            raise CheckpointError(f"no complete checkpoint in {self.root}: " + "; ".join(r for _, r in rejected) +
                                  ". Repair or move them away, or start over with overwrite=true")
        return None, rejected

    def set_aside(self, ckpt: Path, tag: str) -> Path:
        """Rename a checkpoint to `<tag>-step-N` (out of reach of resuming, retention and later saves; kept)."""
        dest = ckpt.with_name(f"{tag}-{ckpt.name}")
        if dest.exists():
            dest = ckpt.with_name(f"{tag}-{ckpt.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
        os.replace(ckpt, dest)
        return dest

    def save(self, accelerator, step: int, rank_state: dict, config_text: str, best: bool = False) -> Path:
        """Collective: every process calls it. Returns the final directory. best: also point `best` at it."""
        name = f"step-{step:08d}"
        tmp, final = self.root / f"tmp-{name}", self.root / name
        with _disk_errors(tmp, self.latest()):
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
                _atomic_write(tmp / "config.yaml", config_text)
                _fsync_dir(tmp)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                _atomic_write(self.root / POINTER, name + "\n")
                if best:
                    _atomic_write(self.root / BEST, name + "\n")
                self._prune(keep=final)
        accelerator.wait_for_everyone()
        return final

    def _prune(self, keep: Path) -> None:
        steps = {int(p.name[5:]): p for p in self.steps()}
        kept = retained(list(steps), self.keep_last, self.keep_every)
        best = self.best()
        for step, old in steps.items():
            if step not in kept and old != keep and old != best:
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


# ---------------------------------------------------------------------------------------------------------- reading

def read_rank_state(ckpt: Path, rank: int) -> dict:
    path = ckpt / f"trainer_state_{rank}.json"
    if not path.exists():
        raise CheckpointError(f"{ckpt} has no state for process {rank} (saved with fewer processes?)")
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable (truncated or damaged): {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path} is not a mimtrain training state (no integer 'step')")
    return state


def checkpoint_config(ckpt: Path) -> dict:
    path = ckpt / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path} is unreadable (missing, truncated or damaged): {e}") from None
    # every command's config has these ("method": pretraining's only)
    missing = [k for k in ("encoder", "data", "train", "derived") if not isinstance((cfg or {}).get(k), dict)
               ] if isinstance(cfg, dict) else ["everything"]
    if missing or not isinstance(cfg["derived"].get("world_size"), int):
        raise CheckpointError(f"{path} is incomplete (truncated?): no {', '.join(missing) or 'derived.world_size'}")
    return cfg


def verify(ckpt: Path, training_state: bool = True) -> dict:
    """Read back what loading `ckpt` needs and return its config; raise CheckpointError naming the first file that
    is missing, truncated or not what its name says.

    Cheap: file structure, not every byte: safetensors and torch archives are checked against their own index (a
    truncated file cannot pass), JSON and YAML are parsed. `training_state=False` checks only what rebuilding the
    model needs (config and weights), for export."""
    cfg = checkpoint_config(ckpt)
    world, kind = cfg["derived"]["world_size"], saved_with(ckpt)
    if training_state:
        for rank in range(world):
            read_rank_state(ckpt, rank)
    for name in _required_files(ckpt, kind, world, training_state):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt / name} is missing: the checkpoint is incomplete")
    for path in sorted(ckpt.rglob("*")):
        if path.suffix == ".safetensors":
            _check_safetensors(path)
        elif path.suffix in (".bin", ".pt", ".pkl") and (training_state or path.name != "optimizer.bin"):
            _check_torch_archive(path)
    return cfg


def _required_files(ckpt: Path, kind: str, world: int, training_state: bool) -> list[str]:
    """What `accelerator.save_state` writes for the model (and optimizer). DeepSpeed keeps the fp32 weights in the
    optimizer partitions (export needs them too); ZeRO-3 also splits the module states by process."""
    if kind == "ddp":
        return ["model.safetensors"] + (["optimizer.bin"] if training_state else [])
    if kind == "deepspeed":
        ds = "pytorch_model"
        zero3 = (ckpt / ds / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
        model = ([f"{ds}/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] if zero3
                 else [f"{ds}/mp_rank_00_model_states.pt"])
        return model + [f"{ds}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    return []  # FSDP: torch.distributed.checkpoint directories, checked file by file below


def _check_safetensors(path: Path) -> None:
    """An 8-byte header length, a JSON header, then exactly the bytes its offsets describe."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or damaged): {e}") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path} is truncated or damaged: its header describes {8 + n + end} bytes, the file "
                              f"has {size}")


def _check_torch_archive(path: Path) -> None:
    """torch.save's zip archive: the index sits at the end of the file, so a truncated file has none."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            bad = [i.filename for i in z.infolist() if i.header_offset + i.compress_size > size]
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable torch archive (truncated or damaged): {e}") from None
    if bad:
        raise CheckpointError(f"{path} is truncated: {bad[0]} runs past the end of the file")


# ------------------------------------------------------------------------------------------------ loading, no code

def deepspeed_state_classes() -> list:
    """The plain-data classes DeepSpeed pickles into its optimizer states (a loss scaler, ZeRO's stage enum, the
    addresses of flat-buffer fragments); allowed by `tensors_only` so that ZeRO checkpoints load as weights."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def tensors_only():
    """Every `torch.load` inside (ours, accelerate's and DeepSpeed's, which asks for weights_only=False) runs with
    weights_only=True: tensors, containers and DeepSpeed's plain-data state classes load; anything that would run
    code is refused by torch's weights-only unpickler."""
    old = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_state_classes()):
            yield
    finally:
        if old is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = old


def refuse_code(files: list[Path], how_to_convert: str) -> None:
    """Refuse, naming the file, any torch archive in `files` that references a function or class outside what
    `tensors_only` allows (the scan reads the pickle's opcodes; nothing is unpickled)."""
    with torch.serialization.safe_globals(deepspeed_state_classes()):
        for path in files:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception as e:  # noqa: BLE001 -- not a zip archive or a damaged one: either way, not loaded
                raise CheckpointError(f"{path} is not a torch archive mimtrain can check ({e}); {how_to_convert}"
                                      ) from None
            if unsafe:
                raise CheckpointError(f"{path} holds objects other than tensors ({', '.join(unsafe[:4])}): loading "
                                      f"it would run code, so it is refused; {how_to_convert}")


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def pickle_imports(data: bytes) -> set[str]:
    """Every `module.name` a pickle would import, found by following its stack over the opcodes (nothing runs);
    an import whose name is not a plain string constant shows as `?` (so an allowlist refuses it)."""
    mark, stack, memo, found = object(), [], {}, set()
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            mod, name = (stack[-2:] + [None, None])[:2] if len(stack) >= 2 else (None, None)
            found.add(f"{mod}.{name}" if isinstance(mod, str) and isinstance(name, str) else "?")
        elif op.name.startswith("EXT"):  # copyreg's extension registry: an import by number
            found.add("?")
        if op.name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif op.name.endswith("PUT"):
            memo[arg] = stack[-1] if stack else None
        elif op.name.endswith("GET"):
            stack.append(memo.get(arg))
        else:
            before = op.stack_before
            if pickletools.markobject in before:  # pop down to the mark, then what lies under it
                while stack and stack.pop() is not mark:
                    pass
                before = before[:before.index(pickletools.markobject)]
            del stack[len(stack) - min(len(before), len(stack)):]
            for kind in op.stack_after:
                stack.append(mark if kind is pickletools.markobject else arg if op.name in _STRING_OPS else None)
    return found


# ---------------------------------------------------------------------------------------------------------- writing

@contextlib.contextmanager
def _disk_errors(tmp: Path, latest: Path | None):
    """A failed write (disk full, quota, read-only mount) becomes one message naming the path; the partial
    directory is removed (it is never complete) and the latest checkpoint is untouched."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not _is_write_failure(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else 0
        raise CheckpointError(f"writing checkpoint {tmp} failed: {_describe(e)} ({free / 2**30:.2f} GiB free on that "
                              f"filesystem). The latest complete checkpoint is still {latest or 'none'}: free space "
                              "and continue with resume=auto") from e


def _is_write_failure(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO)
    return "write failed" in str(e) or "No space left" in str(e)  # torch's zip writer reports errno as text


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError):
        return os.strerror(e.errno) + (f" ({e.filename})" if e.filename else "")
    return str(e).splitlines()[0]


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
