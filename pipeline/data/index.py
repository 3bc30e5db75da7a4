"""`vaepipe index`: standard WebDataset shards, read as they are, described by a manifest written
elsewhere (format 3). Shards from webdataset's TarWriter/ShardWriter or img2dataset hold one sample
per record: an image member (`.jpg/.jpeg/.png/.webp`, or a uint8 `.npy`) with an optional `.cls`
label and whatever else (`.json`, `.txt`, ignored; pickles `.pyd/.pickle` are never unpickled).
Keys may hold dots and folders; tars may be gzip-compressed; shards may be of any sizes.

The manifest records, per shard, its sample count, size, sha256 and every record's checksum (the
loader checks them as it reads), the records a decoder could not read (`skip`: left out of the
sample count and passed over when streaming), the image and label keys and the decoded shape (after
`--size`/`--crop`). The shards are never written to. The loader decodes each image in its workers
and resizes it to the manifest's shape (data/stream.py: ImageRecordDecoder), so every guarantee of
the stream (global order, exact and elastic resume, verified reads) holds on these shards too.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
from braceexpand import braceexpand

from pipeline.data.image_source import ImageOptions, decode, transform
from pipeline.data.location import shard_url
from pipeline.data.manifest import MAX_INDEXED_RECORD, check_shard_name
from pipeline.data.shards import record_checksum, sha256_file

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "npy")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_RECORD_BYTES = MAX_INDEXED_RECORD  # one sample's members while indexing: a larger record is refused unread


def shard_list(spec: str) -> tuple[str, list[str]]:
    """(where the shards are, their file names) for a folder, a brace pattern, or a URL/pipe: pattern."""
    if spec.startswith("pipe:"):
        if "{name}" not in spec:
            raise ValueError(f"{spec!r}: a pipe: command needs a {{name}} placeholder; list the shards with "
                             "--names 'train-{000000..000009}.tar'")
        return spec, []
    if Path(spec).is_dir():
        names = sorted(p.name for p in Path(spec).iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
        if not names:
            raise FileNotFoundError(f"{spec}: no shard files ({', '.join(SHARD_SUFFIXES)})")
        return os.path.abspath(spec), names
    urls = list(braceexpand(spec))
    base = {u.rsplit("/", 1)[0] if "/" in u else "." for u in urls}
    if len(base) != 1:
        raise ValueError(f"{spec!r}: every shard must be in one folder (one base URL)")
    root = base.pop()
    return (root if "://" in root else os.path.abspath(root)), [u.rsplit("/", 1)[-1] for u in urls]


def _image_member(record: dict) -> str | None:
    return next((k for k in IMAGE_KEYS if k in record), None)


def decode_record(record: dict, opts: ImageOptions) -> tuple[np.ndarray | None, str | None]:
    """A record's image as uint8 [C, H, W] after crop and resize, or (None, why)."""
    key = _image_member(record)
    if key is None:
        return None, f"no image member ({', '.join(IMAGE_KEYS)}) among {sorted(k for k in record if not k.startswith('__'))}"
    if key != "npy":
        return decode((record[key], opts))
    try:  # a uint8 array [H, W], [H, W, C] or [C, H, W] (C 1 or 3), bounded and never a pickle
        arr = _small_npy(record[key])
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError(f"{arr.dtype} {arr.shape}: uint8 [H,W], [H,W,C] or [C,H,W] wanted")
        hwc = arr if arr.ndim == 2 or arr.shape[-1] in (1, 3) else arr.transpose(1, 2, 0)
        from PIL import Image  # then the same channels, crop and resize as a decoded image

        return transform(Image.fromarray(hwc[..., 0] if hwc.ndim == 3 and hwc.shape[-1] == 1 else hwc), opts), None
    except Exception as err:  # noqa: BLE001
        return None, f"npy: {type(err).__name__}: {err}"


def _small_npy(data: bytes) -> np.ndarray:
    """The array of an .npy member whose header declares no more bytes than the member holds."""
    from numpy.lib import format as npy_format

    f = io.BytesIO(data)
    version = npy_format.read_magic(f)
    read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, _, dtype = read(f)
    if int(np.prod(shape, dtype=object)) * dtype.itemsize > len(data):
        raise ValueError(f"header declares {shape} {dtype}, more than the member's {len(data)} bytes")
    f.seek(0)
    return npy_format.read_array(f, allow_pickle=False)


