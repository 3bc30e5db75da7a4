"""Streaming loader over the shards (webdataset: local files, http(s), pipe:).

Training reads each epoch's global order (data/order.py): every rank its slice of every global
batch, its workers taking turns by batch, each worker holding one window of shards at a time. It
is a function of (seed, epoch) alone, so a stream restarts at any global batch, on any number of
ranks and workers, with identical data. Evaluation reads every sample once, in shard order,
split over (rank, worker) slots by `plan.plan_epoch`. Every record is checked against its
checksum in the manifest as it is read (data.verify).
"""

from __future__ import annotations

import functools
import multiprocessing
import re
import signal
import sys
import tarfile
import threading
import warnings

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import order as global_order
from pipeline.data.order import derived_seed  # noqa: F401 - re-exported (models use it for their noise)
from pipeline.data.location import check_local_shards, load_manifest, shard_url, shards_base
from pipeline.data.plan import EpochPlan, Part, plan_epoch
from pipeline.data.shards import ShardError, record_checksum

# __len__ is exact here (every slot yields its planned batches), whatever Lightning fears.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
# The stream *is* resumable: ShardDataModule saves every rank's position and skips to it.
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable")


class Decoder:
    """A tar record -> its samples as arrays {"x": [n, *shape], "y": [n], "factors": [n, F]}, from the
    shape/dtype in the manifest (picklable for workers). A record holds n >= 1 samples (format 2);
    format 1's single sample with a text label `y.cls` reads the same way. Samples stay in arrays from
    here to the batch: no Python object per sample (bench/loader_vs_step.py)."""

    def __init__(self, shape, dtype: str, samples_per_record: int = 1, factors: int = 0):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.sample_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        # the most a record of this manifest can hold (x, y and factors of its samples, and 4 KiB for
        # a format-1 text label): tar members beyond it are refused before they are read
        self.max_record_bytes = samples_per_record * (self.sample_bytes + 8 * (1 + max(factors, 64))) + 4096

    def samples_in(self, record: dict) -> int:
        return len(record.get("x.bin", b"")) // self.sample_bytes

    def __call__(self, record: dict) -> dict:
        try:
            raw = record["x.bin"]
            if len(raw) == 0 or len(raw) % self.sample_bytes:
                raise ValueError(f"{len(raw)} bytes is not a whole number of {self.sample_bytes}-byte samples")
            out = {"x": np.frombuffer(raw, dtype=self.dtype).reshape(-1, *self.shape)}
            n = len(out["x"])
            if "y.bin" in record:
                out["y"] = np.frombuffer(record["y.bin"], dtype=np.int64)
            elif "y.cls" in record:
                out["y"] = np.array([int(record["y.cls"])], dtype=np.int64)
            if "factors.bin" in record:
                out["factors"] = np.frombuffer(record["factors.bin"], dtype=np.int64).reshape(n, -1)
            bad = [k for k, v in out.items() if len(v) != n]
            if bad:
                raise ValueError(f"{n} samples in x.bin but {len(out[bad[0]])} in {bad[0]}")
        except (KeyError, ValueError) as err:
            raise ShardError(f"record '{record.get('__key__')}' in {record.get('__url__')}: bad contents "
                             f"(expected samples of {self.shape} {self.dtype}): {err}") from None
        return out


