"""`mimtrain bench --decode SHARDS`: images/sec on one core of JPEG decode, decode + crop and the whole pretraining
transform, the old way (PIL decode, torchvision on the PIL image) against ours (`PretrainTransform` from the encoded
bytes, JPEG draft decoding)."""
from __future__ import annotations

import io
import statistics
import tarfile
import time

import torch

from mimtrain.config.errors import DataError

DECODE_MIN_SECONDS = 1.0  # each case of each round reads every image at least once and runs at least this long
DECODE_CASES = ("decode", "decode+RandomResizedCrop, old", "decode+RandomResizedCrop, ours", "full transform, old",
                "full transform, ours")


def run_decode(shards: str, data_cfg, n_images: int, repeat: int) -> dict:
    """One row: the median images/sec of each case in `DECODE_CASES` over max(3, repeat) rounds, in this process
    with one torch thread. data_cfg: `DataConfig` (img_size, crop_scale, hflip, mean, std). Every case runs each
    image under the same per-image seed (`seeded`, as ShardStream does), so old and ours crop the same boxes. The
    cases take turns within a round; the ratio is the median of the rounds' ratios."""
    from PIL import Image
    from torchvision import transforms as T

    from mimtrain.data.shards import IMAGE_EXTS
    from mimtrain.data.stream import expand_shards
    from mimtrain.data.transforms import open_image, pretrain_transform, reference_pretrain_transform, seeded

    d = data_cfg
    blobs = read_images(expand_shards(shards), tuple(IMAGE_EXTS), n_images)
    if not blobs:
        raise DataError(f"no images found in {shards}")
    torch.set_num_threads(1)
    old_rrc = T.RandomResizedCrop(d.img_size, scale=tuple(d.crop_scale), interpolation=T.InterpolationMode.BICUBIC)
    old_full = reference_pretrain_transform(d.img_size, d.crop_scale, d.hflip, d.mean, d.std)
    ours = pretrain_transform(d.img_size, d.crop_scale, d.hflip, d.mean, d.std)

    def decode(blob: bytes):
        with Image.open(io.BytesIO(blob)) as img:
            return img.convert("RGB")  # forces the full decode

    cases = dict(zip(DECODE_CASES, (decode, lambda b: old_rrc(decode(b)), ours.crop, lambda b: old_full(decode(b)),
                                    ours)))
    rounds: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(max(3, repeat)):
        for label, fn in cases.items():
            seeded(fn, blobs[0], 0)
            t0, n = time.perf_counter(), 0
            while n < len(blobs) or time.perf_counter() - t0 < DECODE_MIN_SECONDS:
                seeded(fn, blobs[n % len(blobs)], n % len(blobs))
                n += 1
            rounds[label].append(n / (time.perf_counter() - t0))
    rates = {k: statistics.median(v) for k, v in rounds.items()}
    # Within a round both ran under the same host load: the median of the rounds' ratios.
    ratio = statistics.median(o / p for o, p in zip(rounds[DECODE_CASES[2]], rounds["decode"]))

    def reduction(blob: bytes) -> int:  # under the image's seed, the box ours draws decides its DCT reduction
        img = open_image(blob)
        return ours.reduction(img, ours.draw_box(img))

    reduced = sum(seeded(reduction, b, i) > 1 for i, b in enumerate(blobs)) / len(blobs)
    first = open_image(blobs[0])
    w, h = first.size
    return {"name": shards, "images": len(blobs), "format": first.format, "source_px": f"{w}x{h}",
            "img_size": d.img_size, "mean_bytes": sum(map(len, blobs)) / len(blobs), "reduced_scale_frac": reduced,
            "ours_crop_over_decode": ratio, **{f"{k} img/s/core": v for k, v in rates.items()}, "rounds": rounds}


def read_images(urls: list[str], exts: tuple[str, ...], limit: int) -> list[bytes]:
    """Encoded image bytes from local tar shards, read into memory first so that disk I/O is not timed."""
    out: list[bytes] = []
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar:
                if m.isfile() and m.name.lower().endswith(exts):
                    out.append(tar.extractfile(m).read())
                    if len(out) >= limit:
                        return out
    return out
