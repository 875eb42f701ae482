"""Step 4 of NACD: multiple-choice evaluation (ARC-Easy, ARC-Challenge, MMLU, any JSONL).

A benchmark is data, as in lm-evaluation-harness: a loader gives :class:`Doc` records (question,
choices, gold index, subject), and a protocol turns a doc into a context string and one
continuation per choice:

``text`` (zero-shot by default; the paper's protocol, lm-eval's ``arc_easy``)
    context ``"Question: {question}\\nAnswer:"``, continuations ``" {choice text}"``.
    ``acc`` takes the choice with the largest summed log-prob, ``acc_norm`` the largest
    log-prob per character of the choice text.
``letter`` (5-shot by default for MMLU; Hendrycks' and lm-eval's ``mmlu``)
    ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``, then
    each shot ``"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n"`` from the dev split,
    then the question ending ``"Answer:"``; continuations ``" A"``, ``" B"``, ...

Scoring reproduces lm-eval's ``HFLM.loglikelihood`` token for token (:func:`encode_pair`: the
context's trailing spaces move to the continuation, context + continuation are encoded together
and split, the tokenizer's own BOS handling), but runs each question's context once: the context
and all its choices are packed into one row with an attention mask that lets each choice see the
context and itself (:func:`score_loglikelihood`), several questions per forward pass, and the
vocabulary projection runs only at the positions that are scored.

Output, ``<run>/eval/<name>/``::

    results.json     per benchmark: n, acc, acc_norm, standard errors; per subject; macro average
    samples.jsonl    one line per question: gold, predictions, log-prob and tokens of each choice
    manifest.json    kind "eval": model, adapter, benchmarks, protocol, few-shot, split, limit

Importing this module does no work; torch, peft and datasets are imported where needed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacd.errors import DataError, NacdError

log = logging.getLogger(__name__)

KIND = "eval"
STAGE = "evaluate"

#: Answer letters of the letter protocol (and of generic ``answer: "C"`` records).
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

#: lm-eval's defaults: between a context and its answer, and between few-shot examples.
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"

#: Descriptions put before the shots; ``{subject}`` is the subject with ``_`` read as spaces.
MMLU_LETTER_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"
MMLU_TEXT_DESCRIPTION = "The following are questions (with answers) about {subject}.\n\n"

#: Contexts that agree on this many first tokens are batched together and share their common prefix.
SHARED_PREFIX_MIN = 64

#: lm-eval's HFLM max length when neither the model config nor the tokenizer gives one.
DEFAULT_MAX_LENGTH = 2048

#: Split names of the MMLU CSV layout (``val``) and the hub layout (``validation``).
_MMLU_DIR_SPLIT = {"validation": "val"}
_HUB_SPLIT = {"val": "validation"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


# --------------------------------------------------------------------------- benchmarks as data


@dataclass(frozen=True)
class Doc:
    """One multiple-choice question."""

    id: str
    question: str
    choices: tuple[str, ...]
    gold: int
    """Index of the correct choice."""
    subject: str = ""


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


def _answer_index(value: Any, choices: Sequence[str], labels: Sequence[str] | None, where: str, key: str) -> int:
    """The gold index of an answer given as an index, a label, a letter or the choice text."""
    n = len(choices)
    if isinstance(value, bool) or value is None:
        raise DataError(f"{where}: field '{key}': expected an index, a label or the answer text, got {value!r}")
    if isinstance(value, int):
        if 0 <= value < n:
            return value
        raise DataError(f"{where}: field '{key}': index {value} is out of range for {n} choices (0-based)")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}': expected an int or a string, got {type(value).__name__}")
    text = value.strip()
    if labels is not None:
        if text in labels:
            return list(labels).index(text)
        raise DataError(f"{where}: field '{key}': {value!r} is not one of the choice labels {list(labels)}")
    if choices.count(value) == 1:
        return choices.index(value)
    if len(text) == 1 and text.upper() in LETTERS[:n]:
        return LETTERS.index(text.upper())
    raise DataError(
        f"{where}: field '{key}': {value!r} is neither a letter A-{LETTERS[n - 1]}, a 0-based int index "
        f"nor the text of one choice"
    )


def doc_from_record(record: dict[str, Any], where: str, default_id: str, subject: str = "") -> Doc:
    """A :class:`Doc` from a record: ``{question, choices, answer}`` (choices a list, answer an index,
    letter or text), HF ``ai2_arc`` (``choices: {text, label}``, ``answerKey``) or HF ``cais/mmlu``
    (``subject``, ``answer`` index). ``where`` names the record in errors."""
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        keys = ", ".join(sorted(map(str, record)))
        raise DataError(f"{where}: field 'question': missing or not a non-empty string (record keys: {keys})")
    raw = record.get("choices")
    labels: list[str] | None = None
    if isinstance(raw, dict):  # ai2_arc: {"text": [...], "label": [...]}
        texts, labels = raw.get("text"), raw.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise DataError(f"{where}: field 'choices': expected {{text: [...], label: [...]}} of equal length")
        labels = [str(label).strip() for label in labels]
        raw = texts
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(c, str) for c in raw):
        raise DataError(f"{where}: field 'choices': expected a list of at least 2 strings, got {raw!r:.80}")
    choices = tuple(raw)
    key = "answerKey" if "answerKey" in record and "answer" not in record else "answer"
    if key not in record:
        raise DataError(f"{where}: field 'answer': missing (an index, a letter, a label or the answer text)")
    gold = _answer_index(record[key], choices, labels, where, key)
    rid = record.get("id")
    doc_id = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid).strip() else default_id
    subj = record.get("subject")
    subject = subj if isinstance(subj, str) and subj.strip() else subject
    return Doc(doc_id, question, choices, gold, subject)


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


# --------------------------------------------------------------------------- prompts


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


def fewshot_docs(bench: Benchmark, doc: Doc, k: int) -> list[Doc]:
    """The first ``k`` docs of the few-shot pool with ``doc``'s subject (itself excluded), as lm-eval's first_n."""
    if k == 0:
        return []
    subjects = {d.subject for d in bench.fewshot_pool}
    pool = [d for d in bench.fewshot_pool if d.id != doc.id and (d.subject == doc.subject or len(subjects) == 1)]
    if len(pool) < k:
        where = f" for subject {doc.subject!r}" if doc.subject else ""
        raise DataError(
            f"benchmark {bench.name!r}: num_fewshot={k} but the few-shot pool ({bench.fewshot_source or 'none'}) "
            f"has {len(pool)} example(s){where}; lower eval.num_fewshot"
        )
    return pool[:k]


def build_context(bench: Benchmark, doc: Doc, protocol: str, shots: Sequence[Doc]) -> str:
    """Description + shots (each ``text + " " + answer + "\\n\\n"``) + the question, as lm-eval assembles it."""
    description = bench.descriptions.get(protocol, "").format(subject=doc.subject.replace("_", " "))
    parts = [
        doc_to_text(s, protocol) + TARGET_DELIMITER + doc_to_choices(s, protocol)[s.gold] + FEWSHOT_DELIMITER
        for s in shots
    ]
    return description + "".join(parts) + doc_to_text(doc, protocol)


# --------------------------------------------------------------------------- tokenization (lm-eval's)


def _prefix_token_id(tokenizer: Any) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else tokenizer.eos_token_id


def _tok_encode(tokenizer: Any, text: str) -> list[int]:
    """lm-eval's ``HFLM.tok_encode``: the tokenizer's own special tokens, unless ``text`` starts with the BOS text."""
    add = not text.startswith(tokenizer.decode(_prefix_token_id(tokenizer)))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def encode_pair(
    tokenizer: Any, context: str, continuation: str, cache: dict[str, list[int]] | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as lm-eval's ``HFLM`` makes them.

    Trailing spaces of the context move to the continuation; context + continuation are encoded
    together and the ids after the context's own encoding are the continuation. An empty context
    becomes the BOS (else EOS) token. ``cache`` (context text -> ids) saves encoding a context again.
    """
    if context == "":
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tok_encode(tokenizer, context + continuation)
    if cache is None:
        ctx = _tok_encode(tokenizer, context)
    elif (ctx := cache.get(context)) is None:
        ctx = cache[context] = _tok_encode(tokenizer, context)
    return list(ctx), whole[len(ctx) :]


