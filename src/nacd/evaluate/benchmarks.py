"""Benchmarks as data, as in lm-evaluation-harness: :class:`Doc` (one multiple-choice question) and
:class:`Benchmark` (the questions of one split, their few-shot pool and default protocol), the built-in
benchmarks (ARC-Easy, ARC-Challenge, MMLU) and the loaders behind :func:`load_benchmark`: JSONL files of
``{question, choices, answer}`` records, folders of them or of Hendrycks' MMLU CSVs, and hub datasets."""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacd.errors import DataError
from nacd.questions import LETTERS, Doc, doc_from_record

log = logging.getLogger(__name__)

#: Descriptions put before the shots; ``{subject}`` is the subject with ``_`` read as spaces.
MMLU_LETTER_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"
MMLU_TEXT_DESCRIPTION = "The following are questions (with answers) about {subject}.\n\n"

#: Split names of the MMLU CSV layout (``val``) and the hub layout (``validation``).
_MMLU_DIR_SPLIT = {"validation": "val"}
_HUB_SPLIT = {"val": "validation"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


@dataclass
class Benchmark:
    """Questions of one split, their few-shot pool and how to prompt them."""

    name: str
    docs: list[Doc]
    source: str
    """Where the docs came from (file, folder or ``hub:owner/name``)."""
    split: str
    protocol: str = "text"
    """The default protocol: ``text`` or ``letter``."""
    default_fewshot: int = 0
    fewshot_pool: list[Doc] = field(default_factory=list)
    """Few-shot examples (ARC: train, MMLU: dev), taken first-n per subject."""
    fewshot_source: str | None = None
    per_subject_limit: bool = False
    """``limit`` counts per subject (MMLU, as lm-eval's per-subject tasks) instead of in all."""
    descriptions: dict[str, str] = field(default_factory=dict)
    """Protocol -> text put before the shots (``{subject}`` is filled in)."""


@dataclass(frozen=True)
class _Builtin:
    folder: str  # under data.root
    hub_id: str
    hub_config: str
    layout: str  # jsonl | mmlu
    fewshot_split: str
    protocol: str
    default_fewshot: int


BUILTINS: dict[str, _Builtin] = {
    "arc_easy": _Builtin("eval/arc_easy", "allenai/ai2_arc", "ARC-Easy", "jsonl", "train", "text", 0),
    "arc_challenge": _Builtin("eval/arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "jsonl", "train", "text", 0),
    "mmlu": _Builtin("eval/mmlu", "cais/mmlu", "all", "mmlu", "dev", "letter", 5),
}


def _read_jsonl_records(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: malformed JSON: {exc.msg} at column {exc.colno}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got a {type(record).__name__}")
            yield f"{path}:{n}", n, record


def load_jsonl_docs(path: str | Path) -> list[Doc]:
    """Docs of a JSONL file of ``{question, choices, answer}`` (or ai2_arc / cais/mmlu) records."""
    path = Path(path)
    docs = [doc_from_record(rec, where, f"{path.stem}/{n}") for where, n, rec in _read_jsonl_records(path)]
    if not docs:
        raise DataError(f"{path}: no questions in the file")
    return _unique_ids(docs)


def _unique_ids(docs: list[Doc]) -> list[Doc]:
    seen: dict[str, int] = {}
    out = []
    for doc in docs:
        k = seen.get(doc.id, 0)
        seen[doc.id] = k + 1
        out.append(doc if k == 0 else Doc(f"{doc.id}-{k + 1}", doc.question, doc.choices, doc.gold, doc.subject))
    return out


def _mmlu_split_dir(folder: Path, split: str) -> Path | None:
    for name in (split, _MMLU_DIR_SPLIT.get(split, split)):
        if (folder / name).is_dir() and any((folder / name).glob("*.csv")):
            return folder / name
    return None


def load_mmlu_csv(folder: str | Path, split: str) -> list[Doc]:
    """Docs of the Hendrycks MMLU layout: ``folder/<split>/<subject>_<split>.csv``, headerless
    ``question,A,B,C,D,answer`` (fields may hold newlines); subjects in file-name order."""
    folder = Path(folder)
    split_dir = _mmlu_split_dir(folder, split)
    if split_dir is None:
        raise DataError(f"{folder}: no {split}/ (or {_MMLU_DIR_SPLIT.get(split, split)}/) folder of MMLU CSV files")
    docs: list[Doc] = []
    for path in sorted(split_dir.glob("*.csv")):
        subject = re.sub(rf"_({re.escape(split_dir.name)})$", "", path.stem)
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            for i, row in enumerate(reader):
                where = f"{path}:{reader.line_num}"
                if len(row) != 6:
                    raise DataError(f"{where}: expected 6 cells (question, A, B, C, D, answer), got {len(row)}")
                record = {"question": row[0].strip(), "choices": row[1:5], "answer": row[5].strip()}
                if record["answer"] not in LETTERS[:4]:
                    raise DataError(f"{where}: field 'answer': expected A, B, C or D, got {row[5]!r}")
                docs.append(doc_from_record(record, where, f"{subject}/{split_dir.name}/{i}", subject))
    if not docs:
        raise DataError(f"{split_dir}: no questions in the CSV files")
    return docs


def _load_datasets(target: str, config: str | None, split: str, what: str) -> list[dict[str, Any]]:
    """Rows of ``datasets.load_dataset(target, config, split=split)``, with a clear error when it fails."""
    import datasets

    try:
        ds = datasets.load_dataset(target, config, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        raise DataError(
            f"{what}: datasets.load_dataset({target!r}, {config!r}, split={split!r}) failed: {type(exc).__name__}: "
            f"{exc} (offline or a wrong name? Give a local .jsonl file or folder instead; see docs/EVAL.md)"
        ) from None
    return [dict(row) for row in ds]


def _docs_from_rows(rows: list[dict[str, Any]], label: str, strip: bool) -> list[Doc]:
    docs = []
    for i, row in enumerate(rows):
        doc = doc_from_record(row, f"{label}:row {i}", f"{label.rsplit('/', 1)[-1]}/{i}")
        if strip:
            doc = Doc(doc.id, doc.question.strip(), doc.choices, doc.gold, doc.subject)
        docs.append(doc)
    if not docs:
        raise DataError(f"{label}: no questions")
    return _unique_ids(docs)


def _is_mmlu_rows(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and "subject" in rows[0] and isinstance(rows[0].get("answer"), int)


def _sort_by_subject(docs: list[Doc]) -> list[Doc]:
    return sorted(docs, key=lambda d: d.subject)  # stable: file order within a subject


def _hub_benchmark(
    name: str, hub_id: str, config: str | None, split: str, fewshot_split: str | None, mmlu: bool | None
) -> Benchmark:
    label = f"hub:{hub_id}" + (f":{config}" if config else "")
    rows = _load_datasets(hub_id, config, _HUB_SPLIT.get(split, split), f"benchmark {name!r}")
    is_mmlu = _is_mmlu_rows(rows) if mmlu is None else mmlu
    docs = _docs_from_rows(rows, f"{label}[{split}]", strip=is_mmlu)
    pool: list[Doc] = []
    if fewshot_split:
        rows = _load_datasets(hub_id, config, _HUB_SPLIT.get(fewshot_split, fewshot_split), f"benchmark {name!r}")
        pool = _docs_from_rows(rows, f"{label}[{fewshot_split}]", strip=is_mmlu)
    if is_mmlu:
        return _mmlu_benchmark(name, _sort_by_subject(docs), label, split, _sort_by_subject(pool), fewshot_split)
    return Benchmark(name, docs, label, split, "text", 0, pool, f"{label}[{fewshot_split}]" if pool else None)


def _mmlu_benchmark(
    name: str, docs: list[Doc], source: str, split: str, pool: list[Doc], pool_source: str | None
) -> Benchmark:
    return Benchmark(
        name,
        docs,
        source,
        split,
        protocol="letter",
        default_fewshot=5,
        fewshot_pool=pool,
        fewshot_source=pool_source,
        per_subject_limit=True,
        descriptions={"letter": MMLU_LETTER_DESCRIPTION, "text": MMLU_TEXT_DESCRIPTION},
    )


def _folder_benchmark(name: str, folder: Path, split: str, fewshot_split: str | None, protocol: str) -> Benchmark:
    """A folder of ``<split>.jsonl`` files (few-shot pool: ``fewshot_split``, else dev or train) or of MMLU CSVs."""
    if _mmlu_split_dir(folder, split) is not None:
        pool_split = fewshot_split or "dev"
        pool = load_mmlu_csv(folder, pool_split) if _mmlu_split_dir(folder, pool_split) else []
        return _mmlu_benchmark(name, load_mmlu_csv(folder, split), str(folder), split, pool, str(folder / pool_split))
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(
            f"benchmark {name!r}: {folder} has no {split}.jsonl and no {split}/ folder of MMLU CSV files "
            f"(eval.split={split!r})"
        )
    docs = load_jsonl_docs(path)
    candidates = [fewshot_split] if fewshot_split else ["dev", "train"]
    pool_path = next(
        (folder / f"{s}.jsonl" for s in candidates if s != split and (folder / f"{s}.jsonl").is_file()), None
    )
    pool = load_jsonl_docs(pool_path) if pool_path else []
    return Benchmark(name, docs, str(path), split, protocol, 0, pool, str(pool_path) if pool_path else None)


def load_benchmark(name_or_path: str, split: str = "validation", data_root: str | Path = ".") -> Benchmark:
    """A benchmark by name or place.

    * ``arc_easy``, ``arc_challenge``, ``mmlu``: files under ``data_root`` (``eval/arc_easy/<split>.jsonl``,
      ``eval/mmlu/<val|dev|test>/*.csv``), else the hub (``allenai/ai2_arc``, ``cais/mmlu``);
    * a ``.jsonl`` file of ``{question, choices, answer}`` records (zero-shot, no few-shot pool);
    * a folder of ``<split>.jsonl`` files (few-shot pool: ``dev.jsonl`` or ``train.jsonl``) or of MMLU CSVs;
    * a hub dataset id ``owner/name`` or ``owner/name:config`` (``cais/mmlu``-style rows become MMLU).

    Relative paths are tried as given, then under ``data_root``.
    """
    spec = name_or_path.strip()
    root = Path(data_root).expanduser()
    if spec.startswith("builtin:"):
        from nacd.demo_data import builtin_path

        found = builtin_path(spec)
        name = spec.rstrip("/").rsplit("/", 1)[-1].removesuffix(".jsonl")
        if found.is_dir():
            return _folder_benchmark(f"demo_{name}", found, split, "train", "text")
        return Benchmark(f"demo_{name}", load_jsonl_docs(found), str(found), split, "text", 0)
    if spec in BUILTINS:
        b = BUILTINS[spec]
        folder = root / b.folder
        has_split = (folder / f"{split}.jsonl").is_file() or _mmlu_split_dir(folder, split) is not None
        if folder.is_dir() and has_split:
            bench = _folder_benchmark(spec, folder, split, b.fewshot_split, b.protocol)
        else:
            log.info("benchmark %s: no %s files under %s; trying the hub (%s)", spec, split, folder, b.hub_id)
            bench = _hub_benchmark(spec, b.hub_id, b.hub_config, split, b.fewshot_split, b.layout == "mmlu")
        bench.protocol, bench.default_fewshot = b.protocol, b.default_fewshot
        return bench
    path = Path(spec).expanduser()
    candidates = [path] if path.is_absolute() else [path, root / path]
    found = next((c for c in candidates if c.exists()), None)
    name = _bench_name(spec)
    if found is not None and found.is_dir():
        return _folder_benchmark(name, found, split, None, "text")
    if found is not None:
        if found.suffix.lower() != ".jsonl":
            raise DataError(f"benchmark {spec!r}: a file that is not .jsonl; give a .jsonl file of questions")
        return Benchmark(name, load_jsonl_docs(found), str(found), split, "text", 0)
    if spec.lower().endswith(".jsonl") or "/" not in spec or not _HUB_ID.match(spec):
        looked = " or ".join(str(c) for c in candidates)
        raise DataError(
            f"benchmark {spec!r}: not a built-in ({', '.join(BUILTINS)}), an existing .jsonl file or folder "
            f"({looked}), nor a hub dataset id owner/name[:config]"
        )
    hub_id, _, config = spec.partition(":")
    return _hub_benchmark(name, hub_id, config or None, split, None, None)


def _bench_name(spec: str) -> str:
    spec = spec.rstrip("/\\")
    if _HUB_ID.match(spec) and not Path(spec).exists():
        return re.sub(r"[^\w.+-]", "_", spec)
    return Path(spec).stem or "benchmark"
