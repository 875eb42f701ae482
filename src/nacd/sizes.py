"""SEL at other sizes, and the effective data size of the distilled set.

``compare.sizes`` lists multiples m of ``select.budget``. For each ranking of ``compare.size_methods``
(``select``: the config's ``select.method``; ``random``: a seeded permutation) the variant ``sel_<m>x``
(``random_<m>x``) is tuned exactly like SEL on the first round(m x budget) examples of that ranking:
every method ranks the whole corpus and a selection is a prefix of its ranking
(:func:`nacd.select.rank`), so a larger size holds a smaller one. The random ranking adds ``1x``,
which ``sel`` is only when ``select.method`` is random.

With SEL (1x) and FULL (all of D_full) these make a curve of the metric against the number of
examples; the **effective data size** of SEL+NACD is where the config's curve first reaches SEL+NACD's
metric (:func:`nacd.stats.crossing`, linear between measured sizes): "the 29 distilled examples tune
SmolLM2 like 70 selected ones", "below 0.5x" when the smallest size already reaches it, "beyond FULL"
when nothing does.

Each size's ids go to ``<run>/select/sizes/<variant>.json`` (written when missing or different); the
pipeline tunes and evaluates them as it does SEL.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacd.errors import NacdError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SizeVariant:
    """One size of one ranking: a variant of the comparison, tuned like SEL on ``multiple`` x the budget."""

    name: str
    method: str  # select | random
    multiple: float


def fmt_multiple(multiple: float) -> str:
    """``0.5`` -> ``0.5``, ``2.0`` -> ``2``."""
    return f"{multiple:g}"


def variants(config: Any) -> list[SizeVariant]:
    """The size variants of ``config``, the config's ranking first, each by ascending size."""
    cc = config.compare
    out: list[SizeVariant] = []
    for method in cc.size_methods:
        if method == "random" and config.select.method == "random" and "select" in cc.size_methods:
            continue  # the same ranking as select's
        multiples = sorted(cc.sizes)
        if method == "random" and config.select.method != "random":
            multiples = sorted([*multiples, 1.0])  # random's own 1x; select's 1x is the variant sel
        prefix = "sel" if method == "select" or config.select.method == "random" else "random"
        out += [SizeVariant(f"{prefix}_{fmt_multiple(m)}x", method, m) for m in multiples]
    return out


def label(name: str) -> str:
    """The table's row label of a size variant: ``SEL 2x``, ``random 1x``."""
    prefix, _, rest = name.partition("_")
    return f"{'SEL' if prefix == 'sel' else prefix} {rest}"


def ids_path(run_dir: Any, name: str) -> Path:
    return run_dir.select_dir / "sizes" / f"{name}.json"


def size_count(multiple: float, budget: float, n: int) -> int:
    """Examples of a size: ``multiple`` x the budget's count, at least 1 and at most the corpus."""
    from nacd.select import budget_count

    return min(max(1, round(multiple * budget_count(budget, n))), n)


def _ranking(config: Any, run_dir: Any, method: str, examples: list[Any]) -> list[str]:
    """The ids of the whole corpus in ``method``'s order: select's as ``nacd select`` recorded it (ranked
    again for folders from before it recorded one; LESS reuses its features), or a seeded permutation."""
    from nacd.select import RANKING, load_target, rank

    if method == "random":
        return rank(examples, "random", config.run.seed).ids
    path = run_dir.select_dir / RANKING
    if path.is_file():
        body = json.loads(path.read_text(encoding="utf-8"))
        if body.get("method") == config.select.method and len(body.get("ids", [])) == len(examples):
            return list(body["ids"])
    targets = load_target(config) if config.select.method != "random" else None
    return rank(examples, config.select.method, config.run.seed, targets, config, run_dir).ids


def prepare(config: Any, run_dir: Any) -> dict[str, int]:
    """Write the ids file of every size variant (a prefix of its ranking); returns variant -> count.

    Checks that the config's ranking starts with the run's selection, so that the curve and SEL agree."""
    from nacd.artifacts import atomic_write_json
    from nacd.data import corpus_hash, load_corpus
    from nacd.select import budget_count

    sizes = variants(config)
    if not sizes:
        return {}
    examples, _ = load_corpus(config.data)
    n = len(examples)
    rankings: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    digest = corpus_hash(examples)
    for v in sizes:
        if v.method not in rankings:
            rankings[v.method] = _ranking(config, run_dir, v.method, examples)
            if v.method == "select":
                selected = json.loads((run_dir.select_dir / "selection.json").read_text(encoding="utf-8"))["ids"]
                if rankings[v.method][: len(selected)] != selected:
                    raise NacdError(
                        f"{run_dir.select_dir}: the ranking does not start with the selection (made with other "
                        "settings?); delete the folder and run again"
                    )
        count = size_count(v.multiple, config.select.budget, n)
        body = {"ids": rankings[v.method][:count], "method": config.select.method if v.method == "select" else "random",
                "multiple": v.multiple, "count": count, "budget_count": budget_count(config.select.budget, n),
                "n_corpus": n, "corpus_hash": digest}  # fmt: skip
        path = ids_path(run_dir, v.name)
        if not (path.is_file() and json.loads(path.read_text(encoding="utf-8")) == body):
            atomic_write_json(path, body)
        counts[v.name] = count
    log.info("sizes: %s", ", ".join(f"{k} {c}" for k, c in counts.items()))
    return counts