def tar_records(url: str, handler, max_record_bytes: int):
    """The records of one shard as dicts {"__key__", "__url__", member suffix: bytes}, grouped by key as
    webdataset groups them (`base_plus_ext`). Unlike webdataset's reader, every member's declared size
    is checked before its bytes are read: a crafted or compressed shard cannot make the loader hold
    more than one record of the manifest's size (a 1.4 MB gzip of an 800 MB member). An error goes
    to `handler` (the url among its args), which raises or, returning True, skips the rest of the shard."""
    stream, failed = None, False
    try:
        stream = gopen(url)
        tar, current, held = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_BoundedTarInfo), None, 0
        for info in tar:
            tar.members = []  # a stream's TarFile keeps every header otherwise
            if not info.isreg() or META_MEMBER.match(info.name):
                continue
            key, suffix = wds.tariterators.base_plus_ext(info.name)
            if key is None:
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current, held = None, 0
            held += info.size
            if held > max_record_bytes:  # before reading: the declared size is all we have seen
                raise ShardError(f"record '{key}': member '{info.name}' takes the record to {held} bytes, more than "
                                 f"the {max_record_bytes} a record of this manifest can hold (crafted or foreign shard)")
            current = current or {"__key__": key, "__url__": url}
            if suffix.lower() in current:
                raise ShardError(f"record '{key}': member '{info.name}' appears twice")
            current[suffix.lower()] = tar.extractfile(info).read()
        if current is not None:
            yield current
    except Exception as exn:  # noqa: BLE001 - the handler decides: raise (naming the shard) or skip it
        failed = True
        exn.args = (*exn.args, url)
        handler(exn)
    finally:
        # a stopped consumer (GeneratorExit) or an error already reported: close quietly
        _close(stream, None if failed or sys.exc_info()[0] is not None else handler, url)


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads the whole data of a GNU long-name or pax header before it yields the member it
    describes: such headers are refused above 64 KiB (a real one holds a path and a few keys)."""

    def _proc_member(self, tar):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > 1 << 16:
            raise ShardError(f"a tar extended header of {self.size} bytes (at most {1 << 16} are read): crafted or "
                             "damaged shard")
        return super()._proc_member(tar)


META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it skips them


def _close(stream, handler, url: str) -> None:
    if stream is None:
        return
    try:
        stream.close()  # a pipe: command reports its exit status here
    except Exception as exn:  # noqa: BLE001
        if handler is not None:
            exn.args = (*exn.args, url)
            handler(exn)


class ImageRecordDecoder:
    """A record of standard WebDataset shards (one sample: an encoded image, maybe a `.cls` label) ->
    {"x": [1, C, H, W] uint8, "y": [1]}: decoded by Pillow in the loader's workers, cropped and
    resized as at `vaepipe index` time, then to the manifest's shape if it still differs."""

    def __init__(self, shape, options: dict, label: str | None, max_record_bytes: int):
        from pipeline.data.image_source import ImageOptions

        crop = options.get("crop")
        self.shape, self.label = tuple(shape), label
        self.opts = ImageOptions(size=options.get("size"), crop=tuple(crop) if crop else None,
                                 channels=options.get("channels", 3))
        self.max_record_bytes = max_record_bytes + (1 << 16)  # as indexed, and the tar headers' slack

    def samples_in(self, record: dict) -> int:
        return 1

    def __call__(self, record: dict) -> dict:
        from pipeline.data.index import decode_record

        arr, why = decode_record(record, self.opts)
        if arr is not None and arr.shape != self.shape:
            arr, why = _resized(arr, self.shape), None
        if arr is None:
            raise ShardError(f"record '{record.get('__key__')}' in {record.get('__url__')}: {why}")
        out = {"x": arr[None]}
        if self.label:
            try:
                out["y"] = np.array([int(record[self.label])], dtype=np.int64)
            except (KeyError, ValueError) as err:
                raise ShardError(f"record '{record.get('__key__')}' in {record.get('__url__')}: label "
                                 f".{self.label}: {err!r}") from None
        return out


def _resized(arr: np.ndarray, shape: tuple) -> np.ndarray:
    """[C, h, w] uint8 -> [C, H, W] (bicubic), for an image of another size than the manifest's."""
    from PIL import Image

    img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    out = np.asarray(img.resize((shape[2], shape[1]), Image.Resampling.BICUBIC), dtype=np.uint8)
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


def make_decoder(manifest: dict, entry: dict):
    """The split's record decoder: vaepipe's raw-array records, or indexed standard shards' images."""
    if "root" in entry:
        return ImageRecordDecoder(entry["shape"], (manifest.get("images") or {}).get("options") or {},
                                  entry.get("label"), entry.get("max_record_bytes", 1 << 26))
    return Decoder(entry["shape"], entry["dtype"], entry.get("samples_per_record", 1),
                   len(manifest.get("factor_names") or []))


def _take(chunk: dict, index) -> dict:
    return {k: v[index] for k, v in chunk.items()}


def _concat(chunks: list[dict]) -> dict:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _length(chunk: dict) -> int:
    return len(chunk["x"])


def _first(chunks, limit: int):
    """The first `limit` samples of a stream of chunks."""
    for chunk in chunks:
        if _length(chunk) >= limit:
            yield _take(chunk, slice(0, limit))
            return
        yield chunk
        limit -= _length(chunk)


