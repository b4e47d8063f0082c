"""`mimtrain bench`: training-step throughput, memory, FLOPs and MFU of recipes, on synthetic or streamed data.

    mimtrain bench --recipe recipes/pretrain/mae_vit_base.yaml [--recipe R2 ...] [--batch 8] [--steps 10]
        [--warmup 3] [--repeat 1] [--img-size 224] [--compare hf] [--precision fp32|bf16] [--data SHARDS]
        [--json OUT] [overrides]
    mimtrain bench --decode SHARDS [--recipe R] [--img-size 224] [--decode-images 300] [--repeat 3]

A timed step is what the trainer runs: forward, backward, AdamW step (`build_optimizer`, fused where supported),
zero_grad. Masks are drawn by the recipe's `MaskingService` on the CPU before timing, images are random (or streamed
from shards with `--data`). Every model runs in a fresh worker process (`python -m mimtrain.bench.harness --worker SPEC`,
one JSON line back) so that peak memory (CUDA: max_memory_allocated; CPU: peak RSS above the worker's baseline
before the model is built) and allocator state never leak from one model into the next.

A `--recipe` value may carry its own overrides after the path (`--recipe 'R encoder.name=X data.img_size=192'`);
they apply after the overrides shared by all recipes, so one command can put variants side by side. The model is
built with the trainer's fast path (`engine.fastpath.apply_fast_path`), so the switches `train.compile`,
`train.compile_mode`, `train.channels_last`, `train.sdpa`, `optim.fused` and `train.precision` (when --precision is
not given) measure each piece on or off; the row's name lists the ones that differ from the defaults. A compiled
model gets at least 10 warm-up steps.
GFLOP/img counts one forward+backward with `torch.utils.flop_counter` (2 FLOPs per multiply-add, matmuls, convs and
attention only; the optimizer is not counted). MFU = counted FLOP/s / the bf16 matmul peak measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from mimtrain.bench.flops import count_macs

RESULT_TAG = "MIMTRAIN_BENCH_RESULT "
COMPILED_WARMUP = 10  # untimed steps at least, for a recipe with train.compile=true
ROW_FIELDS = ("name", "method", "img_size", "batch", "images_per_sec", "step_ms", "peak_mem_mib", "gflop_per_img",
              "mfu")


# ---------------------------------------------------------------------------------------------------------- CLI

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to `mimtrain`'s subparsers."""
    s = subparsers.add_parser("bench", help="time training steps (img/s, memory, FLOPs, MFU) of recipes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--recipe", action="append", default=[],
                   help="recipe YAML, optionally followed by its own overrides in the same (quoted) argument; repeat")
    s.add_argument("--batch", type=int, default=0, help="images per step (default: the recipe's train.batch_size)")
    s.add_argument("--steps", type=int, default=10, help="timed steps")
    s.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    s.add_argument("--repeat", type=int, default=1, help="fresh workers per model, interleaved with the HF ones; "
                   "the row shows the run with the median img/s")
    s.add_argument("--img-size", type=int, default=0, help="image side (default: the recipe's data.img_size)")
    s.add_argument("--compare", choices=("hf",), help="also time HF transformers' ViTMAEForPreTraining (MAE ViT only)")
    s.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on CUDA, fp32 on CPU")
    s.add_argument("--data", metavar="SHARDS", help="stream batches from these shards (data.num_workers workers) "
                   "and report the fraction of step time spent waiting for data")
    s.add_argument("--decode", metavar="SHARDS", help="measure decode, decode+RandomResizedCrop and transform "
                   "images/sec on one core (old PIL+torchvision path and ours) instead of training steps")
    s.add_argument("--decode-images", type=int, default=300, help="--decode: images read from the shards")
    s.add_argument("--json", help="also write the rows (and the command, device, date) to this JSON file")
    s.add_argument("overrides", nargs="*", help="dotted overrides for every recipe, e.g. data.num_workers=2")
    s.set_defaults(func=run_bench)
    return s


