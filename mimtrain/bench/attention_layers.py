"""One attention layer of each kind, fwd+bwd time and peak memory at a given token grid (CPU or CUDA).

    python -m mimtrain.bench.attention_layers [--grids 56 112] [--dim 96] [--heads 3] [--batch 1] [--steps 5]

Layers, all at the same dim/heads, input [B, H*W, C]:
- DG-attention: `mimtrain.encoders.dgt.DGAttention` (G groups, top-k keys per group; DGT's defaults G=48, k=98).
- window: timm's Swin `WindowAttention` (7x7 windows), with the window partition/reverse it needs.
- global: timm's `Attention` (SDPA over all tokens).
Each (layer, grid) runs in a fresh process (`--one`), so peak memory (CUDA max_memory_allocated, or peak RSS above
the process's baseline on CPU) belongs to that layer alone. FLOPs: one fwd+bwd, 2 per multiply-add
(`mimtrain.bench.flops.count_macs`); DG-attention's gathers/sorts are not counted.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention, window_partition, window_reverse
from torch import Tensor, nn

KINDS = ("dg", "window", "global")
TAG = "ATTN_RESULT "


class WindowLayer(nn.Module):
    """[B, H*W, C] -> [B, H*W, C] through non-overlapping windows (no shift; the grid must be a window multiple)."""

    def __init__(self, dim: int, heads: int, grid: int, window: int = 7):
        super().__init__()
        if grid % window:
            raise ValueError(f"grid {grid} is not a multiple of the window {window}")
        self.grid, self.window = grid, window
        self.attn = WindowAttention(dim, heads, window_size=window)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        w = (self.window, self.window)
        win = window_partition(x.view(B, self.grid, self.grid, C), w).view(-1, self.window ** 2, C)
        out = self.attn(win).view(-1, self.window, self.window, C)
        return window_reverse(out, w, self.grid, self.grid).reshape(B, N, C)


def build(kind: str, dim: int, heads: int, grid: int, groups: int, topk: int) -> nn.Module:
    if kind == "dg":
        from mimtrain.encoders.dgt import DGAttention
        return DGAttention(dim, heads, num_groups=groups, topk=topk)
    if kind == "window":
        return WindowLayer(dim, heads, grid)
    return Attention(dim, heads, qkv_bias=True)


def measure_one(kind: str, grid: int, dim: int, heads: int, batch: int, steps: int, groups: int, topk: int) -> dict:
    from mimtrain.bench.flops import count_macs

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layer = build(kind, dim, heads, grid, groups, topk).to(dev).train()
    x = torch.randn(batch, grid * grid, dim, device=dev, requires_grad=True)

    def step() -> None:
        layer(x).sum().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)

    flops = 2 * count_macs(step)
    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"kind": kind, "grid": grid, "tokens": grid * grid, "dim": dim, "heads": heads, "batch": batch,
            "fwd_bwd_ms": 1e3 * (time.perf_counter() - t0) / steps, "peak_mem_mib": peak,
            "gflop": flops / 1e9, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", type=int, nargs="+", default=[56, 112], help="token grid sides")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--groups", type=int, default=48, help="DG-attention groups G")
    p.add_argument("--topk", type=int, default=98, help="DG-attention keys per group k")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: 'kind,grid' measured in this process
    a = p.parse_args(argv)
    if a.one:
        kind, grid = a.one.split(",")
        row = measure_one(kind, int(grid), a.dim, a.heads, a.batch, a.steps, a.groups, a.topk)
        print(TAG + json.dumps(row), flush=True)
        return [row]
    rows = []
    for grid in a.grids:
        for kind in a.kinds:
            cmd = [sys.executable, "-m", "mimtrain.bench.attention_layers", "--one", f"{kind},{grid}",
                   "--dim", str(a.dim), "--heads", str(a.heads), "--batch", str(a.batch), "--steps", str(a.steps),
                   "--groups", str(a.groups), "--topk", str(a.topk)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
            if found:
                rows.append(json.loads(found[-1][len(TAG):]))
            else:
                sys.stderr.write(proc.stderr[-3000:])
                rows.append({"kind": kind, "grid": grid, "tokens": grid * grid, "error": f"exit {proc.returncode}"})
    from mimtrain.bench.report import cpu_model, now

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu_model()}"
    cmd = " ".join(["python -m mimtrain.bench.attention_layers", *(argv if argv is not None else sys.argv[1:])])
    print(f"- command: `{cmd}`\n- device: {dev}, torch {torch.__version__}, "
          f"{rows[0].get('threads', '-')} threads; dim {a.dim}, heads {a.heads}, batch {a.batch}, "
          f"DG G={a.groups} k={a.topk}, window 7; date: {now()}\n")
    print("| layer | tokens | fwd+bwd ms | peak mem MiB | GFLOP fwd+bwd |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['kind']} | {r['grid']}x{r['grid']} | - | - | {r['error']} |")
        else:
            print(f"| {r['kind']} | {r['grid']}x{r['grid']} | {r['fwd_bwd_ms']:.1f} | {r['peak_mem_mib']:.0f} | "
                  f"{r['gflop']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
