"""Where does the trajectory the prompts match lead? Evaluate expert snapshots on the run's benchmarks.

Trajectory matching pulls the student toward the experts' path; if the experts' own snapshots score no
better than SEL on a benchmark, distilling toward them cannot be expected to lift SEL+NACD there. This
script turns each chosen snapshot of ``<run>/experts/run_RRR/epoch_EEE.safetensors`` into a peft adapter
(``<out>/run_RRR_epoch_EEE/``: the base model with the config's LoRA, the snapshot's parameters loaded)
and evaluates it with ``nacd eval`` (the config's benchmarks, split, limits and protocol), one line each
(accuracies in points, held-out losses as they are)::

    .venv/bin/python bench/eval_snapshots.py -c configs/cpu-small.yaml --run-dir runs/cs01 \\
        --out runs/cs01/snapshot_adapters [OVERRIDES ...] --epochs 1 2 [--runs 0]

The evaluations land in ``<run>/eval/expert_rRRR_eEEE/`` (skipped when complete, like any ``nacd eval``);
epoch 0 is the LoRA initialisation (B = 0), i.e. the base model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def make_adapter(config, snapshot: Path, out: Path) -> Path:
    """A peft adapter folder holding ``snapshot``'s LoRA parameters on ``config``'s model and LoRA (made
    anew each time, so that experts recorded again are never evaluated through a stale adapter)."""
    from nacd.artifacts import atomic_dir, load_tensors
    from nacd.lora import add_lora, load_lora_state
    from nacd.models import load_model

    model, _ = load_model(config.model, "cpu")
    model = add_lora(model, config.lora)
    tensors = load_tensors(snapshot)
    load_lora_state(model, tensors)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> None:
    from nacd.cli import main as nacd_main
    from nacd.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--run-dir", required=True, type=Path, help="the run folder whose experts/ to evaluate")
    p.add_argument("--out", required=True, type=Path, help="where the adapters are written")
    p.add_argument("--epochs", type=int, nargs="+", required=True)
    p.add_argument("--runs", type=int, nargs="+", default=[0])
    p.add_argument("overrides", nargs="*", help="config overrides for nacd eval (e.g. eval.benchmarks=[arc_easy])")
    args = p.parse_args(argv)
    config = load_config(args.config, [f"run.out_dir={args.run_dir}", *args.overrides])
    for r in args.runs:
        for e in args.epochs:
            snapshot = args.run_dir / "experts" / f"run_{r:03d}" / f"epoch_{e:03d}.safetensors"
            if not snapshot.is_file():
                raise SystemExit(f"{snapshot}: no such snapshot")
            adapter = make_adapter(config, snapshot, args.out / f"run_{r:03d}_epoch_{e:03d}")
            name = f"expert_r{r:03d}_e{e:03d}"
            code = nacd_main(
                ["eval", "-c", args.config, f"run.out_dir={args.run_dir}", f"eval.adapter={adapter}",
                 f"eval.name={name}", *args.overrides]
            )  # fmt: skip
            if code != 0:
                raise SystemExit(code)
            results = json.loads((args.run_dir / "eval" / name / "results.json").read_text())["benchmarks"]
            acc = {b: round(100 * v["acc"], 2) for b, v in results.items() if "acc" in v}
            loss = {b: round(v["loss"], 4) for b, v in results.items() if "acc" not in v and "loss" in v}
            print(json.dumps({"snapshot": str(snapshot), "acc": acc, "loss": loss}), flush=True)


if __name__ == "__main__":
    main()
