"""The caption cache: written once, reused, resumed after a kill with the same bytes, null beside."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from demar.captions import CaptionCache, CaptionCacheError, CaptionsConfig, encode_captions
from demar.io import file_sha256, read_json, write_json
from demar.text_encoders import TextEncoderConfig, build_text_encoder
from tiny_text import write_tiny_clip

CAPTIONS = [f"a {c} {s} {n}" for n in range(3) for c in ("red", "blue") for s in ("circle", "square", "ring")]  # 18
CFG = CaptionsConfig(shard_size=5, batch_size=2)  # 4 shards (5, 5, 5, 3), 3 passes per full shard


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


class Killed(RuntimeError):
    """Stands for the process being killed in the middle of a shard."""


def counting(encoder, fail_after: int | None = None):
    """Count ``encoder.encode`` calls (and the captions passed); raise :class:`Killed` at call ``fail_after + 1``."""
    calls: list[list[str]] = []
    real = type(encoder).encode.__get__(encoder)

    def encode(captions):
        if fail_after is not None and len(calls) >= fail_after:
            raise Killed(f"killed at call {len(calls) + 1}")
        calls.append(list(captions))
        return real(captions)

    encoder.encode = encode
    return calls


def fresh_encoder(clip_dir, **kw):
    return build_text_encoder(TextEncoderConfig(kind="clip", path=str(clip_dir), max_length=16, **kw))


def hashes(root: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(root.glob("*.pt"))}


def test_cache_written_once_and_reused(clip_dir, tmp_path):
    enc = fresh_encoder(clip_dir)
    calls = counting(enc)
    out = tmp_path / "captions"
    result = encode_captions(enc, CAPTIONS, out, CFG, source={"split": "train"}, progress=False)
    assert len(calls) == 1 + 3 + 3 + 3 + 2  # the null caption, then batches of <= 2 that never straddle shards
    assert calls[0] == [""]
    assert result.written_shards == 4 and result.reused_shards == 0 and result.written_items == 18
    m = read_json(out / "manifest.json")
    assert m["complete"] and m["num_items"] == 18 and m["dtype"] == "float16" and m["states_shape"] == [16, 32]
    assert [e["count"] for e in m["shards"]] == [5, 5, 5, 3]
    assert all(file_sha256(out / e["file"]) == e["sha256"] for e in m["shards"])
    assert m["encoder"]["kind"] == "clip" and len(m["code"]) == 64 and m["source"] == {"split": "train"}

    calls.clear()
    again = encode_captions(enc, CAPTIONS, out, CFG, source={"split": "train"}, progress=False)
    assert calls == [] and again.written_shards == 0 and again.reused_shards == 4
    assert again.manifest["encoder_source"] == str(clip_dir)

    moved = fresh_encoder(shutil.copytree(clip_dir, tmp_path / "moved_clip"))  # same weights elsewhere
    calls = counting(moved)
    encode_captions(moved, CAPTIONS, out, CFG, source={"split": "train"}, progress=False)
    assert calls == [] and read_json(out / "manifest.json")["encoder_source"] == str(tmp_path / "moved_clip")

    cache = CaptionCache(out)
    assert len(cache) == 18 and cache.states_shape == (16, 32)
    full, full_mask = enc.encode(CAPTIONS)  # float32 states, cached as float16
    for i in (0, 7, 17):
        states, mask = cache[i]
        assert states.dtype == torch.float32 and cache.caption(i) == CAPTIONS[i]
        torch.testing.assert_close(states, full[i].half().float(), rtol=0, atol=0)
        assert torch.equal(mask, full_mask[i])
    null_states, null_mask = cache.null()
    torch.testing.assert_close(null_states, enc.null()[0].half().float(), rtol=0, atol=0)
    assert null_mask.sum().item() == 2
    stored, masks = cache.tensors()
    assert stored.shape == (18, 16, 32) and stored.dtype == torch.float16 and masks.shape == (18, 16)
    with pytest.raises(IndexError):
        cache[18]


def test_resume_after_kill_encodes_only_the_rest(clip_dir, tmp_path):
    clean = tmp_path / "clean"
    encode_captions(fresh_encoder(clip_dir), CAPTIONS, clean, CFG, progress=False)

    out = tmp_path / "killed"
    enc = fresh_encoder(clip_dir)
    counting(enc, fail_after=1 + 3 + 3 + 1)  # the null, two whole shards, one batch into the third
    with pytest.raises(Killed):
        encode_captions(enc, CAPTIONS, out, CFG, progress=False)
    m = read_json(out / "manifest.json")
    assert not m["complete"] and [e["index"] for e in m["shards"]] == [0, 1]
    (out / f".shard_00002.pt.{2**22 + 12345}.abcd.tmp").write_bytes(b"half a shard")  # a killed writer's leftover
    with pytest.raises(CaptionCacheError, match="incomplete"):
        CaptionCache(out)

    enc = fresh_encoder(clip_dir)
    calls = counting(enc)
    result = encode_captions(enc, CAPTIONS, out, CFG, progress=False)
    assert [c for batch in calls for c in batch] == CAPTIONS[10:]  # shards 2 and 3 only, no null again
    assert result.reused_shards == 2 and result.written_shards == 2 and result.written_items == 8
    assert hashes(out) == hashes(clean)
    assert not list(out.glob(".*.tmp"))
    assert read_json(out / "manifest.json") == read_json(clean / "manifest.json")


def test_corrupt_shard_is_recomputed(clip_dir, tmp_path):
    out = tmp_path / "captions"
    encode_captions(fresh_encoder(clip_dir), CAPTIONS, out, CFG, progress=False)
    before = hashes(out)
    (out / "shard_00001.pt").write_bytes(b"garbage")
    with pytest.raises(CaptionCacheError, match=r"shard_00001\.pt: sha256 does not match"):
        CaptionCache(out)
    enc = fresh_encoder(clip_dir)
    calls = counting(enc)
    encode_captions(enc, CAPTIONS, out, CFG, progress=False)
    assert [c for batch in calls for c in batch] == CAPTIONS[5:10]
    assert hashes(out) == before


def test_other_encoder_or_captions_start_over(clip_dir, tmp_path, capsys):
    out = tmp_path / "captions"
    encode_captions(fresh_encoder(clip_dir), CAPTIONS, out, CFG, progress=False)
    other = build_text_encoder(
        TextEncoderConfig(kind="clip", path=str(write_tiny_clip(tmp_path / "clip2", seed=1)), max_length=16)
    )
    calls = counting(other)
    result = encode_captions(other, CAPTIONS, out, CFG, progress=False)
    assert result.reused_shards == 0 and len(calls) == 12
    assert "written with another encoder; starting over" in capsys.readouterr().err

    calls.clear()
    result = encode_captions(other, CAPTIONS[:-1] + ["a green circle"], out, CFG, progress=False)
    assert result.reused_shards == 0 and len(calls) == 12
    assert "captions_sha256" in capsys.readouterr().err
    assert CaptionCache(out).caption(17) == "a green circle"


def test_stale_manifest_from_other_code_starts_over(clip_dir, tmp_path, capsys):
    out = tmp_path / "captions"
    encode_captions(fresh_encoder(clip_dir), CAPTIONS, out, CFG, progress=False)
    m = read_json(out / "manifest.json")
    write_json(out / "manifest.json", {**m, "code": "0" * 64})
    enc = fresh_encoder(clip_dir)
    calls = counting(enc)
    encode_captions(enc, CAPTIONS, out, CFG, progress=False)
    assert len(calls) == 12 and "another code" in capsys.readouterr().err
    assert os.path.isfile(out / "null.pt")
