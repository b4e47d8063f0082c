"""Peer equivalence: mimtrain's MAE on a tiny ViT against HF transformers' `ViTMAEForPreTraining` (an independent
implementation of the official MAE) with the same weights and the same mask; and fine-tuning's layer-decay groups
against the formula of MAE's appendix (BEiT's layer-wise decay), written here.

HF is built offline from a `ViTMAEConfig` (no download); the key mapping below is ours.
"""
from __future__ import annotations

import pytest
import torch

from mimtrain.encoders.vit import ViTEncoder
from mimtrain.engine.optim import layer_decay_groups
from mimtrain.methods.mae import MAE

transformers = pytest.importorskip("transformers")

DIM, DEPTH, HEADS, DEC_DIM, DEC_HEADS, PATCH, SIZE, RATIO = 64, 2, 4, 32, 4, 8, 32, 0.75


def _ours() -> MAE:
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=0)
    return MAE(enc, SIZE, decoder_dim=DEC_DIM, decoder_depth=1, decoder_heads=DEC_HEADS, norm_pix_loss=True)


def _hf():
    cfg = transformers.ViTMAEConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
        image_size=SIZE, patch_size=PATCH, decoder_hidden_size=DEC_DIM, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=DEC_HEADS, decoder_intermediate_size=4 * DEC_DIM, layer_norm_eps=1e-6,
        hidden_act="gelu", qkv_bias=True, norm_pix_loss=True, mask_ratio=RATIO, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    hf = transformers.ViTMAEForPreTraining(cfg)
    # Some transformers versions leave the fixed tables zero after `post_init` (the embeddings' init is skipped as
    # already done, the decoder's table is zeroed): run HF's own sin-cos initialisation of both tables again.
    emb = hf.vit.embeddings
    emb.patch_embeddings.projection._is_hf_initialized = False
    emb.initialize_weights()
    hf.decoder.initialize_weights(emb.patch_embeddings.num_patches)
    assert emb.position_embeddings.abs().max() == 1 and hf.decoder.decoder_pos_embed.abs().max() == 1
    return hf


def _block_map(ours: str, theirs: str) -> dict[str, str]:
    """timm Block -> HF ViTMAE layer (qkv is split separately)."""
    return {f"{ours}.norm1": f"{theirs}.layernorm_before", f"{ours}.attn.proj": f"{theirs}.attention.o_proj",
            f"{ours}.norm2": f"{theirs}.layernorm_after", f"{ours}.mlp.fc1": f"{theirs}.mlp.fc1",
            f"{ours}.mlp.fc2": f"{theirs}.mlp.fc2"}


def _module_map() -> dict[str, str]:
    m = {"encoder.vit.patch_embed.proj": "vit.embeddings.patch_embeddings.projection", "encoder.vit.norm":
         "vit.layernorm", "decoder_embed": "decoder.decoder_embed", "decoder_norm": "decoder.decoder_norm",
         "decoder_pred": "decoder.decoder_pred"}
    for i in range(DEPTH):
        m.update(_block_map(f"encoder.vit.blocks.{i}", f"vit.layers.{i}"))
    m.update(_block_map("decoder_blocks.0", "decoder.decoder_layers.0"))
    return m


def _hf_names(name: str) -> list[str]:
    """Our parameter name -> the HF parameter(s) holding it (qkv -> q, k, v stacked on dim 0)."""
    tokens = {"encoder.vit.cls_token": "vit.embeddings.cls_token", "mask_token": "decoder.mask_token"}
    if name in tokens:
        return [tokens[name]]
    module, leaf = name.rsplit(".", 1)
    if module.endswith("attn.qkv"):
        owner = module[:-len(".attn.qkv")]
        hf = ("vit.layers." + owner.rsplit(".", 1)[1]) if owner.startswith("encoder.") else "decoder.decoder_layers.0"
        return [f"{hf}.attention.{p}_proj.{leaf}" for p in "qkv"]
    return [f"{_module_map()[module]}.{leaf}"]


def _copy_weights(ours: MAE, hf) -> None:
    theirs = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name == "encoder.vit.pos_embed":
                continue  # fixed tables: compared, not copied
            targets = _hf_names(name)
            for t, part in zip(targets, p.chunk(len(targets), dim=0)):
                theirs[t].copy_(part.reshape(theirs[t].shape))


