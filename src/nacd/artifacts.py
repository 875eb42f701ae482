"""Run folders and self-describing artifacts.

Every path of a run folder is built here (:class:`RunDir`), every file is
written atomically (temporary name in the same folder, fsync, rename), and
every artifact folder carries a JSON manifest with a schema version beside its
safetensors tensors. No pickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacd.errors import NacdError, io_error

MANIFEST_SCHEMA_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


MANIFEST_NAME = "manifest.json"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise io_error(exc, path, "write") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # a full disk, no permission: one line naming the file
            raise io_error(exc, path, "write") from exc
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_save_safetensors(
    tensors: Mapping[str, Any], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """safetensors file written atomically; ``metadata`` values must be strings."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(tensors, metadata=dict(metadata or {})))


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """nacd's cache folder: ``cache_dir``, else ``$NACD_CACHE``, else ``~/.cache/nacd`` (converted models,
    generated data)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("NACD_CACHE") or Path.home() / ".cache" / "nacd").expanduser()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place only if the block succeeds.

    An existing folder is renamed aside (``.<name>.old``) before the new one is renamed in and only then
    deleted, so a process killed at any moment leaves one whole version: the new one, or the previous one
    in place or aside, which :func:`recover_dir` (called here and by every reader of a checkpoint) puts
    back. Deleting the previous folder in place first, file by file, would leave a half folder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise io_error(exc, path, "write") from exc
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        aside = _aside(path)
        if path.exists():
            shutil.rmtree(aside, ignore_errors=True)  # left by a kill after an earlier swap: stale
            os.replace(path, aside)
        os.replace(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise io_error(exc, path, "write") from exc
        raise


def remove_dir(path: str | Path) -> None:
    """Delete a folder (a finished stage's checkpoint) so that a kill at any moment leaves it whole or gone,
    never a half folder a rerun would read: it is renamed to a hidden removal name first, then deleted
    (a removal a kill interrupted is finished by the next :func:`remove_dir` of the same folder)."""
    path = Path(path)
    gone = path.with_name(f".{path.name}.removed")
    shutil.rmtree(gone, ignore_errors=True)
    for victim in (_aside(path), path):  # a previous version a killed atomic_dir left aside goes first
        if victim.exists():
            try:
                os.replace(victim, gone)
            except FileNotFoundError:  # another process of the same launch removed it first
                continue
            shutil.rmtree(gone, ignore_errors=True)


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_dir(path: str | Path) -> Path:
    """``path``, with the previous version put back where :func:`atomic_dir` was killed between its two
    renames (the folder missing, its previous version aside)."""
    path = Path(path)
    aside = _aside(path)
    if not path.exists() and aside.is_dir():
        os.replace(aside, path)
    return path


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of dict key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- integrity


def file_record(path: str | Path) -> dict[str, Any]:
    """What a manifest records of a file it stands for: its size in bytes and its sha256."""
    path = Path(path)
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def entry_record(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The size and sha256 a manifest entry (a snapshot's) carries beside its other fields; None in
    manifests written before nacd recorded files."""
    return {"size": entry["size"], "sha256": entry["sha256"]} if "size" in entry else None


def record_files(folder: str | Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: file_record}`` for the files ``names`` of ``folder`` (a manifest's ``files`` field)."""
    return {name: file_record(Path(folder) / name) for name in names}


def _damaged(path: Path, what: str, fix: str) -> Exception:
    return NacdError(f"{path}: {what}; {fix}" if fix else f"{path}: {what}")


def verify_file(path: str | Path, record: Mapping[str, Any] | None, fix: str, *, deep: bool = False) -> None:
    """Stop with a message naming ``path``, what is wrong and ``fix`` (how to rebuild it) when the file
    is missing, or differs in size (always checked: cheap) or in sha256 (``deep``) from ``record``.
    ``record`` None (a manifest written before nacd recorded files) checks only that the file exists."""
    path = Path(path)
    if not path.is_file():
        raise _damaged(path, "missing", fix)
    if record is None:
        return
    size = path.stat().st_size
    if size != record["size"]:
        raise _damaged(path, f"{size} bytes, its manifest recorded {record['size']} (truncated or replaced)", fix)
    if deep and sha256_file(path) != record["sha256"]:
        raise _damaged(path, "its sha256 differs from its manifest's (damaged or replaced)", fix)


def verify_files(
    folder: str | Path, files: Mapping[str, Mapping[str, Any]] | None, fix: str, *, deep: bool = False
) -> None:
    """:func:`verify_file` for every file of a manifest's ``files`` field."""
    for name, record in (files or {}).items():
        verify_file(Path(folder) / name, record, fix, deep=deep)


def read_verified(path: str | Path, record: Mapping[str, Any] | None = None, fix: str = "") -> bytes:
    """The bytes of ``path``, checked against ``record`` (size and sha256: the file is read anyway)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _damaged(path, "missing", fix) from None
    except OSError as exc:
        raise _damaged(path, f"cannot be read ({exc.strerror or exc})", fix) from None
    if record is not None:
        if len(data) != record["size"]:
            raise _damaged(
                path, f"{len(data)} bytes, its manifest recorded {record['size']} (truncated or replaced)", fix
            )
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise _damaged(path, "its sha256 differs from its manifest's (damaged or replaced)", fix)
    return data


def load_tensors(
    path: str | Path, record: Mapping[str, Any] | None = None, fix: str = "", device: Any = None
) -> dict[str, Any]:
    """A safetensors file's tensors, read once, checked against ``record`` and parsed; any fault (missing,
    truncated, not safetensors, another sha256) is a :class:`~nacd.errors.NacdError` naming the file."""
    from safetensors.torch import load

    data = read_verified(path, record, fix)
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for a damaged header or body
        raise _damaged(Path(path), f"not a readable safetensors file ({exc})", fix) from None
    bad = nonfinite(tensors)
    if bad is not None:
        raise _damaged(Path(path), f"tensor {bad[0]!r} holds {bad[1]} non-finite value(s) (NaN or Inf)", fix)
    if device is not None and str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def nonfinite(tensors: Mapping[str, Any]) -> tuple[str, int] | None:
    """(name, count) of the first floating-point tensor holding NaN or Inf, or None."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                return name, count
    return None


def read_checkpoint_body(folder: Path, fix: str, state_type: type, key: str) -> dict[str, Any]:
    """A checkpoint folder's ``state.json``: valid JSON whose ``state`` builds a ``state_type`` and which holds
    ``key`` (the optimizers' JSON part); otherwise an error naming the file, the fault and ``fix``."""
    from nacd.errors import NacdError

    try:
        body = json.loads(read_verified(folder / "state.json", None, fix).decode("utf-8"))
        state_type(**body["state"])
        body[key]  # noqa: B018 (checked here, used by the caller)
    except (ValueError, KeyError, TypeError) as exc:
        raise NacdError(f"{folder / 'state.json'}: {type(exc).__name__}: {exc}; {fix}") from None
    return body


# --------------------------------------------------------------------------- manifests


def write_manifest(folder: str | Path, kind: str, **fields: Any) -> Path:
    """``folder/manifest.json`` with the artifact kind, schema version and producing nacd version."""
    from nacd import __version__

    body = {
        "kind": kind,
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "nacd_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fields,
    }
    return atomic_write_json(Path(folder) / MANIFEST_NAME, body)


def read_manifest(folder: str | Path, kind: str | None = None) -> dict[str, Any] | None:
    """The manifest of ``folder`` or None if it has none; a wrong kind or schema is an error."""
    from nacd.errors import NacdError

    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NacdError(f"{path}: not valid JSON ({exc}); delete the folder to rebuild it") from None
    if kind is not None and body.get("kind") != kind:
        raise NacdError(f"{path}: field 'kind' is {body.get('kind')!r}, expected {kind!r}")
    if body.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise NacdError(
            f"{path}: field 'schema_version' is {body.get('schema_version')!r}, this nacd reads {MANIFEST_SCHEMA_VERSION}"
        )
    return body


# --------------------------------------------------------------------------- metrics


class MetricsWriter:
    """Append-only JSONL (one object per line): each append writes a whole line or nothing (written with one
    ``O_APPEND`` write, fsynced; a failed write, a full disk, is cut back to the previous size), and a torn
    last line that a killed process left is trimmed, with a warning, before the first append."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._checked = False

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        if not self._checked:
            repair_jsonl(self.path)
            self._checked = True
        append_line(self.path, json.dumps(record, default=float) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append ``line`` (ending in a newline) whole or not at all; raise :func:`io_error`'s message."""
    data = line.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise io_error(exc, path, "append to") from exc
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # no part of the line stays behind
            raise io_error(exc, path, "append to") from exc
    finally:
        os.close(fd)


def repair_jsonl(path: str | Path) -> int:
    """Trim a torn last line (no newline at its end: a process killed inside an append) from ``path``, with
    a warning naming the file and the bytes cut; returns the bytes cut (0 when whole or absent)."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        start = max(0, size - (1 << 20))
        fh.seek(start)
        tail = fh.read()
    cut = len(tail) - (tail.rfind(b"\n") + 1) if b"\n" in tail else size
    try:
        with open(path, "r+b") as fh:
            fh.truncate(size - cut)
    except OSError as exc:
        raise io_error(exc, path, "trim the torn last line of") from exc
    log.warning("%s: trimmed a torn last line (%d bytes, from an append that was cut off)", path, cut)
    return cut


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; a line that is not JSON is refused naming the file and the line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                torn = "" if line.endswith("\n") else " (a torn last line: rerunning the stage trims it)"
                raise NacdError(f"{path}: line {number} is not valid JSON ({exc.msg}){torn}") from None
    return rows


def trim_jsonl(path: str | Path, last: int, key: str = "iteration") -> None:
    """Keep the rows of ``path`` whose ``key`` is at most ``last`` (a resume redoes what came after its
    checkpoint, so the rows it would duplicate go), a torn last line trimmed first; nothing to do if
    there is no file."""
    path = Path(path)
    if not path.is_file():
        return
    repair_jsonl(path)
    rows = read_jsonl(path)
    kept = [r for r in rows if r.get(key, 0) <= last]
    if len(kept) != len(rows):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


# --------------------------------------------------------------------------- run folder


@dataclass(frozen=True)
class RunDir:
    """All paths of one run folder. Constructing it touches nothing on disk; :meth:`init` does."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.root / "nacd.log"

    @property
    def smoke_path(self) -> Path:
        return self.root / "smoke.json"

    @property
    def select_dir(self) -> Path:
        return self.root / "select"

    @property
    def experts_dir(self) -> Path:
        return self.root / "experts"

    def expert_run_dir(self, index: int) -> Path:
        return self.experts_dir / f"run_{index:03d}"

    @property
    def distill_dir(self) -> Path:
        return self.root / "distill"

    def finetune_dir(self, variant: str) -> Path:
        return self.root / "finetune" / variant

    def eval_dir(self, variant: str) -> Path:
        return self.root / "eval" / variant

    def init(self, config: Any) -> RunDir:
        """Create the folder and save the resolved config; an earlier different config is kept aside."""
        from nacd.configlib import dump_yaml

        self.root.mkdir(parents=True, exist_ok=True)
        text = dump_yaml(config)
        if self.config_path.is_file() and self.config_path.read_text(encoding="utf-8") != text:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            backup = self.root / f"config.{stamp}.yaml"
            os.replace(self.config_path, backup)
            log.warning(
                "%s: the config changed since the last run; the old one is kept as %s", self.config_path, backup.name
            )
        atomic_write_text(self.config_path, text)
        return self


def log_formatter() -> logging.Formatter:
    """The format of nacd's console and ``nacd.log`` lines."""
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


class _Console(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written (not the one it was made with:
    a library caller, or pytest, may have swapped and closed that one since)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str = "INFO", log_file: str | Path | None = None) -> None:
    """Console logging (and a log file in the run folder when given); safe to call twice."""
    root = logging.getLogger()
    root.setLevel(level)
    fmt = log_formatter()
    if not any(getattr(h, "_nacd", False) for h in root.handlers):
        console = _Console()
        console.setFormatter(fmt)
        console._nacd = True  # type: ignore[attr-defined]
        root.addHandler(console)
    if log_file is not None:
        log_file = str(Path(log_file).resolve())
        if not any(getattr(h, "baseFilename", None) == log_file for h in root.handlers):
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file, encoding="utf-8")
            fh.setFormatter(fmt)
            root.addHandler(fh)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def read_matching_manifest(
    folder: str | Path, kind: str, identity: Mapping[str, Any], hint: str
) -> dict[str, Any] | None:
    """The manifest of an artifact folder (None if it has none), after checking that it was made
    with ``identity``: the caller then skips it when ``complete`` or resumes it otherwise."""
    existing = read_manifest(folder, kind)
    if existing is not None:
        check_identity(folder, existing, identity, hint)
    return existing


