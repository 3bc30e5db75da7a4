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
import os
import stat
import sys
import warnings
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


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
            self.names = sorted(_folder_images(root))
            self._root = root
        elif path.is_file() and zipfile.is_zipfile(path):
            self.kind = "zip"
            with zipfile.ZipFile(path) as z:
                names = [i.filename for i in z.infolist() if not i.is_dir() and _is_image(i.filename)]
            if len(set(names)) != len(names):  # zipfile would read the last of each name, a tar the first
                dup = next(n for n in names if names.count(n) > 1)
                raise ValueError(f"{path}: the member {dup!r} is in the zip more than once")
            self.names = sorted(names)
        elif path.is_file() and tarfile.is_tarfile(path):
            self.kind = "tar"
            self._offsets = {}
            try:
                with tarfile.open(path, "r:") as t:  # "r:": random access needs an uncompressed tar
                    for info in t:
                        t.members = []
                        if info.isreg() and _is_image(info.name):
                            self._offsets[info.name] = (info.offset_data, info.size)
            except tarfile.ReadError as err:
                raise ValueError(f"{path}: cannot read it as an uncompressed tar ({err}); a compressed tar cannot be "
                                 "read in place: extract it, or repack it as .tar or .zip") from None
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
        """The file's bytes; ValueError for one above MAX_IMAGE_BYTES (never read whole)."""
        if self.kind == "zip":
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.source)
            info = self._zip.getinfo(name)
            _check_size(name, info.file_size)
            with self._zip.open(info) as f:
                return f.read(MAX_IMAGE_BYTES + 1)
        if self.kind == "tar":
            offset, size = self._offsets[name]
            _check_size(name, size)
            if self._tar is None:
                self._tar = open(self.source, "rb")
            self._tar.seek(offset)
            return self._tar.read(size)
        path = self._root / name if self.kind == "folder" else Path(name)
        with open(path, "rb") as f:
            _check_size(name, os.fstat(f.fileno()).st_size)
            return f.read(MAX_IMAGE_BYTES + 1)

    def close(self) -> None:
        for f in (self._zip, self._tar):
            if f is not None:
                f.close()


MAX_IMAGE_BYTES = 256 << 20  # one image file; a larger one is skipped (counted, named), never read whole


def _check_size(name: str, size: int) -> None:
    if size > MAX_IMAGE_BYTES:
        raise ValueError(f"{size} bytes, more than the {MAX_IMAGE_BYTES} an image file may have")


