"""Streaming loader over the shards (webdataset) and the LightningDataModule around it.

Each (rank, worker) slot reads the parts of shards that `plan.plan_epoch` gives it, as tar
streams (webdataset: local files, http(s), pipe:), shuffles them in a buffer seeded from
(seed, epoch, slot), and yields exactly its planned number of batches. Everything random is a
function of (seed, epoch, slot, batch index), so a stream can be restarted at any batch: the
resumed run skips the batches already consumed and continues with identical data.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import signal
import threading
import warnings
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.location import check_local_shards, load_manifest, shard_url
from pipeline.data.plan import EpochPlan, Part, consumed_by_worker, plan_epoch
from pipeline.data.shards import ShardError

# __len__ is exact here (every slot yields its planned batches), whatever Lightning fears.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
# The stream *is* resumable: ShardDataModule saves every rank's position and skips to it.
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable")


def derived_seed(*parts) -> int:
    """A 63-bit seed from any tuple: independent streams for (seed, epoch, slot, batch, ...)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class Decoder:
    """A tar record -> its samples as dicts of numpy views, from the shape/dtype in the manifest
    (picklable for workers). A record holds n >= 1 samples (format 2); format 1's single sample
    with a text label `y.cls` reads the same way."""

    def __init__(self, shape, dtype: str):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.sample_bytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def __call__(self, record: dict) -> list[dict]:
        try:
            raw = record["x.bin"]
            if len(raw) == 0 or len(raw) % self.sample_bytes:
                raise ValueError(f"{len(raw)} bytes is not a whole number of {self.sample_bytes}-byte samples")
            x = np.frombuffer(raw, dtype=self.dtype).reshape(-1, *self.shape)
            n = len(x)
            y = np.frombuffer(record["y.bin"], dtype=np.int64) if "y.bin" in record else (
                [int(record["y.cls"])] if "y.cls" in record else None)
            f = np.frombuffer(record["factors.bin"], dtype=np.int64).reshape(n, -1) if "factors.bin" in record else None
            if (y is not None and len(y) != n) or (f is not None and len(f) != n):
                raise ValueError(f"{n} samples in x.bin but {len(y) if y is not None else len(f)} labels/factors")
        except (KeyError, ValueError) as err:
            raise ShardError(f"record '{record.get('__key__')}' in {record.get('__url__')}: bad contents "
                             f"(expected samples of {self.shape} {self.dtype}): {err}") from None
        out = [{"x": x[i]} for i in range(n)]
        if y is not None:
            for i, s in enumerate(out):
                s["y"] = int(y[i])
        if f is not None:
            for i, s in enumerate(out):
                s["factors"] = f[i]
        return out


class Collate:
    """Stack a batch of raw arrays, convert to float32 and scale once per batch (not per sample),
    then binarise if asked: `dynamic` draws x ~ Bernoulli(pixel) anew every epoch (the IWAE paper's
    MNIST) from a generator seeded per (seed, epoch, slot, batch), `threshold` keeps x > 0.5."""

    def __init__(self, scale: float, binarize: str = "none"):
        self.scale, self.binarize = float(scale), binarize

    def __call__(self, samples: list[dict], seed: int = 0) -> dict:
        x = torch.from_numpy(np.stack([s["x"] for s in samples])).float()
        if self.scale != 1.0:
            x.mul_(self.scale)
        if self.binarize == "dynamic":
            x = torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))
        elif self.binarize == "threshold":
            x = (x > 0.5).float()
        batch = {"x": x}
        if "y" in samples[0]:
            batch["y"] = torch.tensor([s["y"] for s in samples])
        if "factors" in samples[0]:
            batch["factors"] = torch.from_numpy(np.stack([s["factors"] for s in samples]))
        return batch


