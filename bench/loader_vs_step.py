"""Loader throughput vs the training step's demand, MNIST-sized MLP VAE (batch 100).

    python bench/loader_vs_step.py [--samples 20000] [--workers 0 1 2]

Prints samples/s of (a) the streaming loader alone over real shards, (b) forward + backward + Adam
of the 784-200-200-50 VAE on in-memory tensors, and their ratio, all measured in this one run.
Uses ../shared/data's binarized MNIST when present, else random binary 28x28 images (same bytes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import vae_math
from pipeline.data.shards import prepare
from pipeline.data.stream import make_loader
from pipeline.models.components.vae import VAE

SHARED = Path(__file__).resolve().parents[2] / "shared/data/binarized_mnist/binarized_mnist_uint8.npz"


def loader_rate(root: Path, workers: int, batch: int) -> tuple[float, float]:
    """(samples/s after the first batch, seconds to the first batch: worker start-up)."""
    n, t0, first = 0, time.perf_counter(), None
    for b in make_loader(str(root), "train", batch, shuffle=True, seed=0, num_workers=workers):
        if first is None:
            first = time.perf_counter()
            continue
        n += b["x"].shape[0]
    return n / (time.perf_counter() - first), first - t0


def step_rate(batch: int, steps: int) -> float:
    torch.manual_seed(0)
    vae = VAE((28, 28), arch="mlp", hidden=[200, 200], latent_dim=50, activation="tanh")
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = (torch.rand(batch, 28, 28) < 0.3).float()
    for i in range(steps + 10):
        if i == 10:  # warm-up excluded
            t0 = time.perf_counter()
        mu, logvar = vae.encode(x)
        loss = vae_math.vae_objective(mu, logvar, lambda z: vae.log_px_given_z(x, z))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=50000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if SHARED.is_file():
            src, name = SHARED, "binarized-mnist"
        else:
            rng = np.random.default_rng(0)
            x = (rng.random((args.samples + 200, 28, 28)) < 0.3).astype(np.uint8)
            src, name = Path(tmp) / "x.npz", "npz"
            np.savez(src, train=x[: args.samples], val=x[-200:-100], test=x[-100:])
        root = Path(tmp) / "shards"
        prepare(name, root, source=str(src), sizes={"train": args.samples, "val": 100, "test": 100},
                shard_samples=args.samples // 8, log=lambda *_: None)
        demand = step_rate(args.batch, steps=200)
        rows = [(f"loader, {w} worker(s)", loader_rate(root, w, args.batch)) for w in args.workers]
    print(f"{'what':28s} {'samples/s':>12s} {'÷ step demand':>14s} {'start-up s':>11s}")
    print(f"{'train step (fwd+bwd+Adam)':28s} {demand:12.0f} {1.0:14.2f}")
    for what, (rate, startup) in rows:
        print(f"{what:28s} {rate:12.0f} {rate / demand:14.2f} {startup:11.2f}")


if __name__ == "__main__":
    main()
