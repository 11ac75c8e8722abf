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


ROOT = Path(__file__).resolve().parent.parent


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


# ----------------------------------------------------------------------------- the data stage's coco kind


def test_data_stage_prepares_coco_splits_with_their_captions_and_preprocessing(tmp_path):
    from demar.data import DataConfig, open_split, prepare, split_captions
    from demar.image_sets import open_images

    train = write_coco(tmp_path / "train", SIZES, CAPTIONS)
    val = write_coco(tmp_path / "val", {5: (20, 40), 7: (24, 24)}, {5: ["A dog."], 7: ["A cat.", "A cat on a mat."]})
    Path(val.images, "COCO_train2014_000000000007.png").unlink()  # listed, missing: skipped and counted
    cfg = DataConfig(kind="coco", coco={"train": train, "val": val, "resolution": 16, "resize_filter": "bicubic"})
    metrics = prepare(cfg, tmp_path / "data", progress=False)
    assert (metrics["num_train"], metrics["num_reference"], metrics["num_reference_skipped"]) == (4, 1, 1)
    assert metrics["num_classes"] == 1 and cfg.resolution == 16

    captions, groups = split_captions(cfg, tmp_path / "data", "train")  # ids 9, 25, 30, 42
    assert groups == [[0, 1, 2], [3], [4, 5], [6, 7]]
    assert captions[6] == "A man riding a horse." and len(captions) == 8

    ds = open_split(cfg, tmp_path / "data", "train")
    image, label = ds[3]
    assert image.shape == (3, 16, 16) and label == 0 and ds.num_classes == 1 and list(ds.labels) == [0] * 4
    with Image.open(Path(train.images) / "COCO_train2014_000000000042.png") as im:
        expected = to_unit(torch.from_numpy(np.asarray(center_crop_resize(im.convert("RGB"), 16, "bicubic")).copy()))
    torch.testing.assert_close(image, expected.permute(2, 0, 1))

    reference = open_images(tmp_path / "data" / "reference")  # what evaluate.reference points at
    assert len(reference) == 1 and reference[0].dtype == torch.uint8 and reference[0].shape == (3, 16, 16)


def test_coco_kind_needs_its_section():
    from demar.data import DataConfig

    with pytest.raises(ConfigError, match="data.coco"):
        validate(DataConfig, {"kind": "coco"}, source="params.yaml", prefix="data")


def test_reference_prompts_draw_one_caption_per_image_by_the_seed(tmp_path):
    from demar.captions import CaptionsConfig, encode_captions
    from demar.data import DataConfig, prepare, split_captions
    from demar.io import write_json
    from demar.params import load_params
    from demar.text_encoders import TextEncoderConfig, build_text_encoder
    from pipelines.sample import reference_prompts
    from tiny_text import write_tiny_clip

    val = write_coco(tmp_path / "val", SIZES, CAPTIONS)
    data_cfg = {"kind": "coco", "coco": {"train": val, "val": val, "resolution": 16}}
    prepare(DataConfig.model_validate(data_cfg), tmp_path / "data", progress=False)
    captions, groups = split_captions(DataConfig.model_validate(data_cfg), tmp_path / "data", "reference")
    clip = write_tiny_clip(tmp_path / "clip", width=8)
    encoder = build_text_encoder(TextEncoderConfig(kind="clip", path=str(clip), max_length=8))
    cache = tmp_path / "captions"
    encode_captions(encoder, captions, cache, CaptionsConfig(shard_size=3, batch_size=4), progress=False)
    write_json(cache / "images.json", groups)
    params = load_params(ROOT / "presets" / "mscoco256.yaml")
    params = params.model_copy(update={"data": DataConfig.model_validate(data_cfg)})

    drawn = [reference_prompts(params, cache, tmp_path / "data", 4, seed) for seed in (0, 0, 1, 2, 3)]
    assert drawn[0].captions == drawn[1].captions and drawn[0].source == drawn[1].source
    for prompts in drawn:
        assert [captions.index(c) in g for c, g in zip(prompts.captions, groups, strict=True)] == [True] * 4
        assert prompts.labels == [0, 0, 0, 0] and prompts.states.shape == (4, 8, 8)
    assert len({tuple(p.captions) for p in drawn}) > 1 and len({p.source for p in drawn}) == 4
    with pytest.raises(ConfigError, match="5 images asked for"):
        reference_prompts(params, cache, tmp_path / "data", 5, 0)


def test_mscoco256_preset_is_the_papers_protocol():
    from demar.params import load_params

    params = load_params(ROOT / "presets" / "mscoco256.yaml")
    assert params.data.kind == "coco" and params.captions.encoder.kind == "clip"
    assert params.captions.encoder.max_length == 77 and params.sample.num_images == 30_000
    for name in ("mar", "demar"):
        cfg = params.row_model(name)
        assert (cfg.context, cfg.text_dim, cfg.encoder_depth + cfg.decoder_depth) == ("text", 768, 16)
        assert cfg.buffer_size >= 77 and cfg.masking.distribution == "beta"
    assert (params.train.base_lr * params.train.batch_size / 256, params.train.weight_decay) == (2e-4, 0.03)