def _folder_images(root: Path):
    """Regular image files under `root`, as relative '/' names: no links (a link to /dev/zero or out of
    the folder is not an image of it), no hidden folders (.ipynb_checkpoints), no devices or pipes."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            full = os.path.join(folder, f)
            if _is_image(f) and stat.S_ISREG(os.lstat(full).st_mode):
                yield os.path.relpath(full, root).replace(os.sep, "/")


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_SUFFIXES)


SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


def _common_depth(names: list[str]) -> int:
    """Folders every name shares (`cifar10/` in cifar10/train/cat/1.jpg)."""
    first = names[0].split("/")[:-1]
    depth = len(first)
    for name in names:
        parts = name.split("/")
        d = 0
        while d < depth and d < len(parts) - 1 and parts[d] == first[d]:
            d += 1
        depth = d
    return depth


def plan_splits(names: list[str], opts: ImageOptions, seed: int):
    """(splits {split: indices into `names`, in name order}, labels [N] or None, class names or None)
    from the folder layout (module doc). Held out by the seed: `opts.val` / `opts.test` images
    (default a tenth of the set each; with train/ and test/ folders but no val/, a tenth of train/, at
    most 5000, as for CIFAR-10). Arrays, not per-image objects: memory stays small with the set."""
    common = _common_depth(names)
    tops = {name.split("/")[common] for name in names if len(name.split("/")) > common + 1}
    by_folder = bool(tops) and all(len(p := name.split("/")[common:]) > 1 and p[0].lower() in SPLIT_FOLDERS
                                   for name in names)
    if not by_folder and any(t.lower() in SPLIT_FOLDERS for t in tops):  # train/ beside cats/, or loose files
        raise ValueError(f"some images are under split folders ({', '.join(sorted(t for t in tops if t.lower() in SPLIT_FOLDERS))}) "
                         f"and some are not (e.g. {next(n for n in names if n.split('/')[common].lower() not in SPLIT_FOLDERS)}): "
                         "put every image under train/, val/ (valid/, validation/) or test/, or none")
    split_of, provisional, seen, labelled = np.zeros(len(names), np.int8), np.zeros(len(names), np.int64), {}, True
    for i, name in enumerate(names):
        parts = name.split("/")[common:]
        if by_folder:
            split_of[i], parts = SPLIT_INDEX[SPLIT_FOLDERS[parts[0].lower()]], parts[1:]
        if len(parts) > 1:
            provisional[i] = seen.setdefault(parts[0], len(seen))
        else:
            labelled, loose = False, name
    if seen and not labelled:  # class folders for some images only: refused, not silently unlabelled
        raise ValueError(f"some images are in class folders ({', '.join(sorted(seen)[:3])}, ...) and some are not "
                         f"(e.g. {loose}): put every image of a split in a class folder, or none")
    classes = sorted(seen) if labelled else None
    labels = np.argsort(np.argsort(list(seen)))[provisional] if labelled else None  # ids in class-name order
    if by_folder:
        splits = {split: np.flatnonzero(split_of == k) for split, k in SPLIT_INDEX.items()}
        if not len(splits["train"]):
            raise ValueError("split folders without a train/ folder: no training images")
        held = {}  # what the source has no folder for is held out of train/ by the seed
        for split, n in (("val", opts.val), ("test", opts.test)):
            if len(splits[split]) and n is not None and n != len(splits[split]):
                raise ValueError(f"--{split} {n}: the source has its own {split} folder ({len(splits[split])} images)")
            if not len(splits[split]):
                held[split] = (min(len(splits["train"]) // 10, 5000) if split == "val" else 0) if n is None else n
        return {**splits, **_hold_out(splits["train"], held, seed)}, labels, classes
    val = len(names) // 10 if opts.val is None else opts.val
    test = len(names) // 10 if opts.test is None else opts.test
    return _hold_out(np.arange(len(names)), {"val": val, "test": test}, seed), labels, classes


def _hold_out(indices: np.ndarray, sizes: dict, seed: int) -> dict:
    """`indices` split into train and the held-out splits of `sizes`, drawn by the seed; each sorted."""
    if sum(sizes.values()) >= len(indices):
        raise ValueError(f"holding out {' and '.join(f'{n} for {s}' for s, n in sizes.items())} leaves no training "
                         f"images of the {len(indices)} found")
    perm, start, out = np.random.default_rng(seed).permutation(len(indices)), 0, {}
    for split, n in sizes.items():
        out[split], start = indices[np.sort(perm[start:start + n])], start + n
    out["train"] = np.delete(indices, perm[:start])
    return out


def decode(task: tuple[bytes, ImageOptions]) -> tuple[np.ndarray | None, str | None]:
    """One image's bytes -> uint8 [C, H, W] (after crop and resize), or (None, why it failed)."""
    data, opts = task
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # above MAX_IMAGE_PIXELS: refused
            with _open_image(data) as img:
                return transform(img, opts), None
    except Exception as err:  # noqa: BLE001 - any undecodable file (truncated, not an image, a bomb) is counted
        return None, f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"


