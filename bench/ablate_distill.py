"""Which distillation settings make the prompts learn? Paired ablation with the prompt-gain panel.

Runs ``nacd distill`` once per setting on one run folder's selection and experts (each setting in
its own folder under ``--out``, with ``select/`` and ``experts/`` linked, never copied), one after
the other, and prints per setting: the final prompt gain on the held-out panel with its 95%
paired-bootstrap interval, the relative gain, the cosine to the expert path (initial -> final
prompts), the number of distinct decoded prompts, the final L_reg and alpha, and the wall time.
Every setting sees the same panel and the same training draws (same ``run.seed``), so the
comparison between settings is paired too. A JSON line per setting goes to stdout as it finishes,
the markdown table at the end (docs/DISTILL.md records them).

    .venv/bin/python bench/ablate_distill.py -c configs/demo.yaml --run-dir runs/demo --out runs/ablate \\
        --common distill.iterations=60 distill.eval_every=30 \\
        --setting paper "" --setting fixed "distill.alpha_mode=fixed distill.beta=0"
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import time
from pathlib import Path


def run_setting(config: str | None, run_dir: Path, out: Path, name: str, overrides: list[str]) -> dict:
    from nacd import distill
    from nacd.artifacts import RunDir
    from nacd.config import load_config

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for stage in ("select", "experts"):
        link = folder / stage
        if not link.exists():
            link.symlink_to((run_dir / stage).resolve(), target_is_directory=True)
    cfg = load_config(config, [*overrides, f"run.out_dir={folder}"])
    start = time.perf_counter()
    ds = distill.run(cfg, RunDir(cfg.run.out_dir))
    wall = time.perf_counter() - start
    gain = ds.manifest.get("prompt_gain") or {}
    hist = ds.history()
    return {
        "setting": name,
        "overrides": " ".join(overrides),
        "gain": gain.get("mean"),
        "ci_low": gain.get("ci_low"),
        "ci_high": gain.get("ci_high"),
        "relative": gain.get("relative"),
        "l_initial": gain.get("l_initial_mean"),
        "cos_initial": (gain.get("cosine") or {}).get("initial"),
        "cos_final": (gain.get("cosine") or {}).get("current"),
        "distinct_prompts": ds.manifest.get("distinct_prompts"),
        "n_examples": ds.manifest.get("n_examples"),
        "l_reg": hist[-1]["l_reg"] if hist else None,
        "alpha": ds.alpha,
        "iterations": ds.manifest.get("iterations"),
        "seconds": round(wall, 1),
    }


def table(rows: list[dict]) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [
        "| setting | prompt gain [95% CI] | relative | cosine initial -> final | distinct prompts | L_reg | alpha | "
        "wall s |",
        "| --- | --- | --: | --- | --: | --: | --: | --: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {f(r['gain'], '+.4f')} [{f(r['ci_low'], '+.4f')}, {f(r['ci_high'], '+.4f')}] | "
            f"{f(100 * r['relative'] if r['relative'] is not None else None, '+.2f')}% | "
            f"{f(r['cos_initial'], '.4f')} -> {f(r['cos_final'], '.4f')} | {r['distinct_prompts']}/{r['n_examples']} | "
            f"{f(r['l_reg'], '.3f')} | {f(r['alpha'], '.3g')} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", default=None)
    ap.add_argument("--run-dir", required=True, type=Path, help="a run folder with select/ and experts/")
    ap.add_argument("--out", required=True, type=Path, help="one folder per setting goes here")
    ap.add_argument("--common", nargs="*", default=[], help="overrides every setting gets")
    ap.add_argument(
        "--setting",
        nargs=2,
        action="append",
        metavar=("NAME", "OVERRIDES"),
        required=True,
        help='a setting: its name and its overrides in one string ("" for the defaults)',
    )
    args = ap.parse_args()
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "date": time.strftime("%Y-%m-%d"),
                "config": args.config,
                "common": args.common,
            }
        ),
        flush=True,
    )
    rows = []
    for name, extra in args.setting:
        row = run_setting(args.config, args.run_dir, args.out, name, [*args.common, *shlex.split(extra)])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
