"""Where an instruction source is and how its records are read (:mod:`nacd.data` turns them into
examples): local JSONL, JSON, CSV/TSV and parquet files (a glob: every matching file), a local
``datasets`` folder, a hub dataset (``hf:`` or ``owner/name``) or nacd's built-in demo data. Readers
yield ``(origin, record)`` with the origin as ``path:line`` (or ``path:row N``); a record they cannot
read is a :class:`BadRecord`, which the caller skips or raises, counted. Importing this module does
no work; ``datasets`` and ``pyarrow`` are imported where they are needed.
"""

from __future__ import annotations

import csv
import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nacd.config import SourceConfig
from nacd.errors import DataError

#: File extensions read by this module's readers; any other path is a folder or a dataset id.
FILE_EXTENSIONS = (".jsonl", ".json", ".tsv", ".csv", ".parquet")

#: Canonical field names; a CSV/TSV first row with one of these (or a renamed column) is a header.
CANONICAL_FIELDS = (
    "id",
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "response",
    "question",
    "answer",
    "rationale",
    "prompt",
    "completion",
)

#: Column names of a headerless 3-column TSV (the Flan CoT layout).
FLAN_COT_COLUMNS = ("question", "answer", "rationale")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class BadRecord(Exception):
    """A record-level problem found while reading or normalizing (becomes a Skip or a DataError)."""

    def __init__(self, field: str, reason: str, detail: str = ""):
        super().__init__(reason)
        self.field, self.reason, self.detail = field, reason, detail


# --------------------------------------------------------------------------- locating sources


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_file_path(path: str) -> bool:
    return path.lower().endswith(FILE_EXTENSIONS)


def source_name(src: SourceConfig) -> str:
    """``src.name``, or a default: a file's stem, a glob's folder name, a folder's or dataset id's last part."""
    if src.name:
        return src.name
    path = src.path.removeprefix("hf:").rstrip("/\\")
    if _is_file_path(path):
        return Path(path).parent.name if _has_glob(path) else Path(path).stem
    return Path(path).name or path


def _candidates(path: str, root: Path) -> list[Path]:
    """Where a path may be: as given (absolute, or relative to the CWD) first, then under ``root``."""
    p = Path(path).expanduser()
    return [p] if p.is_absolute() else [p, root / p]


def _resolve_files(path: str, root: Path, key: str) -> list[Path]:
    """The files of a local file source (a glob gives all matching files, sorted)."""
    candidates = _candidates(path, root)
    for cand in candidates:
        if _has_glob(str(cand)):
            matches = sorted(Path(m) for m in glob.glob(str(cand), recursive=True) if Path(m).is_file())
            if matches:
                return matches
        elif cand.is_file():
            return [cand]
    what = "no file matches" if _has_glob(path) else "file not found"
    looked = " or ".join(str(c) for c in candidates)
    raise DataError(f"{key}.path: {what}: {looked} (relative paths are resolved against data.root = {root})")


# --------------------------------------------------------------------------- readers


Records = Iterator[tuple[str, "dict[str, Any] | BadRecord"]]


def _read_jsonl(path: Path) -> Records:
    """``(path:line, record)`` per non-blank line; a line that is not a JSON object gives a BadRecord."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            origin = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield origin, BadRecord("", "not valid UTF-8", str(exc))
                continue
            if n == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield origin, BadRecord("", "malformed JSON", json_fault(exc, line))
                continue
            if isinstance(record, dict):
                yield origin, record
            else:
                yield origin, BadRecord("", "not a JSON object", f"got a JSON {type(record).__name__}")


def json_fault(exc: json.JSONDecodeError, line: str) -> str:
    """Where a JSONL line breaks, with the text there: the decoder's column is where it gave up (the
    start of a string it could not close), so the line's end and the text around it are shown too."""
    text = line.rstrip("\r\n")
    near = text[max(0, exc.pos - 25) : exc.pos + 25]
    where = f"{exc.msg} at column {exc.colno} (near {near!r})"
    if exc.msg.startswith("Unterminated string"):
        where += f"; the line ends at column {len(text)} before the string closes (a line break inside a string?)"
    return where


