"""
Data sources: turn a named source into in-memory numpy arrays per split (plain numpy, no torch).
Generated, no files, fully determined by `seed`: sprites (dSprites-like 64x64 binary images with
5 known ground-truth factors) and gmm (a 2-D Gaussian mixture whose exact density is known).
File sources: mnist (idx files), binarized-mnist (npz), frey (npy), and a generic npz.
"""

import gzip
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from pipeline.data.arrays import check_declared, load_npy, npz_declared, npz_member, one_line

SPLITS = ("train", "val", "test")
# "images" is a streamed source (data/image_source.py), not loaded whole by load_source
SOURCE_NAMES = ("sprites", "gmm", "mnist", "binarized-mnist", "frey", "npz", "images")


@dataclass
class SplitArrays:
    x: np.ndarray                       # [N, *sample_shape]; uint8 images or float32 data
    y: np.ndarray | None = None         # [N] int64 label, or None
    factors: np.ndarray | None = None   # [N, F] int64 ground-truth factor indices (sprites)


@dataclass
class SourceData:
    splits: dict[str, SplitArrays]      # keys exactly "train", "val", "test"
    scale: float                        # model input = x.astype(float32) * scale
    binary: bool                        # True when x is already in {0,1}
    factor_names: list[str] | None = None
    factor_sizes: list[int] | None = None

    def chunks(self, split: str):
        """The split as prepare() writes it: here one chunk, the whole array (data/image_source.py streams)."""
        a = self.splits[split]
        yield {"x": a.x, "y": a.y, "factors": a.factors}

    def manifest_fields(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def _split_rngs(seed):
    # one independent stream per split, so val/test never replay train's draws
    # and changing the train size leaves val/test untouched
    return dict(zip(SPLITS, (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))))


def _sizes(defaults, sizes):
    sizes = dict(sizes or {})
    bad = set(sizes) - set(SPLITS)
    if bad or any(int(n) < 0 for n in sizes.values()):
        raise ValueError(f"sizes must map a subset of {SPLITS} to counts >= 0, got {sizes}")
    return {k: int(sizes.get(k, defaults[k])) for k in SPLITS}

# -----------------------------------------------------------------------------
# sprites: one white shape (square, ellipse, heart) on black, 64x64

SPRITES_FACTOR_NAMES = ["shape", "scale", "orientation", "pos_x", "pos_y"]
SPRITES_FACTOR_SIZES = [3, 6, 40, 32, 32]
SPRITES_SIZE = 64
SPRITES_SCALES = np.linspace(0.5, 1.0, 6)                    # x 10 px = half-width
SPRITES_ANGLES = np.linspace(0, 2 * np.pi, 40, endpoint=False)
# every shape fits the unit box |u|,|v| <= 1, so its radius is at most sqrt(2)*10 px
# (a square at 45 deg); centres in [16, 48] keep even that inside the 64 px frame
SPRITES_POSITIONS = np.linspace(16.0, 48.0, 32)
_HALF_WIDTH = 10.0                                           # px at scale 1.0 -> 20 px across
# the classic heart (x^2+y^2-1)^3 <= x^2 y^3 spans x in [-1.139, 1.139], y in [-1, 1.2365];
# recentre and shrink it into the unit box, lobes up (+v) so it is upright at angle 0
_HEART_HALF, _HEART_YC = 1.139, 0.118


def _inside(shape, u, v):
    if shape == 0:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 1.0
    if shape == 1:  # ellipse, twice as wide as tall
        return u * u + 4.0 * v * v <= 1.0
    x2, y = (u * _HEART_HALF) ** 2, v * _HEART_HALF + _HEART_YC
    t = x2 + y * y - 1.0
    return t * t * t <= x2 * y * y * y


