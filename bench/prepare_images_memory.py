"""Peak memory of `vaepipe prepare images` against the number of images (issue 27: it must not grow
with the set). Generates N coloured-shape PNGs (32x32 .. 48x40, in 10 class folders) for each N,
prepares each with --size 32, and prints the peak RSS of the prepare process (ru_maxrss of the
child: the main process; --workers 0 so that decoding runs in it too) and its time.

    python bench/prepare_images_memory.py                 # 10 000 and 100 000 images (~5 min on 2 cores)
    python bench/prepare_images_memory.py --counts 2000 20000
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(32, 49)), int(rng.integers(32, 41))
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
        ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        sub = folder / f"class{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        img.save(sub / f"{i:07d}.png", compress_level=1)


def peak_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one command run as a fresh child of a fresh interpreter."""
    probe = ("import resource, subprocess, sys, time; t = time.time(); subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
             "time.time() - t)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True).stdout
    peak, seconds = out.split()
    return float(peak), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vaepipe-bench-") as tmp:
        for n in args.counts:
            src, out = Path(tmp) / f"img{n}", Path(tmp) / f"out{n}"
            t0 = time.time()
            make_images(src, n)
            made = time.time() - t0
            peak, seconds = peak_of([sys.executable, "-m", "pipeline", "prepare", "images", "--source", str(src),
                                     "--out", str(out), "--size", "32", "--workers", "0"])
            rows.append((n, peak, seconds, n / seconds, made))
            subprocess.run(["rm", "-rf", str(src), str(out)], check=True)
    print(f"{'images':>8} {'peak RSS MiB':>13} {'prepare s':>10} {'images/s':>9} {'(made in s)':>12}")
    for n, peak, seconds, rate, made in rows:
        print(f"{n:8d} {peak:13.1f} {seconds:10.1f} {rate:9.0f} {made:12.1f}")
    if len(rows) > 1:
        print(f"peak RSS, largest / smallest set: {rows[-1][1] / rows[0][1]:.3f} (target: within 1.10)")
    print(f"({os.cpu_count()} CPUs; ru_maxrss of the prepare process, decoding in it: --workers 0)")


if __name__ == "__main__":
    main()
