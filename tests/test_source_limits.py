"""Bounded reads (issue 26): an .npy/.npz header's declared shape and dtype are checked against the
file and the memory before numpy allocates them. The files here are crafted as an attacker would:
a few hundred bytes whose header declares terabytes, written byte by byte, not with np.save."""

import io
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy_format

from pipeline.data import arrays as sources  # the bounded .npy/.npz reader (memory_available)
from pipeline.data.sources import load_source
from tests.conftest import vaepipe

TERA = 10**12  # float32 values: 4 TB declared, in a file of ~300 bytes
# The crafted files hold a few KB at most; reading their headers allocates some KB. A traced peak under
# 16 MiB therefore means nothing of the declared size (400 MB and up here) was allocated.
PEAK_TOLERANCE = 16 * 2**20


def npy_bytes(shape, descr="<f4", data=b"\0" * 64):
    """An .npy whose version-1.0 header declares `shape` and `descr`, followed by just `data`."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def write_npz(path, members, compression=zipfile.ZIP_STORED):
    """A zip holding each member's raw bytes as '<key>.npy', as np.savez names them."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for key, raw in members.items():
            zf.writestr(key + ".npy", raw)
    return path


def inflate_stored_sizes(path, size):
    """Make the zip's central directory claim `size` bytes for its (only, stored) member: a zip
    directory that lies about how much the archive holds."""
    raw = bytearray(path.read_bytes())
    at = raw.rindex(b"PK\x01\x02")  # central directory entry: sizes at +20 (packed) and +24 (unpacked)
    raw[at + 20:at + 28] = struct.pack("<II", size, size)
    path.write_bytes(bytes(raw))
    return path


def traced_peak(fn):
    """(exception raised by fn, peak bytes traced while it ran). numpy reports its array data to
    tracemalloc, so an allocation of the declared size shows up even if no page was touched."""
    tracemalloc.start()
    try:
        fn()
        err = None
    except Exception as e:  # noqa: BLE001 - the caller asserts on it
        err = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return err, peak


def assert_one_line_naming(message, path, *fragments):
    assert "\n" not in message.strip() and "Traceback" not in message, message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)

# -----------------------------------------------------------------------------
# declared beyond memory: refused through the real CLI, nothing written


def _huge_stored(d):
    return "npz", write_npz(d / "huge.npz", {"x": npy_bytes((TERA,))}), ["key 'x'", "float32", f"({TERA},)"]


def _huge_deflated(d):
    return ("npz", write_npz(d / "huge.npz", {"x": npy_bytes((TERA,))}, zipfile.ZIP_DEFLATED),
            ["key 'x'", "float32", f"({TERA},)"])


def _huge_train_split(d):
    small = npy_bytes((2, 784), "|u1", b"\0" * 2 * 784)
    members = {"train": npy_bytes((TERA, 784), "|u1"), "valid": small, "test": small}
    return "binarized-mnist", write_npz(d / "bm.npz", members), ["key 'train'", "uint8", f"({TERA}, 784)"]


def _huge_frey_npy(d):
    path = d / "frey.npy"
    path.write_bytes(npy_bytes((TERA, 28, 20), "|u1"))
    return "frey", path, ["the array", "uint8", f"({TERA}, 28, 20)"]


def _absurd_shape(d):  # 10^30 values: beyond int64, numpy's own count overflowed (OverflowError traceback)
    return "npz", write_npz(d / "absurd.npz", {"x": npy_bytes((10**30,))}), ["key 'x'", "float32", f"({10**30},)"]


