"""Tiny Swin cases for the contract suite (fill mode only).

Shrunk, every size equals tiny, so the suite lists the tiny names and SimMIM's Swin-B/192; `tests/test_simmim.py`
checks that every registered size builds (on the meta device) with the paper's parameter count.
"""
from encoder_cases import EncoderCase

# Widths 16..128, two blocks a stage (so the shifted-window block runs), window 2: at 64 px the stage grids are
# 16, 8, 4 and 2 tokens, all divisible by the window. The window-4 case also runs the "window >= grid" clamp.
_TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=2)
CASES = [
    EncoderCase("simmim_swin_tiny_patch4_window6", "fill", 64, _TINY),
    EncoderCase("simmim_swin_tiny_patch4_window7", "fill", (64, 128), _TINY),  # non-square
    EncoderCase("simmim_swin_base_patch4_window6", "fill", 64, {**_TINY, "window_size": 4, "mask_unit": 16}),
]
