"""Who may write a run folder: a check that it can be written at all (:func:`check_writable`), and a lock
per artifact folder (:func:`folder_lock`, :func:`locked` for a stage's ``run``) so that two commands
never write one folder at once. The locks live in ``<run>/.locks/`` (docs/ARTIFACTS.md)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nacd.errors import NacdError

log = logging.getLogger(__name__)


def check_writable(folder: str | Path) -> None:
    """Refuse at once, in one line naming the folder, when ``folder`` (or the nearest folder above it that
    exists, where it will be made) cannot be written: a read-only mount, another user's folder. Tried by
    writing a file, since permission bits do not tell (root, ACLs, read-only mounts)."""
    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.is_dir() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    log_file = folder / "nacd.log"
    try:
        fd, name = tempfile.mkstemp(prefix=".nacd-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
        if log_file.exists():
            with open(log_file, "a", encoding="utf-8"):
                pass
    except OSError as exc:
        target = log_file if log_file.exists() and probe_dir == folder else probe_dir
        reason = exc.strerror or type(exc).__name__
        raise NacdError(
            f"{target}: the run folder (run.out_dir) cannot be written ({reason}); choose another run.out_dir, or copy the folder "
            "somewhere writable and point run.out_dir there, or fix its permissions"
        ) from None


LOCKS = ".locks"  # <run>/.locks/<artifact folder>.lock: who is writing that folder now
_held: dict[Path, int] = {}  # lock files this process holds, with how many nested holds


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID from its holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: Mapping[str, Any]) -> bool:
    """Whether the process that wrote a lock still runs (a lock of another host counts as alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid") or 0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    start = holder.get("start")
    return start is None or _process_start(pid) in (None, start)


@contextlib.contextmanager
def folder_lock(root: str | Path, folder: str | Path, what: str) -> Iterator[None]:
    """Hold the lock of one artifact ``folder`` of the run folder ``root`` while ``what`` writes it: a
    second process asking for it is refused, naming the holder's PID, host and start; a stale lock (its
    process gone, on this host) is taken over with a warning. Under a launcher only the main process
    (``RANK`` 0) takes it, so the processes of one job count as one holder. Re-entrant in one process."""
    if int(os.environ.get("RANK") or 0) != 0:
        yield
        return
    root, folder = Path(root), Path(folder)
    try:
        name = folder.resolve().relative_to(root.resolve()).as_posix().replace("/", "__")
    except ValueError:
        name = folder.name
    path = root / LOCKS / f"{name}.lock"
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": what}  # fmt: skip
    body = json.dumps(me).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text(encoding="utf-8") or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder and _alive(holder):
                raise NacdError(
                    f"{folder}: {holder.get('command', 'another nacd command')} is writing it now (PID "
                    f"{holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}); wait for it to "
                    f"finish, or stop it; if that process is gone, delete {path}"
                ) from None
            log.warning("%s: taking over a stale lock (%s)", path, holder or "unreadable")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        break
    else:
        raise NacdError(f"{path}: could not take the lock; delete it if no nacd command is running")
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        with contextlib.suppress(OSError):
            if path.read_bytes() == body:
                path.unlink()
        with contextlib.suppress(OSError):  # only when empty
            path.parent.rmdir()


def locked(command: str, folder_of: Any) -> Any:
    """Decorate the ``run(config, run_dir)`` of the stage ``nacd <command>`` to hold :func:`folder_lock` on
    the folder ``folder_of(config, run_dir)`` it writes. The stage module's cheap ``check(config)`` runs
    first, so settings refused outright leave no run folder behind."""
    import functools
    import sys

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def run(config: Any, run_dir: Any, *args: Any, **kwargs: Any) -> Any:
            check = getattr(sys.modules[fn.__module__], "check", None)
            if check is not None:
                check(config)
            folder = folder_of(config, run_dir)
            with folder_lock(run_dir.root, folder, f"nacd {command}"):
                return fn(config, run_dir, *args, **kwargs)

        return run

    return wrap
