"""Loader throughput vs the training step's demand, MNIST-sized MLP VAE (batch 100).

    python bench/loader_vs_step.py [--samples 20000] [--workers 0 1 2] [--repeats 3]

Prints samples/s of (a) the streaming loader alone over real shards, (b) forward + backward + Adam
of the 784-200-200-50 VAE on in-memory tensors, and their ratio, all measured in this one run; and
rank 0 of R ranks (the global order: each rank reads every window, keeps its slice), and the cost
of verified reads (data.verify: each record's checksum checked): the loader with 0
workers, verified and not, alternated `--repeats` times (target: verified >= 0.95x unverified).
Uses ../shared/data's binarized MNIST when present, else random binary 28x28 images (same bytes).

    python bench/loader_vs_step.py --images [image_storage.py options]

RGB images at 32, 64 and 128 px (and CIFAR-10): raw and JPEG records, 0/1/2 workers, against the
convolutional VAE's step (bench/image_storage.py, which this runs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.data.stream import make_loader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_overhead import bare_rate, make_shards  # noqa: E402  (the same step and data as that bench)


def loader_rate(root: Path, workers: int, batch: int, verify: bool = True, world: int = 1,
                epochs: int = 1) -> tuple[float, float]:
    """(samples/s after the first batch, seconds to the first batch: worker start-up). world > 1:
    rank 0 of `world` ranks sharing global batches of `batch` (it reads every window of the global
    order and keeps its slice: the cost of a topology-free order)."""
    n, t0, first = 0, time.perf_counter(), None
    loader = make_loader(str(root), "train", batch // world, shuffle=True, seed=0, num_workers=workers, verify=verify,
                         world_size=world, persistent=True)
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)
        for b in loader:
            if first is None:
                first = time.perf_counter()
                continue
            n += b["x"].shape[0]
    return n / (time.perf_counter() - first), first - t0


def main():
    if "--images" in sys.argv:
        import image_storage

        sys.argv.remove("--images")
        return image_storage.main()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=50000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="*", default=[2, 4], help="rows for rank 0 of R ranks")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, _ = make_shards(Path(tmp), args.samples)
        x = (torch.rand(10 * args.batch, 28, 28) < 0.3).float()
        demand = bare_rate(x, args.batch, steps=200)
        rows = [(f"loader, {w} worker(s)", loader_rate(root, w, args.batch, epochs=3)) for w in args.workers]
        rows += [(f"loader, rank 0 of {r}, 0 workers", loader_rate(root, 0, args.batch, world=r, epochs=3))
                 for r in args.ranks]
        checked, unchecked = [], []
        for _ in range(args.repeats):
            checked.append(loader_rate(root, 0, args.batch, verify=True, epochs=5)[0])
            unchecked.append(loader_rate(root, 0, args.batch, verify=False, epochs=5)[0])
    print(f"{'what':28s} {'samples/s':>12s} {'÷ step demand':>14s} {'start-up s':>11s}")
    print(f"{'train step (fwd+bwd+Adam)':28s} {demand:12.0f} {1.0:14.2f}")
    for what, (rate, startup) in rows:
        print(f"{what:28s} {rate:12.0f} {rate / demand:14.2f} {startup:11.2f}")
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    print(f"\nverified reads, 0 workers, 5 epochs each, {args.repeats} alternations: verified {med(checked):.0f} samples/s, "
          f"unverified {med(unchecked):.0f} (medians): verified / unverified = {med(checked) / med(unchecked):.3f} "
          f"(best {max(checked) / max(unchecked):.3f})")


if __name__ == "__main__":
    main()
