"""Strict, explained loading of encoder weights (writing exports: `checkpoint/export.py`).

A source is any of: a pretraining run directory (its latest complete checkpoint), a checkpoint directory
(`model.safetensors` holding the method's state dict: encoder keys under `encoder.`, decoder keys beside them, plus the
resolved `config.yaml`), an export directory (`encoder.safetensors` + `config.yaml`), or a plain weights file
(`.safetensors`, or `.pth/.pt/.bin` read with `torch.load(weights_only=True)`: a timm or official-MAE ViT state dict,
possibly nested under `model`). Nothing is unpickled beyond tensors, so loading never executes code: a DeepSpeed
checkpoint (`pytorch_model/`, ZeRO-1/2/3) is consolidated by DeepSpeed's `zero_to_fp32` with every `torch.load` forced
to weights_only (tensors plus DeepSpeed's plain-data state classes), after a scan that refuses, naming the file, any
archive referencing other code. FSDP's sharded checkpoints (`pytorch_model_fsdp_0/`, torch.distributed.checkpoint) are
merged by accelerate's `merge_fsdp_weights`, once their pickled `.metadata` index has been scanned the same way. Either
way the encoder comes out whole, in fp32. Checkpoint directories are read back (`verify`) before use: a truncated or
damaged file is refused by name, and a run directory resolves exactly as `resume=auto` does, to its newest complete
checkpoint.

Loading is strict: before any training step, every missing, unexpected or differently shaped tensor is listed, and a
checkpoint of one architecture is refused for another with a message naming both. Only what a new task is expected to
replace passes silently: the classification head, and index buffers the model rebuilds for its own geometry.
Tables bound to the input size (absolute position embeddings, relative position bias tables) are resized when the
evaluation resolution differs from pretraining.
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor, nn

from mimtrain.encoders import build_encoder
from mimtrain.encoders.base import classifier_keys
from mimtrain.encoders.timm_glue import DERIVED_BUFFERS, fit_state_dict
from mimtrain.checkpoint.state import (Checkpoints, _check_safetensors, pickle_imports, refuse_code, tensors_only,
                                       verify)
from mimtrain.config.errors import BadFileError, MissingPathError, UserError
from mimtrain.methods import mask_mode_for

ENCODER_FILE = "encoder.safetensors"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"  # accelerate save_state's name for the (first) prepared model
TRAIN_STATE = "trainer_state_0.json"  # in every mimtrain training checkpoint, whatever engine wrote the model
DEEPSPEED_DIR = "pytorch_model"  # accelerate save_state under DeepSpeed: the engine's checkpoint (tag) directory
FSDP_SHARDED_DIR = "pytorch_model_fsdp_0"  # ... under FSDP with a sharded state dict (torch.distributed.checkpoint)
FSDP_FULL_FILE = "pytorch_model_fsdp.bin"  # ... under FSDP with a full state dict


class LoadError(UserError, ValueError):
    """A checkpoint that cannot be loaded as asked (message lists what does not fit); the CLI exits 2."""


class BadWeightsFile(LoadError, BadFileError):
    """A weights file or checkpoint folder that is not what it should be (foreign, truncated, unsafe); exit 3."""
    exit_code = 3


@dataclass
class EncoderSpec:
    """What rebuilds an encoder: registered name, architecture kwargs, pretraining size, mask unit and mode."""
    name: str
    kwargs: dict = field(default_factory=dict)
    img_size: int | list[int] = 224
    mask_unit: int = 0  # 0 = the encoder's default
    mask_mode: str = ""  # "" = the encoder's default

    def build(self, img_size: int | None = None, **extra) -> nn.Module:
        """The encoder at `img_size` (default: the pretraining size); `extra` adds num_classes, drop_path_rate."""
        kwargs = {**self.kwargs, **extra}
        if self.mask_mode:
            kwargs["mask_mode"] = self.mask_mode
        size = img_size or self.img_size
        return build_encoder(self.name, tuple(size) if isinstance(size, list) else size,
                             mask_unit=self.mask_unit or None, **kwargs)

    def describe(self) -> str:
        return self.name + (f" {self.kwargs}" if self.kwargs else "")


@dataclass
class Source:
    state: dict[str, Tensor]  # encoder keys (no `encoder.` prefix)
    spec: EncoderSpec | None  # None for plain state dicts, which carry no architecture
    where: str  # for messages


# ---------------------------------------------------------------------------------------------------------- reading

def resolve(path: str | Path) -> Path:
    """Run dir -> its latest complete checkpoint; checkpoint, export dir or weights file -> itself."""
    p = Path(path)
    if not p.exists():
        raise MissingPathError(f"checkpoint not found: {p}")
    if p.is_file() or (p / ENCODER_FILE).is_file() or (p / MODEL_FILE).is_file() or (p / TRAIN_STATE).is_file():
        return p
    if (p / "checkpoints").is_dir():  # the checkpoint resume=auto would take (CheckpointError if none is complete)
        newest, rejected = Checkpoints(p).newest_complete()
        if newest is None:
            raise LoadError(f"{p} is a run directory without a checkpoint")
        for bad, why in rejected:
            print(f"{p}: skipping {bad.name}: {why}", file=sys.stderr)
        return newest
    if any(p.glob("*zero_pp_rank*")) or any(p.glob("*_fsdp*")):
        raise LoadError(f"{p} holds sharded DeepSpeed/FSDP states: pass the mimtrain checkpoint that contains them "
                        "(step-N/, with config.yaml), or the run directory")
    found = sorted(x.name for x in p.iterdir())[:8]
    raise BadWeightsFile(f"{p} is neither a run directory, a checkpoint ({MODEL_FILE}) nor an export ({ENCODER_FILE}); "
                    f"it holds {found}")


def _read_plain(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        sd = _load_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers only: no code runs
        except Exception as e:  # noqa: BLE001 -- junk, truncated or unsafe: never loaded, named in one line
            first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
            raise BadWeightsFile(f"{path} is not a weights file mimtrain can read (expected a .safetensors file or a "
                                 f"torch.save state dict of tensors; {type(e).__name__}: {first})") from None
        for key in ("model", "state_dict", "module"):  # official MAE nests under "model"
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict):
            raise BadWeightsFile(f"{path} does not hold a state dict (got {type(obj).__name__})")
        sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise BadWeightsFile(f"{path} holds no tensors (expected a state dict of the encoder's weights)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # DDP-wrapped saves
    if any(k.startswith("encoder.") for k in sd):  # a method's state dict (encoder + decoder) saved as a file
        sd = _encoder_part(sd)
    return sd


def _encoder_part(method_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A method's state dict -> its encoder's (the decoder and the method's own tokens are dropped)."""
    return {k[len("encoder."):]: v for k, v in method_state.items() if k.startswith("encoder.")}


