"""Every shipped recipe, so that none rots.

1. Every recipe in recipes/*/ loads and builds its full-size model - the pretraining method, the fine-tuning
   classifier, the linear probe, Mask R-CNN or UperNet - on the meta device (shapes only, nothing allocated), with the
   recipe's encoder name, geometry and drop path; the fine-tuning classifiers match the parameter counts the papers
   print, and every evaluation recipe names an encoder that some pretraining recipe produces.
2. The recipe chain runs on CPU with tiny overrides: for each encoder family, its pretraining recipe trains two steps,
   and the fine-tuning, linear-probe, detection and segmentation recipe of that family each train two steps from
   that run. Running every recipe this way would take far too long on 2 cores, so it is one recipe per (task, family)
   pair (the 3x detection recipes are picked where a family has one, since they carry the resize + crop); the other
   recipes of a family differ from it only in the size-bound values that part 1 checks.
   `tests/test_dense.py` also runs every dense recipe's full-size encoder forward on the meta device.
3. The Swin/HiViT 3x resize + crop keeps boxes and masks consistent with the image.

The whole file costs about 165 s of CPU time (measured: 150 tests, 161 s user + 4 s sys): about a quarter for the
meta-device builds, the rest for the tiny runs.
"""
import functools
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mimtrain.encoders  # noqa: F401  (registers the encoders)
from helpers import REPO, make_test_shards
from mimtrain.config.pretrain import load_config
from mimtrain.encoders import build_encoder
from mimtrain.data.coco import CocoInstances, ResizeCrop
from mimtrain.config.classify import load_eval_config
from mimtrain.eval.dense.backbone import DenseBackbone
from mimtrain.config.dense import load_dense_config
from mimtrain.eval.dense.detection import build_detector, canvas_size
from mimtrain.eval.classify.linprobe import ProbeHead
from mimtrain.eval.dense.segmentation import Segmentor
from mimtrain.methods import build_pretraining
from test_dense import write_ade, write_coco

RECIPES = sorted((REPO / "recipes").glob("*/*.yaml"))
KINDS = ("pretrain", "finetune", "linprobe", "detect", "segment")

# Recipes that leave encoder.name empty load whatever their checkpoint holds; this is the pretraining recipe each
# one's header names as its source (the meta build uses its encoder).
SOURCE = {
    "finetune/mae_vit_base": "mae_vit_base", "finetune/simmim_swin_base": "simmim_swin_base_192",
    "finetune/tiny_cpu": "mae_vit_tiny_cpu", "linprobe/mae_vit_base": "mae_vit_base",
    "linprobe/tiny_cpu": "mae_vit_tiny_cpu", "linprobe/demo_digits_cpu": "mae_vit_tiny_cpu",
    "detect/swin_base": "simmim_swin_base_192", "detect/tiny_cpu": "mae_vit_tiny_cpu",
    "segment/swin_base": "simmim_swin_base_192", "segment/tiny_cpu": "mae_vit_tiny_cpu",
}

# Parameters (M, 1000-class head) the papers print for each size: HiViT Table 7, GPViT Table 2, GC ViT Table 2,
# DGT Table 1/2, GLNet Table 3 / docs. A fine-tuning recipe that names the wrong size fails here.
PAPER_PARAMS = {
    "hivit_tiny": 19.2, "hivit_small": 37.5, "hivit_base": 66.4, "hivit_large": 266.8,
    "gpvit_l1": 9.3, "gpvit_l2": 23.8, "gpvit_l3": 36.2, "gpvit_l4": 75.4,
    "simmim_gcvit_xxtiny": 12, "simmim_gcvit_xtiny": 20, "simmim_gcvit_tiny": 28, "simmim_gcvit_small": 51,
    "simmim_gcvit_base": 90, "dgt_tiny": 24, "dgt_small": 51.76, "dgt_base": 90.28,
    "glnet_stl": 30.3, "glnet_4g": 27.0, "glnet_9g": 61, "glnet_16g": 106,
}


def _id(p: Path) -> str:
    return f"{p.parent.name}/{p.stem}"


