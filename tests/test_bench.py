"""`mimtrain bench` end to end on tiny models (fields and refusals only: no timing assertions)."""
from __future__ import annotations

import argparse
import json

import pytest
from helpers import REPO, make_test_shards

from mimtrain.bench import add_parser
from mimtrain.bench.cli import DEFAULT_SET, plan
from mimtrain.bench.report import format_report
from mimtrain.cli import main

TINY_VIT = ["encoder.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}", "method.decoder_dim=32",
            "method.decoder_depth=1", "method.decoder_heads=2", "data.img_size=32"]
ROW_KEYS = {"name", "method", "img_size", "batch", "images_per_sec", "step_ms", "peak_mem_mib", "gflop_per_img", "mfu"}


def test_bench_runs_tiny_mae_against_hf_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["bench", "--recipe", str(REPO / "recipes/pretrain/mae_vit_base.yaml"), "--batch", "2", "--steps", "2",
          "--warmup", "1", "--compare", "hf", "--json", str(out), *TINY_VIT])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert {"command", "device", "date", "rows", "ours_over_hf"} <= set(report)
    assert report["command"].startswith("mimtrain bench --recipe") and "--compare hf" in report["command"]
    ours, hf = report["rows"]
    for row in (ours, hf):
        assert ROW_KEYS <= set(row), row
        assert "error" not in row, row
        assert row["batch"] == 2 and row["img_size"] == 32 and row["method"] == "mae"
        assert row["images_per_sec"] > 0 and row["step_ms"] > 0 and row["gflop_per_img"] > 0
    assert hf["name"] == "HF ViTMAEForPreTraining"
    # Same sizes, so the counted work of one fwd+bwd agrees closely (ViT-B: within 0.01%).
    assert ours["gflop_per_img"] == pytest.approx(hf["gflop_per_img"], rel=0.05)
    assert report["ours_over_hf"][0]["ratio"] > 0
    assert "| model | method | img | batch | img/s |" in printed and "ours / HF images/sec" in printed


