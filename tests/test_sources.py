"""Tests for pipeline.data.sources: generated sources (sprites, gmm) and file sources."""

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.sources import (GMM_COVS, GMM_MEANS, SOURCE_NAMES, SPRITES_FACTOR_SIZES,
                                   SPRITES_POSITIONS, load_source, render_sprites)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="reference data ../shared/data absent")

SMALL = {"train": 600, "val": 200, "test": 200}


@pytest.fixture(scope="module")
def sprites():
    return load_source("sprites", seed=0)  # default sizes: also guards generation cost


def one(shape=0, scale=5, orient=0, px=15, py=15):
    return render_sprites(np.array([[shape, scale, orient, px, py]]))[0]

# -----------------------------------------------------------------------------
# sprites

def test_sprites_shapes_dtypes_ranges(sprites):
    assert sprites.binary and sprites.scale == 1.0
    assert sprites.factor_names == ["shape", "scale", "orientation", "pos_x", "pos_y"]
    assert sprites.factor_sizes == [3, 6, 40, 32, 32]
    for k, n in {"train": 20000, "val": 2000, "test": 2000}.items():
        s = sprites.splits[k]
        assert s.x.shape == (n, 64, 64) and s.x.dtype == np.uint8
        assert s.factors.shape == (n, 5) and s.factors.dtype == np.int64
        assert s.y.dtype == np.int64 and np.array_equal(s.y, s.factors[:, 0])
        assert set(np.unique(s.x)) <= {0, 1}
        assert (s.factors >= 0).all() and (s.factors < np.array(SPRITES_FACTOR_SIZES)).all()
        assert (s.x.reshape(n, -1).sum(1) > 0).all()  # every image shows a shape
    # uniform draws: each index of every factor occurs in train
    f = sprites.splits["train"].factors
    for j, size in enumerate(SPRITES_FACTOR_SIZES):
        assert len(np.unique(f[:, j])) == size


def test_sprites_deterministic_and_seeded():
    a, b = load_source("sprites", seed=3, sizes=SMALL), load_source("sprites", seed=3, sizes=SMALL)
    c = load_source("sprites", seed=4, sizes=SMALL)
    for k in ("train", "val", "test"):
        assert np.array_equal(a.splits[k].x, b.splits[k].x)
        assert np.array_equal(a.splits[k].factors, b.splits[k].factors)
        assert not np.array_equal(a.splits[k].factors, c.splits[k].factors)
        assert not np.array_equal(a.splits[k].x, c.splits[k].x)
    assert len(a.splits["val"].x) == 200


def test_sprites_splits_are_different_streams(sprites):
    # independent streams: val is not a prefix/copy of train, and factor tuples repeat
    # across splits only at the chance rate of uniform draws (20000 / 737280 ~ 2.7%)
    tr, va = sprites.splits["train"], sprites.splits["val"]
    assert not np.array_equal(tr.factors[:2000], va.factors)
    assert not np.array_equal(sprites.splits["test"].factors, va.factors)
    key = lambda f: set(map(tuple, f.tolist()))
    shared = len(key(va.factors) & key(tr.factors)) / len(va.factors)
    assert shared < 0.06
    # the same factors render the same image (rendering depends on factors only)
    assert np.array_equal(render_sprites(va.factors[:50]), va.x[:50])


def test_sprites_position_moves_centroid():
    rows, cols = np.mgrid[0:64, 0:64] + 0.5
    for shape in range(3):
        fx = np.array([[shape, 3, 7, i, 10] for i in range(32)])
        fy = np.array([[shape, 3, 7, 10, i] for i in range(32)])
        cx = [(im * cols).sum() / im.sum() for im in render_sprites(fx)]
        cy = [(im * rows).sum() / im.sum() for im in render_sprites(fy)]
        assert (np.diff(cx) > 0).all() and (np.diff(cy) > 0).all()
    # square at angle 0 is symmetric: its centroid sits on the position value
    im = one(shape=0, px=4, py=20)
    assert abs((im * cols).sum() / im.sum() - SPRITES_POSITIONS[4]) < 0.6
    assert abs((im * rows).sum() / im.sum() - SPRITES_POSITIONS[20]) < 0.6


