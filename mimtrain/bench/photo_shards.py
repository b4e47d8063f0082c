"""Photo-like JPEG shards for `mimtrain bench --decode` where no real dataset is at hand.

    python -m mimtrain.bench.photo_shards OUT [--count 300] [--size 500x375] [--quality 90] [--noise 8] [--seed 0]

Each image is a random crop (10-100% of the width) of one of scikit-learn's two sample photographs (640x427, shipped
with the package), resized to the requested size (bicubic), flipped half the time, with its brightness scaled by
0.8-1.2 and Gaussian noise of `--noise` levels added (sensor-like detail: it brings the file size and so the entropy
decoding cost near that of camera JPEGs; ImageNet's train JPEGs average about 110 KB at about 400x350).
Writes OUT/images/photos/*.jpg and OUT/shards (make-shards' format) and prints the mean file size.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from mimtrain.data.shards import make_shards


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def write_photos(folder: Path, count: int, size: tuple[int, int], quality: int, noise: float, seed: int) -> float:
    """Write `count` JPEGs to `folder`; return their mean size in KB."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    folder.mkdir(parents=True, exist_ok=True)
    out_w, out_h = size
    total = 0
    for k in range(count):
        photo = photos[k % len(photos)]
        W, H = photo.size
        w = min(W, int(W * rng.uniform(0.1, 1.0)))
        h = min(H, max(1, round(w * out_h / out_w)))
        w = min(w, round(h * out_w / out_h))
        x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        img = photo.resize(size, Image.BICUBIC, box=(x, y, x + w, y + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = np.asarray(img, dtype=np.float32) * rng.uniform(0.8, 1.2)
        pixels += rng.normal(0.0, noise, pixels.shape)
        path = folder / f"photo_{k:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)
        total += path.stat().st_size
    return total / max(count, 1) / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--size", type=_size, default=(500, 375), help="WxH of every image")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--noise", type=float, default=8.0, help="std of the added Gaussian noise, in 0-255 levels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args(argv)
    kb = write_photos(args.out / "images" / "photos", args.count, args.size, args.quality, args.noise, args.seed)
    summary = make_shards(args.out / "images", args.out / "shards", shard_size=args.shard_size, verbose=False,
                          overwrite=True)  # the images were just rewritten: replace the old shards
    print(f"wrote {summary['total']} JPEGs of {args.size[0]}x{args.size[1]} (mean {kb:.1f} KB) to {args.out}/shards")
    return summary


if __name__ == "__main__":
    main()
