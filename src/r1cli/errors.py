"""User-facing errors: one clear line and a documented exit code (see docs/exit-codes.md)."""

from __future__ import annotations


class R1Error(Exception):
    """An error the user can act on. The CLI prints `r1: <message>` and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(R1Error):
    exit_code = 2


class ModelNotFoundError(R1Error):
    """The model is neither a local folder nor in the HF cache (exit 3; the message names `r1 pull NAME`)."""

    exit_code = 3


class CheckpointError(R1Error):
    """A checkpoint folder is incomplete or corrupt: names the tensor and the file."""

    exit_code = 1


class UnsupportedArchitectureError(R1Error):
    exit_code = 1
