"""Activation checkpointing (`set_grad_checkpointing`, `train.grad_checkpointing`): per family, the same loss and
gradients (<= 1e-6 in fp32) with and without it, and fewer bytes saved for backward (counted with
`torch.autograd.graph.saved_tensors_hooks`, which sees what autograd keeps outside the recomputed blocks)."""
from __future__ import annotations

import copy
import importlib
import pathlib

import pytest
import torch

from encoder_cases import EncoderCase
from mimtrain.encoders import build_encoder


def _first_case_per_family() -> list[EncoderCase]:
    return [importlib.import_module(p.stem).CASES[0] for p in sorted(pathlib.Path(__file__).parent.glob("cases_*.py"))]


FAMILIES = _first_case_per_family()


def _mask(model, case: EncoderCase) -> torch.Tensor:
    gh, gw = (s // model.mask_unit for s in case.hw)
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.randperm(gh * gw, generator=g) < (gh * gw) // 2 for _ in range(2)]).view(2, gh, gw)


def _loss_grads_saved(model, x, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One training forward/backward through both paths (masked encode, unmasked forward_features): (loss,
    gradients, bytes autograd saved for backward)."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.encode(x, mask).pow(2).mean() + model.forward_features(x).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved[0]


@pytest.mark.parametrize("case", FAMILIES, ids=[c.name for c in FAMILIES])
def test_checkpointing_keeps_the_gradients_and_saves_fewer_activations(case):
    torch.manual_seed(0)
    plain = build_encoder(case.name, case.img_size, mask_mode=case.mask_mode, num_classes=0, **case.kwargs).train()
    ckpt = copy.deepcopy(plain)  # identical weights and buffers (DGT's centroids, which training forwards update)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, *case.hw, generator=torch.Generator().manual_seed(1))
    mask = _mask(plain, case)
    loss_a, grads_a, saved_a = _loss_grads_saved(plain, x, mask)
    loss_b, grads_b, saved_b = _loss_grads_saved(ckpt, x, mask)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() == {n for n, p in plain.named_parameters() if p.requires_grad}
    worst = max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)
    assert worst <= 1e-6, f"largest gradient difference {worst:.2e}"
    for (n, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), f"buffer {n} differs after the step (a recomputation updated it again?)"
    assert saved_b < 0.7 * saved_a, f"checkpointing saved {saved_b} bytes vs {saved_a} without"


def test_train_grad_checkpointing_reaches_the_pretraining_encoder():
    from mimtrain.config.pretrain import Config
    from mimtrain.methods import build_pretraining

    cfg = Config()
    cfg.encoder.name, cfg.encoder.kwargs, cfg.data.img_size = "mim_vit_tiny_patch16", dict(depth=2, embed_dim=32,
                                                                                          num_heads=2), 32
    cfg.method.decoder_dim, cfg.method.decoder_depth, cfg.method.decoder_heads = 32, 1, 2
    assert not build_pretraining(cfg)[0].encoder.grad_checkpointing
    cfg.train.grad_checkpointing = True
    assert build_pretraining(cfg)[0].encoder.grad_checkpointing


def test_bench_times_each_recipe_with_and_without_checkpointing(capsys):
    from mimtrain.cli import main

    main(["bench", "--recipe", "recipes/pretrain/mae_vit_tiny_cpu.yaml", "--grad-checkpointing", "both", "--dry-run"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("recipes/")]
    assert len(lines) == 2 and "train.grad_checkpointing=true" not in lines[0]
    assert "train.grad_checkpointing=true" in lines[1]
