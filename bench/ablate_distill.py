"""Which distillation settings make the prompts learn? Paired ablation with the prompt-gain panel.

Runs ``nacd distill`` once per setting on one run folder's selection and experts (each setting in
its own folder under ``--out``, with ``select/`` and ``experts/`` linked, never copied), one after
the other, and prints per setting: the final prompt gain on the held-out panel with its 95%
paired-bootstrap interval, the relative gain, the cosine to the expert path (initial -> final
prompts), the number of distinct decoded prompts, the hard-token gain (the decoded tokens against the
initial ones) and the prompt vectors that left their initial token, the final L_reg and alpha, the mean
seconds per iteration and the wall time.
Every setting sees the same panel and the same training draws (same ``run.seed``), so the
comparison between settings is paired too. A JSON line per setting goes to stdout as it finishes,
the markdown table at the end (docs/DISTILL.md records them).

    .venv/bin/python bench/ablate_distill.py -c configs/demo.yaml --run-dir runs/demo --out runs/ablate \\
        --common distill.iterations=60 distill.eval_every=30 \\
        --setting paper "" --setting fixed "distill.alpha_mode=fixed distill.beta=0"

``--fit-panel`` makes the training draws the panel's own draws, cycled in order (the k-th training
draw is panel draw k mod P): the gain then is in-sample, a ceiling on what the prompts can do for those trajectories (their
capacity), not evidence that they generalise. Set beside the same setting's held-out run, it separates
"the prompts cannot express it" from "what they learn on some draws does not carry to others".

``--tiny ../shared/data`` runs the settings on the tests' tiny reachable target instead (a random
tiny Llama whose experts a 2-step student can imitate): seconds per setting, a lab for the
mechanics, not evidence about real models.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import platform
import shlex
import time
from pathlib import Path


@contextlib.contextmanager
def panel_as_training(seed: int):
    """While open, ``nacd distill`` trains on its panel's draws: the draws of the ``panel_draws`` call made
    with the run's own seed (the panel; the alpha fit and the unroll choice use other seeds) replace
    ``sample_draw``'s, one per call, in the panel's order, cycling (a resumed run starts the cycle again)."""
    import nacd.panel as panel

    real_draws, real_sample = panel.panel_draws, panel.sample_draw
    captured: list = []
    calls = itertools.count()

    def draws(runs, max_start_epoch, n, batch, steps, size, draw_seed):
        out = real_draws(runs, max_start_epoch, n, batch, steps, size, draw_seed)
        if draw_seed == seed and not captured:
            captured.extend(out)
        return out

    def sample(gen, runs, max_start_epoch, n, batch, steps):
        real_sample(gen, runs, max_start_epoch, n, batch, steps)  # the generator advances as in a normal run
        if not captured:
            raise RuntimeError("--fit-panel: the panel was not built before the first training draw")
        return captured[next(calls) % len(captured)]

    panel.panel_draws, panel.sample_draw = draws, sample
    try:
        yield captured
    finally:
        panel.panel_draws, panel.sample_draw = real_draws, real_sample


def run_setting(
    config: str | None, run_dir: Path, out: Path, name: str, overrides: list[str], fit_panel: bool = False
) -> dict:
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
    marker = folder / "FIT_PANEL"  # an in-sample folder is never resumed as a held-out one, nor the reverse
    if (folder / "distill").exists() and marker.exists() != fit_panel:
        raise SystemExit(
            f"{folder}: distilled {'with' if marker.exists() else 'without'} --fit-panel; use another --out"
        )
    if fit_panel:
        marker.write_text("trained on the panel's own draws (--fit-panel): the prompt gain here is in-sample\n")
    start = time.perf_counter()
    with panel_as_training(cfg.run.seed) if fit_panel else contextlib.nullcontext():
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
        "l_final": gain.get("l_current_mean", (gain.get("l_initial_mean") or 0) - (gain.get("mean") or 0)),
        "cos_initial": (gain.get("cosine") or {}).get("initial"),
        "cos_final": (gain.get("cosine") or {}).get("current"),
        "distinct_prompts": ds.manifest.get("distinct_prompts"),
        "n_examples": ds.manifest.get("n_examples"),
        "hard_relative": (ds.manifest.get("prompt_gain_hard") or {}).get("relative"),
        "hard_ci": [(ds.manifest.get("prompt_gain_hard") or {}).get(k) for k in ("ci_low", "ci_high")],
        "tokens_moved": ds.manifest.get("tokens_moved"),
        "prompt_vectors": ds.manifest.get("n_examples", 0) * ds.manifest.get("num_prompt_tokens", 0),
        "seconds_per_iteration": round(sum(h["seconds"] for h in hist) / len(hist), 2) if hist else None,
        "l_reg": hist[-1]["l_reg"] if hist else None,
        "alpha": ds.alpha,
        "iterations": ds.manifest.get("iterations"),
        "seconds": round(wall, 1),
    }


def prepare_tiny(folder: Path, data_root: str) -> list[str]:
    """The tiny reachable target of ``tests/test_distill.py`` as a lab: build the tiny random Llama, select
    and record its experts under ``folder``; returns the overrides that describe it (seconds on a CPU)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TINY_RUN_OVERRIDES  # noqa: PLC0415 (the test suite's sizes, kept in one place)
    from test_distill import REACHABLE  # noqa: PLC0415

    from nacd import experts
    from nacd import select as selection
    from nacd.artifacts import RunDir
    from nacd.config import load_config
    from nacd.testing import build_tiny_model

    model = build_tiny_model("llama", folder / "model", seed=0)
    overrides = [f"model.spec={model}", f"data.root={data_root}", *TINY_RUN_OVERRIDES, *REACHABLE]
    cfg = load_config(None, [*overrides, f"run.out_dir={folder / 'run'}", "run.log_level=WARNING"])
    run_dir = RunDir(cfg.run.out_dir)
    selection.run(cfg, run_dir)
    experts.run(cfg, run_dir)
    return overrides