@pytest.mark.parametrize("craft", [_huge_stored, _huge_deflated, _huge_train_split, _huge_frey_npy, _absurd_shape])
def test_cli_refuses_an_array_declared_beyond_memory(tmp_path, craft):
    name, path, fragments = craft(tmp_path)
    assert path.stat().st_size < 5000  # the attack: a tiny file that declares terabytes
    out = tmp_path / "shards"
    proc = vaepipe("prepare", name, "--source", path, "--out", out, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert_one_line_naming(proc.stderr, path, *fragments, "bytes", "of memory are available")
    assert proc.stderr.startswith("vaepipe prepare: error: ")
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()
    # and in-process, nothing of the declared size was allocated
    err, peak = traced_peak(lambda: load_source(name, path))
    assert isinstance(err, ValueError) and "of memory are available" in str(err), repr(err)
    assert peak < PEAK_TOLERANCE, peak


def test_cli_npz_source_given_a_huge_npy_reads_no_array(tmp_path):
    # np.load of a .npy loaded (allocated) it before finding that it is no .npz
    path = tmp_path / "huge.npy"
    path.write_bytes(npy_bytes((TERA,)))
    proc = vaepipe("prepare", "npz", "--source", path, "--out", tmp_path / "shards", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert_one_line_naming(proc.stderr, path)
    err, peak = traced_peak(lambda: load_source("npz", path))
    assert isinstance(err, ValueError) and peak < PEAK_TOLERANCE, (repr(err), peak)

# -----------------------------------------------------------------------------
# declared beyond the file: refused before allocating, whatever the memory


@pytest.fixture
def plenty_of_memory(monkeypatch):
    # these files declare 400-560 MB: say the machine has 1 PB, so only the file-size check can refuse
    # (raising=False: the original code has no memory_available, and must fail on the peak instead)
    monkeypatch.setattr(sources, "memory_available", lambda: (2**50, "test"), raising=False)


def _lie_stored(d):
    return "npz", write_npz(d / "lie.npz", {"x": npy_bytes((10**8,))}), "key 'x' (float32 (100000000,))"


def _lie_deflated(d):
    return ("npz", write_npz(d / "lie.npz", {"x": npy_bytes((10**8,))}, zipfile.ZIP_DEFLATED),
            "key 'x' (float32 (100000000,))")


def _lie_zip_directory(d):  # the header and the zip directory agree on 400 MB; the archive has 300 bytes
    path = write_npz(d / "lie.npz", {"x": npy_bytes((10**8,))})
    return "npz", inflate_stored_sizes(path, 4 * 10**8 + 128), "key 'x'"


def _lie_frey(d):
    path = d / "frey.npy"
    path.write_bytes(npy_bytes((10**6, 28, 20), "|u1"))
    return "frey", path, "the array (uint8 (1000000, 28, 20))"


@pytest.mark.parametrize("craft", [_lie_stored, _lie_deflated, _lie_zip_directory, _lie_frey])
def test_header_declaring_more_than_the_file_holds_allocates_nothing(tmp_path, plenty_of_memory, craft):
    name, path, fragment = craft(tmp_path)
    err, peak = traced_peak(lambda: load_source(name, path))
    assert peak < PEAK_TOLERANCE, f"{peak:,} bytes allocated for a {path.stat().st_size}-byte file"
    assert isinstance(err, ValueError), repr(err)
    assert_one_line_naming(str(err), path, fragment, "a damaged or crafted file")

# -----------------------------------------------------------------------------
# the memory figure itself


def test_memory_check_uses_the_available_memory(tmp_path, monkeypatch):
    avail, where = sources.memory_available()
    assert avail > 0 and where
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((1000, 100), np.float32))  # 400,000 bytes, honest
    assert len(load_source("npz", path).splits["train"].x) == 800
    monkeypatch.setattr(sources, "memory_available", lambda: (500_000, "a test figure"))
    with pytest.raises(ValueError) as e:  # 2 x 400,000 > 500,000
        load_source("npz", path)
    assert_one_line_naming(str(e.value), path, "key 'x' (float32 (1000, 100))", "400,000 bytes",
                           "500,000 bytes", "a test figure")
    monkeypatch.setattr(sources, "memory_available", lambda: None)  # unknown: only the file checks apply
    assert len(load_source("npz", path).splits["val"].x) == 100

# -----------------------------------------------------------------------------
# other malformed headers: one line naming the file and the key


def _v2_header_of_4gb(descr, shape):
    # a version-2 header whose length field declares 4 GB, in a file of 70 bytes
    body = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**32 - 1) + body


def _long_header():
    # a version-1 header padded to 20000 bytes: numpy refuses it in a message of three lines
    body = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }" + b" " * 20000 + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body + b"\0" * 8


MALFORMED = {
    "not an npy header": b"hello, this is not an array",
    "truncated header": npy_bytes((10,))[:15],
    "negative shape": npy_bytes((-5, 3)),
    "absurd shape": npy_bytes((10**30, 10**30)),
    "object dtype (a pickle)": npy_bytes((10,), "|O"),
    "complex dtype": npy_bytes((20,), "<c16", b"\0" * 320),  # enough rows to split: it loaded (imaginary parts dropped)
    "header length field of 4 GB": _v2_header_of_4gb("<f4", (4,)),
    "header over numpy's 10000-byte limit": _long_header(),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_member_is_one_line_naming_file_and_key(tmp_path, case):
    path = write_npz(tmp_path / "m.npz", {"x": MALFORMED[case]})
    err, peak = traced_peak(lambda: load_source("npz", path))
    assert isinstance(err, ValueError), repr(err)
    assert_one_line_naming(str(err), path, "key 'x'")
    assert peak < PEAK_TOLERANCE, peak


@pytest.mark.parametrize("raw", [npy_bytes((10**30, 28, 20), "|u1"), _v2_header_of_4gb("|u1", (4, 28, 20))],
                         ids=["absurd shape", "header length field of 4 GB"])
def test_malformed_npy_is_one_line_naming_file(tmp_path, raw):
    path = tmp_path / "frey.npy"
    path.write_bytes(raw)
    err, peak = traced_peak(lambda: load_source("frey", path))
    assert isinstance(err, ValueError), repr(err)
    assert_one_line_naming(str(err), path)
    assert peak < PEAK_TOLERANCE, peak


def test_corrupt_compressed_member_is_one_line(tmp_path):
    path = tmp_path / "c.npz"
    np.savez_compressed(path, x=np.arange(100_000, dtype=np.float32))
    raw = bytearray(path.read_bytes())
    raw[200:2000] = bytes(b ^ 0x5A for b in raw[200:2000])  # scramble the deflate stream past the header
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as e:  # was zlib.error's traceback
        load_source("npz", path)
    assert_one_line_naming(str(e.value), path)
