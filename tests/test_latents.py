from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from shared_configs import TINY_TOKENIZER
from torch.utils.data import Dataset

from demar.data.embedded import EmbeddedConfig, EmbeddedDataset, write_split
from demar.io import read_json, write_json
from demar.latents import (
    LatentDataset,
    LatentError,
    LatentsConfig,
    draw_latents,
    extract_latents,
)
from demar.tokenizer import Tokenizer, file_sha256

CFG = LatentsConfig(shard_size=16, batch_size=6)  # batches of 6 inside shards of 16: shards end mid-batch
NUM = 40  # -> shards of 16, 16, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    write_split(EmbeddedConfig(num_train=NUM, num_reference=4), "train", root / "train", progress=False)
    torch.manual_seed(0)
    tok = Tokenizer(TINY_TOKENIZER, scale=0.8).eval()
    tok.save(root / "tok.pt")
    return root, tok


def _extract(setup, out, dataset=None, **kw):
    root, tok = setup
    ds = dataset if dataset is not None else EmbeddedDataset(root / "train")
    return extract_latents(
        tok,
        ds,
        out,
        CFG,
        tokenizer_sha256=file_sha256(root / "tok.pt"),
        num_classes=10,
        source={"data": "test"},
        progress=False,
        **kw,
    )


class _FailAt(Dataset):
    """A real data set that raises when item ``at`` is read (an interruption mid-extraction)."""

    def __init__(self, ds, at):
        self.ds, self.at = ds, at

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if i == self.at:
            raise KeyboardInterrupt(f"interrupted at {i}")
        return self.ds[i]


def test_round_trip(setup, tmp_path):
    root, tok = setup
    result = _extract(setup, tmp_path / "lat")
    m = result.manifest
    assert m["complete"] and m["num_items"] == NUM and m["num_shards"] == 3 and m["scale"] == 0.8
    assert [e["count"] for e in m["shards"]] == [16, 16, 8] and m["moments_shape"] == [2, 8, 8, 8]
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == [
        "manifest.json",
        "shard_00000.pt",
        "shard_00001.pt",
        "shard_00002.pt",
    ]
    lat = LatentDataset(tmp_path / "lat")
    assert len(lat) == NUM and lat.scale == 0.8 and lat.num_classes == 10 and lat.moments_shape == (2, 8, 8, 8)
    data = EmbeddedDataset(root / "train")
    for i in (0, 17, 39):
        moments, label = lat[i]
        x, y, _ = data[i]
        with torch.no_grad():
            expected = tok.encode_moments(torch.stack([x, x.flip(-1)]))  # [2, 2C, h, w]
        assert label == y and moments.shape == (2, 8, 8, 8)
        assert torch.allclose(moments, expected, atol=1e-5)
    all_moments, labels = lat.tensors()
    assert all_moments.shape == (NUM, 2, 8, 8, 8) and labels.tolist() == data.labels.tolist()
    with pytest.raises(IndexError):
        lat[NUM]


@pytest.mark.reliability
def test_shard_hash_mismatch_names_the_shard(setup, tmp_path):
    _extract(setup, tmp_path / "lat")
    shard = tmp_path / "lat" / "shard_00001.pt"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(LatentError, match=r"shard_00001\.pt: sha256 does not match"):
        LatentDataset(tmp_path / "lat")
    assert LatentDataset(tmp_path / "lat", verify=False)[0][0].shape == (2, 8, 8, 8)
    shard.unlink()
    with pytest.raises(LatentError, match=r"latent shard missing: .*shard_00001\.pt"):
        LatentDataset(tmp_path / "lat", verify=False)


