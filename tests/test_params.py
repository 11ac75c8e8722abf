"""One typed Params: strict parsing, the one row schema, guidance per row, params that cannot work."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from demar.config import ConfigError
from demar.params import load_params

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "presets" / "smoke.yaml"


def smoke(**sections) -> dict:
    """The smoke preset with ``sections`` replaced, tracking off."""
    data = yaml.safe_load(SMOKE.read_text())
    data["tracking"] = {"enabled": False, "system_metrics": False}
    data.update(sections)
    return data


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def image_folder(root: Path, classes: dict[str, int]) -> Path:
    """``root/<class>/<i>.png``: ``classes[name]`` small images per class."""
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


# ----------------------------------------------------------------------------- strict parsing


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda p: p["train"].update(epochs="3"), "train.epochs"),
        (lambda p: p["train"].update(batch_size="64"), "train.batch_size"),
        (lambda p: p["model"].update(num_classes="64"), "model.num_classes"),
        (lambda p: p["train"].update(batch_size=True), "train.batch_size"),
        (lambda p: p["rows"]["mar"].update(seed=True), "rows.mar.seed"),
        (lambda p: p["tracking"].update(enabled="yes"), "tracking.enabled"),
        (lambda p: p["train"].update(bf16="yes"), "train.bf16"),
        (lambda p: p["sample"]["sampler"].update(cfg="2.0"), "sample.sampler.cfg"),
        (lambda p: p["report"].update(confidence="0.9"), "report.confidence"),
    ],
)
def test_strings_and_booleans_are_not_coerced(tmp_path, edit, key):
    data = smoke()
    edit(data)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_params(write(tmp_path / "params.yaml", data))


def test_integers_are_floats_and_lists_are_tuples(tmp_path):
    data = smoke()
    data["train"].update(epochs=2, betas=[0, 0.5])  # YAML ints and a list: the file's only forms
    data["time_fid"]["ar_steps"] = [2, 4]
    params = load_params(write(tmp_path / "params.yaml", data))
    assert params.row_train("mar").epochs == 2.0 and isinstance(params.row_train("mar").epochs, float)
    assert params.row_train("mar").betas == (0.0, 0.5) and params.time_fid.ar_steps == (2, 4)


def test_sections_are_typed_and_keep_what_the_row_sets(tmp_path):
    params = load_params(write(tmp_path / "params.yaml", smoke()))
    assert not isinstance(params.model, dict) and not isinstance(params.train, dict)
    assert not isinstance(params.report, dict)
    model = params.row_model("demar")  # the size's width, the shared knobs, the ablation's heads
    assert (model.width, model.token_dim, model.diffusion_head, model.denoising_head) == (64, 32, "transformer", True)
    assert params.row_train("demar").seed == 0
    with pytest.raises(ConfigError, match=r"rows\.nope: unknown row \(known: mar, demar\)"):
        params.row("nope")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["model"].update(size="tiny"), "model.size: set per row"),
        (lambda p: p["model"].update(diffusion_head="mlp"), "model.diffusion_head: set per row"),
        (lambda p: p["train"].update(seed=1), "train.seed: not a key"),
        (lambda p: p["sample"].update(seed=1), "sample.seed: not a key"),
        (lambda p: p["sample"].update(cfg_by_size={"micro": 1.5}), "sample.cfg_by_size: unknown key"),
        (lambda p: p["model"].update(grad_checkpointing=True), "model.grad_checkpointing: unknown key"),
    ],
)
def test_keys_in_the_wrong_place_are_named(tmp_path, edit, message):
    data = smoke()
    edit(data)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_params(write(tmp_path / "params.yaml", data))


# ----------------------------------------------------------------------------- one row schema


def test_the_row_schema_exists_once():
    sources = {p: p.read_text() for d in ("demar", "pipelines", "reports") for p in (ROOT / d).rglob("*.py")}
    defined = [p.relative_to(ROOT).as_posix() for p, s in sources.items() if "class RowConfig(" in s]
    assert defined == ["demar/params.py"]
    for path, text in sources.items():  # no second schema or lookup of a row beside it
        assert "class RowRef" not in text and "def load_row(" not in text, path
        if path.name != "params.py":
            assert "validate(RowConfig" not in text and 'get("rows")' not in text, path


# ----------------------------------------------------------------------------- guidance


def test_guidance_is_set_on_the_row_and_every_user_samples_with_it(tmp_path):
    data = smoke()
    data["rows"]["demar"]["cfg"] = 1.5
    path = write(tmp_path / "params.yaml", data)
    params = load_params(path)
    assert params.sample_config("demar").sampler.cfg == 1.5
    assert params.sample_config("mar").sampler.cfg == data["sample"]["sampler"]["cfg"]
    assert params.sample_config("demar", 20).num_images == 20 and params.sample_config("demar").seed == 0

    from demar.studies.base import resolve_base
    from demar.studies.config import StudyConfig

    study = StudyConfig.model_validate(
        {"name": "x", "objective": "sampling", "objectives": {"fid": "minimize"}, "n_trials": 1,
         "base": {"params": str(path), "row": "demar"}, "budget": {"images": 20},
         "space": {"sample.sampler.temperature": {"type": "float", "low": 0.9, "high": 1.0}}}
    )  # fmt: skip
    base = resolve_base(study, check_files=False)
    assert base.configs["sample"].for_run(base.seed, 20) == params.sample_config("demar", 20)


def test_imagenet_presets_put_mars_guidance_on_their_rows():
    scale = {"B": 2.9, "L": 3.0, "H": 3.2}
    for name in ("imagenet256_b", "imagenet256_l", "imagenet256_h"):
        params = load_params(ROOT / "presets" / f"{name}.yaml")
        for row_name, row in params.rows.items():
            assert params.sample_config(row_name).sampler.cfg == scale[row.size], (name, row_name)


# ----------------------------------------------------------------------------- one checkpointing switch


@pytest.mark.parametrize("ablation", ["mar", "demar"])
def test_the_train_switch_reaches_the_backbone_and_the_diffusion_head(ablation):
    from demar.model import DeMAR
    from demar.params import RowConfig, row_model_config

    knobs = {"token_dim": 4, "seq_len": 16, "num_classes": 4, "buffer_size": 4}
    cfg = row_model_config(RowConfig(ablation=ablation, size="micro", seed=0), knobs)

    def block_calls(switch: bool) -> tuple[int, int]:
        """Forward calls of the first backbone block and the first head block in one training step."""
        torch.manual_seed(0)
        model = DeMAR(cfg).train()
        for m in model.modules():  # what train.grad_checkpointing does (demar.train)
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = switch
        head = model.diffusion_head
        calls = []
        model.backbone.encoder_blocks[0].register_forward_pre_hook(lambda *_: calls.append("backbone"))
        (head.blocks if ablation == "demar" else head.res_blocks)[0].register_forward_pre_hook(
            lambda *_: calls.append("head")
        )
        tokens = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))
        model(tokens, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(2)).loss.backward()
        return calls.count("backbone"), calls.count("head")

    (backbone, head), (backbone_on, head_on) = block_calls(False), block_calls(True)
    assert (backbone_on, head_on) == (2 * backbone, 2 * head)  # each block is recomputed in the backward pass


# ----------------------------------------------------------------------------- params that cannot work


@pytest.mark.reliability
def test_no_rows_is_an_error_naming_rows(tmp_path):
    with pytest.raises(ConfigError, match=r"\n  rows: names no row"):
        load_params(write(tmp_path / "params.yaml", smoke(rows={})))


def run_stage(module: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.reliability
def test_a_stage_prints_a_config_error_as_one_line_and_exits_2(tmp_path):
    write(tmp_path / "params.yaml", smoke(rows={}))
    result = run_stage("pipelines.prepare_data", tmp_path, "--no-progress")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("prepare_data: error: invalid configuration in params.yaml") and "rows:" in lines[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()


def imagenet_params(root: str, num_classes: int = 10) -> dict:
    data = smoke(data={"kind": "imagenet", "imagenet": {"root": root, "resolution": 32, "workers": 1}})
    data["model"]["num_classes"] = num_classes
    return data


@pytest.mark.reliability
def test_more_classes_than_the_model_embeds_is_an_error_before_work(tmp_path, monkeypatch):
    from pipelines import prepare_data

    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "images", {"a": 1, "b": 1, "c": 1})
    write(tmp_path / "params.yaml", imagenet_params("images", num_classes=2))
    with pytest.raises(ConfigError, match=r"model\.num_classes: 2, but data\.imagenet\.root images has 3 classes"):
        prepare_data.main(["--no-progress"])
    assert not (tmp_path / "data").exists()


@pytest.mark.reliability
def test_an_empty_class_folder_is_an_error_naming_it(tmp_path, monkeypatch):
    from pipelines import prepare_data

    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "images", {"a": 1, "b": 1})
    (tmp_path / "images" / "empty").mkdir()
    (tmp_path / "images" / "empty" / "notes.txt").write_text("no image here")
    write(tmp_path / "params.yaml", imagenet_params("images"))
    with pytest.raises(ConfigError, match=re.escape(f"class folder {Path('images') / 'empty'} holds no image")):
        prepare_data.main(["--no-progress"])
    assert not (tmp_path / "data").exists()


@pytest.mark.reliability
def test_an_image_folder_inside_a_dvc_output_is_an_error_naming_the_key(tmp_path):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    for root in ("data/imagenet/train", "data/imagenet", "./data/imagenet/train/../train", "models/demar", "."):
        with pytest.raises(ConfigError, match=r"data\.imagenet\.root: .* overlaps the DVC output"):
            load_params(write(tmp_path / "params.yaml", imagenet_params(root)))
    assert load_params(write(tmp_path / "params.yaml", imagenet_params("datasets/imagenet/train"))).data.imagenet
    assert load_params(write(tmp_path / "params.yaml", imagenet_params(str(tmp_path.parent / "imagenet"))))


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1"}
    exe = Path(sys.executable).parent / "dvc"
    return subprocess.run([str(exe), *args], cwd=repo, env=env, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.reliability
def test_dvc_repro_keeps_a_user_folder_inside_an_output_and_indexes_into_its_own_output(tmp_path):
    """Issue: ``data.imagenet.root: data/imagenet/train`` made ``dvc repro prepare_data`` delete the images."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("demar", "pipelines"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    assert dvc(repo, "init", "--no-scm", "-q").returncode == 0

    inside = image_folder(repo / "data" / "imagenet" / "train", {"a": 2, "b": 2})
    write(repo / "params.yaml", imagenet_params("data/imagenet/train"))
    result = dvc(repo, "repro", "prepare_data")
    assert result.returncode != 0
    assert (inside / "a").is_dir(), "dvc repro deleted the user's images"
    assert sorted(p.name for p in (inside / "a").iterdir()) == ["0.png", "1.png"]
    assert "check_params: error:" in result.stderr and "data.imagenet.root" in result.stderr

    outside = image_folder(repo / "datasets" / "imagenet" / "train", {"a": 2, "b": 2})
    shutil.rmtree(repo / "data")
    write(repo / "params.yaml", imagenet_params("datasets/imagenet/train"))
    result = dvc(repo, "repro", "prepare_data")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (repo / "data" / "imagenet" / "train" / "index.json").is_file()
    assert sorted(p.name for p in outside.iterdir()) == ["a", "b"]  # nothing written into the user's folder