def test_sprites_scale_and_size():
    for shape in range(3):
        for orient in (0, 13):
            counts = [one(shape, s, orient).sum() for s in range(6)]
            assert (np.diff(counts) > 0).all(), (shape, orient, counts)
    # axis-aligned square: 20 px across at the largest scale, 10 px at the smallest
    for scale, width in ((5, 20), (0, 10)):
        im = one(0, scale, 0)
        assert abs(im.any(0).sum() - width) <= 1 and abs(im.any(1).sum() - width) <= 1


def test_sprites_shapes_and_orientation():
    sq, el, he = one(0, orient=3), one(1, orient=3), one(2, orient=3)
    for a, b in ((sq, el), (sq, he), (el, he)):
        assert (a != b).sum() > 30
    # square has 90 deg symmetry (10 of 40 steps); heart does not
    assert np.array_equal(one(0, orient=0), one(0, orient=10))
    assert (one(2, orient=0) != one(2, orient=10)).sum() > 30
    # heart upright at angle 0: widest row above its centroid; at 180 deg below it
    for orient, upright in ((0, True), (20, False)):
        im = one(2, 5, orient)
        rows = np.arange(64) + 0.5
        centroid = (im.sum(1) * rows).sum() / im.sum()
        assert (rows[im.sum(1).argmax()] < centroid) == upright


def test_sprites_stay_inside_frame():
    # largest scale, every shape and orientation, at the four extreme positions
    f = np.array([[s, 5, o, px, py] for s in range(3) for o in range(40) for px in (0, 31) for py in (0, 31)])
    ims = render_sprites(f)
    assert not ims[:, [0, -1], :].any() and not ims[:, :, [0, -1]].any()
    # nothing clipped: same pixel count as the shape at the opposite corner (up to aliasing)
    counts = ims.reshape(len(f), -1).sum(1).reshape(3, 40, 4).astype(float)
    assert (np.abs(counts - counts.mean(-1, keepdims=True)) / counts.mean(-1, keepdims=True) < 0.05).all()

# -----------------------------------------------------------------------------
# gmm

def test_gmm_matches_constants():
    d = load_source("gmm", seed=0)
    assert d.scale == 1.0 and not d.binary
    assert [len(d.splits[k].x) for k in ("train", "val", "test")] == [10000, 1000, 1000]
    x, y = d.splits["train"].x, d.splits["train"].y
    assert x.dtype == np.float32 and x.shape == (10000, 2) and y.dtype == np.int64
    for c in range(3):
        xc = x[y == c].astype(np.float64)
        n = len(xc)
        assert abs(n / len(x) - 1 / 3) < 5 * np.sqrt(2 / 9 / len(x))  # uniform prior, 5 sigma
        mean_se = np.sqrt(np.diag(GMM_COVS[c]) / n)
        assert (np.abs(xc.mean(0) - GMM_MEANS[c]) < 5 * mean_se).all()
        # Var(sample cov_ij) ~ (S_ii S_jj + S_ij^2) / n for Gaussian data
        S = GMM_COVS[c]
        cov_se = np.sqrt((np.outer(np.diag(S), np.diag(S)) + S ** 2) / n)
        assert (np.abs(np.cov(xc.T) - S) < 5 * cov_se).all()


def test_gmm_seeded_and_sized():
    a = load_source("gmm", seed=1, sizes={"train": 100})
    b = load_source("gmm", seed=1, sizes={"train": 100})
    c = load_source("gmm", seed=2, sizes={"train": 100})
    assert len(a.splits["train"].x) == 100 and len(a.splits["val"].x) == 1000
    assert np.array_equal(a.splits["train"].x, b.splits["train"].x)
    assert not np.array_equal(a.splits["train"].x, c.splits["train"].x)
    assert not np.array_equal(a.splits["val"].x[:100], a.splits["train"].x)
    with pytest.raises(ValueError, match="sizes"):
        load_source("gmm", sizes={"training": 5})

