"""Arrays -> WebDataset tar shards per split + manifest.json (`vaepipe prepare`).

Record encoding (format 2): each tar record holds up to `samples_per_record` consecutive samples
as raw bytes: `x.bin` (n x shape, the manifest's dtype), `y.bin` (n int64 labels), `factors.bin`
(n x F int64); shape and dtype live once in the manifest, with each shard's sha256 and each
record's checksum (`records`: xxh3-64 of its members, `record_checksum`), which the loader checks
as it reads (data.verify). Python's tarfile spends ~130 us on every
tar member (header and pax parsing), so one sample per member capped the loader near 17k samples/s
on a CPU core; a record of 128 MNIST samples costs one header for 100 KB, and the loader's per-sample
work is a numpy view (docs/data.md, bench/loader_vs_step.py). Format 1 (one sample per record,
`y.cls` as text) is still read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
import xxhash

from pipeline.data.sources import load_source
from pipeline.data.manifest import SPLITS, check_manifest
from pipeline.errors import ManifestError, ShardError  # noqa: F401 - re-exported: raised by the loader and location

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 30  # a manifest lists ~80 bytes per record: 1 GiB is ~10^9 samples
FORMAT_VERSION = 2
SAMPLES_PER_RECORD = 128


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def record_checksum(record: dict) -> str:
    """xxh3-64 of a record's members (names and bytes, in name order; webdataset's `__key__`,
    `__url__` ... excluded). ~7 us for a record of 128 MNIST samples, ~3% of the loader's time per
    record (a sha256 would cost ~150 us, more than half of it): the per-read check stays cheap."""
    h = xxhash.xxh3_64()
    for name in sorted(k for k in record if not k.startswith("__")):
        h.update(name.encode())
        h.update(record[name])
    return h.hexdigest()


def write_json_atomic(obj: dict, path: Path) -> None:
    """Temp file + rename (outputs.atomic_write): a reader sees the old file or the new one, never half of one."""
    from pipeline.outputs import write_text

    write_text(path, json.dumps(obj, indent=2) + "\n", "manifest")


class SplitWriter:
    """One split's shards, written from chunks of samples as they come (a whole array, or an image
    stream a window at a time): records of `per_record` consecutive samples that never cross a
    `shard_samples` boundary, each shard closed at `shard_bytes`. Holds at most one record."""

    def __init__(self, split: str, out: Path, shard_bytes: int, shard_samples: int,
                 per_record: int = SAMPLES_PER_RECORD):
        self.split, self.out, self.shard_bytes, self.shard_samples = split, out, shard_bytes, shard_samples
        self.per_record = min(per_record, shard_samples) if shard_samples > 0 else per_record
        self.pattern = f"{split}-%06d.tar"
        self.sink = None  # opened at the first record: an empty split writes no file
        self.pending: list[dict] = []
        self.have = self.written = 0
        self.shape = self.dtype = None
        self.counts: dict[int, int] = {}
        self.checksums: dict[int, list[str]] = {}

    def add(self, chunk: dict) -> None:
        """chunk: {"x": [n, *shape], "y": [n] (optional), "factors": [n, F] (optional)}."""
        x = chunk["x"]
        if self.shape is None:
            self.shape, self.dtype = tuple(x.shape[1:]), x.dtype
        elif tuple(x.shape[1:]) != self.shape or x.dtype != self.dtype:
            raise ValueError(f"split {self.split}: samples of {x.dtype} {tuple(x.shape[1:])} after {self.dtype} {self.shape}")
        if len(x):
            self.pending.append({k: v for k, v in chunk.items() if v is not None})
            self.have += len(x)
        while self.have >= self._next_size():
            self._emit(self._next_size())

    def _next_size(self) -> int:
        if self.shard_samples > 0:
            return min(self.per_record, self.shard_samples - self.written % self.shard_samples)
        return self.per_record

    def _emit(self, m: int) -> None:
        joined = {k: np.concatenate([c[k] for c in self.pending]) if len(self.pending) > 1 else self.pending[0][k]
                  for k in self.pending[0]}
        head = {k: v[:m] for k, v in joined.items()}
        rest = {k: v[m:] for k, v in joined.items()}
        self.pending, self.have = ([rest] if self.have > m else []), self.have - m
        record = {"__key__": f"{self.split}-{self.written:08d}", "x.bin": np.ascontiguousarray(head["x"]).tobytes()}
        if "y" in head:
            record["y.bin"] = np.ascontiguousarray(head["y"], dtype=np.int64).tobytes()
        if "factors" in head:
            record["factors.bin"] = np.ascontiguousarray(head["factors"], dtype=np.int64).tobytes()
        if self.sink is None:
            maxcount = -(-self.shard_samples // self.per_record) if self.shard_samples > 0 else 10**12
            # mtime fixed: the same samples make the same bytes (sha256), whenever and however prepared
            self.sink = wds.ShardWriter(str(self.out / self.pattern), maxsize=self.shard_bytes, maxcount=maxcount,
                                        verbose=0, mtime=0)
        self.sink.write(record)
        # ShardWriter numbers shards from 0 and has already advanced `shard` past the open one.
        shard = self.sink.shard - 1
        self.counts[shard] = self.counts.get(shard, 0) + m
        self.checksums.setdefault(shard, []).append(record_checksum(record))
        self.written += m

    def close(self, shape_hint=None, dtype_hint=None) -> dict:
        """Write what is left; the split's manifest entry. An empty split takes its shape from the hint."""
        while self.have:
            self._emit(min(self.have, self._next_size()))
        if self.sink is not None:
            self.sink.close()
        shards = [self.out / (self.pattern % i) for i in sorted(self.counts)]
        shape = self.shape if self.shape is not None else tuple(shape_hint or ())
        return {
            "num_samples": int(self.written),
            "shape": list(shape),
            "dtype": str(self.dtype if self.dtype is not None else np.dtype(dtype_hint or "float32")),
            "samples_per_record": self.per_record,
            "shards": [
                {"name": p.name, "num_samples": self.counts[i], "bytes": p.stat().st_size, "sha256": sha256_file(p),
                 "records": self.checksums[i]}
                for p, i in zip(shards, sorted(self.counts))
            ],
        }


