"""Elastic resume: the global sample order (data/order.py) does not depend on the number of
processes or loader workers, nor on resident vs streamed data, so a run interrupted on one topology
continues on another at the same global position: every sample of the interrupted epoch used
exactly once, the final weights those of the uninterrupted run up to float summation order."""

from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.checkpoints import load_checkpoint
from pipeline.data import order as global_order
from pipeline.data import resident as res
from pipeline.data.location import load_manifest
from pipeline.data.shards import prepare
from pipeline.data.stream import make_loader
from tests.conftest import vaepipe

N = 1100  # training samples: id i has x = (i / 1000, (i % 7) / 7)
G = 64  # global batch: 17 full global batches an epoch (1088 samples), 12 dropped
WINDOW = 300  # data.shuffle_buffer: windows of 3 shards of 128 (a batch may straddle two windows)


@pytest.fixture(scope="module")
def ids_root(tmp_path_factory):
    """Float data whose first coordinate names the sample, in shards of 128 (9 train shards)."""
    tmp = tmp_path_factory.mktemp("ids")
    make = lambda n, off: np.stack([(np.arange(n) + off) / 1000, (np.arange(n) % 7) / 7], 1).astype(np.float32)  # noqa: E731
    np.savez(tmp / "ids.npz", train=make(N, 0), val=make(64, 5000), test=make(64, 6000))
    prepare("npz", tmp / "data", source=str(tmp / "ids.npz"), shard_samples=128, log=lambda *_: None)
    return tmp / "data"


def ids(x: torch.Tensor) -> list[int]:
    return [round(v) for v in (x[:, 0].double() * 1000).tolist()]


def stream_batches(root, epoch, rank, world, workers=0, skip=0, raw=False):
    loader = make_loader(str(root), "train", G // world, shuffle=True, seed=3, epoch=epoch, shuffle_buffer=WINDOW,
                         rank=rank, world_size=world, num_workers=workers, skip=skip, raw=raw)
    return [ids(b["x"]) for b in loader]


def test_global_batches_are_the_same_for_any_ranks_and_workers(ids_root):
    for epoch in (0, 1):
        one = stream_batches(ids_root, epoch, 0, 1)
        assert len(one) == N // G and all(len(b) == G for b in one)
        flat = [i for b in one for i in b]
        assert len(set(flat)) == len(flat)  # an epoch reads each sample at most once
        assert flat != sorted(flat)  # and shuffled
        for world, workers in ((2, 0), (2, 2), (4, 3)):
            per_rank = [stream_batches(ids_root, epoch, r, world, workers) for r in range(world)]
            joined = [sum((per_rank[r][s] for r in range(world)), []) for s in range(len(one))]
            assert joined == one, f"world {world}, {workers} workers: other global batches"
    assert stream_batches(ids_root, 0, 0, 1) != stream_batches(ids_root, 1, 0, 1)  # a new order each epoch


def test_resident_reads_the_streaming_order(ids_root):
    manifest = load_manifest(ids_root)
    data = res.load_split(str(ids_root), "train", manifest, torch.device("cpu"))
    counts = [s["num_samples"] for s in manifest["splits"]["train"]["shards"]]
    for world in (1, 2):
        for rank in range(world):
            split = res.ResidentSplit(data, batch_size=G // world, scale=1.0, binarize="none", seed=3, rank=rank,
                                      world_size=world, counts=counts, window=WINDOW)
            resident = [ids(split.batch(1, s)["x"]) for s in range(split.steps_per_epoch)]
            assert resident == stream_batches(ids_root, 1, rank, world)


def test_resumed_stream_continues_the_order_on_another_topology(ids_root):
    one = stream_batches(ids_root, 0, 0, 1)
    for world, workers in ((1, 2), (2, 0), (2, 3)):
        per_rank = [stream_batches(ids_root, 0, r, world, workers, skip=5) for r in range(world)]
        assert [sum((p[s] for p in per_rank), []) for s in range(len(one) - 5)] == one[5:]


def test_dynamic_binarisation_is_the_same_for_any_ranks():
    x = torch.rand(12, 5)
    whole = global_order.binarize(x, 0, 2, 7, rank=0, world_size=1)
    parts = torch.cat([global_order.binarize(x[r * 4:(r + 1) * 4], 0, 2, 7, rank=r, world_size=3) for r in range(3)])
    assert torch.equal(whole, parts) and set(whole.unique().tolist()) <= {0.0, 1.0}


# --- real processes: interrupted on one topology, resumed on another ------------------------------

STEPS = 51  # 3 epochs of 17 steps