class Collate:
    """A batch of raw arrays -> tensors, converted to float32 and scaled once per batch, then binarised
    if asked: `dynamic` draws x ~ Bernoulli(pixel) anew every epoch (the IWAE paper's MNIST) from a
    generator seeded per (seed, epoch, slot, batch), `threshold` keeps x > 0.5."""

    def __init__(self, scale: float, binarize: str = "none", raw: bool = False):
        self.scale, self.binarize, self.raw = float(scale), binarize, raw

    def __call__(self, arrays: dict, seed: int = 0, position: tuple | None = None) -> dict:
        """`position`: (seed, epoch, step, rank, world size) of a training batch, whose dynamic
        binarisation is then rank `rank`'s slice of the global batch's (data/order.py)."""
        if self.raw:  # stored dtype, unscaled (data/resident.py converts on the device)
            return {"x": torch.from_numpy(arrays["x"].copy())}
        x = torch.from_numpy(arrays["x"].astype(np.float32))  # astype copies: a writable, owned tensor
        if self.scale != 1.0:
            x.mul_(self.scale)
        if self.binarize == "dynamic" and position is not None:
            x = global_order.binarize(x, *position)
        elif self.binarize == "dynamic" and "index" in arrays:  # evaluation: by the samples' indices
            x = global_order.binarize_by_index(x, seed, torch.from_numpy(arrays["index"]))
        elif self.binarize == "dynamic":
            x = torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))
        elif self.binarize == "threshold":
            x = (x > 0.5).float()
        batch = {"x": x}
        for key in ("y", "factors"):
            if key in arrays:
                batch[key] = torch.from_numpy(arrays[key].astype(np.int64))
        if "real" in arrays:  # evaluation with several ranks: which samples are not padding
            batch["real"] = torch.from_numpy(arrays["real"].copy())
        return batch


