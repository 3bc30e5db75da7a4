"""Image collections as a streamed source (`vaepipe prepare images`): a folder (recursive), a glob,
or a `.zip` / uncompressed `.tar` of image files, read in place and never held whole in memory.

Order and splits are functions of the file names and the seed alone: members are sorted by name;
`train/`, `val/` (or `valid/`) and `test/` folders give the splits when every image is under one,
else `--val N --test N` are held out by the seed. Labels come from the first folder below (class
index = position in the sorted class names, kept in the manifest), or there are none. Images are
decoded by Pillow in `workers` processes a window at a time, results in input order: the shards are
the same bytes whatever the number of workers. A file that cannot be decoded is skipped, counted and
named (or stops the run with on_error=stop); Pillow's decompression-bomb guard applies.
"""

from __future__ import annotations

import glob as globlib
import io
import multiprocessing
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "test": "test"}


@dataclass(frozen=True)
class ImageOptions:
    """How images become samples: crop box (x0, y0, x1, y1) first, then the shorter side resized to
    `size` and centre-cropped to size x size; `channels` 1 (grey) or 3 (RGB)."""
    size: int | None = None
    crop: tuple[int, int, int, int] | None = None
    channels: int = 3
    val: int | None = None
    test: int | None = None
    workers: int = 0
    on_error: str = "skip"


@dataclass
class ImageFailures:
    count: int = 0
    first: list = field(default_factory=list)  # "name: why" of the first few

    def add(self, name: str, why: str) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(f"{name}: {why}")


class Collection:
    """The image members of a folder, glob, zip or uncompressed tar: sorted names, bytes by name."""

    def __init__(self, source: str | Path):
        self.source = str(source)
        path = Path(self.source)
        self._zip = self._tar = None
        if path.is_dir():
            self.kind, root = "folder", path
            self.names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if _is_image(p.name) and p.is_file())
            self._root = root
        elif path.is_file() and zipfile.is_zipfile(path):
            self.kind = "zip"
            with zipfile.ZipFile(path) as z:
                self.names = sorted(i.filename for i in z.infolist() if not i.is_dir() and _is_image(i.filename))
        elif path.is_file() and tarfile.is_tarfile(path):
            self.kind = "tar"
            self._offsets = {}
            with tarfile.open(path, "r:") as t:  # "r:": random access needs an uncompressed tar
                for info in t:
                    t.members = []
                    if info.isreg() and _is_image(info.name):
                        self._offsets[info.name] = (info.offset_data, info.size)
            self.names = sorted(self._offsets)
        elif any(c in self.source for c in "*?["):
            self.kind = "glob"
            self._root = Path(".")
            self.names = sorted(p for p in globlib.glob(self.source, recursive=True) if _is_image(p) and Path(p).is_file())
        elif path.exists():
            raise ValueError(f"{path}: not a folder, a .zip or an uncompressed .tar of images (a compressed tar cannot "
                             "be read in place: extract it, or repack it as .tar or .zip)")
        else:
            raise FileNotFoundError(f"image source {path} not found (a folder, a glob, a .zip or a .tar)")
        if not self.names:
            raise ValueError(f"{self.source}: no image files ({', '.join(IMAGE_SUFFIXES)})")

    def read(self, name: str) -> bytes:
        if self.kind == "zip":
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.source)
            return self._zip.read(name)
        if self.kind == "tar":
            offset, size = self._offsets[name]
            if self._tar is None:
                self._tar = open(self.source, "rb")
            self._tar.seek(offset)
            return self._tar.read(size)
        return (self._root / name).read_bytes() if self.kind == "folder" else Path(name).read_bytes()

    def close(self) -> None:
        for f in (self._zip, self._tar):
            if f is not None:
                f.close()


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_SUFFIXES)


