"""`launch/gpu_check.sh`: the checks a short GPU slot is for, most valuable first, each under its own time cap.

    python -m mimtrain.bench.gpu_check [--dry-run | --cpu-smoke] [--only a,c] [--doc docs/benchmarks.md] [--out DIR]

Parts (GPU sizes; `--cpu-smoke` runs the same commands at toy sizes on the CPU, so CI tests this script):
    a. MAE ViT-B/16, bf16, batch 256, the fast path (compiled, one worker), against HF ViTMAEForPreTraining in the
       same `mimtrain bench` run: MFU over the bf16 matmul peak measured in that run, and ours / HF;
    b. the same pair eager: what the fast path owes to the compiler, and a ratio even if compiling runs past a's cap;
    c. MAE HiViT-B against SimMIM Swin-B at 224, eager (two more compiles would not pay back inside the cap);
    d. one bf16 training step of every registered encoder family in its method, in one process (dtype errors);
    e. 30 steps of `mimtrain pretrain` through the CLI from photo-like JPEG shards with the recipe's loader workers:
       data-wait fraction and images/s (eager);
    f. a single-GPU FSDP2 and a ZeRO-2 step through `accelerate launch` (on CPU: 2 gloo processes).

Each part is one command run under coreutils `timeout`; a part that fails or runs out of time is recorded as such
and the next one starts. Results go to `--out` (JSON and logs) and into the GPU section of `--doc`, between the
`gpu-check` markers: one row per part (device, date, commit, command, result), then the printed tables.
`--cpu-smoke` writes to `--out`/benchmarks.md unless `--doc` is given, never to the committed page by default.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
BUDGET_S = 600  # one slot's command time after the install
# --cpu-smoke tests what the script does, not how fast: every part gets this cap (toy sizes take seconds on an idle
# CPU, but a 2-core CI host shared with other jobs stretches each interpreter start to tens of seconds).
SMOKE_CAP_S = 300
ViT, HIVIT, SWIN = ("recipes/pretrain/mae_vit_base.yaml", "recipes/pretrain/mae_hivit_base.yaml",
                    "recipes/pretrain/simmim_swin_base_224.yaml")
DEMO = "recipes/pretrain/mae_vit_tiny_cpu.yaml"
# d: one recipe per (encoder family, method); `families_covered` (tests) checks that no registered family is missing.
# The smoke size of each: the tiny shapes of tests/test_pretrain_encoders.py.
FAMILY_STEPS = {
    "recipes/pretrain/mae_vit_base.yaml": ["encoder.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
                                           "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2",
                                           "data.img_size=32"],
    "recipes/pretrain/simmim_vit_base.yaml": ["encoder.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
                                              "data.img_size=32", "encoder.mask_unit=16"],
    "recipes/pretrain/mae_hivit_base.yaml": ["encoder.kwargs={dims: [16, 32, 64], depths: [1, 1, 2], num_heads: 2}",
                                             "method.decoder_dim=32", "method.decoder_depth=1",
                                             "method.decoder_heads=2", "data.img_size=64"],
    "recipes/pretrain/simmim_swin_base_224.yaml": ["encoder.kwargs={embed_dim: 16, depths: [1, 1, 2, 1], "
                                                   "num_heads: [1, 2, 2, 4], window_size: 2}", "data.img_size=64",
                                                   "encoder.mask_unit=16"],
    "recipes/pretrain/simmim_gcvit_tiny.yaml": ["encoder.kwargs={embed_dim: 16, depths: [1, 1, 2, 1], "
                                                "num_heads: [1, 2, 4, 8]}", "data.img_size=64",
                                                "encoder.mask_unit=16"],
    "recipes/pretrain/simmim_gpvit_l1.yaml": ["encoder.kwargs={embed_dim: 24, depth: 3, num_heads: 4, gp_positions: "
                                              "[0, 2], group_nums: [8, 4], group_heads: 2, stem_chs: 8}",
                                              "data.img_size=64", "encoder.mask_unit=16"],
    "recipes/pretrain/simmim_dgt_tiny.yaml": ["encoder.kwargs={stem_dim: 8, dims: [8, 16, 32, 64], "
                                              "depths: [1, 1, 1, 1], num_heads: [1, 2, 2, 4], num_groups: 4, "
                                              "topk: 8, head_hidden: 32}",
                                              "data.img_size=64", "encoder.mask_unit=16"],
    "recipes/pretrain/simmim_glnet_stl.yaml": ["encoder.kwargs={embed_dim: 16, depths: [1, 1, 2, 1], "
                                               "num_heads: [1, 1, 2, 4], num_slots: 16}", "data.img_size=64",
                                               "encoder.mask_unit=16"],
}
SWIN_TINY = FAMILY_STEPS[SWIN]
HIVIT_TINY = FAMILY_STEPS[HIVIT]


@dataclass
class Part:
    key: str
    title: str
    cap_s: int
    argv: list[str]
    note: str = ""
    json: str = ""  # the result file the part writes, read back for the summary
    prepare: list[str] = field(default_factory=list)  # a command run first, inside the same cap


def _bench(*args: str) -> list[str]:
    return [sys.executable, "-m", "mimtrain", "bench", *args]


def _launch(config: str, nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/accelerate/{config}",
            "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "mimtrain", *args]


def plan(out: Path, smoke: bool) -> list[Part]:
    """The parts in the order they run, with their caps (GPU) or their toy sizes (`smoke`, CPU)."""
    j = {k: str(out / f"{k}.json") for k in "abcdef"}
    photos = out / "photos"
    if smoke:
        vit = [shlex.join([DEMO, *FAMILY_STEPS[ViT]])]
        batch, steps = "4", ["--steps", "1", "--warmup", "1"]
        fast = vit  # CPU: no compile (inductor takes ~40 s for even the toy model here)
        pair = ["--recipe", shlex.join([HIVIT, *HIVIT_TINY]), "--recipe", shlex.join([SWIN, *SWIN_TINY])]
        photo_args, pre_steps, pre_batch, nproc = ["--count", "48", "--size", "64x48"], 3, 4, 2
        tiny = ["encoder.name=mim_vit_tiny_patch16", "encoder.kwargs={patch_size: 8, embed_dim: 32, depth: 2, "
                "num_heads: 2}", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2",
                "data.img_size=32", "data.num_workers=1", "data.shuffle_buffer=16"]
        pre_recipe, dist_steps = DEMO, 2
    else:
        vit, batch, steps = [ViT], "256", ["--steps", "30"]
        fast = [f"{ViT} train.compile=true"]
        pair = ["--recipe", HIVIT, "--recipe", SWIN]
        photo_args, pre_steps, pre_batch, nproc = ["--count", "2560", "--size", "500x375"], 30, 256, 1
        tiny = []
        pre_recipe, dist_steps = ViT, 3
    pretrain = ["pretrain", "--recipe", pre_recipe, f"data.train_shards={photos / 'shards'}",
                f"train.batch_size={pre_batch}", "train.progress=false", "train.image_every=0", "train.log_every=1",
                "train.ckpt_every=100000", "overwrite=true", "train.precision=bf16", *tiny]
    dist = [*pretrain[:3], f"data.train_shards={photos / 'shards'}", "train.batch_size=8", "train.progress=false",
            "train.image_every=0", "train.log_every=1", "train.ckpt_every=100000", "overwrite=true", *tiny,
            f"train.max_steps={dist_steps}", "train.precision=bf16"]
    return [
        Part("a", "MAE ViT-B/16 bf16, batch 256, fast path (compiled), MFU, vs HF in the same run", 200,
             _bench("--recipe", fast[0], "--batch", batch, *steps, "--precision", "bf16", "--compare", "hf",
                    "--json", j["a"]),
             "one compiled worker (at least 10 warm-up steps), then HF eager" if not smoke else
             "compile skipped on CPU (it cannot pay back in a smoke run)", j["a"]),
        Part("b", "the same pair eager (ours without compile vs HF)", 70,
             _bench("--recipe", vit[0], "--batch", batch, *steps, "--precision", "bf16",
                    *([] if smoke else ["--compare", "hf"]), "--json", j["b"]),
             "no compile" + ("; on CPU without HF (a, also eager there, ran the pair)" if smoke else ""), j["b"]),
        Part("c", "MAE HiViT-B vs SimMIM Swin-B at 224, bf16, batch 256", 90,
             _bench(*pair, "--batch", batch, *steps, "--precision", "bf16", "--json", j["c"]),
             "eager: two compiles (~1 min each) would not pay back inside the cap", j["c"]),
        Part("d", "one bf16 training step of every registered family in its method", 80,
             [sys.executable, "-m", "mimtrain.bench.gpu_check", "--family-steps", j["d"]]
             + (["--smoke-sizes"] if smoke else []), "one process, batch 8, eager", j["d"]),
        Part("e", f"{pre_steps} steps of `mimtrain pretrain` from photo-like JPEG shards, the recipe's workers", 110,
             [sys.executable, "-m", "mimtrain", *pretrain, f"train.max_steps={pre_steps}",
              f"output_dir={out / 'e_run'}"], "eager; shards written first (inside the cap)", str(out / "e_run"),
             prepare=[sys.executable, "-m", "mimtrain.bench.photo_shards", str(photos), *photo_args,
                      "--shard-size", "256"]),
        Part("f", f"FSDP2 and ZeRO-2 smoke ({nproc} process{'es' if nproc > 1 else ''}, {dist_steps} steps each)", 50,
             _launch("fsdp.yaml", nproc, *dist, f"output_dir={out / 'f_fsdp'}"),
             # On CPU the ZeRO-2 launch is left out: tests/test_distributed.py runs it, and CI time is short.
             "FSDP2 only on CPU" if smoke else "", str(out / "f_fsdp"),
             prepare=[] if smoke else _launch("deepspeed_zero2.yaml", nproc, *dist, f"output_dir={out / 'f_zero2'}")),
    ]


def print_plan(parts: list[Part], install_note: str) -> None:
    print(install_note)
    for p in parts:
        print(f"{p.key}. [{p.cap_s:4d} s] {p.title}" + (f" ({p.note})" if p.note else ""))
        for cmd in ([p.prepare] if p.prepare else []) + [p.argv]:
            print(f"      {shlex.join(cmd)}")
    total = sum(p.cap_s for p in parts)
    print(f"total: {total} s of commands after the install (budget {BUDGET_S} s)")


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("+changes" if dirty else "")) if rev else "unknown"


def _device() -> str:
    import torch

    from mimtrain.bench.report import cpu_model

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU only: {cpu_model()} (torch {torch.__version__})"


def run_part(part: Part, out: Path, smoke: bool = False) -> dict:
    """Run one part under `timeout` (prepare + command share the cap) -> {status, seconds, log, summary}.

    `smoke`: one torch thread per process; on a small shared CI host, 2-thread OpenMP steps of toy models slow down
    by 2-20x whenever other jobs hold the cores."""
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if smoke else {})}
    cap = SMOKE_CAP_S if smoke else part.cap_s
    log = out / f"{part.key}.log"
    t0 = time.monotonic()
    status = "ok"
    with open(log, "w") as f:
        for cmd in ([part.prepare] if part.prepare else []) + [part.argv]:
            left = cap - (time.monotonic() - t0)
            if left <= 1:
                status = f"timed out ({cap} s cap)"
                break
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(["timeout", "--kill-after=10", f"{left:.0f}", *cmd], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, env=env).returncode
            if rc in (124, 137):
                status = f"timed out ({cap} s cap)"
                break
            if rc != 0:
                status = f"failed (exit {rc}, see {log.name})"
                break
    return {"status": status, "seconds": time.monotonic() - t0, "cap_s": cap, "log": str(log),
            "summary": summarize(part)}


def summarize(part: Part) -> str:
    """One line of results from the part's output file (empty if it wrote none)."""
    path = Path(part.json)
    try:
        if part.key in "abc":
            rep = json.loads(path.read_text())
            cells = [f"{r['name']}: " + (r["error"] if r.get("error") else f"{r['images_per_sec']:.0f} img/s"
                                         + (f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""))
                     for r in rep["rows"]]
            cells += [f"ours/HF {x['ratio']:.2f}x" for x in rep.get("ours_over_hf", [])]
            return "; ".join(cells)
        if part.key == "d":
            rows = json.loads(path.read_text())
            bad = [f"{r['family']}/{r['method']}: {r['error']}" for r in rows if r.get("error")]
            ok = f"{len(rows) - len(bad)}/{len(rows)} families stepped in bf16"
            return "; ".join([ok, *bad])
        records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        if part.key == "e":
            later = steps[len(steps) // 3:] or steps  # the first steps include worker start-up
            ips = sum(r["images_per_sec"] for r in later) / len(later)
            wait = sum(r["data_wait_frac"] for r in later) / len(later)
            span = f"{later[0]['step']}-{later[-1]['step']}"
            return f"{ips:.0f} img/s, data wait {100 * wait:.0f}% (mean of steps {span})"
        zero = path.parent / "f_zero2" / "metrics.jsonl"
        z = [json.loads(x) for x in zero.read_text().splitlines() if "loss" in x] if zero.exists() else []
        zero_text = f"; ZeRO-2 losses {[round(r['loss'], 4) for r in z]}" if z else ""
        return f"FSDP2 losses {[round(r['loss'], 4) for r in steps]}{zero_text}"
    except (OSError, ValueError, KeyError, ZeroDivisionError):
        return ""


def write_doc(doc: Path, parts: list[Part], results: dict, out: Path, smoke: bool) -> None:
    """Insert this run's block after the `gpu-check:begin` marker (newest first) in `doc`."""
    device, date, commit = _device(), datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), _commit()
    lines = [f"### gpu_check{' --cpu-smoke' if smoke else ''}: {device}, {date}, commit {commit}", "",
             "| part | device | date | commit | command | cap s | took s | status | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in parts:
        r = results.get(p.key)
        if r is None:
            continue
        cmd = "; ".join(shlex.join(c) for c in ([p.prepare] if p.prepare else []) + [p.argv])
        cmd = cmd.replace(str(out), "$OUT").replace(sys.executable, "python").replace("|", "\\|")
        lines.append(f"| {p.key}. {p.title} | {device} | {date} | {commit} | `{cmd}` | {r['cap_s']} | "
                     f"{r['seconds']:.0f} | {r['status']} | {r['summary'].replace('|', '/') or '-'} |")
    for p in parts:
        if p.key in "abc" and p.key in results and Path(p.json).exists():
            from mimtrain.bench.report import format_report

            lines += ["", f"Part {p.key}:", "", format_report(json.loads(Path(p.json).read_text()))]
    text = doc.read_text() if doc.exists() else f"## GPU\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no '{BEGIN}' ... '{END}' section to write into")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + rest)


