"""GPU throughput of `vaepipe fit`: fp32 vs bf16-mixed, with and without the fast path, beside the
bare eager loop and the GPU's measured matmul peak.

    python bench/gpu_throughput.py [--batch 100] [--seconds 8] [--data NPZ]

Model: the IWAE paper's 784-200-200-50 tanh MLP VAE, Adam, binarized MNIST (NPZ of the fixed
binarisation when given or found under ../shared/data, else random binary 28x28 images: the
speed does not depend on the pixels). Rows:
  bare eager loop      a hand-written loop on tensors already on the GPU (default Adam, fp32);
  fit fast <precision> vaepipe's defaults: split resident on the GPU, trainer.steps_per_call,
                       the compiled step, the whole optimizer step replayed as one CUDA graph;
  fit fast, no graph   the same with trainer.cuda_graph=false (compiled forward/backward as CUDA
                       graphs, the rest of the step launched kernel by kernel);
  fit fast, K=64       the defaults with 64 steps per call (Lightning's per-call cost / 64);
  fit plain 32-true    streaming loader (1 worker), one step per call, eager.
Samples/s are the runs' steady state (summary.json; compilation and start-up excluded). The
fraction of peak divides the model FLOPs per second (forward + backward = 3 x forward, counted
from the layer shapes) by the bf16 and fp32 GEMM rates measured here on 8192^3 products.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from pipeline.data.shards import prepare  # noqa: E402
from pipeline_overhead import pipeline_rate  # noqa: E402  (the same `vaepipe fit` command)

LAYERS = [(784, 200), (200, 200), (200, 100), (50, 200), (200, 200), (200, 784)]  # encoder, then decoder
FLOPS_PER_SAMPLE = 3 * sum(2 * a * b for a, b in LAYERS)  # multiply-adds x 2, forward + backward


def gemm_tflops(dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def bare_rate(x: torch.Tensor, batch: int, seconds: float) -> float:
    from pipeline import vae_math
    from pipeline.models.components.vae import VAE

    vae = VAE((28, 28), arch="mlp", hidden=[200, 200], latent_dim=50, activation="tanh").cuda()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3, eps=1e-4)
    n = x.shape[0] // batch

    def step(i):
        xb = x[(i % n) * batch:(i % n + 1) * batch]
        mu, logvar = vae.encode(xb)
        loss = vae_math.vae_objective(mu, logvar, lambda z: vae.log_px_given_z(xb, z))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(50):
        step(i)
    torch.cuda.synchronize()
    t, i = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        for _ in range(100):
            step(i)
            i += 1
        torch.cuda.synchronize()
    return i * batch / (time.perf_counter() - t)


def fit_rate(root: Path, name: str, run_dir: Path, batch: int, steps: int, extra: list[str]) -> float:
    """bench/pipeline_overhead.py's `vaepipe fit` row on the GPU, without periodic checkpoints."""
    return pipeline_rate(root, name, run_dir, batch, steps, ["run.every_n_train_steps=0", "trainer.devices=1",
                                                            "trainer.enable_progress_bar=false", *extra], device="gpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=5000, help="steps of each fast run (plain runs: a fifth)")
    ap.add_argument("--seconds", type=float, default=5.0, help="time of the bare loop")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/binarized_mnist/binarized_mnist_uint8.npz"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}")
    peak = {"bf16": gemm_tflops(torch.bfloat16), "fp32": gemm_tflops(torch.float32)}
    torch.backends.cuda.matmul.allow_tf32 = True
    peak["tf32"] = gemm_tflops(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    print("matmul peak (8192^3, measured): " + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in peak.items()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if Path(args.data).is_file():
            src, name = args.data, "binarized-mnist"
        else:
            x = (np.random.default_rng(0).random((51000, 28, 28)) < 0.13).astype(np.uint8)
            src, name = tmp / "x.npz", "npz"
            np.savez(src, train=x[:50000], val=x[50000:50500], test=x[50500:])
        root = tmp / "shards"
        prepare(name, root, source=str(src), log=lambda *_: None)
        from pipeline.data.stream import make_loader

        x_all = torch.cat([b["x"] for b in make_loader(str(root), "train", 1000)]).cuda()
        rows = {"bare eager loop, fp32": bare_rate(x_all, args.batch, args.seconds)}
        fast_steps = args.steps
        plain = ["data.resident=false", "trainer.steps_per_call=1", "model.compile=false"]
        runs = {"fit fast, 32-true": (fast_steps, ["trainer.precision=32-true"]),
                "fit fast, bf16-mixed": (fast_steps, ["trainer.precision=bf16-mixed"]),
                "fit fast, no graph": (fast_steps, ["trainer.cuda_graph=false"]),
                "fit fast, K=64": (fast_steps, ["trainer.steps_per_call=64"]),
                "fit plain, 32-true": (max(500, fast_steps // 5), plain)}
        for i, (what, (steps, extra)) in enumerate(runs.items()):
            try:  # one failing row must not cost the others (the device time is scarce)
                rows[what] = fit_rate(root, name, tmp / f"run{i}", args.batch, steps, extra)
                print(f"{what}: {rows[what]:.0f} samples/s", flush=True)
            except RuntimeError as err:
                print(f"{what}: FAILED\n{err}", flush=True)
    bare = rows["bare eager loop, fp32"]
    print(f"\n{'row':24s} {'samples/s':>10s} {'x bare':>7s} {'TFLOP/s':>8s} {'% bf16 peak':>11s} {'% fp32 peak':>11s}")
    for what, rate in rows.items():
        tf = rate * FLOPS_PER_SAMPLE / 1e12
        print(f"{what:24s} {rate:10.0f} {rate / bare:7.2f} {tf:8.2f} {100 * tf / peak['bf16']:11.3f} "
              f"{100 * tf / peak['fp32']:11.3f}")
    best = max([v for k, v in rows.items() if k.startswith("fit fast")] or [float("nan")])
    epoch_s = 50_000 / best
    print(f"\nfastest fit: {best:.0f} samples/s: one MNIST epoch in {epoch_s:.2f} s, the IWAE paper's 3280 epochs "
          f"(batch {args.batch}) in {3280 * epoch_s / 60:.1f} min (target >= 200000 samples/s: "
          f"{'met' if best >= 200_000 else 'NOT met'})")


if __name__ == "__main__":
    main()
