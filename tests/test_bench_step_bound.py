"""benchmarks/bench_step_bound.py: the matmul share and FLOPs it reads, and the section it writes."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_step_bound", REPO / "benchmarks" / "bench_step_bound.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matmul_share_tells_matmuls_from_elementwise_work():
    bench = load_bench()
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    x = torch.randn(4096)
    share, seconds = bench.matmul_share(lambda: a @ b, calls=5)
    assert share > 0.9 and seconds > 0
    mixed, _ = bench.matmul_share(lambda: [x.sin() for _ in range(200)] and a @ b, calls=3)
    assert 0.0 < mixed < 0.9


def test_matmul_flops_count_the_whole_step_and_grow_with_the_batch():
    bench = load_bench()
    from demar.model import DeMAR, ModelConfig

    from bench_vs_mar import step_flops

    cfg = ModelConfig.from_size("micro", token_dim=8, seq_len=16, patch_size=1, buffer_size=4, num_classes=10)
    torch.manual_seed(0)
    model = DeMAR(cfg)
    mm, total = bench.matmul_flops(model, batch=4), step_flops(model, batch=4)
    assert 0 < mm <= total
    # Twice the images: more work even where the masking draw differs (at least 12 of 16 tokens masked).
    assert bench.matmul_flops(model, batch=8) > mm
    assert bench.shape_rate(8, 8, 8, repeats=3) > 0


def test_writes_a_section_per_row(tmp_path):
    bench = load_bench()
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    rc = bench.main(["--rows", "de_head", "--rounds", "2", "--warmup", "1", "--no-compile",
                     "--output", str(out), "--write"])  # fmt: skip
    assert rc == 0
    text = out.read_text()
    assert "## Other\n\nkept" in text
    section = text.split(f"## {bench.TITLE}", 1)[1]
    rows = re.findall(r"^\| (mar|de_head) \|.*$", section, flags=re.MULTILINE)
    assert rows == ["de_head"]
    for line in re.findall(r"^\| (?:mar|de_head) \|.*$", section, flags=re.MULTILINE):
        cells = [c.strip() for c in line.strip("|").split("|")]
        share = float(cells[5].rstrip("%")) / 100
        assert 0 < share <= 1
        assert cells[8] == "not run"
        assert abs(float(cells[9].rstrip("x")) - 1 / share) < 0.05
        assert abs(float(cells[10].rstrip("x")) - 2 / share) < 0.1