def check_identity(folder: str | Path, existing: Mapping[str, Any], identity: Mapping[str, Any], hint: str) -> None:
    """Refuse to resume or reuse an artifact folder whose manifest was made with other settings.

    ``identity`` holds the fields that must agree (base model, LoRA config, data hash, ...); the
    error names the manifest, the first differing field, both values, and ``hint`` (what to do).
    """
    from nacd.errors import NacdError

    for key, value in identity.items():
        if existing.get(key) != value:
            where, then, now = first_difference(existing.get(key), value, key)
            raise NacdError(
                f"{Path(folder) / MANIFEST_NAME}: field '{where}' was {short_repr(then)} when this was made, "
                f"now {short_repr(now)}; {hint}"
            )


def stale_upstream(existing: Mapping[str, Any], identity: Mapping[str, Any], upstream: Sequence[str]) -> str | None:
    """The first difference in an ``upstream`` field (one that another stage's output decides, such as the
    selected ids: ``ids[3] was ..., now ...``) when every other field of ``identity`` agrees with
    ``existing``: the artifact is stale and is made again. None when nothing upstream changed, or when a
    setting changed too (then :func:`check_identity` refuses)."""
    if any(existing.get(k) != v for k, v in identity.items() if k not in upstream):
        return None
    for key in upstream:
        if key in identity and existing.get(key) != identity[key]:
            where, then, now = first_difference(existing.get(key), identity[key], key)
            return f"{where} was {short_repr(then)}, now {short_repr(now)}"
    return None


