"""`vaepipe eval --k 5000` vs the matrix-multiply bound of this machine.

    python bench/eval_vs_gemm.py [--limit 10000] [--k 5000]

The IWAE paper's evaluation: K = 5000 importance samples for each of the 10k MNIST test images,
through the 784-200-200-50 tanh decoder. Its matrix products are 2 (50·200 + 200·200 + 200·784)
FLOPs per sample; this script measures the float32 GEMM rate of those very shapes in the same run,
at the evaluation's pass size (chunk × batch rows) and at 50 000 rows, and takes the faster, so
bound = examples · K · FLOPs per sample / GEMM rate,  and prints measured / bound (target <= 1.3).
The measured time is `vaepipe eval`'s wall time, compilation included (--no-compile: eager).
The model is the pipeline's, from a 1-step checkpoint (the time does not depend on the weights).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_overhead import ROOT, make_shards  # noqa: E402

LAYERS = [(50, 200), (200, 200), (200, 784)]


def gemm_rate(rows: int, repeats: int = 20) -> float:
    """FLOP/s of the decoder's three products on `rows` latent samples (float32, this process's threads)."""
    ws = [torch.randn(i, o) for i, o in LAYERS]
    h0 = torch.randn(rows, LAYERS[0][0])
    flops = 2 * rows * sum(i * o for i, o in LAYERS)
    for _ in range(3):  # warm-up
        h = h0
        for w in ws:
            h = h @ w
    t0 = time.perf_counter()
    for _ in range(repeats):
        h = h0
        for w in ws:
            h = h @ w
    return flops * repeats / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=10000, help="test examples (10000: the full test set)")
    ap.add_argument("--k", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--chunk", type=int, help="default: vaepipe eval's (5000 rows per pass on CPU)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="default: vaepipe eval's (on from examples x K >= 5 million)")
    args = ap.parse_args()
    from pipeline.evaluate import default_chunk, evaluate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, name = make_shards(tmp, 10_000)
        if args.limit > 500:  # make_shards keeps 500 test images; the full test set needs the real source
            from pipeline.data.shards import prepare

            root = tmp / "full"
            src = ROOT.parent / "shared/data/binarized_mnist/binarized_mnist_uint8.npz"
            if not src.is_file():
                sys.exit(f"--limit {args.limit} needs {src}; use --limit 500")
            prepare("binarized-mnist", root, source=str(src), log=lambda *_: None)
        run = tmp / "run"
        subprocess.run([sys.executable, "-m", "pipeline", "fit", "-c", str(ROOT / "configs/vae_mnist.yaml"),
                        f"data.name={name}", f"data.root={root}", "data.binarize=none", f"run.dir={run}",
                        "trainer.max_steps=1", "logger.backend=none", "run.test=false", "logger.image_every_n_epochs=0",
                        "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0"],
                       cwd=ROOT, check=True, capture_output=True)
        chunk = args.chunk or default_chunk(args.batch_size, torch.device("cpu"))
        rate = max(gemm_rate(chunk * args.batch_size), gemm_rate(50_000))
        r = evaluate(run, k=args.k, split="test", limit=args.limit, batch_size=args.batch_size, chunk=chunk,
                     progress=False, device="cpu", compile=args.compile)
    flops = r["examples"] * args.k * 2 * sum(i * o for i, o in LAYERS)
    bound = flops / rate
    print(f"eval K={args.k} on {r['examples']} test images, batch {args.batch_size}, chunk {chunk}, "
          f"compile {'on' if r['compiled'] else 'off'}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'float32 GEMM rate (decoder shapes)':38s} {rate / 1e9:10.1f} GFLOP/s")
    print(f"{'decoder matmul FLOPs':38s} {flops / 1e12:10.2f} TFLOP")
    print(f"{'matmul-bound time':38s} {bound:10.1f} s")
    print(f"{'vaepipe eval time':38s} {r['seconds']:10.1f} s")
    print(f"{'ratio eval / bound':38s} {r['seconds'] / bound:10.2f}")
    print(f"(test NLL of this untrained model: {r['nll']:.1f} nats)")


if __name__ == "__main__":
    main()
