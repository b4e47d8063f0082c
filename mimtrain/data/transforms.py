"""Image transforms. Randomness is seeded per sample (seed, epoch, key), so an augmented sample is the same on any
rank, worker count or resume point."""
from __future__ import annotations

import torch
from torchvision import transforms as T


def pretrain_transform(img_size: int, crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> T.Compose:
    """MAE augmentation: RandomResizedCrop (bicubic) + horizontal flip + normalize."""
    ops = [T.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def eval_transform(img_size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   crop_pct: float = 0.875) -> T.Compose:
    """Resize the short side to img_size / crop_pct, center-crop img_size, normalize."""
    return T.Compose([T.Resize(int(img_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), T.ToTensor(), T.Normalize(mean, std)])


def seeded(transform, img, seed: int) -> torch.Tensor:
    """Apply a torchvision transform (which draws from torch's global RNG) under a private, seeded RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(img)


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[B, 3, H, W] normalized -> [0, 1] pixels (for image logs)."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * s + m).clamp(0, 1)
