"""What `mimtrain bench` prints and saves: the markdown tables, the JSON file, the worker's result line, and the
command / device / date lines that make a table reproducible."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
from pathlib import Path

import torch

RESULT_TAG = "MIMTRAIN_BENCH_RESULT "  # a worker's one result line on stdout: this tag, then the row as JSON
ROW_FIELDS = ("name", "method", "img_size", "batch", "images_per_sec", "step_ms", "peak_mem_mib", "gflop_per_img",
              "mfu")


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (rebuilt from the parsed arguments; defaults left out)."""
    out = ["mimtrain", "bench"]
    for r in args.recipe:
        out += ["--recipe", r]
    if getattr(args, "table", None):
        out += ["--table", *args.table]
    for flag, value, default in (("--batch", args.batch, 0), ("--steps", args.steps, 10),
                                 ("--warmup", args.warmup, 3), ("--repeat", args.repeat, 1),
                                 ("--img-size", args.img_size, 0),
                                 ("--compare", args.compare, None), ("--precision", args.precision, None),
                                 ("--data", args.data, None), ("--decode", args.decode, None),
                                 ("--decode-images", getattr(args, "decode_images", 300), 300),
                                 ("--grad-checkpointing", getattr(args, "grad_checkpointing", "off"), "off"),
                                 ("--json", args.json, None)):
        if value != default:
            out += [flag, str(value)]
    return " ".join(_quote(a) for a in out + list(args.overrides))


def _quote(arg: str) -> str:
    """shlex.quote, but double quotes around arguments that hold single quotes (recipes with their own overrides)."""
    if "'" in arg and not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_line(rows: list[dict]) -> str:
    """GPU (from the workers' rows) and host: CPU model, visible cores, torch version, torch threads."""
    threads = next((r["threads"] for r in rows if "threads" in r), torch.get_num_threads())
    base = f"{cpu_model()} ({os.cpu_count()} logical cores visible), torch {torch.__version__}, {threads} threads"
    gpu = next((r["gpu"] for r in rows if r.get("gpu")), "")
    return f"{gpu}; host {base}" if gpu else f"CPU only: {base}"


def write_json(path: str | None, report: dict | list) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "images_per_sec":
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    if key in ("step_ms", "peak_mem_mib"):
        return f"{v:.0f}"
    if key == "gflop_per_img":
        return f"{v:.1f}" if v >= 1 else f"{v:.3f}"  # the CPU demo's tiny models are well under 1
    if key == "mfu":
        return f"{100 * v:.1f}%"
    return str(v)


def format_report(report: dict) -> str:
    """The markdown block of timed steps: command, device, date, one table row per model, HF ratios."""
    streamed = any(r.get("data_wait_frac") is not None for r in report["rows"])
    head = ["model", "method", "img", "batch", "img/s", "step ms", "peak mem MiB", "GFLOP/img", "MFU"]
    head += ["data wait"] if streamed else []
    lines = [f"- command: `{report['command']}`"]
    if report.get("default_set"):
        lines.append("- no --recipe: the default set, " + "; ".join(f"`{r}`" for r in report["default_set"]))
    lines.append(f"- device: {report['device']}; precision {report['precision']}; date: {report['date']}")
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


def format_decode_report(report: dict, cases: tuple[str, ...]) -> str:
    """The markdown block of `--decode`: one row of images/sec per case (columns in `cases` order)."""
    (row,) = report["rows"]
    n_rounds = len(row["rounds"][cases[0]])
    return "\n".join([
        f"- command: `{report['command']}`",
        f"- device: {report['device']}; date: {report['date']}; median of {n_rounds} interleaved rounds", "",
        "| shards | images (format, source px, mean KB) | out px | " + " | ".join(cases)
        + " | ours crop / decode | reduced-scale decodes |",
        "|---|---|---|" + "---|" * (len(cases) + 2),
        f"| {row['name']} | {row['images']} ({row['format']}, {row['source_px']}, {row['mean_bytes'] / 1024:.1f}) | "
        f"{row['img_size']} | " + " | ".join(f"{row[f'{c} img/s/core']:.0f}" for c in cases)
        + f" | {100 * row['ours_crop_over_decode']:.0f}% | {100 * row['reduced_scale_frac']:.0f}% |"])
