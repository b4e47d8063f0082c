from encoder_cases import EncoderCase

_TINY = dict(embed_dim=32, depth=2, num_heads=2)
CASES = [
    EncoderCase("mim_vit_tiny_patch16", "drop", 64, _TINY),
    EncoderCase("mim_vit_tiny_patch16", "fill", 64, _TINY),
    EncoderCase("mim_vit_tiny_patch16", "drop", (32, 64), {**_TINY, "patch_size": 8, "mask_unit": 16}),
    EncoderCase("mim_vit_base_patch16", "drop", 32, _TINY),
]
