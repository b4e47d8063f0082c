"""Image transforms. Randomness is seeded per sample (seed, epoch, key), so an augmented sample is the same on any
rank, worker count or resume point.

The pretraining transform decodes too (`PretrainTransform.takes_bytes`): the crop box is drawn from the header's
full-size coordinates before any pixel is decoded, so a JPEG whose box is large can be decoded at reduced DCT scale
(libjpeg's 1/2, 1/4 or 1/8, PIL's draft mode), and the crop and resize run on uint8 tensors (torch's antialiased
bicubic, about 4x faster than PIL's on one core). `reference_pretrain_transform` is the plain torchvision pipeline it
replaces: with the same seed both draw the same crop box and flip (`tests/test_transforms.py`).
"""
from __future__ import annotations

import io
import random
import warnings
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

try:  # libjpeg-turbo straight into a tensor: ~1.4x PIL's line-by-line decode on one core, the same pixels
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision 0.29 deprecates its codecs (for torchcodec); once they are gone, PIL decodes
    decode_jpeg = None
if TYPE_CHECKING:
    from mimtrain.config.classify import EvalDataConfig, FinetuneOptions
# It warns on every call; the fallback above is our answer to the deprecation.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_REDUCTIONS = (8, 4, 2)  # the DCT scalings PIL's draft mode asks libjpeg for, largest first


class UndecodableImage(ValueError):
    """A decoding transform could not read the image (the data pipeline skips and counts the sample)."""


def jpeg_reduction(crop_hw: tuple[int, int], out_size: int) -> int:
    """Largest DCT scale denominator (8, 4 or 2; else 1) that leaves a crop of `crop_hw` full-size pixels at least
    `out_size` pixels a side: the resize after it never enlarges what a full decode would have shrunk."""
    return next((r for r in JPEG_REDUCTIONS if min(crop_hw) >= r * out_size), 1)


class PretrainTransform:
    """MAE augmentation from the encoded image: RandomResizedCrop (bicubic) + horizontal flip + normalize.

    `__call__(data)` takes the encoded bytes (or a PIL image) and returns a normalized float tensor [3, S, S]. Draws,
    in torchvision's order and from torch's global RNG (which `seeded` seeds per sample): the box with
    `RandomResizedCrop.get_params` on the full-size image, then the flip with `torch.rand(1) < 0.5` as
    `RandomHorizontalFlip` does.

    Decoding: a JPEG whose box is at least 2S a side is decoded at the largest DCT reduction that keeps the box at
    least S a side (`jpeg_reduction`; PIL's draft mode), and PIL's bicubic resizes the box, mapped exactly into the
    reduced image (`resize(box=...)` takes sub-pixel boxes and needs no crop copy). Otherwise the image is decoded
    at full size (JPEG: `torchvision.io.decode_jpeg`, straight into a tensor; other formats: PIL) and the integer box
    is cropped and resized on the uint8 tensor. `draft=False` always decodes at full size.
    """

    takes_bytes = True  # ShardStream hands this transform the encoded image instead of a decoded one

    def __init__(self, img_size: int, crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, ratio: tuple[float, float] = (3 / 4, 4 / 3), draft: bool = True):
        self.size, self.scale, self.ratio = img_size, tuple(crop_scale), tuple(ratio)
        self.hflip, self.draft = hflip, draft
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std as one multiply and one subtract on the uint8 crop
        self._mul = 1.0 / (255.0 * std_t)
        self._sub = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t

    def __call__(self, data: bytes | Image.Image) -> Tensor:
        out = self.crop(data)
        if self.hflip and torch.rand(1) < 0.5:
            out = out.flip(-1)
        return out.to(torch.float32, memory_format=torch.contiguous_format).mul_(self._mul).sub_(self._sub)

    def crop(self, data: bytes | Image.Image) -> Tensor:
        """Decode + RandomResizedCrop -> uint8 [3, S, S] (draws the box, not the flip)."""
        img = open_image(data)
        top, left, h, w = self.draw_box(img)
        reduction = self.reduction(img, (top, left, h, w))
        try:
            if reduction > 1:
                # DCT-scaled decode, then PIL's bicubic on the box mapped exactly (sub-pixel) into the reduced image.
                width, height = img.size
                drafted = img.draft("RGB", (width // reduction, height // reduction))
                r = width / drafted[1][2] if drafted else 1.0  # the scale libjpeg was actually asked for
                box = (left / r, top / r, (left + w) / r, (top + h) / r)
                return TF.pil_to_tensor(_rgb(img).resize((self.size, self.size), Image.BICUBIC, box=box))
            pixels = self.decode(img, data)
        except Exception as e:  # noqa: BLE001  (whatever the decoder raises on broken data)
            raise UndecodableImage(f"cannot decode {img.format} image: {e}") from e
        # A full-size uint8 image: torch's antialiased bicubic (PIL's filter, ~4x faster on one core).
        return TF.resized_crop(pixels, top, left, h, w, [self.size, self.size],
                               interpolation=T.InterpolationMode.BICUBIC, antialias=True)

    def draw_box(self, img: Image.Image) -> tuple[int, int, int, int]:
        """(top, left, height, width) in full-size pixels: `RandomResizedCrop.get_params` on the header's size."""
        return T.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))

    @staticmethod
    def decode(img: Image.Image, data: bytes | Image.Image) -> Tensor:
        """The full-size image as uint8 [3, H, W]: a JPEG's bytes through torchvision's decoder (into a tensor with
        no copy through PIL), anything else through PIL."""
        if decode_jpeg is not None and img.format == "JPEG" and isinstance(data, (bytes, bytearray)):
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return TF.pil_to_tensor(_rgb(img))

    def reduction(self, img: Image.Image, box: tuple[int, int, int, int]) -> int:
        """The DCT scale denominator `crop` decodes at: 1 unless `draft` and a JPEG with a large box (a JPEG that is
        already decoded stays at full size: PIL's draft refuses it)."""
        if not self.draft or img.format != "JPEG":
            return 1
        return jpeg_reduction(box[2:], self.size)


