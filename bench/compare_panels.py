"""Is one distillation setting better than another on the same held-out draws? A paired comparison.

Two distillations of one run folder with the same seed see the same held-out panel (the same draws,
in the same order: ``bench/ablate_distill.py`` makes them so). For each draw, the held-out L_distill
with the current prompts of setting B minus that of setting A (positive: A is lower, i.e. better),
at an iteration both evaluated (default: the last one they share); the mean difference with its 95%
paired-bootstrap interval over the draws (``nacd.stats.paired_bootstrap``, 2000 resamples), how many
draws A wins, and the same for the cosine to the expert path; where the panels recorded them, each
setting's shares of the residual by LoRA factor, block (layer) and module. One JSON line per
comparison::

    .venv/bin/python bench/compare_panels.py runs/ablate6/offset1 runs/ablate5/lr3e3 [--iteration 40]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def panel_at(folder: Path) -> dict[int, dict]:
    path = folder / "distill" / "panel.jsonl" if (folder / "distill").is_dir() else folder / "panel.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["iteration"]: row for row in rows}


def compare(a: Path, b: Path, iteration: int | None = None) -> dict:
    from nacd.stats import paired_bootstrap

    pa, pb = panel_at(a), panel_at(b)
    shared = sorted(set(pa) & set(pb) - {0})
    if not shared:
        raise SystemExit(f"{a} and {b} share no panel evaluation after iteration 0")
    it = iteration if iteration is not None else shared[-1]
    if it not in shared:
        raise SystemExit(f"iteration {it}: not evaluated by both (shared: {shared})")
    da, db = pa[it]["per_draw"], pb[it]["per_draw"]
    keys = [(d["run"], d["start_epoch"]) for d in da]
    if len(da) != len(db) or any((d["run"], d["start_epoch"]) != k for d, k in zip(db, keys, strict=True)):
        raise SystemExit("the two panels hold different draws: compare distillations of one run folder and seed")
    la, lb = [d["l_current"] for d in da], [d["l_current"] for d in db]
    ca, cb = [d["cos_current"] for d in da], [d["cos_current"] for d in db]
    lower = paired_bootstrap(lb, la)  # B - A: positive when A's held-out L is lower
    cos = paired_bootstrap(ca, cb)  # A - B: positive when A's direction is closer
    return {
        "a": str(a),
        "b": str(b),
        "iteration": it,
        "draws": len(da),
        "l_a": sum(la) / len(la),
        "l_b": sum(lb) / len(lb),
        "a_lower_by": lower["diff"],
        "ci": [lower["lo"], lower["hi"]],
        "a_wins": sum(x < y for x, y in zip(la, lb, strict=True)),
        "cosine_a_minus_b": cos["diff"],
        "cosine_ci": [cos["lo"], cos["hi"]],
        "residual_a": _shares(pa[it]),
        "residual_b": _shares(pb[it]),
    }


def _shares(row: dict) -> dict | None:
    """The residual's shares by factor, layer and module, rounded (None for panels that predate them)."""
    keys = {"factor": "residual_share", "layer": "residual_share_by_layer", "module": "residual_share_by_module"}
    if "residual_share_by_layer" not in row:
        return None
    return {name: {g: round(v, 4) for g, v in row[key].items()} for name, key in keys.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", type=Path, help="a distillation's run folder (or its distill/ folder)")
    ap.add_argument("b", type=Path, nargs="+", help="the folders to compare it with, each in turn")
    ap.add_argument("--iteration", type=int, default=None, help="default: the last evaluation both made")
    args = ap.parse_args()
    for b in args.b:
        print(json.dumps(compare(args.a, b, args.iteration)))


if __name__ == "__main__":
    main()
