"""Errors that stop a run with a one-line message (the CLI prints them without a traceback)."""


class DiladiffError(Exception):
    """Base class of the errors shown to the user as `error: <message>`."""


class DataError(DiladiffError):
    """Missing, empty or unreadable data."""


class CheckpointError(DiladiffError):
    """A run folder or checkpoint that cannot be used (missing, wrong kind, mismatched)."""


class TrainingError(DiladiffError):
    """Training cannot continue (non-finite loss, bad batch)."""


class Terminated(Exception):
    """Training stopped on SIGTERM after saving a checkpoint (a scheduler's pre-emption).
    Not a DiladiffError: the CLI exits with 128 + 15 and says how to resume."""

    def __init__(self, run_dir, step: int):
        super().__init__(
            f"terminated (SIGTERM) at step {step}; checkpoint saved in {run_dir}: "
            "rerun the same command to resume"
        )
        self.step = step
