from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from demar.config import ConfigError, validate
from demar.data import DataConfig, open_split, prepare
from demar.data.folder import BadImageError, FolderDataset, center_crop_adm, read_index, scan
from demar.io import read_json


def _save(path, array, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, format=fmt)


def _solid(h, w, rgb):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


@pytest.fixture
def folder(tmp_path):
    """Two classes (given in reverse order on disk), three good images, one truncated JPEG, one non-image."""
    root = tmp_path / "imagenet"
    _save(root / "zebra" / "z1.png", _solid(40, 60, (200, 10, 10)))
    _save(root / "zebra" / "z2.jpg", _solid(64, 64, (10, 200, 10)), "JPEG")
    _save(root / "apple" / "a1.png", _solid(80, 40, (10, 10, 200)))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "apple" / "a0_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "zebra" / "z0_not_an_image.jpg").write_text("hello")
    (root / "zebra" / "notes.txt").write_text("not counted: no image extension")
    return root


def test_classes_sorted_and_bad_images_skipped(folder):
    result = scan(folder, on_bad_image="skip", progress=False)
    assert result.classes == ["apple", "zebra"]
    assert result.samples == [("apple/a1.png", 0), ("zebra/z1.png", 1), ("zebra/z2.jpg", 1)]
    skipped = dict(result.skipped)
    assert set(skipped) == {"apple/a0_truncated.jpg", "zebra/z0_not_an_image.jpg"}
    assert str(folder / "apple" / "a0_truncated.jpg") in skipped["apple/a0_truncated.jpg"]
    ds = FolderDataset(result, resolution=32)
    assert len(ds) == 3 and ds.num_classes == 2
    x, label = ds[1]
    assert label == 1 and x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[:, 16, 16], torch.tensor([200, 10, 10]) / 127.5 - 1, atol=0.02)


def test_fail_mode_names_the_file(folder):
    with pytest.raises(BadImageError, match=r"a0_truncated\.jpg.*on_bad_image is 'fail'"):
        scan(folder, on_bad_image="fail", progress=False)


def test_file_broken_after_the_scan_is_an_error_not_a_shift(folder):
    ds = FolderDataset(scan(folder, progress=False), resolution=32)
    (folder / "zebra" / "z1.png").write_bytes(b"garbage")
    with pytest.raises(BadImageError, match=r"z1\.png.*passed the scan"):
        ds[1]
    assert ds[2][1] == 1  # other indices are unaffected


def test_prepare_imagenet_writes_index_and_skip_count(folder, tmp_path):
    cfg = validate(
        DataConfig,
        {
            "kind": "imagenet",
            "imagenet": {"root": str(folder), "reference_root": str(folder), "resolution": 32, "workers": 2},
        },
    )
    metrics = prepare(cfg, tmp_path / "prepared", progress=False)
    assert metrics["num_train"] == 3 and metrics["num_skipped"] == 2 and metrics["num_reference_skipped"] == 2
    assert metrics["num_classes"] == 2
    index = read_index(tmp_path / "prepared" / "train" / "index.json")
    assert [p for p, _ in index.skipped] == ["apple/a0_truncated.jpg", "zebra/z0_not_an_image.jpg"]
    ds = open_split(cfg, tmp_path / "prepared", "train")
    assert len(ds) == 3 and ds[0][0].shape == (3, 32, 32)
    assert read_json(tmp_path / "prepared" / "manifest.json")["num_skipped"] == 2

    failing = validate(DataConfig, {"kind": "imagenet", "imagenet": {"root": str(folder), "on_bad_image": "fail"}})
    with pytest.raises(BadImageError, match="a0_truncated.jpg"):
        prepare(failing, tmp_path / "prepared2", progress=False)


def test_imagenet_kind_needs_a_folder():
    with pytest.raises(ConfigError, match="data.imagenet"):
        validate(DataConfig, {"kind": "imagenet"}, prefix="data")
    with pytest.raises(ConfigError, match="on_bad_image"):
        validate(DataConfig, {"kind": "imagenet", "imagenet": {"root": "x", "on_bad_image": "ignore"}}, prefix="data")


def test_adm_center_crop():
    # Box-halving while the short side is >= 2 * size, then bicubic resize, then the center square.
    wide = _solid(64, 200, (0, 0, 255))
    wide[:, :50] = (0, 255, 0)  # a green band on the far left is cropped away
    out = np.asarray(center_crop_adm(Image.fromarray(wide), 32))
    assert out.shape == (32, 32, 3)
    assert (out[..., 1] < 10).all() and (out[..., 2] > 245).all()
    tall = center_crop_adm(Image.fromarray(_solid(300, 90, (7, 8, 9))), 32)
    assert tall.size == (32, 32) and (np.asarray(tall) == (7, 8, 9)).all()
    # Sizes along the way: 256 -> 128 -> 64 -> 32 by halving, then no resampling needed.
    gradient = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (256, 1, 3))
    out = np.asarray(center_crop_adm(Image.fromarray(gradient), 32)).astype(int)
    expected = gradient[0, :, 0].reshape(32, 8).mean(1)  # box filters average 8 columns
    assert np.abs(out[0, :, 0] - expected).max() <= 1


def test_random_flip_from_generator(tmp_path):
    img = _solid(32, 32, (0, 0, 0))
    img[:, :16] = 255
    _save(tmp_path / "f" / "c" / "x.png", img)
    result = scan(tmp_path / "f", progress=False)
    plain = FolderDataset(result, resolution=32)
    assert all(plain[0][0][0, 0, 0] > 0 for _ in range(5))  # no flips without a generator
    g = torch.Generator().manual_seed(0)
    flipping = FolderDataset(result, resolution=32, flip_generator=g)
    lefts = [flipping[0][0][0, 0, 0].item() > 0 for _ in range(40)]
    assert 5 < sum(lefts) < 35
    g2 = torch.Generator().manual_seed(0)
    again = FolderDataset(result, resolution=32, flip_generator=g2)
    assert [again[0][0][0, 0, 0].item() > 0 for _ in range(40)] == lefts
