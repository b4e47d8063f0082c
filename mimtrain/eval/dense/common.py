"""What detection and segmentation share: the encoder from a checkpoint built for the canvas, layer-decayed AdamW
groups, the warm-up + step / poly schedules (MMDetection's and MMSegmentation's rules), the accelerator, sharding the
evaluation set over processes, and the training loop."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, send_to_device, set_seed
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from mimtrain.engine.distributed import unwrap
from mimtrain.engine.logging import RunLogger
from mimtrain.config.dense import DenseEncoderConfig, DenseOptimConfig
from mimtrain.checkpoint.encoder import HEAD, EncoderSpec, load_encoder
from mimtrain.eval.layer_decay import param_groups


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite (the CLI exits 3, as for pretraining)."""


def dense_accelerator(cfg) -> Accelerator:
    """cfg: DetectConfig | SegmentConfig. DDP looks for unused parameters: Mask R-CNN's mask branch and some encoders'
    classification layers (DGT's head_fc) can sit out a step."""
    from mimtrain.engine.distributed import refuse_cpu_launch
    from mimtrain.engine.trainer import _precision  # the pretraining engine's reading of train.precision

    refuse_cpu_launch()  # `accelerate launch --cpu --num_processes 2` would train in one process
    acc = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, cpu=not torch.cuda.is_available(),
                      mixed_precision=_precision(cfg.train.precision),
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)
    return acc


def build_dense_encoder(enc: DenseEncoderConfig, source: str, canvas: int) -> tuple[nn.Module, EncoderSpec]:
    """The checkpoint's encoder built for `canvas` x `canvas` (position and relative-bias tables resized on load),
    with the parameters dense tasks never use frozen: the SimMIM mask token and classification layers."""
    model, spec = load_encoder(source, enc.name, enc.kwargs, canvas, num_classes=0,
                               drop_path_rate=enc.drop_path_rate, **enc.geometry)
    for name, p in model.named_parameters():
        if name == "mask_token" or HEAD.search(name):
            p.requires_grad_(False)
    return model, spec


def dense_param_groups(model: nn.Module, encoder: nn.Module, optim: DenseOptimConfig) -> list[dict]:
    """AdamW groups: the encoder's with layer-wise lr decay (`layer_decay.param_groups`), then neck and head at the
    full lr; no weight decay on 1-D parameters and on the encoder's `no_weight_decay()` names. Each group's `lr` is
    its peak lr, which the LambdaLR schedules scale."""
    skip = set(getattr(encoder, "no_weight_decay", set)())
    groups = []
    for g in param_groups(encoder, optim.weight_decay, optim.layer_decay, skip):
        groups.append({"params": g["params"], "weight_decay": g["weight_decay"], "lr": optim.lr * g["lr_scale"]})
    own = {id(p) for p in encoder.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    groups.append({"params": [p for p in rest if p.ndim > 1], "weight_decay": optim.weight_decay, "lr": optim.lr})
    groups.append({"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0, "lr": optim.lr})
    return [g for g in groups if g["params"]]


def warmup_factor(step: int, optim: DenseOptimConfig) -> float:
    """Linear warm-up from warmup_ratio to 1 over warmup_iters optimizer steps (MMCV's 'linear' warm-up)."""
    if step >= optim.warmup_iters:
        return 1.0
    return 1.0 - (1.0 - step / optim.warmup_iters) * (1.0 - optim.warmup_ratio)


def step_schedule(optimizer: torch.optim.Optimizer, optim: DenseOptimConfig, milestones: list[int]) -> LambdaLR:
    """Detection: warm-up, then lr x 0.1 once `step` reaches each milestone (optimizer steps)."""
    return LambdaLR(optimizer, lambda s: warmup_factor(s, optim) * 0.1 ** sum(s >= m for m in milestones))


def poly_schedule(optimizer: torch.optim.Optimizer, optim: DenseOptimConfig, total: int, power: float) -> LambdaLR:
    """Segmentation: warm-up times (1 - step / total)^power, reaching 0 at `total`."""
    return LambdaLR(optimizer, lambda s: warmup_factor(s, optim) * (1.0 - min(s, total) / total) ** power)


def my_share(n: int, acc: Accelerator) -> list[int]:
    """Indices 0..n-1 of the evaluation set this process handles (strided, no padding, so nothing is counted twice)."""
    return list(range(acc.process_index, n, acc.num_processes))


def endless(loader: torch.utils.data.DataLoader) -> Iterator[tuple[int, object]]:
    """(epoch, batch) forever; the loader's DistributedSampler reshuffles each epoch."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def fit(model: nn.Module, optimizer, schedule: LambdaLR, batches: Iterator, loss_fn: Callable[[nn.Module, object],
        dict[str, Tensor]], acc: Accelerator, train_cfg, clip_grad: float, stop_step: int,
        should_eval: Callable[[int], bool], evaluate: Callable[[int], dict], log: RunLogger, on_step: Callable | None,
        desc: str) -> tuple[int, dict]:
    """Run optimizer steps 1..stop_step; returns (last step, metrics of the last evaluation).

    loss_fn(model, batch) -> named losses (summed for the backward pass); batches yields (epoch, batch) on the CPU.
    Losses are summed on the device and read back only at logging steps (the one host sync).
    """
    step, metrics, n_micro, t0 = 0, {}, 0, time.perf_counter()
    sums: dict[str, Tensor] = {}
    bar = tqdm(total=stop_step, disable=not (acc.is_main_process and train_cfg.progress), desc=desc, dynamic_ncols=True)
    model.train()
    while step < stop_step:
        epoch, batch = next(batches)
        if on_step is not None and n_micro % train_cfg.grad_accum == 0:  # encoder hook (DGT's centroid rate)
            on_step(step, max(g["lr"] for g in optimizer.param_groups))
        with acc.accumulate(model):
            with acc.autocast():
                losses = loss_fn(model, send_to_device(batch, acc.device))
            acc.backward(sum(losses.values()))
            if acc.sync_gradients and clip_grad > 0:
                acc.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        n_micro += 1
        if not acc.sync_gradients:
            continue
        schedule.step()
        step += 1
        bar.update(1)
        if step % train_cfg.log_every == 0 or step == stop_step:
            keys = sorted(sums)
            means = acc.reduce(torch.stack([sums[k] for k in keys]) / n_micro, "mean").tolist()  # host sync
            values = dict(zip(keys, means))
            values["loss"] = sum(means)
            if not math.isfinite(values["loss"]):
                raise NonFiniteLoss(f"{desc}: loss is {values['loss']} at step {step} ({values}); lower optim.lr, "
                                    "raise optim.warmup_iters or set optim.clip_grad")
            lr = max(g["lr"] for g in optimizer.param_groups)
            images = n_micro * train_cfg.batch_size * acc.num_processes
            log.scalars(step, {"epoch": epoch, **values, "lr": lr,
                               "images_per_sec": images / (time.perf_counter() - t0)})
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
            sums, n_micro, t0 = {}, 0, time.perf_counter()
        if should_eval(step):
            metrics = evaluate(step)
            model.train()
    bar.close()
    return step, metrics


def save_final(model: nn.Module, out: Path, acc: Accelerator) -> None:
    """The trained detector / segmentor's weights as `final/model.safetensors` (rebuild it from the run's config)."""
    if not acc.is_main_process:
        return
    (out / "final").mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(acc, model).state_dict().items()}
    save_file(state, str(out / "final" / "model.safetensors"))