def load(recipe: Path, overrides: list[str] = ()):
    """The recipe's typed config (defaults <- recipe <- overrides); plain loads are cached (they are read often)."""
    return _load(recipe, tuple(overrides)) if overrides else _load_cached(recipe)


@functools.lru_cache(maxsize=None)
def _load_cached(recipe: Path):
    return _load(recipe, ())


def _load(recipe: Path, overrides: tuple):
    kind = recipe.parent.name
    if kind == "pretrain":
        return load_config(str(recipe), list(overrides))
    if kind in ("finetune", "linprobe"):
        return load_eval_config(kind, str(recipe), list(overrides))
    return load_dense_config(kind, str(recipe), list(overrides))


def pretraining_of(recipe: Path):
    """The config of the pretraining recipe whose checkpoint `recipe` starts from (itself for a pretraining recipe)."""
    if recipe.parent.name == "pretrain":
        return load(recipe)
    name = load(recipe).encoder.name
    if not name:
        return load(REPO / "recipes" / "pretrain" / f"{SOURCE[_id(recipe)]}.yaml")
    sources = [cfg for cfg in map(load, sorted((REPO / "recipes" / "pretrain").glob("*.yaml")))
               if cfg.encoder.name == name]
    assert sources, f"no pretraining recipe produces the encoder {name} of {_id(recipe)}"
    return sources[0]


def source_encoder(recipe: Path) -> tuple[str, dict]:
    """(name, kwargs) of the encoder the recipe trains: its own, or that of the pretraining recipe it loads."""
    cfg = load(recipe)
    if cfg.encoder.name:
        return cfg.encoder.name, dict(cfg.encoder.kwargs)
    src = pretraining_of(recipe)
    return src.encoder.name, dict(src.encoder.kwargs)


# --------------------------------------------------------------------------------------------- full size, meta device

def test_every_recipe_folder_is_known_and_every_unnamed_recipe_has_a_source():
    assert {p.parent.name for p in RECIPES} == set(KINDS)
    unnamed = {_id(p) for p in RECIPES if not load(p).encoder.name}
    assert unnamed == set(SOURCE), "a recipe without encoder.name needs its pretraining source in SOURCE"


def test_every_evaluation_recipe_starts_from_a_pretraining_recipe():
    pretrained = {load(p).encoder.name for p in RECIPES if p.parent.name == "pretrain"}
    orphans = [_id(p) for p in RECIPES if p.parent.name != "pretrain" and source_encoder(p)[0] not in pretrained]
    assert not orphans, f"no pretraining recipe produces the encoder of {orphans}"
    for p in RECIPES:  # and a pretraining recipe that names it (its name and kwargs are what the checkpoint holds)
        assert pretraining_of(p).encoder.name == source_encoder(p)[0]


def _meta_model(recipe: Path) -> torch.nn.Module:
    """The recipe's full-size model on the meta device (built only: test_dense.py runs the dense encoders forward)."""
    kind, cfg = recipe.parent.name, load(recipe)
    name, kwargs = source_encoder(recipe)
    with torch.device("meta"):
        if kind == "pretrain":
            return build_pretraining(cfg)[0]
        geometry = {**kwargs, **cfg.encoder.geometry}
        # an unset image size follows the pretraining run
        img = getattr(cfg.data, "img_size", None) or pretraining_of(recipe).data.img_size
        if kind == "finetune":
            return build_encoder(name, img, num_classes=1000, drop_path_rate=cfg.encoder.drop_path_rate, **geometry)
        if kind == "linprobe":
            enc = build_encoder(name, img, num_classes=0, **geometry)
            return torch.nn.Sequential(enc, ProbeHead(enc.embed_dim, 1000))
        size = canvas_size(cfg) if kind == "detect" else cfg.data.crop_size
        enc = build_encoder(name, size, num_classes=0, drop_path_rate=cfg.encoder.drop_path_rate, **geometry)
        if kind == "detect":
            return build_detector(enc, 80, cfg, size)
        return Segmentor(DenseBackbone(enc, (size, size)), cfg.data.num_classes, cfg.model)


