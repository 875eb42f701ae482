"""Exceptions a user can act on. The CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations

import errno
from pathlib import Path


class NacdError(Exception):
    """Base class: an error whose message alone tells the user what to fix."""

    exit_code = 1


class ConfigError(NacdError):
    """A config file or override is invalid; the message names the key."""

    exit_code = 2


class DataError(NacdError):
    """Bad input data; the message names the file, the line (or row) and the field."""


class ModelError(NacdError):
    """A model spec cannot be resolved, prepared or loaded."""


class TrainingError(NacdError):
    """Training cannot start or cannot go on (bad setup, non-finite loss, a LoRA state that does not fit)."""


class StageNotImplementedError(NacdError):
    """A pipeline stage that has not been built yet. Never pretends to succeed."""

    exit_code = 3


_IO_HINTS = {
    errno.ENOSPC: "free some space and run the same command again: finished stages and checkpoints are kept",
    errno.EDQUOT: "free some space and run the same command again: finished stages and checkpoints are kept",
    errno.EACCES: "check the permissions of the folder (run.out_dir) and its files",
    errno.EPERM: "check the permissions of the folder (run.out_dir) and its files",
    errno.EROFS: "the file system is read-only; choose another run.out_dir",
}


def io_error(exc: OSError, path: str | Path | None = None, operation: str = "access") -> NacdError:
    """A file-system failure as one line naming the path and the operation, with what to do about it
    (a full disk: free space and rerun; no permission: check it). Writes to an open file raise without
    a file name, so callers that know it pass ``path``."""
    where = exc.filename or path
    what = exc.strerror or str(exc) or type(exc).__name__
    head = f"{where}: cannot {operation}: {what}" if where else f"cannot {operation}: {what}"
    hint = _IO_HINTS.get(exc.errno or -1)
    return NacdError(f"{head}; {hint}" if hint else head)
