"""Tiny GPViT configurations for the encoder contract suite (fill mode only: GPViT needs the whole token grid)."""
from encoder_cases import EncoderCase

# 3 layers with GP blocks at layers 0 and 2 (from 0), so both block kinds and the GP-block ordering are exercised.
_TINY = dict(embed_dim=24, depth=3, num_heads=4, gp_positions=(0, 2), group_nums=(8, 4), group_heads=2, stem_chs=8)
CASES = [
    EncoderCase("gpvit_l1", "fill", 64, _TINY),
    EncoderCase("gpvit_l2", "fill", (32, 64), _TINY),  # non-square
    # 5x7 token grid: strip size 2 divides neither side, so the padded-and-masked strip path runs.
    EncoderCase("gpvit_l3", "fill", (40, 56), {**_TINY, "mask_unit": 8}),
    EncoderCase("gpvit_l4", "fill", (64, 32), {**_TINY, "mask_unit": 16}),
]