def plan_splits(names: list[str], opts: ImageOptions, seed: int) -> tuple[dict, list[str] | None]:
    """({split: [(name, label or -1)]}, class names or None) from the folder layout (module doc).
    Held out by the seed: `opts.val` / `opts.test` images (default a tenth of the set each; with
    train/ and test/ folders but no val/, a tenth of train/, at most 5000, as for CIFAR-10)."""
    parts = [n.replace("\\", "/").split("/") for n in names]
    common = 0  # folders every name shares (`cifar10/` in cifar10/train/cat/1.jpg)
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    parts = [p[common:] for p in parts]
    by_folder = all(len(p) > 1 and p[0].lower() in SPLIT_FOLDERS for p in parts)
    rest = [p[1:] for p in parts] if by_folder else parts
    labelled = all(len(r) > 1 for r in rest)
    classes = sorted({r[0] for r in rest}) if labelled else None
    index = {c: i for i, c in enumerate(classes or [])}
    items = [(name, index[r[0]] if labelled else -1) for name, r in zip(names, rest)]
    if by_folder:
        splits = {s: [] for s in ("train", "val", "test")}
        for item, p in zip(items, parts):
            splits[SPLIT_FOLDERS[p[0].lower()]].append(item)
        if opts.test is not None and opts.test != len(splits["test"]):
            raise ValueError(f"--test {opts.test}: the source has its own test/ folder ({len(splits['test'])} images)")
        if splits["val"]:
            if opts.val is not None and opts.val != len(splits["val"]):
                raise ValueError(f"--val {opts.val}: the source has its own val/ folder ({len(splits['val'])} images)")
            return splits, classes
        val = min(len(splits["train"]) // 10, 5000) if opts.val is None else opts.val
        held = _hold_out(splits["train"], {"val": val}, seed)
        return {**held, "test": splits["test"]}, classes
    val = len(items) // 10 if opts.val is None else opts.val
    test = len(items) // 10 if opts.test is None else opts.test
    return _hold_out(items, {"val": val, "test": test}, seed), classes


def _hold_out(items: list, sizes: dict, seed: int) -> dict:
    """`items` split into train and the held-out splits of `sizes`, drawn by the seed; each in name order."""
    if sum(sizes.values()) >= len(items):
        raise ValueError(f"holding out {' and '.join(f'{n} for {s}' for s, n in sizes.items())} leaves no training "
                         f"images of the {len(items)} found")
    perm, start, out = np.random.default_rng(seed).permutation(len(items)), 0, {}
    taken = set()
    for split, n in sizes.items():
        chosen = sorted(perm[start:start + n].tolist())
        out[split], start = [items[i] for i in chosen], start + n
        taken.update(chosen)
    out["train"] = [item for i, item in enumerate(items) if i not in taken]
    return out


def decode(task: tuple[bytes, ImageOptions]) -> tuple[np.ndarray | None, str | None]:
    """One image's bytes -> uint8 [C, H, W] (after crop and resize), or (None, why it failed)."""
    data, opts = task
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB" if opts.channels == 3 else "L")
            if opts.crop is not None:
                x0, y0, x1, y1 = opts.crop
                if x1 > img.width or y1 > img.height:
                    return None, f"crop box {opts.crop} outside the {img.width}x{img.height} image"
                img = img.crop(opts.crop)
            if opts.size is not None:
                s, (w, h) = opts.size, img.size
                scale = s / min(w, h)
                w2, h2 = max(s, round(w * scale)), max(s, round(h * scale))
                img = img.resize((w2, h2), Image.Resampling.BICUBIC, reducing_gap=None)
                left, top = (w2 - s) // 2, (h2 - s) // 2
                img = img.crop((left, top, left + s, top + s))
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as err:  # noqa: BLE001 - any undecodable file (truncated, not an image, a bomb) is counted
        return None, f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), None


class Decoder:
    """Decodes windows of images in input order, in `workers` processes (0: here)."""

    def __init__(self, workers: int):
        self.pool = multiprocessing.get_context("forkserver").Pool(workers) if workers > 0 else None

    def map(self, tasks: list) -> list:
        return self.pool.map(decode, tasks, chunksize=max(1, len(tasks) // (4 * self.pool._processes))) \
            if self.pool is not None else [decode(t) for t in tasks]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


WINDOW = 256  # images decoded per window and worker: bounded memory, pool kept busy


def image_chunks(collection: Collection, items: list[tuple[str, int]], opts: ImageOptions, decoder: Decoder,
                 failures: ImageFailures, progress=None, labelled: bool = True):
    """The split's samples as chunks {"x": [n, C, S, S] uint8, "y": [n]}, in `items` order."""
    window = WINDOW * max(1, opts.workers)
    shape = None
    for start in range(0, len(items), window):
        part = items[start:start + window]
        results = decoder.map([(collection.read(name), opts) for name, _ in part])
        xs, ys = [], []
        for (name, label), (arr, why) in zip(part, results):
            if arr is not None and shape is not None and arr.shape != shape:
                why, arr = f"{arr.shape[2]}x{arr.shape[1]}, not {shape[2]}x{shape[1]} as the first image: pass --size", None
                if opts.size is None:
                    raise ValueError(f"{collection.source}: {name} is {why}")
            if arr is None:
                if opts.on_error == "stop":
                    raise ValueError(f"{collection.source}: cannot read image {name}: {why} (--on-error skip skips it)")
                failures.add(name, why)
                continue
            shape = shape or arr.shape
            xs.append(arr)
            ys.append(label)
        if progress is not None:
            progress.update(len(part))
        if xs:
            chunk = {"x": np.stack(xs)}
            if labelled:
                chunk["y"] = np.asarray(ys, dtype=np.int64)
            yield chunk



class ImageData:
    """An image collection as prepare() writes it: split chunks streamed a window at a time, with
    what the manifest says of them (classes, skipped files, the options used)."""

    scale, binary, factor_names, factor_sizes = 1.0 / 255, False, None, None

    def __init__(self, source: str, opts: ImageOptions, seed: int = 0, log=print):
        self.opts, self.log = opts, log
        self.collection = Collection(source)
        self.items, self.classes = plan_splits(self.collection.names, opts, seed)
        self.failures = ImageFailures()
        total = sum(len(v) for v in self.items.values())
        log(f"  {total} images in {self.collection.kind} {source}: " + ", ".join(
            f"{s} {len(v)}" for s, v in self.items.items()) + (f"; {len(self.classes)} classes" if self.classes else
                                                              "; no class folders"))
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", desc="decoding", file=sys.stderr, mininterval=1.0, smoothing=0.1,
                        disable=not sys.stderr.isatty())
        self.decoder = Decoder(opts.workers)

    def chunks(self, split: str):
        yield from image_chunks(self.collection, self.items[split], self.opts, self.decoder, self.failures, self.bar,
                                labelled=self.classes is not None)

    def manifest_fields(self) -> dict:
        options = {"size": self.opts.size, "crop": list(self.opts.crop) if self.opts.crop else None,
                   "channels": self.opts.channels}
        return {"classes": self.classes,
                "images": {"skipped": self.failures.count, "first_skipped": self.failures.first, "options": options}}

    def close(self) -> None:
        self.bar.close()
        self.decoder.close()
        self.collection.close()
        if self.failures.count:
            self.log(f"  {self.failures.count} unreadable image(s) skipped: " + "; ".join(self.failures.first)
                     + (" ..." if self.failures.count > len(self.failures.first) else ""))
