"""Step 0 of NACD: select a small subset D_sel of D_full.

``select(examples, budget, method, seed, targets, config, run_dir)`` returns a :class:`Selection`
(example ids in rank order with their scores). Four methods (exact definitions: ``docs/SELECT.md``):

``random``
    a seeded uniform sample (scores all 1.0);
``bm25``
    BM25 (``bm25s``) with D_full as the index and each target example as a query; an example's
    score is the max (or mean) over the queries; the top ``budget`` examples;
``dsir``
    importance resampling (Xie et al. 2023): hashed unigram+bigram bag-of-n-grams models of the
    target and of D_full, log importance weight = sum over an example's n-grams of
    log p_target - log p_raw; Gumbel top-k (sampling without replacement) seeded by ``run.seed``;
``less``
    gradient-similarity scores from :func:`nacd.less.less_scores`; the top ``budget`` examples.

The targeted methods read their target examples with :func:`load_target` (``select.target``: a
benchmark split or instruction data). :func:`run` writes the selection as a self-describing
artifact in ``<run>/select/``::

    manifest.json   kind "selection": method and its config, budget, seed, target spec, hash and size,
                    corpus hash and size
    selection.json  {"ids": [...rank order...], "scores": [...]}
    selected.jsonl  the selected examples themselves (id, source, messages)

Importing this module does no work; torch, bm25s and the LESS module are imported where needed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nacd.artifacts import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    read_manifest,
    read_verified,
    record_files,
    setup_logging,
    verify_files,
    write_manifest,
)
from nacd.errors import DataError, NacdError, StageNotImplementedError
from nacd.locks import locked
from nacd.progress import bar as progress_bar
from nacd.ranks import current as current_ranks

log = logging.getLogger(__name__)

KIND = "selection"
METHODS = ("random", "bm25", "dsir", "less")
#: Methods that rank D_full against target examples (``select.target``).
TARGETED = ("bm25", "dsir", "less")

#: Queries above this many get a progress bar (BM25).
PROGRESS_MIN_QUERIES = 200

#: DSIR words: lowercase, then maximal runs of Unicode word characters.
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Selection:
    ids: list[str]  # rank order
    scores: list[float]
    method: str


def budget_count(budget: float, n: int) -> int:
    """A budget as a fraction (< 1) or a count (>= 1) -> number of examples; errors name the key."""
    if budget <= 0:
        raise NacdError(f"select.budget={budget}: must be positive")
    count = round(budget * n) if budget < 1 else int(budget)
    if count < 1:
        raise NacdError(f"select.budget={budget} of a {n}-example corpus selects nothing; raise the budget")
    if count > n:
        raise NacdError(f"select.budget={budget} asks for {count} examples but the corpus has {n}")
    return count


def example_text(example: Any) -> str:
    """The text BM25 and DSIR see: every message's content, joined by newlines."""
    return "\n".join(m["content"] for m in example.messages)


