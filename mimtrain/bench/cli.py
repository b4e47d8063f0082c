"""`mimtrain bench`: training-step throughput, memory, FLOPs and MFU of recipes, on synthetic or streamed data.

    mimtrain bench [--recipe recipes/pretrain/mae_vit_base.yaml [--recipe R2 ...]] [--batch 8] [--steps 10]
        [--warmup 3] [--repeat 1] [--img-size 224] [--compare hf] [--precision fp32|bf16] [--data SHARDS]
        [--grad-checkpointing off|on|both] [--json OUT] [--dry-run] [overrides]
    mimtrain bench --decode SHARDS [--recipe R] [--img-size 224] [--decode-images 300] [--repeat 3]
    mimtrain bench --table ENCODER [ENCODER ...] [--img-size 224] [--json OUT]

Without --recipe it times the default set (`DEFAULT_SET`): the CPU demo's tiny MAE ViT
(recipes/pretrain/mae_vit_tiny_cpu.yaml) and the same encoder under SimMIM's ViT recipe, both at 32 px, batch 64,
a few minutes on a laptop CPU (`make bench`). With --compare hf the default set is its MAE recipe only.

A timed step is what the trainer runs: forward, backward, AdamW step (`build_optimizer`, fused where supported),
zero_grad. Masks are drawn by the recipe's `MaskingService` on the CPU before timing, images are random (or streamed
from shards with `--data`). Every model runs in a fresh worker process (`python -m mimtrain.bench.step --worker SPEC`,
one JSON line back) so that peak memory (CUDA: max_memory_allocated; CPU: peak RSS above the worker's baseline
before the model is built) and allocator state never leak from one model into the next.

A `--recipe` value may carry its own overrides after the path (`--recipe 'R encoder.name=X data.img_size=192'`);
they apply after the overrides shared by all recipes, so one command can put variants side by side. The model is
built as the trainer builds it (`methods.build_pretraining`, then `engine.fastpath.apply_fast_path`), so the
switches `train.compile`, `train.compile_mode`, `train.channels_last`, `train.sdpa`, `optim.fused` and
`train.precision` (when --precision is not given) measure each piece on or off; the row's name lists the ones that
differ from the defaults. A compiled model gets at least 10 warm-up steps.
GFLOP/img counts one forward+backward with `torch.utils.flop_counter` (2 FLOPs per multiply-add, matmuls, convs and
attention only; the optimizer is not counted). MFU = counted FLOP/s / the bf16 matmul peak measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from mimtrain.bench.report import RESULT_TAG, command, device_line, format_report, now, write_json
from mimtrain.config.errors import ConfigError, MissingPathError

COMPILED_WARMUP = 10  # untimed steps at least, for a recipe with train.compile=true
REPO = Path(__file__).resolve().parents[2]  # recipes/ ships beside the package in a checkout, not in a wheel
# `mimtrain bench` without --recipe (and `make bench`): the two methods on the CPU demo's encoder, a few minutes on a
# laptop CPU. The SimMIM row is SimMIM's ViT recipe (fill mode, ratio 0.6, L1 on raw pixels) on the demo's tiny ViT,
# with mask cells of 2x2 patches as in that recipe (32 px over 16-px patches there, 8 px over 4-px patches here).
DEFAULT_SET = (
    "recipes/pretrain/mae_vit_tiny_cpu.yaml",
    "recipes/pretrain/simmim_vit_base.yaml encoder.name=mim_vit_tiny_patch16 "
    "'encoder.kwargs={patch_size: 4, embed_dim: 96, depth: 4, num_heads: 3}' data.img_size=32 encoder.mask_unit=8 "
    "train.batch_size=64",
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to `mimtrain`'s subparsers."""
    s = subparsers.add_parser("bench", help="time training steps (img/s, memory, FLOPs, MFU) of recipes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--recipe", action="append", default=[],
                   help="recipe YAML, optionally followed by its own overrides in the same (quoted) argument; repeat "
                        "(default: the CPU demo's MAE and SimMIM, see above)")
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
    s.add_argument("--table", nargs="+", metavar="ENCODER", help="print params and GFLOPs (MACs, 1000-class head, "
                   "one --img-size image) of these registered encoders instead of timing steps")
    s.add_argument("--dry-run", action="store_true", help="list the models that would be timed (recipe, overrides, "
                   "batch, precision, steps) and stop")
    s.add_argument("--grad-checkpointing", choices=("off", "on", "both"), default="off",
                   help="train.grad_checkpointing for every recipe; both: each recipe twice, off then on (memory)")
    s.add_argument("--json", help="also write the rows (and the command, device, date) to this JSON file")
    s.add_argument("overrides", nargs="*", help="dotted overrides for every recipe, e.g. data.num_workers=2")
    s.set_defaults(func=run_bench)
    return s


