"""Real multi-process DDP on CPU (gloo), launched as subprocesses: 2 processes on one node, 2 "nodes"
on localhost, uneven shards with more workers than shards, and the epoch plan behind them."""

import csv
import re
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.data.plan import plan_epoch
from pipeline.data.shards import prepare, read_manifest
from tests.conftest import ROOT
from pipeline import vae_math
from pipeline.checkpoints import load_checkpoint
from pipeline.data.stream import make_loader
from pipeline.evaluate import load_module

MODEL = ["model.arch=mlp", "model.hidden=[32]", "model.latent_dim=4", "model.eval_k=3", "logger.backend=csv",
         "trainer.enable_progress_bar=false", "logger.image_every_n_epochs=0", "trainer.log_every_n_steps=1",
         "data.shuffle_buffer=100", "trainer.accelerator=cpu"]


def launch(argv, env=None):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "fit", *map(str, argv)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    assert "terminate called" not in err  # process groups torn down cleanly
    return out, err


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [r for p in sorted(run_dir.glob("logs/*/metrics.csv")) for r in csv.DictReader(open(p))]
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_and_two_nodes_match_one_process(sprites_root, tmp_path):
    steps = 40
    common = [f"data.root={sprites_root}", f"trainer.max_steps={steps}", "trainer.max_epochs=-1", *MODEL]
    single = launch([*common, f"run.dir={tmp_path / 'one'}", "data.batch_size=64"])
    finish(single)
    ddp = launch([*common, f"run.dir={tmp_path / 'ddp'}", "data.batch_size=32", "trainer.devices=2"])
    finish(ddp)
    port = free_port()
    nodes = [launch([*common, f"run.dir={tmp_path / 'nodes'}", "data.batch_size=32", "trainer.num_nodes=2",
                     "trainer.devices=1"], env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                                "WORLD_SIZE": "2", "NODE_RANK": str(r)}) for r in (0, 1)]
    for p in nodes:
        finish(p)
    ref = train_losses(tmp_path / "one")
    for name in ("ddp", "nodes"):
        run = train_losses(tmp_path / name)
        ckpt = load_checkpoint(tmp_path / name / "checkpoints/last.ckpt")
        assert ckpt["global_step"] == steps
        assert [s["world_size"] for s in ckpt["ShardDataModule"]["stream_positions"]] == [2, 2]  # both ranks saved
        # Same global batch (64), different grouping of samples and noise: the mean loss of the last 10
        # steps (logged on rank 0, of its half batch) must agree within 5% (the runs differ by ~1-2%;
        # a run that did not average gradients across ranks, or read the same shards twice, strays further).
        last = lambda d: sum(d[s] for s in range(steps - 10, steps)) / 10  # noqa: E731
        print(f"\nmean train loss, steps {steps - 10}-{steps - 1}: one process {last(ref):.1f}, {name} {last(run):.1f}")
        assert abs(last(run) - last(ref)) / last(ref) < 0.05
        assert ref[0] == pytest.approx(run[0], rel=0.05)


def test_uneven_shards_more_workers_than_shards(tmp_path):
    # 25/25/25/20 samples: webdataset's own split gives 10 vs 9 batches of 5 and DDP hangs.
    # 5 validation samples in one shard over 6 slots: one slot has none (its part is empty), and
    # every slot is padded to a batch of 4: 24 samples evaluated, 19 of them repeats.
    root = tmp_path / "gmm"
    prepare("gmm", root, sizes={"train": 95, "val": 5, "test": 10}, shard_samples=25, log=lambda *_: None)
    proc = launch([f"data.root={root}", "data.name=gmm", f"run.dir={tmp_path / 'run'}", "data.batch_size=5",
                   "data.eval_batch_size=4", "data.num_workers=3", "data.resident=false", "trainer.devices=2",
                   "trainer.max_epochs=2",
                   "model.likelihood=gaussian", *MODEL])
    out, _ = finish(proc, timeout=300)
    # 2 ranks x 3 workers = 6 slots over 4 shards: every rank runs floor(95 / (6 * 5)) = 3 batches per
    # worker, 9 steps per epoch; 90 of 95 samples are read: 5 more dropped than repeated.
    assert [s["num_samples"] for s in read_manifest(root)["splits"]["train"]["shards"]] == [25, 25, 25, 20]
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert ckpt["global_step"] == 2 * 9  # equal steps on both ranks, or DDP would have hung
    dropped, repeated = map(int, re.search(r"(\d+) samples dropped, (\d+) repeated", out).groups())
    assert dropped - repeated == 5
    print(f"\nuneven shards: per epoch {dropped} samples dropped, {repeated} repeated")
    # The last validation (final weights) is the mean over the 5 validation samples, the padding
    # left out: its KL term (no sampling in it) equals the one computed here in one process.
    rows = [r for p in sorted((tmp_path / "run").glob("logs/*/metrics.csv")) for r in csv.DictReader(open(p))]
    logged = [float(r["val/kl"]) for r in rows if r.get("val/kl")][-1]
    module = load_module(tmp_path / "run")
    x = torch.cat([b["x"] for b in make_loader(root, "val", 100)])
    with torch.no_grad():
        kl = vae_math.kl_standard_normal(*module.vae.encode(x)).mean().item()
    assert len(x) == 5 and logged == pytest.approx(kl, rel=1e-5), (logged, kl)


def test_plan_is_identical_on_every_rank_and_disjoint():
    urls = [f"s{i}.tar" for i in range(4)]
    counts = [25, 25, 25, 20]
    plans = [plan_epoch(urls, counts, batch_size=5, world_size=2, workers=3, seed=1, epoch=e) for e in (0, 1)]
    again = plan_epoch(urls, counts, batch_size=5, world_size=2, workers=3, seed=1, epoch=0)
    assert plans[0] == again  # a pure function: what every rank computes alone
    assert plans[0].slots != plans[1].slots  # reshuffled every epoch
    for plan in plans:
        parts = [(p.url, p.part) for slot in plan.slots for p in slot]
        assert len(parts) == len(set(parts)) == 24  # no part read by two slots: no sample twice per epoch
        assert all(plan.batches_on_rank(r, 3) == 9 for r in (0, 1))
        # 90 of 95 samples are read: dropped - repeated = 5; the greedy balance repeats at most one part
        assert plan.dropped - plan.repeated == 5 and plan.repeated <= 5
    # evaluation with several ranks: ceil over the largest slot, padded by repeats, equal on all ranks
    ev = plan_epoch(urls, counts, batch_size=4, world_size=2, workers=3, shuffle=False, train=False)
    assert ev.batches_on_rank(0, 3) == ev.batches_on_rank(1, 3) and ev.dropped == 0
    assert sum(len(slot) for slot in ev.slots) == 8  # 2 parts per shard cover 6 slots


