"""Text-conditioned training: latents paired with cached caption states, one caption per image per epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
import torch

from demar.captions import CaptionCache, CaptionsConfig, encode_captions
from demar.config import ConfigError
from demar.model import ABLATION_ROWS, DeMAR, ModelConfig
from demar.params import RowConfig, row_model_config
from demar.text_encoders import TextEncoderConfig, build_text_encoder
from demar.text_latents import TextLatentDataset
from demar.latents import LatentDataset
from demar.train import train
from test_train import TINY_KNOBS, assert_same_weights, tiny_train_cfg, weights, write_latents
from tiny_text import write_tiny_clip

N_IMAGES, WIDTH, LENGTH = 32, 32, 8  # tiny CLIP: 32 wide; captions cut to 8 tokens (buffer_size 8)
COLOURS, SHAPES = ("red", "blue", "green", "white"), ("circle", "square")


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    """Two captions per image (image k: captions 2k and 2k + 1), encoded by a tiny CLIP."""
    clip = write_tiny_clip(tmp_path_factory.mktemp("clip"), width=WIDTH)
    encoder = build_text_encoder(TextEncoderConfig(kind="clip", path=str(clip), max_length=LENGTH))
    texts = [f"a {c} {SHAPES[k % 2]} {v}" for k in range(N_IMAGES) for c, v in ((COLOURS[k % 4], "here"), ("plain", "too"))]
    out = tmp_path_factory.mktemp("captions")
    encode_captions(encoder, texts, out, CaptionsConfig(shard_size=16, batch_size=16), progress=False)
    return out


def text_model_cfg(ablation: str = "demar") -> ModelConfig:
    knobs = {**TINY_KNOBS, "context": "text", "text_dim": WIDTH}
    return row_model_config(RowConfig(ablation=ablation, size="tiny", seed=0), knobs)


def pairs() -> list[list[int]]:
    return [[2 * k, 2 * k + 1] for k in range(N_IMAGES)]


def test_each_image_gets_one_of_its_own_captions_drawn_per_epoch(tmp_path, captions):
    latents = LatentDataset(write_latents(tmp_path / "latents", n=N_IMAGES))
    cache = CaptionCache(captions)
    ds = TextLatentDataset(latents, cache, seed=5, captions_of=pairs())
    draws = [[ds.caption_index(i, epoch) for i in range(N_IMAGES)] for epoch in range(6)]
    assert all(d[i] in (2 * i, 2 * i + 1) for d in draws for i in range(N_IMAGES)), "only the image's own captions"
    assert len({tuple(d) for d in draws}) == 6, "another draw each epoch"
    assert draws == [[ds.caption_index(i, e) for i in range(N_IMAGES)] for e in range(6)], "a function of (seed, epoch, image)"
    other_seed = TextLatentDataset(latents, cache, seed=6, captions_of=pairs())
    assert [other_seed.caption_index(i, 0) for i in range(N_IMAGES)] != draws[0]
    both = {ds.caption_index(i, e) % 2 for i in range(N_IMAGES) for e in range(6)}
    assert both == {0, 1}, "both captions of an image are used"

    moments, states = ds[(3, 2)]
    assert torch.equal(moments, latents[3][0])
    assert torch.equal(states, cache[ds.caption_index(3, 2)][0]) and states.shape == (LENGTH, WIDTH)
    assert torch.equal(ds[3][1], ds[(3, 0)][1]), "a bare index is epoch 0"

    with pytest.raises(ValueError, match="latent 31 .image 31. has no caption"):
        TextLatentDataset(latents, cache, seed=0, captions_of=pairs()[:31])


@pytest.mark.slow  # a few seconds per row on one core
@pytest.mark.parametrize("row", list(ABLATION_ROWS))
def test_each_row_with_text_context_overfits_a_fixed_batch(row):
    torch.manual_seed(0)
    cfg = ModelConfig.from_size(
        "tiny", token_dim=4, seq_len=16, buffer_size=8, context="text", text_dim=WIDTH, **ABLATION_ROWS[row],
        attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.0, masking={"mask_ratio_max": 0.9},
        diffusion={"learn_sigma": False},
    )  # fmt: skip
    model = DeMAR(cfg)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(4, 16, 4, generator=g), torch.randn(4, LENGTH, WIDTH, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        out = model(x, text, torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] / 10, (row, losses[0], losses[-1])
    assert model.backbone.context_proj.weight.grad.abs().sum() > 0, "the text tokens reach the loss"


def test_text_training_reads_the_caption_cache_and_resumes_to_the_same_weights(tmp_path, captions):
    latents = write_latents(tmp_path / "latents", n=N_IMAGES)
    cfg, model_cfg = tiny_train_cfg(), text_model_cfg()
    # captions_of defaults to caption k for image k: the first N_IMAGES captions of the cache
    full = train(model_cfg, cfg, latents_dir=latents, captions_dir=captions, out_dir=tmp_path / "full", progress=False)
    assert full.metrics["steps"] == 8 and all(torch.isfinite(torch.tensor(r["loss"])) for r in full.history)

    class Stop(RuntimeError):
        pass

    def stop_at_5(step, model, ema):
        if step == 5:
            raise Stop

    out = tmp_path / "killed"
    with pytest.raises(Stop):
        train(model_cfg, cfg, latents_dir=latents, captions_dir=captions, out_dir=out, callback=stop_at_5, progress=False)
    resumed = train(model_cfg, cfg, latents_dir=latents, captions_dir=captions, out_dir=out, progress=False)
    assert resumed.resumed_from == 4  # the last checkpoint (every 2 steps) before the stop
    assert_same_weights(weights(full.model_path), weights(resumed.model_path))
    assert_same_weights(weights(full.model_path, use_ema=True), weights(resumed.model_path, use_ema=True))


def test_text_training_without_a_matching_cache_is_an_error_naming_the_key(tmp_path, captions):
    latents = write_latents(tmp_path / "latents", n=N_IMAGES)
    with pytest.raises(ConfigError, match="needs the caption cache"):
        train(text_model_cfg(), tiny_train_cfg(), latents_dir=latents, out_dir=tmp_path / "a", progress=False)
    wrong = text_model_cfg().model_copy(update={"text_dim": WIDTH + 1})
    with pytest.raises(ConfigError, match="model.text_dim is 33 but the caption cache"):
        train(wrong, tiny_train_cfg(), latents_dir=latents, captions_dir=captions, out_dir=tmp_path / "b", progress=False)


def test_encode_captions_stage_writes_each_split_once_and_the_train_stage_reads_it(tmp_path, mlflow_uri):
    from demar.data import DataConfig, prepare
    from demar.io import read_json
    from pipelines.encode_captions import main as encode_stage
    from pipelines.train import main as train_stage

    clip = write_tiny_clip(tmp_path / "clip", width=WIDTH)
    data = {"kind": "embedded", "embedded": {"num_train": N_IMAGES, "num_reference": 8, "chunk_size": 16}}
    prepare(DataConfig(**data), tmp_path / "data", progress=False)
    params = {
        "preset": "testing",
        "data": data,
        "captions": {"encoder": {"kind": "clip", "path": str(clip), "max_length": LENGTH}, "shard_size": 16,
                     "batch_size": 16, "device": "cpu"},
        "model": {**TINY_KNOBS, "context": "text", "text_dim": WIDTH},
        "rows": {"text_mar": {"ablation": "mar", "size": "tiny", "seed": 1}},
        "train": {"batch_size": 8, "micro_batches": 1, "epochs": 0.5, "warmup_epochs": 0.0, "num_workers": 0,
                  "checkpoint_every": 10, "log_every": 1},
        "tracking": {"enabled": True, "system_metrics": False},
    }  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    encode = ["--params", str(tmp_path / "params.yaml"), "--data", str(tmp_path / "data"), "--out",
              str(tmp_path / "captions"), "--metrics", str(tmp_path / "captions.json"), "--no-progress"]  # fmt: skip
    assert encode_stage(encode) == 0
    first = read_json(tmp_path / "captions.json")
    assert (first["train_captions"], first["reference_captions"], first["width"]) == (N_IMAGES, 8, WIDTH)
    assert read_json(tmp_path / "captions" / "train" / "images.json") == [[k] for k in range(N_IMAGES)]
    cache = CaptionCache(tmp_path / "captions" / "train")
    assert cache.caption(3) == read_json(tmp_path / "data" / "train" / "captions.json")[3]
    assert encode_stage(encode) == 0
    assert read_json(tmp_path / "captions.json")["train_reused_shards"] == 2, "a second run encodes nothing"

    write_latents(tmp_path / "latents", n=N_IMAGES)
    status = train_stage(
        ["--row", "text_mar", "--params", str(tmp_path / "params.yaml"), "--latents", str(tmp_path / "latents"),
         "--captions", str(tmp_path / "captions" / "train"), "--tokenizer", str(tmp_path / "none.pt"),
         "--models", str(tmp_path / "models"), "--metrics", str(tmp_path / "metrics"), "--no-progress"]
    )  # fmt: skip
    assert status == 0 and read_json(tmp_path / "metrics" / "text_mar.json")["steps"] == 2

    # The sample stage draws image i from the caption of reference image i.
    from demar.tokenizer import Tokenizer, TokenizerConfig
    from pipelines.sample import main as sample_stage

    tok_cfg = TokenizerConfig(resolution=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, decoder_res_blocks=1,
                              attn_resolutions=(), z_channels=4, embed_dim=4, norm_groups=4)  # fmt: skip
    Tokenizer(tok_cfg, scale=1.0).save(tmp_path / "models" / "tokenizer.pt")
    params["sample"] = {"num_images": 4, "batch_size": 2, "untrained_num_images": 2, "grid_size": 2,
                        "sampler": {"num_iter": 2, "diffusion_steps": 3}}  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    sample = ["--row", "text_mar", "--params", str(tmp_path / "params.yaml"), "--models", str(tmp_path / "models"),
              "--captions", str(tmp_path / "captions" / "reference"), "--data", str(tmp_path / "data"),
              "--out", str(tmp_path / "samples"), "--no-progress"]  # fmt: skip
    assert sample_stage(sample) == 0
    drawn = read_json(tmp_path / "samples" / "text_mar" / "manifest.json")["images"]
    reference = tmp_path / "data" / "reference"
    assert [e["caption"] for e in drawn] == read_json(reference / "captions.json")[:4]
    assert [e["label"] for e in drawn] == np.load(reference / "labels.npy")[:4].tolist()

    del params["captions"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    from demar.params import load_params

    with pytest.raises(ConfigError, match="captions: model.context is 'text'"):
        load_params(tmp_path / "params.yaml")


def test_generate_draws_image_i_from_prompt_i_and_records_its_caption(tmp_path):
    from demar.captions import Prompts
    from demar.generate import GenerateConfig, generate
    from demar.io import read_json
    from test_generate import SETTINGS, tiny_tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig.from_size("tiny", token_dim=4, seq_len=64, buffer_size=8, context="text", text_dim=8)
    model = DeMAR(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    tokenizer = tiny_tokenizer()
    states = torch.randn(6, 6, 8, generator=g)
    prompts = Prompts(states, [f"prompt {i}" for i in range(6)], [i % 4 for i in range(6)], source="test")
    gen_cfg = GenerateConfig.model_validate({"num_images": 6, "batch_size": 3, "seed": 3, "sampler": SETTINGS,
                                             "grid_size": 2})  # fmt: skip

    result = generate(model, tokenizer, gen_cfg, tmp_path / "a", num_classes=4, progress=False, prompts=prompts)
    images = read_json(tmp_path / "a" / "manifest.json")["images"]
    assert [(e["caption"], e["label"]) for e in images] == [(f"prompt {i}", i % 4) for i in range(6)]
    assert result.labels == prompts.labels and (tmp_path / "a" / "grid.png").is_file()

    def pngs(folder: Path) -> list[bytes]:
        return [p.read_bytes() for p in sorted(folder.glob("[0-9]*.png"))]

    generate(model, tokenizer, gen_cfg, tmp_path / "b", num_classes=4, progress=False, prompts=prompts)
    assert pngs(tmp_path / "a") == pngs(tmp_path / "b"), "the same prompts and seed draw the same images"
    other = Prompts(states.flip(0), prompts.captions, prompts.labels, source="flipped")
    generate(model, tokenizer, gen_cfg, tmp_path / "c", num_classes=4, progress=False, prompts=other)
    assert pngs(tmp_path / "c") != pngs(tmp_path / "a"), "the caption states steer the images"

    with pytest.raises(ValueError, match="7 images asked for but only 6 prompts"):
        generate(model, tokenizer, gen_cfg.model_copy(update={"num_images": 7}), tmp_path / "d", num_classes=4,
                 progress=False, prompts=prompts)  # fmt: skip


def test_colour_read_from_pixels_matches_the_caption_of_real_shapes():
    from demar.data.embedded import EmbeddedConfig, caption_colour, colour_accuracy, generate, named_colour

    preset_like = EmbeddedConfig(num_train=200, num_reference=16, positions=["center"], sizes=["large"],
                                 backgrounds=["dark"])  # fmt: skip
    images, _, captions = generate(preset_like, "train", progress=False)
    assert caption_colour(captions[0]) in captions[0].split()
    assert colour_accuracy(list(images), captions) >= 0.97
    every_variation = EmbeddedConfig(num_train=200, num_reference=16)
    images, _, captions = generate(every_variation, "train", progress=False)
    assert colour_accuracy(list(images), captions) >= 0.8, "small shapes and gradients too, mostly"

    blank = torch.full((3, 32, 32), 30, dtype=torch.uint8)
    assert named_colour(blank) is None, "no shape, no colour"
    assert colour_accuracy([blank], ["a big square"]) is None, "no colour asked for"
    shuffled = captions[1:] + captions[:1]
    assert colour_accuracy(list(images), shuffled) < 0.4, "the wrong captions score low"


def test_table3_puts_our_text_rows_beside_the_papers():
    from reports.data import RowData
    from reports.tables import build_table3, to_markdown

    def row(name: str, ablation: str, seed: int, fid: float) -> RowData:
        evaluate = {"fid": fid, "num_images": 500, "class_accuracy": 0.8, "colour_accuracy": 0.9}
        return RowData(name, RowConfig(ablation=ablation, size="tiny", seed=seed), {}, evaluate, None, None)

    rows = [row("mar", "mar", 0, 30.0), row("mar_1", "mar", 1, 32.0), row("demar", "demar", 0, 28.0)]
    table = build_table3(rows, preset="embedded_text")
    ours = table.numeric[table.numeric["ours"] == True]  # noqa: E712
    assert list(ours["model"]) == ["MAR-tiny (ours, embedded_text)", "De-MAR-tiny (ours, embedded_text)"]
    assert list(ours["fid"]) == [31.0, 28.0] and list(ours["seeds"]) == [2, 1]
    paper = table.numeric[table.numeric["ours"] == False]  # noqa: E712
    assert dict(zip(paper["model"], paper["fid"]))["De-MAR"] == 5.27 and len(paper) == 11
    text = to_markdown(table.display)
    assert "| Mask. | MAR-tiny (ours, embedded_text) | 31.00 [" in text and "Colour acc." in text
