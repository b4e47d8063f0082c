"""ADE20K scene parsing in the real layout (`ADEChallengeData2016/images/{training,validation}/*.jpg` with
`annotations/{training,validation}/*.png`) for UperNet: pairing and checking the files, the training augmentation, the
evaluation inputs, and mIoU / pixel accuracy.

Labels: PNG value 0 is "other" and ignored; 1..150 are the classes, trained as 0..149; ignored pixels become 255.
Training (MMSegmentation's ADE20K pipeline): resize so the image fits (2048, 512) x r, r ~ U(0.5, 2.0), keeping the
aspect ratio; a random 512 x 512 crop, re-drawn up to 10 times while one class covers more than 75% of it; a
horizontal flip with probability 0.5; colour jitter; normalise; pad to 512 (image 0, label 255). Evaluation resizes
to fit (2048, 512) and scores the prediction at the label's original size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import ColorJitter
from torchvision.transforms.functional import normalize, pil_to_tensor

from mimtrain.config.errors import DataError, MissingPathError
from mimtrain.config.dense import Ade20kDataConfig

IGNORE = 255
SPLITS = {"train": "training", "val": "validation"}


def find_root(root: str | Path) -> Path:
    """`root` may be ADEChallengeData2016/ itself or the folder holding it."""
    p = Path(root)
    if (p / "ADEChallengeData2016").is_dir():
        p = p / "ADEChallengeData2016"
    if not (p / "images").is_dir() or not (p / "annotations").is_dir():
        raise MissingPathError(f"ADE20K not found at {root}: expected ADEChallengeData2016/images/{{training,"
                               "validation}/*.jpg and ADEChallengeData2016/annotations/{training,validation}/*.png")
    return p


def list_pairs(root: Path, split: str, max_images: int = 0) -> list[tuple[Path, Path]]:
    """(image, label PNG) pairs of `split` ("training" | "validation"), sorted by name; every image needs its label."""
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise MissingPathError(f"ADE20K folder not found: {d}")
    images = sorted(img_dir.glob("*.jpg"))
    if not images:
        raise MissingPathError(f"no .jpg images in {img_dir}")
    if max_images:
        images = images[:max_images]
    pairs = [(im, ann_dir / f"{im.stem}.png") for im in images]
    missing = [str(lab) for _, lab in pairs if not lab.is_file()]
    if missing:
        raise MissingPathError(f"{len(missing)} image(s) in {img_dir} have no label PNG, e.g. {missing[0]} is "
                               "missing")
    return pairs


class _LabelRange(Dataset):
    """Item i -> (path, PIL mode, (min, max) value) of a label PNG, read in DataLoader workers."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, str, tuple]:
        with Image.open(self.paths[i]) as im:
            return str(self.paths[i]), im.mode, im.getextrema()


def _label_problem(mode: str, extrema: tuple, num_classes: int) -> str:
    if mode not in ("L", "P"):
        return f"is a {mode} image; ADE20K labels are 8-bit single-channel PNGs (mode L or P)"
    if extrema[1] > num_classes:
        return f"holds class id {extrema[1]}, out of range: ids must lie in 0..{num_classes} (0 = ignore)"
    return ""


def check_labels(pairs: list[tuple[Path, Path]], num_classes: int, num_workers: int) -> None:
    """Read every label PNG once (in `num_workers` processes) and refuse the first that is not an 8-bit map of ids in
    0..num_classes, naming the file. About a minute for ADE20K's 22k labels on 8 workers' worth of cores."""
    loader = DataLoader(_LabelRange([lab for _, lab in pairs]), batch_size=None, num_workers=num_workers)
    for path, mode, extrema in loader:
        problem = _label_problem(mode, extrema, num_classes)
        if problem:
            raise DataError(f"label {path} {problem}")


def read_label(path: Path, num_classes: int) -> np.ndarray:
    """Label PNG -> [H, W] uint8 training ids: 0 -> 255 (ignore), k -> k - 1. Refuses a file check_labels would."""
    with Image.open(path) as im:
        problem = _label_problem(im.mode, im.getextrema(), num_classes)
        if problem:
            raise DataError(f"label {path} {problem}")
        raw = np.asarray(im, dtype=np.uint8)
    return np.where(raw == 0, IGNORE, raw - 1).astype(np.uint8)


def fit_scale(size: tuple[int, int], bound: tuple[float, float]) -> tuple[int, int]:
    """(w, h) resized, keeping the aspect ratio, to fit a (long, short) bound as MMCV's `imrescale` does."""
    w, h = size
    s = min(bound[0] / max(w, h), bound[1] / min(w, h))
    return int(w * s + 0.5), int(h * s + 0.5)


