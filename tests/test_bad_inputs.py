"""Issue 28: every user mistake, in every command, ends in one line naming the key, file or folder, with a non-zero
exit (2: bad input or output location; 3: an unusable checkpoint, export or weights file), no traceback, and nothing
written to the output location. Most rows are refused when the config is loaded, before any data is read or model
built; all run in-process on shared tiny fixtures.

Before this issue (measured on the old main) several of these produced a number with exit 0 (knn.k=0: 33%,
finetune.ema_decay=2, finetune.layer_decay=-1, optim.lr=-0.1 silently replaced, val classes scored by index), and
others ended in a traceback (ZeroDivisionError, AssertionError, SafetensorError, KeyError, IndexError)."""
from __future__ import annotations

import io
import json
import os
import shutil
import string
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, write_image_folder, write_tiny_vit_checkpoint
from mimtrain import cli
from mimtrain.data.shards import make_shards

TINY_PRETRAIN = REPO / "recipes/pretrain/mae_vit_tiny_cpu.yaml"


def _labelled_shards(root, names: list[str], per_class: int = 4):
    """Shards (make-shards) of an ImageFolder tree whose class folders are `names`."""
    src = write_image_folder(root / "src", classes=len(names), per_class=per_class, size=32)
    for i, name in enumerate(names):
        (src / f"class_{i}").rename(src / f"tmp_{name}")
    for name in names:
        (src / f"tmp_{name}").rename(src / name)
    make_shards(src, root / "shards", shard_size=6, verbose=False)
    return root / "shards"


def _tar(path, members: dict[str, bytes]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _coco(root, n_train: int, n_val: int):
    """A COCO folder: n images per split, one 'square' (category 1) each."""
    (root / "annotations").mkdir(parents=True)
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(n):
            Image.fromarray(np.full((64, 96, 3), 120, np.uint8)).save(root / split / f"{i:012d}.jpg")
            images.append({"id": i + 1, "file_name": f"{i:012d}.jpg", "width": 96, "height": 64})
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [8, 8, 20, 20], "area": 400,
                         "iscrowd": 0, "segmentation": [[8, 8, 28, 8, 28, 28, 8, 28]]})
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "square"}]}))
    return root


def _ade(root, n_train: int, n_val: int):
    base = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((64, 96, 3), 100, np.uint8)).save(base / "images" / split / f"ADE_{i}.jpg")
            Image.fromarray(np.ones((64, 96), np.uint8), mode="L").save(base / "annotations" / split / f"ADE_{i}.png")
    return root


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, str]:
    """Every input the table refers to, as `$name` in its argument templates."""
    root = tmp_path_factory.mktemp("bad_inputs")
    train = _labelled_shards(root / "train", ["cat", "dog", "fox"])
    val = _labelled_shards(root / "val", ["cat", "dog", "fox"], per_class=2)
    foreign = _labelled_shards(root / "foreign", ["cat", "owl"], per_class=2)
    reordered = root / "reordered"
    shutil.copytree(val, reordered)
    (reordered / "classes.json").write_text(json.dumps(["dog", "cat", "fox"]))  # same classes, other numbering
    unlabelled = root / "unlabelled"
    _tar(unlabelled / "shard-000000.tar", {f"{i:06d}.jpg": _jpeg(i) for i in range(4)})  # no .cls, no index
    zero = root / "zero"
    _tar(zero / "shard-000000.tar", {})  # a shard with no samples
    empty = root / "empty"
    empty.mkdir()
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "shard-000000.tar").write_bytes(b"not a tar file at all" * 40)

    ckpt = write_tiny_vit_checkpoint(root / "ckpt")
    from mimtrain.checkpoint.export import export

    exported = export(ckpt, root / "export")
    truncated = root / "truncated"
    shutil.copytree(exported, truncated)
    weights = truncated / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    foreign_export = root / "foreign_export"
    shutil.copytree(exported, foreign_export)
    (foreign_export / "config.yaml").write_text("model: resnet50\n")
    junk_pth = root / "junk.pth"
    junk_pth.write_bytes(b"\x80\x02 this is not a torch file" * 20)
    junk_st = root / "junk.safetensors"
    junk_st.write_bytes(b"\xff" * 64)
    a_file = root / "a_file.txt"
    a_file.write_text("a file, not a folder\n")
    no_images = root / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "dog").mkdir()
    full = root / "full"  # a non-empty make-shards output
    full.mkdir()
    (full / "keep.txt").write_text("mine\n")
    recipe = root / "bad_recipe.yaml"
    recipe.write_text("train:\n  batch_size: [1, 2\n")
    return {k: str(v) for k, v in {
        "root": root, "train": train, "val": val, "foreign": foreign, "reordered": reordered,
        "unlabelled": unlabelled, "zero": zero, "empty": empty, "corrupt": corrupt, "ckpt": ckpt,
        "export": exported, "truncated": truncated, "foreign_export": foreign_export, "junk_pth": junk_pth,
        "junk_st": junk_st, "a_file": a_file, "missing": root / "does_not_exist", "no_images": no_images,
        "full": full, "src": root / "train" / "src", "recipe": recipe,
        "coco": _coco(root / "coco", 2, 1), "coco_noval": _coco(root / "coco_noval", 2, 0),
        "ade": _ade(root / "ade", 2, 1), "ade_noval": _ade(root / "ade_noval", 2, 0),
        "tiny": TINY_PRETRAIN, "ft": REPO / "recipes/finetune/tiny_cpu.yaml",
        "lp": REPO / "recipes/linprobe/tiny_cpu.yaml", "det": REPO / "recipes/detect/tiny_cpu.yaml",
        "seg": REPO / "recipes/segment/tiny_cpu.yaml"}.items()}