class ShardStream(IterableDataset):
    """The batches of one rank for one epoch, split over its DataLoader workers.

    Training (`ordered`: the split's shard urls and sizes, with the global batch): the epoch's
    global order (data/order.py); worker j of W makes the rank's batches first + j, first + j + W,
    ..., reading the order's windows shard by shard, holding one window at a time. Evaluation: by
    the plan (data/plan.py), every sample once.

    `plan_for(epoch)` gives the epoch's plan; the epoch is read when iteration starts, so one
    loader with persistent workers serves every epoch (`set_epoch`, shared with the workers).
    `skip`: the global batches of epoch `epoch` already trained on (on resume); worker j then starts
    at batch skip + j, so the DataLoader's turns (from worker 0) continue in order."""

    def __init__(self, plan_for, *, rank: int, workers: int, seed: int, epoch: int, decoder: Decoder,
                 collate: Collate, skip: int = 0, on_error: str = "stop",
                 limit: int | None = None, shared_epoch=None, checksums: dict | None = None,
                 ordered: dict | None = None, offsets: dict | None = None, skips: dict | None = None):
        self.plan_for, self.rank, self.workers = plan_for, rank, max(1, workers)
        self.seed = seed
        self.decoder, self.collate, self.on_error, self.limit = decoder, collate, on_error, limit
        self.skip, self.skip_epoch = skip, epoch
        self._epoch, self._shared = epoch, shared_epoch  # a multiprocessing Value with persistent workers
        self.plan, self._plan_epoch = plan_for(epoch=epoch), epoch
        self.skipped_shards = 0
        self.checksums = checksums  # shard url -> its records' checksums (None: reads not verified)
        self.offsets = offsets  # evaluation: shard url -> index in the split of its first sample
        self.skips = skips or {}  # indexed shards: url -> records `vaepipe index` could not decode (not samples)
        # training: {"urls", "counts", "batch_size", "world_size", "window", "steps"} (see the class doc)
        self.ordered = ordered

    @property
    def epoch(self) -> int:
        return self._shared.value if self._shared is not None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (in every worker, persistent or not)."""
        if self._shared is not None:
            self._shared.value = epoch
        self._epoch = epoch
        self._plan_for_epoch(epoch)

    def _plan_for_epoch(self, epoch: int) -> EpochPlan:
        if epoch != self._plan_epoch:
            self.plan, self._plan_epoch = self.plan_for(epoch=epoch), epoch
        return self.plan

    def __len__(self) -> int:
        if self.ordered is not None:
            return self.ordered["steps"]
        n = self.plan.batches_on_rank(self.rank, self.workers)
        if self.limit is not None:
            n = min(n, -(-self.limit // self.plan.batch_size))
        return n

    def _handler(self, exn: Exception) -> bool:
        source = next((a for a in exn.args if isinstance(a, str) and (".tar" in a or "://" in a or "pipe:" in a)), None)
        if self.on_error == "skip":
            self.skipped_shards += 1
            warnings.warn(f"skipping unreadable data in shard {source} ({self.skipped_shards} skipped by this worker "
                          f"this epoch): {exn.args[0] if exn.args else exn!r}")
            return True
        raise ShardError(f"cannot read shard {source or '(unknown)'}: {exn.args[0] if exn.args else exn!r}") from exn

    def _chunks(self, part: Part):
        """The part's samples, decoded a record at a time: every `parts`-th sample of the shard (by sample index)."""
        records = tar_records(part.url, self._handler, self.decoder.max_record_bytes)
        expected = self.checksums.get(part.url) if self.checksums is not None else None
        i, j = 0, -1
        for j, record in enumerate(records):
            if j in self.skips.get(part.url, ()):
                continue  # a record `vaepipe index` could not decode: not a sample
            if expected is not None and (j >= len(expected) or record_checksum(record) != expected[j]):
                what = (f"record {j} ('{record.get('__key__')}') does not match its checksum in the manifest"
                        if j < len(expected) else f"has more than the {len(expected)} records the manifest lists")
                # stop: raises, naming the shard; skip: warns, counts, and the record's samples are passed over
                self._handler(ShardError(f"{what}: the shard changed since `vaepipe prepare` (corrupt storage or a "
                                         "replaced file); data.on_error=skip passes such records over, data.verify=false "
                                         "turns the check off", part.url))
                i += self.decoder.samples_in(record)
                continue
            chunk = self.decoder(record)
            n = _length(chunk)
            if self.offsets is not None:  # evaluation: each sample's index in the split (its binarisation)
                chunk["index"] = np.arange(self.offsets[part.url] + i, self.offsets[part.url] + i + n)
            if part.parts > 1:
                chunk = _take(chunk, slice((part.part - i) % part.parts, None, part.parts))
            if _length(chunk):
                yield chunk
            i += n
        if expected is not None and 0 <= j + 1 < len(expected):
            self._handler(ShardError(f"ended after {j + 1} of the {len(expected)} records the manifest lists", part.url))

    def _slot_chunks(self, parts: list[Part], need: int | None, fill: list[Part] = (), mark: bool = False):
        """The slot's samples in plan order, in chunks; cycled until `need` when the plan asks for more.
        A slot with no samples of its own (a shard smaller than the slots it was cut for) fills its
        batches from `fill`. `mark`: each chunk says which of its samples are the slot's own
        ("real": False for the repeats that only keep the ranks in step; evaluation leaves them out)."""
        produced, own = 0, True
        if not any(p.count for p in parts) and need:
            parts, own = list(fill), False
        while True:
            for part in parts:
                for chunk in self._chunks(part):
                    if mark:
                        chunk = {**chunk, "real": np.full(_length(chunk), own)}
                    if need is not None and produced + _length(chunk) >= need:
                        yield _take(chunk, slice(0, need - produced))
                        return
                    yield chunk
                    produced += _length(chunk)
            own = False  # the next pass repeats
            if need is None or produced == 0:
                if need and produced == 0:
                    raise ShardError(f"no readable samples in {[p.url for p in parts]}")
                return

    def _batches(self, chunks, size: int):
        """Chunks -> batches of `size` in order (the last may be short)."""
        pending, have = [], 0
        for chunk in chunks:
            pending.append(chunk)
            have += _length(chunk)
            while have >= size:
                joined = _concat(pending) if len(pending) > 1 else pending[0]
                yield _take(joined, slice(0, size))
                pending, have = [_take(joined, slice(size, None))], have - size
        if have:
            yield _concat(pending)

    def _read_window(self, order: global_order.EpochOrder, w: int) -> dict:
        """The window's samples in its shard order, shard by shard (checked as read). Samples an
        unreadable shard or record left out (data.on_error=skip) are filled by repeating the
        window's others, so positions and batches stay those of the plan."""
        window, o = order.windows[w], self.ordered
        chunks = [c for i in window.shards
                  for c in self._chunks(Part(o["urls"][i], 0, 1, o["counts"][i]))]
        if not chunks:
            raise ShardError(f"no readable samples in shards {[o['urls'][i] for i in window.shards]}")
        arrays = _concat(chunks) if len(chunks) > 1 else chunks[0]
        if _length(arrays) != window.size:
            arrays = _take(arrays, np.arange(window.size) % _length(arrays))
        return arrays

    def _ordered_batches(self, epoch: int, worker: int, first: int):
        """(step, arrays) of this rank's batches that worker `worker` makes, from step `first` on."""
        o = self.ordered
        order = global_order.epoch_order(tuple(o["counts"]), self.seed, epoch, o["window"])
        held: dict[int, tuple[dict, np.ndarray]] = {}  # the one window held: workers only move forward
        for step in range(first + worker, o["steps"], self.workers):
            lo, hi = global_order.rank_slice(step, self.rank, o["batch_size"], o["world_size"])
            pieces, pos = [], lo
            while pos < hi:
                w = order.window_at(pos)
                if w not in held:
                    held = {w: (self._read_window(order, w), order.window_permutation(w))}
                arrays, perm = held[w]
                start, end = order.windows[w].start, min(hi, order.windows[w].start + order.windows[w].size)
                pieces.append(_take(arrays, perm[pos - start:end - start]))
                pos = end
            yield step, (_concat(pieces) if len(pieces) > 1 else pieces[0])

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        epoch = self.epoch
        skip = self.skip if epoch == self.skip_epoch else 0
        self.skipped_shards = 0
        if self.ordered is not None:
            o = self.ordered
            for step, arrays in self._ordered_batches(epoch, worker, skip):
                out = self.collate(arrays, position=(self.seed, epoch, step, self.rank, o["world_size"]))
                if self.on_error == "skip":
                    out["shards_skipped"] = torch.tensor(self.skipped_shards)
                yield out
            return
        plan = self._plan_for_epoch(epoch)  # evaluation: every sample once, in shard order
        slot = self.rank * self.workers + worker
        need = None if plan.batches_per_slot is None else plan.batches_per_slot * plan.batch_size
        fill = next((parts for parts in plan.slots if any(p.count for p in parts)), [])
        chunks = self._slot_chunks(plan.slots[slot], need, fill, mark=need is not None)
        if self.limit is not None:  # evaluation on the first N samples (one process)
            chunks = _first(chunks, self.limit)
        for index, arrays in enumerate(self._batches(chunks, plan.batch_size)):
            out = self.collate(arrays, self.seed)  # dynamic binarisation: by each sample's index
            if self.on_error == "skip":  # lets the training loop log how many shards were skipped
                out["shards_skipped"] = torch.tensor(self.skipped_shards)
            yield out


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


