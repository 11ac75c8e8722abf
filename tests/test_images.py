"""Pixel conversion and image readers (demar.images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from demar.images import (
    ArrayImageDataset,
    CorruptImageError,
    ImageFolderDataset,
    MissingFileError,
    UInt8ImageDataset,
    to_uint8,
    to_unit,
)


def test_to_uint8_rounds_and_clips_the_pixel_range():
    x = torch.tensor([-1.5, -1.0, -0.996, 0.0, 0.5, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 1, 128, 191, 255, 255]
    assert to_uint8(x.to(torch.bfloat16)).dtype == torch.uint8
    u = torch.tensor([3, 200], dtype=torch.uint8)
    assert to_uint8(u) is u
    with pytest.raises(TypeError, match="int64"):
        to_uint8(torch.tensor([1, 2]))


def test_to_unit_inverts_to_uint8_on_every_pixel_value():
    u = torch.arange(256, dtype=torch.uint8)
    x = to_unit(u)
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(to_uint8(x), u)


def test_readers_give_the_same_uint8_images(tmp_path):
    g = torch.Generator().manual_seed(0)
    arrays = torch.randint(0, 256, (3, 8, 8, 3), generator=g, dtype=torch.uint8).numpy()
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    folder, array = ImageFolderDataset(tmp_path), ArrayImageDataset(arrays)
    floats = UInt8ImageDataset([(to_unit(torch.from_numpy(a).permute(2, 0, 1)), 0) for a in arrays])
    for i in range(3):
        expected = torch.from_numpy(arrays[i]).permute(2, 0, 1)
        assert torch.equal(folder[i], expected) and torch.equal(array[i], expected) and torch.equal(floats[i], expected)
    assert folder.digest() != ImageFolderDataset(tmp_path, ["0.png", "1.png"]).digest()


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(MissingFileError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(CorruptImageError, match="bad.png"):
        ImageFolderDataset(tmp_path)