def _spec_from_pretraining(cfg: dict) -> EncoderSpec:
    enc = cfg["encoder"]
    spec = EncoderSpec(name=enc["name"], kwargs=dict(enc.get("kwargs") or {}), img_size=cfg["data"]["img_size"],
                       mask_unit=int(enc.get("mask_unit") or 0), mask_mode=mask_mode_for(cfg["method"]["name"]))
    if not spec.mask_unit:  # record the encoder's default explicitly, so the export does not depend on it
        with torch.device("meta"):
            spec.mask_unit = spec.build(num_classes=0).mask_unit
    return spec


def read_source(path: str | Path) -> Source:
    """Read encoder weights (and, where the source has one, the spec that rebuilds the encoder)."""
    p = resolve(path)
    if p.is_file():
        return Source(_read_plain(p), None, str(p))
    if (p / ENCODER_FILE).is_file():
        return Source(_load_safetensors(p / ENCODER_FILE), _export_spec(p), str(p))
    if not (p / CONFIG_FILE).is_file():
        raise BadWeightsFile(f"checkpoint {p} has no {CONFIG_FILE}: cannot tell which encoder it holds")
    cfg = verify(p, training_state=False)  # config and weight files read back; a damaged one is named
    if "method" not in cfg:  # fine-tuning, probes, detection, segmentation: their encoder travels in their exports
        task = (cfg.get("derived") or {}).get("task", "evaluation")
        run = p.parent.parent if p.parent.name == "checkpoints" else p
        raise BadWeightsFile(f"{p} is a {task} checkpoint, not a pretraining one: read the export its run wrote "
                             f"instead (fine-tuning: {run / 'best'} or {run / 'final'})")
    return Source(_encoder_part(method_state(p)), _spec_from_pretraining(cfg), str(p))


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file, its layout checked first so a truncated or foreign file is named in one line."""
    try:
        _check_safetensors(path)
    except BadFileError as e:
        raise BadWeightsFile(f"{e} (expected encoder weights in safetensors format)") from None
    return load_file(str(path))


def _export_spec(export_dir: Path) -> EncoderSpec:
    """The EncoderSpec an export's config.yaml records (`encoder:` name, kwargs, img_size, mask_unit, mask_mode)."""
    path = export_dir / CONFIG_FILE
    try:
        cfg = yaml.safe_load(path.read_text())
        return EncoderSpec(**cfg["encoder"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise BadWeightsFile(f"{path} is not a mimtrain export config (expected an `encoder:` mapping of name, "
                             f"kwargs, img_size, mask_unit, mask_mode beside {ENCODER_FILE}; {type(e).__name__}: "
                             f"{str(e)[:120]})") from None


def method_state(ckpt: Path) -> dict[str, Tensor]:
    """The method's whole fp32 state dict from a training checkpoint, consolidating ZeRO and FSDP shards."""
    if (ckpt / MODEL_FILE).is_file():
        return load_file(str(ckpt / MODEL_FILE))
    if (ckpt / DEEPSPEED_DIR).is_dir():  # fp32 master weights from every process's optimizer partition (ZeRO-1/2/3)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        refuse_code(sorted((ckpt / DEEPSPEED_DIR).glob("*.pt")), UNTRUSTED_DEEPSPEED.format(ckpt=ckpt))
        with tensors_only():  # zero_to_fp32 asks torch.load for full unpickling
            merged = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DEEPSPEED_DIR)
        return {k: v.clone() for k, v in merged.items()}  # views into flat partitions: one storage per tensor
    if (ckpt / FSDP_SHARDED_DIR).is_dir():
        from accelerate.utils import merge_fsdp_weights

        _refuse_code_in_dcp_index(ckpt / FSDP_SHARDED_DIR / ".metadata")  # torch.distributed.checkpoint unpickles it
        with tempfile.TemporaryDirectory() as tmp:
            merge_fsdp_weights(str(ckpt / FSDP_SHARDED_DIR), tmp, safe_serialization=True)
            return load_file(f"{tmp}/{MODEL_FILE}")
    if (ckpt / FSDP_FULL_FILE).is_file():
        return torch.load(ckpt / FSDP_FULL_FILE, map_location="cpu", weights_only=True)
    raise BadWeightsFile(f"{ckpt} holds no model weights ({MODEL_FILE}, {DEEPSPEED_DIR}/ or {FSDP_SHARDED_DIR}/): "
                    "was the checkpoint interrupted while being copied?")


UNTRUSTED_DEEPSPEED = ("if you trust it, consolidate it yourself with DeepSpeed's script and pass the result: "
                       "python {ckpt}/zero_to_fp32.py {ckpt} OUT_DIR --safe_serialization --tag pytorch_model")
DCP_INDEX_NAMES = {"torch.distributed.checkpoint.filesystem._StorageInfo", "pathlib.PosixPath", "torch.Size",
                   "torch.serialization._get_layout", "collections.OrderedDict"}


def _dcp_index_type(name: str) -> bool:
    """The records and data types a torch.distributed.checkpoint index holds (exact names: a pickle can reach any
    attribute path, so no prefix is trusted)."""
    import torch.distributed.checkpoint.metadata as records

    module, _, attr = name.rpartition(".")
    if module == records.__name__:
        return isinstance(getattr(records, attr, None), type) and getattr(records, attr).__module__ == module
    if module == "torch" and isinstance(getattr(torch, attr, None), (torch.dtype, torch.layout, torch.memory_format)):
        return True
    return name in DCP_INDEX_NAMES


def _refuse_code_in_dcp_index(path: Path) -> None:
    """torch.distributed.checkpoint reads its `.metadata` with plain pickle: refuse, before it does, an index that
    imports anything beyond its own records and torch's data types (opcodes are scanned; nothing is unpickled)."""
    try:
        names = pickle_imports(path.read_bytes())
    except Exception as e:  # noqa: BLE001 -- unreadable: refused either way
        raise BadWeightsFile(f"{path} is not a readable torch.distributed.checkpoint index: {e}") from None
    unsafe = sorted(n for n in names if not _dcp_index_type(n))
    if unsafe:
        raise BadWeightsFile(f"{path} references {', '.join(unsafe[:4])}: loading it would run code, so it is refused; "
                        "if you trust it, merge it yourself (accelerate merge-weights) and pass the merged file")


# ---------------------------------------------------------------------------------------------------------- fitting

def load_into(model: nn.Module, sd: dict[str, Tensor], where: str, target: str, new_head: bool = True) -> dict:
    """Strictly load encoder weights `sd` into `model`, or raise LoadError listing everything that does not fit.

    Args:
        new_head: the model is for a new task: the checkpoint's classification head (the modules the encoder names
            in `classifier_modules`, see `encoders.base.classifier_keys`) is dropped and the model's (freshly
            initialised) head may be missing from it.

    Returns:
        {"loaded": n, "dropped": [checkpoint keys left out on purpose]}.
    """
    sd = fit_state_dict(model, sd)
    own = model.state_dict()
    head = classifier_keys(model) if new_head else ()  # the encoder's classifier modules: never carried over
    dropped = [k for k in sd if k.startswith(head)]
    sd = {k: v for k, v in sd.items() if k not in dropped}
    missing = [k for k in own if k not in sd and not k.endswith(DERIVED_BUFFERS) and not k.startswith(head)]
    unexpected = [k for k in sd if k not in own and not k.endswith(DERIVED_BUFFERS)]
    shapes = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} tensor(s) differ in shape, e.g. " + "; ".join(shapes[:4]))
        if missing:
            parts.append(f"{len(missing)} missing from the checkpoint: {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} in the checkpoint but not in the model: {_short(unexpected)}")
        raise LoadError(f"cannot load {where} into {target}: " + "; ".join(parts) +
                        " (was the checkpoint trained with another architecture or encoder.kwargs?)")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return {"loaded": len(sd), "dropped": dropped}


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------------------- the API

