"""`mimtrain make-shards`: an ImageFolder tree or a saved HF `datasets` dataset -> WebDataset tar shards.

Each sample is `<key>.jpg|png` (original bytes where the format allows) + `<key>.cls` (integer label, absent for
unlabelled data); the key is the sample's index in the source's stable order (sorted classes, sorted files; or the
dataset's rows). By default the samples are dealt into the shards in a seeded random order across all shards, so
that a class-sorted source (ImageNet) gives shards that each hold every class: a streaming reader's shuffle buffer
only mixes nearby samples. The source is streamed: only the list of file paths (or row numbers) is held, and
`workers` processes each write whole shards. Beside the shards: `classes.json` (labelled data only) and `index.json`
(samples per shard and per class, which the streaming pipeline reads to plan its epochs, and what was skipped).
"""
from __future__ import annotations

import io
import json
import random
import shutil
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from mimtrain.config.errors import ConfigError, DataError, MissingPathError, OutputPathError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
INDEX_NAME = "index.json"
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")
_KEEP_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}  # 8-bit modes every decoder reads as they are
_HIGH_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # 16-bit grey (PNG, TIFF): PIL's convert("RGB") clips these


def _encode(img: Image.Image) -> tuple[str, bytes]:
    buf = io.BytesIO()
    _rgb8(img).save(buf, format="PNG")
    return "png", buf.getvalue()


def _rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grey is scaled (x * 255 / 65535), not clipped at 255 as `convert` does."""
    if img.mode in _HIGH_DEPTH:
        grey = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode not in _KEEP_MODES and img.mode not in ("CMYK", "YCbCr", "LAB", "HSV"):
        raise ValueError(f"image mode {img.mode} has no defined 8-bit conversion")
    return img.convert("RGB")


def _payload(data: bytes) -> tuple[str, bytes]:
    """Keep JPEG and 8-bit PNG bytes as they are (no re-encoding loss); convert anything else to 8-bit PNG. Raises on
    data that is not an image (the header is read, so a text file named .jpg is caught)."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        return "jpg", data
    if img.format == "PNG" and img.mode in _KEEP_MODES:
        return "png", data
    return _encode(img)


# ---- sources: a list of light references (paths or row numbers) and a way to load one in any process
@dataclass
class Source:
    kind: str  # "folder" | "hf"
    path: str
    refs: list  # file paths, or row numbers of the dataset
    labels: list[int]  # -1 everywhere for unlabelled data
    classes: list[str] | None  # None: unlabelled
    split: str | None = None
    image_column: str = ""
    empty_classes: list[str] = field(default_factory=list)


