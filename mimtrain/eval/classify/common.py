"""What fine-tuning, linear probing and k-NN share: the accelerator, labelled data streams, the encoder from a
checkpoint, pooled features, top-k accuracy and the run directory's files."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn

from mimtrain.config.pretrain import ConfigError, save_config
from mimtrain.data.stream import ShardStream, expand_shards, make_loader, require_labels
from mimtrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from mimtrain.config.classify import EvalConfig
from mimtrain.checkpoint.encoder import CONFIG_FILE, EncoderSpec, load_encoder, resolve


def accelerator_for(cfg: EvalConfig) -> Accelerator:
    from mimtrain.engine.distributed import refuse_cpu_launch
    from mimtrain.engine.trainer import _precision  # the pretraining engine's reading of train.precision

    refuse_cpu_launch()  # `accelerate launch --cpu --num_processes 2` would evaluate in one process
    acc = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, cpu=not torch.cuda.is_available(),
                      mixed_precision=_precision(cfg.train.precision))
    set_seed(cfg.seed)
    return acc


def source_preprocessing(source: str) -> dict:
    """What the source was pretrained on, where it says: {img_size, mean, std} from a run's or checkpoint's
    config.yaml (`data`), an export's config.yaml (`encoder.img_size`, `data`) or its timm config.json
    (`pretrained_cfg`); {} for a plain weights file."""
    import yaml

    p = resolve(source)
    if p.is_file():
        return {}
    found = {}
    timm_cfg = p / "config.json"
    if timm_cfg.is_file():
        pre = json.loads(timm_cfg.read_text()).get("pretrained_cfg") or {}
        found.update({k: pre[k] for k in ("mean", "std") if k in pre})
        if "input_size" in pre:
            found["img_size"] = pre["input_size"][-2:]
    if (p / CONFIG_FILE).is_file():
        meta = yaml.safe_load((p / CONFIG_FILE).read_text()) or {}
        if "img_size" in (meta.get("encoder") or {}):
            found["img_size"] = meta["encoder"]["img_size"]
        found.update({k: v for k, v in (meta.get("data") or {}).items() if k in ("img_size", "mean", "std")})
    return found


def follow_source(cfg: EvalConfig, source: str, acc: Accelerator) -> EvalConfig:
    """data.img_size, mean and std left unset (None) take the source's (`source_preprocessing`), so a 32 px run is
    evaluated at 32 px with its own normalisation; a plain weights file says nothing: 224 px and ImageNet's
    statistics. One line says what was taken from where. (Interpolation is bicubic in pretraining and evaluation.)"""
    data, found = cfg.data, None
    fill, said = {}, []
    for key, fallback in (("img_size", 224), ("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        if getattr(data, key) is not None:
            continue
        if found is None:
            found = source_preprocessing(source)
        value = found.get(key, fallback)
        if key == "img_size" and isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ConfigError(f"{source} was pretrained at {value[0]}x{value[1]} px; set data.img_size (evaluation "
                                  "crops are square)")
            value = value[0]
        fill[key] = tuple(value) if isinstance(value, list) else value
        said.append(f"{key} {fill[key]} ({'the source' if key in found else 'default: the source records none'})")
    if not fill:
        return cfg
    acc.print(f"data: {'; '.join(said)}; set data.img_size / data.mean / data.std to override")
    return dataclasses.replace(cfg, data=dataclasses.replace(data, **fill))


def num_classes(cfg: EvalConfig, urls: list[str]) -> int:
    """data.num_classes, or the length of make-shards' classes.json beside the first train shard."""
    if cfg.data.num_classes > 0:
        return cfg.data.num_classes
    index = Path(urls[0]).parent / "classes.json"
    if index.is_file():
        return len(json.loads(index.read_text()))
    raise ConfigError(f"cannot tell the number of classes: no {index}; set data.num_classes")


def shard_urls(cfg: EvalConfig, need_val: bool = True) -> tuple[list[str], list[str]]:
    if need_val and not cfg.data.val_shards:
        raise ConfigError("set data.val_shards (labelled validation shards) for an evaluation run")
    train = expand_shards(cfg.data.train_shards)
    val = expand_shards(cfg.data.val_shards) if cfg.data.val_shards else []
    require_labels(train + val, "evaluation (data.train_shards, data.val_shards)")
    return train, val


