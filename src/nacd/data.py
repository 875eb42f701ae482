"""The instruction-data layer: load corpora and mix them (tokenizing them: :mod:`nacd.chat`).

Every stage reads its data through this module:

* :func:`load_source` reads one corpus (JSONL, JSON, CSV/TSV, parquet, a local ``datasets``
  folder or a hub dataset: located and read by :mod:`nacd.sources`) in one of five record formats (chat, instruction,
  multiple choice, qa, prompt/completion) and normalizes each record to a chat (:class:`Example`).
* :func:`load_corpus` loads every source of a :class:`~nacd.config.DataConfig`, applies the
  per-source caps (a seeded sample that keeps file order) and reports what it loaded and skipped.
* :func:`corpus_hash` names a corpus by its contents.

Bad input is reported with its file, line (or row) and field: a :class:`~nacd.errors.DataError`
when ``data.strict`` is on, otherwise a counted :class:`Skip` that is logged. Importing this module
does no work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacd.config import DataConfig, SourceConfig
from nacd.errors import DataError
from nacd.sources import BadRecord, Records, source_inputs, source_name

logger = logging.getLogger(__name__)

__all__ = [
    "Example",
    "Skip",
    "LoadReport",
    "source_name",
    "detect_format",
    "normalize_record",
    "sample_cap",
    "heldout_count",
    "split_heldout",
    "load_source",
    "load_corpus",
    "corpus_hash",
    "doc_messages",
]

#: Record formats, in the order auto-detection tries them.
FORMATS = ("chat", "instruction", "multiple_choice", "qa", "prompt_completion")

#: What auto-detection looks for (canonical field names; ``data.sources[].fields`` renames them).
FORMAT_KEYS = {
    "chat": "messages or conversations",
    "instruction": "instruction, output (or response)",
    "multiple_choice": "question, choices, answer (or answerKey)",
    "qa": "question, answer",
    "prompt_completion": "prompt, completion",
}

#: The field that holds the response, per format (named in errors about the response).
RESPONSE_FIELD = {
    "chat": "messages",
    "instruction": "output",
    "multiple_choice": "answer",
    "qa": "answer",
    "prompt_completion": "completion",
}

#: Role names accepted in chats (tulu/oasst1 ``role`` and ShareGPT ``from``) -> normalized role.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}

#: Skips logged one by one before only a summary is logged.
LOG_FIRST_SKIPS = 10


# --------------------------------------------------------------------------- records and reports


@dataclass(frozen=True)
class Example:
    """One normalized instruction example: a chat that ends with an assistant turn."""

    id: str
    """Stable id: ``<source>/<upstream id>`` or ``<source>/<sha1 of the messages, 12 hex>``; duplicates get ``-2``, ``-3``."""
    source: str
    """Name of the source it came from."""
    messages: tuple[dict[str, str], ...]
    """``{"role": "system" | "user" | "assistant", "content": str}`` turns; the last one is the assistant's."""
    origin: str
    """Where it came from: ``path:line`` (JSONL, CSV, TSV) or ``path:row N`` (JSON arrays, parquet, datasets)."""
    format: str = "chat"
    """Record format it was read in (chat, instruction, multiple_choice, qa, prompt_completion)."""


@dataclass
class Skip:
    """A bad record (or file) that was skipped in non-strict mode."""

    origin: str
    """``path:line``, ``path:row N`` or the path of a whole file."""
    field: str
    """The offending field (``output``, ``messages[3].role``, ...); empty when the record as a whole is bad."""
    reason: str
    """Short category, counted by :meth:`LoadReport.skip_counts` (``missing field``, ``malformed JSON``, ...)."""
    detail: str = ""
    """What exactly was wrong or expected."""

    def message(self) -> str:
        """``origin: field 'f': reason: detail``: what a person needs to find and fix the record."""
        where = f"{self.origin}: field '{self.field}'" if self.field else self.origin
        return f"{where}: {self.reason}" + (f": {self.detail}" if self.detail else "")