def write_split(split: str, arrays, out: Path, shard_bytes: int, shard_samples: int,
                per_record: int = SAMPLES_PER_RECORD) -> dict:
    """Write one split held in memory (SplitArrays); return its manifest entry."""
    writer = SplitWriter(split, out, shard_bytes, shard_samples, per_record)
    writer.add({"x": arrays.x, "y": arrays.y, "factors": arrays.factors})
    return writer.close()


LOCK = ".prepare.lock"
STAGING = ".vaepipe-staging-"  # prefix of the folder a prepare writes into before moving its files in
JOURNAL = ".vaepipe-prepare.json"  # the shard names a prepare is moving in: still ours if it is cut short
OWN_SHARD = re.compile(rf"({'|'.join(SPLITS)})-\d{{6,}}\.tar")  # the names write_split gives


def _is_staging(entry: Path) -> bool:
    return entry.name.startswith(STAGING) and entry.is_dir() and not entry.is_symlink()


def foreign_entries(out: Path) -> list[str]:
    """What a data folder holds besides vaepipe's own bookkeeping (its lock, journal, an interrupted
    prepare's staging folder): any of it means the folder is not vaepipe's to fill unasked."""
    if not out.is_dir():
        return []
    return sorted(e.name for e in out.iterdir() if e.name not in (LOCK, JOURNAL) and not _is_staging(e))


def _journal_names(out: Path) -> set:
    """Shard names an interrupted prepare was moving in (vaepipe's own, if only of its shard form)."""
    try:
        names = json.loads((out / JOURNAL).read_text()).get("names", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and OWN_SHARD.fullmatch(n)}


def _open_lock(out: Path) -> int:
    # O_NOFOLLOW: a lock name planted as a symlink is refused, not followed
    try:
        return os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise FileExistsError(f"{out / LOCK} is a symbolic link, not vaepipe's lock file: refusing to follow it; "
                              "remove it if it is not yours to keep") from None


