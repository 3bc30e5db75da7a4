"""Shards, manifest and the streaming loader, on real WebDataset tar files in tmp_path."""

import json

import numpy as np
import pytest
import torch

from pipeline.data.shards import ShardError, prepare, read_manifest, sha256_file, verify
from pipeline.data.sources import load_source
from pipeline.data.stream import make_loader, make_subset_loader


def all_batches(root, split="train", batch=64, **kw):
    return list(make_loader(str(root), split, batch, **kw))


def test_manifest_describes_the_shards(sprites_root):
    m = read_manifest(sprites_root)
    assert m["name"] == "sprites" and m["factor_names"] == ["shape", "scale", "orientation", "pos_x", "pos_y"]
    for split, n in (("train", 640), ("val", 128), ("test", 128)):
        entry = m["splits"][split]
        assert entry["num_samples"] == n and entry["shape"] == [64, 64] and entry["dtype"] == "uint8"
        assert sum(s["num_samples"] for s in entry["shards"]) == n
        assert len(entry["shards"]) == n // 128
        for s in entry["shards"]:
            assert sha256_file(sprites_root / s["name"]) == s["sha256"]
    assert verify(sprites_root) == []


def test_loader_reads_every_sample_once_per_epoch(sprites_root):
    source = load_source("sprites", seed=0, sizes={"train": 640, "val": 128, "test": 128}).splits["train"]
    for workers in (0, 2):
        batches = all_batches(sprites_root, shuffle=True, seed=3, num_workers=workers)
        x = torch.cat([b["x"] for b in batches])
        factors = torch.cat([b["factors"] for b in batches])
        assert x.shape == (640, 64, 64) and x.dtype == torch.float32
        assert set(x.unique().tolist()) <= {0.0, 1.0}
        # the epoch is a permutation of the split: same multiset of factor rows as the source
        assert sorted(map(tuple, factors.tolist())) == sorted(map(tuple, source.factors.tolist()))
        assert torch.equal(torch.cat([b["y"] for b in batches]).sort().values,
                           torch.from_numpy(source.y).sort().values)


def test_shuffle_is_deterministic_per_seed_and_epoch(sprites_root):
    def order(**kw):
        return torch.cat([b["factors"] for b in all_batches(sprites_root, shuffle=True, **kw)])

    a, b = order(seed=1, epoch=0), order(seed=1, epoch=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, order(seed=1, epoch=1))  # a new order every epoch
    assert not torch.equal(a, order(seed=2, epoch=0))
    plain = torch.cat([b["factors"] for b in all_batches(sprites_root)])
    source = load_source("sprites", seed=0, sizes={"train": 640, "val": 128, "test": 128}).splits["train"]
    assert torch.equal(plain, torch.from_numpy(source.factors))  # no shuffle: file order


def test_shuffle_buffer_zero_trains_in_the_stored_order_every_epoch(sprites_root):
    # data.shuffle_buffer=0, as the IWAE authors' code: no reshuffle, streamed or resident
    from pipeline.data import resident as res
    from pipeline.data.location import load_manifest

    stored = torch.cat([b["factors"] for b in all_batches(sprites_root)])  # evaluation reads the split as stored
    shuffled = torch.cat([b["factors"] for b in all_batches(sprites_root, shuffle=True, epoch=1)])
    assert not torch.equal(shuffled, stored)  # the default does shuffle (the check below can fail)
    for epoch in (0, 1, 7):
        fixed = torch.cat([b["factors"] for b in all_batches(sprites_root, shuffle=True, shuffle_buffer=0, epoch=epoch)])
        assert torch.equal(fixed, stored)
    manifest = load_manifest(str(sprites_root))
    counts = [s["num_samples"] for s in manifest["splits"]["train"]["shards"]]
    data = res.load_split(str(sprites_root), "train", manifest, torch.device("cpu"))
    split = res.ResidentSplit(data, batch_size=64, scale=1.0, binarize="none", seed=3, counts=counts, window=0)
    for epoch in (0, 1, 7):
        assert torch.equal(split.order(epoch), torch.arange(640))


def test_persistent_workers_give_each_epoch_the_batches_of_a_fresh_loader(sprites_root):
    # One loader for the whole run (workers kept alive, set_epoch between epochs) must deliver,
    # epoch after epoch, exactly what a loader built for that epoch delivers: same plan, same
    # shuffle, same dynamic binarisation, same worker round robin.
    kw = dict(shuffle=True, seed=5, num_workers=2, binarize="dynamic")
    loader = make_loader(str(sprites_root), "train", 32, persistent=True, **kw)
    for epoch in range(3):
        loader.dataset.set_epoch(epoch)
        got = list(loader)
        want = all_batches(sprites_root, batch=32, epoch=epoch, **kw)
        assert len(got) == len(want) == 20
        for g, w in zip(got, want):
            assert torch.equal(g["x"], w["x"]) and torch.equal(g["factors"], w["factors"])
    assert loader._iterator is not None and loader._iterator._workers[0].is_alive()  # the same workers