@dataclass
class LoadReport:
    """What :func:`load_corpus` loaded and skipped (and :func:`tokenize_corpus` skipped)."""

    loaded: dict[str, int] = field(default_factory=dict)
    """Examples per source after the caps."""
    available: dict[str, int] = field(default_factory=dict)
    """Valid examples per source before the caps."""
    skipped: list[Skip] = field(default_factory=list)
    """Every skipped record, in the order met."""
    heldout: dict[str, list[Example]] = field(default_factory=dict)
    """Per source, the examples held out of D_full (``data.heldout``; empty when 0)."""

    def add_skip(self, skip: Skip) -> None:
        """Record a skip; the first :data:`LOG_FIRST_SKIPS` are logged as warnings, later ones at debug level."""
        self.skipped.append(skip)
        if len(self.skipped) <= LOG_FIRST_SKIPS:
            logger.warning("skipped %s", skip.message())
        else:
            logger.debug("skipped %s", skip.message())

    def skip_counts(self) -> dict[str, int]:
        """Number of skips by reason, most frequent first."""
        return dict(Counter(s.reason for s in self.skipped).most_common())

    def log_skip_summary(self) -> None:
        """Warn once with the counts when more skips happened than were logged one by one."""
        if len(self.skipped) > LOG_FIRST_SKIPS:
            counts = ", ".join(f"{n} {reason}" for reason, n in self.skip_counts().items())
            logger.warning(
                "skipped %d records in all (%s); only the first %d were logged",
                len(self.skipped),
                counts,
                LOG_FIRST_SKIPS,
            )

    def summary(self) -> str:
        """Human-readable, multi-line: examples per source (loaded of available) and skips by reason."""
        total = sum(self.loaded.values())
        lines = [f"loaded {total} examples from {len(self.loaded)} source(s), skipped {len(self.skipped)} record(s)"]
        width = max((len(name) for name in self.loaded), default=0)
        for name, n in self.loaded.items():
            held = f" ({len(self.heldout[name])} held out)" if name in self.heldout else ""
            lines.append(f"  {name:<{width}}  {n} of {self.available.get(name, n)}{held}")
        if self.skipped:
            lines.append("  skipped: " + ", ".join(f"{n} {reason}" for reason, n in self.skip_counts().items()))
        return "\n".join(lines)


class ExampleError(DataError):
    """A per-example DataError of tokenization: skipped (not raised) by non-strict tokenize_corpus."""

    def __init__(self, skip: Skip):
        super().__init__(skip.message())
        self.skip = skip


def reject(report: LoadReport, strict: bool, skip: Skip) -> None:
    """Strict: raise a DataError for ``skip``; otherwise count and log it."""
    if strict:
        raise DataError(
            f"{skip.message()} (data.strict=true stops at the first bad record; false skips and counts them)"
        )
    report.add_skip(skip)


# --------------------------------------------------------------------------- formats


def _column(fields: dict[str, str], name: str) -> str:
    return fields.get(name, name)


def _has(record: dict[str, Any], fields: dict[str, str], name: str) -> bool:
    return _column(fields, name) in record


def detect_format(record: dict[str, Any], fields: dict[str, str] | None = None) -> str | None:
    """The format whose required fields ``record`` has (first of :data:`FORMATS`), or None.

    ``instruction`` wins over ``prompt_completion``: Dolly and S-NI rows carry a ``prompt`` too, and
    ``multiple_choice`` over ``qa``: a benchmark row's ``answer`` is an index or a letter, not the reply.
    """
    fields = fields or {}
    if _has(record, fields, "messages") or _has(record, fields, "conversations"):
        return "chat"
    if _has(record, fields, "instruction") and (_has(record, fields, "output") or _has(record, fields, "response")):
        return "instruction"
    if _has(record, fields, "question") and _has(record, fields, "choices"):
        return "multiple_choice"
    if _has(record, fields, "question") and _has(record, fields, "answer"):
        return "qa"
    if _has(record, fields, "prompt") and _has(record, fields, "completion"):
        return "prompt_completion"
    return None