def model_max_length(model: Any, tokenizer: Any) -> int:
    """lm-eval's ``HFLM.max_length``: the model config's context size, else the tokenizer's, else 2048."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and value < 1_000_000_000:
        return value
    return DEFAULT_MAX_LENGTH


# --------------------------------------------------------------------------- scoring


@dataclass
class _Group:
    """The requests that share one context: scored in one packed row."""

    context: list[int]
    continuations: list[list[int]] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # positions in the request list

    @property
    def packed_len(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)

    @property
    def scored_tail(self) -> int:
        """Positions at the end of the row whose logits are needed: the last context token and the choices."""
        return 1 + sum(len(c) - 1 for c in self.continuations)

    @property
    def packed_choices(self) -> int:
        """Continuations with tokens in the packed row (all but their last token is fed)."""
        return sum(len(c) > 1 for c in self.continuations)

    @property
    def fits(self) -> int:
        """The longest request's input length (lm-eval feeds context + continuation minus its last token)."""
        return len(self.context) + max(len(c) for c in self.continuations) - 1


def _sliding(config: Any) -> tuple[int | None, bool]:
    """(sliding window, whether only some layers slide) of a model config."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None, False
    types = set(getattr(config, "layer_types", None) or [])
    if types and "sliding_attention" not in types:
        return None, False
    return window, len(types) > 1


def _packed_batch(
    groups: Sequence[_Group], config: Any, dtype: Any, device: Any, prefix: int = 0
) -> tuple[dict[str, Any], int, list]:
    """Model inputs of a batch of packed, left-padded rows that follow ``prefix`` cached context tokens;
    the kept-logits count; where each continuation token's log-prob is read (kept position, token ids)."""
    import torch

    width = max(g.packed_len for g in groups) - prefix
    keep = max(g.scored_tail for g in groups)
    ids = torch.zeros(len(groups), width, dtype=torch.long)
    pos = torch.zeros(len(groups), width, dtype=torch.long)
    seg = torch.full((len(groups), width), -1, dtype=torch.long)  # -1 pad, 0 context, i + 1 choice i
    reads = []
    for r, g in enumerate(groups):
        off = width - (g.packed_len - prefix)
        n_ctx = len(g.context)
        ids[r, off : off + n_ctx - prefix] = torch.tensor(g.context[prefix:])
        pos[r, off : off + n_ctx - prefix] = torch.arange(prefix, n_ctx)
        seg[r, off : off + n_ctx - prefix] = 0
        at = off + n_ctx - prefix
        last_ctx = at - 1
        group_reads = []
        for i, cont in enumerate(g.continuations):
            n = len(cont) - 1
            if n:
                ids[r, at : at + n] = torch.tensor(cont[:-1])
                pos[r, at : at + n] = torch.arange(n_ctx, n_ctx + n)
                seg[r, at : at + n] = i + 1
            # token j of the continuation is predicted at the last context token (j = 0) or at its token j - 1
            where = [last_ctx, *range(at, at + n)]
            group_reads.append(([w - (width - keep) for w in where], cont))
            at += n
        reads.append(group_reads)
    q, k = seg[:, :, None], seg[:, None, :]
    order = torch.arange(width)
    allowed = (order[None, :, None] >= order[None, None, :]) & (k >= 0) & ((k == 0) | (k == q)) & (q >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)[None]  # pads attend to themselves: no empty softmax rows
    if prefix:  # every row sees the cached prefix
        allowed = torch.cat([torch.ones(len(groups), width, prefix, dtype=torch.bool), allowed], dim=-1)
    window, hybrid = _sliding(config)
    masks: Any
    if window is not None and int(pos.max()) >= window:
        assert not prefix, "no shared prefix with a sliding window"
        near = (pos[:, :, None] - pos[:, None, :]) < window
        slide_mask = _additive(allowed & near, dtype, device)
        masks = {"full_attention": _additive(allowed, dtype, device), "sliding_attention": slide_mask}
        masks = masks if hybrid else slide_mask
    else:
        masks = _additive(allowed, dtype, device)
    inputs = {"input_ids": ids.to(device), "position_ids": pos.to(device), "attention_mask": masks}
    return inputs, keep, reads