def render_sprites(factors, batch=2048):
    """[N,5] int factor indices (shape, scale, orientation, pos_x, pos_y) -> [N,64,64] uint8 {0,1}.
    pos_x moves the shape right (columns), pos_y moves it down (rows); angles turn counter-clockwise."""
    factors = np.asarray(factors, dtype=np.int64).reshape(-1, 5)
    grid = np.arange(SPRITES_SIZE, dtype=np.float32) + 0.5  # pixel centres
    out = np.zeros((len(factors), SPRITES_SIZE, SPRITES_SIZE), dtype=np.uint8)
    for start in range(0, len(factors), batch):
        f = factors[start:start + batch]
        r = (SPRITES_SCALES[f[:, 1]] * _HALF_WIDTH).astype(np.float32)[:, None, None]
        c = np.cos(SPRITES_ANGLES[f[:, 2]]).astype(np.float32)[:, None, None]
        s = np.sin(SPRITES_ANGLES[f[:, 2]]).astype(np.float32)[:, None, None]
        cx = SPRITES_POSITIONS[f[:, 3]].astype(np.float32)[:, None, None]
        cy = SPRITES_POSITIONS[f[:, 4]].astype(np.float32)[:, None, None]
        # pixel centre -> shape frame: translate, flip rows so +v is up, inverse-rotate, unscale
        dx = (grid[None, None, :] - cx) / r   # [B,1,64]
        dy = (cy - grid[None, :, None]) / r   # [B,64,1]
        for shape in range(3):  # evaluate each implicit test only on its own samples
            sel = np.flatnonzero(f[:, 0] == shape)
            if len(sel):
                u = c[sel] * dx[sel] + s[sel] * dy[sel]
                v = c[sel] * dy[sel] - s[sel] * dx[sel]
                out[start + sel] = _inside(shape, u, v)
    return out


def _load_sprites(seed, sizes):
    n = _sizes({"train": 20000, "val": 2000, "test": 2000}, sizes)
    splits = {}
    for k, rng in _split_rngs(seed).items():  # each factor index uniform and independent
        f = rng.integers(0, SPRITES_FACTOR_SIZES, size=(n[k], 5), dtype=np.int64)
        splits[k] = SplitArrays(x=render_sprites(f), y=f[:, 0].copy(), factors=f)
    return SourceData(splits, scale=1.0, binary=True,
                      factor_names=list(SPRITES_FACTOR_NAMES), factor_sizes=list(SPRITES_FACTOR_SIZES))

# -----------------------------------------------------------------------------
# gmm: Example 11.5, a uniform mixture of 3 Gaussians (A, B, C) in R^2.
# Kept as constants so tests and evaluators can compute the exact log p(x).

GMM_NAMES = ("A", "B", "C")
GMM_WEIGHTS = np.full(3, 1.0 / 3.0)
GMM_MEANS = np.array([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]])
GMM_COVS = np.array([
    [[1.0, 0.0], [0.0, 1.0]],   # A: isotropic
    [[2.0, 0.0], [0.0, 0.5]],   # B: axis-aligned, wide in x
    [[1.0, 0.8], [0.8, 1.5]],   # C: correlated
])


def _load_gmm(seed, sizes):
    n = _sizes({"train": 10000, "val": 1000, "test": 1000}, sizes)
    chol = np.linalg.cholesky(GMM_COVS)  # [3,2,2], x = mean + L @ eps
    splits = {}
    for k, rng in _split_rngs(seed).items():
        y = rng.choice(3, size=n[k], p=GMM_WEIGHTS).astype(np.int64)
        eps = rng.standard_normal((n[k], 2))
        x = GMM_MEANS[y] + np.einsum("nij,nj->ni", chol[y], eps)
        splits[k] = SplitArrays(x=x.astype(np.float32), y=y)
    return SourceData(splits, scale=1.0, binary=False)

# -----------------------------------------------------------------------------
# file sources

def _need(path, name, what):
    if path is None:
        raise FileNotFoundError(f"source '{name}' needs source=<{what}>, got None")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"source '{name}': {what} not found: {path}")
    return path


def _cap(splits, sizes, seed):
    # a capped split is a seeded random subset: some files (binarized-mnist test) are sorted by label
    if not sizes:
        return splits
    sizes = _sizes({k: len(splits[k].x) for k in SPLITS}, sizes)
    short = [f"{k}={sizes[k]} (it has {len(splits[k].x)})" for k in SPLITS if sizes[k] > len(splits[k].x)]
    if short:  # silently fewer samples than asked would look like a smaller data set chosen on purpose
        raise ValueError(f"--sizes asks for more samples than the source has: {', '.join(short)}")
    for k, rng in _split_rngs(seed).items():
        a = splits[k]
        if sizes[k] < len(a.x):
            keep = rng.permutation(len(a.x))[:sizes[k]]
            splits[k] = SplitArrays(a.x[keep], None if a.y is None else a.y[keep])
    return splits