def _top(keys: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest keys, largest first; ties keep corpus order."""
    return np.argsort(-keys, kind="stable")[:count]


# --------------------------------------------------------------------------- ids of a selection


def read_ids(path: str | Path) -> list[str]:
    """Example ids from a JSON list, a JSON object with ``ids``, or a text file with one id per line."""
    path = Path(path)
    if not path.is_file():
        raise NacdError(f"ids file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NacdError(f"{path}: not valid JSON ({exc})") from None
        ids = body.get("ids") if isinstance(body, dict) else body
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise NacdError(f"{path}: field 'ids' must be a list of example id strings")
    else:
        ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise NacdError(f"{path}: no example ids")
    return ids


SELECTION_FILES = ("selection.json", "selected.jsonl")  # what the selection manifest's ``files`` vouches for
#: The whole corpus in the method's order (selections of other sizes are its prefixes); folders from before
#: it have none, and :func:`ranking_of` ranks again.
RANKING = "ranking.json"


def verify_selection(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The selection's files are what its manifest recorded (sizes and hashes: they are small and read
    anyway); returns ``selection.json``'s body, read once."""
    fix = f"the selection is damaged; delete {folder} and run `nacd select` again"
    files = manifest.get("files") or {}
    verify_files(folder, {k: v for k, v in files.items() if k != "selection.json"}, fix, deep=True)
    return json.loads(read_verified(folder / "selection.json", files.get("selection.json"), fix).decode("utf-8"))


def select_examples(examples: list[Any], ids: list[str], where: str) -> list[Any]:
    """The examples whose ids are listed, in the listed order; unknown ids are an error."""
    by_id = {ex.id: ex for ex in examples}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise NacdError(
            f"{where}: {len(unknown)} id(s) not in the corpus, e.g. {unknown[:3]} "
            "(was the selection made with other data settings?)"
        )
    return [by_id[i] for i in ids]


# --------------------------------------------------------------------------- BM25


def bm25_scores(examples: list[Any], targets: list[Any], cfg: Any = None) -> np.ndarray:
    """Per corpus example: its BM25 scores against every target (as a query), combined by ``cfg.aggregate``.

    Corpus and queries are tokenized by ``bm25s.tokenize`` (lowercase, tokens of >= 2 word
    characters, English stopwords removed, no stemming); a query term repeated n times counts n
    times; query terms absent from the corpus score 0.
    """
    import bm25s

    from nacd.config import Bm25Config

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its own logger to DEBUG on import
    cfg = cfg or Bm25Config()
    corpus_tokens = bm25s.tokenize([example_text(e) for e in examples], stopwords="en", show_progress=False)
    index = bm25s.BM25(k1=cfg.k1, b=cfg.b)
    index.index(corpus_tokens, show_progress=False)
    queries = bm25s.tokenize([example_text(t) for t in targets], stopwords="en", return_ids=False, show_progress=False)
    total = np.full(len(examples), -np.inf) if cfg.aggregate == "max" else np.zeros(len(examples))
    bar = progress_bar(queries, desc="bm25", unit="query", disable=len(queries) <= PROGRESS_MIN_QUERIES, leave=False)
    for query in bar:
        scores = index.get_scores_from_ids(index.get_tokens_ids(query)).astype(np.float64)
        if cfg.aggregate == "max":
            np.maximum(total, scores, out=total)
        else:
            total += scores
    return total if cfg.aggregate == "max" else total / len(queries)


# --------------------------------------------------------------------------- DSIR


@functools.lru_cache(maxsize=1 << 20)
def _hash64(gram: str) -> int:
    """A 64-bit hash of an n-gram that is the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(gram.encode("utf-8"), digest_size=8).digest(), "little")


def hashed_ngrams(text: str, ngrams: int = 2, num_buckets: int = 10000) -> np.ndarray:
    """Bucket of every n-gram occurrence (orders 1..``ngrams``) of ``text``: ``blake2b-64(gram) % num_buckets``.

    Words are the ``\\w+`` runs of the lowercased text; an n-gram is its words joined by one space.
    """
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i : i + n]) for n in range(1, ngrams + 1) for i in range(len(words) - n + 1)]
    return np.fromiter((_hash64(g) % num_buckets for g in grams), dtype=np.int64, count=len(grams))


def dsir_log_weights(examples: list[Any], targets: list[Any], cfg: Any = None) -> np.ndarray:
    """DSIR log importance weight of each corpus example.

    p_target and p_raw are bag-of-hashed-n-gram (categorical) models fitted on the targets and on
    the whole corpus, with ``cfg.smoothing`` added to every bucket's count; an example's weight is
    ``sum_b count_b(example) * (log p_target[b] - log p_raw[b])``.
    """
    from nacd.config import DsirConfig

    cfg = cfg or DsirConfig()

    def features(items: list[Any]) -> list[np.ndarray]:
        return [hashed_ngrams(example_text(x), cfg.ngrams, cfg.num_buckets) for x in items]

    raw, target = features(examples), features(targets)

    def log_probs(feats: list[np.ndarray]) -> np.ndarray:
        counts = np.bincount(np.concatenate(feats), minlength=cfg.num_buckets) + cfg.smoothing
        return np.log(counts) - np.log(counts.sum())

    log_diff = log_probs(target) - log_probs(raw)
    lengths = np.array([len(b) for b in raw])
    owner = np.repeat(np.arange(len(examples)), lengths)
    return np.bincount(owner, weights=log_diff[np.concatenate(raw)], minlength=len(examples))


# --------------------------------------------------------------------------- targets


def _looks_multiple_choice(path: Path) -> bool:
    """True when the first record of a JSONL file has ``question`` and ``choices`` (a benchmark file)."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            line = next((x for x in fh if x.strip()), "")
        record = json.loads(line) if line else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and "question" in record and "choices" in record


def is_benchmark_target(spec: str, split: str, data_root: str | Path) -> bool:
    """Whether ``select.target`` names a multiple-choice benchmark (else: instruction data).

    A built-in name; a ``.jsonl`` file of ``{question, choices, ...}`` records; a folder with such a
    ``<split>.jsonl`` or MMLU CSVs for ``split``; a hub id ``owner/name[:config]`` that is not a
    local path. ``hf:owner/name`` is instruction data on the hub (the ``data.sources`` syntax).
    """
    from nacd.evaluate import _HUB_ID, BUILTINS, _mmlu_split_dir

    spec = spec.strip()
    if spec in BUILTINS:
        return True
    if spec.startswith("hf:"):
        return False
    if spec.startswith("builtin:"):  # builtin:demo/mc (the demo's benchmark) or builtin:demo/corpus.jsonl
        from nacd.demo_data import builtin_path

        found = builtin_path(spec)
        return found.is_dir() or _looks_multiple_choice(found)
    path = Path(spec).expanduser()
    candidates = [path] if path.is_absolute() else [path, Path(data_root).expanduser() / path]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        return bool(_HUB_ID.match(spec)) and "*" not in spec
    if found.is_dir():
        return _looks_multiple_choice(found / f"{split}.jsonl") or _mmlu_split_dir(found, split) is not None
    return found.suffix.lower() == ".jsonl" and _looks_multiple_choice(found)


def doc_example(doc: Any, benchmark: str) -> Any:
    """A benchmark question as an instruction example: the text-protocol prompt, then the gold answer."""
    from nacd.data import Example, doc_messages

    messages = tuple(doc_messages(doc))
    return Example(f"target/{doc.id}", doc.subject or benchmark, messages, f"{benchmark}:{doc.id}", "multiple_choice")


def load_target(config: Any) -> list[Any]:
    """The target examples named by ``select.target`` (see :func:`is_benchmark_target`).

    A benchmark split (``select.target_split``, relative paths under ``data.root``) gives one example
    per question, source = its subject (MMLU) or the benchmark name; anything else is read as
    instruction data like a ``data.sources`` entry. ``select.target_max_examples`` keeps a sample
    seeded by ``run.seed``.
    """
    from nacd.config import SourceConfig
    from nacd.data import LoadReport, load_source, sample_cap, source_name
    from nacd.evaluate import load_benchmark

    sc = config.select
    if not (sc.target and sc.target.strip()):
        raise NacdError(
            f"select.method={sc.method} needs target examples: set select.target (arc_easy, mmlu, a .jsonl "
            "of questions, or instruction data)"
        )
    spec = sc.target.strip()
    if is_benchmark_target(spec, sc.target_split, config.data.root):
        bench = load_benchmark(spec, sc.target_split, config.data.root)
        name, examples = bench.name, [doc_example(d, bench.name) for d in bench.docs]
    else:
        src = SourceConfig(path=spec)
        name = source_name(src)
        try:
            examples = load_source(src, config.data.root, config.data.strict, LoadReport(), key="select.target")
        except DataError as exc:  # the data layer names sub-keys of a source that select.target does not have
            message = re.sub(r"\s*Set select\.target\.format.*$", "", str(exc), flags=re.S)
            raise DataError(message.replace("select.target.path", "select.target")) from None
    if not examples:
        raise NacdError(f"select.target={spec!r}: no target examples were loaded")
    return sample_cap(examples, sc.target_max_examples, config.run.seed, name)


# --------------------------------------------------------------------------- selection


def select(
    examples: list[Any],
    budget: float,
    method: str = "random",
    seed: int = 0,
    targets: list[Any] | None = None,
    config: Any = None,
    run_dir: RunDir | None = None,
) -> Selection:
    """Choose ``budget`` examples of ``examples``; deterministic for a given seed.

    ``targets`` (bm25, dsir, less) are the target examples; ``config`` the whole config (for the
    method's settings, default ones when None); ``run_dir`` the run folder (less keeps its work there).
    Every method ranks the whole corpus and keeps the first ``budget`` (:func:`rank`): a larger budget's
    selection holds a smaller one's.
    """
    count = budget_count(budget, len(examples))
    ranking = rank(examples, method, seed, targets, config, run_dir)
    return Selection(ranking.ids[:count], ranking.scores[:count], method)


def rank(
    examples: list[Any],
    method: str = "random",
    seed: int = 0,
    targets: list[Any] | None = None,
    config: Any = None,
    run_dir: RunDir | None = None,
) -> Selection:
    """The whole corpus in the order ``method`` would choose it (random: a seeded permutation; the
    targeted methods: by score, ties in corpus order)."""
    count = len(examples)
    if method == "random":
        import torch

        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(examples), generator=gen)[:count].tolist()
        return Selection([examples[i].id for i in order], [1.0] * count, method)
    if method not in TARGETED:
        raise NacdError(f"select.method={method!r}: expected one of {', '.join(METHODS)}")
    if not targets:
        raise NacdError(
            f"select.method={method} needs target examples and got {'none' if targets is None else 'an empty set'}: "
            "set select.target to a benchmark (e.g. arc_easy) or to instruction data with examples"
        )
    sc = config.select if config is not None else None
    if method == "bm25":
        scores = keys = bm25_scores(examples, targets, sc.bm25 if sc else None)
    elif method == "dsir":
        scores = keys = dsir_log_weights(examples, targets, sc.dsir if sc else None)
        if sc is None or sc.dsir.gumbel:
            keys = scores + np.random.default_rng(seed).gumbel(size=len(scores))
    else:
        from nacd.less import less_scores

        if config is None or run_dir is None:
            raise NacdError("select.method=less needs the config and the run folder (use nacd select)")
        scores = keys = np.asarray(less_scores(config, examples, targets, run_dir.select_dir / "less"), np.float64)
    if scores.shape != (len(examples),) or not np.isfinite(scores).all():
        raise NacdError(
            f"select.method={method}: expected one finite score per corpus example ({len(examples)}), "
            f"got shape {scores.shape} with {int((~np.isfinite(scores)).sum())} non-finite"
        )
    order = _top(keys, count)
    return Selection([examples[i].id for i in order], [float(scores[i]) for i in order], method)