@pytest.mark.parametrize("recipe", RECIPES, ids=_id)
def test_full_size_model_builds_on_the_meta_device(recipe):
    model = _meta_model(recipe)
    params = sum(p.numel() for p in model.parameters())
    assert params > 0 and all(p.is_meta for p in model.parameters())
    name = source_encoder(recipe)[0]
    if recipe.parent.name == "finetune":
        assert model.num_classes == 1000
        if name in PAPER_PARAMS:  # within 3%: every encoder's count is within 2.2% of its paper (docs/encoders)
            assert params / 1e6 == pytest.approx(PAPER_PARAMS[name], rel=0.03), name


def test_results_doc_names_only_recipes_that_exist():
    text = (REPO / "docs" / "results.md").read_text()
    named = set(re.findall(r"recipes/[a-z]+/[\w.]+\.yaml", text))
    assert named, "docs/results.md names no recipe"
    assert [n for n in sorted(named) if not (REPO / n).is_file()] == []
    # every recipe of the five seed backbones is listed there, beside its paper's numbers
    seeds = ("hivit", "gpvit", "gcvit", "dgt", "glnet")
    missing = [_id(p) for p in RECIPES if source_encoder(p)[0].removeprefix("simmim_").startswith(seeds)
               and f"recipes/{_id(p)}.yaml" not in named]
    assert missing == [], f"recipes missing from docs/results.md: {missing}"


# ------------------------------------------------------------------------------------------------ tiny runs on CPU

# family -> (pretraining recipe, tiny architecture kwargs: the complete mapping, so it works whether overrides
# replace or merge into the recipe's kwargs)
FAMILIES = {
    "vit": ("mae_vit_base", {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}),
    "hivit": ("mae_hivit_base", {"dims": [16, 32, 64], "depths": [1, 1, 2], "num_heads": 2}),
    "swin": ("simmim_swin_base_192", {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4],
                                      "window_size": 2}),
    "gcvit": ("simmim_gcvit_tiny", {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}),
    "gpvit": ("simmim_gpvit_l1", {"embed_dim": 24, "depth": 2, "num_heads": 4, "gp_positions": [1],
                                  "group_nums": [8], "group_heads": 2, "stem_chs": 8}),
    "dgt": ("simmim_dgt_tiny", {"stem_dim": 8, "dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1],
                                "num_heads": [1, 2, 2, 4], "num_groups": 4, "topk": 8, "head_hidden": 32}),
    "glnet": ("simmim_glnet_4g", {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 4],
                                  "num_slots": 16}),
}
EVAL_RECIPES = {  # (task, family) -> the recipe run from that family's tiny pretraining
    "finetune": {"vit": "mae_vit_base", "hivit": "hivit_base", "swin": "simmim_swin_base", "gcvit": "gcvit_tiny",
                 "gpvit": "gpvit_l1", "dgt": "dgt_tiny", "glnet": "glnet_4g"},
    "linprobe": {"vit": "mae_vit_base", "hivit": "hivit_base", "gcvit": "gcvit_tiny", "gpvit": "gpvit_l1",
                 "dgt": "dgt_tiny", "glnet": "glnet_4g"},
    "detect": {"vit": "vit_base", "hivit": "hivit_base_3x", "swin": "swin_base", "gcvit": "gcvit_tiny",
               "gpvit": "gpvit_l1_3x", "dgt": "dgt_tiny", "glnet": "glnet_4g_3x"},
    "segment": {"vit": "vit_base", "hivit": "hivit_base", "swin": "swin_base", "gcvit": "gcvit_tiny",
                "gpvit": "gpvit_l1", "dgt": "dgt_tiny", "glnet": "glnet_4g"},
}
IMG = 64  # pretraining / classification input: 4 x 4 mask cells of 16 px
TINY_SWIN_GEOMETRY = "encoder.geometry={window_size: 2}"  # the recipes' window 7 does not fit 64-px maps


