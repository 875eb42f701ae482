"""The report of ``nacd run``: the comparison table, statistics, distillation plots and stage costs.

Everything is computed from the run folder's artifacts (``eval/*/samples.jsonl``, ``distill/``,
``finetune/*/metrics.jsonl``, ``costs.json``), so a report can be rebuilt at any time. Written to
``<run>/report/``::

    report.md      the table in the paper's layout (rows: variants; columns: model x benchmark),
                   SEL+NACD vs SEL paired bootstrap intervals, plots, pseudo-token examples, costs
    report.html    the same, self-contained (plots embedded as data URIs)
    results.json   the numbers behind the table
    *.png          the plots

The paired bootstrap (:func:`nacd.stats.paired_bootstrap`) resamples questions, and seeds when there are
several, with the same indices for both variants, and reports the percentile interval of the
difference of the mean metric.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacd.artifacts import atomic_write_json, atomic_write_text, read_jsonl, read_manifest
from nacd.errors import NacdError
from nacd.sizes import effective_line, effective_size, fmt_effective
from nacd.sizes import label as size_label
from nacd.stats import gap_closed, mean_std, paired_bootstrap

log = logging.getLogger(__name__)

LABELS = {
    "baseline": "Baseline (no tuning)",
    "full": "FULL",
    "sel": "SEL",
    "sel_soft": "SEL + expert soft labels",
    "sel_init": "SEL + initial prompt tokens",
    "sel_nacd": "SEL+NACD",
    "sel_nacd_soft": "SEL+NACD + expert soft labels",
}


# --------------------------------------------------------------------------- collecting the run


@dataclass
class Scores:
    """Per-question scores of one evaluated cell: ``{benchmark: {question id: score}}`` plus summaries."""

    per_question: dict[str, dict[str, float]]
    results: dict[str, Any]


#: How the report names each ``distill.alpha_mode`` (manifests from before the modes: learned).
_ALPHA_MODES = {
    "shared": "learned",
    "per_epoch": "learned per start epoch; their mean",
    "fixed": "fixed at alpha_0",
    "fitted": "fitted per start epoch with the initial prompts; their mean",
}


def read_scores(eval_dir: Path, metric: str) -> Scores | None:
    """The cell's per-question ``metric`` from ``samples.jsonl``; None if the evaluation is missing."""
    manifest = read_manifest(eval_dir, "eval")
    if manifest is None or not manifest.get("complete"):
        return None
    per_q: dict[str, dict[str, float]] = {}
    for s in read_jsonl(eval_dir / "samples.jsonl"):  # a held-out benchmark's samples carry their loss
        per_q.setdefault(s["benchmark"], {})[s["id"]] = float(s[metric] if metric in s else s["loss"])
    results = json.loads((eval_dir / "results.json").read_text(encoding="utf-8"))["benchmarks"]
    return Scores(per_q, results)


