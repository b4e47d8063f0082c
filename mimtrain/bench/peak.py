"""The bf16 matmul peak of a CUDA device, measured: the denominator of `mimtrain bench`'s MFU."""
from __future__ import annotations

import torch


def measure_bf16_peak(n: int = 8192, iters: int = 20) -> float:
    """Achievable bf16 matmul FLOP/s of this CUDA device: `iters` [n, n] @ [n, n] matmuls (2 n^3 FLOPs each) timed
    with CUDA events after 5 untimed ones."""
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
