"""Writing a run's files (checkpoints, image grids, summary, config): atomically, and with one clear
line when the file system refuses them.

Every file is written to a temporary name in its folder, flushed to disk, then renamed over the
final name: a reader (or a resume after a crash) sees the old file or the new one, never half of
one. When the write fails (disk full, quota, read-only or failing storage), the temporary file is
removed, so the run folder holds only complete files, and `WriteFailure` names the file, the
errno and the space the file needs and has (`vaepipe fit` adds the newest good checkpoint to
resume from). The CLI exits with 75 (EX_TEMPFAIL: retry once space is freed), without a traceback.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, IO

from pipeline.errors import WriteFailure

HOST = socket.gethostname().replace("-", "_")  # no '-': it separates the parts of a temporary's name

# errnos that mean "the storage refused the write", not "vaepipe has a bug"
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def storage_error(err: BaseException) -> OSError | None:
    """The OSError behind a failed write: the error itself, or the one torch.save's C++ writer
    reports as 'unexpected pos' (the Python write error is its context)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict, each storage counted once."""
    import torch  # here: writing a text file needs no torch (sweep and prepare commands stay light)

    seen, total, stack = set(), 0, [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            storage = o.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return total


def describe_failure(path: Path, err: OSError, what: str, need: int | None) -> str:
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else None
    space = []
    if need:
        space.append(f"it needs about {need / 2**20:.1f} MB")
    if free is not None:
        space.append(f"{free / 2**20:.1f} MB free on that file system")
    return (f"could not write {what} {path}: [Errno {err.errno}] {os.strerror(err.errno)}"
            f"{' (' + ', '.join(space) + ')' if space else ''}; no partial file was left.")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], what: str = "file", *,
                 need: int | None = None, private: bool = False) -> Path:
    """write(f) into a temporary file beside `path`, fsync, rename over `path`. A refused write
    raises WriteFailure (see the module doc); `need`: the expected size, for the message;
    `private`: readable by the owner only (a file that holds tokens)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # host, pid and a random part: unpredictable, and whose it is stays known (remove_stale_temporaries)
    tmp = path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")
    # O_EXCL: a name planted as a link is refused (FileExistsError), never followed, nor removed;
    # a private file is never readable by others
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600 if private else 0o666)
    except OSError as err:
        if storage_error(err) is None:
            raise
        raise WriteFailure(describe_failure(path, err, what, need)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = storage_error(err)
        if cause is None:
            raise
        raise WriteFailure(describe_failure(path, cause, what, need)) from None
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Temporary files atomic_write left in `folder` when its process was killed (-9) mid-write
    (a checkpoint's weighs as much as the checkpoint): removed only when provably dead, i.e.
    written on this host by a process that no longer exists. A run folder on shared storage may
    hold a live writer's temporary from another node: its pid means nothing here, so it is kept."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp-*"):
        host, pid = _writer_of(tmp.name)
        if host == HOST and pid is not None and not process_alive(pid) and tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _writer_of(name: str) -> tuple[str | None, int | None]:
    """(host, pid) of a temporary's name `.<file>.tmp-<host>-<pid>-<random>`; (None, None) if other."""
    parts = name.rsplit(".tmp-", 1)[-1].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None, None
    return parts[0], int(parts[1])


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text(path: str | Path, text: str, what: str = "file", private: bool = False) -> Path:
    data = text.encode()
    return atomic_write(path, lambda f: f.write(data), what, need=len(data), private=private)
