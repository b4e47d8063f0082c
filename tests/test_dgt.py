"""DGT specifics beyond the encoder contract: batched DG-attention vs a per-group reference, the global-attention
limit, the centroid EMA (training only, checkpointed), and sizes vs the paper."""
from __future__ import annotations

import io

import pytest
import timm
import torch
import torch.nn.functional as F

import mimtrain.encoders  # noqa: F401  (registers the models)
from mimtrain.encoders.base import num_params
from mimtrain.encoders.dgt import DGT, DGAttention, GlobalAttention, dg_plan, dynamic_group_attention

_TINY = dict(stem_dim=8, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_groups=4, topk=8,
             head_hidden=32, num_classes=5)
PAPER_PARAMS_M = {"dgt_tiny": 24.0, "dgt_small": 51.76, "dgt_base": 90.28}  # Table 1 / Table 2


def _naive_dg_attention(q, k, v, centroids, topk, scale):
    """Paper Eqs. 1-2 literally: per image, head and group, select keys, attend, scatter back. q,k,v: [B, h, N, d]."""
    B, h, N, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(h):
            assign = (F.normalize(q[b, i], dim=-1) @ centroids[i].T).argmax(-1)
            for g in range(centroids.shape[1]):
                members = (assign == g).nonzero().squeeze(1)
                if members.numel() == 0:
                    continue
                idx = (centroids[i, g] @ k[b, i].T).topk(min(topk, N)).indices
                attn = (q[b, i, members] @ k[b, i, idx].T * scale).softmax(-1)
                out[b, i, members] = attn @ v[b, i, idx]
    return out


def _inputs(B, h, N, d, G, seed=0, skew=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, d, generator=g, dtype=torch.float64) for _ in range(3))
    cent = F.normalize(torch.randn(h, G, d, generator=g, dtype=torch.float64), dim=-1)
    if skew:  # nearly every query in group 0: one group spans many blocks, the others few or none
        cent[:, 0] = F.normalize(torch.ones(d, dtype=torch.float64), dim=0)
        q = q.abs() + 1.0
    return q, k, v, cent


@pytest.mark.parametrize("layout", ["blocks", "dense"])
@pytest.mark.parametrize("B,h,N,d,G,topk,block,skew", [
    (2, 3, 37, 8, 5, 7, None, False),   # default block = ceil(N / G)
    (2, 3, 37, 8, 5, 7, 1, False),      # one query per block
    (1, 2, 50, 4, 6, 11, 64, False),    # one block larger than any group
    (2, 2, 6, 4, 10, 3, None, False),   # more groups than tokens
    (2, 2, 40, 4, 4, 9, 3, True),       # skewed: one group holds almost everything
])
def test_batched_dg_attention_matches_per_group_reference(B, h, N, d, G, topk, block, skew, layout):
    q, k, v, cent = _inputs(B, h, N, d, G, skew=skew)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = d ** -0.5
    out, assign = dynamic_group_attention(q, k, v, cent, topk, scale, block=block, layout=layout)
    ref = _naive_dg_attention(q, k, v, cent, topk, scale)
    torch.testing.assert_close(out, ref)
    assert assign.shape == (B, h, N) and int(assign.max()) < G
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", ["blocks", "dense"])
@pytest.mark.parametrize("topk", [20, 25, 1000])
def test_dg_attention_with_all_keys_is_global_attention(topk, layout):
    q, k, v, cent = _inputs(2, 3, 20, 8, 6, seed=1)
    out, _ = dynamic_group_attention(q, k, v, cent, topk, 8 ** -0.5, layout=layout)  # grouped, every key selected
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_auto_layout_per_stage_at_224():
    """Blocks where N is large (stages 1-2), dense where G * k dwarfs N (stage 3: 196 tokens, 48 x 98 selections)."""
    assert [dg_plan(n, 48, 98)[0] for n in (3136, 784, 196)] == ["blocks", "blocks", "dense"]
    layout, block, nb = dg_plan(3136, 48, 98)
    assert (block, nb) == (66, 96) and nb * block <= 2 * 3136 + block + 48


