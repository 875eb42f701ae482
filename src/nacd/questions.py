"""A benchmark question as data, below both the data layer and the evaluation: :class:`Doc` (one
multiple-choice question), :func:`doc_from_record` (a ``{question, choices, answer}``, ``ai2_arc`` or
``cais/mmlu`` record as a Doc, with :class:`FieldError` naming a bad field) and how the evaluation's
protocols prompt it (:func:`doc_to_text`, :func:`doc_to_choices`). :mod:`nacd.data` reads benchmark rows as
instruction data through it (the ``multiple_choice`` format) and :mod:`nacd.evaluate` scores them: both
read a question the same way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nacd.errors import DataError, NacdError

#: Answer letters of the letter protocol (and of generic ``answer: "C"`` records).
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Doc:
    """One multiple-choice question."""

    id: str
    question: str
    choices: tuple[str, ...]
    gold: int
    """Index of the correct choice."""
    subject: str = ""


class FieldError(DataError):
    """A bad field of one benchmark record; ``field`` and ``reason`` are kept apart for callers that report them
    separately (the ``multiple_choice`` record format of :mod:`nacd.data`)."""

    def __init__(self, where: str, field: str, reason: str):
        super().__init__(f"{where}: field '{field}': {reason}")
        self.field, self.reason = field, reason


def _answer_index(value: Any, choices: Sequence[str], labels: Sequence[str] | None, where: str, key: str) -> int:
    """The gold index of an answer given as an index, a label, a letter or the choice text."""
    n = len(choices)
    if isinstance(value, bool) or value is None:
        raise FieldError(where, key, f"expected an index, a label or the answer text, got {value!r}")
    if isinstance(value, int):
        if 0 <= value < n:
            return value
        raise FieldError(where, key, f"index {value} is out of range for {n} choices (0-based)")
    if not isinstance(value, str):
        raise FieldError(where, key, f"expected an int or a string, got {type(value).__name__}")
    text = value.strip()
    if labels is not None:
        if text in labels:
            return list(labels).index(text)
        raise FieldError(where, key, f"{value!r} is not one of the choice labels {list(labels)}")
    if choices.count(value) == 1:
        return choices.index(value)
    if len(text) == 1 and text.upper() in LETTERS[:n]:
        return LETTERS.index(text.upper())
    raise FieldError(
        where, key, f"{value!r} is neither a letter A-{LETTERS[n - 1]}, a 0-based int index nor the text of one choice"
    )


def doc_from_record(record: dict[str, Any], where: str, default_id: str, subject: str = "") -> Doc:
    """A :class:`Doc` from a record: ``{question, choices, answer}`` (choices a list, answer an index,
    letter or text), HF ``ai2_arc`` (``choices: {text, label}``, ``answerKey``) or HF ``cais/mmlu``
    (``subject``, ``answer`` index). ``where`` names the record in errors."""
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        keys = ", ".join(sorted(map(str, record)))
        raise FieldError(where, "question", f"missing or not a non-empty string (record keys: {keys})")
    raw = record.get("choices")
    labels: list[str] | None = None
    if isinstance(raw, dict):  # ai2_arc: {"text": [...], "label": [...]}
        texts, labels = raw.get("text"), raw.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise FieldError(where, "choices", "expected {text: [...], label: [...]} of equal length")
        labels = [str(label).strip() for label in labels]
        raw = texts
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(c, str) for c in raw):
        raise FieldError(where, "choices", f"expected a list of at least 2 strings, got {raw!r:.80}")
    choices = tuple(raw)
    key = "answerKey" if "answerKey" in record and "answer" not in record else "answer"
    if key not in record:
        raise FieldError(where, "answer", "missing (an index, a letter, a label or the answer text)")
    gold = _answer_index(record[key], choices, labels, where, key)
    rid = record.get("id")
    doc_id = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid).strip() else default_id
    subj = record.get("subject")
    subject = subj if isinstance(subj, str) and subj.strip() else subject
    return Doc(doc_id, question, choices, gold, subject)


def doc_to_text(doc: Doc, protocol: str) -> str:
    """The question as prompted: ``Question: ...\\nAnswer:`` (text) or the choices listed (letter)."""
    if protocol == "text":
        return f"Question: {doc.question}\nAnswer:"
    if protocol == "letter":
        lines = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(doc.choices))
        return f"{doc.question}\n{lines}Answer:"
    raise NacdError(f"eval.protocol: expected text or letter, got {protocol!r}")


def doc_to_choices(doc: Doc, protocol: str) -> list[str]:
    """The answers that are scored: the choice texts (text) or the letters A, B, ... (letter)."""
    return list(doc.choices) if protocol == "text" else list(LETTERS[: len(doc.choices)])