def prepare(name: str, out: str | Path, source: str | None = None, seed: int = 0, sizes: dict | None = None,
            shard_bytes: int = 64_000_000, shard_samples: int = 0, force: bool = False, log=print,
            images: dict | None = None) -> dict:
    """Build shards + manifest for data set `name` in `out`. The shards are written into a staging
    folder inside `out` and moved in once all are written (listed first in a journal), the manifest
    last: a folder with a manifest is complete, and an interrupted prepare is simply run again.
    Never overwrites or deletes a file vaepipe did not write: a folder without vaepipe's manifest must
    be empty unless `force`, and `force` removes only shard files its old manifest (or journal) names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # One writer at a time: the tasks of a Slurm array sweep all start as rank 0 with the same data
    # root. The others wait here, then find the manifest (FileExistsError: already prepared).
    with os.fdopen(_open_lock(out), "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old, damaged = None, False
        if (out / MANIFEST).exists():
            try:
                old = read_manifest(out)
            except ManifestError as err:
                if not force:
                    raise ManifestError(f"{err} (`vaepipe prepare {name} --out {out} --force` replaces it; shard files "
                                        "it no longer lists are not provably vaepipe's: remove those yourself)") from None
                damaged = (out / MANIFEST).is_file() and not (out / MANIFEST).is_symlink()
                log(f"replacing the unreadable {out / MANIFEST} (--force)")
        if old is not None and not force:
            raise FileExistsError(f"{out / MANIFEST} exists: the data set is already prepared (use --force to rebuild)")
        listed = {s["name"] for e in (old or {"splits": {}})["splits"].values() for s in e["shards"]}
        ours = {n for n in listed if OWN_SHARD.fullmatch(n)} | _journal_names(out)
        mine = ours | ({MANIFEST} if old is not None or damaged else set())
        others = [n for n in foreign_entries(out) if n not in mine]
        if others and not force:
            raise FileExistsError(
                f"{out} holds {len(others)} file(s) vaepipe did not write ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}) and no {MANIFEST}: vaepipe prepares only into a new or empty "
                f"folder. Choose another folder, or write beside them with `vaepipe prepare {name} --out {out} --force` "
                "(it never overwrites or deletes files it did not write)")
        clash = [n for n in others if OWN_SHARD.fullmatch(n) or n == MANIFEST]
        if clash:
            raise FileExistsError(f"{out} holds {', '.join(clash[:3])}{', ...' if len(clash) > 3 else ''}, which vaepipe "
                                  "did not write (no manifest or journal of it lists them) and would overwrite with its "
                                  "own files of that name: move them, or prepare into another folder (left from a prepare "
                                  "whose manifest is gone? remove them yourself)")
        return _prepare_locked(name, out, source, seed, sizes, shard_bytes, shard_samples, ours, log, images)


def open_source(name: str, source, seed: int, sizes, images: dict | None, log):
    """SourceData (arrays in memory) or, for `images`, an ImageData streamed a window at a time."""
    if name != "images":
        return load_source(name, source, seed=seed, sizes=sizes)
    from pipeline.data.image_source import ImageData, ImageOptions

    if source is None:
        raise FileNotFoundError("images need --source: a folder, a glob, a .zip or a .tar of image files")
    if sizes:
        raise ValueError("--sizes does not apply to images: --val N --test N hold images out")
    return ImageData(str(source), ImageOptions(**(images or {})), seed=seed, log=log)


def _prepare_locked(name, out: Path, source, seed, sizes, shard_bytes, shard_samples, ours: set, log,
                    images=None) -> dict:
    t0 = time.time()
    for stale in filter(_is_staging, out.glob(STAGING + "*")):  # an interrupted prepare's: our shard names only
        for f in stale.iterdir():
            if OWN_SHARD.fullmatch(f.name) and f.is_file() and not f.is_symlink():
                f.unlink()
        with contextlib.suppress(OSError):
            stale.rmdir()
    # The source is read (and checked) before anything is removed: a rebuild with a wrong --source or
    # --sizes fails with the old data set intact.
    data = open_source(name, source, seed, sizes, images, log)
    staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=out))  # new, 0700: nothing planted inside
    manifest = {
        "format_version": FORMAT_VERSION, "name": name, "source": source, "seed": seed,
        "scale": data.scale, "binary": data.binary,
        "factor_names": data.factor_names, "factor_sizes": data.factor_sizes,
        "splits": {},
    }
    try:
        first = None  # an empty split takes the first one's sample shape
        for split in SPLITS:
            writer = SplitWriter(split, staging, shard_bytes, shard_samples)
            for chunk in data.chunks(split):
                writer.add(chunk)
            entry = writer.close(*(first or (None, None)))
            first = first or ((entry["shape"], entry["dtype"]) if entry["num_samples"] else None)
            manifest["splits"][split] = entry
            log(f"  {split:5s}: {entry['num_samples']:7d} samples of shape {tuple(entry['shape'])} {entry['dtype']} "
                f"in {len(entry['shards'])} shard(s)")
    except BaseException:
        for f in staging.iterdir():  # ours, in our new 0700 folder: nothing half-written is left
            f.unlink()
        staging.rmdir()
        raise
    finally:
        data.close()
    manifest.update(data.manifest_fields())
    # The journal first (what is about to be ours), then the manifest goes (a folder without one is
    # incomplete), then only our old shard files, then the new shards move in, the manifest last.
    new = sorted(f.name for f in staging.iterdir())
    write_json_atomic({"names": sorted(set(new) | ours)}, out / JOURNAL)
    (out / MANIFEST).unlink(missing_ok=True)
    for old in ours:
        path = out / old
        if path.is_file() and not path.is_symlink():
            path.unlink()
    for f in new:
        os.replace(staging / f, out / f)  # a rename: replaces a name, never writes through a link
    staging.rmdir()
    write_json_atomic(manifest, out / MANIFEST)
    (out / JOURNAL).unlink(missing_ok=True)
    log(f"prepared '{name}' in {out} ({time.time() - t0:.1f} s)")
    return manifest


def read_manifest(root: str | Path) -> dict:
    """The manifest of a local data root, checked against the schema (data/manifest.py)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in data root '{root}': run `vaepipe prepare NAME --out {root}`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: {path.stat().st_size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from None
    return check_manifest(manifest, str(path))


def verify(root: str | Path) -> list[str]:
    """Problems found checking every shard's presence, size and sha256 against the manifest."""
    root = Path(root)
    problems = []
    for split, entry in read_manifest(root)["splits"].items():
        for shard in entry["shards"]:
            p = root / shard["name"]
            if not p.is_file():
                problems.append(f"{p}: missing")
            elif p.stat().st_size != shard["bytes"]:
                problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {shard['bytes']}")
            elif sha256_file(p) != shard["sha256"]:
                problems.append(f"{p}: sha256 differs from the manifest")
    return problems