def _read_json(path: Path) -> Records:
    """``(path:row N, record)`` for a JSON array of records or an object ``{"data": [...]}`` (N from 0)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: malformed JSON: {exc.msg} at column {exc.colno} (the whole file is unusable)"
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        keys = f" with keys {', '.join(map(str, data))}" if isinstance(data, dict) else ""
        raise DataError(
            f"{path}: expected a JSON array of records or an object with a 'data' array, got a {type(data).__name__}{keys}"
        )
    for i, record in enumerate(data):
        origin = f"{path}:row {i}"
        if isinstance(record, dict):
            yield origin, record
        else:
            yield origin, BadRecord("", "not a JSON object", f"got a JSON {type(record).__name__}")


def _header(row: list[str], line: int, path: Path, src: SourceConfig, key: str, tsv: bool) -> tuple[list[str], bool]:
    """Column names of a CSV/TSV and whether ``row`` (the first) is a header row."""
    cells = [c.strip() for c in row]
    if src.columns:
        return list(src.columns), cells == list(src.columns)
    known = set(CANONICAL_FIELDS) | set(src.fields.values())
    if any(c in known for c in cells) and all(cells) and len(set(cells)) == len(cells):
        return cells, True
    if tsv and len(row) == len(FLAN_COT_COLUMNS):
        return list(FLAN_COT_COLUMNS), False
    kind = "TSV" if tsv else "CSV"
    raise DataError(
        f"{path}:{line}: the first row is not a header (no cell is a known field name: {', '.join(CANONICAL_FIELDS)}) "
        f"and a headerless {kind} with {len(row)} columns has no default layout: set {key}.columns "
        "(e.g. [instruction, input, output]) or add a header row"
    )


def _read_delimited(path: Path, src: SourceConfig, key: str) -> Records:
    """``(path:line, record)`` per row of a CSV (quoted cells) or TSV (no quoting; ``\\n`` -> newline)."""
    tsv = path.suffix.lower() == ".tsv"
    names: list[str] | None = None
    line = 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(
                fh, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
            )
            end = 0
            for row in reader:
                line, end = end + 1, reader.line_num
                if not any(c.strip() for c in row):
                    continue
                if tsv:
                    row = [c.replace("\\n", "\n") for c in row]
                if names is None:
                    names, is_header = _header(row, line, path, src, key, tsv)
                    if is_header:
                        continue
                origin = f"{path}:{line}"
                if len(row) != len(names):
                    detail = f"expected {len(names)} cells ({', '.join(names)}), got {len(row)}"
                    yield origin, BadRecord("", "wrong number of cells", detail)
                    continue
                yield origin, dict(zip(names, row, strict=True))
    except csv.Error as exc:
        raise DataError(f"{path}:{line + 1}: unreadable {'TSV' if tsv else 'CSV'}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (after line {line}): {exc}") from None


def _read_parquet(path: Path) -> Records:
    """``(path:row N, record)`` per row of a parquet file (N from 0), via pyarrow."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield f"{path}:row {row}", record
                row += 1
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: unreadable parquet file: {exc}") from None


def _read_datasets(target: str, label: str, src: SourceConfig, key: str) -> Records:
    """``(label[split]:row N, record)`` per row of ``datasets.load_dataset(target, name=subset, split=split)``."""
    import datasets

    try:
        dataset = datasets.load_dataset(target, name=src.subset, split=src.split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        raise DataError(
            f"{key}.path: datasets.load_dataset({target!r}, name={src.subset!r}, split={src.split!r}) failed: "
            f"{type(exc).__name__}: {exc} (offline? use a local .jsonl/.json/.csv/.tsv/.parquet file or folder)"
        ) from None
    for i, record in enumerate(dataset):
        yield f"{label}[{src.split}]:row {i}", record


def source_inputs(src: SourceConfig, root: Path, key: str) -> list[tuple[str, Records]]:
    """``(label, records)`` per input of one source: each file of a file path or glob, or the one
    ``datasets`` folder or hub dataset. ``key`` (e.g. ``data.sources.2``) names the source in errors."""
    path = src.path.strip()
    if path.startswith("builtin:"):
        from nacd.demo_data import builtin_path

        path = str(builtin_path(path))
    if path.startswith("hf:"):
        inputs = [(path, _read_datasets(path[3:], path, src, key))]
    elif _is_file_path(path):
        files = _resolve_files(path, root, key)
        inputs = [(str(f), _reader(f, src, key)) for f in files]
    else:
        folder = next((c for c in _candidates(path, root) if c.is_dir()), None)
        if folder is not None:
            inputs = [(str(folder), _read_datasets(str(folder), str(folder), src, key))]
        elif _HUB_ID.match(path):
            inputs = [(path, _read_datasets(path, path, src, key))]
        else:
            looked = " or ".join(str(c) for c in _candidates(path, root))
            raise DataError(
                f"{key}.path: {path!r} is not a file with a known extension ({', '.join(FILE_EXTENSIONS)}), "
                f"an existing folder ({looked}) or a hub dataset id (owner/name)"
            )
    return inputs


def _reader(path: Path, src: SourceConfig, key: str) -> Records:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, src, key)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        f"{key}.path: {path}: unsupported file type {suffix!r}; expected one of {', '.join(FILE_EXTENSIONS)}"
    )
