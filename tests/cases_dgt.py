"""Tiny DGT cases for the contract suite (fill mode only; all three registered variants)."""
from encoder_cases import EncoderCase

# Widths 8..64, one block a stage, 4 groups, 8 keys: at 64 px stages 1-3 hold 256, 64 and 16 tokens, so every stage
# below 4 runs the real grouped path (k < N) and stage 4 the global one. dgt_small/base keep post-norm + cosine.
_TINY = dict(stem_dim=8, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_groups=4, topk=8,
             head_hidden=32)
CASES = [
    EncoderCase("dgt_tiny", "fill", 64, _TINY),
    EncoderCase("dgt_tiny", "fill", (64, 96), _TINY),
    EncoderCase("dgt_tiny", "fill", 64, {**_TINY, "mask_unit": 16}),
    EncoderCase("dgt_small", "fill", 64, _TINY),
    EncoderCase("dgt_base", "fill", (96, 64), _TINY),
]