class ShardStream(IterableDataset):
    """The batches of one rank for one epoch, split over its DataLoader workers by the plan.

    `skip` batches (already consumed by this rank, on resume) are read but not collated. A
    DataLoader takes batches from workers in turn starting at worker 0, so on resume worker j plays
    the part of worker (j + skip) mod W: the round robin continues where it stopped."""

    def __init__(self, plan: EpochPlan, *, rank: int, workers: int, seed: int, epoch: int, shuffle: bool,
                 shuffle_buffer: int, decoder: Decoder, collate: Collate, skip: int = 0, on_error: str = "stop",
                 limit: int | None = None):
        self.plan, self.rank, self.workers = plan, rank, max(1, workers)
        self.seed, self.epoch, self.shuffle, self.buffer = seed, epoch, shuffle, shuffle_buffer
        self.decoder, self.collate, self.skip, self.on_error, self.limit = decoder, collate, skip, on_error, limit
        self.skipped_shards = 0

    def __len__(self) -> int:
        n = self.plan.batches_on_rank(self.rank, self.workers)
        if self.limit is not None:
            n = min(n, -(-self.limit // self.plan.batch_size))
        return n

    def _handler(self, exn: Exception) -> bool:
        source = next((a for a in exn.args if isinstance(a, str) and (".tar" in a or "://" in a or "pipe:" in a)), None)
        if self.on_error == "skip":
            self.skipped_shards += 1
            warnings.warn(f"skipping unreadable shard {source} ({self.skipped_shards} skipped by this worker "
                          f"this epoch): {exn.args[0] if exn.args else exn!r}")
            return True
        raise ShardError(f"cannot read shard {source or '(unknown)'}: {exn.args[0] if exn.args else exn!r}") from exn

    def _samples(self, part: Part):
        """The part's samples, decoded: every `parts`-th sample of the shard (by sample index)."""
        records = wds.tariterators.tarfile_samples([{"url": part.url}], handler=self._handler)
        i = 0
        for record in records:
            samples = self.decoder(record)
            first = (part.part - i) % part.parts  # the first index in this record that belongs to the part
            yield from samples[first::part.parts]
            i += len(samples)

    def _slot_samples(self, parts: list[Part], need: int | None):
        """The slot's samples in plan order; cycled until `need` when the plan asks for more."""
        produced = 0
        while True:
            for part in parts:
                for sample in self._samples(part):
                    yield sample
                    produced += 1
                    if need is not None and produced >= need:
                        return
            if need is None or produced == 0:
                if need and produced == 0:
                    raise ShardError(f"no readable samples in {[p.url for p in parts]}")
                return

    def _shuffled(self, samples, rng: random.Random):
        buf = []
        for sample in samples:
            buf.append(sample)
            if len(buf) >= self.buffer:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        logical = (worker + self.skip) % self.workers  # continue the round robin (see class doc)
        slot = self.rank * self.workers + logical
        need = None if self.plan.batches_per_slot is None else self.plan.batches_per_slot * self.plan.batch_size
        samples = self._slot_samples(self.plan.slots[slot], need)
        if self.shuffle:
            samples = self._shuffled(samples, random.Random(derived_seed(self.seed, self.epoch, slot, "buffer")))
        if self.limit is not None:  # evaluation on the first N samples (one process)
            samples = islice(samples, self.limit)
        done = consumed_by_worker(self.skip, logical, self.workers)
        batch, index = [], 0
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.plan.batch_size:
                if index >= done:
                    yield self._batch(batch, slot, index)
                batch, index = [], index + 1
        if batch and index >= done:
            yield self._batch(batch, slot, index)

    def _batch(self, samples: list[dict], slot: int, index: int) -> dict:
        out = self.collate(samples, derived_seed(self.seed, self.epoch, slot, index))
        if self.on_error == "skip":  # lets the training loop log how many shards were skipped
            out["shards_skipped"] = torch.tensor(self.skipped_shards)
        return out


_CONTEXTS: dict = {}


def worker_context(method: str = "forkserver"):
    """Loader workers start from a forkserver, not by forking the training process: a fork taken
    while gloo/NCCL or OpenMP threads hold a lock can leave the worker deadlocked before its first
    batch (Python 3.12 warns about exactly this). The server preloads torch and this module once, so
    a new worker costs a fork of a small process, not an interpreter start."""
    if method not in _CONTEXTS:
        _CONTEXTS[method] = multiprocessing.get_context(method)
        if method == "forkserver":
            _CONTEXTS[method].set_forkserver_preload(["torch", "numpy", "webdataset", __name__])
            _start_helpers_ignoring_stop_signals()
    return _CONTEXTS[method]


def _start_helpers_ignoring_stop_signals() -> None:
    """Start multiprocessing's forkserver and resource tracker with SIGUSR1/SIGTERM ignored, a
    disposition they and every worker forked from them inherit. `scancel --signal=USR1` or a
    preemption signals every process of a Slurm job step; only the training process may act on it
    (save, then stop its workers itself), the helpers would otherwise die mid-epoch."""
    if threading.current_thread() is not threading.main_thread():
        return
    from multiprocessing import forkserver, resource_tracker

    stop_signals = (signal.SIGUSR1, signal.SIGTERM)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in stop_signals}
    try:
        resource_tracker.ensure_running()
        forkserver.ensure_running()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def make_loader(root: str, split: str, batch_size: int, *, shuffle: bool = False, train: bool | None = None,
                seed: int = 0, epoch: int = 0, shuffle_buffer: int = 2000, num_workers: int = 0,
                binarize: str = "none", limit: int | None = None, manifest: dict | None = None, rank: int = 0,
                world_size: int = 1, skip: int = 0, on_error: str = "stop", worker_start: str = "forkserver"
                ) -> DataLoader:
    """A loader of dict batches {"x": float32 [B, *shape], "y": [B], "factors": [B, F]} over one split
    for one rank and one epoch. `train` (default: = shuffle) gives every rank the same number of full
    batches; otherwise every sample is read (padded by repeats only with several ranks)."""
    root = str(root)
    manifest = manifest or load_manifest(root)
    entry = manifest["splits"][split]
    check_local_shards(root, entry)
    urls = [shard_url(root, s["name"]) for s in entry["shards"]]
    counts = [s["num_samples"] for s in entry["shards"]]
    workers = min(num_workers, max(1, len(urls) * 64)) if num_workers > 0 else 0
    plan = plan_epoch(urls, counts, batch_size=batch_size, world_size=world_size, workers=workers, seed=seed,
                      epoch=epoch, shuffle=shuffle, train=shuffle if train is None else train)
    stream = ShardStream(plan, rank=rank, workers=workers, seed=seed, epoch=epoch, shuffle=shuffle,
                         shuffle_buffer=shuffle_buffer, decoder=Decoder(entry["shape"], entry["dtype"]),
                         collate=Collate(manifest["scale"], binarize), skip=skip, on_error=on_error, limit=limit)
    loader = DataLoader(stream, batch_size=None, num_workers=workers,
                        multiprocessing_context=worker_context(worker_start) if workers else None)
    loader.plan = plan  # for reports: dropped / repeated samples
    return loader
