"""Dense transfer on CPU: the backbone adapter for every encoder family, COCO Mask R-CNN and ADE20K UperNet runs of a
hierarchical and a plain tiny encoder on tiny datasets written in the real layouts, metric wiring checked with ground
truth as predictions (and a known wrong prediction), schedules, and malformed inputs refused before training."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import mimtrain.encoders  # noqa: F401  (registers the encoders)
from helpers import run_cli
from mimtrain.encoders import build_encoder
from mimtrain.data.ade20k import Ade20kVal, IoUMeter, find_root, list_pairs
from mimtrain.data.coco import CocoInstances, coco_metrics, to_coco_results
from mimtrain.eval.dense.backbone import DenseBackbone
from mimtrain.config.dense import load_dense_config
from mimtrain.encoders.base import classifier_keys
from mimtrain.engine.optim import step_schedule
from mimtrain.eval.dense.encoder import build_dense_encoder, dense_param_groups
from mimtrain.eval.dense.detection import build_detector, canvas_size, detect
from mimtrain.eval.dense.segmentation import evaluate_segmentation, segment, slide_logits

TINY = {  # per family: registered name, architecture kwargs (as the contract suite's tiny cases)
    "vit": ("mim_vit_tiny_patch16", {"embed_dim": 32, "depth": 2, "num_heads": 2}),
    "hivit": ("hivit_tiny", {"dims": [16, 32, 64], "depths": [1, 1, 2], "num_heads": 2}),
    "swin": ("simmim_swin_tiny_patch4_window7",
             {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4], "window_size": 2}),
    "gcvit": ("simmim_gcvit_xxtiny", {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}),
    "gpvit": ("gpvit_l1", {"embed_dim": 24, "depth": 2, "num_heads": 4, "gp_positions": [1], "group_nums": [8],
                           "group_heads": 2, "stem_chs": 8}),
    "dgt": ("dgt_tiny", {"stem_dim": 8, "dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4],
                         "num_groups": 4, "topk": 8, "head_hidden": 32}),
    "glnet": ("glnet_stl", {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 4], "num_slots": 16}),
}
CATS = [{"id": 1, "name": "square"}, {"id": 3, "name": "bar"}]  # sparse ids, as COCO's 1..90 for 80 classes
ADE_IDS = (1, 5, 150)  # label PNG values drawn (0 = ignore): the first, a middle and the last class
ADE_COLOURS = {0: (255, 0, 0), 4: (0, 255, 0), 149: (0, 0, 255)}  # training id -> the colour its region is drawn in


def _export(root, family, img_size=32):
    """A tiny encoder saved as an export directory (encoder.safetensors + config.yaml) at `img_size`."""
    name, kwargs = TINY[family]
    enc = build_encoder(name, img_size, num_classes=0, **kwargs)
    out = root / f"export_{family}"
    out.mkdir()
    save_file(enc.state_dict(), str(out / "encoder.safetensors"))
    spec = {"name": name, "kwargs": kwargs, "img_size": img_size, "mask_unit": enc.mask_unit,
            "mask_mode": enc.mask_mode}
    (out / "config.yaml").write_text(yaml.safe_dump({"encoder": spec}))
    return out


# ---------------------------------------------------------------------------------------------------------- data

def write_coco(root, split, n, seed):
    """n images (96x64 or 64x96 JPEGs) with one 'square' (id 1) and one 'bar' (id 3) each, boxes and polygons."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(n):
        w, h = (96, 64) if i % 2 == 0 else (64, 96)
        img = Image.fromarray(rng.integers(90, 140, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        x, y = int(rng.integers(2, 12)), int(rng.integers(2, 12))
        boxes = [(1, [x, y, 20, 20]), (3, [w - 20, h - 34, 12, 30])]  # (category, [x, y, w, h]), apart
        for cat, (bx, by, bw, bh) in boxes:
            draw.rectangle([bx, by, bx + bw - 1, by + bh - 1], fill=(230, 40, 40) if cat == 1 else (40, 40, 230))
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cat, "bbox": [bx, by, bw, bh],
                         "area": bw * bh, "iscrowd": 0,
                         "segmentation": [[bx, by, bx + bw, by, bx + bw, by + bh, bx, by + bh]]})
        name = f"{100 + i:012d}.jpg"
        img.save(root / split / name, quality=95)
        images.append({"id": 100 + i, "file_name": name, "width": w, "height": h})
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return ann_file


