"""COCO instance annotations in the real layout (`annotations/instances_{split}.json` + `{split}/` images) for Mask
R-CNN: reading and checking them, training targets, detections in COCO's result format, and box / mask AP computed
by pycocotools' COCOeval."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from mimtrain.config.errors import ConfigError, DataError, MissingPathError

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[:6], fractions in [0, 1]


def _quietly(fn, *args):
    """pycocotools prints progress on stdout; keep it out of the run's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _short(items: list, n: int = 3) -> str:
    return ", ".join(str(x) for x in items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def check_annotations(coco: COCO, ann_file: Path, img_dir: Path) -> None:
    """Refuse an annotation file that does not fit its images, before any training step: every listed image must exist,
    every annotation must point at a listed image and category and carry a 4-number box and (unless crowd) a
    segmentation. Errors name the annotation file and the first offending entries."""
    on_disk = set(os.listdir(img_dir))
    missing = [str(img_dir / im["file_name"]) for im in coco.dataset.get("images", [])
               if im["file_name"] not in on_disk and not (img_dir / im["file_name"]).is_file()]
    if missing:
        raise MissingPathError(f"{ann_file} lists {len(missing)} image(s) that do not exist: {_short(missing)}")
    bad_img = [a["id"] for a in coco.dataset.get("annotations", []) if a["image_id"] not in coco.imgs]
    bad_cat = [a["id"] for a in coco.dataset.get("annotations", []) if a["category_id"] not in coco.cats]
    bad_box = [a["id"] for a in coco.dataset.get("annotations", []) if len(a.get("bbox", ())) != 4]
    no_seg = [a["id"] for a in coco.dataset.get("annotations", []) if not a.get("iscrowd", 0) and
              not a.get("segmentation")]
    for ids, what in ((bad_img, "point at an image id not in 'images'"),
                      (bad_cat, "point at a category id not in 'categories'"),
                      (bad_box, "have no [x, y, w, h] bbox"), (no_seg, "have no segmentation (Mask R-CNN needs one)")):
        if ids:
            raise DataError(f"{ann_file}: annotation(s) {_short(ids)} {what}")


class CocoInstances(Dataset):
    """One COCO split. Item i -> (image [3, H, W] float in [0, 1], target): target holds boxes [N, 4] (x1, y1, x2, y2
    in pixels), labels [N] (1..K; 0 is torchvision's background), masks [N, H, W] uint8 and image_id.

    Categories are numbered 1..K in the order of their (sparse) COCO ids; `cat_ids[label - 1]` maps back.

    Args:
        root: the folder holding annotations/ and the split's image folder.
        split: "train2017", "val2017", ...
        train: keep only images with at least one usable (non-crowd, >= 1 px) box, and flip at random.
        hflip: horizontal flip with probability 0.5 (training only).
        max_images: keep only the first N images (by id); 0 = all.
        crop: the large-scale resize + crop of the Swin / HiViT 3x schedules (training only), or None: see
            `ResizeCrop`. The detector's own multi-scale resize still follows.
    """

    def __init__(self, root: str | Path, split: str, train: bool, hflip: bool = True, max_images: int = 0,
                 crop: ResizeCrop | None = None):
        root = Path(root)
        self.ann_file = root / "annotations" / f"instances_{split}.json"
        self.img_dir = root / split
        if not self.ann_file.is_file():
            raise MissingPathError(f"COCO annotation file not found: {self.ann_file} "
                                   f"(expected ROOT/annotations/instances_{split}.json)")
        if not self.img_dir.is_dir():
            raise MissingPathError(f"COCO image folder not found: {self.img_dir} (expected ROOT/{split}/)")
        self.coco = _quietly(COCO, str(self.ann_file))
        check_annotations(self.coco, self.ann_file, self.img_dir)
        self.cat_ids = sorted(self.coco.cats)
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.train, self.hflip = train, hflip and train
        self.crop = crop if train else None
        ids = sorted(self.coco.imgs)
        if train:  # as MMDetection's filter_empty_gt: an image with nothing to learn only costs time
            ids = [i for i in ids if self._annotations(i)]
        self.ids = ids[:max_images] if max_images else ids
        if not self.ids:
            raise DataError(f"{self.ann_file}: no images" + (" with a usable (non-crowd) annotation" if train else ""))

    def __len__(self) -> int:
        return len(self.ids)

    def _annotations(self, img_id: int) -> list[dict]:
        """Non-crowd annotations with a box of at least 1 px a side (crowd regions are not trained on)."""
        return [a for a in self.coco.imgToAnns[img_id]
                if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]

    def _image(self, info: dict) -> Tensor:
        path = self.img_dir / info["file_name"]
        with Image.open(path) as im:
            img = im.convert("RGB")
        if img.size != (info["width"], info["height"]):
            raise DataError(f"{path} is {img.size[0]}x{img.size[1]} but {self.ann_file} says "
                            f"{info['width']}x{info['height']}")
        return pil_to_tensor(img).float() / 255.0

    def __getitem__(self, i: int) -> tuple[Tensor, dict]:
        img_id = self.ids[i]
        info = self.coco.imgs[img_id]
        img = self._image(info)
        H, W = img.shape[-2:]
        anns = self._annotations(img_id)
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # boxes outside the image vanish
        anns = [a for a, k in zip(anns, keep.tolist()) if k]
        boxes = boxes[keep]
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns else \
            torch.zeros((0, H, W), dtype=torch.uint8)
        if self.hflip and torch.rand(()) < 0.5:
            img, masks = img.flip(-1), masks.flip(-1)
            boxes = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {"boxes": boxes, "labels": labels, "masks": masks, "image_id": img_id}
        if self.crop is not None:
            img, target = self.crop(img, target)
        return img, target


class ResizeCrop:
    """The resize + random crop branch of the Swin / HiViT / DETR 3x augmentation, drawn with probability `prob`:
    resize so the shorter side is one of `scales` (the longer side capped at `max_size`), then cut a random
    h x w window with h, w drawn uniformly from `crop_range` (clipped to the image). Boxes are shifted and clipped to
    the window and dropped when nothing of them is left; masks are cut with the image. A crop may hold no object (as
    MMDetection's allow_negative_crop=True in those configs); the detector trains on it as background.
    Draws from torch's RNG, which the data loader seeds per worker.
    """

    def __init__(self, prob: float, scales: tuple[int, ...], crop_range: tuple[int, int], max_size: int = 1333):
        if not 0.0 <= prob <= 1.0:
            raise ConfigError(f"crop probability must be in [0, 1], got {prob}")
        if not scales or min(scales) < 1:
            raise ConfigError(f"crop resize scales must be positive shorter sides, got {list(scales)}")
        if not 0 < crop_range[0] <= crop_range[1]:
            raise ConfigError(f"crop size range must be [lo, hi] with 0 < lo <= hi, got {list(crop_range)}")
        self.prob, self.scales, self.crop_range, self.max_size = prob, tuple(scales), tuple(crop_range), max_size

    def __call__(self, img: Tensor, target: dict) -> tuple[Tensor, dict]:
        if self.prob <= 0 or torch.rand(()) >= self.prob:
            return img, target
        short = self.scales[int(torch.randint(len(self.scales), ()))]
        img, target = _resize(img, target, short, self.max_size)
        H, W = img.shape[-2:]
        lo, hi = self.crop_range
        h = int(torch.randint(min(lo, H), min(hi, H) + 1, ()))
        w = int(torch.randint(min(lo, W), min(hi, W) + 1, ()))
        y0 = int(torch.randint(H - h + 1, ()))
        x0 = int(torch.randint(W - w + 1, ()))
        return img[:, y0:y0 + h, x0:x0 + w], _crop_target(target, y0, x0, h, w)


def _resize(img: Tensor, target: dict, short: int, max_size: int) -> tuple[Tensor, dict]:
    """Aspect-preserving resize to shorter side `short` (longer side <= max_size); masks nearest, boxes scaled."""
    H, W = img.shape[-2:]
    scale = min(short / min(H, W), max_size / max(H, W))
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    masks = target["masks"]
    masks = F.interpolate(masks[None].float(), size=(h, w), mode="nearest")[0].to(masks.dtype) if len(masks) else \
        masks.new_zeros((0, h, w))
    boxes = target["boxes"] * torch.tensor([w / W, h / H, w / W, h / H])
    return img, {**target, "boxes": boxes, "masks": masks}


def _crop_target(target: dict, y0: int, x0: int, h: int, w: int) -> dict:
    boxes = target["boxes"] - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    masks = target["masks"][:, y0:y0 + h, x0:x0 + w]
    # a box with no area left, or whose mask has no pixel left, has nothing to learn from
    has_pixels = masks.flatten(1).amax(1) > 0 if len(masks) else torch.zeros(0, dtype=torch.bool)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & has_pixels
    return {**target, "boxes": boxes[keep], "labels": target["labels"][keep], "masks": masks[keep]}


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Images of different sizes stay a list (torchvision's detection transform batches them)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def to_coco_results(outputs: list[dict], image_ids: list[int], cat_ids: list[int]) -> list[dict]:
    """torchvision detections -> COCO result entries (one per detection, holding both bbox and segmentation).

    outputs[i]: boxes [N, 4] x1y1x2y2, labels [N] (1..K), scores [N], masks [N, 1, H, W] probabilities at the
    original image size; a mask is the pixels with probability > 0.5, run-length encoded.
    """
    results = []
    for out, img_id in zip(outputs, image_ids):
        boxes = out["boxes"].float().cpu()
        if not len(boxes):
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        masks = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)  # [N, H, W]
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))  # pycocotools wants [H, W, N]
        for box, score, label, rle in zip(xywh, out["scores"].tolist(), out["labels"].tolist(), rles):
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-able, as COCO's result files hold it
            results.append({"image_id": int(img_id), "category_id": cat_ids[label - 1], "bbox": box,
                            "score": float(score), "segmentation": rle})
    return results


def coco_metrics(coco_gt: COCO, results: list[dict], image_ids: list[int]) -> tuple[dict, str]:
    """Box and mask AP of `results` on the images `image_ids` (COCOeval, 100 detections per image).

    Returns ({"bbox": {AP, AP50, ...}, "segm": {...}}, COCOeval's printed summary). The box evaluation sees no masks
    and the mask evaluation no boxes, so each uses its own areas for the small/medium/large split.
    """
    metrics, text = {}, []
    for iou_type, other in (("bbox", "segmentation"), ("segm", "bbox")):
        dets = [{k: v for k, v in r.items() if k != other} for r in results]
        if not dets:  # loadRes cannot take an empty list; nothing detected scores 0
            metrics[iou_type] = {k: 0.0 for k in AP_NAMES}
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
            ev.params.imgIds = sorted(set(image_ids))  # only the images evaluated (max_images, partial runs)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[iou_type] = {k: float(v) for k, v in zip(AP_NAMES, ev.stats[:6])}
        text.append(f"{iou_type}:\n" + "\n".join(ln for ln in buf.getvalue().splitlines() if "Average" in ln))
    return metrics, "\n".join(text)
