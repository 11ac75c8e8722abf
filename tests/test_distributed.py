"""torchrun support: single-process fallbacks, and 2-process gloo training against one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import REPO, run_stage, stage_params, write_latents
from torch import nn

from demar import distributed as D
from demar.model import load_model
from demar.train import read_metrics


def test_single_process_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    env = D.init_distributed("cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed, env.owns_group) == (0, 1, True, False, False)
    assert env.device == torch.device("cpu")
    x = torch.tensor([1.0, 2.0])
    y = D.all_reduce_mean(x, env)
    assert torch.equal(y, x) and y is not x
    assert torch.equal(D.all_reduce_max(x, env), x)
    model = nn.Linear(2, 2)
    assert D.wrap_ddp(model, env) is model and D.unwrap(model) is model
    D.barrier(env)
    D.teardown(env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_request_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        D.resolve_device("cuda")
    assert D.resolve_device("auto") == torch.device("cpu")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with 2 processes trains the same model as 1 process at the same global batch.

    Both runs make the same random draws (every draw is keyed by seed, step and
    slice, and ``micro_batches = 2`` slices the batch the same way), read the same
    images and start from the same weights. What may differ is floating-point
    summation order: DDP averages two slice gradients with an all-reduce where one
    process accumulates them, and each torchrun worker runs with one thread. Hence
    a tolerance (rtol 1e-4 on every logged loss, atol 1e-5 on the weights) rather
    than equality.
    """
    write_latents(tmp_path / "latents")
    stage_params(tmp_path, micro_batches=2, epochs=1.0)  # 4 steps of 8 images (2 slices of 4)
    params = tmp_path / "params.yaml"
    text = params.read_text().replace("enabled: true", "enabled: false")
    params.write_text(text)

    args = ["--row", "tiny_demar", "--params", str(params), "--latents", str(tmp_path / "latents"),
            "--tokenizer", str(tmp_path / "tokenizer.pt"), "--no-progress"]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    two = tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
         "-m", "pipelines.train", *args, "--models", str(two / "models"), "--metrics", str(two / "metrics")],
        env=env, cwd=REPO, check=True, timeout=300,
    )  # fmt: skip
    assert run_stage(tmp_path) == 0  # one process, in this test process

    one_hist = read_metrics(tmp_path / "models" / "tiny_demar" / "metrics.jsonl")
    two_hist = read_metrics(two / "models" / "tiny_demar" / "metrics.jsonl")
    assert [r["step"] for r in one_hist] == [r["step"] for r in two_hist] == [1, 2, 3, 4]
    for key in ("loss", "loss_diffusion", "loss_refinement", "loss_assessment", "grad_norm", "lr"):
        a = torch.tensor([r[key] for r in one_hist], dtype=torch.float64)
        b = torch.tensor([r[key] for r in two_hist], dtype=torch.float64)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    w1 = load_model(tmp_path / "models" / "tiny_demar" / "model.pt", use_ema=False).state_dict()
    w2 = load_model(two / "models" / "tiny_demar" / "model.pt", use_ema=False).state_dict()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # Only rank 0 wrote files: one model, one metrics record set, no stray files from rank 1.
    assert sorted(p.name for p in (two / "models" / "tiny_demar").iterdir()) == ["checkpoints", "metrics.jsonl",
                                                                                   "model.pt"]  # fmt: skip
    assert Path(two / "metrics" / "tiny_demar.json").is_file()
