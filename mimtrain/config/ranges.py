"""Valid ranges of numeric settings, declared where each field is defined, and the one checker that enforces them.

A numeric field (int, float, a tuple of them, or one of those or None) is declared with `ranged`:

    lr: float = ranged(0.0, ge=0)  # absolute lr; 0 = derived from blr
    crop_scale: tuple[float, float] = ranged((0.2, 1.0), gt=0, le=1, ordered=True)

`check_ranges` walks a config (nested dataclasses) and refuses the first value outside its range with one line naming
the dotted key, the range and the value. None ("the source's", "the encoder's default") is never checked; a tuple is
checked element by element. tests/test_config_ranges.py fails for any numeric field declared without a range, and
docs/config.md renders the ranges (`mimtrain.config.reference`).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any

from mimtrain.config.errors import ConfigError

RANGE = "range"  # the dataclass field metadata key


@dataclass(frozen=True)
class Range:
    """Bounds of one numeric setting (None = unbounded on that side); `ordered`: a tuple must not decrease."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    ordered: bool = False

    def contains(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):  # nan passes no comparison, inf is never a setting
            return False
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def __str__(self) -> str:
        lo = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        hi = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"{'>=' if lo[0] == '[' else '>'} {lo[1:]}"
        if hi:
            return f"{'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
        return "any finite number"

    def describe(self) -> str:
        """The range as the config reference shows it (tuples: each element; `ordered`: and not decreasing)."""
        return f"lo <= hi, each {self}" if self.ordered else str(self)

    def check(self, key: str, value: Any) -> None:
        """Raise ConfigError unless `value` (a number or a tuple of numbers) lies in the range."""
        if isinstance(value, (tuple, list)):
            ok = all(self.contains(v) for v in value)
            if ok and self.ordered:
                ok = all(a <= b for a, b in zip(value, value[1:]))
            if not ok:
                shape = "[lo, hi] with lo <= hi, each" if self.ordered and len(value) == 2 else \
                    f"{len(value)} values{', not decreasing' if self.ordered else ''}, each"
                raise ConfigError(f"{key} must be {shape} {self}, got {list(value)}")
        elif not self.contains(value):
            raise ConfigError(f"{key} must be {self}, got {value}")


def ranged(default: Any = MISSING, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, ordered: bool = False, default_factory: Any = MISSING) -> Any:
    """A dataclass field whose valid range is declared with it (`ge` >=, `gt` >, `le` <=, `lt` <)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={RANGE: Range(ge=ge, gt=gt, le=le, lt=lt, ordered=ordered)})


def range_of(f: dataclasses.Field) -> Range | None:
    return f.metadata.get(RANGE)


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Refuse the first value of `cfg` (and its nested sections) outside its declared range, naming the key."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{prefix}{f.name}.")
        elif value is not None and range_of(f) is not None:
            range_of(f).check(f"{prefix}{f.name}", value)


def is_numeric(tp: Any) -> bool:
    """True for int, float, a tuple of them, or either of those or None (bool is not numeric)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(args) and all(is_numeric(a) for a in args)
    if origin is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return bool(args) and all(a in (int, float) for a in args)
    return tp in (int, float)


def walk(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, annotation) of every setting of the config class `cls`, nested sections expanded."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += walk(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f, tp))
    return out
