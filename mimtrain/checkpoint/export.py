"""Writing an export directory, one way for every writer (`mimtrain export`, the end of fine-tuning):
`encoder.safetensors` + `config.yaml` (the spec and the normalisation evaluation follows), and timm's
`config.json` + `model.safetensors` beside them (`formats.write_timm_layout`).

`mimtrain export` (every format) never lands in another writer's folder (`check_target`, before anything is read
or written): not a run directory or anything under its run files (`checkpoints/` with its `step-N` and `latest`,
`tensorboard/`), not inside another run, a checkpoint or an export, not its own source, and not a non-empty folder
unless `--overwrite`. The files are written into a staging folder first and moved into place at the end (`staged`),
so a failed or killed export leaves the target as it was, or, with `--overwrite`, each file old or new, never cut.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor, nn

from mimtrain.checkpoint.encoder import (CONFIG_FILE, ENCODER_FILE, EncoderSpec, LoadError, load_into, read_source,
                                         resolve)
from mimtrain.checkpoint.folders import RUN_FILES, folder_kind
from mimtrain.checkpoint.formats import export_hf, export_timm_vit, label_names, write_timm_layout
from mimtrain.config.errors import ConfigError, OutputPathError

FORMATS = ("mimtrain", "timm-vit", "hf")
FINAL_EXPORT = "final"  # the fine-tuned model a fine-tuning run writes into its own directory


class ExportTargetError(OutputPathError):
    """An export folder `mimtrain export` must not write into (the CLI: one line, exit 2; nothing is written)."""


def write_export(out: str | Path, state: dict[str, Tensor] | nn.Module, spec: EncoderSpec, data: dict | None = None,
                 source: str = "", train_urls: list[str] | None = None) -> Path:
    """The export directory `out` for the encoder `spec` with weights `state` (a state dict or the module).
    `data`: {mean, std} it was trained with (evaluation follows them); `train_urls`: labelled shards whose
    classes.json names the classifier's outputs (written into timm's config)."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / ENCODER_FILE))
    meta = {"encoder": asdict(spec), "source": source}
    if data:
        meta["data"] = data
    (out / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
    n_cls = int(spec.kwargs.get("num_classes", 0))
    names = label_names(train_urls, n_cls) if train_urls and n_cls else None
    write_timm_layout(out, spec, data or {}, names)
    return out


def write_classifier_export(out: str | Path, model: dict[str, Tensor] | nn.Module, spec: EncoderSpec, img_size: int,
                            num_classes: int, data: dict, train_urls: list[str]) -> Path:
    """A fine-tuned classifier: the spec at the fine-tuning size with its head's class count, so it rebuilds whole."""
    spec = replace(spec, img_size=img_size, kwargs={**spec.kwargs, "num_classes": num_classes})
    return write_export(out, model, spec, data, "finetune", train_urls)


def export(src: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """`mimtrain export`: the export directory from any source that carries a config (run, checkpoint, export).
    Refused (ExportTargetError) as `check_target` says, before anything is read or written."""
    p = resolve(src)
    check_target(out_dir, overwrite, src, p)
    source = read_source(p)
    if source.spec is None:
        raise LoadError(f"{p} is a plain state dict: it carries no config to export (load it with "
                        "--from and encoder.name instead)")
    with torch.device("meta"):  # check that the weights rebuild the architecture without allocating it
        model = source.spec.build()  # a fine-tuned classifier's spec carries its num_classes, an encoder's none
    load_into(model, {k: v.to("meta") for k, v in source.state.items()}, source.where, source.spec.describe(),
              new_head=False)
    data = None
    if p.is_dir() and (p / CONFIG_FILE).is_file():  # the normalisation it was trained with: evaluation follows it
        found = (yaml.safe_load((p / CONFIG_FILE).read_text()) or {}).get("data") or {}
        data = {k: found[k] for k in ("mean", "std") if k in found}
    with staged(out_dir) as tmp:
        write_export(tmp, source.state, source.spec, data, str(p))
    return Path(out_dir)


def export_as(fmt: str, src: str | Path, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """`mimtrain export --format FMT`: "mimtrain" (`export`), "timm-vit" (`formats.export_timm_vit`) or "hf"
    (`formats.export_hf`: `vit/`, and `vitmae/` from an MAE training checkpoint), each behind `check_target` and
    `staged`. Returns what was written, as paths under `out_dir`."""
    if fmt == "mimtrain":
        return [export(src, out_dir, overwrite)]
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    check_target(out_dir, overwrite, src, resolve(src))
    with staged(out_dir) as tmp:
        if fmt == "timm-vit":
            export_timm_vit(src, tmp)
            return [Path(out_dir)]
        return [Path(out_dir) / p.name for p in export_hf(src, tmp)]


def check_target(out_dir: str | Path, overwrite: bool, src: str | Path, resolved: Path | None = None) -> None:
    """Raise ExportTargetError, writing nothing, when `out_dir` is not a folder `mimtrain export` may write into:

    - the source being exported (`src`, or the checkpoint or export it `resolved` to), inside it, or holding it;
    - a run directory or a training checkpoint (`step-N`, or `latest` through a link), or inside either, or inside
      an export (refused even with `overwrite`: the run's files would change, a checkpoint cut to the encoder would
      be rejected by the next `resume=auto`);
    - inside the source's own run too, except a folder of its own beside the run files (`runs/X/export`; never
      under `checkpoints/`, `tensorboard/` or the fine-tuned `final/`);
    - not a folder (a file, such as the `latest` pointer), or under a file;
    - not empty, unless `overwrite` (an earlier export, or the user's own files: the export's files replace their
      namesakes, nothing else is touched)."""
    given = Path(out_dir)
    out = given.resolve()
    if folder_kind(out) in ("a run", "a training checkpoint"):
        raise ExportTargetError(f"OUT_DIR {given} is {folder_kind(out)}: export never writes into one (it would "
                                "replace the run's files); choose a new folder")
    src_path = Path(src).resolve()
    own_run = next((a for a in (src_path, *src_path.parents) if folder_kind(a) == "a run"), None)
    # What is read: the checkpoint or export the source resolved to (of a run directory, only its checkpoint: the
    # folders beside its run files stay open, below).
    read = {Path(resolved).resolve() if resolved is not None else src_path} | ({src_path} - {own_run})
    for s in read:
        if out == s or s in out.parents or out in s.parents:
            how = "is" if out == s else "lies inside" if s in out.parents else "holds"
            raise ExportTargetError(f"OUT_DIR {given} {how} the source being exported ({s}): choose another folder")
    for folder in out.parents:
        if folder.exists() and not folder.is_dir():
            raise ExportTargetError(f"OUT_DIR {given} cannot be created: {folder} is a file, not a folder")
        kind = folder_kind(folder)
        if kind == "a run" and folder == own_run:
            parts = out.relative_to(folder).parts
            if parts[0] in (*RUN_FILES, FINAL_EXPORT):
                where = "is" if len(parts) == 1 else "lies inside"
                raise ExportTargetError(f"OUT_DIR {given} {where} {parts[0]}/ of the run {folder}: export never "
                                        f"writes there; use a folder of its own (e.g. {folder}/export)")
        elif kind:
            raise ExportTargetError(f"OUT_DIR {given} lies inside {'another run' if kind == 'a run' else kind} "
                                    f"({folder}): export never writes there; choose a folder of its own")
    if given.exists() and not given.is_dir():
        raise ExportTargetError(f"OUT_DIR {given} is a file, not a folder")
    kind = folder_kind(out)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        names = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ExportTargetError(f"OUT_DIR {given} is not empty ({kind or 'a folder'} holding {names}): pass "
                                "--overwrite to replace the export's files in it, or choose a new or empty folder")


@contextlib.contextmanager
def staged(out_dir: str | Path) -> Iterator[Path]:
    """A fresh folder to write an export into; when the block ends without an error, its entries replace their
    namesakes in `out_dir` (each by one rename; a folder such as hf's `vit/` replaced whole), or, when `out_dir` did
    not exist, the folder becomes `out_dir` by one rename. On an error the staging folder is removed and `out_dir`
    is as it was."""
    out = Path(out_dir)
    existed = out.is_dir()
    if not existed:
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out if existed else out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the export folder's mode
    try:
        yield tmp
        if not existed:
            os.replace(tmp, out)
            return
        for entry in sorted(tmp.iterdir()):
            dest = out / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
