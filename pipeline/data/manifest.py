"""What a manifest may say: the schema every manifest is checked against where it is read.

A manifest travels with the shards (a colleague's folder, a bucket, a download) and is data, never
instructions: its shard names are joined to the data root and, for a `pipe:` root, put into a shell
command; its counts and shapes size allocations. So before anything uses it, every field is checked
here and a bad one is one line naming the manifest, the field and the value:

- shard names are plain file names (SHARD_NAME: letters, digits, `_ . + -`; no `/`, no `..`, no
  leading `.` or `-`, nothing a shell reads specially), each listed once;
- counts are non-negative integers that add up, and a shard's bytes can hold its samples (an
  absurd `num_samples` would otherwise size an array of terabytes);
- shapes are positive integers, dtypes one of those vaepipe writes, `scale` a positive number.
"""

from __future__ import annotations

import math
import re

from pipeline.errors import ManifestError

SPLITS = ("train", "val", "test")
DTYPES = ("uint8", "float32")  # what `vaepipe prepare` writes (sources.py's dtype policy)
SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}")
MAX_SAMPLES = 1 << 40  # beyond any data set; keeps every count an exact int64 / float64
MAX_SAMPLE_VALUES = 1 << 31  # values in one sample (a 16k x 16k x 3 image is 0.8e9)
MAX_INDEXED_RECORD = 64 << 20  # one record of indexed shards: what `vaepipe index` reads at most (data/index.py)


def is_plain_name(name) -> bool:
    """A shard name that is one file in the data root, and the same text to a shell."""
    return isinstance(name, str) and SHARD_NAME.fullmatch(name) is not None and ".." not in name


def check_shard_name(name, where: str) -> str:
    if not is_plain_name(name):
        raise ManifestError(f"{where}: shard name {name!r} is not a plain file name (letters, digits and _ . + -, "
                            "no '/', '..', leading '.' or '-'); refusing to read it")
    return name


def _int(value, where: str, low: int = 0, high: int = MAX_SAMPLES) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ManifestError(f"{where}: {value!r} is not an integer in [{low}, {high}]")
    return value


def _kind(value, kind, where: str, what: str):
    if not isinstance(value, kind):
        raise ManifestError(f"{where}: {what}, got {type(value).__name__} {str(value)[:80]!r}")
    return value


SPLIT_KEYS = {"num_samples", "shape", "dtype", "shards", "samples_per_record", "root", "label", "max_record_bytes"}