def _mask_and_noise(batch: int, n: int, hidden: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same mask for both: ours as [B, g, g] bool; HF's as `noise` (it hides the largest noise values). Visible
    units get noise in raster order, so HF keeps them in the order our encoder gathers them."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(batch, n, generator=g).argsort(1)
    mask = torch.zeros(batch, n, dtype=torch.bool).scatter_(1, order[:, :hidden], True)
    noise = mask.float() + torch.arange(n).float()[None] / (2 * n)
    side = int(n ** 0.5)
    return mask.view(batch, side, side), noise


def test_sincos_tables_equal_hf_vitmae():
    ours, hf = _ours(), _hf()
    torch.testing.assert_close(ours.encoder.vit.pos_embed, hf.vit.embeddings.position_embeddings.float(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.decoder_pos_embed[0], hf.decoder.decoder_pos_embed[0, 1:].float(), atol=1e-6,
                               rtol=0)


def test_mae_loss_and_gradients_equal_hf_vitmae():
    ours, hf = _ours().train(), _hf().train()
    _copy_weights(ours, hf)
    n = (SIZE // PATCH) ** 2
    mask, noise = _mask_and_noise(3, n, n - int(n * (1 - RATIO)))
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    loss = ours(x, mask)["loss"]
    out = hf(pixel_values=x, noise=noise)
    assert torch.equal(out.mask.bool(), mask.flatten(1)), "HF must hide the same units"
    assert abs(loss.item() - out.loss.item()) < 1e-5, (loss.item(), out.loss.item())
    loss.backward()
    out.loss.backward()
    theirs = dict(hf.named_parameters())
    checked = ["encoder.vit.patch_embed.proj.weight", "encoder.vit.cls_token", "encoder.vit.blocks.0.attn.qkv.weight",
               "encoder.vit.blocks.1.mlp.fc2.weight", "encoder.vit.norm.weight", "mask_token", "decoder_embed.weight",
               "decoder_blocks.0.attn.proj.weight", "decoder_pred.weight"]
    params = dict(ours.named_parameters())
    for name in checked:
        want = torch.cat([theirs[t].grad.reshape(-1) for t in _hf_names(name)])
        got = params[name].grad.reshape(-1)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-4, f"{name}: relative gradient difference {rel:.2e}"


def _mae_layer_id(name: str, num_layers: int) -> int:
    """MAE's `get_layer_id_for_vit` on our names: embeddings 0, block i -> i + 1, the rest (final norm, fc_norm,
    head) num_layers + 1."""
    if name.startswith(("vit.cls_token", "vit.pos_embed", "vit.patch_embed", "mask_token")):
        return 0
    if name.startswith("vit.blocks."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def test_finetune_layer_decay_groups_follow_maes_appendix():
    """lr scale = decay^(L + 1 - layer_id) (BEiT / MAE Appendix A.3: layer-wise decay 0.75 for ViT-B); no weight decay
    on 1-D parameters (norms, biases) nor on the class token and position table; frozen tables left out."""
    L, decay, wd = 3, 0.75, 0.05
    model = ViTEncoder(img_size=32, patch_size=8, embed_dim=32, depth=L, num_heads=2, num_classes=5)
    for m in model.unused_by_classifier():  # as fine-tuning does (MAE drops the final norm for its fc_norm)
        m.requires_grad_(False)
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    groups = layer_decay_groups(model, wd, decay)
    got = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(got), "a parameter in two groups"
    want = {n: (decay ** (L + 1 - _mae_layer_id(n, L)),
                0.0 if p.ndim == 1 or n in ("vit.cls_token", "vit.pos_embed") else wd)
            for n, p in params.items() if p.requires_grad}
    assert got.keys() == want.keys()
    for n in want:
        assert got[n][0] == pytest.approx(want[n][0]) and got[n][1] == want[n][1], n
    assert got["vit.patch_embed.proj.weight"][0] == pytest.approx(decay ** (L + 1))
    assert got["fc_norm.weight"] == (1.0, 0.0) and got["vit.head.weight"] == (1.0, wd)