def run_bench(args: argparse.Namespace) -> dict:
    """Entry point of `mimtrain bench`: validate everything, run one worker per model, print and save the table."""
    if args.decode:
        return _run_decode(args)
    if not args.recipe:
        raise ValueError("give at least one --recipe (or --decode SHARDS)")
    if args.steps < 1 or args.warmup < 0 or args.repeat < 1:
        raise ValueError(f"--steps and --repeat must be >= 1 and --warmup >= 0 (got {args.steps}, {args.repeat}, "
                         f"{args.warmup})")
    cuda = torch.cuda.is_available()
    specs = []
    for item in args.recipe:
        recipe, overrides = _split_recipe(item, args)
        cfg = _load(recipe, overrides)  # refuses bad keys before any worker starts
        if args.compare == "hf":
            _check_hf_comparable(cfg, item)
        if args.data:
            from mimtrain.data.stream import expand_shards
            expand_shards(args.data)
        # A compiled model's first steps compile (and inductor's workers keep compiling for a few more steps).
        warmup = max(args.warmup, COMPILED_WARMUP) if cfg.train.compile else args.warmup
        spec = dict(recipe=recipe, overrides=overrides, batch=args.batch or cfg.train.batch_size, steps=args.steps,
                    warmup=warmup, precision=_step_precision(cfg, args, cuda), data=args.data or "")
        specs.append((cfg, spec))

    peak_flops = _worker({"kind": "peak"}).get("peak_flops", 0.0) if cuda else 0.0
    rows, ratios = [], []
    kinds = ("ours", "hf") if args.compare == "hf" else ("ours",)
    for cfg, spec in specs:
        # Interleaved repeats (ours, hf, ours, hf, ...): load from other work on a shared host hits both alike.
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.repeat):
            for kind in kinds:
                runs[kind].append(_worker({**spec, "kind": kind}))
        picked = {kind: _finish_row(_median_row(r), peak_flops) for kind, r in runs.items()}
        rows += list(picked.values())
        if args.compare == "hf" and picked["ours"].get("images_per_sec") and picked["hf"].get("images_per_sec"):
            pairs = [o["images_per_sec"] / h["images_per_sec"] for o, h in zip(runs["ours"], runs["hf"])
                     if o.get("images_per_sec") and h.get("images_per_sec")]
            ratios.append({"name": picked["ours"]["name"], "pairs": pairs,
                           "ratio": picked["ours"]["images_per_sec"] / picked["hf"]["images_per_sec"]})
    precisions = sorted({spec["precision"] for _, spec in specs})
    report = {"command": _command(args), "device": _device_line(rows), "date": _now(),
              "precision": precisions[0] if len(precisions) == 1 else "per row", "rows": rows, "ours_over_hf": ratios}
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _step_precision(cfg, args: argparse.Namespace, cuda: bool) -> str:
    """--precision if given, else the recipe's train.precision ('auto': bf16 on CUDA, fp32 on CPU)."""
    precision = args.precision or {"auto": "bf16" if cuda else "fp32"}.get(cfg.train.precision, cfg.train.precision)
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"mimtrain bench times bf16 or fp32 steps, not train.precision={precision}")
    return precision


