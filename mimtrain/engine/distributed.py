"""How the trainer joins a launch: DDP, DeepSpeed ZeRO (stage 1-3, offload) or FSDP2, on GPUs, or on CPUs (DDP,
DeepSpeed and FSDP2 over gloo: tests and debugging).

`accelerate launch --config_file launch/accelerate/X.yaml` selects the mode through the environment
(`ACCELERATE_USE_DEEPSPEED`, `ACCELERATE_USE_FSDP`). `make_accelerator` builds the one Accelerator that honours it, and
`configure_deepspeed` fills the DeepSpeed values the recipe owns (micro-batch, accumulation, clipping), so one recipe
trains unchanged under every launch config.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs, set_seed

from mimtrain.config.pretrain import Config, ConfigError

FSDP_CPU_NEEDS_V2 = ("FSDP on CPU runs FSDP2 only (torch's fully_shard over gloo); this launch asks for FSDP version "
                     "{version}: set fsdp_version: 2 (launch/accelerate/fsdp.yaml does)")


def launch_mode() -> str:
    """"deepspeed" | "fsdp" | "ddp" (DDP also covers a single process), as `accelerate launch` set it."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp"


def _parent_cmdline() -> list[str]:
    try:
        raw = open(f"/proc/{os.getppid()}/cmdline", "rb").read()
    except OSError:  # not Linux: nothing to read
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _launch_args(cmdline: list[str]) -> list[str] | None:
    """The arguments after `accelerate launch` (or `python -m accelerate.commands.launch`), None for other commands."""
    for i, arg in enumerate(cmdline[:4]):
        if (arg == "launch" and i and "accelerate" in cmdline[i - 1]) or arg.endswith("accelerate.commands.launch"):
            return cmdline[i + 1:]
    return None


def cpu_launch_request(parent_cmdline: list[str]) -> int:
    """Processes asked of `accelerate launch --cpu` (0 if this is not such a launch).

    Accelerate's --cpu launcher starts one plain process whatever --num_processes says, and sets no WORLD_SIZE, only
    ACCELERATE_USE_CPU; the count survives only on the launcher's command line (our parent process's), or in the
    --config_file it names."""
    args = _launch_args(parent_cmdline)
    if args is None or os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "WORLD_SIZE" in os.environ:
        return 0
    flags, i = {}, 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-m", "--module"):  # the launcher's own
        name, eq, value = args[i].partition("=")
        if not eq and name in ("--num_processes", "--num-processes", "--config_file", "--config-file"):
            value, i = (args[i + 1] if i + 1 < len(args) else ""), i + 1
        flags[name.replace("-", "_")] = value
        i += 1
    asked = flags.get("__num_processes", "")
    if not asked and flags.get("__config_file"):
        try:
            import yaml

            asked = str((yaml.safe_load(open(flags["__config_file"])) or {}).get("num_processes", ""))
        except (OSError, ValueError):  # unreadable: accelerate itself says so
            return 0
    return int(asked) if asked.isdigit() else 0


def refuse_cpu_launch(parent_cmdline: list[str] | None = None) -> None:
    """`accelerate launch --cpu --num_processes N` (N > 1) runs one process: refuse it with the command that works."""
    cmd = _parent_cmdline() if parent_cmdline is None else parent_cmdline
    asked = cpu_launch_request(cmd)
    if asked > 1:
        import shlex

        works = ["accelerate", "launch"] + ["--multi_gpu" if a == "--cpu" else a for a in _launch_args(cmd)]
        raise ConfigError(f"`accelerate launch --cpu --num_processes {asked}` starts ONE process (accelerate's --cpu "
                          f"launcher ignores --num_processes), so this run would train alone; for {asked} processes on "
                          f"CPU use --multi_gpu instead of --cpu: {shlex.join(works)}")


def precision(name: str) -> str:
    """train.precision (auto|bf16|fp16|fp32) -> accelerate's mixed_precision; auto is bf16 on a GPU."""
    if name == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    choice = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}.get(name)
    if choice is None:
        raise ConfigError(f"train.precision must be auto|bf16|fp16|fp32, got '{name}'")
    return choice