def summarize(config: Any, run_dir: Any, cells: Sequence[Any]) -> dict[str, Any]:
    """The table's numbers: per model, variant and benchmark the per-seed metric, mean and std, and
    per model and benchmark the SEL+NACD vs SEL paired bootstrap."""
    cc = config.compare
    metric = cc.metric
    table: dict[str, dict[str, dict[str, Any]]] = {}
    matrices: dict[tuple[str, str, str], dict[int | None, dict[str, float]]] = {}
    losses: set[str] = set()  # benchmarks scored by a loss (lower is better), not in points
    for cell in cells:
        scores = read_scores(run_dir.eval_dir(cell.name), metric)
        if scores is None:
            continue
        for bench, per_q in scores.per_question.items():
            matrices.setdefault((cell.model, cell.variant, bench), {})[cell.seed] = per_q
            if scores.results.get(bench, {}).get("kind") == "loss":
                losses.add(bench)
    models = list(dict.fromkeys(c.model for c in cells))
    benches = sorted({k[2] for k in matrices}, key=lambda b: (b not in config.eval.benchmarks, b))
    for model in models:
        for variant in dict.fromkeys(c.variant for c in cells):  # compare.variants and SEL's other sizes
            for bench in benches:
                by_seed = matrices.get((model, variant, bench))
                if not by_seed:
                    continue
                scale = 1 if bench in losses else 100
                per_seed = {str(s): scale * sum(q.values()) / len(q) for s, q in by_seed.items()}
                mean, std = mean_std(list(per_seed.values()))
                n_q = len(next(iter(by_seed.values())))
                table.setdefault(model, {}).setdefault(variant, {})[bench] = {
                    "per_seed": per_seed,
                    "mean": mean,
                    "std": std,
                    "n_seeds": len(per_seed),
                    "n_questions": n_q,
                }
    bootstrap: dict[str, dict[str, Any]] = {}
    for model in models:
        for bench in benches:
            a, b = matrices.get((model, "sel_nacd", bench)), matrices.get((model, "sel", bench))
            seeds = sorted(set(a or {}) & set(b or {}), key=str)
            if not seeds:
                continue
            qids = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
            if not qids:
                continue
            ma = [[a[s][q] for q in qids] for s in seeds]
            mb = [[b[s][q] for q in qids] for s in seeds]
            res = paired_bootstrap(ma, mb, cc.bootstrap_samples, cc.confidence, config.run.seed)
            scale = 1 if bench in losses else 100
            bootstrap.setdefault(model, {})[bench] = {k: (scale * v if k in ("diff", "lo", "hi") else v)
                                                     for k, v in res.items()}  # fmt: skip
    gaps: dict[str, dict[str, dict[str, Any]]] = {}  # variant -> model -> benchmark
    for variant in ("sel_nacd", *CONTROLS):
        for model in models:
            for bench in benches:
                gap = _gap(matrices, model, bench, bench not in losses, config, variant)
                if gap is not None:
                    gaps.setdefault(variant, {}).setdefault(model, {})[bench] = gap
    summary = {"metric": metric, "models": models, "benchmarks": benches, "table": table, "bootstrap": bootstrap,
               "gap_closed": gaps.pop("sel_nacd", {}), "gap_closed_controls": gaps,
               "loss_benchmarks": sorted(losses)}  # fmt: skip
    summary["effective_size"] = effective_size(summary, run_dir, config)
    return summary


#: Baselines whose gap closed is given beside SEL+NACD's (``summary["gap_closed_controls"]``).
CONTROLS = ("sel_soft", "sel_init", "sel_nacd_soft")


def _gap(
    matrices: dict, model: str, bench: str, higher_is_better: bool, config: Any, variant: str = "sel_nacd"
) -> dict[str, Any] | None:
    """The gap closed by ``variant`` (SEL+NACD, or a control) for one model and benchmark
    (:func:`nacd.stats.gap_closed`), in the table's units, or None while FULL, SEL or the variant is
    missing. SEL and the variant are paired by seed, and FULL too when it has every one of their seeds
    (``compare.full_seeds`` may give it fewer)."""
    full, sel, nacd = (matrices.get((model, v, bench)) for v in ("full", "sel", variant))
    if not (full and sel and nacd):
        return None
    seeds = sorted(set(sel) & set(nacd), key=str)
    if not seeds:
        return None
    paired = set(seeds) <= set(full)
    full_seeds = seeds if paired else sorted(full, key=str)
    qids = sorted(
        set.intersection(*(set(m[s]) for m, ss in ((sel, seeds), (nacd, seeds), (full, full_seeds)) for s in ss))
    )
    if not qids:
        return None
    cc = config.compare
    res = gap_closed(
        [[full[s][q] for q in qids] for s in full_seeds],
        [[sel[s][q] for q in qids] for s in seeds],
        [[nacd[s][q] for q in qids] for s in seeds],
        higher_is_better=higher_is_better,
        paired_full=paired,
        samples=cc.bootstrap_samples,
        confidence=cc.confidence,
        seed=config.run.seed,
    )
    scale = 100 if higher_is_better else 1
    for key in ("gap", "recovered"):
        res[key] = {k: scale * v for k, v in res[key].items()}
    return res


def fmt_gap(gap: dict[str, Any] | None, unit: str = "points") -> str:
    """A gap-closed cell: ``41% [12%, 70%]``, or why there is no ratio to read."""
    if gap is None:
        return "-"
    g = gap["gap"]
    d = 2 if unit == "points" else 4
    lead = f"FULL - SEL {g['diff']:+.{d}f} [{g['lo']:+.{d}f}, {g['hi']:+.{d}f}]" + (
        "" if unit == "points" else f" {unit}"
    )
    if gap["status"] == "no_gap":
        return f"no gap to close ({lead})"
    if gap["status"] == "full_worse":
        return f"FULL worse than SEL: nothing to close ({lead})"
    return f"{100 * gap['ratio']:+.0f}% [{100 * gap['lo']:+.0f}%, {100 * gap['hi']:+.0f}%]"


# --------------------------------------------------------------------------- rendering (pure)


