"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""

EXIT_RETRYABLE = 75  # EX_TEMPFAIL: run the same command again (after a signal, or once disk space is freed)


class ShardError(RuntimeError):
    """A shard that cannot be read, named by its path."""


class ManifestError(ShardError, ValueError):
    """A manifest that does not have the schema vaepipe reads (pipeline/data/manifest.py), naming the
    manifest, the field and the value: nothing of it has been used."""


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder (pipeline/run_lock.py): one writer per run folder."""


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed exactly as configured."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class Preempted(Exception):
    """Raised on every rank right after the agreed signal checkpoint: leaves training at once, with no
    end-of-epoch validation to eat into a preemption's grace period."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"{signame}: stopped at step {step} after saving its checkpoint")
        self.step, self.signame = step, signame


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that holds objects vaepipe never writes: refused before any of it is unpickled."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that is damaged (truncated, not a checkpoint at all), named by its path."""


class WriteFailure(RuntimeError):
    """A run file (checkpoint, image, summary) the storage refused: disk full, quota, read-only, I/O
    error. Retryable once space is freed (exit 75); the run folder holds no partial file."""