def _median_row(runs: list[dict]) -> dict:
    """The run with the median images/sec (the lower one of an even count); all runs' rates kept in the row."""
    good = sorted((r for r in runs if r.get("images_per_sec")), key=lambda r: r["images_per_sec"])
    if not good:
        return runs[0]
    row = dict(good[(len(good) - 1) // 2])
    row["images_per_sec_runs"] = [r["images_per_sec"] for r in runs if r.get("images_per_sec")]
    return row


def _split_recipe(item: str, args: argparse.Namespace) -> tuple[str, list[str]]:
    """'path k=v "k2={a: 1}"' -> (path, shared overrides + the recipe's own + --img-size)."""
    try:
        parts = shlex.split(item)
    except ValueError as e:  # an unbalanced quote
        raise ValueError(f"--recipe {item!r}: {e}") from None
    if not parts:
        raise ValueError("--recipe '': give a recipe path")
    loose = [p for p in parts[1:] if "=" not in p]
    if loose:  # `k={a: 1}` unquoted inside the argument splits at its space
        raise ValueError(f"--recipe {item!r}: {loose[0]!r} is not a key=value override; a value with spaces needs "
                         f"its own quotes inside the argument, e.g. --recipe '{parts[0]} \"encoder.kwargs={{embed_dim: "
                         f"24}}\"'")
    extra = [f"data.img_size={args.img_size}"] if args.img_size else []
    return parts[0], list(args.overrides) + parts[1:] + extra


def _load(recipe: str, overrides: list[str]):
    from mimtrain.config.pretrain import load_config

    return load_config(recipe, overrides)


def _check_hf_comparable(cfg, item: str) -> None:
    if not (cfg.encoder.name.startswith("mim_vit_") and cfg.method.name == "mae"):
        raise ValueError(f"--compare hf needs an MAE recipe with a mim_vit_* encoder (HF ViTMAEForPreTraining is a "
                         f"plain ViT MAE); '{item}' is {cfg.method.name} with {cfg.encoder.name}")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (rebuilt from the parsed arguments)."""
    out = ["mimtrain", "bench"]
    for r in args.recipe:
        out += ["--recipe", r]
    for flag, value, default in (("--batch", args.batch, 0), ("--steps", args.steps, 10),
                                 ("--warmup", args.warmup, 3), ("--repeat", args.repeat, 1),
                                 ("--img-size", args.img_size, 0),
                                 ("--compare", args.compare, None), ("--precision", args.precision, None),
                                 ("--data", args.data, None), ("--decode", args.decode, None),
                                 ("--decode-images", getattr(args, "decode_images", 300), 300),
                                 ("--json", args.json, None)):
        if value != default:
            out += [flag, str(value)]
    return " ".join(_quote(a) for a in out + list(args.overrides))


def _quote(arg: str) -> str:
    """shlex.quote, but double quotes around arguments that hold single quotes (recipes with their own overrides)."""
    if "'" in arg and not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


def _now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_line(rows: list[dict]) -> str:
    threads = next((r["threads"] for r in rows if "threads" in r), torch.get_num_threads())
    base = f"{cpu_model()} ({os.cpu_count()} logical cores visible), torch {torch.__version__}, {threads} threads"
    gpu = next((r["gpu"] for r in rows if r.get("gpu")), "")
    return f"{gpu}; host {base}" if gpu else f"CPU only: {base}"


# ---------------------------------------------------------------------------------------------------------- workers

def _worker(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter; return its JSON row (with 'error' if it failed)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "mimtrain.bench.harness", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = proc.stderr.strip().splitlines()[-3:]
    oom = "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
    sys.stderr.write(proc.stderr[-4000:])
    return {"name": spec.get("recipe", spec["kind"]), "kind": spec["kind"], "method": "-",
            "error": "OOM" if oom else f"worker failed (exit {proc.returncode}): {' | '.join(tail)}"}


def _finish_row(row: dict, peak_flops: float) -> dict:
    if peak_flops and row.get("gflop_per_img") and row.get("images_per_sec"):
        row["mfu"] = row["gflop_per_img"] * 1e9 * row["images_per_sec"] / peak_flops
        row["peak_tflops_bf16"] = peak_flops / 1e12
    else:
        row.setdefault("mfu", None)
    return row


def _worker_main(spec: dict) -> dict:
    if spec["kind"] == "peak":
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
    build = _build_hf if spec["kind"] == "hf" else _build_ours
    model, optimizer, step_inputs, name, masking = build(cfg, spec["batch"], dev)
    if spec["kind"] == "ours":
        name = _model_label(cfg, spec["precision"], dev)
    bf16 = spec["precision"] == "bf16"

    def step(inputs) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(*inputs)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def fwd_bwd() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(*step_inputs[0])["loss"]
        loss.backward()

    with torch.compiler.set_stance("force_eager"):  # count the model's FLOPs, not the compiler's
        flops = 2 * count_macs(fwd_bwd)  # FLOPs: 2 per multiply-add
    optimizer.zero_grad(set_to_none=True)
    if spec["data"] and spec["kind"] == "ours":
        timing = _time_streamed(step, cfg, spec, masking, dev)
    else:
        timing = _time_synthetic(step, step_inputs, spec["warmup"], spec["steps"], dev)
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


def _model_label(cfg, precision: str = "", dev: torch.device | None = None) -> str:
    """Encoder name (with its kwargs), then the fast-path settings that differ from the defaults, e.g.
    `mim_vit_base_patch16 [compile, channels_last]`, so that on/off variants of one recipe read apart."""
    kw = ",".join(f"{k}={v}" for k, v in cfg.encoder.kwargs.items())
    label = f"{cfg.encoder.name}({kw})" if kw else cfg.encoder.name
    t = cfg.train
    flags = [f"compile={t.compile_mode}" if t.compile_mode != "default" else "compile"] if t.compile else []
    flags += ["channels_last"] if t.channels_last else []
    flags += ["no sdpa"] if not t.sdpa else []
    flags += ["unfused AdamW"] if not cfg.optim.fused else []
    if dev is not None and precision and precision != ("bf16" if dev.type == "cuda" else "fp32"):
        flags.append(precision)
    return f"{label} [{', '.join(flags)}]" if flags else label


def _lr(cfg, batch: int) -> float:
    return cfg.optim.lr if cfg.optim.lr > 0 else cfg.optim.blr * batch / cfg.optim.lr_base_batch


def _build_ours(cfg, batch: int, dev: torch.device):
    """The trainer's encoder, masking service, method (with the fast path of `cfg.train`) and AdamW; `batch` random
    images with masks drawn on CPU."""
    from mimtrain.encoders import build_encoder
    from mimtrain.engine.fastpath import apply_fast_path
    from mimtrain.engine.optim import build_optimizer
    from mimtrain.masking import MaskingService
    from mimtrain.methods import build_method, mask_mode_for

    S = cfg.data.img_size
    encoder = build_encoder(cfg.encoder.name, S, mask_unit=cfg.encoder.mask_unit,
                            mask_mode=mask_mode_for(cfg.method.name), num_classes=0,
                            drop_path_rate=cfg.encoder.drop_path_rate, **cfg.encoder.kwargs)
    masking = MaskingService.for_encoder(encoder, S, cfg.mask, cfg.seed)
    method = apply_fast_path(build_method(cfg.method, encoder, S).to(dev).train(), cfg.train, masking)
    optimizer = build_optimizer(method, cfg.optim, _lr(cfg, batch), dev.type)
    images = torch.randn(batch, 3, S, S)
    # A few distinct mask batches, cycled: drawing them is the data pipeline's job, not the step's.
    inputs = [(images.to(dev), masking.draw([f"bench/{i}/{b}" for b in range(batch)], 0).to(dev)) for i in range(4)]
    return method, optimizer, inputs, _model_label(cfg), masking


def hf_config(cfg):
    """A `ViTMAEConfig` with the recipe's sizes (encoder read from our ViT, built on the meta device)."""
    from transformers import ViTMAEConfig

    from mimtrain.encoders import build_encoder

    with torch.device("meta"):
        enc = build_encoder(cfg.encoder.name, cfg.data.img_size, mask_unit=cfg.encoder.mask_unit,
                            mask_mode="drop", num_classes=0, **cfg.encoder.kwargs)
    if enc.mask_unit != enc.patch_size:
        raise ValueError(f"HF ViTMAE masks single patches: encoder.mask_unit ({enc.mask_unit}) must equal the patch "
                         f"size ({enc.patch_size}) for --compare hf")
    blk = enc.vit.blocks[0]
    m = cfg.method
    return ViTMAEConfig(
        hidden_size=enc.embed_dim, num_hidden_layers=len(enc.vit.blocks), num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features, image_size=cfg.data.img_size, patch_size=enc.patch_size,
        num_channels=3, qkv_bias=True, layer_norm_eps=1e-6, decoder_hidden_size=m.decoder_dim,
        decoder_num_hidden_layers=m.decoder_depth, decoder_num_attention_heads=m.decoder_heads,
        decoder_intermediate_size=4 * m.decoder_dim, mask_ratio=cfg.mask.ratio, norm_pix_loss=m.norm_pix_loss,
        attn_implementation="sdpa")


class _HFLoss(torch.nn.Module):
    """`model(images) -> {"loss"}` like our methods (HF draws its own random mask inside the forward)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict:
        return {"loss": self.model(pixel_values=images).loss}


def _build_hf(cfg, batch: int, dev: torch.device):
    """HF ViTMAEForPreTraining at the recipe's sizes, no pretrained weights, torch AdamW with default settings."""
    from transformers import ViTMAEForPreTraining

    model = _HFLoss(ViTMAEForPreTraining(hf_config(cfg))).to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=_lr(cfg, batch), betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    S = cfg.data.img_size
    return model, optimizer, [(torch.randn(batch, 3, S, S).to(dev),)], "HF ViTMAEForPreTraining", None


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time_synthetic(step, inputs: list, warmup: int, steps: int, dev: torch.device) -> dict:
    for i in range(warmup):
        step(inputs[i % len(inputs)])
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        step(inputs[i % len(inputs)])
    _sync(dev)
    return {"step_s": (time.perf_counter() - t0) / steps}


def _time_streamed(step, cfg, spec: dict, masking, dev: torch.device) -> dict:
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


def measure_bf16_peak(n: int = 8192, iters: int = 20) -> float:
    """Achievable bf16 matmul FLOP/s of this CUDA device: large square matmuls timed with CUDA events."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1e3)


# ---------------------------------------------------------------------------------------------------------- decode

DECODE_MIN_SECONDS = 1.0  # each case of each round reads every image at least once and runs at least this long
DECODE_CASES = ("decode", "decode+RandomResizedCrop, old", "decode+RandomResizedCrop, ours", "full transform, old",
                "full transform, ours")


def _run_decode(args: argparse.Namespace) -> dict:
    """Images/sec on one core (this process, one torch thread) of PIL's full decode alone, and of decode + crop and
    the whole pretraining transform, the old way (PIL decode, torchvision on the PIL image) and ours
    (`PretrainTransform` from the encoded bytes, JPEG draft decoding). Every case runs each image under the same
    per-image seed (`seeded`, as ShardStream does), so old and ours crop the same boxes. The cases take turns for
    max(3, --repeat) rounds; each cell is the median round, the ratio the median of the rounds' ratios."""
    import statistics

    from PIL import Image
    from torchvision import transforms as T

    from mimtrain.data.shards import IMAGE_EXTS
    from mimtrain.data.stream import expand_shards
    from mimtrain.data.transforms import open_image, pretrain_transform, reference_pretrain_transform, seeded

    if args.recipe:
        d = _load(*_split_recipe(args.recipe[0], args)).data
    else:
        d = _load(None, list(args.overrides) + ([f"data.img_size={args.img_size}"] if args.img_size else [])).data
    blobs = _read_images(expand_shards(args.decode), tuple(IMAGE_EXTS), args.decode_images)
    if not blobs:
        raise ValueError(f"no images found in {args.decode}")
    torch.set_num_threads(1)
    old_rrc = T.RandomResizedCrop(d.img_size, scale=tuple(d.crop_scale), interpolation=T.InterpolationMode.BICUBIC)
    old_full = reference_pretrain_transform(d.img_size, d.crop_scale, d.hflip, d.mean, d.std)
    ours = pretrain_transform(d.img_size, d.crop_scale, d.hflip, d.mean, d.std)

    def decode(blob: bytes):
        with Image.open(io.BytesIO(blob)) as img:
            return img.convert("RGB")  # forces the full decode

    cases = dict(zip(DECODE_CASES, (decode, lambda b: old_rrc(decode(b)), ours.crop, lambda b: old_full(decode(b)),
                                    ours)))
    rounds: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(max(3, args.repeat)):
        for label, fn in cases.items():
            seeded(fn, blobs[0], 0)
            t0, n = time.perf_counter(), 0
            while n < len(blobs) or time.perf_counter() - t0 < DECODE_MIN_SECONDS:
                seeded(fn, blobs[n % len(blobs)], n % len(blobs))
                n += 1
            rounds[label].append(n / (time.perf_counter() - t0))
    rates = {k: statistics.median(v) for k, v in rounds.items()}
    # Within a round both ran under the same host load: the median of the rounds' ratios.
    ratio = statistics.median(o / d for o, d in zip(rounds[DECODE_CASES[2]], rounds["decode"]))

    def reduction(blob: bytes) -> int:  # under the image's seed, the box ours draws decides its DCT reduction
        img = open_image(blob)
        return ours.reduction(img, ours.draw_box(img))

    reduced = sum(seeded(reduction, b, i) > 1 for i, b in enumerate(blobs)) / len(blobs)
    first = open_image(blobs[0])
    fmt, (w, h) = first.format, first.size
    row = {"name": args.decode, "images": len(blobs), "format": fmt, "source_px": f"{w}x{h}", "img_size": d.img_size,
           "mean_bytes": sum(map(len, blobs)) / len(blobs), "reduced_scale_frac": reduced,
           "ours_crop_over_decode": ratio, **{f"{k} img/s/core": v for k, v in rates.items()}, "rounds": rounds}
    report = {"command": _command(args), "device": f"CPU: {cpu_model()}, 1 process, 1 torch thread",
              "date": _now(), "rows": [row]}
    lines = [f"- command: `{report['command']}`", f"- device: {report['device']}; date: {report['date']}; "
             f"median of {len(rounds['decode'])} interleaved rounds", "",
             "| shards | images (format, source px, mean KB) | out px | " + " | ".join(rates)
             + " | ours crop / decode | reduced-scale decodes |",
             "|---|---|---|" + "---|" * (len(rates) + 2),
             f"| {args.decode} | {len(blobs)} ({fmt}, {w}x{h}, {row['mean_bytes'] / 1024:.1f}) | {d.img_size} | "
             + " | ".join(f"{v:.0f}" for v in rates.values()) + f" | {100 * ratio:.0f}% | {100 * reduced:.0f}% |"]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _read_images(urls: list[str], exts: tuple[str, ...], limit: int) -> list[bytes]:
    """Encoded image bytes from local tar shards, read into memory first so that disk I/O is not timed."""
    out: list[bytes] = []
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar:
                if m.isfile() and m.name.lower().endswith(exts):
                    out.append(tar.extractfile(m).read())
                    if len(out) >= limit:
                        return out
    return out


# ---------------------------------------------------------------------------------------------------------- output

def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "images_per_sec":
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    if key in ("step_ms", "peak_mem_mib"):
        return f"{v:.0f}"
    if key == "gflop_per_img":
        return f"{v:.1f}"
    if key == "mfu":
        return f"{100 * v:.1f}%"
    return str(v)


def format_report(report: dict) -> str:
    """The markdown block `mimtrain bench` prints: command, device, date, one table row per model, HF ratios."""
    streamed = any(r.get("data_wait_frac") is not None for r in report["rows"])
    head = ["model", "method", "img", "batch", "img/s", "step ms", "peak mem MiB", "GFLOP/img", "MFU"]
    head += ["data wait"] if streamed else []
    lines = [f"- command: `{report['command']}`",
             f"- device: {report['device']}; precision {report['precision']}; date: {report['date']}"]
    loads = [x for r in report["rows"] for x in r.get("load_1m", [])]
    if loads:
        lines.append(f"- host load (1-min average, at worker start/end): {min(loads):.1f} to {max(loads):.1f}")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        if r.get("error"):
            lines.append(f"| {r['name']} | {r.get('method', '-')} | " + " | ".join(["-"] * (len(head) - 3))
                         + f" | {r['error']} |")
            continue
        cells = [_cell(r, k) for k in ROW_FIELDS]
        if streamed:
            w = r.get("data_wait_frac")
            cells.append("-" if w is None else f"{100 * w:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    for item in report.get("ours_over_hf", []):
        pairs = item.get("pairs", [])
        each = f" (median runs; interleaved pairs: {', '.join(f'{p:.2f}x' for p in pairs)})" if len(pairs) > 1 else ""
        lines.append(f"\nours / HF images/sec ({item['name']}): {item['ratio']:.2f}x{each}")
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="mimtrain bench worker (internal): one measurement, one JSON line")
    p.add_argument("--worker", required=True, help="JSON spec")
    args = p.parse_args(argv)
    row = _worker_main(json.loads(args.worker))
    print(RESULT_TAG + json.dumps(row), flush=True)


if __name__ == "__main__":
    _main()
