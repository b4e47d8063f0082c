"""One `mimtrain bench` measurement, in its own worker process:

    python -m mimtrain.bench.step --worker SPEC    (SPEC: JSON from `mimtrain.bench.cli`; prints one result line)

A timed step is the training loop's own step function (`engine.fit.train_step`: the encoder's lr hook, forward under
accelerate's autocast, backward, AdamW step (`build_optimizer`, fused where supported), zero_grad) on an Accelerator
prepared as a run's, on the model `build_pretraining(cfg)` builds with the trainer's fast path (`apply_fast_path`). Peak
memory is CUDA's max_memory_allocated, or on CPU the peak RSS above the worker's baseline taken before the model is
built. GFLOP/img counts one forward+backward with `torch.utils.flop_counter` (2 FLOPs per multiply-add).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from mimtrain.bench.flops import count_macs
from mimtrain.bench.report import RESULT_TAG
from mimtrain.engine.fit import Task


def measure(spec: dict) -> dict:
    """spec: {"kind": "peak"} or {"kind": "ours"|"hf", "recipe", "overrides", "batch", "steps", "warmup",
    "precision", "data"} -> one result row."""
    if spec["kind"] == "peak":
        from mimtrain.bench.peak import measure_bf16_peak

        return {"peak_flops": measure_bf16_peak()}
    import mimtrain.encoders  # noqa: F401  (imports before the baseline: they are not the model's memory)
    from mimtrain.config.pretrain import load_config

    cfg = load_config(spec["recipe"], spec["overrides"])
    load_start = os.getloadavg()[0]  # other work on a shared host shows here (our worker adds ~1 once it runs)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    if spec["kind"] == "hf":
        import transformers  # noqa: F401
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if spec["kind"] == "hf":
        from mimtrain.bench.hf import HF_NAME, build_hf

        model, optimizer, step_inputs = build_hf(cfg, spec["batch"], dev, lr_for(cfg, spec["batch"]))
        name, masking = HF_NAME, None
    else:
        model, optimizer, step_inputs, masking = build_ours(cfg, spec["batch"], dev)
        name = model_label(cfg, spec["precision"], dev)
    step, fwd_bwd = _step_fns(model, optimizer, step_inputs[0], dev, spec["precision"] == "bf16",
                              None if spec["kind"] == "hf" else model.encoder)

    with torch.compiler.set_stance("force_eager"):  # count the model's FLOPs, not the compiler's
        flops = 2 * count_macs(fwd_bwd)  # FLOPs: 2 per multiply-add
    optimizer.zero_grad(set_to_none=True)
    if spec["data"] and spec["kind"] == "ours":
        timing = time_streamed(step, cfg, spec, masking, dev)
    else:
        timing = time_synthetic(step, step_inputs, spec["warmup"], spec["steps"], dev)
    if dev.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) / 1024
    B = spec["batch"]
    return {"name": name, "kind": spec["kind"], "method": cfg.method.name, "encoder": cfg.encoder.name,
            "load_1m": [load_start, os.getloadavg()[0]], "img_size": cfg.data.img_size, "batch": B,
            "precision": spec["precision"], "steps": spec["steps"],
            "warmup": spec["warmup"], "images_per_sec": B / timing["step_s"], "step_ms": 1e3 * timing["step_s"],
            "peak_mem_mib": peak_mib, "gflop_per_img": flops / B / 1e9, "mfu": None,
            "data_wait_frac": timing.get("data_wait_frac"), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "",
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


class _Task(Task):
    """The bench's model as a task of the loop: a fixed lr (no schedule to time) and the encoder's own hook."""

    def __init__(self, model, optimizer, encoder):
        self.model, self.optimizer, self.encoder, self.schedule = model, optimizer, encoder, self

    def step_update(self, step: int) -> None:  # the schedule: the lr stays as built
        pass

    def loss(self, inputs: tuple) -> dict:
        return {"loss": self.model(*inputs)["loss"]}


class _NoHook:
    def on_step(self, step: int, lr: float) -> None:  # a transformers model has no mimtrain encoder hook
        pass


def _step_fns(model, optimizer, first_inputs: tuple, dev: torch.device, bf16: bool, encoder=None):
    """(step(inputs): the loop's training step, `engine.fit.train_step`, on an Accelerator prepared as a run's;
    fwd_bwd(): one forward+backward on `first_inputs`, for counting FLOPs)."""
    from accelerate import Accelerator

    from mimtrain.engine.fit import train_step

    acc = Accelerator(cpu=dev.type == "cpu", mixed_precision="bf16" if bf16 else "no")
    model, optimizer = acc.prepare(model, optimizer)
    task = _Task(model, optimizer, encoder if encoder is not None else _NoHook())
    n = [0]

    def step(inputs) -> None:
        train_step(task, acc, inputs, n[0], first=True)
        n[0] += 1

    def fwd_bwd() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(*first_inputs)["loss"]
        loss.backward()

    return step, fwd_bwd


def model_label(cfg, precision: str = "", dev: torch.device | None = None) -> str:
    """Encoder name (with its kwargs), then the fast-path settings that differ from the defaults, e.g.
    `mim_vit_base_patch16 [compile, channels_last]`, so that on/off variants of one recipe read apart."""
    kw = ",".join(f"{k}={v}" for k, v in cfg.encoder.kwargs.items())
    label = f"{cfg.encoder.name}({kw})" if kw else cfg.encoder.name
    t = cfg.train
    flags = [f"compile={t.compile_mode}" if t.compile_mode != "default" else "compile"] if t.compile else []
    flags += ["channels_last"] if t.channels_last else []
    flags += ["no sdpa"] if not t.sdpa else []
    flags += ["unfused AdamW"] if not cfg.optim.fused else []
    flags += ["grad ckpt"] if t.grad_checkpointing else []
    if dev is not None and precision and precision != ("bf16" if dev.type == "cuda" else "fp32"):
        flags.append(precision)
    return f"{label} [{', '.join(flags)}]" if flags else label


def lr_for(cfg, batch: int) -> float:
    """optim.lr if set, else the linear scaling rule blr x batch / lr_base_batch (as the trainer derives it)."""
    return cfg.optim.lr if cfg.optim.lr > 0 else cfg.optim.blr * batch / cfg.optim.lr_base_batch


def build_ours(cfg, batch: int, dev: torch.device):
    """The trainer's model (`build_pretraining`, then the fast path of `cfg.train`) and AdamW ->
    (method, optimizer, 4 x (images [batch, 3, S, S], mask [batch, Gh, Gw]), masking); random images, masks drawn on
    the CPU by the recipe's masking service."""
    from mimtrain.engine.fastpath import apply_fast_path
    from mimtrain.engine.optim import build_optimizer
    from mimtrain.methods import build_pretraining

    S = cfg.data.img_size
    method, masking = build_pretraining(cfg)
    method = apply_fast_path(method.to(dev).train(), cfg.train, masking)
    optimizer = build_optimizer(method, cfg.optim, lr_for(cfg, batch), dev.type)
    images = torch.randn(batch, 3, S, S)
    # A few distinct mask batches, cycled: drawing them is the data pipeline's job, not the step's.
    inputs = [(images.to(dev), masking.draw([f"bench/{i}/{b}" for b in range(batch)], 0).to(dev)) for i in range(4)]
    return method, optimizer, inputs, masking


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_synthetic(step, inputs: list, warmup: int, steps: int, dev: torch.device) -> dict:
    """Mean seconds per step over `steps` steps after `warmup` untimed ones, cycling through `inputs`."""
    for i in range(warmup):
        step(inputs[i % len(inputs)])
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        step(inputs[i % len(inputs)])
    _sync(dev)
    return {"step_s": (time.perf_counter() - t0) / steps}


