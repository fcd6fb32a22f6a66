"""Errors that stop a run with a one-line message (the CLI prints them without a traceback)."""


class DiladiffError(Exception):
    """Base class of the errors shown to the user as `error: <message>`."""


class DataError(DiladiffError):
    """Missing, empty or unreadable data."""


class CheckpointError(DiladiffError):
    """A run folder or checkpoint that cannot be used (missing, wrong kind, mismatched)."""


class TrainingError(DiladiffError):
    """Training cannot continue (non-finite loss, bad batch)."""
