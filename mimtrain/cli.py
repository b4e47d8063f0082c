"""`mimtrain SUBCOMMAND` (also `python -m mimtrain` and `accelerate launch -m mimtrain`)."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from mimtrain.config.errors import OutputPathError, UserError


def is_main_process() -> bool:
    """Rank 0 of a launch (accelerate, torchrun and DeepSpeed set RANK), or a plain single process: summaries are
    printed once, not once per process."""
    return int(os.environ.get("RANK", "0")) == 0


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (refused with one line, before any work)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def check_output_location(path: str | Path, what: str) -> None:
    """Refuse, before any work, an output location that cannot be created or written: one under a file, or on a
    read-only or permission-denied folder. Creates nothing (the run directory is claimed later, by the run)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file, not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{what} {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path} cannot be written: no write permission on {parent} (or it is on a "
                              "read-only filesystem)")


def _pretrain(args) -> None:
    from mimtrain.config.pretrain import load_config
    from mimtrain.engine.trainer import pretrain

    cfg = load_config(args.recipe, args.overrides)
    check_output_location(cfg.output_dir, "output_dir")
    summary = pretrain(cfg)
    if not is_main_process():
        return
    losses = summary["losses"]
    if losses:
        print(f"done: step {summary['step']}, loss {losses[0]:.4f} -> {losses[-1]:.4f} "
              f"({len(losses)} logged points); skipped samples: {summary['skipped']}")
    print(f"run directory: {summary['output_dir']}\ntensorboard:   tensorboard --logdir {summary['tensorboard']}")


def _make_shards(args) -> None:
    from mimtrain.data.shards import make_shards

    make_shards(args.src, args.out_dir, shard_size=args.shard_size, split=args.split, seed=args.seed,
                shuffle=not args.no_shuffle, workers=args.workers, overwrite=args.overwrite,
                image_column=args.image_column, label_column=args.label_column)


def _demo_data(args) -> None:
    from mimtrain.data.demo import write_digits

    n = write_digits(args.out_dir, args.size)
    print(f"wrote {n} images (scikit-learn digits, {args.size}x{args.size} RGB) to {args.out_dir}")


def _export(args) -> None:
    from mimtrain.checkpoint.export import export_as

    written = export_as(args.format, args.ckpt, args.out_dir, overwrite=args.overwrite)
    if args.format == "mimtrain":
        print(f"exported encoder to {written[0]} (encoder.safetensors + config.yaml; model.safetensors + config.json "
              "for timm and mimtrain.checkpoint.hub)")
    elif args.format == "timm-vit":
        print(f"exported a plain timm ViT to {written[0]}")
    else:
        for path in written:
            print(f"exported {path}")


def _eval(kind: str):
    def run(args) -> None:
        from mimtrain.config.classify import load_eval_config

        cfg = load_eval_config(kind, args.recipe, args.overrides)
        check_output_location(cfg.output_dir, "output_dir")
        if kind == "finetune":
            from mimtrain.eval.classify.finetune import finetune
            res = finetune(cfg, args.source)
        elif kind == "linprobe":
            from mimtrain.eval.classify.linprobe import linprobe
            res = linprobe(cfg, args.source, random_init=args.random_init)
        else:
            from mimtrain.eval.classify.knn import knn
            res = knn(cfg, args.source, random_init=args.random_init)
        if not is_main_process() or _preempted(res, cfg):
            return
        top5 = "n/a (fewer than 5 classes)" if res["top5"] is None else f"{res['top5']:.2f}%"
        print(f"{kind}: top-1 {res['top1']:.2f}%  top-5 {top5}  ({res['num_val']} val images); "
              f"results: {cfg.output_dir}/results.json")
    return run


def _dense(kind: str):
    def run(args) -> None:
        from mimtrain.config.dense import load_dense_config

        cfg = load_dense_config(kind, args.recipe, args.overrides)
        check_output_location(cfg.output_dir, "output_dir")
        if kind == "detect":
            from mimtrain.eval.dense.detection import detect
            res = detect(cfg, args.source)
            if _preempted(res, cfg):
                return
            if "box_ap" in res and is_main_process():
                print(f"detect: box AP {res['box_ap']:.4f}  mask AP {res['mask_ap']:.4f}  "
                      f"({res['num_val_images']} val images); results: {cfg.output_dir}/results.json")
        else:
            from mimtrain.eval.dense.segmentation import segment
            res = segment(cfg, args.source)
            if is_main_process() and not _preempted(res, cfg):
                print(f"segment: mIoU {res['mIoU']:.4f}  pixel accuracy {res['aAcc']:.4f}  "
                      f"({res['num_val_images']} val images); results: {cfg.output_dir}/results.json")
    return run


