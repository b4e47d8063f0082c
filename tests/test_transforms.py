"""The decoding pretraining transform: the same boxes and flips as torchvision's pipeline for the same seed, JPEG
draft decoding close to a full decode, fallbacks, and broken data skipped by the stream."""
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision import transforms as T

from helpers import make_test_shards
from mimtrain.data.stream import ShardStream, expand_shards, make_loader
from mimtrain.data.transforms import (PretrainTransform, UndecodableImage, jpeg_reduction, open_image,
                                      reference_pretrain_transform, seeded)

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