def _imagefolder(src: Path) -> Source:
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{src}: an ImageFolder needs one sub-folder per class (none found)")
    refs, labels, empty = [], [], []
    for label, cls in enumerate(classes):
        files = sorted(str(p) for p in (src / cls).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            empty.append(cls)
        refs += files
        labels += [label] * len(files)
    return Source("folder", str(src), refs, labels, classes, empty_classes=empty)


def _open_hf(path: str, split: str | None):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in ds else sorted(ds)[0]
        if split not in ds:
            raise DataError(f"{path}: no split '{split}'; its splits are {sorted(ds)} (choose with --split)")
        ds = ds[split]
    elif split is not None:
        raise DataError(f"{path} holds a single Dataset, not a DatasetDict: drop --split {split}")
    return ds, split


def _hf_dataset(src: Path, split: str | None, image_column: str | None, label_column: str | None) -> Source:
    ds, split = _open_hf(str(src), split)
    cols = ds.column_names
    img_col = image_column or next((c for c in IMAGE_COLUMNS if c in cols), None)
    if img_col not in cols:
        raise DataError(f"{src}: no image column '{img_col or '/'.join(IMAGE_COLUMNS)}' (its columns: {cols}); "
                        "name it with --image-column")
    if label_column is not None and label_column not in cols:
        raise DataError(f"{src}: no label column '{label_column}' (its columns: {cols})")
    label_col = label_column or next((c for c in LABEL_COLUMNS if c in cols), None)
    if label_col is None:
        return Source("hf", str(src), list(range(len(ds))), [-1] * len(ds), None, split, img_col)
    labels = [int(v) for v in ds[label_col]]
    if labels and min(labels) < 0:
        raise DataError(f"{src}: column '{label_col}' holds negative labels; pick another with --label-column")
    names = getattr(ds.features.get(label_col), "names", None)
    classes = list(names) if names else [str(i) for i in range(max(labels, default=-1) + 1)]
    return Source("hf", str(src), list(range(len(ds))), labels, classes, split, img_col)


_OPEN: dict = {}  # per process: the opened HF dataset (memory-mapped Arrow), so workers open it once


def _load(source: Source, ref) -> tuple[str, bytes]:
    if source.kind == "folder":
        return _payload(Path(ref).read_bytes())
    import datasets

    key = (source.path, source.split)
    if key not in _OPEN:
        ds, _ = _open_hf(source.path, source.split)
        if isinstance(ds.features[source.image_column], datasets.Image):  # raw bytes: no decode/re-encode
            ds = ds.cast_column(source.image_column, datasets.Image(decode=False))
        _OPEN[key] = ds
    img = _OPEN[key][ref][source.image_column]
    if isinstance(img, dict) and img.get("bytes"):
        return _payload(img["bytes"])
    if isinstance(img, dict) and img.get("path"):
        return _payload(Path(img["path"]).read_bytes())
    if isinstance(img, Image.Image):
        return _encode(img)
    raise ValueError(f"row {ref}: column '{source.image_column}' holds {type(img).__name__}, not an image")


# ---- writing: one task = one whole shard
def _write_shard(source: Source, path: str, items: list[tuple[int, int]]) -> tuple[int, Counter, list[str]]:
    """Write the samples `items` = [(source index, label)] to `path`; -> (written, per-class counts, skipped)."""
    counts, skipped = Counter(), []
    with wds.TarWriter(path) as sink:
        for index, label in items:
            ref = source.refs[index]
            try:
                ext, data = _load(source, ref)
            except Exception as e:  # noqa: BLE001  (any unreadable file is skipped and reported, never fatal)
                skipped.append(f"{ref}: {type(e).__name__}: {e}")
                continue
            sample = {"__key__": f"{index:09d}", ext: data}
            if source.classes is not None:
                sample["cls"] = str(label).encode()
            sink.write(sample)
            counts[label] += 1
    return sum(counts.values()), counts, skipped


_SOURCE: Source | None = None


def _init_worker(source: Source) -> None:
    global _SOURCE
    _SOURCE = source


def _write_task(task: tuple[str, list]) -> tuple[int, Counter, list[str]]:
    return _write_shard(_SOURCE, *task)


def _prepare_out(out: Path, src: Path, overwrite: bool) -> None:
    """An empty folder: refuse a used one (mixing two datasets' shards) unless `overwrite`, which clears it."""
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out} is a file, not a folder")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise OutputPathError(f"{out} is not empty ({len(entries)} entries, e.g. {entries[0].name}): shards of two "
                         "datasets would mix; write to an empty folder, or pass --overwrite to clear it first")
    if entries:
        if src.resolve() == out.resolve() or out.resolve() in src.resolve().parents:
            raise OutputPathError(f"--overwrite would delete the source {src}, which lies inside {out}")
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def make_shards(src: str | Path, out_dir: str | Path, shard_size: int = 1000, split: str | None = None,
                prefix: str = "shard", verbose: bool = True, *, seed: int = 0, shuffle: bool = True,
                workers: int = 1, overwrite: bool = False, image_column: str | None = None,
                label_column: str | None = None) -> dict:
    """Write `out_dir/{prefix}-000000.tar, ...` and return the summary that is also saved as `index.json`."""
    src, out = Path(src), Path(out_dir)
    if not src.is_dir():
        raise MissingPathError(f"source not found (an ImageFolder tree or a `datasets.save_to_disk` folder): {src}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1 (got {shard_size})")
    is_hf = any((src / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))
    if not is_hf and (image_column or label_column or split):
        raise ConfigError(f"{src} is an ImageFolder tree: --split/--image-column/--label-column apply to HF datasets")
    source = _hf_dataset(src, split, image_column, label_column) if is_hf else _imagefolder(src)
    if not source.refs:
        raise DataError(f"{src}: no images found (extensions {sorted(IMAGE_EXTS)})")
    for cls in source.empty_classes:
        print(f"make-shards: warning: class folder '{cls}' holds no image; its label stays reserved", file=sys.stderr)
    _prepare_out(out, src, overwrite)

    order = list(range(len(source.refs)))
    if shuffle:
        random.Random(seed).shuffle(order)
    tasks = [(str(out / f"{prefix}-{j:06d}.tar"), [(i, source.labels[i]) for i in order[at:at + shard_size]])
             for j, at in enumerate(range(0, len(order), shard_size))]
    per_shard, per_class, skipped = {}, Counter(), []
    bar = tqdm(total=len(order), unit="img", desc="make-shards", disable=not verbose, dynamic_ncols=True)
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(source,)) if workers > 1 else _Inline(
            source) as pool:
        for (path, items), (n, counts, bad) in zip(tasks, pool.map(_write_task, tasks)):
            per_shard[Path(path).name] = n
            skipped.extend(bad)
            per_class.update(counts)
            bar.update(len(items))
    bar.close()
    total = sum(per_shard.values())
    if total == 0:
        raise DataError(f"{src}: none of its {len(order)} files could be read, e.g. {skipped[:3]}")
    summary = {"source": str(src), "total": total, "labelled": source.classes is not None,
               "num_classes": len(source.classes) if source.classes is not None else None,
               "shuffled": shuffle, "seed": seed if shuffle else None, "shards": per_shard,
               "per_class": {str(k): v for k, v in sorted(per_class.items())} if source.classes is not None else {},
               "empty_classes": source.empty_classes, "skipped": len(skipped), "skipped_files": skipped[:100]}
    if source.classes is not None:
        (out / "classes.json").write_text(json.dumps(source.classes, indent=1))
    (out / INDEX_NAME).write_text(json.dumps(summary, indent=1))
    if verbose:
        _report(summary, out, prefix)
    return summary


class _Inline:
    """`workers=1`: the pool's `map`, in this process."""

    def __init__(self, source: Source):
        _init_worker(source)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def map(fn, tasks):
        return map(fn, tasks)


def _report(summary: dict, out: Path, prefix: str) -> None:
    n, shards = summary["total"], summary["shards"]
    if summary["labelled"]:
        counts = summary["per_class"].values()
        what = f"{summary['num_classes']} classes; {min(counts)}-{max(counts)} per class"
    else:
        what = "unlabelled: no label column"
    order = f"shuffled across shards, seed {summary['seed']}" if summary["shuffled"] else "source order"
    print(f"wrote {n} samples in {len(shards)} shards to {out} ({what}; {order}; {min(shards.values())}-"
          f"{max(shards.values())} per shard); pattern: {out}/{prefix}-{{000000..{len(shards) - 1:06d}}}.tar")
    if summary["skipped"]:
        print(f"make-shards: skipped {summary['skipped']} unreadable file(s), e.g. {summary['skipped_files'][0]} "
              f"(all listed in {out / INDEX_NAME})", file=sys.stderr)
