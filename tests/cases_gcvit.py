"""Tiny GC ViT cases for the contract suite (fill mode only).

Shrunk, the sizes differ only in layer scale and MLP ratio, which the xtiny case turns on; `tests/test_simmim.py`
checks that every registered size builds (on the meta device) with the paper's parameter count.
"""
from encoder_cases import EncoderCase

# Widths 16..128, two blocks a stage (local then global attention). timm sizes the windows as img_size / (32, 32, 16,
# 32): at 64 px windows 2, 2, 4, 2 over stage grids 16, 8, 4, 2 (three, two, zero, zero generator levels); at 96 px
# windows 3, 3, 6, 3 over 24, 12, 6, 3.
_TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
CASES = [
    EncoderCase("simmim_gcvit_xxtiny", "fill", 64, _TINY),
    # non-square windows and query grids; GC ViT-S/B's layer scale and MLP ratio 2
    EncoderCase("simmim_gcvit_xtiny", "fill", (64, 128), {**_TINY, "layer_scale": 1e-5, "mlp_ratio": 2}),
    EncoderCase("simmim_gcvit_tiny", "fill", 96, {**_TINY, "mask_unit": 16}),
]