def test_limit_and_partial_last_batch(sprites_root):
    batches = list(make_loader(str(sprites_root), "val", 50, limit=120))
    assert all(len(b["x"]) == 50 for b in all_batches(sprites_root, batch=50, shuffle=True))  # train: full
    assert len(all_batches(sprites_root, batch=50, shuffle=True)) == 12  # floor(640 / 50)
    assert [len(b["x"]) for b in batches] == [50, 50, 20]
    assert len(make_loader(str(sprites_root), "val", 50, limit=120)) == 3


def test_dynamic_binarisation_redraws_pixels(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(200, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", train=grey, val=grey[:20], test=grey[:20])
    prepare("npz", tmp_path / "s", source=str(tmp_path / "grey.npz"), log=lambda *_: None)
    # training batches (the global order; shuffle_buffer=0: the stored order), 192 of the 200 samples
    train = dict(shuffle=True, shuffle_buffer=0)
    first = torch.cat([b["x"] for b in all_batches(tmp_path / "s", binarize="dynamic", epoch=0, **train)])
    again = torch.cat([b["x"] for b in all_batches(tmp_path / "s", binarize="dynamic", epoch=0, **train)])
    second = torch.cat([b["x"] for b in all_batches(tmp_path / "s", binarize="dynamic", epoch=1, **train)])
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first, again)  # a function of (seed, epoch, batch): a resumed run redraws the same
    assert not torch.equal(first, second)  # a new draw every epoch
    # E[x_binary] = grey / 255: 7200 pixels, standard error of the mean <= 0.006; allow 0.02
    assert abs(first.mean().item() - grey.mean() / 255) < 0.02
    plain = torch.cat([b["x"] for b in all_batches(tmp_path / "s")])
    assert torch.allclose(plain, torch.from_numpy(grey).float() / 255)


def test_evaluation_binarises_each_sample_the_same_whatever_the_batches(tmp_path):
    # The IWAE paper binarises its test images once: here from (seed, index in the split, pixel),
    # so batch size, loader workers, ranks and the resident path all give the same test inputs.
    from pipeline.data.resident import EvalBatches, ResidentSplit, load_split

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(150, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", train=grey, val=grey[:20], test=grey)
    prepare("npz", tmp_path / "s", source=str(tmp_path / "grey.npz"), shard_samples=40, log=lambda *_: None)
    root = str(tmp_path / "s")

    def by_sample(batch, seed=5, **kw):  # {grey image: its binarisation}; workers and ranks reorder
        plain, binary = (torch.cat([b["x"] for b in make_loader(root, "test", batch, seed=seed, **kw, **more)])
                         for more in ({}, {"binarize": "dynamic"}))
        return {p.numpy().tobytes(): b for p, b in zip(plain, binary)}

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    ref = by_sample(7)
    assert len(ref) == 150 and same(ref, by_sample(64))
    assert same(ref, by_sample(16, num_workers=2, worker_start="fork"))
    assert same(ref, {**by_sample(8, rank=0, world_size=2), **by_sample(8, rank=1, world_size=2)})
    assert not same(ref, by_sample(7, seed=6))  # another seed, other pixels
    manifest = read_manifest(root)
    data = load_split(root, "test", manifest, torch.device("cpu"))
    resident = torch.cat([b["x"] for b in EvalBatches(ResidentSplit(data, batch_size=32, scale=manifest["scale"],
                                                                    binarize="dynamic", seed=5, train=False))])
    assert torch.equal(torch.stack(list(ref.values())), resident)  # the split's order
    # E[x] = grey / 255 over 5400 pixels (standard error <= 0.007; allow 0.02)
    assert set(resident.unique().tolist()) == {0.0, 1.0} and abs(resident.mean().item() - grey.mean() / 255) < 0.02


def test_a_limited_evaluation_reads_a_random_subset_not_the_first_examples(tmp_path):
    # A test split stored in label order (binarized MNIST's: its first 1000 are ~98 % zeros): the
    # first N would be one class. Sample i here is the constant image i / 255, so x says its index.
    ordered = np.repeat(np.arange(200, dtype=np.uint8), 16).reshape(200, 4, 4)
    np.savez(tmp_path / "ordered.npz", train=ordered, val=ordered[:20], test=ordered)
    prepare("npz", tmp_path / "s", source=str(tmp_path / "ordered.npz"), shard_samples=64, log=lambda *_: None)

    def indices(limit, seed, batch=7, **kw):
        batches = list(make_subset_loader(str(tmp_path / "s"), "test", batch, limit=limit, seed=seed, **kw))
        assert all(len(b["x"]) == batch for b in batches[:-1])  # re-batched to the asked size
        return [round(v * 255) for b in batches for v in b["x"][:, 0, 0].tolist()]

    picked = indices(30, seed=1)
    assert len(picked) == len(set(picked)) == 30 and picked == sorted(picked)  # distinct, in stored order
    assert max(picked) > 100 and picked != list(range(30))  # spread over the split
    assert indices(30, seed=1, batch=11) == picked and indices(30, seed=2) != picked  # a function of the seed
    assert indices(None, seed=1) == list(range(200)) == indices(500, seed=1)  # no limit, or above the split
    # dynamic binarisation: a subset example gets the pixels it gets in the whole split
    whole = torch.cat([b["x"] for b in make_loader(str(tmp_path / "s"), "test", 7, binarize="dynamic", seed=3)])
    part = torch.cat([b["x"] for b in make_subset_loader(str(tmp_path / "s"), "test", 7, limit=30, seed=3,
                                                         binarize="dynamic")])
    keep = sorted(indices(30, seed=3))
    assert torch.equal(part, whole[keep])


def test_prepare_refuses_to_overwrite_and_force_rebuilds(tmp_path):
    prepare("gmm", tmp_path, sizes={"train": 100, "val": 10, "test": 10}, log=lambda *_: None)
    with pytest.raises(FileExistsError, match="manifest.json"):
        prepare("gmm", tmp_path, log=lambda *_: None)
    # a rebuild whose input is wrong fails before it removes anything: the old set stays whole
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FileNotFoundError):
        prepare("npz", tmp_path, source=str(tmp_path / "no-such.npz"), force=True, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and verify(tmp_path) == []
    (tmp_path / "backup.tar").write_bytes(b"not ours")
    prepare("gmm", tmp_path, sizes={"train": 50, "val": 10, "test": 10}, force=True, log=lambda *_: None)
    assert read_manifest(tmp_path)["splits"]["train"]["num_samples"] == 50
    assert len(list(tmp_path.glob("train-*.tar"))) == 1
    assert (tmp_path / "backup.tar").read_bytes() == b"not ours"  # only our shard names are removed


def test_truncated_shard_is_named(tmp_path):
    prepare("gmm", tmp_path, sizes={"train": 300, "val": 10, "test": 10}, shard_samples=100, log=lambda *_: None)
    victim = tmp_path / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:5000])
    with pytest.raises(ShardError, match="train-000001.tar.*truncated"):
        all_batches(tmp_path)
    assert any("train-000001.tar" in p for p in verify(tmp_path))


