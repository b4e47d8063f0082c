"""Every encoder pretrains through the same CLI and resumes exactly: tiny models, CPU, a few steps.

Straight 6 steps vs 3 steps + `resume=auto` + 3 more: the same final parameters (and buffers, e.g. DGT centroids).
"""
import pytest
from safetensors.torch import load_file

from helpers import make_test_shards, run_cli

RUNS = {  # encoder -> (method, img_size, tiny architecture kwargs, mask unit)
    "mim_vit_tiny_patch16": ("simmim", 32, "{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}", 16),
    "hivit_tiny": ("mae", 64, "{dims: [16, 32, 64], depths: [1, 1, 2], num_heads: 2}", 16),
    "simmim_swin_tiny_patch4_window6": ("simmim", 64, "{embed_dim: 16, depths: [1, 1, 2, 1], "
                                                      "num_heads: [1, 2, 2, 4], window_size: 2}", 16),
    "simmim_gcvit_xxtiny": ("simmim", 64, "{embed_dim: 16, depths: [1, 1, 2, 1], num_heads: [1, 2, 4, 8]}", 16),
    "gpvit_l1": ("simmim", 64, "{embed_dim: 24, depth: 3, num_heads: 4, gp_positions: [0, 2], group_nums: [8, 4], "
                               "group_heads: 2, stem_chs: 8}", 16),
    "dgt_tiny": ("simmim", 64, "{stem_dim: 8, dims: [8, 16, 32, 64], depths: [1, 1, 1, 1], num_heads: [1, 2, 2, 4], "
                               "num_groups: 4, topk: 8, head_hidden: 32}", 16),
    "glnet_stl": ("simmim", 64, "{embed_dim: 16, depths: [1, 1, 2, 1], num_heads: [1, 1, 2, 4], num_slots: 16}", 16),
}
# MAE's decoder at toy size (SimMIM refuses decoder settings: it has no such decoder).
TINY_DECODER = ("method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("data"), classes=2, per_class=8, shard_size=4)


def _run(shards, out, name, *extra):
    method, img, kwargs, unit = RUNS[name]
    return run_cli("pretrain", f"method.name={method}", f"encoder.name={name}", f"encoder.kwargs={kwargs}",
                   f"encoder.mask_unit={unit}", f"data.img_size={img}", f"data.train_shards={shards}",
                   f"output_dir={out}", *(TINY_DECODER if method == "mae" else ()), "train.batch_size=4",
                   "train.epochs=3", "optim.warmup_epochs=1", "train.log_every=1", "train.image_every=3",
                   "train.progress=false", "data.num_workers=0", "data.shuffle_buffer=8", "mask.ratio=0.6",
                   "optim.blr=1e-3", *extra).stdout


def _latest(out):
    ptr = (out / "checkpoints" / "latest").read_text().strip()
    return load_file(str(out / "checkpoints" / ptr / "model.safetensors"))


@pytest.mark.parametrize("name", list(RUNS))
def test_tiny_pretraining_resumes_exactly(shards, tmp_path, name):
    _run(shards, tmp_path / "a", name, "train.max_steps=6")
    _run(shards, tmp_path / "b", name, "train.max_steps=3")
    out = _run(shards, tmp_path / "b", name, "train.max_steps=6", "resume=auto")
    assert "at step 3" in out
    a, b = _latest(tmp_path / "a"), _latest(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].float() - b[k].float()).abs().max() <= 1e-6, k


def test_method_and_encoder_mode_mismatch_is_refused(shards, tmp_path):
    proc = run_cli("pretrain", "method.name=mae", "encoder.name=simmim_swin_tiny_patch4_window6",
                   f"data.train_shards={shards}", f"output_dir={tmp_path}", "data.img_size=64", check=False)
    assert proc.returncode == 2 and "simmim" in proc.stderr.lower(), proc.stderr


def test_glnet_run_logs_slot_maps_beside_reconstructions(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(shards, tmp_path / "g", "glnet_stl", "train.max_steps=1", "train.image_every=1")
    tags = EventAccumulator(str(tmp_path / "g" / "tensorboard"), size_guidance={"images": 0}).Reload().Tags()
    assert {"reconstruction", "slot_maps"} <= set(tags["images"])