def make_accelerator(grad_accum: int, precision_name: str, timeout_s: int = 0,
                     find_unused_parameters: bool = False, seed: int | None = None) -> Accelerator:
    """The one Accelerator factory (pretraining, fine-tuning, probing, dense transfer). Refuses launches that would
    silently train each process alone.

    `precision_name` is train.precision (see `precision`). `find_unused_parameters` is for DDP when some parameters
    can sit out a step (Mask R-CNN's mask branch, DGT's classification layers in dense tasks). `seed` (cfg.seed)
    seeds Python, numpy and torch on every process once the launch is accepted.

    `timeout_s` (train.dist_timeout_s; 0 = torch's default, 30 min) bounds every collective: a process that stalls
    (stopped, swapping, a dead node that keeps its sockets) makes its peers fail with a timeout error after that long
    instead of blocking them."""
    refuse_cpu_launch()
    if timeout_s < 0:
        raise ConfigError(f"train.dist_timeout_s must be >= 0 (0 = torch's default), got {timeout_s}")
    mode, cuda = launch_mode(), torch.cuda.is_available()
    if mode == "deepspeed" and importlib.util.find_spec("transformers") is None:
        raise ConfigError("DeepSpeed through accelerate needs the `transformers` package (its DeepSpeed plugin imports "
                          "transformers.integrations): pip install 'transformers>=4.46'")
    pg = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    if mode == "deepspeed" and not cuda:  # accelerate picks no backend without CUDA; DeepSpeed's comm needs one
        pg["backend"] = "gloo"
    handlers = [InitProcessGroupKwargs(**pg)] if pg else []
    if find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    # cpu=True without CUDA lets `accelerate launch --multi_gpu` run DDP (and FSDP, below) processes over gloo;
    # DeepSpeed must see cpu=False, or accelerate switches it off.
    mixed_precision = precision(precision_name)
    accelerator = _Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision,
                               cpu=not cuda and mode in ("ddp", "fsdp"), kwargs_handlers=handlers)
    if mode == "fsdp" and not cuda:
        _fsdp_over_gloo(accelerator)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"launched {launched} processes but the accelerator joined {accelerator.num_processes}: "
                           "each would train alone (on CPU, launch with --multi_gpu, not --cpu)")
    expected = {"deepspeed": DistributedType.DEEPSPEED, "fsdp": DistributedType.FSDP}.get(mode)
    if expected is not None and accelerator.distributed_type != expected:
        raise RuntimeError(f"the launch asked for {mode} but accelerate set up {accelerator.distributed_type}")
    if seed is not None:
        set_seed(seed)
    return accelerator


def block_classes(model: torch.nn.Module) -> list[str]:
    """Class names of the model's repeated blocks: modules with sub-modules and parameters held in a ModuleList or
    Sequential (timm's `Block`, Swin's stages and blocks, the MAE decoder's blocks). The FSDP units under
    `fsdp.yaml`'s TRANSFORMER_BASED_WRAP, so no encoder has to name its block class.

    Units must be modules that run through their own `forward`: FSDP2 gathers a unit's parameters only in its forward
    hook. A size-based policy also makes units of modules the methods never call (`encoder`, whose `encode` they call,
    `vit`, whose `pos_embed` they read), and their parameters then stay sharded: an error at the first step."""
    found = set()
    for container in model.modules():
        if isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential)):
            found |= {type(m).__name__ for m in container.children()
                      if next(m.children(), None) is not None and next(m.parameters(), None) is not None}
    return sorted(found)


class _Accelerator(Accelerator):
    """accelerate's Accelerator; under FSDP2 `prepare` wraps the model's repeated blocks (`block_classes`) unless the
    model or the launch config (fsdp_transformer_layer_cls_to_wrap) names its own."""

    def prepare(self, *args, device_placement=None):
        if self.is_fsdp2:
            for obj in args:
                if isinstance(obj, torch.nn.Module) and getattr(obj, "_no_split_modules", None) is None:
                    obj._no_split_modules = block_classes(obj)  # accelerate's (HF's) name for the units to wrap
        return super().prepare(*args, device_placement=device_placement)