def _additive(allowed: Any, dtype: Any, device: Any) -> Any:
    """A 4D float mask (0 where allowed, the dtype's minimum elsewhere): works with eager and SDPA attention."""
    import torch

    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None].to(device)


def _forward(model: Any, inputs: dict[str, Any], keep: Any) -> Any:
    """The model's output with logits for the last ``keep`` positions only (or, a 1D tensor, at those
    positions), where the model allows it; otherwise at every position."""
    try:
        return model(**inputs, logits_to_keep=keep)
    except TypeError as exc:
        if "logits_to_keep" not in str(exc):
            raise
        return model(**inputs)


def _score_packed(model: Any, groups: Sequence[_Group], prefix: int = 0) -> list[list[tuple[float, int]]]:
    """Log-prob and token count of every continuation of ``groups``, in one forward pass (two with a
    shared ``prefix``: its first ``prefix`` context tokens, the same in every group, run once and are cached)."""
    import torch

    param = next(model.parameters())
    inputs, keep, reads = _packed_batch(groups, model.config, param.dtype, param.device, prefix)
    if prefix:
        head = torch.tensor([groups[0].context[:prefix]], device=param.device)
        out = _forward(model, {"input_ids": head, "use_cache": True}, 1)
        # transformers >= 5.2x returns and takes ``cache`` (``past_key_values`` warns there, goes in 5.40)
        key = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
        cache = out[key]
        cache.batch_repeat_interleave(len(groups))
        inputs.update({key: cache, "use_cache": True})
    else:
        inputs["use_cache"] = False
    logits = _forward(model, inputs, keep).logits[:, -keep:]
    out = []
    for r, group_reads in enumerate(reads):
        rows = []
        for where, cont in group_reads:
            picked = logits[r, where].float()  # [len(cont), vocab]
            lp = torch.log_softmax(picked, dim=-1).gather(-1, torch.tensor(cont, device=param.device)[:, None])
            rows.append((float(lp.sum()), len(cont)))
        out.append(rows)
    return out