def index_shards(spec: str, opts: ImageOptions, names: list[str] | None = None, log=print) -> tuple[str, dict]:
    """(shards root, split entry) of the shards `spec` names: counts, checksums, shape, skipped records."""
    from pipeline.data.stream import tar_records  # the bounded reader the loader uses

    root, found = shard_list(spec)
    names = names or found
    if not names:
        raise ValueError(f"{spec}: no shards to index")
    for name in names:
        check_shard_name(name, spec)
    shards, shape, biggest, bad, labelled, total = [], None, 0, [], 0, 0
    from tqdm import tqdm

    bar = tqdm(total=len(names), unit="shard", desc="indexing", file=sys.stderr, disable=not sys.stderr.isatty())

    def fail(exn):
        raise exn

    for name in names:
        url = shard_url(root, name)
        checksums, skip, n = [], [], 0
        for j, record in enumerate(tar_records(url, fail, MAX_RECORD_BYTES)):
            checksums.append(record_checksum(record))
            members = {k: v for k, v in record.items() if not k.startswith("__")}
            biggest = max(biggest, sum(len(v) for v in members.values()))
            arr, why = decode_record(record, opts)
            if arr is not None and shape is not None and arr.shape != shape:
                arr, why = None, f"decoded to {arr.shape}, not {shape} as the first: pass --size"
            if arr is None:
                skip.append(j)
                if len(bad) < 5:
                    bad.append(f"{name} record {j} ('{record['__key__']}'): {why}")
                if opts.on_error == "stop":
                    raise ValueError(f"{bad[-1]} (--on-error skip leaves it out)")
                continue
            shape = shape or arr.shape
            if "cls" in record:
                try:
                    int(record["cls"])
                except ValueError:
                    raise ValueError(f"{name} record {j} ('{record['__key__']}'): .cls {record['cls'][:20]!r} is "
                                     "not an integer label") from None
                labelled += 1
            n += 1
        local = not url.startswith(("pipe:", "http://", "https://"))
        entry = {"name": name, "num_samples": n, "bytes": os.path.getsize(url) if local else 0, "records": checksums}
        if local:  # a second read of the file: the records above came through the tar reader
            entry["sha256"] = sha256_file(Path(url))
        if skip:
            entry["skip"] = skip
        shards.append(entry)
        total += n
        bar.update(1)
    bar.close()
    if 0 < labelled < total:  # labels for some samples only: not a labelled set, and not silently unlabelled
        raise ValueError(f"{spec}: {labelled} of {total} samples have a .cls label: all or none must")
    label_key = "cls" if labelled else None
    if shape is None:
        raise ValueError(f"{spec}: no readable image in {len(names)} shard(s): {'; '.join(bad[:3])}")
    if bad:
        log(f"  {sum(len(s.get('skip', [])) for s in shards)} unreadable record(s) left out: {'; '.join(bad)}")
    log(f"  {spec}: {total} samples of shape {shape} in {len(shards)} shard(s)"
        + (", labels from .cls" if label_key == "cls" else ", no labels"))
    return root, {"num_samples": total, "shape": list(shape), "dtype": "uint8", "samples_per_record": 1,
                  "max_record_bytes": biggest, "label": label_key, "shards": shards}


SPLIT_PREFIXES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _by_prefix(spec: str) -> dict | None:
    """A folder whose shards are named train-*, val-* (valid-*), test-*: its splits by name."""
    if not Path(spec).is_dir():
        return None
    root, names = shard_list(spec)
    groups: dict = {}
    for name in names:
        prefix = name.split("-", 1)[0].split(".", 1)[0].lower()
        if prefix not in SPLIT_PREFIXES:
            return None
        groups.setdefault(SPLIT_PREFIXES[prefix], []).append(name)
    return groups if "train" in groups else None


def index(spec: str, out: str | Path, val: str | None = None, test: str | None = None,
          opts: ImageOptions | None = None, force: bool = False, log=print, names: list[str] | None = None,
          val_names: list[str] | None = None, test_names: list[str] | None = None) -> dict:
    """Write `out`/manifest.json for the shards of `spec` (train; or a folder of train-*, val-*, test-*
    shards), `val` and `test`; without val shards, the last train shard is the validation split."""
    from pipeline.data.shards import MANIFEST, write_json_atomic

    opts = opts or ImageOptions()
    out = Path(out)
    if (out / MANIFEST).exists() and not force:
        raise FileExistsError(f"{out / MANIFEST} exists (use --force to index again)")
    groups = _by_prefix(spec) or {"train": names}  # a folder of train-*, val-*, test-*: split by name
    given = {"val": (val, val_names), "test": (test, test_names)}
    splits: dict = {}
    for split in ("train", "val", "test"):
        source, split_names = given.get(split, (None, None))
        if source is not None:  # --val / --test replace that split only
            splits[split] = index_shards(source, opts, names=split_names, log=log)
        elif split in groups:
            splits[split] = index_shards(spec, opts, names=groups[split], log=log)
    if "val" not in splits:
        root, entry = splits["train"]
        if len(entry["shards"]) < 2:
            raise ValueError(f"{spec}: one shard, and no validation shards: give them with --val")
        held = entry["shards"].pop()
        entry["num_samples"] -= held["num_samples"]
        splits["val"] = (root, {**entry, "num_samples": held["num_samples"], "shards": [held]})
        log(f"  validation: the last train shard, {held['name']} ({held['num_samples']} samples); --val names others")
    shape = splits["train"][1]["shape"]
    if any(e["shape"] != shape for _, e in splits.values()):
        raise ValueError(f"the splits decode to different shapes {[e['shape'] for _, e in splits.values()]}: pass --size")
    if "test" not in splits:
        splits["test"] = (splits["val"][0], {**splits["val"][1], "num_samples": 0, "shards": []})
    labelled = {e["label"] for _, e in splits.values() if e["shards"]}
    if len(labelled) > 1:
        raise ValueError("some splits have .cls labels and others none")
    manifest = {
        "format_version": 3, "name": "images", "source": spec, "seed": 0, "scale": 1.0 / 255, "binary": False,
        "factor_names": None, "factor_sizes": None, "classes": None,
        "images": {"options": {"size": opts.size, "crop": list(opts.crop) if opts.crop else None,
                               "channels": opts.channels}},
        "splits": {split: {**entry, "root": root} for split, (root, entry) in splits.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, out / MANIFEST)
    log(f"indexed into {out / MANIFEST} (the shards were only read)")
    return manifest
