"""Run folders under faults, round 2 (issue #29): torn JSONL lines, unwritable folders, an error log that
cannot be written, a config restore that fails, and the messages of stopped commands."""

import errno
import json
import logging
import os

import pytest

from nacd import artifacts, cli, locks
from nacd.artifacts import MetricsWriter, RunDir, read_jsonl, repair_jsonl, trim_jsonl
from nacd.errors import NacdError


def test_an_append_that_fails_leaves_no_part_of_its_line(tmp_path, monkeypatch):
    path = tmp_path / "panel.jsonl"
    writer = MetricsWriter(path)
    writer.write(iteration=1)
    size = path.stat().st_size
    real = os.write

    def half_then_full(fd, data):  # a disk that fills in the middle of the line
        if len(data) > 4 and os.fstat(fd).st_size == size:
            real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(NacdError, match=r"panel\.jsonl: cannot append to: No space left on device; free some space"):
        writer.write(iteration=2, loss=0.5)
    monkeypatch.setattr(os, "write", real)
    assert path.stat().st_size == size and [r["iteration"] for r in read_jsonl(path)] == [1]
    writer.write(iteration=2)
    assert [r["iteration"] for r in read_jsonl(path)] == [1, 2]


def test_a_torn_last_line_is_named_by_readers_and_trimmed_on_resume(tmp_path, caplog):
    path = tmp_path / "history.jsonl"
    path.write_text('{"iteration": 1}\n{"iteration": 2}\n{"iteration": 3, "lo', encoding="utf-8")
    with pytest.raises(NacdError, match=r"history\.jsonl: line 3 is not valid JSON .*torn last line"):
        read_jsonl(path)
    with caplog.at_level(logging.WARNING):
        trim_jsonl(path, 5)
    assert "history.jsonl: trimmed a torn last line (20 bytes" in caplog.text
    assert [r["iteration"] for r in read_jsonl(path)] == [1, 2]
    assert repair_jsonl(path) == 0 and repair_jsonl(tmp_path / "absent.jsonl") == 0
    # a damaged line in the middle is named, not skipped
    path.write_text('{"iteration": 1}\nnot json\n{"iteration": 3}\n', encoding="utf-8")
    with pytest.raises(NacdError, match=r"history\.jsonl: line 2 is not valid JSON") as err:
        trim_jsonl(path, 5)
    assert "a torn last line" not in str(err.value)
    # a writer opened on a torn file trims it before its first append: no line is glued to the torn one
    path.write_text('{"step": 1}\n{"st', encoding="utf-8")
    MetricsWriter(path).write(step=2)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_an_unwritable_run_folder_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    folder.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(locks.tempfile, "mkstemp", read_only)
    code = cli.main(["distill", f"run.out_dir={folder}"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{folder}: the run folder (run.out_dir) cannot be written (Read-only file system)" in err
    assert "choose another run.out_dir" in err
    # a folder that does not exist yet is checked where it will be made
    with pytest.raises(NacdError, match=f"{tmp_path}: the run folder"):
        locks.check_writable(tmp_path / "new" / "deeper")


def test_the_error_log_never_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_run_log", tmp_path / "nacd.log")

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logging, "FileHandler", broken)
    cli.log_error("distill", NacdError("the real failure"))  # returns without a word


def _refused(run_dir, config_text, write_work):
    run_dir.root.mkdir(parents=True, exist_ok=True)
    with pytest.raises(NacdError, match="the real failure"), cli.config_kept_on_refusal(run_dir):
        run_dir.config_path.write_text(config_text, encoding="utf-8")
        if write_work:
            (run_dir.root / "distill").mkdir(exist_ok=True)
            (run_dir.root / "distill" / "history.jsonl").write_text('{"iteration": 1}\n', encoding="utf-8")
        raise NacdError("the real failure")


def test_a_refusal_puts_the_config_back_only_when_nothing_was_written(tmp_path, monkeypatch, caplog):
    run_dir = RunDir(tmp_path / "run")
    run_dir.root.mkdir()
    run_dir.config_path.write_text("old: 1\n", encoding="utf-8")
    _refused(run_dir, "new: 2\n", write_work=False)
    assert run_dir.config_path.read_text(encoding="utf-8") == "old: 1\n"
    _refused(run_dir, "new: 2\n", write_work=True)  # work was made with the new config: it describes the folder
    assert run_dir.config_path.read_text(encoding="utf-8") == "new: 2\n"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    run_dir.config_path.write_text("old: 1\n", encoding="utf-8")
    monkeypatch.setattr(artifacts, "atomic_write_bytes", full)
    with caplog.at_level(logging.WARNING):
        _refused(run_dir, "new: 3\n", write_work=False)  # the first error is the one raised
    assert "could not put the previous config back" in caplog.text


def test_stopped_commands_say_what_they_keep_and_log_the_message(tmp_path, monkeypatch, capsys):
    assert "resumes from its last checkpoint" in cli.stopped_message("distill")
    assert "keeps no checkpoint" in cli.stopped_message("eval") and "checkpoint" not in cli.resume_advice(
        "eval"
    ).replace("keeps no checkpoint", "")
    log_file = tmp_path / "nacd.log"
    monkeypatch.setattr(cli, "_run_log", log_file)

    def stop(args):
        raise cli.Stopped()

    monkeypatch.setattr(cli, "_dispatch", stop)
    assert cli.main(["eval"]) == 143
    assert "nacd eval: stopped (SIGTERM); nothing of it is kept" in capsys.readouterr().err
    text = log_file.read_text(encoding="utf-8")
    assert "nacd eval: stopped (SIGTERM)" in text and "Stopped()" not in text.split("traceback:")[0]


def _lock_file(root, name, pid, start=None):
    import socket

    path = root / ".locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"pid": pid, "host": socket.gethostname(), "started": "2026-12-03 10:00:00 UTC", "command": "nacd distill"}
    if start is not None:
        body["start"] = start
    path.write_text(json.dumps(body), encoding="utf-8")
    return path


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, shared_data, caplog, capsys):
    import subprocess
    import sys

    root = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _lock_file(root, "distill", holder.pid)
        busy = rf"distill: nacd distill is writing it now \(PID {holder.pid} on .*since"
        with pytest.raises(NacdError, match=busy), locks.folder_lock(root, root / "distill", "nacd distill"):
            pass
        assert lock.is_file()  # the holder's lock is left alone
        # through the command line: one line, nothing written
        code = cli.main(["select", f"run.out_dir={root}", f"data.root={shared_data}", "select.method=random"])
        assert code == 0  # another folder's lock (select) is free
        _lock_file(root, "select", holder.pid)
        code = cli.main(
            ["select", f"run.out_dir={root}", f"data.root={shared_data}", "select.method=random", "select.budget=0.5"]
        )
        err = capsys.readouterr().err
        assert code == 1 and f"PID {holder.pid}" in err and "Traceback" not in err
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over with a warning, and released after
    with caplog.at_level(logging.WARNING), locks.folder_lock(root, root / "distill", "nacd distill"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with locks.folder_lock(root, root / "distill", "nacd distill"):  # re-entrant in one process
            pass
        assert lock.is_file()
    assert "taking over a stale lock" in caplog.text and not lock.exists()
    # a reused PID (alive, but started at another time) is stale too
    _lock_file(root, "distill", os.getpid(), start="1")
    with locks.folder_lock(root, root / "distill", "nacd distill"):
        pass


def test_a_refused_stage_command_leaves_only_its_error_log(tmp_path, capsys):
    root = tmp_path / "never"
    assert cli.main(["distill", f"run.out_dir={root}"]) != 0  # no selection, no experts
    assert [p.name for p in root.iterdir()] == ["nacd.log"] and "no selection" in (root / "nacd.log").read_text()