def check(config: Any) -> None:
    """Raise if this stage cannot run with ``config`` (before any work)."""
    sc = config.select
    if sc.method in TARGETED and not (sc.target and sc.target.strip()):
        raise NacdError(
            f"select.method={sc.method} needs target examples: set select.target (e.g. select.target=arc_easy); "
            "nothing was run"
        )
    if sc.method in TARGETED:
        check_target(sc.target.strip(), config.data.root)
    if sc.method == "less":
        import importlib.util

        if importlib.util.find_spec("nacd.less") is None:
            raise StageNotImplementedError("select.method=less: nacd.less is not built yet (issue #6); nothing was run")


def check_target(spec: str, data_root: str | Path) -> None:
    """``select.target`` names something that can exist: a known benchmark, built-in data, a file, folder or
    glob (as given or under ``data.root``), or a hub id. Checked before any model or Hub call, so a
    misspelt benchmark (``arc_hard``) is said at once instead of after the Hub's retries."""
    from nacd.evaluate import _HUB_ID, BUILTINS

    if spec in BUILTINS or spec.startswith(("hf:", "builtin:")) or _HUB_ID.match(spec):
        return
    path = Path(spec).expanduser()
    for candidate in [path] if path.is_absolute() else [path, Path(data_root).expanduser() / path]:
        if candidate.exists() or ("*" in spec and any(candidate.parent.glob(candidate.name))):
            return
    close = difflib.get_close_matches(spec, list(BUILTINS), n=1)
    raise NacdError(
        f"select.target={spec!r}: no known benchmark ({', '.join(BUILTINS)}"
        f"{f'; did you mean {close[0]!r}?' if close else ''}), no file or folder (also looked under "
        f"data.root = {data_root}), nor a hub id owner/name; nothing was run"
    )