def test_corrupt_shard_content_is_named(tmp_path):
    prepare("gmm", tmp_path, sizes={"train": 300, "val": 10, "test": 10}, shard_samples=100, log=lambda *_: None)
    victim = tmp_path / "train-000002.tar"
    raw = bytearray(victim.read_bytes())
    raw[0:512] = b"\xff" * 512  # destroy the first tar header, keep the size
    victim.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="train-000002.tar"):
        all_batches(tmp_path)
    assert verify(tmp_path) == [f"{victim}: sha256 differs from the manifest"]


def test_missing_manifest_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="vaepipe prepare"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": {}}}))
    with pytest.raises(ValueError, match="no split 'val'"):
        read_manifest(tmp_path)


def test_concurrent_prepares_into_one_folder_build_it_once(tmp_path):
    # The tasks of a Slurm array sweep all start as rank 0 with the same data root: they used to
    # delete each other's shards mid-write. One builds; the others wait and find it prepared.
    import subprocess
    import sys

    code = ("import sys; from pipeline.data.shards import prepare\n"
            "try:\n    prepare('gmm', sys.argv[1], sizes={'train': 20000, 'val': 100, 'test': 100}, log=lambda *_: None)\n"
            "    print('built')\nexcept FileExistsError:\n    print('found')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "d")], stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-800:] for _, err in outs]
    assert sorted(out.strip() for out, _ in outs) == ["built", "found", "found"]
    assert verify(tmp_path / "d") == []


def test_a_source_that_cannot_give_what_is_asked_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mixed.npz", train=rng.integers(0, 256, (50, 4, 4), dtype=np.uint8),
             val=rng.random((10, 4, 4), dtype=np.float32), test=rng.random((10, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="mixed.npz.*different kinds of data.*train: uint8"):
        load_source("npz", str(tmp_path / "mixed.npz"))  # 0..255 beside 0..1: 255x apart, silently
    bad = rng.random((50, 4, 4), dtype=np.float32)
    bad[3, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", train=bad, val=bad[:10], test=bad[:10])
    with pytest.raises(ValueError, match="NaN or infinite values: train"):
        load_source("npz", str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "ok.npz", train=bad[4:], val=bad[4:14], test=bad[4:14])
    with pytest.raises(ValueError, match=r"more samples than the source has: val=500 \(it has 10\)"):
        load_source("npz", str(tmp_path / "ok.npz"), sizes={"val": 500})