def test_compare_hf_refuses_a_non_vit_recipe(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--recipe", str(REPO / "recipes/pretrain/simmim_swin_base_192.yaml"), "--compare", "hf"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--compare hf needs an MAE recipe with a mim_vit_* encoder" in err and "simmim" in err


def test_streamed_data_and_decode_modes(tmp_path, capsys, monkeypatch):
    shards = make_test_shards(tmp_path, classes=2, per_class=6, shard_size=6)
    out = tmp_path / "data.json"
    main(["bench", "--recipe", str(REPO / "recipes/pretrain/mae_vit_base.yaml"), "--batch", "2", "--steps", "2",
          "--warmup", "1", "--data", str(shards), "--json", str(out), *TINY_VIT, "data.num_workers=0",
          "data.shuffle_buffer=4"])
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row
    assert 0.0 <= row["data_wait_frac"] <= 1.0
    monkeypatch.setattr("mimtrain.bench.decode.DECODE_MIN_SECONDS", 0.01)
    main(["bench", "--decode", str(shards), "--img-size", "32", "--json", str(tmp_path / "decode.json")])
    (row,) = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert row["images"] == 12 and 0.0 <= row["reduced_scale_frac"] <= 1.0
    for case in ("decode", "decode+RandomResizedCrop, old", "decode+RandomResizedCrop, ours", "full transform, old",
                 "full transform, ours"):
        assert row[f"{case} img/s/core"] > 0 and len(row["rounds"][case]) == 3, case
    out = capsys.readouterr().out
    assert "| decode+RandomResizedCrop, old | decode+RandomResizedCrop, ours |" in out and "ours crop / decode" in out


def test_fast_path_switches_name_their_rows(tmp_path):
    out = tmp_path / "switches.json"
    recipe = str(REPO / "recipes/pretrain/mae_vit_base.yaml")
    main(["bench", "--recipe", recipe, "--recipe", f"{recipe} train.channels_last=true train.sdpa=false "
          "optim.fused=false", "--batch", "2", "--steps", "1", "--warmup", "0", "--json", str(out), *TINY_VIT])
    plain, switched = json.loads(out.read_text())["rows"]
    assert "error" not in plain and "error" not in switched
    assert plain["name"] == "mim_vit_base_patch16(patch_size=8,embed_dim=32,depth=2,num_heads=2)"
    assert switched["name"] == plain["name"] + " [channels_last, no sdpa, unfused AdamW]"


def test_failed_worker_becomes_a_row_not_a_crash():
    report = {"command": "c", "device": "d", "precision": "fp32", "date": "t",
              "rows": [{"name": "big", "method": "simmim", "error": "OOM"}]}
    line = format_report(report).splitlines()[-1]
    assert line.startswith("| big | simmim |") and line.endswith("| OOM |") and line.count("|") == 10


def _bench_args(*argv: str) -> argparse.Namespace:
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    return sub.choices["bench"].parse_args(list(argv))


def test_without_a_recipe_the_default_set_is_the_cpu_demo_encoder_under_mae_and_simmim(capsys):
    (mae, mae_spec), (simmim, simmim_spec) = plan(_bench_args())
    assert mae_spec["recipe"] == str(REPO / "recipes/pretrain/mae_vit_tiny_cpu.yaml") and mae_spec["overrides"] == []
    assert simmim_spec["recipe"] == str(REPO / "recipes/pretrain/simmim_vit_base.yaml")
    assert (mae.method.name, simmim.method.name) == ("mae", "simmim")
    # The same encoder, image size and batch: the two rows differ only in the method (and its recipe's settings).
    assert simmim.encoder.name == mae.encoder.name == "mim_vit_tiny_patch16"
    assert simmim.encoder.kwargs == mae.encoder.kwargs
    assert simmim.data.img_size == mae.data.img_size == 32
    assert mae_spec["batch"] == simmim_spec["batch"] == 64 and mae_spec["precision"] == "fp32"
    assert simmim.mask.ratio == 0.6 and simmim.encoder.mask_unit == 2 * simmim.encoder.kwargs["patch_size"]
    # --compare hf keeps only the recipe HF ViTMAE can stand beside.
    ((cfg, _),) = plan(_bench_args("--compare", "hf"))
    assert cfg.method.name == "mae"
    main(["bench", "--dry-run", "--steps", "2"])
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(DEFAULT_SET) and all("batch 64, fp32, 3 warm-up + 2 timed steps" in x for x in listed)


def test_make_bench_default_set_runs_a_step_of_each(tmp_path, capsys):
    out = tmp_path / "default.json"
    main(["bench", "--batch", "4", "--steps", "1", "--warmup", "0", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["rows"]] == ["mae", "simmim"]
    for row in report["rows"]:
        assert "error" not in row, row
        assert row["batch"] == 4 and row["img_size"] == 32 and row["images_per_sec"] > 0
    assert report["default_set"] == list(DEFAULT_SET)
    assert "- no --recipe: the default set, `recipes/pretrain/mae_vit_tiny_cpu.yaml`" in capsys.readouterr().out


def test_table_counts_a_vit_as_the_formulas_do(tmp_path):
    out = tmp_path / "table.json"
    main(["bench", "--table", "mim_vit_tiny_patch16", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    D, N, depth, P = 192, 197, 12, 16 * 16 * 3  # ViT-Ti/16 at 224: 196 patches + the class token
    block_params = 12 * D * D + 13 * D  # qkv, proj, fc1, fc2 (MLP ratio 4) with biases, two LayerNorms
    params = D + N * D + P * D + D + depth * block_params + 2 * D + 1000 * D + 1000
    # MACs: the linear layers (12 N D^2) and attention's two N x N x D products per block, patch embed, head.
    macs = depth * (12 * N * D * D + 2 * N * N * D) + 196 * P * D + 1000 * D
    assert row["params_m"] == pytest.approx(params / 1e6, abs=0.005)
    assert row["gmacs"] == pytest.approx(macs / 1e9, abs=0.005)
    with pytest.raises(SystemExit):
        main(["bench", "--table", "mim_vit_tiny_patch16", "--recipe", "recipes/pretrain/mae_vit_base.yaml"])
