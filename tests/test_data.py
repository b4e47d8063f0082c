import json

import pytest
import torch

from helpers import append_corrupt_jpeg, make_test_shards, run_cli, write_image_folder
from mimtrain.config.pretrain import MaskConfig
from mimtrain.data.shards import make_shards
from mimtrain.data.stream import ShardStream, count_samples, expand_shards, make_loader
from mimtrain.data.transforms import pretrain_transform
from mimtrain.encoders import build_encoder
from mimtrain.masking import MaskingService


def _stream(shards, workers=1, masking=None, **kw):
    urls = expand_shards(str(shards))
    return ShardStream(urls, pretrain_transform(32, (0.5, 1.0)), kw.pop("batch_size", 4), seed=1,
                       num_streams=max(1, workers), masking=masking, shuffle_buffer=10, **kw)


def _read(stream, workers):
    return list(make_loader(stream, workers))


def _masking(img=32):
    enc = build_encoder("mim_vit_tiny_patch16", img, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    return MaskingService.for_encoder(enc, img, MaskConfig(), seed=1)


def test_make_shards_round_trip_preserves_labels(tmp_path):
    shards = make_test_shards(tmp_path, classes=3, per_class=5, shard_size=4)
    index = json.loads((shards / "index.json").read_text())
    assert index["total"] == 15 and len(index["shards"]) == 4
    assert json.loads((shards / "classes.json").read_text()) == ["class_0", "class_1", "class_2"]
    assert count_samples(expand_shards(str(shards))) == 15
    got = {}
    for batch in _read(_stream(shards, shuffle_shards=False), 0):
        for key, label, img in zip(batch["key"], batch["label"].tolist(), batch["images"]):
            got[key] = label
    # make-shards writes classes in sorted order, 5 each: global index // 5 is the label
    assert {int(k.split("/")[1]) // 5 == v for k, v in got.items()} == {True} and len(got) == 15


def test_make_shards_from_a_saved_hf_dataset(tmp_path):
    import datasets
    from PIL import Image

    imgs = [Image.new("RGB", (16, 16), (i * 20, 0, 0)) for i in range(6)]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 2, 0, 1, 2]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=["a", "b", "c"])}))
    ds.save_to_disk(str(tmp_path / "hf"))
    summary = make_shards(tmp_path / "hf", tmp_path / "shards", shard_size=4, verbose=False)
    assert summary["total"] == 6 and summary["per_class"] == {"0": 2, "1": 2, "2": 2}
    assert json.loads((tmp_path / "shards" / "classes.json").read_text()) == ["a", "b", "c"]


def test_make_shards_cli_prints_a_summary(tmp_path):
    write_image_folder(tmp_path / "imgs", classes=2, per_class=3)
    out = run_cli("make-shards", str(tmp_path / "imgs"), str(tmp_path / "sh"), "--shard-size", "4").stdout
    assert "wrote 6 samples in 2 shards" in out and "2 classes" in out


def test_two_workers_yield_every_sample_exactly_once_per_epoch(tmp_path):
    shards = make_test_shards(tmp_path, classes=3, per_class=8, shard_size=5)  # 24 samples, 5 shards
    keys = [k for b in _read(_stream(shards, workers=2), 2) for k in b["key"]]
    assert len(keys) == 24 and len(set(keys)) == 24
    # next epoch: the same samples, in another order
    s = _stream(shards, workers=2)
    s.set_epoch(1)
    keys1 = [k for b in _read(s, 2) for k in b["key"]]
    assert sorted(keys1) == sorted(keys) and keys1 != keys


def test_same_masks_and_crops_with_one_or_two_workers(tmp_path):
    shards = make_test_shards(tmp_path, classes=2, per_class=6, shard_size=3)
    by_key = []
    for workers in (0, 2):
        got = {}
        for b in _read(_stream(shards, workers=workers, masking=_masking()), workers):
            for k, m, img in zip(b["key"], b["mask"], b["images"]):
                got[k] = (m, img)
        by_key.append(got)
    assert by_key[0].keys() == by_key[1].keys() and len(by_key[0]) == 12
    for k in by_key[0]:
        assert torch.equal(by_key[0][k][0], by_key[1][k][0])
        assert torch.equal(by_key[0][k][1], by_key[1][k][1])


def test_corrupt_jpeg_is_skipped_and_counted(tmp_path):
    shards = make_test_shards(tmp_path, classes=2, per_class=4, shard_size=4)
    append_corrupt_jpeg(shards / "shard-000000.tar")
    batches = _read(_stream(shards, workers=0, batch_size=2), 0)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 8 and not any("corrupt" in k for k in keys)
    assert int(batches[-1]["skipped"]) == 1


def test_fixed_length_epochs_repeat_short_streams(tmp_path):
    shards = make_test_shards(tmp_path, classes=2, per_class=4, shard_size=4)  # 8 samples, 2 shards
    batches = _read(_stream(shards, workers=2, num_batches=7, batch_size=2), 2)
    assert len(batches) == 7  # 14 samples from 8: streams go round their shards again


def test_resumed_stream_continues_exactly(tmp_path):
    """Consume n batches, record positions like the trainer does, restart: the rest equals the uninterrupted run."""
    shards = make_test_shards(tmp_path, classes=3, per_class=8, shard_size=4)
    full = _read(_stream(shards, workers=2, num_batches=9, batch_size=3, masking=_masking()), 2)
    for n in (1, 4, 5):
        streams = {}
        for b in full[:n]:
            s, p, r = b["pos"].tolist()
            streams[s] = [p, r]
        rest = _read(_stream(shards, workers=2, num_batches=9, batch_size=3, masking=_masking(),
                             start={"consumed": n, "streams": streams}), 2)
        assert [b["key"] for b in rest] == [b["key"] for b in full[n:]]
        assert all(torch.equal(a["mask"], b["mask"]) and torch.equal(a["images"], b["images"])
                   for a, b in zip(rest, full[n:]))


def test_ranks_read_disjoint_shards(tmp_path):
    shards = make_test_shards(tmp_path, classes=2, per_class=8, shard_size=4)  # 4 shards
    seen = []
    for rank in (0, 1):
        s = _stream(shards, rank=rank, world_size=2)
        seen.append({k.split("/")[0] for b in _read(s, 0) for k in b["key"]})
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 4


def test_missing_shards_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_shards(str(tmp_path / "shard-{000000..000003}.tar"))
    with pytest.raises(ValueError, match="no shards given"):
        expand_shards("")
    assert expand_shards("pipe:cat a.tar::https://host/b-{0..1}.tar") == [
        "pipe:cat a.tar", "https://host/b-0.tar", "https://host/b-1.tar"]
