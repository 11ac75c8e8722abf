"""benchmarks/gpu_check.py: the dry run exercises every part on the CPU; without CUDA it asks for --dry."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = [
    "matmul_peak",
    "train_mar",
    "train_demar",
    "bf16_vs_fp32_mar",
    "bf16_vs_fp32_demar",
    "sample_mar",
    "sample_demar",
    "ddp_mar",
    "compiled_mar",
    "compiled_demar",
]


def script_env() -> dict[str, str]:
    """The environment of a script run: one thread, no GPU, this interpreter's ``python`` first on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PATH": path}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry", "--out", str(out)]
    proc = subprocess.run(cmd, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    return proc, out


def test_dry_run_succeeds_and_writes_both_files(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry"] is True
    assert sorted(report["parts"]) == sorted(PARTS)
    assert {name: part["status"] for name, part in report["parts"].items()} == dict.fromkeys(PARTS, "ok")
    table = (out / "gpu_check.md").read_text()
    assert all(f"| {name} | ok |" in table for name in PARTS)
    assert table.strip().splitlines()[-1] in proc.stdout  # the table is printed too


def test_dry_run_measures_every_part(dry_run):
    _, out = dry_run
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert parts["matmul_peak"]["tflops"] > 0
    for row in ("mar", "demar"):
        for kind in ("train", "compiled"):
            part = parts[f"{kind}_{row}"]
            assert part["tokens_per_s"] > 0 and part["s_per_step"] > 0
            assert part["loss_finite"] and math.isfinite(part["loss"])
            assert 0 < part["mfu"] and part["gflops_per_step"] > 0
        assert parts[f"compiled_{row}"]["compile_s"] >= 0
        assert parts[f"sample_{row}"]["images_per_s"] > 0 and parts[f"sample_{row}"]["tokens_finite"]
        bf16 = parts[f"bf16_vs_fp32_{row}"]
        assert math.isfinite(bf16["rel_diff"]) and bf16["rel_diff"] >= 0
        assert math.isfinite(bf16["loss_fp32"]) and math.isfinite(bf16["loss_bf16"])
    ddp = parts["ddp_mar"]
    assert ddp["loss_finite"] and math.isfinite(ddp["loss"]) and ddp["s_per_step"] > 0
    assert (ddp["backend"], ddp["world_size"]) == ("gloo", 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_without_cuda_and_without_dry_exits_2_asking_for_dry(tmp_path):
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=script_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "--dry" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def load_script(monkeypatch):
    """benchmarks/gpu_check.py as a module (registered for the test only: dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_a_failing_part_is_recorded_and_the_budget_skips_the_rest(monkeypatch, capsys):
    gpu_check = load_script(monkeypatch)

    def fails() -> dict:
        raise ValueError("broken part")

    parts = [
        gpu_check.Part("bad", fails),
        gpu_check.Part("good", lambda: {"x": 1.0}),
        gpu_check.Part("too_long", lambda: {"x": 2.0}, needs_s=lambda: 1e9),
    ]
    results: dict = {}
    gpu_check.run_parts(parts, budget_s=60.0, results=results)
    assert results["bad"]["status"] == "error" and results["bad"]["error"] == "ValueError: broken part"
    assert results["good"]["status"] == "ok" and results["good"]["x"] == 1.0
    assert results["too_long"]["status"] == "skipped" and "needs" in results["too_long"]["reason"]
    gpu_check.run_parts([gpu_check.Part("late", dict)], budget_s=-1.0, results=results)
    assert results["late"]["status"] == "skipped"
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["[1/3] bad", "[2/3] good", "[3/3] too_long", "[1/1] late"]
