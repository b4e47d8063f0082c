"""Hub-style save/load of timm-native encoders: `model.safetensors` + a timm `config.json`, on a local directory or a
Hugging Face Hub repository (through `huggingface_hub`).

The directory is timm's own hub layout (architecture, num_classes, model_args, pretrained_cfg with the preprocessing,
label_names), so `timm.create_model("hf-hub:<repo>")` (or `"local-dir:<dir>"` on timm releases that have it) loads it
too, as long as `import mimtrain` has registered the architecture. See docs/export.md.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import timm
from safetensors.torch import save_file
from torch import nn

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# create_model arguments that describe one call, not the architecture
_RUNTIME_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only", "out_indices", "device",
                 "dtype", "drop_path_rate", "drop_rate", "pretrained_model_args")


def timm_config(model: nn.Module, model_args: dict | None = None, data_config: dict | None = None,
                label_names: list[str] | None = None) -> dict:
    """timm's hub config for `model` (built by `timm.create_model`, so it has a pretrained_cfg).

    Args:
        model_args: the create_model arguments that rebuild the architecture (default: those timm recorded).
        data_config: the preprocessing the weights were trained with: input_size or img_size, mean, std,
            interpolation, crop_pct.
        label_names: class names, one per classifier output.
    """
    args = dict(model_args if model_args is not None else getattr(model, "_model_args", {}))
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items() if k not in _RUNTIME_ARGS}
    args.pop("num_classes", None)  # top level
    pcfg = {k: v for k, v in model.pretrained_cfg.items()
            if v is not None and k not in ("state_dict", "file", "url", "hf_hub_id", "source", "architecture", "tag")}
    data = dict(data_config or {})
    if "img_size" in data:
        size = data.pop("img_size")
        data["input_size"] = (3, *((size, size) if isinstance(size, int) else size))
    pcfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in data.items()})
    pcfg["num_classes"] = model.num_classes
    if label_names is not None and len(label_names) != model.num_classes:
        raise ValueError(f"{len(label_names)} label names for a {model.num_classes}-class model")
    cfg = {"architecture": model.pretrained_cfg["architecture"], "num_classes": model.num_classes,
           "num_features": model.num_features, "model_args": args, "pretrained_cfg": pcfg}
    if label_names:
        cfg["label_names"] = list(label_names)
    return cfg


def save_pretrained(model: nn.Module, save_dir: str | Path, model_args: dict | None = None,
                    data_config: dict | None = None, label_names: list[str] | None = None) -> Path:
    """Write `model.safetensors` (the model's own state dict) and `config.json` (see `timm_config`)."""
    out = Path(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = timm_config(model, model_args, data_config, label_names)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def _files(path_or_repo: str | Path, revision: str | None) -> tuple[Path, Path]:
    local = Path(path_or_repo)
    if local.is_dir():
        if not (local / CONFIG_FILE).is_file() or not (local / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{local} is not a saved model: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        return local / CONFIG_FILE, local / WEIGHTS_FILE
    from huggingface_hub import hf_hub_download  # a Hub repo id (honours HF_HUB_OFFLINE and the local cache)

    repo = str(path_or_repo)
    return (Path(hf_hub_download(repo, CONFIG_FILE, revision=revision)),
            Path(hf_hub_download(repo, WEIGHTS_FILE, revision=revision)))


def from_pretrained(path_or_repo: str | Path, revision: str | None = None, **kwargs) -> nn.Module:
    """Rebuild a saved model (a directory written by `save_pretrained` / `mimtrain export`, or a Hub repo id) and load
    its weights strictly. `kwargs` go to `timm.create_model` (e.g. num_classes=10 for a new head, features_only=True).
    """
    import mimtrain.encoders  # noqa: F401  (registers our architectures)

    config_file, weights = _files(path_or_repo, revision)
    cfg = json.loads(config_file.read_text())
    pcfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["pretrained_cfg"].items()}
    pcfg.pop("label_names", None)
    args = {**cfg.get("model_args", {}), "num_classes": cfg["num_classes"], **kwargs}
    model = timm.create_model(cfg["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(pcfg, file=str(weights)), **args)
    model.label_names = cfg.get("label_names")
    return model


def push_to_hub(model: nn.Module, repo_id: str, private: bool = True, token: str | None = None,
                **save_kwargs) -> str:
    """Save as `save_pretrained` does and upload the directory to the Hub repo `repo_id` (created if missing).

    Needs network access and a token (`huggingface-cli login`); not exercised by the offline test suite.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, **save_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message="mimtrain export").commit_url
