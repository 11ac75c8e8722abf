"""Small shared fixtures-as-values for the tests."""

from __future__ import annotations

from demar.tokenizer import TokenizerConfig

TINY_TOKENIZER = TokenizerConfig(
    resolution=32,
    ch=8,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    decoder_res_blocks=1,
    attn_resolutions=(),
    z_channels=4,
    embed_dim=4,
    norm_groups=4,
)
"""A 32x32 -> 8x8x4 KL tokenizer small enough to train in seconds."""