def _score_plain(model: Any, pairs: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[tuple[float, int]]:
    """lm-eval's way: one right-padded row per (context, continuation), truncated from the left."""
    import torch

    device = next(model.parameters()).device
    rows = [(ctx + cont)[-(max_length + 1) :][:-1] for ctx, cont in pairs]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    # logits only where a continuation token is predicted (the union over rows): a 262k vocabulary
    # times every position of a 5-shot prompt would be gigabytes
    needed = sorted({p for r, (_, cont) in zip(rows, pairs, strict=True) for p in range(len(r) - len(cont), len(r))})
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    logits = _forward(model, inputs, torch.tensor(needed, device=device)).logits
    column = {p: j for j, p in enumerate(needed)} if logits.shape[1] == len(needed) else None
    out = []
    for i, (r, (_, cont)) in enumerate(zip(rows, pairs, strict=True)):
        where = list(range(len(r) - len(cont), len(r)))
        picked = logits[i, [column[p] for p in where] if column is not None else where].float()
        lp = torch.log_softmax(picked, dim=-1).gather(-1, torch.tensor(cont, device=device)[:, None])
        out.append((float(lp.sum()), len(cont)))
    return out


def _group_requests(encoded: Sequence[tuple[list[int], list[int]]]) -> list[_Group]:
    groups: dict[tuple[int, ...], _Group] = {}
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise NacdError(f"request {i}: the continuation encodes to no tokens")
        g = groups.setdefault(tuple(ctx), _Group(list(ctx)))
        g.continuations.append(list(cont))
        g.indices.append(i)
    return list(groups.values())


def _common_prefix(contexts: Sequence[Sequence[int]]) -> int:
    first = contexts[0]
    n = min(len(c) for c in contexts)
    for c in contexts[1:]:
        n = next((i for i in range(n) if c[i] != first[i]), n)
    return n


def _plan(groups: Sequence[_Group], batch_size: int, share: bool) -> list[tuple[list[_Group], int]]:
    """Batches of groups and the length of the context prefix they share (0: none to share).

    Contexts that agree on their first :data:`SHARED_PREFIX_MIN` tokens (MMLU's description and
    shots of one subject) are batched together and their common prefix runs once per batch;
    the rest are batched by length, longest first, as lm-eval does (memory errors show at once).
    """
    buckets: dict[tuple[int, ...], list[_Group]] = {}
    singles: list[_Group] = []
    for g in groups:
        if share and len(g.context) > SHARED_PREFIX_MIN:
            buckets.setdefault(tuple(g.context[:SHARED_PREFIX_MIN]), []).append(g)
        else:
            singles.append(g)
    plan: list[tuple[list[_Group], int]] = []
    for members in buckets.values():
        if len(members) == 1:
            singles.extend(members)
            continue
        members.sort(key=lambda g: -g.packed_len)
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            shared = min(_common_prefix([g.context for g in batch]), min(len(g.context) for g in batch) - 1)
            plan.append((batch, shared if len(batch) > 1 and shared >= SHARED_PREFIX_MIN else 0))
    singles.sort(key=lambda g: -g.packed_len)
    plan.extend((singles[i : i + batch_size], 0) for i in range(0, len(singles), batch_size))
    plan.sort(key=lambda item: -max(g.packed_len - item[1] for g in item[0]))
    return plan


def _close(a: Sequence[tuple[float, int]], b: Sequence[tuple[float, int]], half: bool) -> bool:
    """Whether packed scores ``a`` equal plain scores ``b`` up to rounding (float32: ~1e-5 seen)."""
    atol, rtol = (0.1, 1e-2) if half else (5e-4, 1e-5)
    return all(abs(x[0] - y[0]) <= atol + rtol * abs(y[0]) for x, y in zip(a, b, strict=True))


def score_loglikelihood(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    *,
    method: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """``(sum of log-probs, number of tokens)`` of each ``(context, continuation)`` request, as lm-eval's
    ``loglikelihood`` computes it (tokenization by :func:`encode_pair`).

    ``method``:

    * ``packed``: the requests that share a context are one row (each continuation attends to the
      context and to itself), ``batch_size`` contexts per forward pass; contexts that share a long
      token prefix (few-shot examples) are batched together and the prefix runs once per batch;
    * ``plain``: one row per request, ``batch_size`` rows per pass, like lm-eval;
    * ``auto``: packed, after checking on the first batch of each kind that it gives the plain scores
      (if not, it warns and falls back: shared prefix -> packed -> plain).

    Contexts too long for the model are scored plainly (lm-eval's left truncation). ``progress(n)``
    is called with the number of contexts done after each pass.
    """
    import torch

    if method not in ("auto", "packed", "plain"):
        raise ValueError(f"method: expected auto, packed or plain, got {method!r}")
    cache: dict[str, list[int]] = {}
    encoded = [encode_pair(tokenizer, ctx, cont, cache) for ctx, cont in requests]
    groups = _group_requests(encoded)
    max_length = model_max_length(model, tokenizer)
    param = next(model.parameters())
    attn = getattr(model.config, "_attn_implementation", None)
    if method != "plain" and attn not in (None, "eager", "sdpa"):
        log.warning("attention %s takes no custom masks: scoring one row per request (slower)", attn)
        method = "plain"
    half = param.dtype in (torch.float16, torch.bfloat16)
    verify = {"packed": method == "auto", "shared": method == "auto"}
    modes = {"packed": method != "plain", "shared": method != "plain"}
    results: list[tuple[float, int] | None] = [None] * len(requests)

    def plain(batch: Sequence[_Group]) -> list[list[tuple[float, int]]]:
        pairs = [(g.context, c) for g in batch for c in g.continuations]
        flat = []
        for start in range(0, len(pairs), batch_size):
            flat.extend(_score_plain(model, pairs[start : start + batch_size], max_length))
        out, at = [], 0
        for g in batch:
            out.append(flat[at : at + len(g.continuations)])
            at += len(g.continuations)
        return out

    window = _sliding(model.config)[0]

    def packed(batch: list[_Group], prefix: int) -> list[list[tuple[float, int]]]:
        # a sliding-window model shares a cached prefix only when the whole batch lies inside its window:
        # the window then masks nothing, and its cache layers keep every prefix token
        inside = window is None or max(g.fits for g in batch) < window
        prefix = prefix if modes["shared"] and inside else 0
        if not modes["packed"]:
            return plain(batch)
        kind = "shared" if prefix else "packed"
        try:
            scores = _score_packed(model, batch, prefix)
        except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
            if not verify[kind]:
                raise
            log.warning("%s scoring fails on this model (%s: %s): not used", kind, type(exc).__name__, exc)
            modes[kind] = verify[kind] = False
            return packed(batch, 0) if prefix else plain(batch)
        if verify[kind]:
            verify[kind] = False
            # the shortest of the contexts with the most multi-token choices: packing errors show there
            probe = min(range(len(batch)), key=lambda i: (-batch[i].packed_choices, batch[i].packed_len))
            reference = plain([batch[probe]])[0]
            if not _close(scores[probe], reference, half):
                log.warning(
                    "%s scoring differs from plain scoring on this model (%s vs %s): not used",
                    "shared-prefix" if prefix else "packed",
                    [round(s, 4) for s, _ in scores[probe]],
                    [round(s, 4) for s, _ in reference],
                )
                modes[kind] = False
                return packed(batch, 0) if prefix else plain(batch)
        return scores

    fits = [g for g in groups if g.fits <= max_length]
    too_long = [g for g in groups if g.fits > max_length]
    if too_long:
        log.warning("%d context(s) longer than the model's %d tokens: cut from the left", len(too_long), max_length)
    plan = _plan(fits, batch_size, modes["shared"])
    plan += [(too_long[i : i + batch_size], -1) for i in range(0, len(too_long), batch_size)]
    with torch.no_grad():
        for batch, prefix in plan:
            scores = plain(batch) if prefix < 0 else packed(batch, prefix)
            for g, group_scores in zip(batch, scores, strict=True):
                for i, s in zip(g.indices, group_scores, strict=True):
                    results[i] = s
            if progress is not None:
                progress(len(batch))
    missing = [i for i, r in enumerate(results) if r is None]
    assert not missing, f"requests {missing[:5]} were not scored"
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------- evaluation


def _mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as numpy


def _metrics(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    acc, acc_se = _mean_stderr([s["acc"] for s in samples])
    norm, norm_se = _mean_stderr([s["acc_norm"] for s in samples])
    return {"n": len(samples), "acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se}


def aggregate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Micro averages over all questions, per-subject metrics and their macro average (with pooled stderr)."""
    out = _metrics(samples)
    subjects = sorted({s["subject"] for s in samples if s["subject"]})
    if subjects:
        per = {sub: _metrics([s for s in samples if s["subject"] == sub]) for sub in subjects}
        out["subjects"] = per
        macro: dict[str, Any] = {"n_subjects": len(per)}
        for key in ("acc", "acc_norm"):
            macro[key] = sum(m[key] for m in per.values()) / len(per)
            ses = [m[f"{key}_stderr"] for m in per.values()]
            macro[f"{key}_stderr"] = None if None in ses else math.sqrt(sum(se**2 for se in ses)) / len(per)
        out["macro"] = macro
    return out


def _limited(bench: Benchmark, limit: int | None) -> list[Doc]:
    if limit is None:
        return list(bench.docs)
    if not bench.per_subject_limit:
        return bench.docs[:limit]
    counts: dict[str, int] = {}
    out = []
    for doc in bench.docs:
        if counts.get(doc.subject, 0) < limit:
            counts[doc.subject] = counts.get(doc.subject, 0) + 1
            out.append(doc)
    return out


def resolve_protocol(bench: Benchmark, protocol: str, num_fewshot: int | None) -> tuple[str, int]:
    """``(protocol, shots)`` of a benchmark under the config's choices (``auto`` / None: its defaults)."""
    chosen = bench.protocol if protocol == "auto" else protocol
    if chosen not in ("text", "letter"):
        raise NacdError(f"eval.protocol: expected auto, text or letter, got {protocol!r}")
    return chosen, bench.default_fewshot if num_fewshot is None else num_fewshot


def evaluate(
    model: Any, tokenizer: Any, benchmarks: Sequence[Benchmark], cfg: Any, *, progress: bool = True
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``benchmarks`` under ``cfg`` (an :class:`~nacd.config.EvalConfig`): ``(results, samples)``.

    ``results[name]`` holds n, acc, acc_norm, their standard errors, per-subject metrics and macro
    averages, protocol, shots and timing; ``samples`` one dict per question (see docs/EVAL.md).
    """
    from tqdm.auto import tqdm

    results: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    for bench in benchmarks:
        protocol, shots = resolve_protocol(bench, getattr(cfg, "protocol", "auto"), cfg.num_fewshot)
        docs = _limited(bench, (getattr(cfg, "limits", None) or {}).get(bench.name, cfg.limit))
        requests: list[tuple[str, str]] = []
        spans = []
        for doc in docs:
            context = build_context(bench, doc, protocol, fewshot_docs(bench, doc, shots))
            answers = doc_to_choices(doc, protocol)
            spans.append((len(requests), answers))
            requests.extend((context, TARGET_DELIMITER + a) for a in answers)
        start = time.perf_counter()
        with tqdm(total=len(docs), desc=f"eval {bench.name}", unit="q", disable=not progress) as bar:
            scores = score_loglikelihood(model, tokenizer, requests, cfg.batch_size, progress=bar.update)
        seconds = time.perf_counter() - start
        bench_samples = []
        for doc, (first, answers) in zip(docs, spans, strict=True):
            lls = [s for s, _ in scores[first : first + len(answers)]]
            pred = _argmax(lls)
            pred_norm = _argmax([ll / len(a) for ll, a in zip(lls, answers, strict=True)])
            bench_samples.append(
                {
                    "benchmark": bench.name,
                    "id": doc.id,
                    "subject": doc.subject,
                    "gold": doc.gold,
                    "pred": pred,
                    "pred_norm": pred_norm,
                    "acc": float(pred == doc.gold),
                    "acc_norm": float(pred_norm == doc.gold),
                    "logprobs": lls,
                    "n_tokens": [n for _, n in scores[first : first + len(answers)]],
                    "answers": answers,
                }
            )
        results[bench.name] = {
            **aggregate(bench_samples),
            "protocol": protocol,
            "num_fewshot": shots,
            "split": bench.split,
            "source": bench.source,
            "fewshot_source": bench.fewshot_source if shots else None,
            "seconds": round(seconds, 3),
            "questions_per_s": round(len(docs) / seconds, 3) if seconds > 0 else None,
        }
        log.info(
            "%s (%s, %d-shot, n=%d): acc %.4f, acc_norm %.4f, %.1f questions/s",
            bench.name,
            protocol,
            shots,
            len(docs),
            results[bench.name]["acc"],
            results[bench.name]["acc_norm"],
            len(docs) / max(seconds, 1e-9),
        )
        samples.extend(bench_samples)
    return results, samples


# --------------------------------------------------------------------------- the stage


def apply_adapter(model: Any, adapter: str | Path) -> Any:
    """``model`` with the peft adapter of folder ``adapter`` (which holds adapter_config.json), in eval mode."""
    from peft import PeftModel

    folder = Path(adapter).expanduser()
    verify_adapter(folder)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise NacdError(f"eval.adapter={str(adapter)!r}: cannot apply it to the model: {brief_error(exc)}") from exc
    peft_model.eval()
    return peft_model


def brief_error(exc: BaseException, width: int = 300) -> str:
    """The first line of a long library error (torch lists every mismatched tensor), with a count of the rest:
    an adapter of another model gives hundreds of ``size mismatch`` lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    detail = next((line for line in lines[1:] if line.startswith("size mismatch")), None)
    head = lines[0] if detail is None else f"{lines[0]} {detail}"
    head = head if len(head) <= width else head[: width - 3] + "..."
    more = sum(line.startswith("size mismatch") for line in lines) - (detail is not None)
    rest = len(lines) - 1 - (detail is not None)
    if more > 0:
        return f"{head} (and {more} more size mismatches: the adapter was made for another model)"
    return f"{head} (and {rest} more lines)" if rest > 0 else head


def _safe(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text).strip("._") or "model"


def eval_name(config: Any) -> str:
    """The output folder name: ``eval.name``, else the adapter's variant, else the model's name."""
    ec = config.eval
    if ec.name:
        return ec.name
    if ec.adapter:
        folder = Path(ec.adapter).expanduser()
        return _safe(folder.parent.name if folder.name == "adapter" and folder.parent.name else folder.name)
    return model_name(config.model.spec)


def model_name(spec: str) -> str:
    """A folder-safe short name of a model spec (a path's last part, a GGUF's stem, a hub id's name)."""
    spec = spec.strip().rstrip("/\\")
    return _safe(Path(spec).stem if spec.endswith(".gguf") else Path(spec).name or spec)


def _adapter_identity(adapter: str | None) -> dict[str, Any] | None:
    from nacd.artifacts import sha256_file

    if adapter is None:
        return None
    folder = Path(adapter).expanduser()
    weights = sorted(folder.glob("adapter_model.*"))
    return {
        "path": str(folder.resolve()),
        "sha256": {p.name: sha256_file(p) for p in weights},
        "config": json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")),
    }


def verify_adapter(adapter: str | Path) -> None:
    """Stop before any model is loaded when ``adapter`` is no peft adapter folder, or when it is a nacd
    tuning's adapter whose files differ from what that tuning's manifest records."""
    from nacd.artifacts import read_manifest, verify_files

    folder = Path(adapter).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise NacdError(
            f"eval.adapter={str(adapter)!r}: no adapter_config.json in {folder} "
            "(expected a peft adapter folder such as <run>/finetune/full/adapter)"
        )
    owner = folder.parent
    body = read_manifest(owner) if folder.name == "adapter" and (owner / "manifest.json").is_file() else None
    if body is not None and body.get("kind") == "finetune":
        fix = f"the adapter is damaged; delete {owner} and run `nacd finetune` again"
        verify_files(owner, body.get("files"), fix, deep=True)


def check(config: Any) -> None:
    """Raise if this stage cannot run with ``config`` (cheap: nothing is loaded)."""
    ec = config.eval
    root = Path(config.data.root).expanduser()
    for spec in ec.benchmarks:
        spec = spec.strip()
        if spec in BUILTINS:
            continue
        if spec.startswith("builtin:"):
            from nacd.demo_data import builtin_path

            builtin_path(spec)  # an unknown built-in name is an error here
            continue
        path = Path(spec).expanduser()
        exists = any(c.exists() for c in ([path] if path.is_absolute() else [path, root / path]))
        if not exists and (spec.lower().endswith(".jsonl") or not _HUB_ID.match(spec)):
            raise NacdError(
                f"eval.benchmarks: {spec!r} is not a built-in ({', '.join(BUILTINS)}), an existing .jsonl file or "
                f"folder (also looked under data.root = {root}), nor a hub dataset id owner/name[:config]"
            )


def run(config: Any, run_dir: Any) -> dict[str, Any]:
    """``nacd eval``: evaluate ``model.spec`` (plus ``eval.adapter``) on ``eval.benchmarks``; writes
    ``<run>/eval/<name>/``. A complete evaluation with the same model, adapter and settings is skipped."""
    from dataclasses import asdict

    from nacd.artifacts import (
        atomic_dir,
        atomic_write_json,
        atomic_write_text,
        read_manifest,
        record_files,
        setup_logging,
        sha256_json,
        verify_files,
        write_manifest,
    )
    from nacd.models import describe, load_model, model_fingerprint, resolve_device

    check(config)
    ec = config.eval
    if ec.adapter:  # here, not in check(): `nacd run` checks every stage before its tunings write adapters
        verify_adapter(ec.adapter)
    benchmarks = [load_benchmark(spec, ec.split, config.data.root) for spec in ec.benchmarks]  # data errors first
    run_dir.init(config)
    setup_logging(config.run.log_level, run_dir.log_path)
    name = eval_name(config)
    folder = run_dir.eval_dir(name)
    model, tokenizer = load_model(config.model, resolve_device(config.run.device))
    identity = {
        "model": {"spec": config.model.spec, "fingerprint": model_fingerprint(model)},
        "adapter": _adapter_identity(ec.adapter),
        "benchmarks": {
            b.name: {
                "source": b.source,
                "n_available": len(b.docs),
                "data_hash": sha256_json([asdict(d) for d in (*b.docs, *b.fewshot_pool)]),
            }
            for b in benchmarks
        },
        "split": ec.split,
        "protocol": ec.protocol,
        "num_fewshot": ec.num_fewshot,
        "limit": ec.limit,
        "limits": ec.limits,
    }
    existing = read_manifest(folder, KIND)
    if existing is not None and existing.get("complete") and (folder / "results.json").is_file():
        if all(existing.get(k) == v for k, v in identity.items()):
            try:
                verify_files(folder, existing.get("files"), "", deep=True)
                body = json.loads((folder / "results.json").read_text(encoding="utf-8"))
            except (NacdError, ValueError) as exc:  # the evaluation is its own rebuild: redo it, saying why
                log.warning("eval %s: %s; evaluating again", name, exc)
            else:
                log.info("eval %s: complete in %s, skipped", name, folder)
                return body
        else:
            log.warning("eval %s: %s was made with other settings; evaluating again", name, folder)
    if ec.adapter:
        model = apply_adapter(model, ec.adapter)
    start = time.time()
    results, samples = evaluate(model, tokenizer, benchmarks, ec)
    body = {
        "name": name,
        "model": {"spec": config.model.spec, **describe(model)},
        "adapter": ec.adapter,
        "eval": asdict(ec),
        "benchmarks": results,
    }
    with atomic_dir(folder) as tmp:
        atomic_write_json(tmp / "results.json", body)
        atomic_write_text(tmp / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        write_manifest(
            tmp,
            KIND,
            **identity,
            name=name,
            protocols={k: {"protocol": v["protocol"], "num_fewshot": v["num_fewshot"]} for k, v in results.items()},
            n_questions={k: v["n"] for k, v in results.items()},
            seconds=round(time.time() - start, 2),
            files=record_files(tmp, ["results.json", "samples.jsonl"]),
            complete=True,
        )
    log.info("eval %s: results in %s", name, folder / "results.json")
    return body
