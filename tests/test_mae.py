import torch

from mimtrain.encoders import build_encoder
from mimtrain.methods.mae import MAE, patchify, unpatchify


def _mae(norm_pix=True):
    torch.manual_seed(0)
    enc = build_encoder("mim_vit_tiny_patch16", 32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    return MAE(enc, 32, decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=norm_pix)


def test_patchify_round_trip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    p = patchify(x, 2)
    assert p.shape == (2, 6, 12)
    # unit (0, 1) = rows 0-1, cols 2-3; pixels (row, col, channel) within it
    assert p[0, 1, :3].tolist() == [x[0, 0, 0, 2], x[0, 1, 0, 2], x[0, 2, 0, 2]]
    assert torch.equal(unpatchify(p, 2, (2, 3)), x)


def test_norm_pix_loss_matches_a_hand_computed_example():
    mae = _mae(norm_pix=True)
    mae.unit = 1  # one-pixel units make the target easy to write by hand
    # [1, 3, 1, 2]: unit0 = (1,2,3), unit1 = (3,6,9)
    images = torch.tensor([[[[1.0, 3.0]], [[2.0, 6.0]], [[3.0, 9.0]]]])
    mask = torch.tensor([[[False, True]]])
    pred = torch.zeros(1, 2, 3)
    # unit1: mean 6, unbiased var 9 -> target (-1, 0, 1) / sqrt(1 + 1e-6/9); MSE vs 0 = 2/3 (unit0 is visible: ignored)
    expected = (2.0 / 3.0) * 9 / (9 + 1e-6)
    assert torch.allclose(mae.loss(images, pred, mask), torch.tensor(expected), atol=1e-6)
    mae.norm_pix_loss = False
    assert torch.allclose(mae.loss(images, pred, mask), torch.tensor((9 + 36 + 81) / 3.0))


def test_forward_returns_loss_pred_mask_and_loss_ignores_visible_units():
    mae = _mae()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 1:] = True
    out = mae(x, mask)
    assert set(out) == {"loss", "pred", "mask"} and out["pred"].shape == (2, 16, 8 * 8 * 3)
    out["loss"].backward()
    enc_grads = [p.grad for p in mae.encoder.parameters() if p.requires_grad]
    assert all(g is not None for g in enc_grads)
    # changing the prediction of a visible unit leaves the loss unchanged
    pred2 = out["pred"].detach().clone()
    pred2[0, 15] += 100
    assert torch.allclose(mae.loss(x, pred2, mask), mae.loss(x, out["pred"].detach(), mask))


def test_visualize_pastes_visible_units_back():
    mae = _mae().eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 0] = True
    with torch.no_grad():
        views = mae.visualize(x, mae(x, mask))
    assert torch.equal(views["reconstruction"][:, :, 8:], x[:, :, 8:])  # visible rows are the original
    assert (views["masked"][:, :, :8] == 0).all()
    assert not torch.equal(views["reconstruction"][:, :, :8], x[:, :, :8])


def test_mae_refuses_fill_encoder():
    enc = build_encoder("mim_vit_tiny_patch16", 32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                        mask_mode="fill")
    try:
        MAE(enc, 32)
    except ValueError as e:
        assert "simmim" in str(e)
    else:
        raise AssertionError("MAE accepted a fill-mode encoder")
