"""The stop signals of a training process (SIGUSR1: Slurm's time-limit warning or `scancel
--signal=USR1`; SIGTERM: preemption), caught from the very start of `vaepipe fit`: a signal that
arrives while Python is still importing torch must not kill the job before its first checkpoint.
The handler only records the signal; `callbacks.LastCheckpoint` acts on it after the next step."""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_received: int | None = None


def _record(signum, frame) -> None:
    global _received
    _received = signum


def install() -> None:
    """(Re)install the recording handler; again after Lightning has put its own SIGTERM handler in."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _record)


def received() -> int | None:
    return _received
