"""Tiny data the tests generate: ImageFolder trees and shards of random-ish real PNG/JPEG images."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def write_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.full((size, size, 3), (40 + 50 * c) % 200, np.int16)
            img = np.clip(base + rng.integers(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"img_{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def make_test_shards(tmp: Path, classes: int = 3, per_class: int = 8, shard_size: int = 6, size: int = 32) -> Path:
    from mimtrain.data.shards import make_shards

    src = write_image_folder(tmp / "images", classes, per_class, size)
    make_shards(src, tmp / "shards", shard_size=shard_size, verbose=False)
    return tmp / "shards"


def append_corrupt_jpeg(shard: Path, key: str = "corrupt") -> None:
    """Add a sample whose .jpg is garbage (a truncated JPEG header) to an existing tar shard."""
    data = b"\xff\xd8\xff\xe0" + os.urandom(64)
    with tarfile.open(shard, "a") as tar:
        for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def run_cli(*args: str, timeout: int = 600, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([PY, "-m", "mimtrain", *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mimtrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


TINY_MAE = [
    "encoder.name=mim_vit_tiny_patch16", "encoder.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
    "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2", "data.img_size=32",
    "data.shuffle_buffer=20", "train.batch_size=4", "train.epochs=4", "optim.warmup_epochs=1",
    "train.log_every=2", "train.image_every=5", "train.progress=false",
]


TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def write_tiny_vit_checkpoint(ckpt: Path, *overrides: str) -> Path:
    """A training-checkpoint folder as the trainer writes one (model.safetensors with the method's `encoder.` keys +
    the resolved config.yaml) for a seeded tiny ViT at 32 px; `overrides`: more dotted config keys (data.mean=...)."""
    import json

    import torch
    import yaml
    from safetensors.torch import save_file

    from mimtrain.config.pretrain import load_config, to_dict
    from mimtrain.encoders import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("mim_vit_tiny_patch16", 32, num_classes=0, **TINY_VIT)
    ckpt.mkdir()
    save_file({f"encoder.{k}": v.contiguous() for k, v in enc.state_dict().items()}, str(ckpt / "model.safetensors"))
    cfg = load_config(None, ["encoder.name=mim_vit_tiny_patch16", f"encoder.kwargs={json.dumps(TINY_VIT)}",
                             "data.img_size=32", *overrides])
    (ckpt / "config.yaml").write_text(yaml.safe_dump({**to_dict(cfg), "derived": {"world_size": 1}}))
    return ckpt
