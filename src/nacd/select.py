"""Step 0 of NACD: select a small subset D_sel of D_full.

``select(examples, budget, method, seed)`` returns a :class:`Selection`
(example ids in rank order with their scores); :func:`run` writes it as a
self-describing artifact in ``<run>/select/``::

    manifest.json   kind "selection": method and its config, budget, seed, corpus hash and size
    selection.json  {"ids": [...rank order...], "scores": [...]}
    selected.jsonl  the selected examples themselves (id, source, messages)

Built so far: ``random`` (a seeded uniform sample). BM25, DSIR and LESS are
issue #6 and refuse with a clear message until they land.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from nacd.artifacts import RunDir, atomic_write_json, atomic_write_text, read_manifest, setup_logging, write_manifest
from nacd.errors import NacdError, StageNotImplementedError

log = logging.getLogger(__name__)

KIND = "selection"


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


def select(examples: list[Any], budget: float, method: str = "random", seed: int = 0) -> Selection:
    """Choose ``budget`` examples of ``examples``; deterministic for a given seed."""
    import torch

    count = budget_count(budget, len(examples))
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(examples), generator=gen)[:count].tolist()
        return Selection([examples[i].id for i in order], [1.0] * count, method)
    raise StageNotImplementedError(f"select.method={method!r} is not implemented yet (issue #6); use random")


def check(config: Any) -> None:
    """Raise if this stage cannot run with ``config``."""
    if config.select.method != "random":
        raise StageNotImplementedError(
            f"select.method={config.select.method!r} is not implemented yet (issue #6); nothing was run"
        )


def run(config: Any, run_dir: RunDir) -> Selection:
    """``nacd select``: select D_sel from ``config.data``; skipped when the same selection exists."""
    from nacd.data import corpus_hash, load_corpus

    sc = config.select
    check(config)
    run_dir.init(config)
    setup_logging(config.run.log_level, run_dir.log_path)
    examples, _ = load_corpus(config.data)
    identity = {
        "method": sc.method,
        "budget": sc.budget,
        "target": sc.target,
        "seed": config.run.seed,
        "corpus_hash": corpus_hash(examples),
    }
    folder = run_dir.select_dir
    existing = read_manifest(folder, KIND)
    if existing is not None and existing.get("complete") and all(existing.get(k) == v for k, v in identity.items()):
        body = json.loads((folder / "selection.json").read_text())
        log.info("select: the same selection exists in %s, skipped", folder)
        return Selection(body["ids"], body["scores"], sc.method)
    selection = select(examples, sc.budget, sc.method, config.run.seed)
    by_id = {ex.id: ex for ex in examples}
    atomic_write_json(folder / "selection.json", {"ids": selection.ids, "scores": selection.scores})
    lines = [
        json.dumps({"id": i, "source": by_id[i].source, "messages": list(by_id[i].messages)}, ensure_ascii=False)
        for i in selection.ids
    ]
    atomic_write_text(folder / "selected.jsonl", "\n".join(lines) + "\n")
    write_manifest(folder, KIND, **identity, n_corpus=len(examples), n_selected=len(selection.ids), complete=True)
    log.info("select: %d of %d examples (%s) -> %s", len(selection.ids), len(examples), sc.method, folder)
    return selection
