"""Speed and memory of the image models (issue 28), the step demand a loader must meet.

For each image side (RGB) and model of configs/vae_cifar10*.yaml (an 8x8 latent map; their stage
widths repeat the last one at larger sides; and their earlier 128-vector models): training samples/s at batch 64 (forward, backward, Adam), evaluation
importance samples/s (log-weights, no gradient; `vaepipe eval`'s inner loop at its default chunk),
and the peak resident memory of the process above its size after imports. Each row runs in its
own process (peak memory is per process). The likelihood's cost shows in the conv rows with M = 1
(the IAF paper's logistic) against M = 10 (PixelCNN++'s mixture).
The ResNet is built with GroupNorm (model.norm=auto, its default).

    python bench/image_models.py                      # 32, 64, 128 px (~4 min on 2 cores)
    python bench/image_models.py --sizes 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GRID = dict(conv_channels=[64, 128], latent_grid=8, latent_dim=512)  # configs/vae_cifar10*.yaml: an 8x8x8 latent map
VECTOR = dict(conv_channels=[64, 128, 256], latent_dim=128, conv_hidden=512)  # their models before 2026-12-07
MODELS = {  # name: VAE keyword arguments
    "conv, map, M=10": dict(arch="conv", **GRID, mixtures=10),
    "resnet, map, M=10": dict(arch="resnet", **GRID, res_blocks=1, mixtures=10),
    "conv, vector, M=10": dict(arch="conv", **VECTOR, mixtures=10),
    "conv, vector, M=1": dict(arch="conv", **VECTOR, mixtures=1),
    "resnet, vector, M=10": dict(arch="resnet", **VECTOR, res_blocks=1, mixtures=10),
}
COMMON = dict(activation="elu", likelihood="discretized_logistic")


def build(size: int, model: str, device: str):
    sys.path.insert(0, str(ROOT))
    from pipeline.models.components.vae import VAE

    torch.manual_seed(0)
    return VAE((3, size, size), **COMMON, **MODELS[model]).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_rate(vae, size: int, device: str, batch: int = 64, seconds: float = 8.0) -> float:
    """Samples/s of the training step, timed over about `seconds` after two warm-up steps."""
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (batch, 3, size, size), device=device) / 255.0
    steps, t0 = -2, None  # two warm-up steps, then timed ones
    while t0 is None or time.perf_counter() - t0 < seconds:
        terms, _, _ = vae.objective(x)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        sync(device)
        steps += 1
        if steps == 0:
            t0 = time.perf_counter()
    return steps * batch / (time.perf_counter() - t0)


@torch.no_grad()
def eval_rate(vae, size: int, device: str, batch: int = 100, seconds: float = 5.0) -> float:
    """Importance samples/s of the log-weights at `vaepipe eval`'s default chunk."""
    from pipeline.evaluate import decoder_numel, default_chunk

    vae.eval()
    x = torch.randint(0, 256, (batch, 3, size, size), device=device) / 255.0
    chunk = default_chunk(batch, torch.device(device), decoder_numel(vae))
    done, t0 = 0, None
    while t0 is None or time.perf_counter() - t0 < seconds:
        float(vae.log_weights(x, chunk).sum())
        if t0 is None:
            t0 = time.perf_counter()
        else:
            done += chunk * batch
    return done / (time.perf_counter() - t0)


def row(size: int, model: str, device: str, seconds: float) -> dict:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    vae = build(size, model, device)
    out = {"train": train_rate(vae, size, device, seconds=seconds), "eval": eval_rate(vae, size, device, seconds=seconds),
           "params_m": sum(p.numel() for p in vae.parameters()) / 1e6}
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    if device.startswith("cuda"):
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    ap.add_argument("--row", nargs=2, metavar=("SIZE", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        print(json.dumps(row(int(args.row[0]), args.row[1], args.device, args.seconds)))
        return
    print(f"image models on {args.device} ({torch.get_num_threads()} threads), batch 64, RGB, "
          "peak memory above the process after imports")
    print(f"{'side':>4s}  {'model':24s} {'params M':>8s} {'train samples/s':>15s} {'eval samples/s':>14s} "
          f"{'peak MB' + (' (GPU)' if args.device.startswith('cuda') else ''):>12s}")
    for size in args.sizes:
        for model in args.models:
            proc = subprocess.run([sys.executable, __file__, "--row", str(size), model, "--device", args.device,
                                   "--seconds", str(args.seconds)],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f"{size:4d}  {model:24s} failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{size:4d}  {model:24s} {r['params_m']:8.1f} {r['train']:15.1f} {r['eval']:14.0f} "
                  f"{r['peak_mb']:12.0f}", flush=True)


if __name__ == "__main__":
    main()