def open_image(data: bytes | Image.Image) -> Image.Image:
    """A PIL image with only its header read (a PIL image passes through)."""
    if isinstance(data, Image.Image):
        return data
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001
        raise UndecodableImage(f"not an image: {e}") from e


def _rgb(img: Image.Image) -> Image.Image:
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def pretrain_transform(img_size: int, crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD) -> PretrainTransform:
    """MAE augmentation: RandomResizedCrop (bicubic) + horizontal flip + normalize, decoding included."""
    return PretrainTransform(img_size, crop_scale, hflip, mean, std)


def reference_pretrain_transform(img_size: int, crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """The same augmentation as plain torchvision on a decoded PIL image (PIL's bicubic on the full-size crop): what
    `PretrainTransform` replaced; kept as its reference for tests and `mimtrain bench --decode`."""
    ops = [T.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def eval_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct: float = 0.875) -> T.Compose:
    """Resize the short side to img_size / crop_pct, center-crop img_size, normalize."""
    return T.Compose([T.Resize(int(img_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), T.ToTensor(), T.Normalize(mean, std)])


def seeded(transform, img, seed: int) -> torch.Tensor:
    """Apply a transform that draws from torch's global (CPU) RNG under a private, seeded RNG."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed would also seed every accelerator, ~0.1 ms a sample.
        torch.default_generator.manual_seed(seed)
        return transform(img)


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[B, 3, H, W] normalized -> [0, 1] pixels (for image logs)."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * s + m).clamp(0, 1)


class PythonSeeded:
    """Run a transform that draws from Python's `random` and NumPy's global RNG (timm's RandAugment picks its ops with
    `np.random.choice` and their magnitudes with `random`; AugMix draws from both) under seeds drawn from torch's RNG,
    which the data pipeline seeds per sample: an augmented sample is the same whatever was drawn before it (worker
    count, resume point), like torchvision's."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, img):
        py_seed, np_seed = (int(s) for s in torch.randint(0, 2 ** 31 - 1, (2,)))
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(py_seed)
        np.random.seed(np_seed)
        try:
            return self.transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class PosterizeBits:
    """A posterize op's level function with its bit count kept in [1, 8], the range Pillow >= 13 accepts.

    timm's level functions reach 0 bits ('PosterizeIncreasing' at magnitude 10, which `rand-m9-mstd0.5` draws for
    about 2% of its magnitudes; 'Posterize' below magnitude 2.5) and below 0 past `mmax` 10; older Pillow turned 0 bits
    into a black image, Pillow 13 raises. Every valid count passes unchanged, and the op draws the same random numbers,
    so only the draws that used to crash change: they keep 1 bit, the strongest posterize Pillow allows."""

    def __init__(self, level_fn: Callable):
        self.level_fn = level_fn  # timm's module-level function: the wrapper pickles into DataLoader workers

    def __call__(self, magnitude: float, hparams: dict) -> tuple[int]:
        (bits,) = self.level_fn(magnitude, hparams)
        return (min(8, max(1, int(bits))),)


def pillow_safe(transform: Callable) -> int:
    """Keep every posterize op of the timm auto-augmentations (RandAugment, AutoAugment, AugMix) in `transform` (one
    of them, or a Compose of transforms) in Pillow's range (`PosterizeBits`), in place. Returns the number of
    posterize ops it covers. The other ops of timm 1.0's policies take any magnitude on an RGB image
    (tests/test_transforms.py)."""
    found = 0
    for t in transform.transforms if isinstance(transform, T.Compose) else [transform]:
        if isinstance(t, (auto_augment.RandAugment, auto_augment.AugMixAugment)):
            ops = t.ops
        elif isinstance(t, auto_augment.AutoAugment):
            ops = [op for sub_policy in t.policy for op in sub_policy]
        else:
            continue
        for op in ops:
            if op.aug_fn is auto_augment.posterize:
                if not isinstance(op.level_fn, PosterizeBits):
                    op.level_fn = PosterizeBits(op.level_fn)
                found += 1
    return found


def finetune_transform(data: EvalDataConfig, ft: FinetuneOptions) -> PythonSeeded:
    """timm's ImageNet training pipeline, the MAE/BEiT fine-tuning augmentation: RandomResizedCrop (bicubic), flip,
    the `ft.auto_augment` policy (or colour jitter 0.4 without one), normalize, random erasing (`ft.re_prob`, pixel
    mode). Posterize kept in Pillow's range (`pillow_safe`); seeded per sample (`PythonSeeded`). `data` needs its
    img_size, mean and std resolved (the source's, once `follow_source` ran)."""
    t = create_transform(data.img_size, is_training=True, scale=tuple(data.crop_scale),
                         hflip=0.5 if data.hflip else 0.0, auto_augment=ft.auto_augment or None,
                         color_jitter=None if ft.auto_augment else 0.4, interpolation="bicubic", re_prob=ft.re_prob,
                         re_mode="pixel", re_count=1, mean=tuple(data.mean), std=tuple(data.std))
    pillow_safe(t)
    return PythonSeeded(t)
