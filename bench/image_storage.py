"""Image storage by measurement (issue 27): raw uint8 records (`vaepipe prepare images`) against
encoded JPEG records read as standard WebDataset shards (`vaepipe index`), and the streaming
loader against the training step's demand.

For each image size (RGB; generated coloured shapes, and CIFAR-10's real JPEGs when
../shared/data/cifar10 is there), prints: disk size, time to prepare (raw) or to write + index
(encoded), and loader samples/s with 0, 1, 2 workers (batch 100, shuffled training order, verified
reads), each divided by the demand of the training step at that size (configs/vae_cifar10.yaml's
conv VAE with the mixture likelihood, forward, backward, Adam; batch 64; bench/image_models.py),
measured in the same run.

    python bench/image_storage.py                     # 32, 64, 128 px (~6 min on 2 cores)
    python bench/image_storage.py --sizes 32 --count 4000
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.zip"


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """n coloured ellipses on coloured ground, size x size, as PNG (lossless: the raw side's input)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        a, b = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
        ImageDraw.Draw(img).ellipse((a[0], b[0], a[1], b[1]), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        img.save(folder / f"{i:06d}.png", compress_level=1)


def encoded_shards(images: list[Path] | None, zip_path: Path | None, out: Path, per_shard: int = 5000) -> None:
    """(at most 5000 images a shard, at least 4 shards: the last one is `index`'s validation split)"""
    """The same images as standard shards, {key}.jpg (quality 95; CIFAR's own JPEG bytes as they are)."""
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True)
    if zip_path is not None:
        import zipfile

        z = zipfile.ZipFile(zip_path)
        items = [(n, z.read(n)) for n in sorted(z.namelist()) if n.endswith(".jpg") and "/train/" in n]
    else:
        def jpeg(p):
            buf = io.BytesIO()
            Image.open(p).convert("RGB").save(buf, "JPEG", quality=95)
            return buf.getvalue()
        items = [(p.stem, jpeg(p)) for p in images]
    per_shard = min(per_shard, -(-len(items) // 4))
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, (_, data) in enumerate(items):
            sink.write({"__key__": f"{i:06d}", "jpg": data})


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def vaepipe(*args) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def loader_rate(root: Path, workers: int, batch: int = 100, seconds: float = 6.0) -> float:
    from pipeline.data.stream import make_loader

    loader = make_loader(str(root), "train", batch, shuffle=True, seed=0, num_workers=workers, persistent=True)
    n, first, epoch = 0, None, 0
    while True:
        loader.dataset.set_epoch(epoch)
        for b in loader:
            if first is None:
                first = time.perf_counter()
                continue
            n += b["x"].shape[0]
            if time.perf_counter() - first > seconds:
                return n / (time.perf_counter() - first)
        epoch += 1


def step_demand(size: int, device: str = "cpu") -> float:
    """Samples/s of configs/vae_cifar10.yaml's conv VAE's training step at size x size (RGB)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from image_models import build, train_rate

    return train_rate(build(size, "conv, map, M=10", device), size, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--count", type=int, default=6000, help="generated images per size")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-cifar", action="store_true")
    ap.add_argument("--device", default="cpu", help="where the step demand is measured (cuda on a GPU machine)")
    args = ap.parse_args()
    demand = {s: step_demand(s, args.device) for s in sorted({32, *args.sizes})}
    rows = []
    with tempfile.TemporaryDirectory(prefix="vaepipe-storage-") as tmp:
        tmp = Path(tmp)
        sets = [(f"generated {s} px", s, None) for s in args.sizes]
        if CIFAR.is_file() and not args.no_cifar:
            sets.insert(0, ("CIFAR-10 train (JPEG)", 32, CIFAR))
        for label, size, zip_path in sets:
            work = tmp / label.replace(" ", "_")
            if zip_path is None:
                make_images(work / "png", args.count, size)
            source = zip_path or work / "png"
            held = ["--val", 0, "--test", 0] if zip_path is None else []  # CIFAR: its own split
            raw_s = vaepipe("prepare", "images", "--source", source, "--out", work / "raw", "--size", size, *held,
                            "--workers", 2)
            t = time.perf_counter()
            encoded_shards(sorted((work / "png").glob("*.png")) if zip_path is None else None, zip_path, work / "jpg")
            write_s = time.perf_counter() - t
            index_s = vaepipe("index", work / "jpg", "--out", work / "index", "--size", size)
            for store, root, disk, secs in (("raw", work / "raw", du(work / "raw"), raw_s),
                                            ("jpeg", work / "index", du(work / "jpg"), write_s + index_s)):
                rates = [loader_rate(root, w) for w in args.workers]
                rows.append((label, store, disk, secs, rates, demand[size]))
    print(f"training step demand (configs/vae_cifar10.yaml's conv VAE, batch 64, fwd+bwd+Adam, {args.device}): "
          + ", ".join(f"{s} px {d:.0f}" for s, d in demand.items()) + " samples/s\n")
    head = "  ".join(f"{w} wk samples/s (÷ step)" for w in args.workers)
    print(f"{'set':24s} {'store':5s} {'disk MB':>8s} {'prepare s':>9s}  {head}")
    for label, store, disk, secs, rates, need in rows:
        cells = "  ".join(f"{r:9.0f} ({r / need:5.1f}x)" for r in rates)
        print(f"{label:24s} {store:5s} {disk / 1e6:8.1f} {secs:9.1f}  {cells}")
    print("\n(raw: `prepare images`, uint8 records, 128 per record; jpeg: standard shards + `vaepipe index`, one "
          "image per record, decoded and resized in the loader; 'prepare s' for jpeg: writing the shards + index)")


if __name__ == "__main__":
    main()
