"""Reading .npy / .npz arrays with bounded memory (the npz, binarized-mnist and frey sources).

An .npy header declares a shape and dtype, and numpy allocates all of it before it reads a byte of
data, so a 200-byte file could ask for terabytes (a MemoryError traceback, or a machine swapping).
Every header is read and checked first (plain numbers only, what the file holds, what memory
allows); only then is an array read, never with pickle.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

# The loader holds the file's arrays and their split/cast copies at once: about twice the declared bytes.
MEMORY_FACTOR = 2
# At most this much is read to find a header: magic (8) + length field (2 or 4) + the longest
# version-1 header (64 KiB), so numpy parses it whole and refuses one over its own 10000-byte limit.
# A version-2 length field may declare 4 GB; such a header is refused as cut short, not read.
_HEADER_READ = 12 + 2**16


@dataclass
class _Declared:
    """What one .npy header declares, and how many data bytes its file (or zip member) really has."""
    key: str | None                     # the npz key; None for a plain .npy
    shape: tuple[int, ...]
    dtype: np.dtype
    holds: int                          # bytes after the header

    @property
    def nbytes(self) -> int:            # Python ints: an absurd shape cannot overflow int64 here
        return math.prod(self.shape) * self.dtype.itemsize

    def __str__(self):
        return f"{'the array' if self.key is None else f'key {self.key!r}'} ({self.dtype} {self.shape})"


def one_line(err):
    # some of numpy's messages run over several lines; the CLI prints one line per error
    return " ".join(str(err).split())


def _read_header(stream, key, name, path):
    """(shape, dtype, header length) of the .npy at the start of `stream`, reading at most _HEADER_READ bytes."""
    what = f"{name}: cannot read {path}: " + ("" if key is None else f"key {key!r}: ")
    head = io.BytesIO(stream.read(_HEADER_READ))
    try:
        version = npy_format.read_magic(head)
        # 3.0 differs from 2.0 only in utf-8 field names, i.e. structured dtypes, which are refused anyway
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy format version {version}")
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _, dtype = read(head)
    except ValueError as err:  # numpy's message says what is wrong (magic, EOF, header syntax), not where
        raise ValueError(f"{what}not an .npy array ({one_line(err)})") from None
    if any(n < 0 for n in shape):
        raise ValueError(f"{what}declares a negative dimension, shape {shape}")
    # plain numbers only: an object array is a pickle (never loaded), strings and records are no data set
    if dtype.kind not in "biuf":
        raise ValueError(f"{what}holds {dtype} values ({dtype.str}); only bool, integer and float arrays are read")
    return tuple(shape), dtype, head.tell()


def memory_available() -> tuple[int, str] | None:
    """(bytes of memory free for new data, where that figure comes from), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):  # free + reclaimable cache, in kB
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    try:  # no /proc (macOS) or an old kernel: free physical pages, which leaves out the page cache
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages (sysconf)"
    except (OSError, ValueError, AttributeError):
        return None


def _gib(n):
    return f"{n / 2**30:,.1f} GiB"


def check_declared(path, arrays: list[_Declared]):
    """Refuse, before anything is allocated, arrays that cannot fit in memory or that declare more
    data than the file holds (a damaged or crafted file: numpy would allocate first, then hit EOF)."""
    total = sum(a.nbytes for a in arrays)
    avail = memory_available()
    if avail is not None and MEMORY_FACTOR * total > avail[0]:
        raise ValueError(f"{path}: {', '.join(map(str, arrays))} declare{'s' if len(arrays) == 1 else ''} "
                         f"{total:,} bytes ({_gib(total)}); loading needs about {MEMORY_FACTOR}x that "
                         f"({_gib(MEMORY_FACTOR * total)}: the arrays and their split copies) but {avail[0]:,} "
                         f"bytes ({_gib(avail[0])}) of memory are available ({avail[1]}); nothing was loaded")
    for a in arrays:
        if a.nbytes > a.holds:
            raise ValueError(f"{path}: {a} declares {a.nbytes:,} bytes of data but the file holds only "
                             f"{max(a.holds, 0):,} for it: a damaged or crafted file; nothing was loaded")


def load_npy(path, name, expect):
    """The array in .npy `path`, read only after its header passed `expect(path, shape, dtype)` and
    check_declared."""
    with open(path, "rb") as f:
        shape, dtype, header = _read_header(f, None, name, path)
        expect(path, shape, dtype)
        check_declared(path, [_Declared(None, shape, dtype, os.fstat(f.fileno()).st_size - header)])
        f.seek(0)
        return npy_format.read_array(f, allow_pickle=False)


def npz_member(zf, key):
    # np.load's NpzFile: a key names the member itself, else the member "key.npy" (what np.savez writes)
    return key if key in zf.namelist() else key + ".npy"


def npz_declared(zf, key, name, path) -> _Declared:
    info = zf.getinfo(npz_member(zf, key))
    try:
        with zf.open(info) as member:
            shape, dtype, header = _read_header(member, key, name, path)
    except EOFError:  # zipfile's word for a member that ends before the size its zip entry gives
        raise ValueError(f"{name}: cannot read {path}: key {key!r}: the archive ends inside it (its zip entry "
                         f"says {info.file_size:,} bytes): a damaged or crafted file") from None
    holds = info.file_size  # the zip's own size of the unpacked member: reading stops there
    if info.compress_type == zipfile.ZIP_STORED:  # stored bytes must be in the archive: at most all after its offset
        holds = min(holds, Path(path).stat().st_size - info.header_offset)
    return _Declared(key, shape, dtype, holds - header)
