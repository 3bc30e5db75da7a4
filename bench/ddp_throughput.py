"""Training throughput of `vaepipe fit` with 1 vs 2 DDP processes on CPU (gloo), same per-process batch.

    python bench/ddp_throughput.py [--steps 300] [--batch 100]

Each configuration is run twice, for `steps` and for 2 x `steps` optimiser steps; the difference of the
wall times removes start-up (process launch, data set-up, first validation) and leaves the
steady-state rate: samples/s = steps x global batch / (t(2 steps) - t(steps)). MNIST MLP VAE
(784-200-200-50) on ../shared/data's binarized MNIST when present, else random binary 28x28 images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared/data/binarized_mnist/binarized_mnist_uint8.npz"


def prepare(tmp: Path) -> Path:
    root = tmp / "shards"
    if SHARED.is_file():
        args = ["binarized-mnist", "--source", str(SHARED)]
    else:
        x = (np.random.default_rng(0).random((52000, 28, 28)) < 0.3).astype(np.uint8)
        np.savez(tmp / "x.npz", train=x[:50000], val=x[50000:51000], test=x[51000:])
        args = ["npz", "--source", str(tmp / "x.npz")]
    subprocess.run([sys.executable, "-m", "pipeline", "prepare", *args, "--out", str(root), "--shard-samples",
                    "5000"], check=True, capture_output=True)
    return root


def timed_fit(root: Path, run_dir: Path, devices: int, steps: int, batch: int) -> float:
    argv = [sys.executable, "-m", "pipeline", "fit", "-c", str(ROOT / "configs/vae_mnist.yaml"), f"data.root={root}",
            "data.binarize=none", f"run.dir={run_dir}", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
            f"data.batch_size={batch}", "model.eval_k=0", "trainer.limit_val_batches=0", "logger.backend=csv",
            "trainer.enable_progress_bar=false", "logger.image_every_n_epochs=0", "data.num_workers=1",
            f"trainer.devices={devices}", "trainer.accelerator=cpu", "run.resume=never"]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT, env=dict(os.environ))
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=100, help="per process")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = prepare(Path(tmp))
        for devices in (1, 2):
            t1 = timed_fit(root, Path(tmp) / f"a{devices}", devices, args.steps, args.batch)
            t2 = timed_fit(root, Path(tmp) / f"b{devices}", devices, 2 * args.steps, args.batch)
            rate = args.steps * args.batch * devices / (t2 - t1)
            rows.append((devices, args.batch * devices, rate, t1 - (t2 - t1)))
    print(f"{'processes':>9s} {'global batch':>12s} {'samples/s':>10s} {'x 1 process':>11s} {'start-up s':>10s}")
    for devices, gbatch, rate, startup in rows:
        print(f"{devices:9d} {gbatch:12d} {rate:10.0f} {rate / rows[0][2]:11.2f} {startup:10.1f}")
    print(f"({os.cpu_count()} CPU cores; each process gets cores / processes threads from Lightning)")


if __name__ == "__main__":
    main()