# Argument templates per command: `$out` is the output location the row must leave untouched.
BASE = {
    "pretrain": "pretrain --recipe $tiny data.train_shards=$train output_dir=$out data.num_workers=0",
    "finetune": "finetune --recipe $ft --from $export data.train_shards=$train data.val_shards=$val output_dir=$out",
    "linprobe": "linprobe --recipe $lp --from $export data.train_shards=$train data.val_shards=$val output_dir=$out "
                "data.num_workers=0",
    "knn": "knn --from $export data.train_shards=$train data.val_shards=$val output_dir=$out data.num_workers=0",
    "detect": "detect --recipe $det --from $export data.root=$coco output_dir=$out",
    "segment": "segment --recipe $seg --from $export data.root=$ade output_dir=$out",
}

# (command, extra arguments (a trailing `!` replaces the base), exit status, what the one line must name)
ROWS = [
    # -- pretrain: declared ranges, refused when the config loads
    ("pretrain", "optim.lr=-0.1", 2, "optim.lr must be >= 0, got -0.1"),
    ("pretrain", "optim.lr_base_batch=0", 2, "optim.lr_base_batch must be > 0"),
    ("pretrain", "optim.min_lr=-1", 2, "optim.min_lr must be >= 0"),
    ("pretrain", "optim.blr=0", 2, "optim.blr must be > 0"),
    ("pretrain", "optim.betas=[0.9,1.5]", 2, "optim.betas must be 2 values, each in [0, 1)"),
    ("pretrain", "optim.weight_decay=-0.05", 2, "optim.weight_decay must be >= 0"),
    ("pretrain", "optim.warmup_epochs=-1", 2, "optim.warmup_epochs must be >= 0"),
    ("pretrain", "optim.clip_grad=-1", 2, "optim.clip_grad must be >= 0"),
    ("pretrain", "optim.blr=.nan", 2, "optim.blr must be > 0, got nan"),
    ("pretrain", "data.std=[0.2,0,0.2]", 2, "data.std must be 3 values, each > 0, got [0.2, 0.0, 0.2]"),
    ("pretrain", "data.mean=[2,0,0]", 2, "data.mean must be 3 values, each in [0, 1]"),
    ("pretrain", "data.img_size=0", 2, "data.img_size must be > 0"),
    ("pretrain", "data.crop_scale=[0,1]", 2, "data.crop_scale must be [lo, hi] with lo <= hi, each in (0, 1]"),
    ("pretrain", "data.shuffle_buffer=-1", 2, "data.shuffle_buffer must be >= 0"),
    ("pretrain", "data.num_workers=-1", 2, "data.num_workers must be >= 0"),
    ("pretrain", "data.samples_per_epoch=-10", 2, "data.samples_per_epoch must be >= 0"),
    ("pretrain", "mask.ratio=0", 2, "mask.ratio must be in (0, 1), got 0"),
    ("pretrain", "mask.min_block=0", 2, "mask.min_block must be >= 1"),
    ("pretrain", "mask.max_aspect=0.5", 2, "mask.max_aspect must be >= 1"),
    ("pretrain", "method.decoder_depth=0", 2, "method.decoder_depth must be >= 1"),
    ("pretrain", "method.decoder_dim=-8", 2, "method.decoder_dim must be > 0"),
    ("pretrain", "encoder.drop_path_rate=1.5", 2, "encoder.drop_path_rate must be in [0, 1)"),
    ("pretrain", "encoder.mask_unit=0", 2, "encoder.mask_unit must be > 0"),
    ("pretrain", "train.epochs=0", 2, "train.epochs must be > 0"),
    ("pretrain", "train.batch_size=0", 2, "train.batch_size must be > 0"),
    ("pretrain", "train.grad_accum=0", 2, "train.grad_accum must be > 0"),
    ("pretrain", "train.max_steps=-1", 2, "train.max_steps must be >= 0"),
    ("pretrain", "train.keep_last=-1", 2, "train.keep_last must be >= 0"),
    ("pretrain", "train.dist_timeout_s=-5", 2, "train.dist_timeout_s must be >= 0"),
    ("pretrain", "seed=-1", 2, "seed must be in [0, 4294967295], got -1"),
    # -- pretrain: schema, recipes, data and output location
    ("pretrain", "train.max_step=3", 2, "unknown config key 'train.max_step'; did you mean 'train.max_steps'"),
    ("pretrain", "train.batch_size=abc", 2, "train.batch_size: expected int"),
    ("pretrain", "pretrain --recipe $missing.yaml!", 2, "recipe not found: $missing.yaml"),
    ("pretrain", "pretrain --recipe $recipe!", 2, "bad_recipe.yaml: not valid YAML"),
    ("pretrain", "data.train_shards=$missing", 2, "data.train_shards: 1 shard(s) not found"),
    ("pretrain", "data.train_shards=$empty", 2, "data.train_shards: folder $empty holds no shards"),
    ("pretrain", "output_dir=$a_file/run", 2, "output_dir $a_file/run cannot be created: $a_file is a file"),
    ("pretrain", "output_dir=$a_file", 2, "output_dir $a_file is a file, not a folder"),
    # -- pretrain: encoder kwargs that cannot build (a tiny model is built, nothing is trained)
    ("pretrain", "encoder.kwargs.depth=-1", 2, "error: encoder.kwargs.depth=-1: mim_vit_tiny_patch16 cannot be built"),
    ("pretrain", "encoder.kwargs={embed_dim: 30, num_heads: 4}", 2,
     "encoder.kwargs.num_heads=4: mim_vit_tiny_patch16 cannot be built with it (dim should be divisible by num_heads)"),
    ("pretrain", "encoder.kwargs.bogus=1", 2, "encoder.kwargs: mim_vit_tiny_patch16 has no argument 'bogus'"),
    ("pretrain", "encoder.name=mim_nope", 2, "encoder.name: unknown encoder 'mim_nope'"),

    # -- finetune
    ("finetune", "finetune.ema_decay=2", 2, "finetune.ema_decay must be in [0, 1), got 2"),
    ("finetune", "finetune.layer_decay=-1", 2, "finetune.layer_decay must be in (0, 1], got -1"),
    ("finetune", "finetune.auto_augment=junk", 2, "finetune.auto_augment='junk' is not a timm augmentation"),
    ("finetune", "data.crop_pct=0", 2, "data.crop_pct must be in (0, 1], got 0"),
    ("finetune", "finetune.re_prob=1.5", 2, "finetune.re_prob must be in [0, 1]"),
    ("finetune", "finetune.smoothing=1", 2, "finetune.smoothing must be in [0, 1)"),
    ("finetune", "finetune.mixup=-1", 2, "finetune.mixup must be >= 0"),
    ("finetune", "train.batch_size=3", 2, "train.batch_size=3 must be even"),
    ("finetune", "data.img_size=-32", 2, "data.img_size must be > 0"),
    ("finetune", "train.eval_batch_size=0", 2, "train.eval_batch_size must be > 0"),
    ("finetune", "train.eval_every=-1", 2, "train.eval_every must be >= 0"),
    ("finetune", "encoder.drop_path_rate=-0.1", 2, "encoder.drop_path_rate must be in [0, 1)"),
    ("finetune", "data.val_shards=$foreign", 2, "data.val_shards has classes the training shards lack: ['owl']"),
    ("finetune", "data.val_shards=$reordered", 2, "number their classes in different orders ('cat' vs 'dog'"),
    ("finetune", "data.val_shards=$unlabelled", 2, "data.val_shards needs labelled shards, and $unlabelled/shard"),
    ("finetune", "data.train_shards=$unlabelled", 2, "data.train_shards needs labelled shards"),
    ("finetune", "data.val_shards=$empty", 2, "data.val_shards: folder $empty holds no shards"),
    ("finetune", "data.val_shards=$zero", 2, "data.val_shards: the 1 shard(s) in $zero hold no samples"),
    ("finetune", "data.val_shards=$corrupt", 2, "$corrupt/shard-000000.tar is not a readable tar file"),
    ("finetune", "data.val_shards=", 2, "set data.val_shards"),
    ("finetune", "data.num_classes=2", 2, "data.num_classes=2 is below the 3 classes of $train/classes.json"),
    ("finetune", "--from $junk_pth", 3, "$junk_pth is not a weights file mimtrain can read"),
    ("finetune", "--from $truncated", 3, "$truncated/encoder.safetensors is truncated or damaged"),
    ("finetune", "--from $foreign_export", 3, "$foreign_export/config.yaml is not a mimtrain export config"),
    ("finetune", "--from $missing", 2, "checkpoint not found: $missing"),
    ("finetune", "--from $junk_st", 3, "$junk_st is not a readable safetensors file"),
    ("finetune", "output_dir=$a_file/ft", 2, "output_dir $a_file/ft cannot be created"),
    ("finetune", "optim.lr=-0.1", 2, "optim.lr must be >= 0, got -0.1"),

    # -- linprobe
    ("linprobe", "linprobe.momentum=1", 2, "linprobe.momentum must be in [0, 1), got 1"),
    ("linprobe", "data.val_shards=$empty", 2, "data.val_shards: folder $empty holds no shards"),
    ("linprobe", "data.val_shards=$zero", 2, "data.val_shards: the 1 shard(s) in $zero hold no samples"),
    ("linprobe", "data.val_shards=$unlabelled", 2, "data.val_shards needs labelled shards"),
    ("linprobe", "data.val_shards=$foreign", 2, "data.val_shards has classes the training shards lack"),
    ("linprobe", "--from $junk_st", 3, "$junk_st is not a readable safetensors file"),
    ("linprobe", "optim.lr_base_batch=0", 2, "optim.lr_base_batch must be > 0"),
    ("linprobe", "train.epochs=0", 2, "train.epochs must be > 0"),
    ("linprobe", "data.std=[0.2,0.2,0]", 2, "data.std must be 3 values, each > 0"),

    # -- knn
    ("knn", "knn.k=0", 2, "knn.k must be >= 1, got 0"),
    ("knn", "knn.temperature=0", 2, "knn.temperature must be > 0"),
    ("knn", "data.val_shards=$empty", 2, "data.val_shards: folder $empty holds no shards"),
    ("knn", "data.val_shards=$zero", 2, "data.val_shards: the 1 shard(s) in $zero hold no samples"),
    ("knn", "data.train_shards=$unlabelled", 2, "data.train_shards needs labelled shards"),
    ("knn", "data.val_shards=$reordered", 2, "number their classes in different orders"),
    ("knn", "--from $truncated", 3, "$truncated/encoder.safetensors is truncated or damaged"),
    ("knn", "data.num_classes=1", 2, "data.num_classes=1 is below the 3 classes"),

    # -- detect
    ("detect", "data.root=", 2, "set data.root to the COCO folder"),
    ("detect", "data.root=$missing", 2, "COCO annotation file not found: $missing/annotations"),
    ("detect", "data.root=$coco_noval", 2, "$coco_noval/annotations/instances_val2017.json: no images"),
    ("detect", "data.crop_prob=2", 2, "data.crop_prob must be in [0, 1], got 2"),
    ("detect", "model.fpn_channels=0", 2, "model.fpn_channels must be > 0"),
    ("detect", "optim.layer_decay=0", 2, "optim.layer_decay must be in (0, 1]"),
    ("detect", "data.min_size=[800,400]", 2, "data.min_size must be [lo, hi] with lo <= hi"),
    ("detect", "optim.lr=0", 2, "optim.lr must be > 0, got 0"),
    ("detect", "train.lr_steps=[11,8]", 2, "train.lr_steps must be [lo, hi] with lo <= hi"),
    ("detect", "--from $junk_pth", 3, "$junk_pth is not a weights file mimtrain can read"),

    # -- segment
    ("segment", "data.root=$missing", 2, "ADE20K not found at $missing"),
    ("segment", "data.root=$ade_noval", 2, "no .jpg images in $ade_noval/ADEChallengeData2016/images/validation"),
    ("segment", "data.num_classes=0", 2, "data.num_classes must be >= 1"),
    ("segment", "data.cat_max_ratio=2", 2, "data.cat_max_ratio must be in (0, 1]"),
    ("segment", "model.dropout=1", 2, "model.dropout must be in [0, 1)"),
    ("segment", "data.crop_size=48", 2, "data.crop_size must be a multiple of 32"),
    ("segment", "train.iters=0", 2, "train.iters must be > 0"),
    ("segment", "optim.warmup_ratio=0", 2, "optim.warmup_ratio must be in (0, 1]"),
    ("segment", "--from $truncated", 3, "$truncated/encoder.safetensors is truncated or damaged"),

    # -- export, make-shards, bench (no base: the whole command line is given)
    ("export", "export $truncated $out!", 3, "$truncated/encoder.safetensors is truncated or damaged"),
    ("export", "export $junk_pth $out!", 3, "$junk_pth is not a weights file mimtrain can read"),
    ("export", "export $foreign_export $out!", 3, "$foreign_export/config.yaml is not a mimtrain export config"),
    ("export", "export $missing $out!", 2, "checkpoint not found: $missing"),
    ("export", "export $export $a_file/out!", 2, "OUT_DIR $a_file/out cannot be created: $a_file is a file"),
    ("make-shards", "make-shards $missing $out!", 2, "source not found"),
    ("make-shards", "make-shards $no_images $out!", 2, "$no_images: no images found"),
    ("make-shards", "make-shards $src $full!", 2, "$full is not empty"),
    ("make-shards", "make-shards $src $a_file!", 2, "OUT_DIR $a_file is a file, not a folder"),
    ("bench", "bench --steps 0 --recipe $tiny!", 2, "--steps and --repeat must be >= 1"),
    ("bench", "bench --recipe $missing.yaml!", 2, "recipe not found"),
    ("bench", "bench --recipe $tiny train.batch_size=0!", 2, "train.batch_size must be > 0"),
]


