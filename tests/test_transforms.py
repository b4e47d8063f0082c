"""The decoding pretraining transform: the same boxes and flips as torchvision's pipeline for the same seed, JPEG
draft decoding close to a full decode, fallbacks, and broken data skipped by the stream. The fine-tuning augmentation:
the shipped recipes' RandAugment within the pinned Pillow's ranges, seeded per sample."""
import collections
import copy
import dataclasses
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image
from timm.data import auto_augment
from torchvision import transforms as T

from helpers import REPO, make_test_shards
from mimtrain.config.classify import load_eval_config
from mimtrain.data.stream import ShardStream, expand_shards, make_loader
from mimtrain.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, PosterizeBits, PretrainTransform, UndecodableImage,
                                      finetune_transform, jpeg_reduction, open_image, reference_pretrain_transform,
                                      seeded)
from mimtrain.masking import sample_seed

S = 96
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


def _photo_bytes(size=(512, 342), fmt="JPEG") -> bytes:
    """A real photograph (scikit-learn's sample), resized, encoded."""
    img = Image.fromarray(load_sample_image("china.jpg")).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _pixels_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two normalized images, in [0, 1] pixel units."""
    return float(((a - b) * STD).abs().mean())


def test_jpeg_reduction_keeps_the_box_at_least_the_output_size():
    assert jpeg_reduction((447, 2000), 224) == 1
    assert jpeg_reduction((448, 500), 224) == 2
    assert jpeg_reduction((895, 900), 224) == 2
    assert jpeg_reduction((896, 1000), 224) == 4
    assert jpeg_reduction((1792, 1792), 224) == 8
    assert jpeg_reduction((5000, 5000), 224) == 8


def test_same_seed_same_box_and_flip_as_torchvision_and_draft_close_to_full_decode():
    data = _photo_bytes((1280, 854))
    full_pil = Image.open(io.BytesIO(data)).convert("RGB")
    fast, full, ref = PretrainTransform(S), PretrainTransform(S, draft=False), reference_pretrain_transform(S)
    reductions, diffs = set(), []
    for seed in range(16):
        # The box, drawn from the header only, is torchvision's RandomResizedCrop box for this seed.
        box = seeded(fast.draw_box, open_image(data), seed)
        assert box == seeded(lambda im: T.RandomResizedCrop.get_params(im, [0.2, 1.0], [3 / 4, 4 / 3]),
                             full_pil, seed)
        reductions.add(fast.reduction(open_image(data), box))
        a, f, r = seeded(fast, data, seed), seeded(full, data, seed), seeded(ref, full_pil, seed)
        assert a.shape == r.shape == (3, S, S) and a.dtype == torch.float32 and a.is_contiguous()
        # Same box and flip as the PIL + torchvision pipeline (another flip or box: 0.02 and up).
        assert _pixels_diff(f, r) < 2e-3, seed
        # DCT-scaled decode + the box mapped into it: close to the full decode (about 0.003 at 1/4 scale, 0.01 at
        # 1/8 here; the box one reduced pixel off gives 0.02-0.06).
        diffs.append(_pixels_diff(a, f))
        assert diffs[-1] < 0.015, (seed, diffs[-1])
    assert reductions >= {4, 8}, reductions  # both reduced scales were exercised
    assert sum(diffs) / len(diffs) < 0.01


def test_draft_decode_reads_fewer_pixels():
    data = _photo_bytes((1280, 854))
    fast = PretrainTransform(S)
    for r in (4, 8):
        seed = next(s for s in range(64) if fast.reduction(open_image(data), seeded(fast.draw_box, open_image(data), s))
                    == r)
        box = seeded(fast.draw_box, open_image(data), seed)
        assert min(box[2:]) / r >= S  # the box still covers at least S x S decoded pixels
        # What crop() relies on: PIL asks libjpeg for exactly 1/r and says so in the box it returns.
        img = open_image(data)
        _, scaled = img.draft("RGB", (1280 // r, 854 // r))
        assert scaled[2] == pytest.approx(1280 / r)
        img.load()
        assert img.size == (-(-1280 // r), -(-854 // r))


def test_png_and_decoded_images_take_the_full_decode_path():
    png = _photo_bytes((200, 150), "PNG")
    t = PretrainTransform(48)
    a = seeded(t, png, 3)
    b = seeded(t, Image.open(io.BytesIO(png)).convert("RGB"), 3)  # a decoded PIL image works too
    assert torch.equal(a, b)
    ref = seeded(reference_pretrain_transform(48), Image.open(io.BytesIO(png)).convert("RGB"), 3)
    assert _pixels_diff(a, ref) < 2e-3
    assert not torch.equal(a, seeded(t, png, 4))  # another seed, another crop


def test_pil_decodes_the_same_pixels_where_torchvision_cannot(monkeypatch):
    data = _photo_bytes()
    t = PretrainTransform(S)
    seeds = [s for s in range(16) if t.reduction(open_image(data), seeded(t.draw_box, open_image(data), s)) == 1]
    expected = [seeded(t, data, s) for s in seeds[:4]]
    monkeypatch.setattr("mimtrain.data.transforms.decode_jpeg", None)  # a torchvision without its image codecs
    assert seeds and all(_pixels_diff(seeded(t, data, s), e) < 1e-3 for s, e in zip(seeds, expected))


@pytest.mark.parametrize("draft", [True, False])
def test_broken_bytes_raise_undecodable(draft):
    data = _photo_bytes()
    t = PretrainTransform(S, draft=draft)
    for bad in (b"not an image at all", data[: len(data) // 2], b"\xff\xd8\xff\xe0" + bytes(range(64))):
        with pytest.raises(UndecodableImage):
            for seed in range(4):  # whichever decode path the drawn box takes
                seeded(t, bad, seed)


def test_stream_skips_and_counts_a_truncated_jpeg(tmp_path):
    shards = make_test_shards(tmp_path, classes=2, per_class=4, shard_size=4)
    truncated = _photo_bytes()[:3000]  # a valid header, then the data stops
    with tarfile.open(shards / "shard-000001.tar", "a") as tar:
        for name, payload in (("truncated.jpg", truncated), ("truncated.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    stream = ShardStream(expand_shards(str(shards)), PretrainTransform(32, (0.5, 1.0)), 2, seed=1, shuffle_buffer=10)
    batches = list(make_loader(stream, 0))
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 8 and not any("truncated" in k for k in keys)
    assert int(batches[-1]["skipped"]) == 1
    assert all(np.isfinite(b["images"].numpy()).all() for b in batches)


# ---------------------------------------------------------------------- fine-tuning augmentation (issue 27, item 7)

FT = 16  # px: the draws, not the pixels, are under test
CRASHED = "shard-000000.tar/000764"  # sample key whose recipe draw asked Pillow for posterize(bits=0) (seed 0, epoch 0)


def _recipe_settings() -> dict[tuple, str]:
    """The distinct augmentation settings of the shipped fine-tune recipes, loaded as `mimtrain finetune` loads them:
    {(auto_augment, re_prob, crop_scale, hflip, seed): a recipe that has them}."""
    found = {}
    for path in sorted(REPO.glob("recipes/finetune/*.yaml")):
        c = load_eval_config("finetune", str(path), [])
        found.setdefault((c.finetune.auto_augment, c.finetune.re_prob, tuple(c.data.crop_scale), c.data.hflip,
                          c.seed), str(path))
    return found


def _recipe_transform(recipe: str, **finetune):
    """The recipe's training transform (the function `mimtrain finetune` builds it with) at FT px."""
    cfg = load_eval_config("finetune", recipe, [f"finetune.{k}={v}" for k, v in finetune.items()])
    data = dataclasses.replace(cfg.data, img_size=FT, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return finetune_transform(data, cfg.finetune), cfg


def _policy_ops(t) -> list:
    """Every AugmentOp of the timm auto-augmentation inside a finetune_transform."""
    ops = []
    for step in t.transform.transforms:
        if isinstance(step, (auto_augment.RandAugment, auto_augment.AugMixAugment)):
            ops += step.ops
        elif isinstance(step, auto_augment.AutoAugment):
            ops += [op for sub in step.policy for op in sub]
    return ops


def _unpatched(t):
    """The same transform with timm's own posterize level functions back (the pipeline before the fix)."""
    for op in _policy_ops(t):
        if isinstance(op.level_fn, PosterizeBits):
            op.level_fn = op.level_fn.level_fn
    return t


@pytest.fixture(scope="module")
def small_photo() -> Image.Image:
    return Image.fromarray(load_sample_image("china.jpg")).resize((24, 16), Image.BICUBIC)


def test_posterize_levels_keep_pillow_range_and_every_valid_count():
    img = Image.fromarray(load_sample_image("china.jpg")).resize((16, 16))
    with pytest.raises(ValueError, match="bits must be between"):  # the pinned Pillow refuses what timm asks for
        ImageOps.posterize(img, 0)
    names = [n for n, fn in auto_augment.NAME_TO_OP.items() if fn is auto_augment.posterize]
    assert set(names) == {"Posterize", "PosterizeIncreasing", "PosterizeOriginal"}
    raw_counts = set()
    for name in names:
        level = auto_augment.LEVEL_TO_ARG[name]
        for m in np.linspace(0, 20, 81):  # past 10 too: `mmax` lifts the magnitude cap
            (raw,) = level(float(m), {})
            (bits,) = PosterizeBits(level)(float(m), {})
            raw_counts.add(raw)
            assert bits == (raw if 1 <= raw <= 8 else min(8, max(1, raw))), (name, m)
    assert {0, -4} <= raw_counts  # timm's 0 bits (and below, past mmax) exist: the fix is not vacuous
    # 'PosterizeIncreasing' at magnitude 10 (timm: 4 - int(m / 10 * 4) = 0 bits) is now Pillow's 1-bit posterize.
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    op.level_fn = PosterizeBits(op.level_fn)
    assert np.array_equal(np.asarray(op(img)), np.asarray(ImageOps.posterize(img, 1)))
    assert np.array_equal(np.asarray(op(img)), np.asarray(img) & 0x80)  # 1 bit: only the top bit of each channel


def test_the_draw_that_crashed_now_posterizes_with_one_bit(small_photo, monkeypatch):
    (recipe,) = _recipe_settings().values()
    t, cfg = _recipe_transform(recipe)
    seed = sample_seed("aug", cfg.seed, 0, CRASHED)  # what ShardStream seeds this sample with in epoch 0
    bits = []
    real = ImageOps.posterize
    monkeypatch.setattr(ImageOps, "posterize", lambda im, b: bits.append(b) or real(im, b))
    out = seeded(t, small_photo, seed)
    assert out.shape == (3, FT, FT) and torch.isfinite(out).all()
    assert bits == [1]
    assert torch.equal(seeded(t, small_photo, seed), out)  # per sample: the same draw again
    bits.clear()
    with pytest.raises(ValueError, match="bits must be between or equal to 1 and 8"):  # before: this sample crashed
        seeded(_unpatched(t), small_photo, seed)
    assert bits == [0]


def test_recipe_augmentation_draws_20000_images(small_photo):
    settings = _recipe_settings()
    assert len(settings) == 1, settings  # every shipped recipe has MAE's augmentation (else: draw each one)
    (recipe,) = settings.values()
    t, cfg = _recipe_transform(recipe)
    assert cfg.finetune.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.finetune.re_prob > 0
    (post,) = [op for op in _policy_ops(t) if op.aug_fn is auto_augment.posterize]
    asked = collections.Counter()  # timm's bit counts as drawn, before the clamp
    level = post.level_fn.level_fn
    post.level_fn.level_fn = lambda m, hp: (asked.update(level(m, hp)), level(m, hp))[1]
    images = [small_photo, small_photo.transpose(Image.Transpose.ROTATE_90), small_photo.convert("L").convert("RGB")]
    n = 20_000
    for i in range(n):
        key = f"shard-{i % 7:06d}.tar/{i:06d}"
        out = seeded(t, images[i % 3], sample_seed("aug", cfg.seed, i // 5000, key))
        assert out.shape == (3, FT, FT)
    assert asked[0] >= 5, asked  # about 1 in 500 draws asked for 0 bits: each of those crashed before the fix
    assert sum(asked.values()) > n / 30  # posterize ran (about 2 ops of 15 per image, each with p 0.5)


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "augmix-m5-w3", "original", "v0"])
def test_every_op_of_the_policy_takes_every_magnitude(spec, small_photo, monkeypatch):
    t, _ = _recipe_transform("recipes/finetune/mae_vit_base.yaml", auto_augment=spec)
    ops = _policy_ops(t)
    assert ops and any(isinstance(op.level_fn, PosterizeBits) for op in ops) == any(
        op.aug_fn is auto_augment.posterize for op in ops)
    img = small_photo.crop((0, 0, FT, FT))
    for op in ops:
        op = copy.copy(op)
        op.prob, op.magnitude_std = 1.0, 0
        for m in np.linspace(0, 10, 21):
            op.magnitude = float(m)
            for sign in (0.0, 1.0):  # timm negates a magnitude when random.random() > 0.5
                monkeypatch.setattr(auto_augment.random, "random", lambda: sign)
                out = op(img)
                assert out.size == img.size and out.mode == "RGB", (spec, op.name, m)
    monkeypatch.undo()


def test_python_and_numpy_draws_are_seeded_per_sample(small_photo):
    (recipe,) = _recipe_settings().values()
    t, _ = _recipe_transform(recipe)
    seed = sample_seed("aug", 0, 3, "shard-000001.tar/000042")
    np.random.seed(1)
    a = seeded(t, small_photo, seed)
    np.random.seed(2)  # RandAugment picks its ops from NumPy's global RNG: another state before, the same draw
    state = np.random.get_state()
    b = seeded(t, small_photo, seed)
    assert torch.equal(a, b)
    after = np.random.get_state()
    assert after[2] == state[2] and np.array_equal(after[1], state[1])  # the caller's NumPy state is left as it was
