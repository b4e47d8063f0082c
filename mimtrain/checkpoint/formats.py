"""The files an export writes for other libraries: timm's hub layout beside ours, plain timm ViT weights, HF ViTMAE.

- `write_timm_layout`: `config.json` (architecture, model_args, pretrained_cfg with the run's preprocessing, class
  names) and `model.safetensors` (a hard link to `encoder.safetensors`), so `timm.create_model(name,
  pretrained=True, pretrained_cfg_overlay=dict(file=...))` and `mimtrain.checkpoint.hub.from_pretrained(dir)` load
  the export.
- `export_timm_vit`: a mim_vit encoder under timm's own `vit_*` key names, loadable without mimtrain.
- `export_hf`: HF transformers' `ViTMAEForPreTraining` (encoder + decoder) and `ViTModel` directories.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from torch import nn

from mimtrain.encoders.vit import to_timm_keys
from mimtrain.checkpoint import hub
from mimtrain.data.stream import class_names
from mimtrain.checkpoint.encoder import ENCODER_FILE, EncoderSpec, LoadError, load_into, read_source, resolve

EVAL_PREPROCESSING = dict(interpolation="bicubic", crop_pct=0.875)  # eval_transform's defaults (data/transforms.py)
VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def _data_config(img_size, data: dict) -> dict:
    return {"img_size": img_size, **EVAL_PREPROCESSING, **{k: tuple(data[k]) for k in ("mean", "std") if k in data}}


def _model_args(spec: EncoderSpec) -> dict:
    args = {k: v for k, v in spec.kwargs.items() if k != "num_classes"}
    args["img_size"] = spec.img_size
    if spec.mask_unit:
        args["mask_unit"] = spec.mask_unit
    if spec.mask_mode:
        args["mask_mode"] = spec.mask_mode
    return args


def write_timm_layout(out: Path, spec: EncoderSpec, data: dict, label_names: list[str] | None = None) -> None:
    """`config.json` + `model.safetensors` beside an export's `encoder.safetensors` (same tensors, same keys)."""
    with torch.device("meta"):  # only the config is read from the model
        model = spec.build(num_classes=int(spec.kwargs.get("num_classes", 0)))
    cfg = hub.timm_config(model, _model_args(spec), _data_config(spec.img_size, data), label_names)
    (out / hub.CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    weights = out / hub.WEIGHTS_FILE
    weights.unlink(missing_ok=True)
    try:
        os.link(out / ENCODER_FILE, weights)  # no second copy of the weights on disk
    except OSError:
        weights.write_bytes((out / ENCODER_FILE).read_bytes())


def label_names(train_urls: list[str], num_classes: int) -> list[str] | None:
    """Class names from make-shards' `classes.json` beside the first train shard (`data.stream.class_names`), when
    it lists exactly the classifier's outputs."""
    names = class_names(train_urls)
    return names if names is not None and len(names) == num_classes else None


def _source_encoder(src: str | Path) -> tuple[nn.Module, EncoderSpec, dict]:
    p = resolve(src)
    source = read_source(p)
    if source.spec is None:
        raise LoadError(f"{p} is a plain state dict: it carries no config to export")
    model = source.spec.build(num_classes=0)
    load_into(model, source.state, source.where, source.spec.describe(), new_head=True)
    cfg_file = p / "config.yaml" if p.is_dir() else None
    data = {}
    if cfg_file is not None and cfg_file.is_file():
        import yaml

        data = (yaml.safe_load(cfg_file.read_text()) or {}).get("data") or {}
    return model.eval(), source.spec, data


def timm_vit_args(model: nn.Module) -> dict:
    """timm VisionTransformer arguments that reproduce our ViT encoder (MAE's global pool over the normed tokens)."""
    vit = model.vit
    if getattr(model, "fc_norm", None) is not None and not isinstance(model.fc_norm, nn.Identity):
        raise LoadError("timm-vit export writes encoders only (build without a classification head)")
    return dict(img_size=[g * model.patch_size for g in model.grid_size], patch_size=model.patch_size,
                embed_dim=model.embed_dim, depth=len(vit.blocks), num_heads=vit.blocks[0].attn.num_heads,
                mlp_ratio=vit.blocks[0].mlp.fc1.out_features / model.embed_dim, global_pool="avg", fc_norm=False)


def export_timm_vit(src: str | Path, out_dir: str | Path) -> Path:
    """A mim_vit encoder as a plain timm `vit_*` model directory (`model.safetensors` + `config.json`)."""
    model, spec, data = _source_encoder(src)
    if not hasattr(model, "vit"):
        raise LoadError(f"--format timm-vit needs a mim_vit_* encoder; this export holds {spec.name}")
    args = timm_vit_args(model)
    name = f"vit_{VIT_SIZES.get(model.embed_dim, 'base')}_patch{model.patch_size}_224"
    arch = name if timm.is_model(name) else "vit_base_patch16_224"  # model_args carry the exact sizes either way
    vit = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    vit.load_state_dict(to_timm_keys(model.state_dict()), strict=True)
    return hub.save_pretrained(vit, out_dir, model_args=args, data_config=_data_config(spec.img_size, data))


# ------------------------------------------------------------------------------------------------ HF transformers

def _hf_block(sd: dict, src: str, dst: str) -> dict:
    """One timm `Block` (fused qkv) -> one HF ViT layer (q/k/v/o projections, transformers 5 names)."""
    q, k, v = sd[f"{src}attn.qkv.weight"].chunk(3)
    qb, kb, vb = sd[f"{src}attn.qkv.bias"].chunk(3)
    out = {f"{dst}attention.q_proj.weight": q, f"{dst}attention.k_proj.weight": k, f"{dst}attention.v_proj.weight": v,
           f"{dst}attention.q_proj.bias": qb, f"{dst}attention.k_proj.bias": kb, f"{dst}attention.v_proj.bias": vb}
    for ours, theirs in (("attn.proj", "attention.o_proj"), ("norm1", "layernorm_before"),
                         ("norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
        for p in ("weight", "bias"):
            out[f"{dst}{theirs}.{p}"] = sd[f"{src}{ours}.{p}"]
    return out


def hf_vit_state(model: nn.Module) -> dict:
    """Our ViT encoder -> HF `ViTModel` keys (by way of timm's ViT names)."""
    sd = to_timm_keys(model.state_dict())
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    for i in range(len(model.vit.blocks)):
        out.update(_hf_block(sd, f"blocks.{i}.", f"layers.{i}."))
    return out


def hf_vit_kwargs(model: nn.Module) -> dict:
    if model.mask_mode != "drop" or model.mask_unit != model.patch_size or model.grid_size[0] != model.grid_size[1]:
        raise LoadError("HF ViT/ViTMAE need an MAE-style ViT (drop mode, one patch per mask unit, square images)")
    blk = model.vit.blocks[0]
    return dict(hidden_size=model.embed_dim, num_hidden_layers=len(model.vit.blocks),
                num_attention_heads=blk.attn.num_heads, intermediate_size=blk.mlp.fc1.out_features,
                image_size=model.grid_size[0] * model.patch_size, patch_size=model.patch_size, num_channels=3,
                qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu")


def hf_mae_state(mae: nn.Module) -> dict:
    """Our MAE (ViT encoder + decoder) -> HF `ViTMAEForPreTraining` keys."""
    sd = mae.state_dict()
    out = {f"vit.{k}": v for k, v in hf_vit_state(mae.encoder).items()}
    pos = mae.decoder_pos_embed  # [1, N, D], a buffer; HF's table has a (zero) row for the class token
    out["decoder.decoder_pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    out["decoder.mask_token"] = sd["mask_token"]
    for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
        for p in ("weight", "bias"):
            out[f"decoder.{name}.{p}"] = sd[f"{name}.{p}"]
    for i in range(len(mae.decoder_blocks)):
        out.update(_hf_block(sd, f"decoder_blocks.{i}.", f"decoder.decoder_layers.{i}."))
    return out


def _training_mae(p: Path, encoder: nn.Module) -> nn.Module | None:
    """The checkpoint's whole MAE (encoder + decoder), or None for an export or a SimMIM run."""
    import yaml

    from mimtrain.methods.mae import MAE
    from mimtrain.checkpoint.encoder import CONFIG_FILE, ENCODER_FILE as EXPORTED, method_state

    if p.is_file() or (p / EXPORTED).is_file() or not (p / CONFIG_FILE).is_file():
        return None
    cfg = yaml.safe_load((p / CONFIG_FILE).read_text())
    m = cfg["method"]
    if m["name"] != "mae":
        return None
    mae = MAE(encoder, cfg["data"]["img_size"], decoder_dim=m["decoder_dim"], decoder_depth=m["decoder_depth"],
              decoder_heads=m["decoder_heads"], norm_pix_loss=m["norm_pix_loss"])
    mae.load_state_dict(method_state(p), strict=True)
    return mae.eval()


def export_hf(src: str | Path, out_dir: str | Path) -> list[Path]:
    """`out_dir/vit` (HF `ViTModel`, encoder only) and, from an MAE training checkpoint, `out_dir/vitmae`
    (`ViTMAEForPreTraining`, encoder + decoder), each written by `save_pretrained`."""
    from transformers import ViTConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTModel

    p = resolve(src)
    encoder, spec, _ = _source_encoder(p)
    if not hasattr(encoder, "vit"):
        raise LoadError(f"--format hf needs a mim_vit_* encoder; this source holds {spec.name}")
    kwargs = hf_vit_kwargs(encoder)
    out, written = Path(out_dir), []
    vit = ViTModel(ViTConfig(**kwargs), add_pooling_layer=False)
    vit.load_state_dict(hf_vit_state(encoder), strict=True)
    vit.save_pretrained(out / "vit")
    written.append(out / "vit")
    mae = _training_mae(p, encoder)
    if mae is not None:
        hf = ViTMAEForPreTraining(ViTMAEConfig(
            **kwargs, decoder_hidden_size=mae.decoder_embed.out_features, decoder_num_hidden_layers=len(
                mae.decoder_blocks), decoder_num_attention_heads=mae.decoder_blocks[0].attn.num_heads,
            decoder_intermediate_size=mae.decoder_blocks[0].mlp.fc1.out_features, norm_pix_loss=mae.norm_pix_loss))
        hf.load_state_dict(hf_mae_state(mae), strict=True)
        hf.save_pretrained(out / "vitmae")
        written.append(out / "vitmae")
    return written