def _argv(command: str, extra: str, fx: dict, out: str) -> list[str]:
    """The row's command line, `$name` filled from the fixtures (arguments split on spaces outside braces)."""
    whole = extra.endswith("!")
    text = extra[:-1] if whole else f"{BASE[command]} {extra}"
    parts, depth, word = [], 0, ""
    for ch in text:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == " " and depth == 0:
            parts.append(word)
            word = ""
        else:
            word += ch
    parts.append(word)
    if not whole and extra.startswith("--"):  # a --flag row: its value replaces the base's
        flag, value = extra.split(" ", 1)
        i = parts.index(flag)
        parts[i + 1] = value
        parts = parts[:-2]
    return [string.Template(p).substitute(fx, out=out) for p in parts if p]


def test_the_table_covers_every_command_with_60_rows_or_more():
    per = Counter(row[0] for row in ROWS)
    assert len(ROWS) >= 60 and set(per) == {*BASE, "export", "make-shards", "bench"}, per


def _snapshot(path) -> dict | None:
    """What is at `path` (file bytes, or each file's size under a folder); None when nothing is."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    return {os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(path) for f in files}


@pytest.mark.parametrize("command,extra,code,needle", ROWS, ids=[f"{r[0]}:{r[1][:40]}" for r in ROWS])
def test_bad_input_is_one_line_naming_it_and_writes_nothing(command, extra, code, needle, fx, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = _argv(command, extra, fx, out)
    watched = [out, fx["full"], fx["a_file"]]  # the row's output location and the two that exist already
    before = {p: _snapshot(p) for p in watched}
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert e.value.code == code, err
    assert string.Template(needle).substitute(fx) in err, err
    assert err.startswith(f"mimtrain {argv[0]}: error: "), err
    assert {p: _snapshot(p) for p in watched} == before  # no results.json, no run files, nothing half-written


def test_an_internal_error_prints_its_traceback_and_says_it_is_a_bug(monkeypatch, capsys, fx):
    """A bare ValueError from inside a command is no longer taken for bad input: it is a bug, said as one."""
    import mimtrain.config.pretrain as pretrain

    def broken(*args, **kwargs):
        raise ValueError("an index went wrong inside mimtrain")
    monkeypatch.setattr(pretrain, "load_config", broken)
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", f"data.train_shards={fx['train']}"])
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert "Traceback" in err and "ValueError: an index went wrong inside mimtrain" in err
    assert err.strip().splitlines()[-1].startswith("mimtrain pretrain: internal error: ") and "bug" in err


def test_val_subset_is_mapped_by_name_and_extra_classes_warn(fx, tmp_path, capsys):
    """A val set with fewer classes is scored against the training numbering (before: by index, so val's second
    class was compared with train's second), with a line naming what it lacks."""
    from mimtrain.config.classify import load_eval_config
    from mimtrain.data.stream import labelled_pass
    from mimtrain.eval.classify.source import labelled_shards

    subset = _labelled_shards(tmp_path / "subset", ["cat", "fox"], per_class=2)
    cfg = load_eval_config("knn", None, [f"data.train_shards={fx['train']}", f"data.val_shards={subset}",
                                         "data.num_classes=5"])
    train, val, n = labelled_shards(cfg)
    err = capsys.readouterr().err
    assert n == 5 and val.label_map == [0, 2]
    assert "data.val_shards lacks 1 of the 3 training classes (dog)" in err
    assert "warning: data.num_classes=5 is above the 3 classes" in err
    labels = torch.cat([b["label"] for b in labelled_pass(val, lambda im: torch.zeros(1), 8,
                                                          label_map=val.label_map)])
    assert sorted(labels.tolist()) == [0, 0, 2, 2]  # 'fox' is training class 2, not val's 1


def test_an_output_location_without_write_permission_is_refused(monkeypatch, capsys, fx, tmp_path):
    """A read-only folder or filesystem (what os.access reports for a non-root user; root may write anywhere, so the
    permission answer is simulated here) is refused before the run starts."""
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit) as e:
        cli.main(["export", fx["export"], str(tmp_path / "ro" / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert f"OUT_DIR {tmp_path / 'ro' / 'out'} cannot be written: no write permission on {tmp_path}" in err
    assert not (tmp_path / "ro").exists()


def test_a_data_error_raised_in_a_loader_worker_stays_one_line():
    """torch re-raises a worker's exception with the worker's traceback in its message; the CLI keeps only the
    original message."""
    from mimtrain.config.errors import DataError

    e = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                  '  File "x.py", line 1, in f\nmimtrain.config.errors.DataError: stream 0 decoded no image')
    assert cli._one_line(e) == "stream 0 decoded no image"
    assert cli._one_line(DataError("a\n b")) == "a; b"
