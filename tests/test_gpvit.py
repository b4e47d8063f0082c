"""GPViT specifics beyond the shared contract: Table 11 sizes, batched attention vs naive loops, odd sizes, pyramid."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from mimtrain.encoders import build_encoder
from mimtrain.encoders.gpvit import GPViT, GroupPropagationBlock, LePEAttention

TINY = dict(embed_dim=24, depth=3, num_heads=4, gp_positions=(0, 2), group_nums=(8, 4), group_heads=2, stem_chs=8)


@pytest.mark.parametrize("name,paper_m", [("gpvit_l1", 9.3), ("gpvit_l2", 23.8), ("gpvit_l3", 36.2),
                                          ("gpvit_l4", 75.4)])
def test_params_match_table_11(name, paper_m):
    with torch.device("meta"):  # full size without allocating or initialising 75M parameters
        model = timm.create_model(name, num_classes=1000)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n / paper_m - 1) < 0.03, f"{name}: {n:.2f}M params vs the paper's {paper_m}M"


def _naive_attention(q, k, v):
    """One head, one query: q [d], k/v [L, d] -> [d]."""
    w = torch.softmax(k @ q / math.sqrt(q.numel()), dim=0)
    return (w[:, None] * v).sum(0)


def _naive_group(blk: GroupPropagationBlock, x: torch.Tensor) -> torch.Tensor:
    """Eq. 2 one group and one head at a time; Q and V are identity projections."""
    B, N, C = x.shape
    M, h = blk.group_tokens.shape[0], blk.num_heads
    d = C // h
    xn = blk.norm_group(x)
    k = blk.group_k(xn)
    y = torch.zeros(B, M, C)
    for b in range(B):
        for head in range(h):
            sl = slice(head * d, (head + 1) * d)
            for m in range(M):
                y[b, m, sl] = _naive_attention(blk.group_tokens[m, sl], k[b, :, sl], xn[b, :, sl])
    return y


def _naive_ungroup(blk: GroupPropagationBlock, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 5 one image token and one head at a time."""
    B, N, C = x.shape
    h = blk.num_heads
    d = C // h
    q = blk.ungroup_q(blk.norm_query(x))
    k, v = blk.ungroup_kv(blk.norm_kv(y)).chunk(2, dim=-1)
    u = torch.zeros(B, N, C)
    for b in range(B):
        for head in range(h):
            sl = slice(head * d, (head + 1) * d)
            for n in range(N):
                u[b, n, sl] = _naive_attention(q[b, n, sl], k[b, :, sl], v[b, :, sl])
    return u


def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (the identity dwconv init and zero biases would hide mistakes)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


def test_batched_grouping_and_ungrouping_match_naive_loops():
    torch.manual_seed(0)
    blk = GroupPropagationBlock(dim=24, num_groups=8, num_heads=3).eval()
    _randomise(blk)
    hw = (5, 7)
    x = torch.randn(2, hw[0] * hw[1], 24)
    with torch.no_grad():
        y = blk.group(x)
        torch.testing.assert_close(y, _naive_group(blk, x), rtol=1e-4, atol=1e-5)
        y = blk.propagate(y)
        u = blk.ungroup(x, y)
        torch.testing.assert_close(u, _naive_ungroup(blk, x, y), rtol=1e-4, atol=1e-5)
        # The whole block, from the naive pieces (Eq. 6: concat + project, FFN, depth-wise conv).
        z = blk.proj(torch.cat([u, x], dim=-1))
        z = z + blk.ffn(blk.norm_ffn(z))
        z = blk.dwconv(z.transpose(1, 2).reshape(2, 24, *hw)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(blk(x, hw), z, rtol=1e-4, atol=1e-5)


def _naive_lepe(attn: LePEAttention, x: torch.Tensor) -> torch.Tensor:
    """Cross-shaped strips one strip and one head at a time, in image orientation, shorter last strips unpadded."""
    B, H, W, C = x.shape
    s, heads, half = attn.strip_size, attn.num_heads // 2, C // 2
    d = half // heads
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    out = torch.zeros(B, H, W, C)
    for branch, conv, size in ((0, attn.lepe_h, H), (1, attn.lepe_v, W)):
        ch = slice(branch * half, (branch + 1) * half)
        for start in range(0, size, s):
            win = (slice(None), slice(start, start + s), slice(None)) if branch == 0 else \
                (slice(None), slice(None), slice(start, start + s))
            qw, kw, vw = q[win][..., ch], k[win][..., ch], v[win][..., ch]  # [B, h, w, half]
            lepe = conv(vw.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # zero padding at the strip border
            sh, sw = qw.shape[1:3]
            res = torch.zeros(B, sh, sw, half)
            for b in range(B):
                for head in range(heads):
                    hd = slice(head * d, (head + 1) * d)
                    kk, vv = kw[b, ..., hd].reshape(-1, d), vw[b, ..., hd].reshape(-1, d)
                    for i in range(sh):
                        for j in range(sw):
                            res[b, i, j, hd] = _naive_attention(qw[b, i, j, hd], kk, vv)
            full = out[win]
            full[..., ch] = res + lepe
            out[win] = full
    return attn.proj(out)


@pytest.mark.parametrize("hw", [(4, 6), (5, 7)], ids=["divisible", "padded"])
def test_batched_lepe_strips_match_naive_loops(hw):
    attn = LePEAttention(dim=16, num_heads=4, strip_size=2).eval()
    _randomise(attn)
    x = torch.randn(2, *hw, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _naive_lepe(attn, x), rtol=1e-4, atol=1e-5)


def test_full_size_non_square_forward_with_interpolated_position_embedding():
    """The paper's L1 built for 224 runs at 256x320 (pos-embed resized on the fly), masked and unmasked alike."""
    torch.manual_seed(0)
    model = build_encoder("gpvit_l1", 224).eval()
    x = torch.randn(1, 3, 256, 320)
    mask = torch.rand(1, 256 // 32, 320 // 32) < 0.6
    with torch.no_grad():
        out = model.encode(x, mask)
    assert out.shape == (1, 216, 32, 40) and torch.isfinite(out).all()


def test_pyramid_shapes_and_info():
    model = build_encoder("gpvit_l1", (64, 96), **TINY).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_pyramid(x)
        ref = model.forward_features(x)
    assert [f.shape for f in feats] == [(2, 24, 64 // r, 96 // r) for r in (4, 8, 16, 32)]
    assert [i["reduction"] for i in model.pyramid_info] == [4, 8, 16, 32]
    torch.testing.assert_close(feats[1], ref)  # the stride-8 level is the encoder's own map


def test_adapt_state_dict_resizes_position_embedding():
    small = build_encoder("gpvit_l1", 64, **TINY)
    big = build_encoder("gpvit_l1", (96, 128), **TINY)
    state = big.adapt_state_dict(small.state_dict())
    assert state["pos_embed"].shape == (1, 24, 12, 16)
    big.load_state_dict(state)
    expected = F.interpolate(small.pos_embed.detach(), size=(12, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(big.pos_embed.detach(), expected)


def test_refuses_drop_mode_and_bad_mask_unit():
    with pytest.raises(ValueError, match="fill"):
        GPViT(mask_mode="drop", **TINY)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        GPViT(mask_unit=12, **TINY)


def test_no_weight_decay_names_exist():
    model = GPViT(**TINY, num_classes=0)  # the pretraining encoder, with its mask token
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    assert {"pos_embed", "mask_token", "blocks.0.group_tokens", "blocks.2.group_tokens"} <= model.no_weight_decay()
