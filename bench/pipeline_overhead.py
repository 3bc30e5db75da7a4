"""Pipeline overhead: steady-state training samples/s of `vaepipe fit` ÷ a bare PyTorch loop.

    python bench/pipeline_overhead.py [--steps 1500] [--batch 100] [--repeats 2]

Both train the IWAE paper's 784-200-200-50 tanh MLP VAE with Adam, batch 100, on binarized MNIST
(../shared/data when present, else random binary 28x28 images of the same size):
  bare      a Python loop over in-memory float tensors: encode, ELBO, backward, Adam step;
  pipeline  `vaepipe fit` in a subprocess: shards -> streaming loader -> LightningModule,
            csv logging every 50 steps, a periodic checkpoint every 500 steps, progress bar on,
            with each `--workers` value of data.num_workers (0: the loader runs in the training process);
            throughput from its summary.json (after 20 warm-up steps, validation excluded).
The two alternate `--repeats` times in this one run (the machine is shared and noisy); the table
gives each rate and the ratio of medians. Target: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import vae_math
from pipeline.data.shards import prepare
from pipeline.models.components.vae import VAE

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared/data/binarized_mnist/binarized_mnist_uint8.npz"


def make_shards(tmp: Path, samples: int) -> tuple[Path, str]:
    if SHARED.is_file():
        src, name = SHARED, "binarized-mnist"
    else:
        rng = np.random.default_rng(0)
        x = (rng.random((samples + 1000, 28, 28)) < 0.13).astype(np.uint8)
        src, name = tmp / "x.npz", "npz"
        np.savez(src, train=x[:samples], val=x[-1000:-500], test=x[-500:])
    root = tmp / "shards"
    prepare(name, root, source=str(src), sizes={"train": samples, "val": 500, "test": 500}, log=lambda *_: None)
    return root, name


def bare_rate(x_all: torch.Tensor, batch: int, steps: int, warmup: int = 20) -> float:
    torch.manual_seed(0)
    vae = VAE((28, 28), arch="mlp", hidden=[200, 200], latent_dim=50, activation="tanh")
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3, eps=1e-4)
    n = x_all.shape[0] // batch
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        x = x_all[(i % n) * batch:(i % n + 1) * batch]
        mu, logvar = vae.encode(x)
        loss = vae_math.vae_objective(mu, logvar, lambda z: vae.log_px_given_z(x, z))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def pipeline_rate(root: Path, name: str, run_dir: Path, batch: int, steps: int, workers: int) -> float:
    cmd = [sys.executable, "-m", "pipeline", "fit", "-c", str(ROOT / "configs/vae_mnist.yaml"), f"data.name={name}",
           f"data.root={root}", "data.binarize=none", f"data.batch_size={batch}", f"data.num_workers={workers}",
           f"run.dir={run_dir}", "run.resume=never", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
           "trainer.limit_val_batches=0", "run.every_n_train_steps=500", "logger.backend=csv", "run.test=false",
           "logger.image_every_n_epochs=0", "trainer.accelerator=cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"vaepipe fit failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())["train_samples_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="data.num_workers values to measure")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        samples = 50_000
        root, name = make_shards(tmp, samples)
        from pipeline.data.stream import make_loader

        x_all = torch.cat([b["x"] for b in make_loader(str(root), "train", 1000, shuffle=False)])[:samples]
        bare, pipe = [], {w: [] for w in args.workers}
        for r in range(args.repeats):
            bare.append(bare_rate(x_all, args.batch, args.steps))
            for w in args.workers:
                pipe[w].append(pipeline_rate(root, name, tmp / f"run{r}-{w}", args.batch, args.steps, w))
    torch_threads = torch.get_num_threads()
    print(f"MNIST MLP VAE 784-200-200-50, batch {args.batch}, {args.steps} steps, torch threads {torch_threads}, "
          f"data {name}")
    print(f"{'what':34s} {'samples/s (each run)':>28s} {'median':>9s}")
    print(f"{'bare loop, in-memory tensors':34s} {' '.join(f'{v:8.0f}' for v in bare):>28s} {statistics.median(bare):9.0f}")
    for w, rates in pipe.items():
        what = f"vaepipe fit, {w} loader worker(s)"
        print(f"{what:34s} {' '.join(f'{v:8.0f}' for v in rates):>28s} {statistics.median(rates):9.0f}"
              f"   ratio {statistics.median(rates) / statistics.median(bare):.3f}")


if __name__ == "__main__":
    main()