# ------------------------------------------------------------------------------------------------ part d's worker

def family_of(encoder_name: str) -> str:
    """The family file (`mimtrain.encoders.<family>`) that registers `encoder_name` with timm."""
    import timm

    import mimtrain.encoders  # noqa: F401  (registers the encoders)

    return timm.models.model_entrypoint(encoder_name).__module__


def families_covered() -> tuple[set[str], set[str]]:
    """(family modules with a recipe in FAMILY_STEPS, every registered family module of mimtrain.encoders)."""
    import timm

    from mimtrain.config.pretrain import load_config

    covered = {family_of(load_config(REPO / r).encoder.name) for r in FAMILY_STEPS}
    registered = {timm.models.model_entrypoint(n).__module__ for n in timm.list_models()}
    return covered, {m for m in registered if m.startswith("mimtrain.encoders.")}


def family_steps(out_json: str, smoke: bool) -> list[dict]:
    """One bf16 training step (the bench's step: forward, backward, AdamW) of every FAMILY_STEPS recipe, here."""
    from mimtrain.bench.step import measure
    from mimtrain.config.pretrain import load_config

    rows = []
    for recipe, tiny in FAMILY_STEPS.items():
        cfg = load_config(REPO / recipe, tiny if smoke else [])
        row = {"recipe": recipe, "family": family_of(cfg.encoder.name).rsplit(".", 1)[-1], "method": cfg.method.name}
        try:
            got = measure({"kind": "ours", "recipe": str(REPO / recipe), "overrides": tiny if smoke else [],
                           "batch": 2 if smoke else 8, "steps": 1, "warmup": 0, "precision": "bf16", "data": ""})
            row.update(step_ms=got["step_ms"], peak_mem_mib=got["peak_mem_mib"])
        except Exception as e:  # noqa: BLE001 -- every family is tried; the error is the result
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(out_json).write_text(json.dumps(rows, indent=2))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan (each part's cap, the total) and stop")
    p.add_argument("--cpu-smoke", action="store_true", help="every part at toy size on the CPU (CI)")
    p.add_argument("--only", default="", help="comma-separated parts to run (default: all)")
    p.add_argument("--doc", type=Path, help="the page to write into (default docs/benchmarks.md; with --cpu-smoke "
                   "OUT/benchmarks.md, a copy of it)")
    p.add_argument("--out", type=Path, help="results folder (default runs/gpu_check/<date>)")
    p.add_argument("--family-steps", metavar="JSON", help=argparse.SUPPRESS)  # part d's worker
    p.add_argument("--smoke-sizes", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.family_steps:
        rows = family_steps(args.family_steps, args.smoke_sizes)
        return 1 if any(r.get("error") for r in rows) else 0
    out = (args.out or REPO / "runs" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    parts = plan(out, args.cpu_smoke)
    if args.only:
        unknown = set(args.only.split(",")) - {x.key for x in parts}
        if unknown:
            raise SystemExit(f"--only: no part {', '.join(sorted(unknown))} (parts: a-f)")
        parts = [x for x in parts if x.key in args.only.split(",")]
    if args.dry_run:
        print_plan(parts, "install: python3 -m venv .venv && pip install -c constraints.txt -e '.[test]' (not timed "
                          "here; skipped with --no-install or an existing .venv/.installed)")
        return 0
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: gpu_check measures a GPU (use --cpu-smoke to test the script on a CPU)")
    out.mkdir(parents=True, exist_ok=True)
    doc = args.doc or (out / "benchmarks.md" if args.cpu_smoke else REPO / "docs" / "benchmarks.md")
    if args.cpu_smoke and args.doc is None:
        doc.write_text((REPO / "docs" / "benchmarks.md").read_text())
    results = {}
    for part in parts:
        print(f"[gpu_check] {part.key}. {part.title} (cap {SMOKE_CAP_S if args.cpu_smoke else part.cap_s} s)",
              flush=True)
        results[part.key] = run_part(part, out, args.cpu_smoke)
        print(f"[gpu_check] {part.key}: {results[part.key]['status']} in {results[part.key]['seconds']:.0f} s; "
              f"{results[part.key]['summary']}", flush=True)
    write_doc(doc, parts, results, out, args.cpu_smoke)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"[gpu_check] wrote {doc} and {out}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
