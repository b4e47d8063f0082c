"""The embedded default data set: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes), written as
a 32x32 RGB ImageFolder so the whole pipeline (shards, streaming, masking, MAE, probe) runs offline in minutes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out_dir: str | Path, size: int = 32) -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out_dir)
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        folder = out / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((img / 16.0 * 255).astype(np.uint8), mode="L")
        gray.resize((size, size), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
    return len(digits.images)
