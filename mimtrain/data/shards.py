"""`mimtrain make-shards`: an ImageFolder tree or a saved HF `datasets` dataset -> WebDataset tar shards.

Each sample is `<key>.jpg|png` (original bytes where the format allows) + `<key>.cls` (integer label), written in a
stable order (sorted classes, sorted files). Beside the shards: `classes.json` and `index.json` (samples per shard,
which the streaming pipeline reads to size its epochs).
"""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

import webdataset as wds
from PIL import Image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
INDEX_NAME = "index.json"


def _encode(img: Image.Image) -> tuple[str, bytes]:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "png", buf.getvalue()


def _file_payload(path: Path) -> tuple[str, bytes]:
    """Keep JPEG/PNG bytes as they are (no re-encoding loss); convert anything else to PNG."""
    ext = path.suffix.lower()
    if ext in (".jpg", ".jpeg"):
        return "jpg", path.read_bytes()
    if ext == ".png":
        return "png", path.read_bytes()
    with Image.open(path) as img:
        return _encode(img)


def _imagefolder(src: Path) -> tuple[list[str], Iterator[tuple[str, bytes, int]]]:
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{src}: an ImageFolder needs one sub-folder per class (none found)")

    def samples():
        for label, cls in enumerate(classes):
            for path in sorted(p for p in (src / cls).rglob("*") if p.suffix.lower() in IMAGE_EXTS):
                yield (*_file_payload(path), label)
    return classes, samples()


def _hf_dataset(src: Path, split: str | None) -> tuple[list[str], Iterator[tuple[str, bytes, int]]]:
    import datasets

    ds = datasets.load_from_disk(str(src))
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else sorted(ds)[0])
        ds = ds[split]
    img_col = next((c for c in ("image", "img", "pixel_values") if c in ds.column_names), None)
    if img_col is None:
        raise ValueError(f"{src}: no image column (looked for image/img/pixel_values in {ds.column_names})")
    label_col = next((c for c in ("label", "labels", "fine_label") if c in ds.column_names), None)
    feature = ds.features.get(label_col) if label_col else None
    classes = list(getattr(feature, "names", None) or [])
    # Raw bytes where the dataset stores them (no decode/re-encode); PIL images otherwise.
    raw = ds.cast_column(img_col, datasets.Image(decode=False)) if isinstance(ds.features[img_col], datasets.Image) \
        else ds

    def samples():
        for row in raw:
            img = row[img_col]
            label = int(row[label_col]) if label_col else -1
            if isinstance(img, dict) and img.get("bytes"):
                data = img["bytes"]
                fmt = (Image.open(io.BytesIO(data)).format or "").lower()
                yield ("jpg", data, label) if fmt == "jpeg" else ("png", data, label) if fmt == "png" \
                    else (*_encode(Image.open(io.BytesIO(data))), label)
            elif isinstance(img, dict) and img.get("path"):
                yield (*_file_payload(Path(img["path"])), label)
            else:
                yield (*_encode(img), label)
    if not classes and label_col:
        classes = [str(i) for i in sorted(set(ds[label_col]))]
    return classes, samples()


def make_shards(src: str | Path, out_dir: str | Path, shard_size: int = 1000, split: str | None = None,
                prefix: str = "shard", verbose: bool = True) -> dict:
    """Write `out_dir/{prefix}-000000.tar, ...` and return the summary that is also saved as `index.json`."""
    src, out = Path(src), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"source not found (an ImageFolder tree or a `datasets.save_to_disk` folder): {src}")
    is_hf = (src / "dataset_info.json").exists() or (src / "dataset_dict.json").exists() or \
        (src / "state.json").exists()
    classes, samples = _hf_dataset(src, split) if is_hf else _imagefolder(src)
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    per_shard: dict[str, int] = {}
    n = 0
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for n, (ext, data, label) in enumerate(samples, start=1):
            sink.write({"__key__": f"{n - 1:09d}", ext: data, "cls": str(label).encode()})
            shard = f"{prefix}-{(n - 1) // shard_size:06d}.tar"
            per_shard[shard] = per_shard.get(shard, 0) + 1
            counts[label] += 1
    if n == 0:
        raise ValueError(f"{src}: no images found")
    (out / "classes.json").write_text(json.dumps(classes, indent=1))
    summary = {"source": str(src), "total": n, "num_classes": len(classes), "shards": per_shard,
               "per_class": {str(k): v for k, v in sorted(counts.items())}}
    (out / INDEX_NAME).write_text(json.dumps(summary, indent=1))
    if verbose:
        print(f"wrote {n} samples in {len(per_shard)} shards to {out} ({len(classes)} classes; "
              f"{min(counts.values())}-{max(counts.values())} per class); pattern: "
              f"{out}/{prefix}-{{000000..{len(per_shard) - 1:06d}}}.tar")
    return summary
