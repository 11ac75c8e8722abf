"""Training throughput of the embedded preset summed over seeds: one process at a time against several side by side.

Each seed of a row trains in its own single-threaded process (the rows' models are too
small to use a second thread well, while a second process uses a second core fully).
For each row this trains ``--seeds`` seeds for ``--steps`` steps of the embedded
preset's shape (params.yaml: the row's model, batch and optimizer; latents of the
preset's 8x8x8 shape from a small random tokenizer), first one process after the
other, then ``--jobs`` at a time, and reports images per second summed over seeds
(every image of every seed over the wall time from the first start to the last end,
process start included). ``--baseline-tree PATH`` also runs the one-at-a-time case with
the code of another checkout of this repository (for example the commit before a
speed change), in the same run, so the ratios compare like with like.

Writes the "Seeds side by side" section of ``BENCHMARKS.md`` with ``--write``.
Run: ``python benchmarks/bench_seeds.py [--rows mar demar] [--seeds 2] [--jobs 2] [--steps 60]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> int:
    """Train one seed of one row for ``args.steps`` steps; print ``{"images", "steps_per_s"}`` as JSON."""
    import torch

    from demar.params import load_params
    from demar.train import train

    torch.set_num_threads(1)
    params = load_params(args.params)
    model_cfg = params.row_model(args.row)
    train_cfg = params.row_train(args.row).model_copy(
        update={"seed": args.seed, "epochs": 1.0, "checkpoint_every": 10**6, "log_every": 10, "device": "cpu"}
    )
    result = train(model_cfg, train_cfg, latents_dir=args.latents, out_dir=args.out, progress=False, resume=False)
    steps = result.metrics["steps"]
    print(json.dumps({"images": steps * train_cfg.batch_size, "steps_per_s": result.metrics["steps_per_s"]}))
    return 0


def make_latents(folder: Path, params_file: Path, images: int) -> None:
    """A latent cache of ``images`` random images in the embedded preset's latent shape."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import make_latents as random_latents

    from demar.params import load_params

    params = load_params(params_file)
    arch = params.tokenizer.architecture
    setup = {"image": arch.resolution, "levels": len(arch.ch_mult), "channels": arch.z_channels}
    random_latents(folder, setup, params.model.num_classes, images)


def run_set(tree: Path, row: str, seeds: int, jobs: int, common: list[str], work: Path) -> dict:
    """Train ``seeds`` seeds of ``row`` with the code of ``tree``, ``jobs`` processes at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    todo = list(range(seeds))
    running: list[tuple[subprocess.Popen, int]] = []
    images, start = 0, time.perf_counter()
    while todo or running:
        while todo and len(running) < jobs:
            seed = todo.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--row", row, "--seed", str(seed),
                   "--out", str(work / f"{tree.name}_{row}_{jobs}_{seed}"), *common]  # fmt: skip
            running.append((subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, text=True), seed))
        proc, seed = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"seed {seed} of {row} failed (exit {proc.returncode}) with the code of {tree}")
        images += json.loads(out.strip().splitlines()[-1])["images"]
    wall = time.perf_counter() - start
    return {"wall_s": wall, "images_per_s": images / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["mar", "demar"], help="rows of params.yaml")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="processes side by side (default 2)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per seed")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--baseline-tree", type=Path, help="another checkout whose code to time one at a time")
    parser.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--latents", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(ROOT))
    from demar.params import load_params

    batch = load_params(args.params).row_train(args.rows[0]).batch_size
    command = "python benchmarks/bench_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    lines = [
        "| row | code | processes at once | wall (s) | images / s, summed over seeds | vs one at a time |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        latents = work / "latents"
        make_latents(latents, args.params, images=batch * args.steps)
        common = ["--latents", str(latents), "--params", str(args.params.resolve()), "--steps", str(args.steps)]
        for row in args.rows:
            cases = [(ROOT, 1, "this tree"), (ROOT, args.jobs, "this tree")]
            if args.baseline_tree:
                cases.insert(0, (args.baseline_tree.resolve(), 1, "baseline"))
            results = []
            for tree, jobs, label in cases:
                r = run_set(tree, row, args.seeds, jobs, common, work)
                results.append((label, jobs, r))
                print(f"{row} {label} jobs={jobs}: {r['images_per_s']:.1f} images/s ({r['wall_s']:.0f} s)", flush=True)
            base = results[0][2]["images_per_s"]
            for label, jobs, r in results:
                lines.append(f"| {row} | {label} | {jobs} | {r['wall_s']:.1f} | {r['images_per_s']:.1f} | "
                             f"{r['images_per_s'] / base:.2f}x |")  # fmt: skip
    body = "\n".join(lines) + "\n"
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_model import machine, write_section

        header = (
            f"Machine: {machine()}.\n\nCommand: `{command.strip()}` ({time.perf_counter() - t0:.0f} s).\n\n"
            f"{args.seeds} seeds of each row, {args.steps} steps of batch {batch} each, at the embedded preset's "
            "shape; one thread per process; wall time from the first start to the last end, process start included.\n"
        )
        write_section(ROOT / "BENCHMARKS.md", "Seeds side by side", header + "\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
