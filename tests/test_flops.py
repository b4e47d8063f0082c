"""FLOP counting as the papers and the bench harness need it."""
import torch
from torch import nn

from mimtrain.bench.flops import count_macs


def test_depthwise_conv_backward_costs_two_forwards():
    # torch's stock formula drops `groups` from grad_weight: a depth-wise conv's backward would count C times over.
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=64)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    fwd = count_macs(lambda: conv(x))
    fwd_bwd = count_macs(lambda: conv(x).sum().backward())
    assert fwd == 2 * 64 * 8 * 8 * 9  # B x C x H x W x k^2
    assert fwd_bwd == 3 * fwd


def test_cpu_attention_is_counted():
    q = torch.randn(1, 2, 16, 8)
    assert count_macs(lambda: nn.functional.scaled_dot_product_attention(q, q, q)) == 2 * 2 * 16 * 16 * 8
