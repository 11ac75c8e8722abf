"""Latents paired with caption states: the training set of the text-to-image rows.

Item ``(i, epoch)`` of :class:`TextLatentDataset` is latent ``i``'s moments with the
token states of one caption of its image, drawn afresh each epoch (the MS-COCO
protocol: every caption of an image is usable, one drawn at random per image per
epoch). The draw depends only on ``(seed, epoch, image)``, so a resumed run, another
process or another DataLoader worker draws the same caption. The caption cache
(:mod:`demar.captions`) holds the states; training never runs the text encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from demar.captions import CaptionCache
from demar.latents import LatentDataset
from demar.rng import derive_seed

__all__ = ["TextLatentDataset"]


class TextLatentDataset(Dataset):
    """``ds[(i, epoch)] -> (moments float32 [2, 2C, h, w], states float32 [L, C])``; ``ds[i]`` is epoch 0.

    Args:
        latents: the latent cache; its ``indices`` name each latent's source image.
        captions: the caption cache.
        seed: the run's seed (the caption draw depends on it).
        captions_of: for each source image, the cache indices of its captions
            (default None: one caption per image, caption ``k`` belongs to image ``k``).

    Raises:
        ValueError: an image of the latent cache has no caption (the message names it),
            or a caption index is outside the cache.
    """

    def __init__(
        self,
        latents: LatentDataset,
        captions: CaptionCache,
        seed: int,
        captions_of: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.latents, self.captions, self.seed = latents, captions, seed
        self.sources = latents.source_indices()  # [N] source image of each latent
        if captions_of is None:
            captions_of = [[k] for k in range(len(captions))]
        self.captions_of = [list(c) for c in captions_of]
        for i, source in enumerate(self.sources.tolist()):
            if source >= len(self.captions_of) or not self.captions_of[source]:
                raise ValueError(
                    f"latent {i} (image {source}) has no caption in {captions.root} "
                    f"({len(self.captions_of)} images have captions)"
                )
        bad = [k for c in self.captions_of for k in c if not 0 <= k < len(captions)]
        if bad:
            raise ValueError(f"caption index {bad[0]} is outside {captions.root} ({len(captions)} captions)")
        self.scale = latents.scale
        self.manifest = {"latents": latents.manifest, "captions": captions.manifest}

    def __len__(self) -> int:
        return len(self.latents)

    def caption_index(self, i: int, epoch: int) -> int:
        """The cache index of the caption latent ``i`` is paired with in ``epoch``."""
        source = int(self.sources[i])
        options = self.captions_of[source]
        if len(options) == 1:
            return options[0]
        return options[derive_seed(self.seed, "caption", epoch, source) % len(options)]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        moments, _ = self.latents[i]
        states, _ = self.captions[self.caption_index(i, epoch)]
        return moments, states