def _string(
    record: dict[str, Any], fields: dict[str, str], name: str, *aliases: str, required: bool = True
) -> tuple[str, str]:
    """``(column, value)`` of canonical field ``name`` (or an alias when ``name`` is not renamed).

    An optional field that is absent or null gives ``(column, "")``.
    """
    names = (name,) if name in fields else (name, *aliases)
    for canonical in names:
        column = _column(fields, canonical)
        if column in record:
            value = record[column]
            if value is None and not required:
                return column, ""
            if not isinstance(value, str):
                raise BadRecord(column, "not a string", f"got {type(value).__name__} {str(value)[:40]!r}")
            return column, value
    if not required:
        return _column(fields, name), ""
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise BadRecord(_column(fields, name), "missing field", f"record keys: {keys}")


def _nonempty(column_value: tuple[str, str], what: str) -> str:
    column, value = column_value
    if not value.strip():
        raise BadRecord(column, f"empty {what}", f"the {what} is empty or whitespace")
    return value


def _chat_messages(record: dict[str, Any], fields: dict[str, str]) -> list[dict[str, str]]:
    """Turns of a ``messages`` (role/content) or ShareGPT ``conversations`` (from/value) list."""
    name = (
        "messages" if _has(record, fields, "messages") or not _has(record, fields, "conversations") else "conversations"
    )
    column = _column(fields, name)
    if column not in record:
        raise BadRecord(column, "missing field", f"record keys: {', '.join(sorted(map(str, record)))}")
    turns = record[column]
    if not isinstance(turns, list):
        raise BadRecord(column, "not a list", f"expected a list of turns, got {type(turns).__name__}")
    if not turns:
        raise BadRecord(column, "empty conversation", "the list of turns is empty")
    messages = []
    for j, turn in enumerate(turns):
        where = f"{column}[{j}]"
        if not isinstance(turn, dict):
            raise BadRecord(
                where, "not an object", f"expected {{role, content}} or {{from, value}}, got {type(turn).__name__}"
            )
        role_key = "role" if "role" in turn else "from"
        content_key = "content" if "content" in turn else "value"
        if role_key not in turn:
            raise BadRecord(f"{where}.role", "missing field", f"turn keys: {', '.join(sorted(map(str, turn)))}")
        if content_key not in turn:
            raise BadRecord(f"{where}.content", "missing field", f"turn keys: {', '.join(sorted(map(str, turn)))}")
        role, content = turn[role_key], turn[content_key]
        if not isinstance(role, str) or role.strip().lower() not in ROLE_ALIASES:
            raise BadRecord(
                f"{where}.{role_key}",
                "bad role",
                f"got {role!r}; expected user, assistant or system (or {', '.join(ROLE_ALIASES)})",
            )
        if not isinstance(content, str):
            raise BadRecord(f"{where}.{content_key}", "not a string", f"got {type(content).__name__}")
        role = ROLE_ALIASES[role.strip().lower()]
        if role == "assistant":
            _nonempty((f"{where}.{content_key}", content), "response")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise BadRecord(
            column,
            "no final assistant turn",
            f"the last turn is a {messages[-1]['role']} turn: there is no response to learn",
        )
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first != "user":
        raise BadRecord(
            column,
            "no user turn first",
            "the conversation (after any system turn) starts with an assistant turn: there is no instruction "
            "for the response, nor a turn a prompt can go in",
        )
    return messages


def doc_messages(doc: Any) -> list[dict[str, str]]:
    """A benchmark question (``nacd.questions.Doc``) as a chat: the text protocol's prompt, then the gold
    choice's text. Shared by the ``multiple_choice`` format and ``select.target``'s benchmark examples."""
    from nacd.questions import doc_to_choices, doc_to_text

    return [
        {"role": "user", "content": doc_to_text(doc, "text")},
        {"role": "assistant", "content": doc_to_choices(doc, "text")[doc.gold]},
    ]