# -----------------------------------------------------------------------------
# npz and errors

def test_npz_single_x_layout(tmp_path):
    # each image is filled with its row id, so labels must travel with their images
    x = np.repeat(np.arange(50, dtype=np.uint8) * 5, 12).reshape(50, 3, 4)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(50))
    d = load_source("npz", str(path), seed=0)
    assert [len(d.splits[k].x) for k in ("train", "val", "test")] == [40, 5, 5]
    assert d.scale == pytest.approx(1 / 255) and not d.binary
    ids = np.concatenate([d.splits[k].y for k in ("train", "val", "test")])
    assert sorted(ids.tolist()) == list(range(50))
    for s in d.splits.values():
        assert s.x.dtype == np.uint8 and s.x.shape[1:] == (3, 4)
        assert np.array_equal(s.x[:, 0, 0], (s.y * 5).astype(np.uint8))
    e = load_source("npz", path, seed=1)
    assert not np.array_equal(d.splits["val"].y, e.splits["val"].y)
    assert np.array_equal(load_source("npz", path, seed=0).splits["val"].y, d.splits["val"].y)


def test_npz_split_layout(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "b.npz"
    np.savez(path, train=rng.integers(0, 2, (30, 8), dtype=np.uint8),
             valid=rng.integers(0, 2, (6, 8), dtype=np.uint8), test=rng.integers(0, 2, (7, 8), dtype=np.uint8))
    d = load_source("npz", path)
    assert d.binary and d.scale == 1.0
    assert [len(d.splits[k].x) for k in ("train", "val", "test")] == [30, 6, 7]
    capped = load_source("npz", path, sizes={"train": 10})
    assert len(capped.splits["train"].x) == 10 and len(capped.splits["test"].x) == 7
    # float data: cast to float32, scale 1, binary only when in {0,1}
    fpath = tmp_path / "f.npz"
    np.savez(fpath, train=rng.normal(size=(20, 2)), val=rng.normal(size=(4, 2)), test=rng.normal(size=(4, 2)))
    f = load_source("npz", fpath)
    assert f.splits["train"].x.dtype == np.float32 and f.scale == 1.0 and not f.binary


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, train=np.zeros((4, 2)), test=np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"bad\.npz.*val"):
        load_source("npz", bad)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_source("npz", tmp_path / "nope.npz")
    for name in ("mnist", "binarized-mnist", "frey", "npz"):
        with pytest.raises(FileNotFoundError, match=name):
            load_source(name, None)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_source("mnist", tmp_path)
    np.save(tmp_path / "frey.npy", np.zeros((300, 28, 21), np.uint8))
    with pytest.raises(ValueError, match=r"frey\.npy.*\(300, 28, 21\)"):
        load_source("frey", tmp_path / "frey.npy")
    # a file in another format than the source takes: one error naming it (was numpy's, gzip's or
    # zipfile's traceback)
    np.save(tmp_path / "x.npy", np.zeros((3, 784), np.uint8))
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 not a zip")
    (tmp_path / "text.txt").write_text("hello")
    idx = tmp_path / "idx"
    idx.mkdir()
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (idx / f"{f}.gz").write_bytes(b"not gzip")
    for name, path in [("binarized-mnist", tmp_path / "x.npy"), ("binarized-mnist", tmp_path / "cut.npz"),
                       ("frey", bad), ("mnist", idx), ("npz", tmp_path / "text.txt")]:
        # (an idx folder: the damaged file itself is named)
        with pytest.raises(ValueError, match=rf"(source '{name}'|{name}): cannot read {re.escape(str(path))}"):
            load_source(name, path)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        load_source("cifar")
    assert "cifar" in str(e.value)
    assert all(n in str(e.value) for n in SOURCE_NAMES)