def run_bench(args: argparse.Namespace) -> dict:
    """Entry point of `mimtrain bench`: validate everything, run one worker per model, print and save the table."""
    if args.table:
        return _run_table(args)
    if args.decode:
        return _run_decode(args)
    if args.steps < 1 or args.warmup < 0 or args.repeat < 1:
        raise ConfigError(f"--steps and --repeat must be >= 1 and --warmup >= 0 (got {args.steps}, {args.repeat}, "
                          f"{args.warmup})")
    specs = plan(args)
    if args.dry_run:
        for _, spec in specs:
            print(f"{shlex.join([spec['recipe'], *spec['overrides']])}: batch {spec['batch']}, {spec['precision']}, "
                  f"{spec['warmup']} warm-up + {spec['steps']} timed steps")
        return {"command": command(args), "specs": [spec for _, spec in specs]}
    report = _run_specs(specs, args)
    if not args.recipe:
        report["default_set"] = _default_set(args)
    print(format_report(report))
    write_json(args.json, report)
    return report


def _default_set(args: argparse.Namespace) -> list[str]:
    """`DEFAULT_SET`, less the recipes --compare hf cannot compare (all but the MAE ViT)."""
    if args.compare != "hf":
        return list(DEFAULT_SET)
    from mimtrain.bench.hf import is_hf_comparable

    return [item for item in DEFAULT_SET if is_hf_comparable(_load(*_split_recipe(_in_repo(item), args)))]


def _in_repo(item: str) -> str:
    """A `DEFAULT_SET` item with its recipe path made absolute (the set names recipes in this checkout)."""
    path, _, rest = item.partition(" ")
    full = REPO / path
    if not full.is_file():
        raise MissingPathError(f"no --recipe given and the default set's {path} is not at {full} (recipes/ ships with "
                               f"the repository, not the package): give --recipe")
    return f"{shlex.quote(str(full))} {rest}"


def plan(args: argparse.Namespace) -> list[tuple[object, dict]]:
    """[(config, worker spec)] for every --recipe (or the default set), everything refusable refused before any
    worker starts: bad keys, --compare hf on a non-ViT-MAE recipe, shards that do not exist."""
    cuda = torch.cuda.is_available()
    items = args.recipe or [_in_repo(item) for item in _default_set(args)]
    specs = []
    ckpt = {"off": ["false"], "on": ["true"], "both": ["false", "true"]}[getattr(args, "grad_checkpointing", "off")]
    for item, flag in [(item, flag) for item in items for flag in ckpt]:
        recipe, overrides = _split_recipe(item, args)
        overrides = overrides + ([f"train.grad_checkpointing={flag}"] if flag == "true" else [])
        cfg = _load(recipe, overrides)
        if args.compare == "hf":
            from mimtrain.bench.hf import check_hf_comparable

            check_hf_comparable(cfg, item)
        if args.data:
            from mimtrain.data.stream import expand_shards
            expand_shards(args.data)
        # A compiled model's first steps compile (and inductor's workers keep compiling for a few more steps).
        warmup = max(args.warmup, COMPILED_WARMUP) if cfg.train.compile else args.warmup
        spec = dict(recipe=recipe, overrides=overrides, batch=args.batch or cfg.train.batch_size, steps=args.steps,
                    warmup=warmup, precision=_step_precision(cfg, args, cuda), data=args.data or "")
        specs.append((cfg, spec))
    return specs


def _run_specs(specs: list[tuple[object, dict]], args: argparse.Namespace) -> dict:
    """Run the workers (peak probe on CUDA first, then each model --repeat times, ours and HF interleaved)."""
    peak_flops = _worker({"kind": "peak"}).get("peak_flops", 0.0) if torch.cuda.is_available() else 0.0
    rows, ratios = [], []
    kinds = ("ours", "hf") if args.compare == "hf" else ("ours",)
    for _, spec in specs:
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
    return {"command": command(args), "device": device_line(rows), "date": now(),
            "precision": precisions[0] if len(precisions) == 1 else "per row", "rows": rows, "ours_over_hf": ratios}


