"""Tiny GLNet cases for the contract suite: the Swin-T layout (STL) and the advanced-design layout (4G/9G/16G)."""
from encoder_cases import EncoderCase

# Widths 16..128, one or two blocks a stage, 16 slots: every code path (patch merging / overlapped convs, GLMix,
# hybrid stage 3, conv position encoding, conv FFN) runs in milliseconds at 64 px.
# The registered name picks the layout (STL: patch merging, GLMix stage 3; 4G+: the advanced designs).
_TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 4), num_slots=16)
CASES = [
    EncoderCase("glnet_stl", "fill", 64, _TINY),
    EncoderCase("glnet_stl", "fill", (64, 96), _TINY),
    EncoderCase("glnet_4g", "fill", 64, _TINY),
    EncoderCase("glnet_4g", "fill", (96, 64), _TINY),
    # Shrunk, 9G/16G equal 4G; they are listed so the suite also builds them at full size.
    EncoderCase("glnet_9g", "fill", 64, _TINY),
    EncoderCase("glnet_16g", "fill", 64, _TINY),
]