def effective_size(summary: dict[str, Any], run_dir: Any, config: Any) -> dict[str, dict[str, Any]]:
    """Per model and benchmark: the curves (number of examples -> mean metric) of each ranking, SEL+NACD's
    metric, and where the config's curve (its sizes, SEL, FULL) first reaches it."""
    from nacd.stats import crossing

    sel_manifest = run_dir.select_dir / "manifest.json"
    if not config.compare.sizes or not sel_manifest.is_file():
        return {}
    body = json.loads(sel_manifest.read_text(encoding="utf-8"))
    n_sel, n_full = body.get("n_selected"), body.get("n_corpus")
    counts = {}
    for v in variants(config):
        path = ids_path(run_dir, v.name)
        if path.is_file():
            counts[v.name] = (v.method, json.loads(path.read_text(encoding="utf-8"))["count"])
    losses = set(summary.get("loss_benchmarks", []))
    out: dict[str, dict[str, Any]] = {}
    for model, rows in summary["table"].items():
        for bench in summary["benchmarks"]:
            mean = {variant: cells[bench]["mean"] for variant, cells in rows.items() if bench in cells}
            if "sel_nacd" not in mean or "sel" not in mean:
                continue
            curves: dict[str, list[tuple[int, float]]] = {"select": [(n_sel, mean["sel"])], "random": []}
            for name, (method, count) in counts.items():
                if name in mean:
                    curves[method].append((count, mean[name]))
            if "full" in mean:
                curves["select"].append((n_full, mean["full"]))
            curves = {k: sorted(v) for k, v in curves.items() if v}
            hit = crossing(curves["select"], mean["sel_nacd"], higher_is_better=bench not in losses)
            status = summary.get("gap_closed", {}).get(model, {}).get(bench, {}).get("status")
            if status in ("no_gap", "full_worse"):  # a flat or falling curve: where it "reaches" is noise
                hit = {**hit, "where": status, "size": None}
            out.setdefault(model, {})[bench] = {
                **hit,
                "multiple": None if hit["size"] is None else hit["size"] / n_sel,
                "selected": n_sel,
                "smallest": curves["select"][0][0],
                "largest": curves["select"][-1][0],
                "full_in_curve": "full" in mean,
                "target": mean["sel_nacd"],
                "curves": curves,
            }
    return out


def fmt_effective(entry: dict[str, Any] | None) -> str:
    """A table cell: ``2.4x (70 examples)``, ``below 0.5x``, ``beyond FULL``."""
    if entry is None:
        return "-"
    if entry["where"] in ("no_gap", "full_worse"):
        return "no gap to close" if entry["where"] == "no_gap" else "FULL worse than SEL"
    if entry["where"] == "between":
        return f"{entry['multiple']:.2f}x ({entry['size']:.0f} examples)"
    if entry["where"] == "below":
        return f"below {entry['smallest'] / entry['selected']:.2g}x ({entry['smallest']} examples)"
    return "beyond FULL" if entry["full_in_curve"] else f"beyond {entry['largest'] / entry['selected']:.2g}x"


def effective_line(model: str, bench: str, entry: dict[str, Any]) -> str:
    """The closing line: ``29 distilled examples tune smollm2-135m like 70 selected ones on demo_mc (2.41x)``."""
    n = entry["selected"]
    if entry["where"] in ("no_gap", "full_worse"):
        why = "FULL does not beat SEL" if entry["where"] == "no_gap" else "FULL is worse than SEL"
        return f"effective data size on {bench}: not defined for {model} ({why}, so more data does not help)"
    if entry["where"] == "between":
        what = f"like {entry['size']:.0f} selected ones ({entry['multiple']:.2f}x)"
    elif entry["where"] == "below":
        what = f"no better than {entry['smallest']} selected ones (below the smallest size measured)"
    else:
        what = "better than every size measured" + (", FULL included" if entry["full_in_curve"] else "")
    return f"effective data size: {n} distilled examples tune {model} {what} on {bench}"