def transform(img, opts: ImageOptions) -> np.ndarray:
    """A PIL image -> uint8 [C, H, W]: 8-bit channels (16-bit scaled, not clipped), crop, resize."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey: 0..65535 -> 0..255
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    img = img.convert("RGB" if opts.channels == 3 else "L")
    if opts.crop is not None:
        x0, y0, x1, y1 = opts.crop
        if x1 > img.width or y1 > img.height:
            raise ValueError(f"crop box {opts.crop} outside the {img.width}x{img.height} image")
        img = img.crop(opts.crop)
    if opts.size is not None:
        s, (w, h) = opts.size, img.size
        scale = s / min(w, h)
        w2, h2 = max(s, round(w * scale)), max(s, round(h * scale))
        img = img.resize((w2, h2), Image.Resampling.BICUBIC, reducing_gap=None)
        left, top = (w2 - s) // 2, (h2 - s) // 2
        img = img.crop((left, top, left + s, top + s))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _open_image(data: bytes):
    """A PIL image of the file's bytes. JPEGs go through simplejpeg when it is installed: the same
    libjpeg-turbo pixels (checked equal on CIFAR-10 and 128-256 px images) without Pillow's per-file
    overhead, ~10x faster on 32 px images, ~1.4x at 128-256 px (docs/data.md)."""
    if data[:2] == b"\xff\xd8" and _simplejpeg is not None:
        try:
            height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
            if height * width > (Image.MAX_IMAGE_PIXELS or float("inf")):  # Pillow's bomb guard, before decoding
                raise Image.DecompressionBombError(f"{width}x{height} pixels: more than Pillow's limit of "
                                                   f"{Image.MAX_IMAGE_PIXELS} (a decompression bomb?)")
            if colorspace in ("RGB", "Gray", "YCbCr"):  # CMYK/YCCK: Pillow's conversion, as without simplejpeg
                return Image.fromarray(_simplejpeg.decode_jpeg(data, colorspace="RGB"))
        except ValueError:  # what it cannot read (a damaged JPEG): Pillow decides
            pass
    return Image.open(io.BytesIO(data))


try:
    import simplejpeg as _simplejpeg
except ImportError:  # optional: Pillow decodes everything
    _simplejpeg = None


class Decoder:
    """Decodes windows of images in input order, in `workers` processes (0: here)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = multiprocessing.get_context("forkserver").Pool(workers) if workers > 0 else None

    def map(self, tasks: list) -> list:
        if self.pool is None:
            return [decode(t) for t in tasks]
        return self.pool.map(decode, tasks, chunksize=max(1, len(tasks) // (4 * self.workers)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


WINDOW = 256  # images decoded per window and worker: bounded memory, pool kept busy


def image_chunks(collection: Collection, indices: np.ndarray, labels: np.ndarray | None, opts: ImageOptions,
                 decoder: Decoder, failures: ImageFailures, progress=None, first: dict | None = None):
    """The split's samples as chunks {"x": [n, C, S, S] uint8, "y": [n]}, in `indices` order. `first`
    carries the first image's shape across splits: every split has one sample shape."""
    window = WINDOW * max(1, opts.workers)
    first = {} if first is None else first
    for start in range(0, len(indices), window):
        part = indices[start:start + window].tolist()
        tasks, unread = [], {}
        for i in part:
            try:
                tasks.append((collection.read(collection.names[i]), opts))
            except ValueError as err:  # too large to read: counted and named as a bad image
                tasks.append((b"", opts))
                unread[i] = str(err)
        results = decoder.map(tasks)
        xs, ys = [], []
        for i, (arr, why) in zip(part, results):
            name = collection.names[i]
            arr, why = (None, unread[i]) if i in unread else (arr, why)
            shape = first.get("shape")
            if arr is not None and shape is not None and arr.shape != shape:
                why, arr = f"{arr.shape[2]}x{arr.shape[1]}, not {shape[2]}x{shape[1]} as the first image: pass --size", None
                if opts.size is None:
                    raise ValueError(f"{collection.source}: {name} is {why}")
            if arr is None:
                if opts.on_error == "stop":
                    raise ValueError(f"{collection.source}: cannot read image {name}: {why} (--on-error skip skips it)")
                failures.add(name, why)
                continue
            first.setdefault("shape", arr.shape)
            xs.append(arr)
            if labels is not None:
                ys.append(labels[i])
        if progress is not None:
            progress.update(len(part))
        if xs:
            chunk = {"x": np.stack(xs)}
            if labels is not None:
                chunk["y"] = np.asarray(ys, dtype=np.int64)
            yield chunk


class ImageData:
    """An image collection as prepare() writes it: split chunks streamed a window at a time, with
    what the manifest says of them (classes, skipped files, the options used)."""

    scale, binary, factor_names, factor_sizes = 1.0 / 255, False, None, None

    def __init__(self, source: str, opts: ImageOptions, seed: int = 0, log=print):
        self.opts, self.log = opts, log
        self.collection = Collection(source)
        self.items, self.labels, self.classes = plan_splits(self.collection.names, opts, seed)
        self.failures, self.first = ImageFailures(), {}
        total = sum(len(v) for v in self.items.values())
        log(f"  {total} images in {self.collection.kind} {source}: " + ", ".join(
            f"{s} {len(self.items[s])}" for s in ("train", "val", "test"))
            + (f"; {len(self.classes)} classes" if self.classes else "; no class folders"))
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", desc="decoding", file=sys.stderr, mininterval=1.0, smoothing=0.1,
                        disable=not sys.stderr.isatty())
        self.decoder = Decoder(opts.workers)

    def chunks(self, split: str):
        yield from image_chunks(self.collection, self.items[split], self.labels, self.opts, self.decoder,
                                self.failures, self.bar, self.first)

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