@pytest.mark.reliability
def test_interrupted_extraction_resumes_to_the_same_manifest(setup, tmp_path):
    reference = _extract(setup, tmp_path / "straight").manifest
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _extract(setup, out, dataset=_FailAt(EmbeddedDataset(setup[0] / "train"), 35))  # during shard 2
    partial = read_json(out / "manifest.json")
    assert not partial["complete"] and [e["index"] for e in partial["shards"]] == [0, 1]
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000.pt", "shard_00001.pt"]
    with pytest.raises(LatentError, match="incomplete"):
        LatentDataset(out)
    mtime = (out / "shard_00000.pt").stat().st_mtime_ns
    result = _extract(setup, out)
    assert result.reused_shards == 2 and result.written_shards == 1 and result.written_items == 8
    assert (out / "shard_00000.pt").stat().st_mtime_ns == mtime  # not redone
    assert result.manifest == reference


@pytest.mark.reliability
def test_killed_extraction_resumes_to_the_same_manifest(setup, tmp_path):
    root, _ = setup
    reference = _extract(setup, tmp_path / "straight").manifest
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from demar.data.embedded import EmbeddedDataset
        from demar.latents import LatentsConfig, extract_latents
        from demar.tokenizer import Tokenizer, file_sha256

        class KillAt(torch.utils.data.Dataset):
            def __init__(self, ds): self.ds = ds
            def __len__(self): return len(self.ds)
            def __getitem__(self, i):
                if i == 20:  # while reading shard 1, after shard 0 was written
                    os.kill(os.getpid(), signal.SIGKILL)
                return self.ds[i]

        tok = Tokenizer.load({str(root / "tok.pt")!r})
        extract_latents(tok, KillAt(EmbeddedDataset({str(root / "train")!r})), {str(out)!r},
                        LatentsConfig(shard_size={CFG.shard_size}, batch_size={CFG.batch_size}),
                        tokenizer_sha256=file_sha256({str(root / "tok.pt")!r}), num_classes=10,
                        source={{"data": "test"}}, progress=False)
    """)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [e["index"] for e in read_json(out / "manifest.json")["shards"]] == [0]
    assert not list(out.glob(".*.tmp"))  # no half-written file left behind
    result = _extract(setup, out)
    assert result.reused_shards == 1 and result.manifest == reference


def test_cache_of_another_tokenizer_is_discarded(setup, tmp_path):
    out = tmp_path / "lat"
    _extract(setup, out)
    manifest = read_json(out / "manifest.json")
    write_json(out / "manifest.json", {**manifest, "tokenizer_sha256": "0" * 64})
    result = _extract(setup, out)
    assert result.reused_shards == 0 and result.manifest == manifest


def test_draw_latents_picks_image_or_flip_and_samples():
    b, c = 400, 2
    mean = torch.stack([torch.ones(b, c, 2, 2), -torch.ones(b, c, 2, 2)], dim=1)  # image +1, flip -1
    logvar = torch.full((b, 2, c, 2, 2), -30.0)
    moments = torch.cat([mean, logvar], dim=2)  # [B, 2, 2C, h, w]
    z = draw_latents(moments, 0.5, torch.Generator().manual_seed(0))
    assert z.shape == (b, c, 2, 2)
    per_sample = z.flatten(1)
    assert torch.allclose(per_sample.abs(), torch.full_like(per_sample, 0.5), atol=1e-6)
    assert (per_sample.std(1) < 1e-6).all()  # one choice per sample
    picked_image = (per_sample[:, 0] > 0).float().mean()
    assert 0.4 < picked_image < 0.6
    assert torch.equal(z, draw_latents(moments, 0.5, torch.Generator().manual_seed(0)))
    assert not torch.equal(z, draw_latents(moments, 0.5, torch.Generator().manual_seed(1)))

    # Fresh samples with the posterior's spread; the log-variance is clamped at 20.
    unit = torch.zeros(2000, 2, 2 * c, 2, 2)
    assert abs(draw_latents(unit, 2.0, torch.Generator().manual_seed(0)).std().item() - 2.0) < 0.05
    huge = torch.cat([torch.zeros(500, 2, c, 2, 2), torch.full((500, 2, c, 2, 2), 100.0)], dim=2)
    spread = draw_latents(huge, 1.0, torch.Generator().manual_seed(0)).std().item()
    assert spread == pytest.approx(torch.exp(torch.tensor(10.0)).item(), rel=0.05)


def test_stages_end_to_end(tmp_path, monkeypatch, mlflow_uri):
    """prepare_data -> train_tokenizer -> extract_latents on a tiny configuration, tracked in MLflow."""
    from pipelines import extract_latents as extract_stage
    from pipelines import prepare_data, train_tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        textwrap.dedent("""
        preset: embedded
        tracking: {enabled: true, system_metrics: false}
        data:
          kind: embedded
          embedded: {num_train: 48, num_reference: 16}
        tokenizer:
          source: train
          device: cpu
          eval_images: 16
          architecture: {resolution: 32, ch: 8, ch_mult: [1, 2, 2], num_res_blocks: 1, decoder_res_blocks: 1,
                         attn_resolutions: [], z_channels: 4, embed_dim: 4, norm_groups: 4}
          train: {steps: 4, batch_size: 8, warmup_steps: 1, scale_images: 32, eval_batch_size: 16}
        latents: {shard_size: 32, batch_size: 16, device: cpu}
        rows: {demar: {ablation: demar, size: micro, seed: 0}}
    """)
    )
    assert prepare_data.main(["--no-progress"]) == 0
    assert train_tokenizer.main(["--no-progress"]) == 0
    assert extract_stage.main(["--no-progress"]) == 0
    data, tok, lat = (read_json(tmp_path / "metrics" / f"{n}.json") for n in ("data", "tokenizer", "latents"))
    assert data["num_train"] == 48 and data["num_reference"] == 16 and data["num_skipped"] == 0
    assert tok["source"] == "train" and tok["eval_images"] == 16 and tok["psnr"] > 0 and tok["scale"] > 0
    assert not (tmp_path / "models" / "tokenizer.resume.pt").exists()
    bundle = Tokenizer.load(tmp_path / "models" / "tokenizer.pt")
    assert bundle.scale == tok["scale"]
    assert lat["num_items"] == 48 and lat["num_shards"] == 2 and lat["moments_shape"] == [2, 8, 8, 8]
    cache = LatentDataset(tmp_path / "data" / "latents")
    assert cache.scale == tok["scale"] and cache.num_classes == 10
    assert cache.manifest["tokenizer_sha256"] == file_sha256(tmp_path / "models" / "tokenizer.pt")

    import mlflow

    runs = mlflow.search_runs(experiment_names=["demar-embedded"])
    assert sorted(runs["tags.demar.work"]) == ["extract_latents", "prepare_data", "train_tokenizer"]
    tok_run = runs[runs["tags.demar.work"] == "train_tokenizer"].iloc[0]
    assert tok_run["metrics.psnr"] == pytest.approx(tok["psnr"]) and tok_run["params.tokenizer.train.steps"] == "4"


@pytest.mark.reliability
def test_cache_of_other_code_is_discarded_saying_why(setup, tmp_path, capsys):
    from demar.identity import code_digest

    out = tmp_path / "lat"
    manifest = _extract(setup, out).manifest
    assert manifest["code"] == code_digest("demar.latents", "demar.data")
    write_json(out / "manifest.json", {**manifest, "code": "0" * 64})  # as an earlier version of the code wrote it
    capsys.readouterr()
    result = _extract(setup, out)
    assert "another code; starting over" in capsys.readouterr().err
    assert result.reused_shards == 0 and result.manifest == manifest


@pytest.mark.reliability
def test_rerun_removes_temporaries_of_killed_writes(setup, tmp_path):
    out = tmp_path / "lat"
    manifest = _extract(setup, out).manifest
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    debris = out / f".shard_00001.pt.{int(dead.stdout)}.k1ll.tmp"
    debris.write_bytes(b"half a shard")
    result = _extract(setup, out)
    assert not debris.exists() and result.reused_shards == 3 and result.manifest == manifest