def _to_input(img: Image.Image, cfg: Ade20kDataConfig) -> Tensor:
    """PIL RGB -> normalised [3, H, W] float."""
    return normalize(pil_to_tensor(img).float() / 255.0, list(cfg.mean), list(cfg.std))


class Ade20kTrain(Dataset):
    """Training pairs -> (image [3, crop, crop] normalised, label [crop, crop] int64 with 255 = ignore)."""

    def __init__(self, pairs: list[tuple[Path, Path]], cfg: Ade20kDataConfig):
        self.pairs, self.cfg = pairs, cfg
        # MMSegmentation's PhotoMetricDistortion (brightness +-32, contrast and saturation x0.5-1.5, hue +-18 of
        # OpenCV's 180, each with probability 0.5) as torchvision's ColorJitter (all four, random order).
        self.jitter = ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=0.1) if cfg.photometric \
            else None

    def __len__(self) -> int:
        return len(self.pairs)

    def _crop_box(self, label: np.ndarray) -> tuple[int, int, int, int]:
        """A random crop (top, left, height, width); re-drawn while one class exceeds cat_max_ratio of its pixels."""
        c = self.cfg.crop_size
        h, w = label.shape
        for _ in range(10):
            top = int(torch.randint(0, max(h - c, 0) + 1, ()))
            left = int(torch.randint(0, max(w - c, 0) + 1, ()))
            ids, counts = np.unique(label[top:top + c, left:left + c], return_counts=True)
            counts = counts[ids != IGNORE]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cfg.cat_max_ratio:
                break
        return top, left, min(c, h), min(c, w)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        img_path, lab_path = self.pairs[i]
        with Image.open(img_path) as im:
            img = im.convert("RGB")
        label = Image.fromarray(read_label(lab_path, cfg.num_classes))
        r = float(torch.empty(()).uniform_(*cfg.ratio_range))
        size = fit_scale(img.size, (cfg.scale[0] * r, cfg.scale[1] * r))
        img, label = img.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
        top, left, h, w = self._crop_box(np.asarray(label))
        img, label = img.crop((left, top, left + w, top + h)), label.crop((left, top, left + w, top + h))
        if cfg.hflip and torch.rand(()) < 0.5:
            img, label = img.transpose(Image.FLIP_LEFT_RIGHT), label.transpose(Image.FLIP_LEFT_RIGHT)
        if self.jitter is not None:
            img = self.jitter(img)
        x = _to_input(img, cfg)
        y = torch.from_numpy(np.array(label, dtype=np.int64))
        pad = (0, cfg.crop_size - w, 0, cfg.crop_size - h)
        return torch.nn.functional.pad(x, pad), torch.nn.functional.pad(y, pad, value=IGNORE)


class Ade20kVal(Dataset):
    """Validation pairs -> (image [3, h, w] normalised at the test scale, label [H, W] int64 at the original size,
    file name)."""

    def __init__(self, pairs: list[tuple[Path, Path]], cfg: Ade20kDataConfig):
        self.pairs, self.cfg = pairs, cfg

    def __len__(self) -> int:
        return len(self.pairs)

    def label(self, i: int) -> Tensor:
        return torch.from_numpy(read_label(self.pairs[i][1], self.cfg.num_classes).astype(np.int64))

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, str]:
        with Image.open(self.pairs[i][0]) as im:
            img = im.convert("RGB")
        img = img.resize(fit_scale(img.size, self.cfg.scale), Image.BILINEAR)
        return _to_input(img, self.cfg), self.label(i), self.pairs[i][0].name


class IoUMeter:
    """Per-class intersection, union and label areas (pixels) summed over a dataset, MMSegmentation's definitions."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.areas = torch.zeros(3, num_classes, dtype=torch.int64, device=device)  # intersect, union, label

    def update(self, pred: Tensor, label: Tensor) -> None:
        """pred, label: [H, W] class ids (label 255 = ignore, not counted for either)."""
        valid = label != IGNORE
        p, t = pred[valid], label[valid]
        k = self.num_classes
        inter = torch.bincount(t[p == t], minlength=k)
        union = torch.bincount(p, minlength=k) + torch.bincount(t, minlength=k) - inter
        self.areas += torch.stack([inter, union, torch.bincount(t, minlength=k)])

    def results(self) -> dict:
        """mIoU and mAcc average the classes present (union / label area > 0); aAcc is the pixel accuracy."""
        inter, union, label = self.areas.double().cpu()
        iou = inter / union  # nan where a class is absent from predictions and labels
        acc = inter / label
        return {"mIoU": float(iou.nanmean()), "mAcc": float(acc.nanmean()),
                "aAcc": float(inter.sum() / label.sum().clamp(min=1)),
                "per_class_iou": [None if v != v else float(v) for v in iou.tolist()]}
