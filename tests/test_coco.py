"""MS-COCO captions data set: annotation parsing, bad images, caption draws, centre crop and resize."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from demar.config import ConfigError, validate
from demar.data.coco import (
    CocoConfig,
    CocoDataset,
    CocoFormatError,
    CocoSplit,
    center_crop_resize,
    read_annotations,
    read_index,
    scan,
    write_index,
)
from demar.data.folder import BadImageError
from demar.images import to_unit


def write_coco(root: Path, sizes: dict[int, tuple[int, int]], captions: dict[int, list[str]]) -> CocoSplit:
    """Images ``COCO_train2014_<id>.jpg`` of the given sizes and an official-format captions file."""
    images = root / "train2014"
    images.mkdir(parents=True)
    listed, anns = [], []
    for image_id, (w, h) in sizes.items():
        name = f"COCO_train2014_{image_id:012d}.png"
        arr = np.random.default_rng(image_id).integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(arr)
        (image.convert("L") if image_id == 30 else image).save(images / name)  # COCO holds some grey images
        listed.append({"id": image_id, "file_name": name, "width": w, "height": h, "license": 1})
    for image_id, texts in captions.items():
        anns += [{"image_id": image_id, "id": 1000 * image_id + k, "caption": t} for k, t in enumerate(texts)]
    ann = root / "annotations" / "captions_train2014.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({"info": {}, "licenses": [], "images": listed, "annotations": anns}, indent=1))
    return CocoSplit(images=str(images), annotations=str(ann))


SIZES = {9: (40, 30), 25: (30, 50), 30: (32, 32), 42: (64, 48)}
CAPTIONS = {
    42: ["A man riding a horse. ", "a horse on a beach"],
    9: ["Two plates of food.", "A lunch box.", "Bowls of fruit\n"],
    25: ["A giraffe eating leaves."],
    30: ["A vase of flowers.", "Flowers in a vase"],
}


@pytest.fixture
def coco(tmp_path) -> CocoSplit:
    return write_coco(tmp_path, SIZES, CAPTIONS)


def test_annotations_give_every_caption_in_id_order(coco):
    images, uncaptioned = read_annotations(coco.annotations)
    assert [im.id for im in images] == [9, 25, 30, 42] and uncaptioned == 0
    assert images[0].captions == ("Two plates of food.", "A lunch box.", "Bowls of fruit")
    assert images[3].captions == ("A man riding a horse.", "a horse on a beach")


def test_missing_image_each_on_bad_image_mode(coco, tmp_path):
    missing = Path(coco.images) / "COCO_train2014_000000000025.png"
    missing.unlink()
    (Path(coco.images) / "COCO_train2014_000000000030.png").write_bytes(b"\x89PNG not really")
    result = scan(coco, on_bad_image="skip", workers=2, progress=False)
    assert [s.id for s in result.samples] == [9, 42]
    assert [f for f, _ in result.skipped] == ["COCO_train2014_000000000025.png", "COCO_train2014_000000000030.png"]
    assert "FileNotFoundError" in result.skipped[0][1] and str(missing) in result.skipped[0][1]
    with pytest.raises(BadImageError) as err:
        scan(coco, on_bad_image="fail", workers=2, progress=False)
    assert str(missing) in str(err.value) and "data.coco.on_bad_image is 'fail'" in str(err.value)

    write_index(tmp_path / "index.json", result)
    back = read_index(tmp_path / "index.json")
    assert back.samples == result.samples and back.skipped == result.skipped
    assert back.annotations_sha256 == result.annotations_sha256
    ds = CocoDataset(back, resolution=16)
    assert len(ds) == 2 and len(ds.skipped) == 2
    assert ds.captions == [*CAPTIONS[9][:2], "Bowls of fruit", "A man riding a horse.", "a horse on a beach"]


def test_image_without_caption_is_left_out_and_counted(tmp_path):
    split = write_coco(tmp_path, SIZES, {k: v for k, v in CAPTIONS.items() if k != 30})
    result = scan(split, workers=1, progress=False)
    assert [s.id for s in result.samples] == [9, 25, 42] and result.uncaptioned == 1 and result.skipped == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"images": [{"id": 1, "file_name": "a.jpg"}],\n "annotations": [\n  {"image_id": 1 "caption": "x"}\n]}',
         r"captions_train2014\.json, line 3, column 18: not valid JSON"),
        ('{"images": [], "annotations": []', r"line 1, column 33: not valid JSON"),
        ('{"annotations": []}', r"<top> has no key 'images'"),
        ('{"images": [{"id": 1}], "annotations": []}', r"images\[0\] has no key 'file_name'"),
        ('{"images": [{"id": "1", "file_name": "a.jpg"}], "annotations": []}', r"images\[0\]\.id must be int, not str"),
        ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "a"}, '
         '{"image_id": 2, "caption": "b"}]}', r"annotations\[1\]\.image_id 2 is not the id of any listed image"),
        ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}',
         r"annotations\[0\] has no key 'caption'"),
        ('{"images": [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}], "annotations": []}',
         r"images\[1\]\.id 1 is listed twice"),
        ('[1, 2]', r"<top> must be an object, not list"),
    ],
)
def test_malformed_annotations_name_file_and_line_or_key(tmp_path, text, match):
    path = tmp_path / "captions_train2014.json"
    path.write_text(text)
    with pytest.raises(CocoFormatError, match=match) as err:
        read_annotations(path)
    assert str(path) in str(err.value)


def test_caption_draw_per_image_per_epoch(coco):
    scanned = scan(coco, workers=1, progress=False)
    ds = CocoDataset(scanned, resolution=16, seed=3)
    counts = [len(s.captions) for s in ds.samples]
    assert ds.offsets.tolist() == [0, 3, 4, 6, 8]
    draws = torch.stack([ds.caption_draw(e) for e in range(400)])  # [epochs, N]
    for i, n in enumerate(counts):  # each image's own captions, all of them, about equally often
        hits = torch.bincount(draws[:, i] - ds.offsets[i], minlength=n)
        assert hits.numel() == n and hits.min() > 400 / n * 0.7
    assert torch.equal(ds.caption_draw(5), CocoDataset(scanned, seed=3).caption_draw(5))
    assert not torch.equal(ds.caption_draw(5), CocoDataset(scanned, seed=4).caption_draw(5))
    assert not torch.equal(ds.caption_draw(5), ds.caption_draw(6))
    ds.set_epoch(7)
    ids = [ds[i][1] for i in range(len(ds))]
    assert ids == ds.caption_draw(7).tolist()
    assert all(ds.offsets[i] <= c < ds.offsets[i + 1] for i, c in enumerate(ids))
    assert [ds[i][1] for i in reversed(range(len(ds)))] == ids[::-1]  # independent of read order


def test_centre_crop_and_resize(coco):
    scanned = scan(coco, workers=1, progress=False)
    ds = CocoDataset(scanned, resolution=16, resize_filter="bicubic")
    grey, _ = ds[2]  # image 30, stored with one channel
    assert grey.shape == (3, 16, 16) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    x, _ = ds[3]  # image 42, 64 x 48: crop columns 8..56
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    with Image.open(ds.path(3)) as im:
        expected = np.asarray(im.convert("RGB").crop((8, 0, 56, 48)).resize((16, 16), Image.Resampling.BICUBIC))
    assert torch.equal(x, to_unit(torch.from_numpy(expected.copy()).permute(2, 0, 1)))
    tall = Image.fromarray(np.arange(30 * 50 * 3, dtype=np.uint8).reshape(50, 30, 3))
    out = center_crop_resize(tall, 30, "lanczos")  # already the short side: the crop alone
    assert np.array_equal(np.asarray(out), np.asarray(tall)[10:40])
    lanczos = CocoDataset(scanned, resolution=16)[3][0]
    assert not torch.equal(lanczos, x)  # the filter param is used


def test_config_is_strict():
    split = {"images": "a", "annotations": "b.json"}
    cfg = validate(CocoConfig, {"train": split}, prefix="data.coco")
    assert cfg.resolution == 256 and cfg.resize_filter == "lanczos" and cfg.on_bad_image == "skip"
    with pytest.raises(ConfigError, match=r"data\.coco\.resize_filter"):
        validate(CocoConfig, {"train": split, "resize_filter": "nearest"}, prefix="data.coco")
    with pytest.raises(ConfigError, match=r"data\.coco\.on_bad_image"):
        validate(CocoConfig, {"train": split, "on_bad_image": "ignore"}, prefix="data.coco")
    with pytest.raises(FileNotFoundError, match="MS-COCO images folder not found"):
        scan(CocoSplit(images="/nonexistent_coco", annotations="b.json"), progress=False)