class PythonSeeded:
    """Run a transform that draws from Python's `random` (timm's RandAugment, RandomErasing) under a seed drawn from
    torch's RNG, which the data pipeline seeds per sample, so augmentations are reproducible like torchvision's."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, img):
        state = random.getstate()
        random.seed(int(torch.randint(0, 2 ** 31 - 1, ())))
        try:
            return self.transform(img)
        finally:
            random.setstate(state)


def eval_stream(cfg: EvalConfig, urls: list[str], acc: Accelerator, batch_size: int | None = None) -> ShardStream:
    """One full, unshuffled pass over `urls` (this process's share) with the evaluation transform."""
    t = eval_transform(cfg.data.img_size, cfg.data.mean, cfg.data.std, cfg.data.crop_pct)
    return ShardStream(urls, t, batch_size or cfg.train.eval_batch_size, seed=cfg.seed, rank=acc.process_index,
                       world_size=acc.num_processes, num_streams=max(1, cfg.data.num_workers), num_batches=None,
                       shuffle_buffer=1, shuffle_shards=False)


def batches(stream: ShardStream, cfg: EvalConfig, acc: Accelerator) -> Iterator[dict]:
    return iter(make_loader(stream, cfg.data.num_workers, pin_memory=acc.device.type == "cuda"))


def build_from_checkpoint(cfg: EvalConfig, source: str, random_init: bool = False,
                          **build_kwargs) -> tuple[nn.Module, EncoderSpec]:
    """The checkpoint's encoder at data.img_size, weights loaded strictly (or left random for a baseline)."""
    model, spec = load_encoder(source, cfg.encoder.name, cfg.encoder.kwargs, cfg.data.img_size,
                               random_init=random_init, **cfg.encoder.geometry, **build_kwargs)
    if getattr(model, "mask_token", None) is not None:
        model.mask_token.requires_grad_(False)  # pretraining-only; unused by forward_features
    return model, spec


def frozen_encoder(cfg: EvalConfig, source: str, acc: Accelerator,
                   random_init: bool = False) -> tuple[nn.Module, EncoderSpec, str]:
    """The checkpoint's encoder frozen in eval mode on the device, and its feature pooling (cls token where it has
    one): what the linear probe and k-NN read features from."""
    encoder, spec = build_from_checkpoint(cfg, source, random_init=random_init, num_classes=0)
    encoder.requires_grad_(False)
    encoder.eval().to(acc.device)
    return encoder, spec, resolve_pool(cfg.encoder.pool, encoder, default_cls=True)


def resolve_pool(cfg_pool: str, model: nn.Module, default_cls: bool) -> str:
    if cfg_pool == "auto":
        return "cls" if default_cls and hasattr(model, "forward_cls") else "avg"
    if cfg_pool not in ("avg", "cls"):
        raise ConfigError(f"encoder.pool must be auto|avg|cls, got '{cfg_pool}'")
    if cfg_pool == "cls" and not hasattr(model, "forward_cls"):
        raise ConfigError(f"encoder.pool=cls needs a class token; {type(model).__name__} has none (use avg)")
    return cfg_pool


def pooled(model: nn.Module, x: Tensor, pool: str) -> Tensor:
    """x: [B, 3, H, W] -> [B, C]: the class token (ViT) or the global average of the last feature map."""
    if pool == "cls":
        return model.forward_cls(x)
    return model.forward_features(x)[-1].mean(dim=(2, 3))


def logits(model: nn.Module, x: Tensor, pool: str) -> Tensor:
    """x: [B, 3, H, W] -> [B, classes] through the encoder's own head; "cls" feeds the class token as a 1x1 map,
    which the head's global average leaves unchanged."""
    if pool == "cls":
        return model.forward_head([model.forward_cls(x)[:, :, None, None]])
    return model(x)


def topk_correct(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """scores: [B, K], labels: [B] -> correct counts per k (k clipped to the number of classes)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, :k].any(dim=1).sum() for k in ks]


def accuracies(top1_correct: float, top5_correct: float, n: int, classes: int) -> dict:
    """Correct counts over n samples -> {"top1", "top5"} in %. With fewer than 5 classes every label is in the top 5,
    so top-5 is not applicable: None (printed "n/a"), never a meaningless 100%."""
    n = max(n, 1)
    return {"top1": 100.0 * top1_correct / n, "top5": 100.0 * top5_correct / n if classes >= 5 else None}


@torch.no_grad()
def evaluate(score_fn: Callable[[Tensor], Tensor], stream: ShardStream, cfg: EvalConfig, acc: Accelerator) -> dict:
    """Top-1/top-5 (%) of `score_fn(images) -> [B, classes]` over a full pass, summed over processes."""
    counts, classes = torch.zeros(3, device=acc.device), 0
    for batch in batches(stream, cfg, acc):
        x, y = batch["images"].to(acc.device), batch["label"].to(acc.device)
        with acc.autocast():
            scores = score_fn(x)
        c1, c5 = topk_correct(scores.float(), y)
        classes = scores.shape[1]
        counts += torch.stack([c1.float(), c5.float(), torch.tensor(float(len(y)), device=acc.device)])
    counts = acc.reduce(counts, "sum")
    return {**accuracies(counts[0].item(), counts[1].item(), int(counts[2]), classes), "num_val": int(counts[2])}


def start_run(cfg: EvalConfig, acc: Accelerator, extra: dict | None = None) -> Path:
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml", derived=extra)
    return out


def say(acc: Accelerator, text: str) -> None:
    """Print on the main process above a running tqdm bar (tqdm.write), not into the middle of it."""
    if acc.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(text)


def write_results(out: Path, results: dict, acc: Accelerator) -> None:
    if acc.is_main_process:
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