def _preempted(res: dict, cfg) -> bool:
    """A signal stopped the run after a checkpoint (exit 0): say how to continue instead of printing results."""
    if not res.get("preempted"):
        return False
    if is_main_process():
        print(f"{res['task']}: stopped at step {res['step']} by a signal, checkpoint written; continue with the same "
              f"command and resume=auto (output_dir {cfg.output_dir})")
    return True


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mimtrain")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimtrain", description="Masked-image-modeling pretraining (MAE, SimMIM).")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("pretrain", help="pretrain an encoder (one process; use `accelerate launch -m mimtrain`)")
    s.add_argument("--recipe", help="YAML recipe (only the differences from the defaults)")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 data.num_workers=2")
    s.set_defaults(func=_pretrain)

    s = sub.add_parser("make-shards", help="ImageFolder tree or saved HF dataset -> WebDataset tar shards")
    s.add_argument("src")
    s.add_argument("out_dir")
    s.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    s.add_argument("--split", default=None, help="split of a saved DatasetDict (default: train)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random order of samples across shards")
    s.add_argument("--no-shuffle", action="store_true", help="keep the source order (sorted classes, sorted files)")
    s.add_argument("--workers", type=positive_int, default=1, help="processes writing shards in parallel")
    s.add_argument("--overwrite", action="store_true", help="clear a non-empty OUT_DIR first (refused otherwise)")
    s.add_argument("--image-column", default=None, help="HF dataset: image column (default: image/img/pixel_values)")
    s.add_argument("--label-column", default=None,
                   help="HF dataset: label column (default: label/labels/fine_label; none found = unlabelled)")
    s.set_defaults(func=_make_shards)

    s = sub.add_parser("demo-data", help="write the embedded demo image set (scikit-learn digits) as an ImageFolder")
    s.add_argument("out_dir")
    s.add_argument("--size", type=int, default=32)
    s.set_defaults(func=_demo_data)

    s = sub.add_parser("export", help="encoder weights (safetensors) + the config that rebuilds it, from a checkpoint")
    s.add_argument("ckpt", help="pretraining run dir (its latest checkpoint), checkpoint dir or export dir")
    s.add_argument("out_dir")
    s.add_argument("--format", choices=("mimtrain", "timm-vit", "hf"), default="mimtrain",
                   help="mimtrain: our layout plus timm's config.json (default); timm-vit: plain timm vit_* keys; "
                        "hf: transformers ViTMAEForPreTraining (out_dir/vitmae) and ViTModel (out_dir/vit)")
    s.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUT_DIR (replaces the export's files only; refused otherwise). A run "
                        "or checkpoint folder, or a folder inside another run, is refused either way")
    s.set_defaults(func=_export)

    for kind, text in (("finetune", "fine-tune a pretrained encoder for classification on labelled shards"),
                       ("linprobe", "linear probe (frozen encoder, BatchNorm + linear head, LARS)"),
                       ("knn", "weighted k-NN (k=20, T=0.07) on frozen, L2-normalised features")):
        s = sub.add_parser(kind, help=text)
        where = f"recipes/{kind}/..." if kind != "knn" else "none shipped: the defaults are k=20, T=0.07"
        s.add_argument("--recipe", help=f"YAML recipe ({where}; only the differences from the defaults)")
        s.add_argument("--from", dest="source", required=True,
                       help="pretraining run dir, checkpoint dir, export dir, or a weights file (timm/MAE ViT)")
        if kind != "finetune":
            s.add_argument("--random-init", action="store_true",
                           help="evaluate the same architecture with random weights (a baseline)")
        example = "knn.k=10" if kind == "knn" else "train.epochs=10"
        s.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. data.val_shards=... {example}")
        s.set_defaults(func=_eval(kind))

    from mimtrain.bench import add_parser as _bench; _bench(sub)  # noqa: E702
    for kind, text, data in (
            ("detect", "COCO Mask R-CNN (box and mask AP) on a pretrained encoder",
             "data.root=COCO_DIR (annotations/instances_{train,val}2017.json, train2017/, val2017/)"),
            ("segment", "ADE20K UperNet (mIoU, pixel accuracy) on a pretrained encoder",
             "data.root=DIR holding ADEChallengeData2016/")):
        s = sub.add_parser(kind, help=text)
        s.add_argument("--recipe", help=f"YAML recipe (recipes/{kind}/...; only the differences from the defaults)")
        s.add_argument("--from", dest="source", required=True,
                       help="pretraining run dir, checkpoint dir, export dir, or a weights file (timm/MAE ViT)")
        s.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {data} train.max_steps=100")
        s.set_defaults(func=_dense(kind))
    return p


def _one_line(e: BaseException) -> str:
    """The message on one line: lines joined; of an error re-raised from a DataLoader worker (its message carries
    the worker's traceback), only the original message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        lines = [lines[-1].split(": ", 1)[-1]]
    return "; ".join(lines) or type(e).__name__


def main(argv: list[str] | None = None) -> None:
    """The one boundary for errors: a user error (mimtrain.config.errors, which CheckpointError and the other
    project errors derive from) prints one line and exits with its code (2: bad input or output location; 3: an
    unusable checkpoint, export or weights file, or a non-finite loss). Anything else is a bug in mimtrain: its
    traceback is printed, with a line saying so, and the exit status is 1."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "out_dir", None):  # export, make-shards, demo-data
            check_output_location(args.out_dir, "OUT_DIR")
        args.func(args)
    except UserError as e:
        print(f"mimtrain {args.command}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except RuntimeError as e:
        from mimtrain.engine.fit import NonFiniteLoss

        if not isinstance(e, NonFiniteLoss):
            _internal(args.command)
        print(f"mimtrain {args.command}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(3)
    except Exception:
        _internal(args.command)


def _internal(command: str) -> None:
    """Inside an `except`: print the traceback and say it is a bug to report, then exit 1."""
    traceback.print_exc()
    print(f"mimtrain {command}: internal error: the traceback above is a bug in mimtrain, not a problem with your "
          "input; please report it (with the command line and the traceback)", file=sys.stderr)
    sys.exit(1)
