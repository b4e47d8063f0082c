"""Run logs: TensorBoard scalars and reconstruction grids, `metrics.jsonl`, on the main process only."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torchvision.utils import make_grid


class RunLogger:
    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.dir / "tensorboard"))
            self.jsonl = open(self.dir / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if k not in ("step", "epoch"):
                self.writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def reconstruction(self, step: int, views: dict[str, torch.Tensor], mean, std, max_images: int = 8) -> None:
        """One grid row per image: original | masked input | reconstruction (un-normalized to pixels)."""
        if not self.enabled:
            return
        from ..data.transforms import denormalize

        cols = [denormalize(views[k][:max_images].float().cpu(), mean, std)
                for k in ("original", "masked", "reconstruction")]
        rows = torch.stack(cols, dim=1).flatten(0, 1)  # [n*3, 3, H, W], row-major: image by image
        self.writer.add_image("reconstruction", make_grid(rows, nrow=3, padding=2, pad_value=1.0), step)
        for name, maps in views.items():  # extra maps of one image (e.g. GLNet slot assignments): [N, 1, h, w] in [0, 1]
            if name not in ("original", "masked", "reconstruction"):
                self.writer.add_image(name, make_grid(maps.float().cpu(), nrow=8, padding=1, pad_value=1.0), step)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
