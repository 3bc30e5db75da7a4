"""The one way vaepipe reads a checkpoint: torch's safe loader, never code inside the file.

A checkpoint is a file people hand each other (a colleague's run folder, a download beside a
paper). `torch.load(weights_only=False)` unpickles arbitrary objects, and unpickling can call any
function (an object's `__reduce__`), so a crafted `.ckpt` would run its code on `vaepipe eval`.
vaepipe's own checkpoints hold only tensors, numbers, strings, lists, tuples and dicts (the config
is stored as plain containers, RNG states as tensors: `callbacks.RankStates`), which is exactly what
`weights_only=True` admits; anything else means the file was not written by vaepipe and is refused.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from pipeline.errors import UnreadableCheckpointError, UnsafeCheckpointError


def load_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """The checkpoint at `path`, loaded with `torch.load(weights_only=True)`.

    Raises UnsafeCheckpointError, naming the file and what it contains, when the file needs any
    other type: nothing of it has been executed then (the safe unpickler stops at the reference);
    UnreadableCheckpointError, naming the file, when it is damaged (torch's zip reader says so with
    a RuntimeError, an OSError or an EOFError, depending on where the bytes stop)."""
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True, mmap=mmap)
    except (FileNotFoundError, PermissionError):
        raise  # not the file's fault: the caller names the path, or the storage handling reports it
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err) and "Weights only" not in str(err) or "Unsupported operand" in str(err):
            # a damaged file, not a refused one; "Unsupported operand": a byte that is no pickle opcode
            # (a text file, say), which the safe unpickler reports in its refusal message
            raise _unreadable(path, err) from None
        # torch's message names the offending global, e.g. "Unsupported global: GLOBAL posix.system"
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "global" in line), "")
        raise UnsafeCheckpointError(
            f"refused to load {path}: it contains objects vaepipe does not write ({detail[:200] or 'non-tensor data'}); "
            "loading it could run code from the file, so it was not loaded. Use checkpoints written by vaepipe."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError, ValueError) as err:
        raise _unreadable(path, err) from None  # KeyError: some foreign bytes trip the legacy-format reader


def _unreadable(path, err: Exception) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(f"{path} is not a readable vaepipe checkpoint (truncated or foreign?): "
                                     f"{type(err).__name__}: {err}")