def _fsdp_over_gloo(accelerator: Accelerator) -> None:
    """Turn a CPU launch of fsdp.yaml into accelerate's own FSDP2 path, over gloo.

    accelerate 1.x switches to DistributedType.FSDP only from a GPU-class type (MULTI_GPU, MULTI_XPU, ...): on CPU it
    resolves MULTI_CPU and ignores ACCELERATE_USE_FSDP, and every process would train an unsharded copy of its own.
    torch's `fully_shard` itself runs on CPU (DTensor parameters, gloo collectives), and the rest of accelerate's
    FSDP2 code (wrapping policy, `prepare`, clipping, sharded `save_state`/`load_state`, `merge_fsdp_weights`) is
    device-agnostic; only that gate is CPU-blind. So, as accelerate's state would for a GPU, the type becomes FSDP and
    the plugin comes from the launcher's FSDP_* environment; accelerate's `gather`/`reduce` treat FSDP and MULTI_CPU
    alike (torch.distributed on the gloo group). This is how CI runs the FSDP2 path of a GPU launch."""
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    if accelerator.num_processes < 2:
        raise ConfigError("FSDP on CPU needs at least 2 processes (accelerate launch --config_file "
                          "launch/accelerate/fsdp.yaml --num_processes 2 ...); one process has nothing to shard over")
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* as `accelerate launch` set them
    if plugin.fsdp_version != 2:
        raise ConfigError(FSDP_CPU_NEEDS_V2.format(version=plugin.fsdp_version))
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    # Both states: every AcceleratorState() construction re-copies PartialState's fields into the shared one.
    PartialState().distributed_type = DistributedType.FSDP
    state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """`accelerator.unwrap_model`, without importing DeepSpeed on runs that do not use it.

    accelerate imports DeepSpeed in `unwrap_model` whenever the package is installed (to recognise its engine), which
    costs seconds and makes DeepSpeed print "Setting accelerator to CPU" on CPU machines; only a DeepSpeed launch can
    hold a DeepSpeed engine, so elsewhere its availability check is answered "no" for the call.
    """
    if is_deepspeed(accelerator):
        return accelerator.unwrap_model(model)
    from unittest import mock

    import accelerate.utils.other as other

    with mock.patch.object(other, "is_deepspeed_available", lambda: False):
        return accelerator.unwrap_model(model)


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The prepared model's whole state dict, under the unwrapped module's names, on the main process (what an
    export writes). Under FSDP every process must call it: the shards are gathered (on CPU, to the main process only;
    the others get an empty dict)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.get_state_dict(model)
    return unwrap(accelerator, model).state_dict()


def zero_stage(accelerator: Accelerator) -> int:
    """DeepSpeed's ZeRO stage, 0 when not under DeepSpeed."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("stage", 0))


def params_sharded(accelerator: Accelerator) -> bool:
    """Whether parameters are partitioned over processes (ZeRO-3, FSDP): a forward is then a collective."""
    return zero_stage(accelerator) == 3 or accelerator.distributed_type == DistributedType.FSDP


def in_lockstep(batches, accelerator: Accelerator, pad: dict):
    """`batches`, then `pad` until every process has run out of its own. With sharded parameters a forward is a
    collective, and the evaluation shares of the processes can differ by a batch or more: a process that stopped
    early would leave the others waiting in their next forward for ever. Elsewhere `batches` unchanged."""
    if not params_sharded(accelerator):
        yield from batches
        return
    it = iter(batches)
    while True:
        batch = next(it, None)
        if accelerator.reduce(torch.tensor(float(batch is not None), device=accelerator.device), "sum").item() == 0:
            return
        yield pad if batch is None else batch


def module_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """bf16/fp16 where the prepared module itself is half precision (DeepSpeed's mixed precision: the fp32 master
    weights live in the optimizer), so float inputs must be cast to it, as HF's Trainer does; None elsewhere (inputs
    stay fp32 and autocast picks the precision per op)."""
    if not is_deepspeed(accelerator):
        return None
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    return next((dt for key, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16))
                 if ds.get(key, {}).get("enabled") is True), None)


def configure_deepspeed(accelerator: Accelerator, cfg: Config) -> Config:
    """Fill the DeepSpeed config's 'auto' values from the recipe (before `prepare`); a launch config that pins one
    to another value is refused, because the schedule, logs and checkpoints follow the recipe. Returns the config the
    optimizer is built from.

    DeepSpeed owns clipping and accumulation boundaries: `accelerator.clip_grad_norm_` does nothing under it, so
    `optim.clip_grad` goes into `gradient_clipping` (0 = off)."""
    if not is_deepspeed(accelerator):
        return cfg
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    own = {"gradient_clipping": cfg.optim.clip_grad, "gradient_accumulation_steps": cfg.train.grad_accum,
           "train_micro_batch_size_per_gpu": cfg.train.batch_size}  # we feed batches ourselves: no prepared loader
    for key, value in own.items():
        current = ds.get(key, "auto")
        if current != "auto" and float(current) != float(value):
            raise ConfigError(f"the DeepSpeed config sets {key}={current} but the recipe gives {value}: set it in the "
                              "recipe (optim.clip_grad, train.grad_accum, train.batch_size) and leave it 'auto' in the "
                              "launch config")
        ds[key] = value
    if torch.cuda.is_available():
        return cfg
    # CPU runs (tests) keep torch's AdamW; under offload DeepSpeed would swap in its CPU Adam, a C++ op built on first
    # use. Its fused CPU kernel stays off: it ran on ZeRO's flat partitions with torch 2.14 but is unverified with
    # 2.11, and CPU DeepSpeed is a test path where speed does not matter.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, fused=False))
