"""Pipeline overhead: steady-state training samples/s of `vaepipe fit` ÷ a bare PyTorch loop.

    python bench/pipeline_overhead.py [--steps 600] [--batch 100] [--repeats 5] [--workers 0 1]

All rows train the IWAE paper's 784-200-200-50 tanh MLP VAE with Adam, batch 100, on binarized MNIST
(../shared/data when present, else random binary 28x28 images of the same size):
  bare          a Python loop over in-memory float tensors: encode, ELBO, backward, Adam step;
  bare+loader   the same loop fed by vaepipe's streaming loader (shards, shuffle buffer, 0 workers);
  lightning     a minimal LightningModule (the same step) on in-memory tensors, nothing else on:
                Lightning's own per-step cost, the floor under any Lightning pipeline;
  vaepipe fit   the real thing in a subprocess: shards -> streaming loader -> LightningModule,
                csv logging every 50 steps, a periodic checkpoint every 500 steps, progress bar on,
                for each `--workers` value of data.num_workers (0: the loader runs in the training
                process); throughput from its summary.json (after 20 warm-up steps, validation off).
The rows alternate `--repeats` times in this one run. The machine is shared and noisy (the same
loop varies by +-20% from one second to the next), so the table gives the median and the best run
of each row (noise only ever slows a run down: the best is the steadiest estimate of its cost) and
both ratios to the bare loop. Target: vaepipe fit / bare >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
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


def loop_rate(next_x, batch: int, steps: int, warmup: int = 20) -> float:
    """The bare training loop: encode, ELBO, backward, Adam step on next_x(i), samples/s after warm-up."""
    torch.manual_seed(0)
    vae = VAE((28, 28), arch="mlp", hidden=[200, 200], latent_dim=50, activation="tanh")
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3, eps=1e-4)
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        x = next_x(i)
        mu, logvar = vae.encode(x)
        loss = vae_math.vae_objective(mu, logvar, lambda z: vae.log_px_given_z(x, z))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def bare_rate(x_all: torch.Tensor, batch: int, steps: int, warmup: int = 20) -> float:
    n = x_all.shape[0] // batch
    return loop_rate(lambda i: x_all[(i % n) * batch:(i % n + 1) * batch], batch, steps, warmup)


def bare_loader_rate(root: Path, batch: int, steps: int, warmup: int = 20) -> float:
    from pipeline.data.stream import make_loader

    loader = make_loader(str(root), "train", batch, shuffle=True)
    batches = (b for epoch in range(10**6) for b in (loader.dataset.set_epoch(epoch), loader)[1])
    return loop_rate(lambda i: next(batches)["x"], batch, steps, warmup)


def lightning_rate(x_all: torch.Tensor, batch: int, steps: int, warmup: int = 20) -> float:
    import pytorch_lightning as pl

    class Step(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.vae = VAE((28, 28), arch="mlp", hidden=[200, 200], latent_dim=50, activation="tanh")

        def training_step(self, x, batch_idx):
            mu, logvar = self.vae.encode(x)
            return vae_math.vae_objective(mu, logvar, lambda z: self.vae.log_px_given_z(x, z))["loss"]

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3, eps=1e-4)

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == warmup:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, *_):
            self.rate = steps * batch / (time.perf_counter() - self.t0)

    torch.manual_seed(0)
    clock = Clock()
    trainer = pl.Trainer(max_steps=steps + warmup, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    data = torch.utils.data.DataLoader(list(x_all[:x_all.shape[0] // batch * batch].split(batch)), batch_size=None)
    trainer.fit(Step(), data)
    return clock.rate


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
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="data.num_workers values to measure")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # Lightning's advice for the in-memory row (workers, logger)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    rows = {"bare loop, in-memory tensors": [], "bare loop + vaepipe loader": [], "Lightning floor, in-memory": [],
            **{f"vaepipe fit, {w} loader worker(s)": [] for w in args.workers}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        samples = 50_000
        root, name = make_shards(tmp, samples)
        from pipeline.data.stream import make_loader

        x_all = torch.cat([b["x"] for b in make_loader(str(root), "train", 1000, shuffle=False)])[:samples]
        for r in range(args.repeats):
            measure = [lambda: bare_rate(x_all, args.batch, args.steps),
                       lambda: bare_loader_rate(root, args.batch, args.steps),
                       lambda: lightning_rate(x_all, args.batch, args.steps),
                       *[lambda w=w: pipeline_rate(root, name, tmp / f"run{r}-{w}", args.batch, args.steps, w)
                         for w in args.workers]]
            for what, rate in zip(rows, measure):
                rows[what].append(rate())
    bare = rows["bare loop, in-memory tensors"]
    print(f"MNIST MLP VAE 784-200-200-50, batch {args.batch}, {args.steps} steps x {args.repeats} repeats, "
          f"torch threads {torch.get_num_threads()}, data {name}")
    print(f"{'what':34s} {'median':>8s} {'best':>8s} {'ratio (median)':>15s} {'ratio (best)':>13s}   each run")
    for what, rates in rows.items():
        med, best = statistics.median(rates), max(rates)
        print(f"{what:34s} {med:8.0f} {best:8.0f} {med / statistics.median(bare):15.3f} {best / max(bare):13.3f}   "
              + " ".join(f"{v:.0f}" for v in rates))


if __name__ == "__main__":
    main()
