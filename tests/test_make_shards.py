"""`mimtrain make-shards`: random order across shards, parallel writers, used output folders, unreadable and 16-bit
files, HF columns/splits and unlabelled data (issues 17 and 18, items 6 and 7)."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli, write_image_folder
from mimtrain.data.shards import make_shards


def _members(shards):
    """{shard name: [(key, ext, payload bytes), ...]} in tar order."""
    out = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            out[tar_path.name] = [(m.name.split(".")[0], m.name.split(".", 1)[1], tar.extractfile(m).read())
                                  for m in tar.getmembers()]
    return out


def _labels_per_shard(shards):
    return [[int(p) for k, ext, p in members if ext == "cls"] for members in _members(shards).values()]


def test_samples_are_dealt_in_a_seeded_random_order_across_shards(tmp_path):
    src = write_image_folder(tmp_path / "imgs", classes=4, per_class=10, size=8)  # class-sorted source
    a = make_shards(src, tmp_path / "a", shard_size=10, verbose=False)
    labels = _labels_per_shard(tmp_path / "a")
    assert all(len(set(shard)) >= 3 for shard in labels), labels  # source order would give 1 class per shard
    assert a["shuffled"] and a["seed"] == 0 and a["per_class"] == {str(c): 10 for c in range(4)}
    assert a["shards"] == {f"shard-{j:06d}.tar": 10 for j in range(4)} and a["labelled"] is True
    # keys are the source index (class-sorted order): key // 10 is the label, whatever shard it landed in
    for members in _members(tmp_path / "a").values():
        cls = {k: int(p) for k, ext, p in members if ext == "cls"}
        assert all(int(k) // 10 == v for k, v in cls.items())
    make_shards(src, tmp_path / "b", shard_size=10, verbose=False)
    assert _members(tmp_path / "a") == _members(tmp_path / "b")  # seeded: the same shards again
    make_shards(src, tmp_path / "c", shard_size=10, verbose=False, seed=1)
    assert _labels_per_shard(tmp_path / "c") != labels
    make_shards(src, tmp_path / "d", shard_size=10, verbose=False, shuffle=False)
    assert _labels_per_shard(tmp_path / "d") == [[c] * 10 for c in range(4)]


def test_parallel_writers_write_the_same_shards(tmp_path):
    src = write_image_folder(tmp_path / "imgs", classes=3, per_class=7, size=8)
    one = make_shards(src, tmp_path / "one", shard_size=4, verbose=False)
    two = make_shards(src, tmp_path / "two", shard_size=4, verbose=False, workers=2)
    assert one["shards"] == two["shards"] and _members(tmp_path / "one") == _members(tmp_path / "two")


def test_a_used_output_folder_is_refused_unless_overwrite_clears_it(tmp_path):
    write_image_folder(tmp_path / "big", classes=2, per_class=10, size=8)
    write_image_folder(tmp_path / "small", classes=3, per_class=2, size=8)
    make_shards(tmp_path / "big", tmp_path / "out", shard_size=4, verbose=False)  # 5 shards
    proc = run_cli("make-shards", str(tmp_path / "small"), str(tmp_path / "out"), "--shard-size", "4", check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "--overwrite" in proc.stderr, proc.stderr
    assert len(list((tmp_path / "out").glob("*.tar"))) == 5  # nothing touched
    make_shards(tmp_path / "small", tmp_path / "out", shard_size=4, overwrite=True, verbose=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "classes.json", "index.json", "shard-000000.tar", "shard-000001.tar"]  # no stale shard of the first set
    assert json.loads((tmp_path / "out" / "index.json").read_text())["total"] == 6
    with pytest.raises(ValueError, match="would delete the source"):
        make_shards(tmp_path / "big", tmp_path, overwrite=True, verbose=False)  # the source lies inside


def _png16(path, value):
    Image.fromarray(np.full((8, 8), value, np.uint16)).save(path)


def test_unreadable_files_are_skipped_and_counted_empty_classes_warned_16_bit_scaled(tmp_path, capsys):
    src = write_image_folder(tmp_path / "imgs", classes=2, per_class=3, size=8)
    (src / "class_0" / "notes.bmp").write_text("not an image")
    (src / "class_0" / "text.jpg").write_text("not a jpeg either")
    (src / "class_1" / "x.jpg").mkdir()
    (src / "class_2").mkdir()  # an empty class folder
    _png16(src / "class_1" / "deep.png", 32768)  # 16-bit grey, half scale
    summary = make_shards(src, tmp_path / "out", shard_size=100, verbose=True)
    err = capsys.readouterr().err
    assert summary["total"] == 7 and summary["skipped"] == 3
    assert {f.split(":")[0].rsplit("/", 1)[1] for f in summary["skipped_files"]} == {"notes.bmp", "text.jpg", "x.jpg"}
    assert "skipped 3 unreadable file(s)" in err
    assert "class folder 'class_2' holds no image" in err and summary["empty_classes"] == ["class_2"]
    assert summary["num_classes"] == 3 and summary["per_class"] == {"0": 3, "1": 4}
    (payload,) = [p for k, ext, p in _members(tmp_path / "out")["shard-000000.tar"]
                  if ext == "png" and Image.open(io.BytesIO(p)).size == (8, 8) and
                  np.asarray(Image.open(io.BytesIO(p)).convert("RGB")).std() == 0]
    img = Image.open(io.BytesIO(payload))
    assert img.mode == "RGB" and np.asarray(img).mean() == pytest.approx(128, abs=1)  # clipping gave 255


def _hf(tmp_path, with_label=True, dict_splits=None):
    import datasets

    imgs = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(6)]
    cols = {"picture": imgs, "target": [0, 1, 2, 0, 1, 2]} if with_label else {"picture": imgs}
    feats = {"picture": datasets.Image()}
    if with_label:
        feats["target"] = datasets.ClassLabel(names=["a", "b", "c"])
    ds = datasets.Dataset.from_dict(cols, features=datasets.Features(feats))
    if dict_splits:
        ds = datasets.DatasetDict({s: ds for s in dict_splits})
    ds.save_to_disk(str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_hf_columns_splits_and_unlabelled_data(tmp_path, capsys):
    src = _hf(tmp_path, dict_splits=["train", "validation"])
    with pytest.raises(ValueError, match=r"no image column.*--image-column"):
        make_shards(src, tmp_path / "o1", verbose=False)
    with pytest.raises(ValueError, match=r"no split 'test'; its splits are \['train', 'validation'\]"):
        make_shards(src, tmp_path / "o2", split="test", image_column="picture", verbose=False)
    s = make_shards(src, tmp_path / "o3", split="validation", image_column="picture", label_column="target",
                    verbose=False)
    assert s["total"] == 6 and s["per_class"] == {"0": 2, "1": 2, "2": 2} and s["labelled"]
    assert json.loads((tmp_path / "o3" / "classes.json").read_text()) == ["a", "b", "c"]

    bare = _hf(tmp_path / "u", with_label=False)
    make_shards(bare, tmp_path / "o4", image_column="picture")
    out = capsys.readouterr().out
    assert "unlabelled" in out and "0 classes" not in out
    index = json.loads((tmp_path / "o4" / "index.json").read_text())
    assert index["labelled"] is False and index["num_classes"] is None and index["total"] == 6
    assert not (tmp_path / "o4" / "classes.json").exists()
    assert all(ext != "cls" for members in _members(tmp_path / "o4").values() for _, ext, _ in members)


def test_commands_that_need_labels_refuse_unlabelled_shards_before_starting(tmp_path):
    import dataclasses

    from mimtrain.config.pretrain import Config
    from mimtrain.engine.monitor import KnnMonitor
    from mimtrain.eval.classify.source import labelled_shards
    from mimtrain.config.classify import finetune_defaults, knn_defaults, linprobe_defaults

    make_shards(_hf(tmp_path, with_label=False), tmp_path / "bare", image_column="picture", verbose=False)
    labelled = tmp_path / "lab"
    make_shards(write_image_folder(tmp_path / "imgs", classes=2, per_class=2, size=8), labelled, verbose=False)
    for defaults in (finetune_defaults, linprobe_defaults, knn_defaults):
        base = defaults()
        for train, val in ((tmp_path / "bare", labelled), (labelled, tmp_path / "bare")):
            cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, train_shards=str(train),
                                                                     val_shards=str(val)))
            with pytest.raises(ValueError, match=r"needs labelled shards, and those in .*bare are unlabelled"):
                labelled_shards(cfg)
    cfg = Config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, knn_every=2), data=dataclasses.replace(
        cfg.data, knn_train_shards=str(tmp_path / "bare"), val_shards=str(labelled)))
    accelerator = type("Acc", (), {"num_processes": 1, "distributed_type": None, "state": None})()
    with pytest.raises(ValueError, match="k-NN monitor.*unlabelled"):
        KnnMonitor(cfg, accelerator)