@pytest.mark.parametrize("cosine", [False, True])
def test_dg_module_with_k_at_least_tokens_equals_global_module_exactly(cosine):
    torch.manual_seed(0)
    dg = DGAttention(32, 4, num_groups=6, topk=16, cosine=cosine).eval()
    glob = GlobalAttention(32, 4, cosine=cosine).eval()
    glob.load_state_dict({n: t for n, t in dg.state_dict().items() if n != "centroids"})
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        assert torch.equal(dg(x), glob(x))
        dg.topk = 15  # one key fewer: now grouped, and (with random centroids) different
        assert not torch.allclose(dg(x), glob(x))


def test_centroid_ema_follows_eq_3_4():
    torch.manual_seed(0)
    attn = DGAttention(16, 2, num_groups=3, topk=4, centroid_tau=0.3).train()
    before = attn.centroids.clone()
    x = torch.randn(2, 10, 16)
    q = attn._qkv(x)[0].detach()
    attn(x)
    for i in range(2):
        qn = F.normalize(q[:, i].reshape(-1, 8), dim=-1)
        assign = (qn @ before[i].T).argmax(-1)
        for g in range(3):
            members = qn[assign == g]
            want = before[i, g] if len(members) == 0 else F.normalize(0.3 * before[i, g] + 0.7 * members.mean(0), dim=0)
            torch.testing.assert_close(attn.centroids[i, g], want)


def _tiny(seed=0) -> DGT:
    torch.manual_seed(seed)
    return timm.create_model("dgt_small", img_size=64, **_TINY)


def _centroids(model) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("centroids")}


def test_centroids_move_in_training_only_and_survive_state_dict():
    model = _tiny()
    cents = _centroids(model)
    assert len(cents) == 3  # one DG block in each of stages 1-3; stage 4 is global
    assert all(not b.requires_grad for b in cents.values())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.eval()(x)
    assert all(torch.equal(b, _centroids(model)[n]) for n, b in cents.items()), "eval must not move centroids"
    model.train()(x)
    moved = _centroids(model)
    assert all(not torch.equal(b, moved[n]) for n, b in cents.items()), "training forward must move every centroid set"
    for b in moved.values():
        torch.testing.assert_close(b.norm(dim=-1), torch.ones(b.shape[:-1]))
    model.set_centroid_tau(1.0)  # tau = 1 keeps the old centroid (Eq. 4)
    model(x)
    for n, b in _centroids(model).items():
        torch.testing.assert_close(b, moved[n])

    saved = _centroids(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert set(saved) <= set(state)
    fresh = _tiny(seed=1)
    assert not any(torch.equal(b, saved[n]) for n, b in _centroids(fresh).items())
    fresh.load_state_dict(state)
    for n, b in _centroids(fresh).items():
        assert torch.equal(b, saved[n])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_refuses_drop_mode_and_bad_sizes():
    with pytest.raises(ValueError, match="fill"):
        timm.create_model("dgt_tiny", mask_mode="drop", **_TINY)
    with pytest.raises(ValueError, match="multiple"):
        timm.create_model("dgt_tiny", mask_unit=30, **_TINY)
    with pytest.raises(ValueError, match="32"):
        timm.create_model("dgt_tiny", img_size=80, **_TINY)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_params_within_3_percent_of_paper(name):
    with torch.device("meta"):  # counts only; no 90M-parameter init on CPU
        model = timm.create_model(name, num_classes=1000)
    assert isinstance(model, DGT)
    assert abs(num_params(model) / 1e6 / PAPER_PARAMS_M[name] - 1) < 0.03


def test_on_step_hook_sets_tau_from_the_learning_rate():
    import timm

    model = timm.create_model("dgt_tiny", stem_dim=8, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1),
                              num_heads=(1, 2, 2, 4), num_groups=4, topk=8, head_hidden=32, img_size=64)
    model.on_step(3, 2e-3)
    taus = [m.centroid_tau for m in model.modules() if isinstance(m, DGAttention)]
    assert taus and all(t == pytest.approx(2e-4) for t in taus)