def table(rows: list[dict]) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    def hard(r):  # the CI in absolute units, relative to the initial L like the gain
        rel, (lo, hi), base = r.get("hard_relative"), r.get("hard_ci") or (None, None), r.get("l_initial")
        if rel is None or lo is None or not base:
            return "-"
        return f"{100 * rel:+.2f}% [{100 * lo / base:+.2f}, {100 * hi / base:+.2f}]"

    lines = [
        "| setting | held-out L_distill initial -> final | prompt gain [95% CI] | relative | cosine initial -> final | "
        "distinct prompts | hard-token gain (relative) [95% CI] | tokens moved | L_reg | alpha | s / iteration | wall s |",
        "| --- | --- | --- | --: | --- | --: | --- | --: | --: | --: | --: | --: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {f(r['l_initial'], '.4f')} -> {f(r['l_final'], '.4f')} | {f(r['gain'], '+.4f')} [{f(r['ci_low'], '+.4f')}, {f(r['ci_high'], '+.4f')}] | "
            f"{f(100 * r['relative'] if r['relative'] is not None else None, '+.2f')}% | "
            f"{f(r['cos_initial'], '.4f')} -> {f(r['cos_final'], '.4f')} | {r['distinct_prompts']}/{r['n_examples']} | "
            f"{hard(r)} | {r.get('tokens_moved', '-')}/{r.get('prompt_vectors', '-')} | "
            f"{f(r['l_reg'], '.3f')} | {f(r['alpha'], '.3g')} | {f(r.get('seconds_per_iteration'), '.2f')} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", default=None)
    ap.add_argument("--run-dir", type=Path, help="a run folder with select/ and experts/")
    ap.add_argument(
        "--tiny",
        metavar="DATA_ROOT",
        help="instead of --run-dir/-c: the tests' tiny reachable target on the shared data at DATA_ROOT, built under --out",
    )
    ap.add_argument(
        "--fit-panel",
        action="store_true",
        help="train on the panel's own draws (in-sample: the prompts' capacity, not a held-out gain)",
    )
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
                "fit_panel": args.fit_panel,
            }
        ),
        flush=True,
    )
    common = list(args.common)
    if args.tiny:
        common = [*prepare_tiny(args.out / "tiny", args.tiny), *common]
        args.run_dir = args.out / "tiny" / "run"
    elif args.run_dir is None:
        ap.error("give --run-dir (a run folder with select/ and experts/) or --tiny DATA_ROOT")
    rows = []
    for name, extra in args.setting:
        row = run_setting(args.config, args.run_dir, args.out, name, [*common, *shlex.split(extra)], args.fit_panel)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