def loader_workers(num_workers: int, n_shards: int) -> int:
    """Workers a loader over `n_shards` shards really starts (each shard splits into at most 64 parts)."""
    return min(num_workers, max(1, n_shards * 64)) if num_workers > 0 else 0


def _same_plan(plan: EpochPlan, epoch: int = 0) -> EpochPlan:
    return plan


@functools.lru_cache(maxsize=None)
def warn_unverifiable(root: str) -> None:
    """Once per data root: shards from before per-record checksums are read unverified."""
    warnings.warn(f"{root}: the manifest has no per-record checksums (prepared by an older vaepipe), so reads "
                  "are not verified; `vaepipe prepare ... --force` rebuilds the shards with them")


def make_loader(root: str, split: str, batch_size: int, *, shuffle: bool = False, train: bool | None = None,
                seed: int = 0, epoch: int = 0, shuffle_buffer: int = 2000, num_workers: int = 0,
                binarize: str = "none", limit: int | None = None, manifest: dict | None = None, rank: int = 0,
                world_size: int = 1, skip: int = 0, on_error: str = "stop", worker_start: str = "forkserver",
                persistent: bool = False, raw: bool = False, verify: bool = True,
                steps: int | None = None) -> DataLoader:
    """A loader of dict batches {"x": float32 [B, *shape], "y": [B], "factors": [B, F]} over one split
    for one rank and one epoch. `train` (default: = shuffle) gives every rank the same number of full
    batches; otherwise every sample is read (padded by repeats only with several ranks).
    `persistent`: workers live across epochs; move the stream on with `loader.dataset.set_epoch`
    (starting workers costs ~1 s an epoch, most of a small epoch). `raw`: x in the stored dtype,
    neither scaled nor binarised. `verify`: every record checked against its checksum in the
    manifest as it is read (data.verify). Training (shuffle and train) reads the epoch's global
    order (data/order.py: the same batches for any number of ranks and workers), `steps` batches
    per epoch (default: all full global batches) from batch `skip` on."""
    root = str(root)
    manifest = manifest or load_manifest(root)
    entry = manifest["splits"][split]
    base = shards_base(root, entry, manifest)
    check_local_shards(base, entry)
    urls = [shard_url(base, s["name"]) for s in entry["shards"]]
    checksums = None
    if verify:
        if all("records" in s for s in entry["shards"]):
            checksums = {url: s["records"] for url, s in zip(urls, entry["shards"])}
        else:
            warn_unverifiable(root)
    counts = [s["num_samples"] for s in entry["shards"]]
    train = shuffle if train is None else train
    if shuffle and not train:
        raise ValueError("a shuffled loader is a training loader (train=True); evaluation reads in order")
    ordered = None
    if shuffle and train:
        workers = max(0, num_workers)
        n, g = sum(counts), batch_size * world_size
        full = n // g  # full global batches (data/order.py)
        if full == 0:
            raise ValueError(f"{n} samples cannot make one global batch of {g} ({world_size} rank(s) x "
                             f"data.batch_size={batch_size}): lower data.batch_size")
        steps = full if steps is None else min(steps, full)
        ordered = {"urls": urls, "counts": counts, "batch_size": batch_size, "world_size": world_size,
                   "window": max(0, shuffle_buffer), "steps": steps}
        # what summaries say of an epoch (picklable: workers get the stream through a forkserver)
        plan_for = functools.partial(_same_plan, EpochPlan([], steps, batch_size, n - full * g, 0))
    else:
        workers = loader_workers(num_workers, len(urls))
        plan_for = functools.partial(plan_epoch, urls, counts, batch_size=batch_size, world_size=world_size,
                                     workers=workers, seed=seed, shuffle=shuffle, train=train)
    context = worker_context(worker_start) if workers else None
    persistent = persistent and workers > 0
    offsets = None if ordered is not None else dict(zip(urls, np.cumsum([0, *counts[:-1]]).tolist()))
    stream = ShardStream(plan_for, rank=rank, workers=workers, seed=seed, epoch=epoch, offsets=offsets,
                         decoder=make_decoder(manifest, entry),
                         collate=Collate(manifest["scale"], binarize, raw), skip=skip, on_error=on_error, limit=limit,
                         shared_epoch=context.Value("q", epoch, lock=False) if persistent else None,
                         checksums=checksums, ordered=ordered,
                         skips={url: set(s["skip"]) for url, s in zip(urls, entry["shards"]) if s.get("skip")})
    loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=persistent,
                        multiprocessing_context=context)
    return loader


