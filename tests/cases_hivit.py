from encoder_cases import EncoderCase

# Table 7's layout at toy width: stage-1/2 MLP blocks, 16-px main-stage tokens with relative position bias.
_TINY = dict(dims=(16, 32, 64), depths=(1, 1, 2), num_heads=2)
CASES = [
    EncoderCase("hivit_tiny", "drop", 64, _TINY),
    EncoderCase("hivit_tiny", "fill", 64, _TINY),
    EncoderCase("hivit_small", "drop", (32, 64), _TINY),  # non-square: relative bias built for a 2x4 grid
    EncoderCase("hivit_base", "fill", (64, 32), {**_TINY, "mask_unit": 8}),  # SimMIM-style cells finer than a token
    EncoderCase("hivit_large", "drop", 64, {**_TINY, "mask_unit": 32}),  # one unit = 2x2 main-stage tokens
]