def time_streamed(step, cfg, spec: dict, masking, dev: torch.device) -> dict:
    """Steps on batches from `ShardStream` + `make_loader` (the trainer's pipeline); wait = time blocked on next()."""
    from mimtrain.data.stream import ShardStream, expand_shards, make_loader
    from mimtrain.data.transforms import pretrain_transform

    d = cfg.data
    n = spec["warmup"] + spec["steps"]
    stream = ShardStream(expand_shards(spec["data"]),
                         pretrain_transform(d.img_size, d.crop_scale, d.hflip, d.mean, d.std), spec["batch"],
                         seed=cfg.seed, num_streams=max(1, d.num_workers), masking=masking, num_batches=n,
                         shuffle_buffer=d.shuffle_buffer)
    batches = iter(make_loader(stream, d.num_workers, pin_memory=dev.type == "cuda"))
    wait = 0.0
    for i in range(n):
        if i == spec["warmup"]:
            _sync(dev)
            wait, t0 = 0.0, time.perf_counter()  # worker start-up and first fills belong to the warm-up
        tw = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - tw
        step((batch["images"].to(dev, non_blocking=True), batch["mask"].to(dev, non_blocking=True)))
    _sync(dev)
    total = time.perf_counter() - t0
    return {"step_s": total / spec["steps"], "data_wait_frac": wait / total}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="mimtrain bench worker (internal): one measurement, one JSON line")
    p.add_argument("--worker", required=True, help="JSON spec")
    args = p.parse_args(argv)
    row = measure(json.loads(args.worker))
    print(RESULT_TAG + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
