import pytest
import torch

from mimtrain.config.pretrain import MaskConfig
from mimtrain.encoders import build_encoder
from mimtrain.masking import MaskingService, block_mask, sample_seed


def _service(ratio=0.75, generator="random", mode_encoder="drop", img=64):
    enc = build_encoder("mim_vit_tiny_patch16", img, embed_dim=32, depth=1, num_heads=2, mask_mode=mode_encoder)
    return MaskingService.for_encoder(enc, img, MaskConfig(ratio=ratio, generator=generator), seed=3)


@pytest.mark.parametrize("generator", ["random", "block"])
def test_drop_mode_hides_exactly_round_ratio_units(generator):
    svc = _service(0.75, generator)
    masks = svc.draw([f"k{i}" for i in range(50)], epoch=0)
    assert masks.shape == (50, 4, 4) and masks.dtype == torch.bool
    assert (masks.flatten(1).sum(1) == round(0.75 * 16)).all()


def test_masks_are_deterministic_in_seed_epoch_key():
    svc = _service()
    a = svc.draw(["x", "y", "z"], epoch=2)
    assert torch.equal(a, svc.draw(["x", "y", "z"], epoch=2))
    assert torch.equal(a[1], svc.draw(["y"], epoch=2)[0])  # independent of batch composition
    assert not torch.equal(svc.draw([f"k{i}" for i in range(8)], 2), svc.draw([f"k{i}" for i in range(8)], 3))
    assert sample_seed(1, "a") == sample_seed(1, "a") != sample_seed(1, "b")


def test_masks_differ_between_images():
    masks = _service().draw([f"k{i}" for i in range(20)], epoch=0)
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 15


def test_service_takes_its_form_from_the_encoder():
    assert _service(mode_encoder="drop").mode == "drop"
    assert _service(mode_encoder="fill").mode == "fill"


def test_image_size_not_divisible_by_mask_unit_is_refused():
    enc = build_encoder("mim_vit_tiny_patch16", 64, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="not divisible by the mask unit"):
        MaskingService.for_encoder(enc, 72, MaskConfig(), seed=0)


def test_block_mask_is_blocky():
    g = torch.Generator().manual_seed(0)
    m = block_mask((14, 14), 98, g, min_block=16, exact=True)
    assert int(m.sum()) == 98
    # neighbours of hidden units are mostly hidden (blocks, not salt and pepper)
    nb = (m[1:, :] & m[:-1, :]).sum() + (m[:, 1:] & m[:, :-1]).sum()
    assert nb > 1.2 * 98
