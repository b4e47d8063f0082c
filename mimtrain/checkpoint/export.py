"""Writing an export directory, one way for every writer (`mimtrain export`, the end of fine-tuning):
`encoder.safetensors` + `config.yaml` (the spec and the normalisation evaluation follows), and timm's
`config.json` + `model.safetensors` beside them (`formats.write_timm_layout`)."""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor, nn

from mimtrain.checkpoint.encoder import (CONFIG_FILE, ENCODER_FILE, EncoderSpec, LoadError, load_into, read_source,
                                         resolve)
from mimtrain.checkpoint.formats import label_names, write_timm_layout


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


def write_classifier_export(out: str | Path, model: nn.Module, spec: EncoderSpec, img_size: int, num_classes: int,
                            data: dict, train_urls: list[str]) -> Path:
    """A fine-tuned classifier: the spec at the fine-tuning size with its head's class count, so it rebuilds whole."""
    spec = replace(spec, img_size=img_size, kwargs={**spec.kwargs, "num_classes": num_classes})
    return write_export(out, model, spec, data, "finetune", train_urls)


def export(src: str | Path, out_dir: str | Path) -> Path:
    """`mimtrain export`: the export directory from any source that carries a config (run, checkpoint, export)."""
    p = resolve(src)
    source = read_source(p)
    if source.spec is None:
        raise LoadError(f"{p} is a plain state dict: it carries no config to export (load it with "
                        "--from and encoder.name instead)")
    with torch.device("meta"):  # check that the weights rebuild the architecture without allocating it
        model = source.spec.build(num_classes=0)
    load_into(model, {k: v.to("meta") for k, v in source.state.items()}, source.where, source.spec.describe(),
              new_head=False)
    data = None
    if p.is_dir() and (p / CONFIG_FILE).is_file():  # the normalisation it was trained with: evaluation follows it
        found = (yaml.safe_load((p / CONFIG_FILE).read_text()) or {}).get("data") or {}
        data = {k: found[k] for k in ("mean", "std") if k in found}
    return write_export(out_dir, source.state, source.spec, data, str(p))
