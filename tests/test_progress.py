"""Progress bars: tqdm's bar on a terminal, a log line a minute elsewhere, NACD_PROGRESS to choose."""

from __future__ import annotations

import io
import logging

import pytest

from nacd import progress
from nacd.errors import ConfigError


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream_and_the_environment(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert progress.mode(_Terminal()) == "bar"
    assert progress.mode(io.StringIO()) == "log"
    assert progress.mode(object()) == "log"  # no isatty at all
    monkeypatch.setenv(progress.ENV, "off")
    assert progress.mode(_Terminal()) == "off"
    monkeypatch.setenv(progress.ENV, " BAR ")
    assert progress.mode(io.StringIO()) == "bar"
    monkeypatch.setenv(progress.ENV, "sometimes")
    with pytest.raises(ConfigError, match="NACD_PROGRESS='sometimes'"):
        progress.mode()


def test_a_non_interactive_bar_writes_plain_log_lines(monkeypatch, caplog):
    monkeypatch.setenv(progress.ENV, "log")
    with caplog.at_level(logging.INFO, logger="nacd.progress"), progress.bar(total=500, desc="train") as b:
        for step in range(500):
            b.set_postfix(loss=f"{step:.4f}", refresh=False)  # as the training loop does, every step
            b.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "nacd.progress"]
    # one line at the start and one at the end: 500 updates in well under a minute draw nothing between
    assert len(lines) == 2, lines
    assert lines[0].startswith("train:   0%") and lines[-1].startswith("train: 100%")
    assert "500/500" in lines[-1]
    assert all("\r" not in line for line in lines)


def test_off_and_disable_draw_nothing(monkeypatch, caplog):
    for env, disable in (("off", False), ("log", True)):
        monkeypatch.setenv(progress.ENV, env)
        with caplog.at_level(logging.INFO, logger="nacd.progress"), progress.bar(total=3, disable=disable) as b:
            b.update(3)
        assert not [r for r in caplog.records if r.name == "nacd.progress"]


def test_transformers_bars_are_off_in_a_log_and_restored(monkeypatch):
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    monkeypatch.setenv(progress.ENV, "log")
    with progress.hf_bars():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    monkeypatch.setenv(progress.ENV, "bar")
    with progress.hf_bars():
        assert hf_logging.is_progress_bar_enabled()
    with progress.hf_bars(always=True):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