def _read_idx(folder, fname, magic):
    path, opener = folder / (fname + ".gz"), gzip.open
    if not path.exists():
        path, opener = folder / fname, open
    if not path.exists():
        raise FileNotFoundError(f"mnist: missing idx file {fname}(.gz) in {folder}")
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # a truncated or damaged .gz: name the file, not the folder
        raise ValueError(f"mnist: cannot read {path}: {type(err).__name__}: {err}") from None
    if len(raw) < 4 + 4 * (magic & 0xFF):
        raise ValueError(f"mnist: {path} is too short ({len(raw)} bytes) for an idx header")
    if int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"mnist: {path} has magic {int.from_bytes(raw[:4], 'big')}, expected {magic}")
    ndim = magic & 0xFF  # low byte of the magic = number of dimensions
    shape = tuple(np.frombuffer(raw[4:4 + 4 * ndim], dtype=">i4").astype(int))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != np.prod(shape):
        raise ValueError(f"mnist: {path} holds {data.size} bytes, header says shape {shape}")
    return data.reshape(shape)


def _load_mnist(folder):
    xtr = _read_idx(folder, "train-images-idx3-ubyte", 2051)
    ytr = _read_idx(folder, "train-labels-idx1-ubyte", 2049).astype(np.int64)
    xte = _read_idx(folder, "t10k-images-idx3-ubyte", 2051)
    yte = _read_idx(folder, "t10k-labels-idx1-ubyte", 2049).astype(np.int64)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError(f"mnist: image/label counts differ in {folder}: {len(xtr)}/{len(ytr)}, {len(xte)}/{len(yte)}")
    if len(xtr) <= 10000:
        raise ValueError(f"mnist: {folder} has {len(xtr)} training images; the split takes the last 10000 of "
                         "them for validation and needs more (the full file has 60000)")
    # IWAE-paper split: the last 10000 training images validate, t10k tests
    return {"train": SplitArrays(xtr[:-10000], ytr[:-10000]), "val": SplitArrays(xtr[-10000:], ytr[-10000:]),
            "test": SplitArrays(xte, yte)}


def _npz_splits(path, need_keys, name):
    # read with zipfile + numpy's .npy reader rather than np.load, which picks its reader by the
    # file's first bytes, not by what was checked here (an .npy with a zip appended is both)
    with zipfile.ZipFile(path) as zf:
        keys = {n[:-4] if n.endswith(".npy") else n for n in zf.namelist()}
        if "x" in keys and not need_keys:
            picked = {"x": "x", **({"y": "y"} if "y" in keys else {})}
        else:
            val_key = "valid" if "valid" in keys else "val"
            missing = [k for k in ("train", val_key, "test") if k not in keys]
            if missing:
                raise ValueError(f"{path}: missing key(s) {missing} (has {sorted(keys)}); "
                                 f"expected train/val(or valid)/test" + ("" if need_keys else " or x[/y]"))
            picked = {"train": "train", "val": val_key, "test": "test"}
        check_declared(path, [npz_declared(zf, key, name, path) for key in picked.values()])
        arrays = {}
        for split, key in picked.items():
            with zf.open(npz_member(zf, key)) as member:
                arrays[split] = npy_format.read_array(member, allow_pickle=False)
    if "x" in arrays:
        arrays.setdefault("y", None)
    return arrays


def _permute_split(x, y, n_val, n_test, seed):
    n = len(x)
    if n < n_val + n_test + 1:
        raise ValueError(f"need more than {n_val + n_test} samples to split, got {n}")
    p = np.random.default_rng(seed).permutation(n)
    parts = {"val": p[:n_val], "test": p[n_val:n_val + n_test], "train": p[n_val + n_test:]}
    return {k: SplitArrays(x[parts[k]], None if y is None else np.asarray(y, np.int64)[parts[k]]) for k in SPLITS}


def _as_data(splits):
    # one dtype policy for every split: images stay uint8, everything else becomes float32
    xs = [splits[k].x for k in SPLITS]
    if any(x.shape[1:] != xs[0].shape[1:] for x in xs):
        raise ValueError(f"splits disagree on sample shape: {[x.shape for x in xs]}")
    if len({"i" if x.dtype.kind in "biu" else x.dtype.kind for x in xs}) > 1:  # 0..255 beside 0..1, say
        raise ValueError("splits have different kinds of data (" + ", ".join(f"{k}: {splits[k].x.dtype}" for k in SPLITS)
                         + "): store every split as integers 0..255 or every split as floats")
    if any(x.dtype.kind == "f" and not np.isfinite(x).all() for x in xs):
        raise ValueError("the data hold NaN or infinite values: " + ", ".join(
            k for k in SPLITS if splits[k].x.dtype.kind == "f" and not np.isfinite(splits[k].x).all()))
    binary = all(np.isin(x, (0, 1)).all() for x in xs)
    if all(x.dtype.kind in "biu" for x in xs):
        if any(x.size and (x.min() < 0 or x.max() > 255) for x in xs):
            raise ValueError("integer data must lie in 0..255")
        cast, scale = np.uint8, (1.0 if binary else 1.0 / 255)
    else:
        cast, scale = np.float32, 1.0
    for k in SPLITS:
        splits[k].x = splits[k].x.astype(cast, copy=False)
    return SourceData(splits, scale=scale, binary=binary)