def fmt_cell(entry: dict[str, Any] | None, digits: int = 2) -> str:
    if entry is None:
        return "-"
    if entry["std"] is None:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def table_rows(summary: dict[str, Any], model_names: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (paper layout: variants down, model x benchmark across)."""
    losses = set(summary.get("loss_benchmarks", []))
    header = ["Method"] + [
        f"{model_names.get(m, m)}: {b}" + (" (loss)" if b in losses else "")
        for m in summary["models"]
        for b in summary["benchmarks"]
    ]
    variants = list(dict.fromkeys(v for m in summary["table"].values() for v in m))
    rows = []
    for variant in variants:
        row = [LABELS.get(variant) or size_label(variant)]
        for m in summary["models"]:
            for b in summary["benchmarks"]:
                row.append(fmt_cell(summary["table"].get(m, {}).get(variant, {}).get(b), 4 if b in losses else 2))
        rows.append(row)
    units = {b: "loss" if b in losses else "points" for b in summary["benchmarks"]}
    controls = summary.get("gap_closed_controls") or {}
    for label, per_model, fmt in (
        ("Gap closed by SEL+NACD", summary.get("gap_closed"), lambda e, b: fmt_gap(e, units[b])),
        *((f"Gap closed by {LABELS[v]}", controls.get(v), lambda e, b: fmt_gap(e, units[b])) for v in CONTROLS),
        ("Effective data size of SEL+NACD", summary.get("effective_size"), lambda e, b: fmt_effective(e)),
    ):
        if per_model:
            cells = [fmt(per_model.get(m, {}).get(b), b) for m in summary["models"] for b in summary["benchmarks"]]
            rows.append([label, *cells])
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Doc:
    """A report as blocks, rendered to Markdown and to self-contained HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (path, caption)))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "h":
                out.append("#" * value[0] + " " + value[1])
            elif kind == "p":
                out.append(value)
            elif kind == "table":
                out.append(markdown_table(*value))
            elif kind == "img":
                out.append(f"![{value[1]}]({value[0].name})")
            else:
                out.append("```\n" + value + "\n```")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "h":
                out.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
            elif kind == "p":
                out.append(f"<p>{html.escape(value)}</p>")
            elif kind == "table":
                out.append(html_table(*value))
            elif kind == "img":
                data = base64.b64encode(value[0].read_bytes()).decode("ascii")
                out.append(
                    f'<figure><img alt="{html.escape(value[1])}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(value[1])}</figcaption></figure>"
                )
            else:
                out.append(f"<pre>{html.escape(value)}</pre>")
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;"
            "text-align:left;vertical-align:top}th{background:#eee}img{max-width:100%}"
            "pre{background:#f6f6f6;padding:8px;overflow-x:auto}figcaption{color:#555;font-size:90%}"
        )
        return (
            f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(out)}</body></html>\n"
        )


# --------------------------------------------------------------------------- plots