def remove_if_stale(
    folder: Path,
    existing: Mapping[str, Any],
    identity: Mapping[str, Any],
    upstream: Sequence[str],
    ranks: Any,
    what: str,
) -> bool:
    """Remove ``folder`` when :func:`stale_upstream` finds only an ``upstream`` field changed (logged as
    ``what: folder is stale (...)``): the main process removes it, every process waits; True when removed."""
    changed = stale_upstream(existing, identity, upstream)
    if changed is None:
        return False
    log.warning("%s: %s is stale, what it was made from changed (%s); making it again", what, folder, changed)
    if ranks.is_main:
        remove_dir(folder)
    ranks.barrier()
    return True


_ABSENT = "<absent>"


def first_difference(then: Any, now: Any, path: str) -> tuple[str, Any, Any]:
    """The dotted path of the first leaf where two JSON-like values differ, and both leaves there
    (``lora.r``, 4, 8 rather than two whole dicts)."""
    if isinstance(then, Mapping) and isinstance(now, Mapping):
        for key in [*now, *(k for k in then if k not in now)]:
            a, b = then.get(key, _ABSENT), now.get(key, _ABSENT)
            if a != b:
                return first_difference(a, b, f"{path}.{key}")
    return path, then, now


def short_repr(value: Any, width: int = 160) -> str:
    text = value if value is _ABSENT else repr(value)
    return text if len(text) <= width else f"{text[: width - 20]}... ({len(text)} characters)"
