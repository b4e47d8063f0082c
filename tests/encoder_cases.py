"""Tiny configurations of registered encoders for the contract suite (`test_encoder_contract.py`)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EncoderCase:
    name: str  # registered timm name; `test_registered_name_builds_at_full_size` builds it at its real size
    mask_mode: str = "drop"
    img_size: int | tuple[int, int] = 64
    kwargs: dict = field(default_factory=dict)  # shrinks the model for CPU tests (depth, width, ...)

    @property
    def hw(self) -> tuple[int, int]:
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)

    @property
    def id(self) -> str:
        return f"{self.name}-{self.mask_mode}-{self.hw[0]}x{self.hw[1]}"
