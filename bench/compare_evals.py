"""Is one evaluation better than another on the same questions? A paired comparison of eval folders.

Each argument is an evaluation folder (``<run>/eval/NAME/``, holding ``samples.jsonl``) or a folder of
seed folders (``<run>/eval/MODEL/VARIANT/`` with ``seed0/``, ``seed1/``, ...: their questions are the
rows of one (seeds, questions) matrix). For every benchmark both hold, A - B in accuracy points with
the 95% paired bootstrap of :func:`nacd.stats.paired_bootstrap` (questions, and seeds where there are
several, resampled with the same indices for both; one seed against several repeats the one), one
JSON line per benchmark (a held-out loss benchmark in loss units, ``unit: loss``)::

    .venv/bin/python bench/compare_evals.py runs/cs01/eval/expert_r000_e002 runs/cs01/eval/smollm2-135m/sel

With ``--full F`` each line also gives the share of F's lead over B that A recovers, (A - B) / (F - B),
with the interval of :func:`nacd.stats.gap_closed` (the report's "gap closed"), for evaluations that lie
in different run folders (a tuning recipe against another run's FULL, or an expert's snapshot as FULL).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LOSSES: set[str] = set()  # benchmarks whose samples carry a loss (held-out loss): shown as is, not in points


def scores(folder: Path, metric: str = "acc") -> dict[str, dict[str, list[float]]]:
    """``{benchmark: {question id: [score per seed]}}`` of an eval folder or a folder of seed folders."""
    seeds = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "samples.jsonl").is_file())
    files = [folder / "samples.jsonl"] if (folder / "samples.jsonl").is_file() else [p / "samples.jsonl" for p in seeds]
    if not files:
        raise SystemExit(f"{folder}: no samples.jsonl in it or in its seed folders")
    out: dict[str, dict[str, list[float]]] = {}
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if metric not in row:  # a held-out loss benchmark's samples
                    LOSSES.add(row["benchmark"])
                value = row[metric] if metric in row else row["loss"]
                out.setdefault(row["benchmark"], {}).setdefault(row["id"], []).append(float(value))
    return out


def compare(a: Path, b: Path, metric: str = "acc", full: Path | None = None) -> list[dict]:
    import numpy as np

    from nacd.stats import gap_closed, paired_bootstrap

    sa, sb = scores(a, metric), scores(b, metric)
    sf = scores(full, metric) if full is not None else None
    lines = []
    for bench in sorted(set(sa) & set(sb)):
        ids = sorted(set(sa[bench]) & set(sb[bench]))
        ma = np.array([sa[bench][i] for i in ids]).T  # (seeds, questions)
        mb = np.array([sb[bench][i] for i in ids]).T
        seeds = [int(ma.shape[0]), int(mb.shape[0])]
        if ma.shape[0] != mb.shape[0]:  # one evaluation against several seeds: repeat the single one
            ma, mb = np.broadcast_arrays(ma, mb) if 1 in (ma.shape[0], mb.shape[0]) else (ma, mb)
        res = paired_bootstrap(ma, mb)
        k, d = (1, 4) if bench in LOSSES else (100, 2)  # a loss as it is (lower is better), accuracy in points
        lines.append(
            {"benchmark": bench, "questions": len(ids), "seeds": seeds, "unit": "loss" if k == 1 else "points",
             "a": round(k * float(ma.mean()), d), "b": round(k * float(mb.mean()), d),
             "a_minus_b": round(k * res["diff"], d), "ci": [round(k * res["lo"], d), round(k * res["hi"], d)],
             "p_le_0": round(res["p_le_0"], 3)}
        )  # fmt: skip
        if sf is not None and bench in sf and ma.shape == mb.shape and set(ids) <= set(sf[bench]):
            mf = np.array([sf[bench][i] for i in ids]).T
            paired = mf.shape[0] == ma.shape[0]
            g = gap_closed(mf, mb, ma, higher_is_better=bench not in LOSSES, paired_full=paired)
            lines[-1]["gap_closed"] = {
                "status": g["status"],
                "full_minus_b": round(k * g["gap"]["diff"], d),
                "full_ci": [round(k * g["gap"]["lo"], d), round(k * g["gap"]["hi"], d)],
                **(
                    {"ratio": round(g["ratio"], 3), "ci": [round(g["lo"], 3), round(g["hi"], 3)]}
                    if g["ratio"] is not None
                    else {}
                ),
            }
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--metric", default="acc", choices=["acc", "acc_norm"])
    p.add_argument("--full", type=Path, help="an evaluation of FULL: add the gap closed by A over B")
    args = p.parse_args(argv)
    for line in compare(args.a, args.b, args.metric, args.full):
        print(json.dumps({"a": str(args.a), "b": str(args.b), **line}))


if __name__ == "__main__":
    main()
