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

from pipeline.data.sources import SourceData, load_source
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


def record_bounds(n: int, per_record: int, shard_samples: int) -> list[tuple[int, int]]:
    """[start, end) of each record: `per_record` samples, never crossing a `shard_samples` boundary."""
    step = shard_samples if shard_samples > 0 else n or 1
    return [(r, min(r + per_record, start + step, n)) for start in range(0, n, step)
            for r in range(start, min(start + step, n), per_record)]


def write_split(split: str, arrays, out: Path, shard_bytes: int, shard_samples: int,
                per_record: int = SAMPLES_PER_RECORD) -> dict:
    """Write one split's shards; return its manifest entry."""
    x = np.ascontiguousarray(arrays.x)
    if shard_samples > 0:
        per_record = min(per_record, shard_samples)
    maxcount = -(-shard_samples // per_record) if shard_samples > 0 else 10**12  # records per shard
    pattern = f"{split}-%06d.tar"
    counts: dict[int, int] = {}
    checksums: dict[int, list[str]] = {}
    with wds.ShardWriter(str(out / pattern), maxsize=shard_bytes, maxcount=maxcount, verbose=0) as sink:
        for a, b in record_bounds(len(x), per_record, shard_samples):
            record = {"__key__": f"{split}-{a:08d}", "x.bin": x[a:b].tobytes()}
            if arrays.y is not None:
                record["y.bin"] = np.ascontiguousarray(arrays.y[a:b], dtype=np.int64).tobytes()
            if arrays.factors is not None:
                record["factors.bin"] = np.ascontiguousarray(arrays.factors[a:b], dtype=np.int64).tobytes()
            sink.write(record)
            # ShardWriter numbers shards from 0 and has already advanced `shard` past the open one.
            counts[sink.shard - 1] = counts.get(sink.shard - 1, 0) + (b - a)
            checksums.setdefault(sink.shard - 1, []).append(record_checksum(record))
    shards = [out / (pattern % i) for i in sorted(counts)]
    return {
        "num_samples": int(len(x)),
        "shape": list(x.shape[1:]),
        "dtype": str(x.dtype),
        "samples_per_record": per_record,
        "shards": [
            {"name": p.name, "num_samples": counts[i], "bytes": p.stat().st_size, "sha256": sha256_file(p),
             "records": checksums[i]}
            for p, i in zip(shards, sorted(counts))
        ],
    }


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
            shard_bytes: int = 64_000_000, shard_samples: int = 0, force: bool = False, log=print) -> dict:
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
        return _prepare_locked(name, out, source, seed, sizes, shard_bytes, shard_samples, ours, log)


def _prepare_locked(name, out: Path, source, seed, sizes, shard_bytes, shard_samples, ours: set, log) -> dict:
    t0 = time.time()
    for stale in filter(_is_staging, out.glob(STAGING + "*")):  # an interrupted prepare's: our shard names only
        for f in stale.iterdir():
            if OWN_SHARD.fullmatch(f.name) and f.is_file() and not f.is_symlink():
                f.unlink()
        with contextlib.suppress(OSError):
            stale.rmdir()
    # The source is read (and checked) before anything is removed: a rebuild with a wrong --source or
    # --sizes fails with the old data set intact.
    data: SourceData = load_source(name, source, seed=seed, sizes=sizes)
    staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=out))  # new, 0700: nothing planted inside
    manifest = {
        "format_version": FORMAT_VERSION, "name": name, "source": source, "seed": seed,
        "scale": data.scale, "binary": data.binary,
        "factor_names": data.factor_names, "factor_sizes": data.factor_sizes,
        "splits": {},
    }
    for split in SPLITS:
        entry = write_split(split, data.splits[split], staging, shard_bytes, shard_samples)
        manifest["splits"][split] = entry
        log(f"  {split:5s}: {entry['num_samples']:7d} samples of shape {tuple(entry['shape'])} {entry['dtype']} "
            f"in {len(entry['shards'])} shard(s)")
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
