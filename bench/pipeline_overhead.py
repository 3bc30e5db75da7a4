"""Pipeline overhead: steady-state training samples/s of `vaepipe fit` ÷ a bare PyTorch loop.

    python bench/pipeline_overhead.py [--samples 60000] [--batch 100 20] [--repeats 3]
                                      [--rows default k1 streaming compiled ...]

All rows train the IWAE paper's 784-200-200-50 tanh MLP VAE with Adam on binarized MNIST
(../shared/data when present, else random binary 28x28 images of the same size), --samples
samples per run (steps = samples / batch), for each --batch:
  bare          a Python loop over in-memory float tensors: encode, ELBO, backward, Adam step
                (PyTorch's default Adam): the loop a user writes by hand;
  lightning     a minimal LightningModule (the same step) on in-memory tensors, nothing else on;
  vaepipe fit   the real thing in a subprocess with its defaults (data.resident=auto: the split on
                the device; trainer.steps_per_call; model.compile=auto), csv logging every 50 steps,
                a periodic checkpoint every 500 steps, progress bar on; throughput from its
                summary.json (after 20 warm-up steps, validation off). Variants change one thing:
                k1 (trainer.steps_per_call=1), streaming (data.resident=false, 0 loader workers),
                streaming-w1 (data.resident=false, 1 worker), compiled (model.compile=true).
The rows alternate `--repeats` times in this one run. The machine is shared and noisy (the same
loop varies by +-20% from one second to the next), so the table gives the median and the best run
of each row (noise only ever slows a run down) and both ratios to the bare loop at the same batch.
Target: vaepipe fit (defaults) / bare >= 1.0 at batch 100 and at batch 20.
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


VARIANTS = {
    "default": [],
    "k1": ["trainer.steps_per_call=1"],
    "streaming": ["data.resident=false", "data.num_workers=0"],
    "streaming-w1": ["data.resident=false", "data.num_workers=1"],
    "compiled": ["model.compile=true"],
    "eager": ["model.compile=false"],
}


def pipeline_rate(root: Path, name: str, run_dir: Path, batch: int, steps: int, extra: list[str],
                  device: str = "cpu") -> float:
    cmd = [sys.executable, "-m", "pipeline", "fit", "-c", str(ROOT / "configs/vae_mnist.yaml"), f"data.name={name}",
           f"data.root={root}", "data.binarize=none", f"data.batch_size={batch}", f"run.dir={run_dir}",
           "run.resume=never", f"trainer.max_steps={steps}", "trainer.max_epochs=-1", "trainer.limit_val_batches=0",
           "run.every_n_train_steps=500", "logger.backend=csv", "run.test=false", "logger.image_every_n_epochs=0",
           "optim.eps=1e-4", f"trainer.accelerator={device}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"vaepipe fit failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())["train_samples_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=60_000, help="training samples per run (steps = samples / batch)")
    ap.add_argument("--batch", type=int, nargs="+", default=[100, 20])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", nargs="+", default=["default", "k1", "streaming", "compiled"], choices=list(VARIANTS))
    ap.add_argument("--no-lightning", action="store_true", help="skip the minimal-Lightning row")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # Lightning's advice for the in-memory row (workers, logger)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, name = make_shards(tmp, 50_000)
        from pipeline.data.stream import make_loader

        x_all = torch.cat([b["x"] for b in make_loader(str(root), "train", 1000, shuffle=False)])[:50_000]
        for batch in args.batch:
            steps = max(200, args.samples // batch)
            rows = {"bare loop, in-memory tensors": lambda: bare_rate(x_all, batch, steps)}
            if not args.no_lightning:
                rows["Lightning floor, in-memory"] = lambda: lightning_rate(x_all, batch, steps)
            for v in args.rows:
                rows[f"vaepipe fit, {v}"] = lambda v=v: pipeline_rate(root, name, tmp / f"run-{batch}-{v}", batch, steps,
                                                                      VARIANTS[v])
            rates = {what: [] for what in rows}
            for _ in range(args.repeats):
                for what, measure in rows.items():
                    rates[what].append(measure())
            table[batch] = (steps, rates)
    print(f"MNIST MLP VAE 784-200-200-50, {args.repeats} repeats, torch threads {torch.get_num_threads()}, data {name}")
    for batch, (steps, rates) in table.items():
        bare = rates["bare loop, in-memory tensors"]
        print(f"\nbatch {batch}, {steps} steps per run")
        print(f"{'what':34s} {'median':>8s} {'best':>8s} {'ratio (median)':>15s} {'ratio (best)':>13s}   each run")
        for what, r in rates.items():
            med, best = statistics.median(r), max(r)
            print(f"{what:34s} {med:8.0f} {best:8.0f} {med / statistics.median(bare):15.3f} {best / max(bare):13.3f}   "
                  + " ".join(f"{v:.0f}" for v in r))


if __name__ == "__main__":
    main()
