"""Model sizes: one registry entry per size, the architecture fields it fixes in a ModelConfig.

B / L / H are MAR's sizes (mar-reference.md, "Model") and De-MAR's Table 1:
width 768 / 1024 / 1280, encoder = decoder depth 12 / 16 / 20 (24 / 32 / 40
blocks in all), 12 / 16 / 16 heads, MLP ratio 4, MAR's MLP head 6 x 1024 /
8 x 1280 / 12 x 1536 and De-MAR's Transformer head of 4 / 6 / 9 blocks.

The paper does not give the Transformer head's width. We choose it so that
De-MAR's total lands nearest the paper's count; every width keeps 16 heads.
Counts at ImageNet 256 (N = 256 tokens of d = 16, 1000 classes, 64 buffer
tokens, learn_sigma, denoising-head hidden width = D), from ``demar params``:

| size | MAR (paper)        | Transformer head | De-MAR (paper)       |
|------|--------------------|------------------|----------------------|
| B    | 207.92M (208M)     | 4 x 1024         | 228.06M (227M, +0.5%) |
| L    | 478.33M (479M)     | 6 x 1216         | 521.07M (524M, -0.6%) |
| H    | 942.40M (943M)     | 9 x 1344         | 999.47M (995M, +0.4%) |

De-MAR's total is the backbone (MAR minus its MLP head), the Transformer head and
the denoising head (1.23M / 2.17M / 3.36M).

``S`` is the light model of the MS-COCO experiment (Table 3): the paper gives only its
16 MAR blocks, split as MAR splits them (8 encoder + 8 decoder). We take the width of
the Table 3 peers of the same scale (U-ViT-S: 512, 8 heads) and scale the heads down
from B (MLP head 3 x 768, Transformer head 3 x 512): 62.84M for MAR and 63.07M for
De-MAR at MS-COCO 256 (N = 256 tokens of d = 16, 77 caption tokens of width 768).

``micro``, ``tiny`` and ``small`` are for CPU work (``micro`` is the smallest member of
the embedded preset's size families) at N = 64 tokens of d = 4..8: tiny trains
a few hundred steps in minutes on two cores; small has about 3.9x tiny's
parameters (MAR row at N = 64, d = 8, 10 classes: 0.75M vs 2.94M; De-MAR:
0.81M vs 3.13M).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PAPER_PARAMS_M", "SIZES", "SizeSpec", "get_size"]


@dataclass(frozen=True)
class SizeSpec:
    """The architecture fields one size fixes.

    Attributes:
        width: transformer width D (encoder and decoder).
        depth: encoder blocks = decoder blocks.
        num_heads: backbone attention heads.
        mlp_head_depth: residual blocks of MAR's MLP diffusion head.
        mlp_head_width: width of MAR's MLP diffusion head.
        transformer_head_depth: blocks of De-MAR's Transformer diffusion head.
        transformer_head_width: width of the Transformer diffusion head.
        transformer_head_heads: cross-attention heads of the Transformer head.
    """

    width: int
    depth: int
    num_heads: int
    mlp_head_depth: int
    mlp_head_width: int
    transformer_head_depth: int
    transformer_head_width: int
    transformer_head_heads: int

    def model_fields(self) -> dict[str, Any]:
        """The :class:`demar.model.ModelConfig` fields of this size (nested heads as dicts)."""
        return {
            "width": self.width,
            "encoder_depth": self.depth,
            "decoder_depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_head": {"depth": self.mlp_head_depth, "width": self.mlp_head_width},
            "transformer_head": {
                "depth": self.transformer_head_depth,
                "width": self.transformer_head_width,
                "num_heads": self.transformer_head_heads,
            },
        }


SIZES: dict[str, SizeSpec] = {
    "micro": SizeSpec(64, 1, 4, 2, 96, 2, 64, 4),
    "tiny": SizeSpec(96, 2, 4, 2, 128, 2, 96, 4),
    "small": SizeSpec(160, 3, 5, 3, 224, 2, 192, 6),
    "S": SizeSpec(512, 8, 8, 3, 768, 3, 512, 8),
    "B": SizeSpec(768, 12, 12, 6, 1024, 4, 1024, 16),
    "L": SizeSpec(1024, 16, 16, 8, 1280, 6, 1216, 16),
    "H": SizeSpec(1280, 20, 16, 12, 1536, 9, 1344, 16),
}
"""Registered sizes by name."""

PAPER_PARAMS_M: dict[str, dict[str, float]] = {
    "B": {"mar": 208.0, "demar": 227.0},
    "L": {"mar": 479.0, "demar": 524.0},
    "H": {"mar": 943.0, "demar": 995.0},
}
"""Parameter counts in millions reported by the paper (Tables 1, 2) for the MAR row and full De-MAR."""


def get_size(name: str) -> SizeSpec:
    """The registered size ``name``, or a ``KeyError`` listing the known names.

    Args:
        name: a key of :data:`SIZES`.
    """
    if name not in SIZES:
        raise KeyError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)}")
    return SIZES[name]
