"""`mimtrain bench` end to end on tiny models (fields and refusals only: no timing assertions)."""
from __future__ import annotations

import json

import pytest
from helpers import REPO, make_test_shards

from mimtrain.bench.harness import format_report
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
    monkeypatch.setattr("mimtrain.bench.harness.DECODE_MIN_SECONDS", 0.01)
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
