"""Declared ranges (issue 28): every numeric setting of every config class declares its valid range where the field is
defined, the one checker enforces each at load time, and docs/config.md renders them from the declarations."""
from __future__ import annotations

import dataclasses
import inspect
import pathlib
import typing

import pytest

from mimtrain.config import classify, dense, pretrain
from mimtrain.config.errors import ConfigError
from mimtrain.config.ranges import Range, is_numeric, range_of, walk
from mimtrain.config.reference import meaning, render

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_MODULES = (pretrain, classify, dense)
NOT_SETTINGS = {pretrain.Derived}  # computed from a config, never read from a recipe
ROOTS = {"pretrain": pretrain.Config, **{k: (lambda k=k: classify.DEFAULTS[k]()) for k in classify.DEFAULTS},
         "detect": dense.DetectConfig, "segment": dense.SegmentConfig}


def config_classes() -> list[type]:
    """Every dataclass defined in the config modules, reachable from a root or not, so a new section cannot hide."""
    return [obj for mod in CONFIG_MODULES for _, obj in inspect.getmembers(mod, inspect.isclass)
            if dataclasses.is_dataclass(obj) and obj.__module__ == mod.__name__ and obj not in NOT_SETTINGS]


def test_every_numeric_field_declares_a_range():
    classes = config_classes()
    assert pretrain.TrainConfig in classes and dense.UperNetConfig in classes and classify.KnnOptions in classes
    numeric, missing = 0, []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if is_numeric(hints[f.name]):
                numeric += 1
                if range_of(f) is None:
                    missing.append(f"{cls.__name__}.{f.name}: {hints[f.name]}")
    assert numeric > 80, numeric  # the enumeration sees the fields at all
    assert not missing, ("numeric config fields without a declared range (declare it with "
                         f"`ranged(default, ge=/gt=/le=/lt=)`, see mimtrain/config/ranges.py): {missing}")


def test_is_numeric_tells_numbers_from_the_rest():
    assert all(is_numeric(t) for t in (int, float, int | None, tuple[float, float], tuple[int, int, int] | None))
    assert not any(is_numeric(t) for t in (bool, str, dict, str | None, tuple[str, str]))


def _outside(r: Range, example: float | int) -> float | int:
    """A value just outside `r` (of the example's type where the bound allows it)."""
    if r.ge is not None:
        return type(example)(r.ge - 1)
    if r.gt is not None:
        return type(example)(r.gt)
    if r.le is not None:
        return r.le + 1
    return r.lt


def _ranged_keys():
    for kind, root in ROOTS.items():
        cls = type(root())
        for key, f, _ in walk(cls):
            if range_of(f) is not None:
                yield pytest.param(kind, key, f, id=f"{kind}:{key}")


@pytest.mark.parametrize("kind,key,f", list(_ranged_keys()))
def test_each_declared_range_is_enforced_at_load_naming_key_and_value(kind, key, f):
    """An override just outside the declared range is refused by `load_config`, with the key, range and value in
    one line; the default itself lies inside (the root loads)."""
    base = ROOTS[kind]()
    value = base
    for part in key.split("."):
        value = getattr(value, part)
    r = range_of(f)
    if value is None:  # "the source's": take the length of a tuple from the annotation
        tp = next(t for k, _, t in walk(type(base)) if k == key)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        size = len(typing.get_args(args[0])) if typing.get_origin(args[0]) is tuple else 0
        value = (1.0,) * size if size else 1
    example = value[0] if isinstance(value, tuple) else value
    bad = _outside(r, example)
    override = f"{key}={list((bad, *value[1:])) if isinstance(value, tuple) else bad}"
    with pytest.raises(ConfigError) as e:
        pretrain.load_config(None, [override], base=ROOTS[kind]())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key} must be ") and str(r) in msg and str(bad) in msg


def test_range_messages_and_bounds():
    assert str(Range(gt=0)) == "> 0" and str(Range(ge=0, lt=1)) == "in [0, 1)" and str(Range(le=1)) == "<= 1"
    r = Range(gt=0, le=1, ordered=True)
    r.check("data.crop_scale", (0.5, 0.5))
    with pytest.raises(ConfigError, match=r"data.crop_scale must be \[lo, hi\] with lo <= hi, each in \(0, 1\], got "
                                          r"\[0.9, 0.5\]"):
        r.check("data.crop_scale", (0.9, 0.5))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="optim.lr must be >= 0"):
            Range(ge=0).check("optim.lr", bad)
    assert pretrain.load_config(None, ["encoder.mask_unit=null"]).encoder.mask_unit is None  # None: not checked


def test_explicit_lr_is_kept_never_replaced():
    """Before: optim.lr=-0.1 was silently replaced by the derived lr (config.yaml still said -0.1)."""
    with pytest.raises(ConfigError, match="optim.lr must be >= 0, got -0.1"):
        pretrain.load_config(None, ["optim.lr=-0.1"])
    cfg = pretrain.load_config(None, ["optim.lr=0.003", "train.batch_size=8"])
    assert pretrain.derive(cfg, world_size=1, samples_per_epoch=64).lr == 0.003
    cfg = pretrain.load_config(None, ["optim.blr=1e-3", "train.batch_size=8", "optim.lr_base_batch=256"])
    assert pretrain.derive(cfg, world_size=2, samples_per_epoch=64).lr == pytest.approx(1e-3 * 16 / 256)
    assert pretrain.describe_lr(cfg.optim, 16, 6.25e-5) == "lr = blr 0.001 x 16 / 256 = 6.25e-05"
    assert pretrain.describe_lr(pretrain.OptimConfig(lr=0.003), 16, 0.003) == "lr = 0.003 (optim.lr)"


def test_every_numeric_key_has_a_meaning():
    blank = [f"{kind}:{key}" for kind, root in ROOTS.items() for key, f, _ in walk(type(root()))
             if range_of(f) is not None and not meaning(_owner(type(root()), key), f.name)]
    assert not blank, f"give these fields a trailing `# comment` (their meaning in docs/config.md): {blank}"


def _owner(cls: type, key: str) -> type:
    for part in key.split(".")[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return cls


def test_meaning_reads_trailing_comments_and_their_continuations():
    assert meaning(pretrain.OptimConfig, "lr") == "absolute lr; 0 = derived from blr (see `derive`)"
    assert meaning(dense.CocoDataConfig, "min_size").endswith("(3x: 480-800); evaluation uses hi")
    assert meaning(dense.DetectTrainConfig, "batch_size").startswith("per process")  # inherited field


def test_config_reference_page_is_generated_from_the_declarations():
    page = ROOT / "docs" / "config.md"
    text = render()
    assert "| `optim.lr` | 0.0 | >= 0 | absolute lr; 0 = derived from blr" in text
    assert "| `data.crop_scale` | [0.08, 1.0] | [0.08, 1.0] | [0.08, 1.0] | lo <= hi, each in (0, 1] |" in text
    assert page.read_text() == text, ("docs/config.md is stale: regenerate it with "
                                      "`python -m mimtrain.config.reference docs/config.md`")
