"""Run logs on the main process: scalars and reconstruction grids through one of accelerate's trackers
(`train.log_with`: tensorboard, the default, or wandb / mlflow where installed), the resolved config logged as the
run's hyper-parameters, and `metrics.jsonl` beside them whatever the tracker.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torchvision.utils import make_grid

from mimtrain.config.pretrain import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
PROJECT = "mimtrain"  # wandb project / mlflow experiment


def check_tracker(name: str) -> None:
    """Refuse, before any step, a tracker that is unknown or whose package is missing."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    if name not in TRACKERS:
        raise ConfigError(f"train.log_with must be one of {list(TRACKERS)}, got {name!r}")
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    if not available[name]():
        raise ConfigError(f"train.log_with={name}: the `{name}` package is not installed (pip install {name}); "
                          "train.log_with=tensorboard needs nothing more")


def flat_hparams(cfg: dict, prefix: str = "") -> dict:
    """Nested config -> {"train.batch_size": 64, "data.mean": "[0.485, 0.456, 0.406]"}: trackers take flat scalars."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _start_tracker(name: str, output_dir: Path):
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":  # output_dir/tensorboard, as `tensorboard --logdir` is told
        tracker = TensorBoardTracker("tensorboard", output_dir)
    elif name == "wandb":
        tracker = WandBTracker(PROJECT, name=output_dir.name, dir=str(output_dir))
    else:
        tracker = MLflowTracker(PROJECT, logging_dir=str(output_dir / "mlruns"), run_name=output_dir.name)
    if hasattr(tracker, "start"):  # accelerate >= 1.4 starts trackers lazily
        tracker.start()
    return tracker


def keep_rows(output_dir: str | Path, rows: int) -> None:
    """Cut metrics.jsonl back to its first `rows` rows: those a checkpoint saw written (a resumed run logs the steps
    after it again, so it must not find them there twice)."""
    path = Path(output_dir) / "metrics.jsonl"
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        if len(lines) > rows:
            path.write_text("".join(lines[:rows]))


class RunLogger:
    def __init__(self, output_dir: str | Path, enabled: bool = True, log_with: str = "tensorboard",
                 hparams: dict | None = None):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.log_with = log_with
        self.tracker = None
        self.rows = 0  # metrics.jsonl rows (a checkpoint records it: a resumed run continues after that row)
        check_tracker(log_with)  # on every process, so that all of them stop on a bad value
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.tracker = _start_tracker(log_with, self.dir)
            if hparams is not None:
                self.tracker.store_init_configuration(flat_hparams(hparams))
            path = self.dir / "metrics.jsonl"
            self.rows = len(path.read_text().splitlines()) if path.exists() else 0
            self.jsonl = open(path, "a")

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.tracker.log({k if "/" in k else f"train/{k}": v for k, v in values.items() if k not in ("step", "epoch")},
                         step=step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        self.rows += 1

    def reconstruction(self, step: int, views: dict[str, torch.Tensor], mean, std, max_images: int = 8) -> None:
        """One grid row per image: original | masked input | reconstruction (un-normalized to pixels)."""
        if not self.enabled:
            return
        from mimtrain.data.transforms import denormalize

        cols = [denormalize(views[k][:max_images].float().cpu(), mean, std)
                for k in ("original", "masked", "reconstruction")]
        rows = torch.stack(cols, dim=1).flatten(0, 1)  # [n*3, 3, H, W], row-major: image by image
        self._image("reconstruction", make_grid(rows, nrow=3, padding=2, pad_value=1.0), step)
        # extra maps of one image (e.g. GLNet slot assignments): [N, 1, h, w] in [0, 1]
        for name, maps in views.items():
            if name not in ("original", "masked", "reconstruction"):
                self._image(name, make_grid(maps.float().cpu(), nrow=8, padding=1, pad_value=1.0), step)

    def _image(self, name: str, grid: torch.Tensor, step: int) -> None:
        """grid: [3, H, W] in [0, 1]. MLflow's tracker logs no images through accelerate: only scalars reach it."""
        if self.log_with == "tensorboard":
            self.tracker.writer.add_image(name, grid, step)
            self.tracker.writer.flush()
        elif self.log_with == "wandb":
            self.tracker.log_images({name: [grid.permute(1, 2, 0).numpy()]}, step=step)

    def close(self) -> None:
        if self.enabled:
            self.tracker.finish()
            self.jsonl.close()
