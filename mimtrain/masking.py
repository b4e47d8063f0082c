"""The masking service: one boolean grid per image on the encoder's mask-unit grid (True = hidden), drawn in the
DataLoader's collate and deterministic from (seed, epoch, sample key), whatever the number of workers or processes.

The service asks the encoder for its `mask_unit` and `mask_mode`; the user never configures drop/fill by hand.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mimtrain.config.errors import ConfigError


def check_image_size(img_size: int | tuple[int, int], mask_unit: int, name: str = "encoder") -> tuple[int, int]:
    """Refuse an image size the mask grid does not tile, before any expensive work."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h % mask_unit or w % mask_unit:
        raise ConfigError(
            f"image size {h}x{w} is not divisible by the mask unit of {name} ({mask_unit} px); "
            f"choose data.img_size as a multiple of {mask_unit} or set encoder.mask_unit"
        )
    return h, w


def sample_seed(*parts) -> int:
    """A stable 63-bit seed from any printable parts (Python's hash() is salted per process, so not that)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_mask(grid: tuple[int, int], n_hidden: int, g: torch.Generator) -> Tensor:
    """MAE: exactly `n_hidden` units hidden, chosen uniformly. -> [Gh, Gw] bool."""
    gh, gw = grid
    mask = torch.zeros(gh * gw, dtype=torch.bool)
    mask[torch.randperm(gh * gw, generator=g)[:n_hidden]] = True
    return mask.view(gh, gw)


def block_mask(grid: tuple[int, int], n_hidden: int, g: torch.Generator, min_block: int = 4,
               max_aspect: float = 3.0, exact: bool = True) -> Tensor:
    """BEiT-style block-wise masking: rectangles of random area and log-uniform aspect ratio are hidden until about
    `n_hidden` units are covered. With `exact`, the count is then trimmed or topped up at random to `n_hidden`
    (drop mode needs the same count in every image). -> [Gh, Gw] bool.
    """
    gh, gw = grid
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    log_a = math.log(max_aspect)

    def rand() -> float:
        return float(torch.rand((), generator=g))

    for _ in range(10 * gh * gw):  # bounded: each round either grows the mask or counts as a failed try
        covered = int(mask.sum())
        if covered >= n_hidden:
            break
        area = min_block + rand() * max(0, min(n_hidden - covered, gh * gw // 3) - min_block)
        aspect = math.exp((2 * rand() - 1) * log_a)
        h = max(1, min(gh, round(math.sqrt(area * aspect))))
        w = max(1, min(gw, round(math.sqrt(area / aspect))))
        top, left = int(rand() * (gh - h + 1)), int(rand() * (gw - w + 1))
        mask[top:top + h, left:left + w] = True
    if exact:
        flat = mask.flatten()
        extra = int(flat.sum()) - n_hidden
        if extra > 0:  # un-hide random hidden units
            idx = flat.nonzero().squeeze(1)
            flat[idx[torch.randperm(len(idx), generator=g)[:extra]]] = False
        elif extra < 0:  # hide random visible units
            idx = (~flat).nonzero().squeeze(1)
            flat[idx[torch.randperm(len(idx), generator=g)[:-extra]]] = True
        mask = flat.view(gh, gw)
    return mask


@dataclass
class MaskingService:
    """Draws masks for one encoder. Build with `for_encoder`; call `draw(keys, epoch)` in collate."""
    grid: tuple[int, int]  # mask-unit grid (Gh, Gw)
    mode: str  # "drop" | "fill" (the encoder's)
    ratio: float
    seed: int
    generator: str = "random"
    min_block: int = 4
    max_aspect: float = 3.0

    @classmethod
    def for_encoder(cls, encoder, img_size: int | tuple[int, int], mask_cfg, seed: int) -> "MaskingService":
        h, w = check_image_size(img_size, encoder.mask_unit, type(encoder).__name__)
        if mask_cfg.generator not in ("random", "block"):
            raise ConfigError(f"mask.generator must be 'random' or 'block', got {mask_cfg.generator!r}")
        if not 0.0 < mask_cfg.ratio < 1.0:
            raise ConfigError(f"mask.ratio must be in (0, 1), got {mask_cfg.ratio}")
        service = cls(grid=(h // encoder.mask_unit, w // encoder.mask_unit), mode=encoder.mask_mode,
                      ratio=mask_cfg.ratio, seed=seed, generator=mask_cfg.generator, min_block=mask_cfg.min_block,
                      max_aspect=mask_cfg.max_aspect)
        units = service.grid[0] * service.grid[1]
        if not 0 < service.n_hidden < units:  # nothing to predict (NaN loss at step 1), or nothing left to see
            raise ConfigError(f"mask.ratio={mask_cfg.ratio} hides {service.n_hidden} of the {units} mask units "
                              f"({service.grid[0]}x{service.grid[1]} grid of {encoder.mask_unit} px at {h}x{w}); "
                              f"at least 1 and at most {units - 1} must be hidden: use a ratio in "
                              f"[1/{units}, {units - 1}/{units}] = [{1 / units:.4g}, {(units - 1) / units:.4g}]")
        return service

    @property
    def n_hidden(self) -> int:
        return round(self.ratio * self.grid[0] * self.grid[1])

    def draw_one(self, key: str, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(sample_seed("mask", self.seed, epoch, key))
        if self.generator == "random":
            return random_mask(self.grid, self.n_hidden, g)
        # Fill mode tolerates a count near the target, as SimMIM/BEiT do; drop mode needs it exact.
        return block_mask(self.grid, self.n_hidden, g, self.min_block, self.max_aspect, exact=self.mode == "drop")

    def draw(self, keys: list[str], epoch: int) -> Tensor:
        """-> [B, Gh, Gw] bool, True = hidden."""
        return torch.stack([self.draw_one(k, epoch) for k in keys])
