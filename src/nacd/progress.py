"""Progress bars: redrawn in place on a terminal, a log line a minute in a non-interactive log.

Every loop a person waits on (tokenizing, training, distilling, scoring) shows a :func:`bar`. On a
terminal it is tqdm's bar. When standard error is not a terminal (``nohup``, CI, a pipe into a file)
tqdm's in-place redraws would write a carriage-return line every fraction of a second into the log;
there the bar writes one plain line through :mod:`logging` when it starts, at most one a minute, and
when it ends, and transformers' own bars (loading weights) stay quiet. ``NACD_PROGRESS`` overrides the
choice: ``bar`` (tqdm's bar wherever it writes), ``log`` (the log lines on a terminal too) or ``off``.

Importing this module does no work; ``tqdm`` is imported when a bar is made.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nacd.errors import ConfigError

ENV = "NACD_PROGRESS"
MODES = ("bar", "log", "off")
LOG_INTERVAL_S = 60.0
"""Seconds between two log lines of one bar in a non-interactive log."""

logger = logging.getLogger("nacd.progress")


def mode(stream: Any = None) -> str:
    """``bar``, ``log`` or ``off``: ``NACD_PROGRESS`` when set, else ``bar`` on a terminal and ``log`` elsewhere."""
    value = os.environ.get(ENV, "").strip().lower()
    if value:
        if value not in MODES:
            raise ConfigError(f"environment variable {ENV}={value!r}: expected one of {', '.join(MODES)}")
        return value
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "log"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "log"


class _LogLines:
    """A file-like object for tqdm that turns each redraw into one log record: blank redraws are dropped,
    and so is one at the same count as the line before (tqdm's closing redraw after the last update)."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        count = line.split("[", 1)[0]  # "desc: 100%|###| 6/6 " without the times and rates
        if line and count != self.last:
            self.log.info(line)
            self.last = count
        return len(text)

    def flush(self) -> None:
        pass


def bar(*args: Any, disable: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar (same arguments) drawn as :func:`mode` says; ``disable`` still turns it off."""
    from tqdm.auto import tqdm

    chosen = mode()
    if chosen == "off" or disable:
        return tqdm(*args, disable=True, **kwargs)
    if chosen == "bar":
        return tqdm(*args, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    # maxinterval out of reach: tqdm's monitor thread would otherwise redraw a bar idle for that long
    # without resetting its clock, and the next update would draw again at once (two lines a minute)
    kwargs.update(file=_LogLines(logger), mininterval=LOG_INTERVAL_S, maxinterval=1e9, ascii=True)
    kwargs.setdefault("ncols", 100)
    return tqdm(*args, **kwargs)


@contextmanager
def hf_bars(always: bool = False) -> Iterator[None]:
    """transformers' own bars (loading weights, saving) off for the block where :func:`mode` is not
    ``bar``, or in any mode with ``always``."""
    if not always and mode() == "bar":
        yield
        return
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