def _plot_distances(ds: Any, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(ds.nearest_dist.flatten().tolist(), bins=30, color="#4477aa")
    ax.set_xlabel("distance of a prompt vector to its nearest vocabulary embedding")
    ax.set_ylabel("prompt vectors")
    ax.set_title(f"{ds.prompts.shape[0]} examples x {ds.prompts.shape[1]} vectors")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_finetune(run_dir: Any, cells: Sequence[Any], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for cell in cells:
        path = run_dir.finetune_dir(cell.name) / "metrics.jsonl"
        if cell.variant != "baseline" and path.is_file():
            rows = [r for r in read_jsonl(path) if "loss" in r]
            if rows:
                curves.append((cell.name, [r["loss"] for r in rows]))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, losses in curves:
        ax.plot(range(1, len(losses) + 1), losses, lw=1, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_sizes(summary: dict[str, Any], names: dict[str, str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, b, e) for m, per in summary["effective_size"].items() for b, e in per.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (model, bench, e) in zip(axes[0], panels, strict=True):
        for method, points in e["curves"].items():
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                "o-",
                label="SEL sizes, FULL last" if method == "select" else "random sizes",
            )
        ax.axhline(e["target"], color="#cc3311", ls="--", label="SEL+NACD")
        if e["size"] is not None:
            ax.axvline(e["size"], color="#cc3311", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("tuning examples")
        ax.set_ylabel("loss" if bench in summary.get("loss_benchmarks", []) else summary["metric"] + " (%)")
        ax.set_title(f"{names.get(model, model)}: {bench}", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- the report


def _fmt_cost(entry: dict[str, Any]) -> list[str]:
    if entry.get("peak_rss_mb") is None:
        mem = "not measured"
    else:
        scope = " (process peak)" if entry.get("peak_rss_scope") == "process" else ""
        mem = f"{entry['peak_rss_mb']:.0f} MiB RSS{scope}"
    if entry.get("peak_gpu_mb") is not None:
        mem += f", {entry['peak_gpu_mb']:.0f} MiB GPU"
    status = entry["status"] + (" (reused since)" if entry.get("reused") else "")
    return [f"{entry['seconds']:.1f}", mem, entry["device"], status]


def _corpus_line(run_dir: Any) -> str:
    sel = read_manifest(run_dir.select_dir, "selection")
    if sel is None:
        return ""
    return f"D_full: {sel['n_corpus']} examples; D_sel: {sel['n_selected']} ({sel['method']}, budget {sel['budget']})."


def _bootstrap_section(doc: Doc, config: Any, summary: dict[str, Any], names: dict[str, str]) -> None:
    """The paired bootstrap of SEL+NACD against SEL, per model and benchmark."""
    boot_rows = []
    for model, per_bench in summary["bootstrap"].items():
        for bench, r in per_bench.items():
            d = 4 if bench in summary["loss_benchmarks"] else 2  # a loss in its units (lower is better)
            boot_rows.append(
                [
                    names[model],
                    bench + (" (loss)" if d == 4 else ""),
                    f"{r['diff']:+.{d}f}",
                    f"[{r['lo']:+.{d}f}, {r['hi']:+.{d}f}]",
                    f"{r['p_le_0']:.3f}",
                    f"{r['n_questions']} x {r['n_seeds']}",
                ]
            )
    if boot_rows:
        doc.h("SEL+NACD vs SEL (paired bootstrap)")
        doc.p(
            f"Difference of {summary['metric']} in points (of the loss, for a loss benchmark), "
            f"{int(100 * config.compare.confidence)}% percentile interval over "
            f"{config.compare.bootstrap_samples} resamples of questions (and seeds), the same draws for both variants; "
            "P(diff <= 0) is the one-sided bootstrap p-value for SEL+NACD beating SEL (for a loss, lower is "
            "better: there the p-value is about 1 - P(diff <= 0))."
        )
        doc.table(["model", "benchmark", "diff", "interval", "P(diff <= 0)", "questions x seeds"], boot_rows)


def _distill_section(doc: Doc, run_dir: Any, folder: Path) -> Any:
    """The distillation's figures, plots and decoded tokens; the distilled set, or None when there is none
    or it cannot be read (said in the report)."""
    from nacd.distill import DistilledSet
    from nacd.inspection import describe_examples, plot_history, plot_panel

    ds = None
    if (run_dir.distill_dir / "manifest.json").is_file():  # absent: no distillation in this run
        try:
            ds = DistilledSet.load(run_dir.distill_dir)
        except NacdError as exc:  # said, not dropped: the table may still show SEL+NACD tuned before the damage
            doc.h("Distillation")
            doc.p(f"The distilled set cannot be read: {exc}")
            log.warning("report: the distilled set cannot be read: %s", exc)
    if ds is not None:
        doc.h("Distillation")
        m = ds.manifest
        doc.p(
            f"{m['n_examples']} examples x {m['num_prompt_tokens']} prompt vectors, {m['iterations']} iterations "
            f"({m.get('skipped_iterations', 0)} skipped), student lr alpha = {ds.alpha:.4g} "
            f"({_ALPHA_MODES.get((m.get('distill') or {}).get('alpha_mode'), 'learned')}), "
            f"mean distance to the nearest vocabulary embedding {float(ds.nearest_dist.mean()):.4f}."
        )
        doc.p(ds.gain_line() + " (docs/DISTILL.md: the held-out panel; alpha cannot move this figure).")
        doc.p(ds.moved_line() + ".")
        doc.p(ds.hard_gain_line() + ".")
        gain_plot = plot_panel(ds.folder, folder / "prompt_gain.png")
        if gain_plot is not None:
            doc.img(gain_plot, "Prompt gain on the held-out panel per evaluation, with its 95% paired-bootstrap band")
        curves = plot_history(ds, folder / "distill_curves.png")
        doc.img(curves, "L_distill (Eq. 2), L_reg (Eq. 3) and alpha over iterations")
        doc.img(_plot_distances(ds, folder / "nearest_distances.png"), "Nearest-token distances of the prompt vectors")
        doc.h("Decoded pseudo tokens (paper Figure 3)", 3)
        moved = [False] * len(ds.ids) if ds.initial_ids is None else (ds.nearest_ids != ds.initial_ids).any(1).tolist()
        shown = [ds.ids[i] for i in sorted(range(len(ds.ids)), key=lambda i: not moved[i])[:6]]  # changed text first
        doc.pre(describe_examples(ds, ids=shown, width=120))
    return ds


def _closing_sections(
    doc: Doc,
    summary: dict[str, Any],
    names: dict[str, str],
    run_dir: Any,
    cells: Sequence[Any],
    costs: dict[str, Any],
    folder: Path,
) -> None:
    """The effective data size, the tuning curves and the cost of each stage."""
    if summary["effective_size"]:
        doc.h("Effective data size")
        doc.p(
            "SEL at other sizes (compare.sizes, multiples of the selection budget, prefixes of the selection's "
            "ranking) with SEL and FULL make a curve of the metric against the number of examples; the effective "
            "data size is where it first reaches SEL+NACD (linear between the measured sizes)."
        )
        doc.img(
            _plot_sizes(summary, names, folder / "effective_size.png"),
            "Metric against examples, per model and benchmark",
        )
    ft_plot = _plot_finetune(run_dir, cells, folder / "finetune_loss.png")
    if ft_plot is not None:
        doc.h("Tuning")
        doc.img(ft_plot, "Training loss of every tuned variant")
    if costs:
        doc.h("Cost of each stage")
        doc.table(
            ["stage", "wall s", "peak memory", "device", "status"], [[k, *_fmt_cost(v)] for k, v in costs.items()]
        )
        total = sum(v["seconds"] for v in costs.values())
        doc.p(f"Total wall time of the stages: {total / 60:.1f} min.")


def write_report(config: Any, run_dir: Any, cells: Sequence[Any], costs: dict[str, Any]) -> dict[str, Any]:
    """Write ``<run>/report/`` and return ``{"table": markdown table, "report": path, "summary": ...}``."""
    from nacd.evaluate import model_name

    folder = run_dir.root / "report"
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(config, run_dir, cells)
    names = {m: model_name(m) + (" (distills)" if m == config.model.spec else " (receives)") for m in summary["models"]}
    header, rows = table_rows(summary, names)
    metric = summary["metric"]
    doc = Doc()
    doc.h(f"nacd run: {run_dir.root}", 1)
    doc.p(
        f"Paper Table 1 layout: {metric} (%) on {', '.join(summary['benchmarks'])} "
        f"({config.eval.split} split), mean ± std over seeds {config.compare.seeds} for tuned variants. "
        + _corpus_line(run_dir)
    )
    doc.table(header, rows)
    if summary["gap_closed"]:
        doc.p(
            "Gap closed: (M(SEL+NACD) - M(SEL)) / (M(FULL) - M(SEL)), how much of FULL's lead over SEL the distilled "
            f"set recovers, with its {int(100 * config.compare.confidence)}% bootstrap interval (questions and seeds "
            "resampled, the same draws for the three variants; for a loss both differences change sign together). "
            "Where the interval of FULL - SEL holds 0 there is no gap to close and no ratio is given."
            + (
                " Loss columns: the mean response-token loss of held-out examples, lower is better."
                if summary["loss_benchmarks"]
                else ""
            )
        )
    _bootstrap_section(doc, config, summary, names)
    ds = _distill_section(doc, run_dir, folder)
    _closing_sections(doc, summary, names, run_dir, cells, costs, folder)
    md_path = atomic_write_text(folder / "report.md", doc.markdown())
    atomic_write_text(folder / "report.html", doc.html(f"nacd run {run_dir.root}"))
    atomic_write_json(folder / "results.json", {"summary": summary, "costs": costs, "cells": [c.name for c in cells]})
    log.info("report: %s", md_path)
    return {
        "table": markdown_table(header, rows),
        "report": str(md_path),
        "summary": summary,
        "prompt_gain": ds.gain_line() if ds is not None else None,
        "tokens_moved": ds.moved_line() if ds is not None else None,
        "hard_token_gain": ds.hard_gain_line() if ds is not None else None,
        "skipped": ds.skipped_line() if ds is not None else None,
        "effective_size": [
            effective_line(names.get(m, m).split(" (")[0], b, e)
            for m, per in summary["effective_size"].items()
            for b, e in per.items()
        ],
    }