def choose_spec(source: Source, name: str = "", kwargs: dict | None = None, img_size: int = 224) -> EncoderSpec:
    """The architecture to build: the checkpoint's own; a different requested one is refused (naming both)."""
    kwargs = dict(kwargs or {})
    if source.spec is None:
        if not name:
            raise LoadError(f"{source.where} is a plain state dict with no config: set encoder.name (and "
                            "encoder.kwargs) to the architecture it was trained with")
        return EncoderSpec(name=name, kwargs=kwargs, img_size=img_size)
    spec = source.spec
    if (name and name != spec.name) or (kwargs and kwargs != spec.kwargs):
        asked = name or spec.name
        raise LoadError(f"architecture mismatch: {source.where} holds a {spec.describe()} encoder, but the recipe "
                        f"asks for {asked}{f' {kwargs}' if kwargs else ''}; a checkpoint loads only into the "
                        f"architecture it was trained with (leave encoder.name empty to use {spec.name})")
    return spec


def load_encoder(path: str | Path, name: str = "", kwargs: dict | None = None, img_size: int | None = None,
                 random_init: bool = False, new_head: bool = True, **build_kwargs) -> tuple[nn.Module, EncoderSpec]:
    """Build the checkpoint's encoder at `img_size` (default: its pretraining size) and load its weights strictly.

    Args:
        path: run dir, checkpoint dir, export dir or weights file.
        name, kwargs: the requested architecture ("" / None = the checkpoint's); required for plain state dicts.
        random_init: build the same architecture but keep its random initialisation (a baseline for probes).
        **build_kwargs: num_classes, drop_path_rate, ...
    """
    source = read_source(path)
    spec = choose_spec(source, name, kwargs, img_size or 224)
    model = spec.build(img_size, **build_kwargs)
    if not random_init:
        load_into(model, source.state, source.where, spec.describe(), new_head=new_head)
    return model, spec