def write_ade(root, n_train=4, n_val=2, seed=0):
    """ADEChallengeData2016 with 96x64 / 64x96 images: label regions of ids 1, 5, 150 on ignore (0), each drawn in a
    pure colour (near-lossless JPEG) so an oracle can read the classes back from the image."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            h, w = (64, 96) if i % 2 == 0 else (96, 64)
            label = np.zeros((h, w), np.uint8)
            img = np.full((h, w, 3), 128, np.uint8)
            for k, raw in enumerate(ADE_IDS):  # blocks of 16 or 24 px along the long side, 8-px aligned, apart
                along, across = 32 * k + 8 * int(rng.integers(0, 2)), 8 * int(rng.integers(0, 3))
                y0, x0 = (across, along) if w > h else (along, across)
                size = 16 + 8 * int(rng.integers(0, 2))
                label[y0:y0 + size, x0:x0 + size] = raw
                img[y0:y0 + size, x0:x0 + size] = ADE_COLOURS[raw - 1]
            stem = f"ADE_{split}_{i:08d}"
            Image.fromarray(img).save(base / "images" / split / f"{stem}.jpg", quality=100, subsampling=0)
            Image.fromarray(label, mode="L").save(base / "annotations" / split / f"{stem}.png")
    return base


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    coco = root / "coco"
    write_coco(coco, "train2017", 4, seed=0)
    write_coco(coco, "val2017", 2, seed=1)
    write_ade(root / "ade")
    exports = {f: _export(root, f, 32) for f in ("vit", "swin", "hivit")}
    return {"root": root, "coco": coco, "ade": root / "ade", **exports}


# ---------------------------------------------------------------------------------------------------------- adapter

@pytest.mark.parametrize("family", sorted(TINY))
def test_adapter_gives_strides_4_to_32_cropped_to_the_input(family):
    name, kwargs = TINY[family]
    backbone = DenseBackbone(build_encoder(name, 96, num_classes=0, **kwargs), (96, 96))
    x = torch.randn(1, 3, 64, 96)  # smaller than the canvas: padded in, cropped out
    feats = backbone(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [f.shape[1] for f in feats] == backbone.out_channels
    kinds = [k for _, k, _ in backbone.plan]
    if family in ("vit", "gpvit"):  # plain: ViTDet simple pyramid (deconvs below the map's stride, pooling above)
        assert "up" in kinds and "down" in kinds
    elif family == "hivit":  # strides 4/8/16 from the encoder, 32 pooled from 16
        assert kinds == ["same", "same", "same", "down"]
    else:
        assert kinds == ["same"] * 4
    sum(f.sum() for f in feats).backward()
    assert all(p.grad is not None for p in backbone.resample.parameters())
    with pytest.raises(ValueError, match="larger than the canvas"):
        backbone(torch.randn(1, 3, 128, 96))


def test_padding_to_the_canvas_leaves_a_full_size_input_unchanged():
    name, kwargs = TINY["swin"]
    enc = build_encoder(name, 64, num_classes=0, **kwargs).eval()
    backbone = DenseBackbone(enc, (64, 64)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = enc.forward_intermediates(x, intermediates_only=True)
        got = backbone(x)
    assert torch.allclose(got[3], backbone.norms[3](want[3]), atol=1e-6)


RECIPES = sorted(p for kind in ("detect", "segment") for p in Path("recipes", kind).glob("*.yaml")
                 if p.stem != "tiny_cpu")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_full_size_recipes_load_and_their_encoders_fit_the_canvas(recipe):
    """Every paper recipe parses, and its full-size encoder runs through the adapter at the full input size (on the
    meta device: shapes only), so window grids, global-query pyramids and position tables fit 1344 / 512 inputs."""
    kind = recipe.parent.name
    cfg = load_dense_config(kind, str(recipe))
    canvas = canvas_size(cfg) if kind == "detect" else cfg.data.crop_size
    name = cfg.encoder.name or "simmim_swin_base_patch4_window6"  # the Swin recipes load either SimMIM Swin-B
    h = 800 if kind == "detect" else canvas  # COCO: 800 x 1333 batched and padded to 800 x 1344
    with torch.device("meta"):
        enc = build_encoder(name, canvas, num_classes=0, drop_path_rate=cfg.encoder.drop_path_rate,
                            **cfg.encoder.geometry)
        feats = DenseBackbone(enc, (canvas, canvas))(torch.empty(1, 3, h, canvas))
    assert [tuple(f.shape[-2:]) for f in feats] == [(h // s, canvas // s) for s in (4, 8, 16, 32)]


# ---------------------------------------------------------------------------------------------------------- schedules

def test_layer_decay_groups_and_schedules(world):
    """Each parameter trains at the scheduled lr x its layer's scale: warm-up from 0.001 x its own lr (MMCV's rule,
    per group), x0.1 at each milestone; the neck and heads at scale 1; frozen parameters in no group."""
    cfg = load_dense_config("detect", "recipes/detect/tiny_cpu.yaml")
    encoder, _ = build_dense_encoder(cfg.encoder, str(world["vit"]), 96)
    model = build_detector(encoder, 2, cfg, 96)
    groups = dense_param_groups(model, encoder, weight_decay=0.05, layer_decay=0.5)
    opt = torch.optim.AdamW(groups, lr=2.0)
    sched = step_schedule(opt, warmup_iters=4, warmup_ratio=0.001, milestones=[10, 15])
    vit = encoder.vit
    scale = {id(vit.patch_embed.proj.weight): 0.5 ** 3,  # stem: layer 0 of 2 blocks + final norm
             id(vit.blocks[1].attn.qkv.weight): 0.5,  # layer 2
             id(vit.norm.weight): 1.0,  # the last layer
             id(model.backbone.fpn.inner_blocks[0][0].weight): 1.0,  # neck and heads: full lr
             id(model.roi_heads.box_predictor.cls_score.weight): 1.0}
    for step, factor in ((0, 0.001), (2, 0.001 + 0.999 * 2 / 4), (4, 1.0), (9, 1.0), (10, 0.1), (14, 0.1),
                         (15, 0.01), (24, 0.01)):
        sched.step_update(step)
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        assert {p: lr_of[p] for p in scale} == pytest.approx({p: 2.0 * factor * s for p, s in scale.items()}), step
    assert id(vit.pos_embed) not in lr_of  # frozen sin-cos table
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted(lr_of) == sorted(trainable)  # every trainable parameter in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd_of[id(model.backbone.fpn.inner_blocks[0][0].bias)] == 0.0 and wd_of[id(vit.blocks[0].mlp.fc1.weight)] > 0
    assert wd_of[id(model.roi_heads.box_predictor.cls_score.weight)] == 0.05 and wd_of[id(vit.norm.weight)] == 0.0


def test_mask_token_and_classifier_are_frozen_and_in_no_group(tmp_path):
    """DGT has a mask token that dense tasks never use; its hidden classifier layer (head_fc) exists only in a
    classifier, so the dense encoder (num_classes=0) does not hold it."""
    encoder, _ = build_dense_encoder(load_dense_config("segment").encoder, str(_export(tmp_path, "dgt", 64)), 64)
    head = classifier_keys(encoder)
    unused = {n for n, _ in encoder.named_parameters() if n == "mask_token" or n.startswith(head)}
    assert unused == {"mask_token"} and not isinstance(encoder.head_fc, torch.nn.Linear)
    names = {id(p): n for n, p in encoder.named_parameters()}
    model = DenseBackbone(encoder, (64, 64))
    grouped = {names.get(id(p)) for g in dense_param_groups(model, encoder, 0.05, 0.9) for p in g["params"]}
    trained = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert not unused & trained and not unused & grouped and trained <= grouped


# ---------------------------------------------------------------------------------------------------------- detection

def _oracle_outputs(data, relabel=None):
    """Ground truth of `data` as torchvision detections (score 1); `relabel` {label: (new label, score)} alters some."""
    outputs, ids = [], []
    for i in range(len(data)):
        _, t = data[i]
        labels, scores = t["labels"].clone(), torch.ones(len(t["labels"]))
        for old, (new, score) in (relabel or {}).items():
            scores[labels == old] = score
            labels[labels == old] = new
        outputs.append({"boxes": t["boxes"], "labels": labels, "scores": scores,
                        "masks": t["masks"][:, None].float()})
        ids.append(t["image_id"])
    return outputs, ids


def test_coco_metric_wiring_ground_truth_and_a_known_wrong_prediction(world):
    val = CocoInstances(world["coco"], "val2017", train=False)
    assert val.cat_ids == [1, 3] and len(val) == 2
    outputs, ids = _oracle_outputs(val)
    metrics, _ = coco_metrics(val.coco, to_coco_results(outputs, ids, val.cat_ids), ids)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    # every 'bar' (label 2) predicted as 'square' with score 0.5: squares keep AP 1 (the false positives rank below
    # all true ones), bars get AP 0, so the mean over the two categories is exactly 0.5 for boxes and masks
    outputs, ids = _oracle_outputs(val, relabel={2: (1, 0.5)})
    metrics, _ = coco_metrics(val.coco, to_coco_results(outputs, ids, val.cat_ids), ids)
    assert metrics["bbox"]["AP"] == pytest.approx(0.5) and metrics["segm"]["AP"] == pytest.approx(0.5)
    assert coco_metrics(val.coco, [], ids)[0]["bbox"]["AP"] == 0.0


def _detect_cfg(out, coco, *extra):
    return load_dense_config("detect", "recipes/detect/tiny_cpu.yaml",
                             [f"data.root={coco}", f"output_dir={out}", "train.max_steps=2", *extra])


def test_detect_trains_and_evaluates_a_hierarchical_encoder(world):
    out = world["root"] / "det_swin"
    res = detect(_detect_cfg(out, world["coco"]), str(world["swin"]))
    assert res["step"] == 2 and res["num_val_images"] == 2
    saved = json.loads((out / "results.json").read_text())
    assert 0.0 <= saved["box_ap"] <= 1.0 and set(saved["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss_mask" in x]
    assert len(train) == 2 and all(np.isfinite(x["loss"]) for x in train)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(train[0])
    assert any("val/bbox_AP" in x for x in lines)
    assert (out / "final" / "model.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["derived"]["canvas"] == 96


def test_detect_cli_trains_and_evaluates_a_plain_encoder(world):
    out = world["root"] / "det_vit"
    proc = run_cli("detect", "--recipe", "recipes/detect/tiny_cpu.yaml", "--from", str(world["vit"]),
                   f"data.root={world['coco']}", f"output_dir={out}", "train.max_steps=2")
    assert "box AP" in proc.stdout
    saved = json.loads((out / "results.json").read_text())
    assert saved["encoder"] == "mim_vit_tiny_patch16" and saved["step"] == 2 and "mask_ap" in saved


def test_coco_annotation_pointing_at_a_missing_image_is_refused_before_training(world, tmp_path):
    coco = tmp_path / "coco"
    write_coco(coco, "train2017", 3, seed=0)
    write_coco(coco, "val2017", 1, seed=1)
    gone = coco / "train2017" / "000000000101.jpg"
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(gone))):
        detect(_detect_cfg(tmp_path / "run", coco), str(world["swin"]))
    assert not (tmp_path / "run").exists()  # nothing written: refused before the run started
    ann = coco / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 7
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_val2017\.json: annotation\(s\) 1 point at a category"):
        CocoInstances(coco, "val2017", train=False)


# -------------------------------------------------------------------------------------------------------- segmentation

class ColourOracle(torch.nn.Module):
    """Reads the class back from the drawn colour: logits [B, 150, H, W], high for the class whose colour is nearest;
    `constant` predicts that one class everywhere instead (a known wrong prediction)."""

    def __init__(self, mean, std, constant=None):
        super().__init__()
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
        self.constant = constant

    def forward(self, x):
        logits = torch.full((x.shape[0], 150, *x.shape[-2:]), -1e4)
        if self.constant is not None:
            logits[:, self.constant] = 0.0
            return logits
        rgb = x * self.std + self.mean  # [B, 3, H, W] in [0, 1]
        for k, colour in ADE_COLOURS.items():
            ref = torch.tensor(colour, dtype=torch.float32)[:, None, None] / 255
            logits[:, k] = -((rgb - ref) ** 2).sum(1)
        return logits


def test_ade20k_metric_wiring_ground_truth_and_a_known_wrong_prediction(world):
    cfg = load_dense_config("segment", "recipes/segment/tiny_cpu.yaml", [f"data.root={world['ade']}"])
    val = Ade20kVal(list_pairs(find_root(world["ade"]), "validation"), cfg.data)
    labels = [val.label(i) for i in range(len(val))]
    assert set(torch.cat([lab.flatten() for lab in labels]).tolist()) == {0, 4, 149, 255}  # 1->0, 5->4, 150->149
    meter = IoUMeter(150)
    for lab in labels:
        meter.update(lab.clamp(max=149), lab)  # ignored pixels may hold any prediction
    assert meter.results()["mIoU"] == 1.0 and meter.results()["aAcc"] == 1.0
    # through the real evaluation (resize, sliding 64-px windows with stride 43, logits back to label size)
    oracle = ColourOracle(cfg.data.mean, cfg.data.std)
    res = evaluate_segmentation(oracle, val, cfg, _cpu_accelerator())
    assert res["mIoU"] == 1.0 and res["aAcc"] == 1.0 and res["num_val_images"] == 2
    # everything predicted as training id 0: IoU_0 = |class 0| / |valid pixels|, 0 for the other present classes
    valid = torch.cat([lab[lab != 255] for lab in labels])
    want = (valid == 0).sum().item() / valid.numel() / 3
    res = evaluate_segmentation(ColourOracle(cfg.data.mean, cfg.data.std, constant=0), val, cfg, _cpu_accelerator())
    assert res["mIoU"] == pytest.approx(want) and res["aAcc"] == pytest.approx((valid == 0).float().mean().item())
    assert res["per_class_iou"][4] == 0.0 and res["per_class_iou"][7] is None  # present but missed; absent


def _cpu_accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


def test_sliding_windows_cover_every_pixel_once_averaged():
    img = torch.randn(3, 70, 150)
    out = slide_logits(lambda x: x, img, crop=64, stride=43, batch=3)  # identity "model": windows must reassemble it
    assert torch.allclose(out, img, atol=1e-6)


@pytest.mark.parametrize("family", ["hivit", "vit"])
def test_segment_trains_and_evaluates(world, family):
    out = world["root"] / f"seg_{family}"
    cfg = load_dense_config("segment", "recipes/segment/tiny_cpu.yaml",
                            [f"data.root={world['ade']}", f"output_dir={out}", "train.iters=3"])
    res = segment(cfg, str(world[family]))
    assert res["step"] == 3 and res["num_val_images"] == 2 and 0.0 <= res["mIoU"] <= 1.0
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["per_class_iou"]) == 150 and saved["encoder"] == TINY[family][0]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss_seg" in x] == [1, 2, 3] and "loss_aux" in lines[0]
    assert lines[-1]["val/mIoU"] == saved["mIoU"]


def test_ade20k_label_out_of_range_is_refused_naming_the_file(world, tmp_path):
    base = write_ade(tmp_path / "ade", n_train=2, n_val=1)
    bad = base / "annotations" / "training" / "ADE_training_00000001.png"
    label = np.array(Image.open(bad))
    label[0, 0] = 151
    Image.fromarray(label, mode="L").save(bad)
    proc = run_cli("segment", "--recipe", "recipes/segment/tiny_cpu.yaml", "--from", str(world["vit"]),
                   f"data.root={tmp_path / 'ade'}", f"output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and "class id 151" in proc.stderr
    assert not (tmp_path / "run").exists()
    (base / "annotations" / "validation" / "ADE_validation_00000000.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_validation_00000000.png"):
        list_pairs(base, "validation")


def test_plain_vit_reads_blocks_4_6_8_12_for_upernet():
    """BEiT / MAE's ADE20K protocol: strides 4/8/16/32 from blocks 4/6/8/12 of 12, rescaled 4x/2x/1x/0.5x;
    without blocks (ViTDet, detection) every stride comes from the final map."""
    from mimtrain.eval.dense.backbone import BEIT_BLOCKS, plan_levels

    info = [dict(num_chs=8, reduction=16, module=f"blocks.{i}") for i in range(12)]
    assert plan_levels(info, BEIT_BLOCKS) == [(3, "up", 4), (5, "up", 2), (7, "same", 1), (11, "down", 2)]
    assert [src for src, _, _ in plan_levels(info)] == [11] * 4
    assert [src for src, _, _ in plan_levels(info[:6], BEIT_BLOCKS)] == [1, 2, 3, 5]  # scaled to 6 blocks
    enc = build_encoder("mim_vit_tiny_patch16", 64, num_classes=0, embed_dim=32, depth=12, num_heads=2).eval()
    backbone = DenseBackbone(enc, (64, 64), BEIT_BLOCKS).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        blocks = enc.forward_intermediates(x, intermediates_only=True)
        got = backbone(x)
    assert [tuple(g.shape[-2:]) for g in got] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    torch.testing.assert_close(got[2], backbone.norms[2](blocks[7]))  # stride 16: block 8 as it is
    hier = [dict(num_chs=8, reduction=r, module=f"s{r}") for r in (4, 8, 16, 32)]
    assert plan_levels(hier, BEIT_BLOCKS) == [(i, "same", 1) for i in range(4)]  # stage outputs kept
