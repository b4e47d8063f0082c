"""Parameter / multiply-add table of registered encoders, as papers report them (1000-class head, one image).

    python -m mimtrain.bench.model_table hivit_tiny hivit_small hivit_base hivit_large [--img-size 224] \
        [--json out.json]
    mimtrain bench --table hivit_tiny hivit_small hivit_base hivit_large [--img-size 224] [--json out.json]

Prints a markdown table; GFLOPs are multiply-adds (MACs), counted by `mimtrain.bench.flops.count_params_and_macs`.
"""
from __future__ import annotations

import argparse

from mimtrain.bench.flops import count_params_and_macs
from mimtrain.bench.report import write_json


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def table_rows(names: list[str], img_size: tuple[int, int], device: str = "auto") -> list[dict]:
    """One row per encoder name: params (M) and GMACs of one image at img_size (H, W)."""
    h, w = img_size
    rows = []
    for name in names:
        params, macs = count_params_and_macs(name, (h, w), device=device)
        rows.append(dict(name=name, img_size=[h, w], params_m=round(params / 1e6, 2), gmacs=round(macs / 1e9, 2)))
    return rows


def format_table(rows: list[dict]) -> str:
    h, w = rows[0]["img_size"] if rows else (224, 224)
    lines = [f"| model | params (M) | GFLOPs (MACs) at {h}x{w} |", "|---|---|---|"]
    return "\n".join(lines + [f"| {r['name']} | {r['params_m']:.2f} | {r['gmacs']:.2f} |" for r in rows])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="registered timm names")
    parser.add_argument("--img-size", type=_size, default=(224, 224), help="224 or HxW, e.g. 192x256")
    parser.add_argument("--device", default="auto", choices=("auto", "meta", "cpu"),
                        help="meta counts on shapes only (fast); auto falls back to cpu where meta cannot run")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = table_rows(args.names, args.img_size, args.device)
    print(format_table(rows))
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