def _method_config(config: Any) -> dict[str, Any] | None:
    sub = getattr(config.select, config.select.method, None)
    return dataclasses.asdict(sub) if dataclasses.is_dataclass(sub) else None


@locked("select", lambda config, run_dir: run_dir.select_dir)
def run(config: Any, run_dir: RunDir) -> Selection:
    """``nacd select``: select D_sel from ``config.data``; skipped when the same selection exists."""
    from nacd.data import corpus_hash, load_corpus

    sc = config.select
    check(config)
    ranks = current_ranks(cpu=True if config.run.device == "cpu" else None)  # every process selects (LESS splits)
    if ranks.is_main:
        run_dir.init(config)
    setup_logging(config.run.log_level, run_dir.log_path if ranks.is_main else None)
    examples, report = load_corpus(config.data)
    targeted = sc.method in TARGETED
    targets = load_target(config) if targeted else None
    if targets and report.heldout:  # the held-out loss must be measured on examples nothing was chosen for
        from nacd.evaluate.heldout import check_disjoint

        held = [ex for part in report.heldout.values() for ex in part]
        check_disjoint(held, [], {f"the selection target (select.target={sc.target})": targets})
    identity: dict[str, Any] = {
        "method": sc.method,
        "method_config": _method_config(config),
        "budget": sc.budget,
        "seed": config.run.seed,
        "target": sc.target if targeted else None,
        "target_split": sc.target_split if targeted else None,
        "target_max_examples": sc.target_max_examples if targeted else None,
        "target_hash": corpus_hash(targets) if targets else None,
        "corpus_hash": corpus_hash(examples),
    }
    if sc.method == "less":  # the gradients depend on the model, the adapter and the tokenization
        identity["model"] = config.model.spec
        identity["lora"] = dataclasses.asdict(config.lora)
        identity["max_seq_len"] = config.data.max_seq_len
    folder = run_dir.select_dir
    existing = ranks.from_main(read_manifest(folder, KIND))  # one decision for all processes
    if existing is not None and existing.get("complete") and all(existing.get(k) == v for k, v in identity.items()):
        body = verify_selection(folder, existing)
        log.info("select: the same selection exists in %s, skipped", folder)
        return Selection(body["ids"], body["scores"], sc.method)
    if targets:
        log.info("select: %d target examples from %s", len(targets), sc.target)
    start = time.perf_counter()
    ranking = rank(examples, sc.method, config.run.seed, targets, config, run_dir)
    count = budget_count(sc.budget, len(examples))
    selection = Selection(ranking.ids[:count], ranking.scores[:count], sc.method)
    seconds = time.perf_counter() - start
    if not ranks.is_main:  # the main process writes the one copy
        ranks.barrier()
        return selection
    by_id = {ex.id: ex for ex in examples}
    atomic_write_json(folder / "selection.json", {"ids": selection.ids, "scores": selection.scores})
    atomic_write_json(folder / RANKING, {"method": ranking.method, "ids": ranking.ids, "scores": ranking.scores})
    lines = [
        json.dumps({"id": i, "source": by_id[i].source, "messages": list(by_id[i].messages)}, ensure_ascii=False)
        for i in selection.ids
    ]
    atomic_write_text(folder / "selected.jsonl", "\n".join(lines) + "\n")
    write_manifest(
        folder,
        KIND,
        **identity,
        n_target=len(targets) if targets else None,
        n_corpus=len(examples),
        n_selected=len(selection.ids),
        seconds=round(seconds, 3),
        files=record_files(folder, [*SELECTION_FILES, RANKING]),
        complete=True,
    )
    ranks.barrier()
    log.info(
        "select: %d of %d examples (%s, %.1fs) -> %s", len(selection.ids), len(examples), sc.method, seconds, folder
    )
    return selection
