"""`mimtrain detect` and `mimtrain segment`: the two dense-transfer subcommands (hooked into `mimtrain.cli`)."""
from __future__ import annotations

import argparse


def _run(kind: str):
    def run(args: argparse.Namespace) -> None:
        from mimtrain.cli import is_main_process
        from mimtrain.config.dense import load_dense_config

        cfg = load_dense_config(kind, args.recipe, args.overrides)
        if kind == "detect":
            from mimtrain.eval.dense.detection import detect
            res = detect(cfg, args.source)
            if "box_ap" in res and is_main_process():
                print(f"detect: box AP {res['box_ap']:.4f}  mask AP {res['mask_ap']:.4f}  "
                      f"({res['num_val_images']} val images); results: {cfg.output_dir}/results.json")
        else:
            from mimtrain.eval.dense.segmentation import segment
            res = segment(cfg, args.source)
            if is_main_process():
                print(f"segment: mIoU {res['mIoU']:.4f}  pixel accuracy {res['aAcc']:.4f}  "
                      f"({res['num_val_images']} val images); results: {cfg.output_dir}/results.json")
    return run


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `detect` and `segment` to the `mimtrain` subcommand parser."""
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
        s.set_defaults(func=_run(kind))