def make_subset_loader(root: str, split: str, batch_size: int, *, limit: int | None = None, seed: int = 0,
                       manifest: dict | None = None, **kwargs):
    """Evaluation batches over a whole split, or over `limit` of its examples drawn uniformly at
    random without replacement (from `seed`), read in stored order. Not its first `limit`: a split
    stored in label order (binarized MNIST's test set, whose first 1000 are ~98 % zeros) would give
    a biased sample. The examples keep the pixels (dynamic binarisation) they get in the whole split."""
    manifest = manifest or load_manifest(str(root))
    n = manifest["splits"][split]["num_samples"]
    loader = make_loader(root, split, batch_size, seed=seed, manifest=manifest, **kwargs)
    if limit is None or limit >= n:
        return loader
    # sorted indices, memory in `limit` (not in the split's size, which a remote manifest only claims)
    keep = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    return _selected(loader, keep, batch_size)


def _selected(loader, keep: np.ndarray, batch_size: int):
    """The rows of the loader's batches whose index in the split is in `keep` (sorted), re-batched."""
    pos, pending = 0, []
    for batch in loader:
        m = len(batch["x"])
        lo, hi = np.searchsorted(keep, [pos, pos + m])
        mask = torch.zeros(m, dtype=torch.bool)
        mask[torch.from_numpy(keep[lo:hi] - pos)] = True
        pos += m
        if mask.any():
            pending.append({k: v[mask] for k, v in batch.items() if torch.is_tensor(v) and v.dim() and len(v) == m})
        while pending and sum(len(p["x"]) for p in pending) >= batch_size:
            joined = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
            yield {k: v[:batch_size] for k, v in joined.items()}
            rest = {k: v[batch_size:] for k, v in joined.items()}
            pending = [rest] if len(rest["x"]) else []
    if pending:
        yield {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