def _step_precision(cfg, args: argparse.Namespace, cuda: bool) -> str:
    """--precision if given, else the recipe's train.precision ('auto': bf16 on CUDA, fp32 on CPU)."""
    precision = args.precision or {"auto": "bf16" if cuda else "fp32"}.get(cfg.train.precision, cfg.train.precision)
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"mimtrain bench times bf16 or fp32 steps, not train.precision={precision}")
    return precision


def _median_row(runs: list[dict]) -> dict:
    """The run with the median images/sec (the lower one of an even count); all runs' rates kept in the row."""
    good = sorted((r for r in runs if r.get("images_per_sec")), key=lambda r: r["images_per_sec"])
    if not good:
        return runs[0]
    row = dict(good[(len(good) - 1) // 2])
    row["images_per_sec_runs"] = [r["images_per_sec"] for r in runs if r.get("images_per_sec")]
    return row


def _finish_row(row: dict, peak_flops: float) -> dict:
    if peak_flops and row.get("gflop_per_img") and row.get("images_per_sec"):
        row["mfu"] = row["gflop_per_img"] * 1e9 * row["images_per_sec"] / peak_flops
        row["peak_tflops_bf16"] = peak_flops / 1e12
    else:
        row.setdefault("mfu", None)
    return row


def _split_recipe(item: str, args: argparse.Namespace) -> tuple[str, list[str]]:
    """'path k=v "k2={a: 1}"' -> (path, shared overrides + the recipe's own + --img-size)."""
    try:
        parts = shlex.split(item)
    except ValueError as e:  # an unbalanced quote
        raise ConfigError(f"--recipe {item!r}: {e}") from None
    if not parts:
        raise ConfigError("--recipe '': give a recipe path")
    loose = [p for p in parts[1:] if "=" not in p]
    if loose:  # `k={a: 1}` unquoted inside the argument splits at its space
        raise ConfigError(f"--recipe {item!r}: {loose[0]!r} is not a key=value override; a value with spaces needs "
                          f"its own quotes inside the argument, e.g. --recipe '{parts[0]} "
                          f"\"encoder.kwargs={{embed_dim: 24}}\"'")
    extra = [f"data.img_size={args.img_size}"] if args.img_size else []
    return parts[0], list(args.overrides) + parts[1:] + extra


def _load(recipe: str | None, overrides: list[str]):
    from mimtrain.config.pretrain import load_config

    return load_config(recipe, overrides)


def _worker(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter; return its JSON row (with 'error' if it failed)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "mimtrain.bench.step", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = proc.stderr.strip().splitlines()[-3:]
    oom = "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
    sys.stderr.write(proc.stderr[-4000:])
    return {"name": spec.get("recipe", spec["kind"]), "kind": spec["kind"], "method": "-",
            "error": "OOM" if oom else f"worker failed (exit {proc.returncode}): {' | '.join(tail)}"}


def _run_decode(args: argparse.Namespace) -> dict:
    """--decode: the data settings of the first --recipe (or the defaults, with the shared overrides) -> one row."""
    from mimtrain.bench.decode import DECODE_CASES, run_decode
    from mimtrain.bench.report import cpu_model, format_decode_report

    if args.recipe:
        d = _load(*_split_recipe(args.recipe[0], args)).data
    else:
        d = _load(None, list(args.overrides) + ([f"data.img_size={args.img_size}"] if args.img_size else [])).data
    row = run_decode(args.decode, d, args.decode_images, args.repeat)
    report = {"command": command(args), "device": f"CPU: {cpu_model()}, 1 process, 1 torch thread",
              "date": now(), "rows": [row]}
    print(format_decode_report(report, DECODE_CASES))
    write_json(args.json, report)
    return report


def _run_table(args: argparse.Namespace) -> dict:
    """--table: params / MACs of registered encoders by name (`mimtrain.bench.model_table`)."""
    if args.recipe or args.decode or args.overrides:
        raise ConfigError("--table counts registered encoders by name: it takes no --recipe, --decode or overrides")
    from mimtrain.bench.model_table import format_table, table_rows

    size = args.img_size or 224
    report = {"command": command(args), "date": now(), "rows": table_rows(args.table, (size, size))}
    print(format_table(report["rows"]))
    write_json(args.json, report)
    return report
