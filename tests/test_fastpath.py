"""The fast path's switches keep the loss and gradients (speed is shown by `mimtrain bench`, never asserted)."""
import dataclasses

import pytest
import torch
import torch._dynamo

from mimtrain.config.pretrain import ConfigError, TrainConfig, load_config
from mimtrain.engine.fastpath import apply_fast_path
from mimtrain.methods import build_pretraining

TINY_MAE = ["encoder.name=mim_vit_tiny_patch16",
            "encoder.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}", "method.decoder_dim=32",
            "method.decoder_depth=1", "method.decoder_heads=2", "data.img_size=32"]
TINY_HIVIT = ["encoder.name=hivit_tiny", "encoder.kwargs={dims: [16, 32, 64], depths: [1, 1, 2], num_heads: 2}",
              "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2", "data.img_size=64"]
TINY_SWIN = ["method.name=simmim", "encoder.name=simmim_swin_tiny_patch4_window7", "data.img_size=224",
             "encoder.kwargs={embed_dim: 16, depths: [1, 1, 2, 1], num_heads: [1, 2, 2, 4]}"]


def _build(overrides):
    """(method, masking, images, mask) from config overrides; the same weights every call."""
    cfg = load_config(None, overrides)
    S = cfg.data.img_size
    torch.manual_seed(0)
    method, masking = build_pretraining(cfg)
    images = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    return method, masking, images, masking.draw(["a", "b"], 0)


def _loss_and_grads(method, images, mask):
    method.zero_grad(set_to_none=True)
    loss = method(images, mask)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def _assert_same(a, b, atol=1e-5):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, atol=atol), (la, lb)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=atol), k


@pytest.mark.parametrize("overrides", [TINY_MAE, TINY_HIVIT], ids=["vit", "hivit"])
def test_compiled_drop_mode_method_is_one_graph_with_the_eager_loss(overrides):
    eager, masking, images, mask = _build(overrides)
    fast, _, _, _ = _build(overrides)
    # aot_eager: dynamo capture + autograd tracing, the compile wrapping the trainer uses, without code generation
    # (inductor, the default backend, was checked by hand on this model: same loss, gradients within 3e-8).
    apply_fast_path(fast, dataclasses.replace(TrainConfig(), compile=True), masking, backend="aot_eager")
    assert fast.encoder.hidden_units == masking.n_hidden
    _assert_same(_loss_and_grads(fast, images, mask), _loss_and_grads(eager, images, mask))
    assert list(fast.state_dict()) == list(eager.state_dict())  # in place: checkpoints keep their names
    # The static visible count removes the host sync, so the forward is one graph (the plain one breaks at it).
    assert torch._dynamo.explain(eager)(images, mask).graph_break_count > 0
    apply_fast_path(eager, TrainConfig(), masking)
    explained = torch._dynamo.explain(eager)(images, mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_static_visible_count_refuses_a_mask_with_another_count():
    method, masking, images, mask = _build(TINY_MAE)
    apply_fast_path(method, TrainConfig(), masking)
    method(images, mask)
    other = mask.clone()
    other[0].view(-1)[torch.nonzero(~other[0].view(-1))[0]] = True  # one more hidden unit in image 0
    with pytest.raises(RuntimeError, match="must hide"):
        method(images, other)


def test_sdpa_and_channels_last_switches_keep_the_loss():
    ref, _, images, mask = _build(TINY_SWIN)
    attn = [m for m in ref.modules() if hasattr(m, "fused_attn")]
    assert attn and not any(m.fused_attn for m in attn)  # timm keeps Swin's window attention off SDPA
    expected = _loss_and_grads(ref, images, mask)
    for train in (TrainConfig(), dataclasses.replace(TrainConfig(), sdpa=False, channels_last=True)):
        method, masking, _, _ = _build(TINY_SWIN)
        apply_fast_path(method, train, masking)
        assert all(m.fused_attn == train.sdpa for m in method.modules() if hasattr(m, "fused_attn"))
        convs = [m.weight for m in method.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == train.channels_last
                             for w in convs)
        _assert_same(_loss_and_grads(method, images, mask), expected, atol=1e-4)


def test_unknown_compile_mode_is_refused():
    method, masking, _, _ = _build(TINY_MAE)
    with pytest.raises(ConfigError, match="train.compile_mode"):
        apply_fast_path(method, dataclasses.replace(TrainConfig(), compile_mode="fastest"), masking)