def test_tiny_run_table_covers_every_family_and_only_real_recipes():
    pretrain_families = {load(REPO / "recipes" / "pretrain" / f"{r}.yaml").encoder.name for r, _ in FAMILIES.values()}
    assert len(pretrain_families) == len(FAMILIES)
    for task, table in EVAL_RECIPES.items():
        assert set(table) <= set(FAMILIES)
        for family, name in table.items():  # each loads the checkpoint of its family's pretraining recipe
            want = load(REPO / "recipes" / "pretrain" / f"{FAMILIES[family][0]}.yaml").encoder.name
            assert load(REPO / "recipes" / task / f"{name}.yaml").encoder.name in ("", want), (task, name)
    # every family with a linear-probe recipe is run (Swin has none: SimMIM reports no Swin linear probe)
    assert {f for f in FAMILIES if f != "swin"} == set(EVAL_RECIPES["linprobe"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    shards = {s: make_test_shards(root / s, classes=3, per_class=4, shard_size=6) for s in ("train", "val")}
    write_coco(root / "coco", "train2017", 2, seed=0)
    write_coco(root / "coco", "val2017", 1, seed=1)
    write_ade(root / "ade", n_train=2, n_val=1)
    return {"root": root, **shards}


class Pretrained(dict):
    """family -> run directory of its pretraining recipe, trained two steps at 64 px with the tiny architecture the
    first time a test asks for it."""

    def __init__(self, world):
        super().__init__()
        self.world = world

    def __missing__(self, family: str) -> Path:
        from mimtrain.engine.trainer import pretrain

        recipe, kwargs = FAMILIES[family]
        path = REPO / "recipes" / "pretrain" / f"{recipe}.yaml"
        tiny = [f"encoder.kwargs={json.dumps(kwargs)}", "encoder.mask_unit=16", f"data.img_size={IMG}",
                f"data.train_shards={self.world['train']}", f"output_dir={self.world['root'] / ('pre_' + family)}",
                "data.num_workers=0", "data.shuffle_buffer=8", "train.batch_size=4", "train.max_steps=2",
                "train.log_every=1", "train.image_every=0", "train.progress=false"]
        if load(path).method.name == "mae":
            tiny += ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]
        summary = pretrain(load(path, tiny))
        assert summary["step"] == 2 and len(summary["losses"]) == 2, (family, summary)
        assert all(torch.isfinite(torch.tensor(summary["losses"]))), (family, summary["losses"])
        self[family] = Path(summary["output_dir"])
        return self[family]


@pytest.fixture(scope="module")
def pretrained(world):
    return Pretrained(world)


def _tiny_eval(task: str, world, out: Path, family: str) -> list[str]:
    common = [f"output_dir={out}", "train.max_steps=2", "train.log_every=1", "train.progress=false",
              "data.num_workers=0"] + ([TINY_SWIN_GEOMETRY] if family == "swin" else [])
    if task in ("finetune", "linprobe"):
        return common + [f"data.train_shards={world['train']}", f"data.val_shards={world['val']}",
                         f"data.img_size={IMG}", "data.crop_pct=1.0", "data.shuffle_buffer=8", "train.batch_size=4",
                         "train.eval_batch_size=16"]
    if task == "detect":  # recipes/detect/tiny_cpu.yaml's sizes, on a 64-px canvas
        return common + [f"data.root={world['root'] / 'coco'}", "data.min_size=[48, 64]", "data.max_size=64",
                         "model.fpn_channels=32", "model.representation_size=64", "model.mask_channels=16",
                         "model.rpn_batch_size_per_image=64", "model.box_batch_size_per_image=64",
                         "optim.warmup_iters=2", "train.batch_size=2", "train.eval_batch_size=2"]
    return common + [f"data.root={world['root'] / 'ade'}", "data.crop_size=64", "data.scale=[128, 64]",  # segment
                     "data.slide_stride=43", "model.channels=32", "model.aux_channels=16", "optim.warmup_iters=2",
                     "train.batch_size=2", "train.eval_every=0", "train.eval_batch_size=4"]


def _run_task(task: str, cfg, source: str) -> dict:
    if task == "finetune":
        from mimtrain.eval.classify.finetune import finetune
        return finetune(cfg, source)
    if task == "linprobe":
        from mimtrain.eval.classify.linprobe import linprobe
        return linprobe(cfg, source)
    if task == "detect":
        from mimtrain.eval.dense.detection import detect
        return detect(cfg, source)
    from mimtrain.eval.dense.segmentation import segment
    return segment(cfg, source)


TINY_RUNS = [(task, family) for task, table in EVAL_RECIPES.items() for family in table]


@pytest.mark.parametrize("task,family", TINY_RUNS, ids=[f"{t}-{f}" for t, f in TINY_RUNS])
def test_tiny_recipe_trains_two_steps_from_its_family_pretraining(world, pretrained, task, family):
    recipe = REPO / "recipes" / task / f"{EVAL_RECIPES[task][family]}.yaml"
    out = world["root"] / f"{task}_{family}"
    cfg = load(recipe, _tiny_eval(task, world, out, family))
    res = _run_task(task, cfg, str(pretrained[family]))
    assert res["step"] == 2, res
    saved = json.loads((out / "results.json").read_text())
    metric = {"finetune": "top1", "linprobe": "top1", "detect": "box_ap", "segment": "mIoU"}[task]
    assert metric in saved and saved["encoder"] == load(REPO / "recipes" / "pretrain" /
                                                        f"{FAMILIES[family][0]}.yaml").encoder.name
    losses = [x["loss"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_pretraining_recipe_trains_two_steps_and_writes_a_checkpoint(pretrained, family):
    run = pretrained[family]
    ptr = (run / "checkpoints" / "latest").read_text().strip()
    assert any(k.startswith("encoder.") for k in load_file(str(run / "checkpoints" / ptr / "model.safetensors")))


# ---------------------------------------------------------------------------------- the 3x resize + crop augmentation

def _mask_box(mask: torch.Tensor) -> list[float]:
    ys, xs = mask.nonzero(as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_resize_crop_keeps_boxes_masks_and_image_together(tmp_path):
    """Rectangle objects: after the resize + crop every box must still be the bounding box of its mask (computed
    here from the mask pixels, independently of the box arithmetic), inside the image, and the window must have the
    drawn size; objects cut away disappear from boxes, labels and masks alike."""
    write_coco(tmp_path / "coco", "train2017", 4, seed=3)
    plain = CocoInstances(tmp_path / "coco", "train2017", train=True, hflip=False)
    crop = ResizeCrop(1.0, (400, 500, 600), (384, 600), 1333)
    data = CocoInstances(tmp_path / "coco", "train2017", train=True, hflip=False, crop=crop)
    torch.manual_seed(0)
    seen_sizes, dropped = set(), 0
    for _ in range(6):
        for i in range(len(data)):
            img, t = data[i]
            H, W = img.shape[-2:]
            short = min(plain[i][0].shape[-2:])
            assert 384 <= H <= 600 and 384 <= W <= 600, (H, W)  # a window of the 400-600-px resized image
            assert t["masks"].shape == (len(t["boxes"]), H, W) and len(t["labels"]) == len(t["boxes"])
            assert ((t["boxes"][:, 0::2] >= 0) & (t["boxes"][:, 0::2] <= W)).all()
            assert ((t["boxes"][:, 1::2] >= 0) & (t["boxes"][:, 1::2] <= H)).all()
            for box, mask in zip(t["boxes"].tolist(), t["masks"]):
                assert box == pytest.approx(_mask_box(mask), abs=1.0 + 600 / short)  # nearest-resize rounding
            dropped += 2 - len(t["boxes"])
            seen_sizes.add((H, W))
    assert len(seen_sizes) > 3  # the window size is drawn, not fixed
    assert dropped > 0  # some crops cut objects away (each image holds 2)
    # probability 0: the dataset is untouched
    off = CocoInstances(tmp_path / "coco", "train2017", train=True, hflip=False,
                        crop=ResizeCrop(0.0, (400,), (384, 600)))
    img, t = off[0]
    assert torch.equal(img, plain[0][0]) and torch.equal(t["boxes"], plain[0][1]["boxes"])
    with pytest.raises(ValueError, match="crop size range"):
        ResizeCrop(0.5, (400,), (600, 384))


def test_3x_recipes_of_swin_and_hivit_use_the_resize_crop():
    for name in ("swin_base", "hivit_base_3x", "gpvit_l1_3x", "gcvit_tiny"):
        assert load(REPO / "recipes" / "detect" / f"{name}.yaml").data.crop_prob == 0.5, name
    assert load(REPO / "recipes" / "detect" / "hivit_base.yaml").data.crop_prob == 0.0  # 1x: multi-scale only