def load_source(name: str, source: str | Path | None = None, seed: int = 0,
                sizes: dict[str, int] | None = None) -> SourceData:
    """Load source `name` as SourceData. `source` is the file/folder for file sources;
    `sizes` sets split counts for generated sources and caps them for file sources. A file in
    another format than the source expects (a .npy for an .npz, a truncated archive, text) is one
    error naming the file, not a traceback from numpy's or gzip's reader. An .npy/.npz array's header
    is checked before the array is read: plain numbers only, at most half the available memory
    (MEMORY_FACTOR), and no more than the file holds; nothing is allocated for a file refused."""
    try:
        return _load_source(name, source, seed, sizes)
    except FileNotFoundError:
        raise
    except ValueError as err:  # ours name the file; numpy's (a text or pickle file) do not
        if source is None or str(source) in str(err):
            raise
        raise ValueError(f"source '{name}': cannot read {source}: {one_line(err)}") from None
    except MemoryError as err:  # what the header checks could not foresee (ulimit -v, other processes)
        raise ValueError(f"source '{name}': out of memory loading {source if source is not None else 'it'} "
                         f"({one_line(err)})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, TypeError, AttributeError, KeyError, IndexError) as err:
        raise ValueError(f"source '{name}': cannot read {source} as its expected format "
                         f"({type(err).__name__}: {one_line(err)}); see docs/data.md for the files each source takes"
                         ) from None


def _expect_frey(path, shape, dtype):
    # checked on the header: a wrong file is refused before its data are read
    if len(shape) != 3 or shape[1:] != (28, 20) or dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 [N,28,20], got {dtype} {shape}")


def _load_source(name: str, source, seed: int, sizes: dict[str, int] | None) -> SourceData:
    if name == "sprites":
        return _load_sprites(seed, sizes)
    if name == "gmm":
        return _load_gmm(seed, sizes)
    if name == "mnist":
        splits = _load_mnist(_need(source, name, "folder with the 4 MNIST idx files"))
        return SourceData(_cap(splits, sizes, seed), scale=1.0 / 255, binary=False)
    if name == "binarized-mnist":
        path = _need(source, name, ".npz with train/valid/test")
        arrays = _npz_splits(path, need_keys=True, name=name)
        for k, a in arrays.items():
            if a.ndim != 2 or a.shape[1] != 784 or ((a != 0) & (a != 1)).any():
                raise ValueError(f"{path}: key {k} must be [N,784] in {{0,1}}, got {a.dtype} {a.shape}")
        splits = {k: SplitArrays(a.astype(np.uint8).reshape(-1, 28, 28)) for k, a in arrays.items()}
        return SourceData(_cap(splits, sizes, seed), scale=1.0, binary=True)
    if name == "frey":
        path = _need(source, name, ".npy of shape [1965,28,20]")
        x = load_npy(path, name, expect=_expect_frey)
        splits = _permute_split(x, None, 100, 100, seed)
        return SourceData(_cap(splits, sizes, seed), scale=1.0 / 255, binary=False)
    if name == "npz":
        path = _need(source, name, ".npz file")
        arrays = _npz_splits(path, need_keys=False, name=name)
        if "x" in arrays:
            x, y = arrays["x"], arrays["y"]
            if y is not None and y.shape != (len(x),):
                raise ValueError(f"{path}: key y must have shape ({len(x)},), got {y.shape}")
            n10 = max(1, len(x) // 10)  # 80/10/10
            splits = _permute_split(x, y, n10, n10, seed)
        else:
            splits = {k: SplitArrays(a) for k, a in arrays.items()}
        return _as_data(_cap(splits, sizes, seed))
    raise ValueError(f"unknown data source {name!r}; valid names: {', '.join(SOURCE_NAMES)}")