def fit(root, run_dir, *extra, env=None, check=True):
    argv = ["fit", f"data.root={root}", "data.name=npz", f"run.dir={run_dir}", f"trainer.max_steps={STEPS}",
            "trainer.max_epochs=-1", f"data.shuffle_buffer={WINDOW}", "run.seed=3", "model.arch=mlp",
            "model.hidden=[16]", "model.latent_dim=2", "model.likelihood=gaussian", "model.sigma=0.1", "model.eval_k=0",
            "trainer.steps_per_call=1", "trainer.check_val_every_n_epoch=100", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "logger.backend=csv", "logger.image_every_n_epochs=0",
            "trainer.accelerator=cpu", "run.test=false", *extra]
    return vaepipe(*argv, env=env, check=check)


def topology(world: int, workers: int = 0) -> list[str]:
    return [f"trainer.devices={world}", f"data.batch_size={G // world}", f"data.num_workers={workers}"]


def recorded(path, scale: float = 1000) -> dict[int, list[int]]:
    """step -> the sample ids of its global batch (ranks' rows in rank order; id = first value x scale)."""
    rows = {}
    for f in sorted(path.parent.glob(path.name + ".rank*")):
        for line in f.read_text().splitlines():
            step, rank, *xs = line.split()
            rows.setdefault(int(step), {})[int(rank)] = [round(float(v) * scale) for v in xs]
    return {s: sum((r[k] for k in sorted(r)), []) for s, r in rows.items()}


def final_weights(run_dir):
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == STEPS
    return ckpt["state_dict"]


def test_two_processes_to_one_and_back_mid_epoch(ids_root, tmp_path):
    # Uninterrupted reference on 2 processes; then 2 -> SIGTERM at step 22 -> 1 process -> SIGTERM at
    # step 27 -> 2 processes to the end. Epoch 1 (steps 17-33) is split over all three.
    ref = tmp_path / "ref"
    fit(ids_root, ref, *topology(2), "data.resident=false", env={"VAEPIPE_RECORD_BATCHES": str(tmp_path / "ref.ids")})
    run = tmp_path / "run"
    rec = {"VAEPIPE_RECORD_BATCHES": str(tmp_path / "run.ids")}
    first = fit(ids_root, run, *topology(2), "data.resident=false", env={**rec, "VAEPIPE_FAULT": "22:TERM"},
                check=False)
    assert first.returncode == 75, first.stderr[-3000:]
    second = fit(ids_root, run, *topology(1), "data.batch_size=17", env={**rec, "VAEPIPE_FAULT": "27:TERM"},
                 check=False)  # a batch size that does not keep the global batch is replaced, saying so
    assert second.returncode == 75, second.stderr[-3000:]
    assert "data.batch_size 17 -> 64 per process" in second.stdout
    assert "on a new topology (world_size 2 -> 1" in second.stdout
    third = fit(ids_root, run, *topology(2), "data.resident=false", env=rec)
    assert "world_size 1 -> 2" in third.stdout
    got, want = recorded(tmp_path / "run.ids"), recorded(tmp_path / "ref.ids")
    assert sorted(got) == list(range(STEPS))  # every step ran once over the interruptions
    assert got == want  # the same global batches, step by step
    epoch1 = Counter(i for s in range(17, 34) for i in got[s])
    assert sum(epoch1.values()) == 17 * G and set(epoch1.values()) == {1}  # each sample of the epoch once
    a, b = final_weights(ref), final_weights(run)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\nmax |weight difference| after 2 -> 1 -> 2 processes: {diff:.2e}")
    # One process sums the 64 per-sample gradients in another order than two processes' all-reduce of
    # their 32-sample means: ~1e-7 relative per step; over 51 Adam steps it stays far below 1e-4.
    assert diff < 1e-4


def test_two_workers_to_none_is_bit_identical(ids_root, tmp_path):
    # One process, streamed data: the batches do not depend on the workers, so changing them on
    # resume changes nothing at all (same process arithmetic): bit-identical weights.
    ref = tmp_path / "ref"
    fit(ids_root, ref, *topology(1, workers=2), "data.resident=false")
    run = tmp_path / "run"
    first = fit(ids_root, run, *topology(1, workers=2), "data.resident=false", env={"VAEPIPE_FAULT": "9:TERM"},
                check=False)
    assert first.returncode == 75, first.stderr[-3000:]
    second = fit(ids_root, run, *topology(1, workers=0), "data.resident=false")
    assert "num_workers 2 -> 0" in second.stdout
    a, b = final_weights(ref), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and resident data (the default) reads the same order: also bit-identical
    res_run = tmp_path / "resident"
    fit(ids_root, res_run, *topology(1))
    c = final_weights(res_run)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_global_batch_the_new_topology_cannot_share_is_refused(ids_root, tmp_path):
    run = tmp_path / "run"
    first = fit(ids_root, run, *topology(2)[:1], "data.batch_size=3", env={"VAEPIPE_FAULT": "5:TERM"}, check=False)
    assert first.returncode == 75, first.stderr[-3000:]
    proc = fit(ids_root, run, "trainer.devices=4", "data.batch_size=3", check=False)
    assert proc.returncode == 2
    assert "global batch of 6, which 4 processes cannot share" in proc.stderr and "(1, 2, 3, 6)" in proc.stderr