def check_split(entry, where: str, names: set) -> None:
    _kind(entry, dict, where, "expected a mapping with num_samples, shape, dtype, shards")
    unknown = sorted(str(k) for k in entry if k not in SPLIT_KEYS)
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown[:3]} (known: {', '.join(sorted(SPLIT_KEYS))})")
    for key in ("num_samples", "shape", "dtype", "shards"):
        if key not in entry:
            raise ManifestError(f"{where}: no '{key}'")
    shape = _kind(entry["shape"], list, f"{where}.shape", "expected a list of sizes")
    for i, size in enumerate(shape):
        _int(size, f"{where}.shape[{i}]", 1, MAX_SAMPLE_VALUES)
    if math.prod(shape) > MAX_SAMPLE_VALUES:
        raise ManifestError(f"{where}.shape: {shape} has more than {MAX_SAMPLE_VALUES} values per sample")
    if entry["dtype"] not in DTYPES:
        raise ManifestError(f"{where}.dtype: {entry['dtype']!r} is not one vaepipe reads ({', '.join(DTYPES)})")
    sample_bytes = math.prod(shape) * (1 if entry["dtype"] == "uint8" else 4)
    if "samples_per_record" in entry:
        _int(entry["samples_per_record"], f"{where}.samples_per_record", 1, 1 << 20)
    indexed = "root" in entry  # standard shards described where they lie (data/index.py): encoded images
    if indexed:
        _kind(entry["root"], str, f"{where}.root", "expected the shards' folder or URL")
        _int(entry.get("max_record_bytes", 0), f"{where}.max_record_bytes", 0, MAX_INDEXED_RECORD)
        if entry.get("label") not in (None, "cls"):
            raise ManifestError(f"{where}.label: {str(entry['label'])[:40]!r}; vaepipe reads labels from .cls")
    total = 0
    for i, shard in enumerate(_kind(entry["shards"], list, f"{where}.shards", "expected a list of shards")):
        at = f"{where}.shards[{i}]"
        _kind(shard, dict, at, "expected a mapping with name, num_samples, bytes")
        for key in ("name", "num_samples", "bytes"):
            if key not in shard:
                raise ManifestError(f"{at}: no '{key}'")
        name = check_shard_name(shard["name"], f"{at}.name")
        if name in names:
            raise ManifestError(f"{at}.name: {name!r} is listed twice")
        names.add(name)
        n, size = _int(shard["num_samples"], f"{at}.num_samples"), _int(shard["bytes"], f"{at}.bytes", 0, 1 << 50)
        if not indexed and n * sample_bytes > size:  # the shard holds its samples' raw bytes (and tar headers)
            raise ManifestError(f"{at}: {n} samples of {sample_bytes} bytes cannot fit in its {size} bytes")
        if indexed:  # one sample per record: the records it lists are its samples and its skipped ones
            skip = _kind(shard.get("skip", []), list, f"{at}.skip", "expected record numbers")
            records = _kind(shard.get("records", []), list, f"{at}.records", "expected a list of checksums")
            if len(records) != n + len(skip) or not all(isinstance(j, int) and 0 <= j < len(records) for j in skip):
                raise ManifestError(f"{at}: {len(records)} records do not make {n} samples and {len(skip)} skipped")
        if "sha256" in shard and not (isinstance(shard["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", shard["sha256"])):
            raise ManifestError(f"{at}.sha256: {str(shard['sha256'])[:80]!r} is not a sha256 hex digest")
        if "records" in shard:
            records = _kind(shard["records"], list, f"{at}.records", "expected a list of checksums")
            if not all(isinstance(r, str) and len(r) <= 64 for r in records) or \
                    len(records) > max(n, 1) + len(shard.get("skip", [])):
                raise ManifestError(f"{at}.records: expected at most {max(n, 1)} checksum strings")
        total += n
    if _int(entry["num_samples"], f"{where}.num_samples") != total:
        raise ManifestError(f"{where}.num_samples: {entry['num_samples']} but its shards hold {total}")


def check_manifest(manifest, where: str) -> dict:
    """`manifest` (parsed JSON) if it has the schema above; ManifestError naming `where` otherwise."""
    _kind(manifest, dict, where, "a manifest is a JSON object with 'splits', 'scale', ...")
    splits = _kind(manifest.get("splits"), dict, f"{where}: splits", "expected a mapping of train/val/test")
    for split in SPLITS:
        if split not in splits:
            raise ManifestError(f"{where} has no split '{split}'")
    names: set = set()
    for split, entry in splits.items():
        if split not in SPLITS:
            raise ManifestError(f"{where}: unknown split {str(split)[:40]!r} (known: {', '.join(SPLITS)})")
        check_split(entry, f"{where}: splits.{split}", names)
    scale = manifest.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ManifestError(f"{where}: scale {scale!r} is not a positive number (1/255 for uint8 pixels, 1 for floats)")
    for key, kind in (("name", str), ("source", str), ("binary", bool), ("factor_names", list), ("factor_sizes", list),
                      ("classes", list), ("images", dict)):
        if manifest.get(key) is not None:
            _kind(manifest[key], kind, f"{where}: {key}", f"expected {kind.__name__}")
    for i, size in enumerate(manifest.get("factor_sizes") or []):
        _int(size, f"{where}: factor_sizes[{i}]", 1, 1 << 20)
    for key in ("factor_names", "classes"):
        if not all(isinstance(n, str) for n in manifest.get(key) or []):
            raise ManifestError(f"{where}: {key} must be strings")
    return manifest
