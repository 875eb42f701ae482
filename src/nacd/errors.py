"""Exceptions a user can act on. The CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations


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


class StageNotImplementedError(NacdError):
    """A pipeline stage that has not been built yet. Never pretends to succeed."""

    exit_code = 3