def _write_idx(path, arr, magic, compress):
    raw = np.array([magic, *arr.shape], dtype=">i4").tobytes() + arr.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


def test_mnist_idx_parsing_synthetic(tmp_path):
    # tiny 2x2 "digits" in the real file layout: images plain, labels gzipped
    rng = np.random.default_rng(0)
    xtr, ytr = rng.integers(0, 256, (60000, 2, 2)), rng.integers(0, 10, 60000)
    xte, yte = rng.integers(0, 256, (10000, 2, 2)), rng.integers(0, 10, 10000)
    _write_idx(tmp_path / "train-images-idx3-ubyte", xtr, 2051, False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", ytr, 2049, True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", xte, 2051, False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", yte, 2049, True)
    d = load_source("mnist", tmp_path)
    assert np.array_equal(d.splits["train"].x, xtr[:50000]) and np.array_equal(d.splits["val"].y, ytr[50000:])
    assert np.array_equal(d.splits["test"].x, xte) and d.splits["test"].y.dtype == np.int64
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", xte, 2049, False)  # wrong magic
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*2051"):
        load_source("mnist", tmp_path)

# -----------------------------------------------------------------------------
# reference data sets (skipped when ../shared/data is absent)

@needs_shared
def test_mnist_reference():
    d = load_source("mnist", SHARED / "mnist")
    assert [len(d.splits[k].x) for k in ("train", "val", "test")] == [50000, 10000, 10000]
    assert d.scale == pytest.approx(1 / 255) and not d.binary
    for s in d.splits.values():
        assert s.x.dtype == np.uint8 and s.x.shape[1:] == (28, 28) and s.x.max() == 255
        assert s.y.dtype == np.int64 and set(np.unique(s.y)) == set(range(10))
    capped = load_source("mnist", SHARED / "mnist", sizes={"test": 500})
    assert len(capped.splits["test"].x) == 500 and len(capped.splits["train"].x) == 50000


@needs_shared
def test_binarized_mnist_reference():
    path = SHARED / "binarized_mnist" / "binarized_mnist_uint8.npz"
    d = load_source("binarized-mnist", path)
    assert [len(d.splits[k].x) for k in ("train", "val", "test")] == [50000, 10000, 10000]
    assert d.binary and d.scale == 1.0
    for s in d.splits.values():
        assert s.x.dtype == np.uint8 and s.x.shape[1:] == (28, 28) and set(np.unique(s.x)) == {0, 1}
    # the file's test split is sorted by label, so a cap must be a seeded random subset
    full = d.splits["test"].x
    a = load_source("binarized-mnist", path, seed=0, sizes={"test": 1000}).splits["test"].x
    b = load_source("binarized-mnist", path, seed=0, sizes={"test": 1000}).splits["test"].x
    assert a.shape == (1000, 28, 28) and np.array_equal(a, b) and not np.array_equal(a, full[:1000])


@needs_shared
def test_frey_reference():
    path = SHARED / "freyface" / "frey_1965x28x20_uint8.npy"
    d, e = load_source("frey", path, seed=0), load_source("frey", path, seed=1)
    assert [len(d.splits[k].x) for k in ("train", "val", "test")] == [1765, 100, 100]
    assert d.scale == pytest.approx(1 / 255) and not d.binary
    for s in d.splits.values():
        assert s.x.dtype == np.uint8 and s.x.shape[1:] == (28, 20) and s.x.max() > 1 and s.y is None
    # a permutation of the whole file: nothing lost, nothing duplicated
    raw = np.load(path)
    total = sum(int(s.x.sum(dtype=np.int64)) for s in d.splits.values())
    assert total == int(raw.sum(dtype=np.int64))
    assert not np.array_equal(d.splits["val"].x, e.splits["val"].x)