def _multiple_choice_messages(record: dict[str, Any], fields: dict[str, str]) -> list[dict[str, str]]:
    """A benchmark-style question as a chat (:func:`doc_messages`).

    The rows of ``allenai/ai2_arc`` (``choices: {text, label}``, ``answerKey``) and of ``{question,
    choices, answer}`` files (answer: a 0-based index, a letter, a label or the choice text), as Flan's
    collection carries ARC, read exactly as the evaluation reads them (``nacd.questions.doc_from_record``).
    """
    from nacd.questions import FieldError, doc_from_record

    renamed = {
        canonical: record[_column(fields, canonical)]
        for canonical in ("question", "choices", "answer", "answerKey")
        if _column(fields, canonical) in record
    }
    try:
        doc = doc_from_record(renamed, "record", "-")
    except FieldError as err:
        raise BadRecord(_column(fields, err.field), "bad multiple-choice field", err.reason) from None
    return doc_messages(doc)


def normalize_record(record: dict[str, Any], fmt: str, fields: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The chat of one record in format ``fmt``; raises ``BadRecord`` (field, reason) for bad input."""
    fields = fields or {}
    if fmt == "chat":
        return _chat_messages(record, fields)
    if fmt == "instruction":
        instruction = _string(record, fields, "instruction")
        _, context = _string(record, fields, "input", required=False)
        output = _nonempty(_string(record, fields, "output", "response"), "response")
        user = f"{instruction[1]}\n\n{context}" if context.strip() else instruction[1]
        _nonempty((instruction[0], user), "prompt")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt == "multiple_choice":
        return _multiple_choice_messages(record, fields)
    if fmt == "qa":
        question = _nonempty(_string(record, fields, "question"), "prompt")
        answer = _nonempty(_string(record, fields, "answer"), "response")
        _, rationale = _string(record, fields, "rationale", required=False)
        reply = f"{rationale}\nSo the answer is: {answer}" if rationale.strip() else answer
        return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    if fmt == "prompt_completion":
        prompt = _nonempty(_string(record, fields, "prompt"), "prompt")
        completion = _nonempty(_string(record, fields, "completion"), "response")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _message_hash(messages: Iterable[dict[str, str]]) -> str:
    text = json.dumps(list(messages), ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _unique_id(base: str, seen: set[str]) -> str:
    uid, k = base, 2
    while uid in seen:
        uid, k = f"{base}-{k}", k + 1
    seen.add(uid)
    return uid


def _examples(
    records: Records, src: SourceConfig, name: str, key: str, strict: bool, report: LoadReport, seen: set[str]
) -> Iterator[Example]:
    """Normalize the records of one file (or dataset split); auto-detect the format on the first record."""
    fmt = None if src.format == "auto" else src.format
    for origin, record in records:
        if isinstance(record, BadRecord):
            reject(report, strict, Skip(origin, record.field, record.reason, record.detail))
            continue
        if fmt is None:
            fmt = detect_format(record, src.fields)
            if fmt is None:
                keys = ", ".join(sorted(map(str, record))) or "none"
                expected = "; ".join(f"{f} ({k})" for f, k in FORMAT_KEYS.items())
                raise DataError(
                    f"{origin}: unknown format: keys {keys}; expected one of: {expected}. "
                    f"Set {key}.format, or map columns with {key}.fields (e.g. {{output: response_text}})"
                )
            logger.debug("%s: %s records", origin.rsplit(":", 1)[0], fmt)
        try:
            messages = normalize_record(record, fmt, src.fields)
        except BadRecord as bad:
            reject(report, strict, Skip(origin, bad.field, bad.reason, bad.detail))
            continue
        upstream = record.get(_column(src.fields, "id"))
        if isinstance(upstream, (str, int)) and not isinstance(upstream, bool) and str(upstream).strip():
            base = f"{name}/{str(upstream).strip()}"
        else:
            base = f"{name}/{_message_hash(messages)}"
        yield Example(_unique_id(base, seen), name, tuple(messages), origin, fmt)


# --------------------------------------------------------------------------- loading


def load_source(
    src: SourceConfig, root: str | Path, strict: bool, report: LoadReport, *, key: str = "data.sources.?"
) -> list[Example]:
    """All valid examples of one source, in file order (files of a glob sorted by path).

    ``key`` (e.g. ``data.sources.2``) names the source in errors. Fills ``report.available`` and
    ``report.loaded`` (caps are applied by :func:`load_corpus`) and ``report.skipped``.
    """
    root = Path(root).expanduser()
    name = source_name(src)
    seen: set[str] = set()
    examples: list[Example] = []
    for label, records in source_inputs(src, root, key):
        before = len(examples)
        examples.extend(_examples(records, src, name, key, strict, report, seen))
        if len(examples) == before:
            reject(report, strict, Skip(label, "", "no examples", f"{key} ({name}): the file has no valid records"))
        else:
            logger.debug("%s: %d examples from %s", name, len(examples) - before, label)
    report.available[name] = len(examples)
    report.loaded[name] = len(examples)
    return examples


def sample_cap(examples: list[Example], cap: int | None, seed: int, name: str) -> list[Example]:
    """At most ``cap`` examples: a uniform sample seeded by ``seed`` and ``name``, kept in their original order."""
    if cap is None or cap >= len(examples):
        return list(examples)
    rng = random.Random(f"{seed}/{name}")
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), cap))]


def heldout_count(heldout: float, n: int) -> int:
    """How many of a source's ``n`` examples ``data.heldout`` holds out: a fraction (< 1, at least 1 when
    positive) or a count (>= 1), never all of them."""
    if heldout <= 0 or n <= 1:
        return 0
    count = max(1, round(heldout * n)) if heldout < 1 else int(heldout)
    return min(count, n - 1)


def split_heldout(examples: list[Example], heldout: float, seed: int, name: str) -> tuple[list[Example], list[Example]]:
    """``(held out, rest)`` of one source's examples: a uniform sample seeded by ``seed`` and ``name`` (apart
    from the caps' seeding), in file order. A record whose messages occur more than once in the source is
    never held out: nothing held out is ever loaded into D_full, by content as well as by id."""
    count = heldout_count(heldout, len(examples))
    if count == 0:
        return [], list(examples)
    copies = Counter(_message_hash(ex.messages) for ex in examples)
    unique = [i for i, ex in enumerate(examples) if copies[_message_hash(ex.messages)] == 1]
    rng = random.Random(f"heldout/{seed}/{name}")
    chosen = set(rng.sample(unique, min(count, len(unique))))
    held_out = [i in chosen for i in range(len(examples))]
    return (
        [ex for ex, h in zip(examples, held_out, strict=True) if h],
        [ex for ex, h in zip(examples, held_out, strict=True) if not h],
    )


def load_corpus(cfg: DataConfig) -> tuple[list[Example], LoadReport]:
    """Every source of ``cfg`` in order, each capped by its ``max_examples``; raises on an empty corpus.

    With ``cfg.heldout`` each source's held-out examples are drawn first (:func:`split_heldout`) and the
    cap samples the rest; they are in ``report.heldout``, never in the corpus."""
    report = LoadReport()
    names: dict[str, int] = {}
    for i, src in enumerate(cfg.sources):
        name = source_name(src)
        if name in names:
            raise DataError(
                f"data.sources.{i}.name: two sources are named {name!r} (data.sources.{names[name]} and "
                f"data.sources.{i}); give one a different name"
            )
        names[name] = i
    corpus: list[Example] = []
    for i, src in enumerate(cfg.sources):
        examples = load_source(src, cfg.root, cfg.strict, report, key=f"data.sources.{i}")
        held, examples = split_heldout(examples, cfg.heldout, cfg.seed, source_name(src))
        if cfg.heldout:
            report.heldout[source_name(src)] = held
        chosen = sample_cap(examples, src.max_examples, cfg.seed, source_name(src))
        report.loaded[source_name(src)] = len(chosen)
        corpus.extend(chosen)
    report.log_skip_summary()
    if not corpus:
        raise DataError(f"empty corpus: no examples were loaded from data.sources\n{report.summary()}")
    logger.info("%s", report.summary())
    return corpus, report


# --------------------------------------------------------------------------- descriptions


def corpus_hash(examples: Iterable[Example]) -> str:
    """sha256 (hex) over the ids and messages of ``examples``, in order."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.id, list(ex.messages)], ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
