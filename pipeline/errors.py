"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed exactly as configured."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses or gradients in a row."""
