"""nacd's evaluation harness against lm-evaluation-harness: accuracy, per-question log-probs, questions/s.

Both score the same model folder on the same local files with lm-eval's protocol. lm-eval runs its
own task YAML (read from the installed package: ``tasks/arc/arc_easy.yaml``, or for MMLU
``tasks/mmlu/default/_default_template_yaml`` plus each subject's description) with only the data
source changed to the local files (``dataset_path: json`` / ``csv`` + ``dataset_kwargs.data_files``),
passed through ``TaskManager(include_path=<temp dir>)`` to ``lm_eval.simple_evaluate`` on an ``hf``
model (``HFLM(pretrained=<folder>)``, float32, the same batch size). The script prints one JSON
object: acc / acc_norm and questions/s of both, the speed-up, and how far the per-choice log-probs
of the two differ (matched question by question).

It installs nothing. It needs lm-eval in the venv (not a project dependency)::

    .venv/bin/pip install lm-eval==0.4.13

(this adds lm-eval's own dependencies, sacrebleu, scikit-learn, evaluate, ...; it leaves torch,
transformers and datasets alone but may downgrade python-dateutil, which nothing here needs at 4.x).

Run (ARC-Easy validation: 570 questions, some minutes on a CPU, most of them lm-eval's)::

    .venv/bin/python bench/bench_eval.py --model smollm2-135m --threads 2
    .venv/bin/python bench/bench_eval.py --limit 20                         # a short check
    .venv/bin/python bench/bench_eval.py --benchmark mmlu --subjects anatomy,astronomy --limit 10

The timed part of each side is everything after the model is loaded and warmed up by one
forward pass: reading the data, building the prompts, tokenization, the forward passes and the
metrics. The two run alternately ``--repeats`` times and the median time is kept.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub may be unreachable; everything here is local
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import importlib.resources  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PREFIX = "nacd_bench_"
MMLU_COLUMNS = ["question", "A", "B", "C", "D", "answer"]


def _lm_eval_yaml(*parts: str) -> dict:
    try:
        import lm_eval
    except ImportError:
        raise SystemExit("bench_eval.py needs lm-eval in the venv: .venv/bin/pip install lm-eval==0.4.13") from None
    path = importlib.resources.files(lm_eval).joinpath("tasks", *parts)
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def write_tasks(folder: Path, args: argparse.Namespace) -> list[str]:
    """lm-eval's own task YAMLs with only the data source changed to the local files; the task names.

    ARC: ``tasks/arc/<benchmark>.yaml`` reading the JSONL. MMLU: ``tasks/mmlu/default/_default_template_yaml``
    and the subject's description, one task per subject, reading the headerless Hendrycks CSVs (so the
    template names the columns A-D where the hub layout has a ``choices`` list; the text is the same).
    """
    root = Path(args.data_root) / "eval" / args.benchmark
    tasks = []
    if args.benchmark.startswith("arc"):
        task = _lm_eval_yaml("arc", f"{args.benchmark}.yaml")
        task.pop("tag", None)
        data_file = (root / f"{args.split}.jsonl").resolve()
        if not data_file.is_file():
            raise SystemExit(f"no data file {data_file} (set --data-root)")
        task.update(
            task=PREFIX + args.benchmark,
            dataset_path="json",
            dataset_name=None,
            dataset_kwargs={"data_files": {args.split: str(data_file)}},
            training_split=None,
            validation_split=args.split,
            test_split=None,
        )
        tasks.append(task)
    else:
        template = _lm_eval_yaml("mmlu", "default", "_default_template_yaml")
        split_dir = {"validation": "val"}.get(args.split, args.split)
        for subject in args.subjects:
            files = {
                "validation": root / split_dir / f"{subject}_{split_dir}.csv",
                "dev": root / "dev" / f"{subject}_dev.csv",
            }
            for f in files.values():
                if not f.is_file():
                    raise SystemExit(f"no data file {f} (check --subjects and --data-root)")
            task = dict(template)
            task.update(
                task=f"{PREFIX}mmlu_{subject}",
                dataset_path="csv",
                dataset_name=None,
                dataset_kwargs={
                    "data_files": {k: str(v.resolve()) for k, v in files.items()},
                    "column_names": MMLU_COLUMNS,
                },
                description=_lm_eval_yaml("mmlu", "default", f"mmlu_{subject}.yaml")["description"],
                doc_to_text=template["doc_to_text"]
                .replace("choices[0]", "A")
                .replace("choices[1]", "B")
                .replace("choices[2]", "C")
                .replace("choices[3]", "D"),
                doc_to_target="{{['A', 'B', 'C', 'D'].index(answer.strip())}}",
                validation_split="validation",
                test_split=None,
                fewshot_split="dev",
                metric_list=[
                    {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
                ],
            )
            tasks.append(task)
    for task in tasks:
        (folder / f"{task['task']}.yaml").write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return [t["task"] for t in tasks]


def warm_up(model) -> None:
    """One forward pass first: the first call of a process pays one-time kernel setup costs."""
    with torch.no_grad():
        model(torch.ones(4, 48, dtype=torch.long, device=next(model.parameters()).device))


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def run_lmeval(folder: str, task_dir: Path, tasks: list[str], args: argparse.Namespace) -> tuple[dict, dict, float]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=folder, batch_size=args.lm_eval_batch_size, device=args.device, dtype="float32")
    warm_up(lm.model)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    start = time.perf_counter()
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        log_samples=True,
        bootstrap_iters=0,
    )
    seconds = time.perf_counter() - start
    lls, accs = {}, []
    split_dir = {"validation": "val"}.get(args.split, args.split)
    for task in tasks:
        for s in out["samples"][task]:
            key = (
                s["doc"]["id"]
                if "id" in s["doc"]
                else f"{task.removeprefix(PREFIX + 'mmlu_')}/{split_dir}/{s['doc_id']}"
            )
            lls[key] = [float(r[0]) for r in s["filtered_resps"]]
            accs.append((s["acc"], s["acc_norm"]))
    n = len(accs)
    metrics = {"acc": sum(a for a, _ in accs) / n, "acc_norm": sum(b for _, b in accs) / n, "n": n}
    return metrics, lls, seconds


def run_nacd(folder: str, args: argparse.Namespace) -> tuple[dict, dict, float]:
    from nacd.config import EvalConfig, ModelConfig
    from nacd.evaluate import evaluate, load_benchmark
    from nacd.models import load_model

    model, tokenizer = load_model(ModelConfig(spec=folder, dtype="float32"), torch.device(args.device))
    warm_up(model)
    cfg = EvalConfig(
        benchmarks=[args.benchmark],
        split=args.split,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        limit=args.limit,
    )
    start = time.perf_counter()
    bench = load_benchmark(args.benchmark, args.split, args.data_root)
    if args.benchmark == "mmlu":
        bench.docs = [d for d in bench.docs if d.subject in args.subjects]
    results, samples = evaluate(model, tokenizer, [bench], cfg, progress=not args.quiet)
    seconds = time.perf_counter() - start
    r = results[bench.name]
    lls = {s["id"]: s["logprobs"] for s in samples}
    return {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"]}, lls, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="nacd model spec (built-in, folder, .gguf)")
    parser.add_argument("--benchmark", default="arc_easy", choices=("arc_easy", "arc_challenge", "mmlu"))
    parser.add_argument(
        "--subjects", default="anatomy,astronomy", help="mmlu: comma-separated subjects (default: anatomy,astronomy)"
    )
    parser.add_argument("--num-fewshot", type=int, default=None, help="default: the protocol's (ARC 0, MMLU 5)")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None, help="first N questions (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="nacd: questions per forward pass")
    parser.add_argument(
        "--lm-eval-batch-size", type=int, default=None, help="lm-eval: requests per pass (default: --batch-size)"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--also-unshared",
        action="store_true",
        help="also time nacd with the shared few-shot prefix turned off (each repeat, alternating)",
    )
    args = parser.parse_args()
    args.lm_eval_batch_size = args.lm_eval_batch_size or args.batch_size
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from nacd.models import resolve_spec

    folder = resolve_spec(args.model).location
    if args.num_fewshot is None:  # lm-eval's task files leave it to the caller: the protocol's default
        args.num_fewshot = 5 if args.benchmark == "mmlu" else 0
    args.subjects = [x.strip() for x in args.subjects.split(",") if x.strip()]
    with tempfile.TemporaryDirectory(prefix="nacd-bench-eval-") as tmp:
        tasks = write_tasks(Path(tmp), args)
        times: dict[str, list[float]] = {"lm_eval": [], "nacd": [], "nacd_unshared": []}
        for _ in range(args.repeats):
            ref, ref_lls, t_ref = run_lmeval(folder, Path(tmp), tasks, args)
            ours, our_lls, t_ours = run_nacd(folder, args)
            times["lm_eval"].append(t_ref)
            times["nacd"].append(t_ours)
            if args.also_unshared:
                from nacd.evaluate import scoring  # where _plan reads it

                shared_min, scoring.SHARED_PREFIX_MIN = scoring.SHARED_PREFIX_MIN, 10**9  # no prefix is that long
                try:
                    unshared, unshared_lls, t_unshared = run_nacd(folder, args)
                finally:
                    scoring.SHARED_PREFIX_MIN = shared_min
                times["nacd_unshared"].append(t_unshared)
    common = sorted(set(ref_lls) & set(our_lls))
    diffs = [abs(a - b) for i in common for a, b in zip(ref_lls[i], our_lls[i], strict=True)]
    same_pred = sum(_argmax(ref_lls[i]) == _argmax(our_lls[i]) for i in common)
    t_ref, t_ours = statistics.median(times["lm_eval"]), statistics.median(times["nacd"])
    n = ours["n"]
    report = {
        "model": args.model,
        "folder": folder,
        "benchmark": args.benchmark,
        "subjects": args.subjects if args.benchmark == "mmlu" else None,
        "num_fewshot": args.num_fewshot,
        "split": args.split,
        "n": n,
        "lm_eval": {**ref, "seconds": round(t_ref, 2), "questions_per_s": round(n / t_ref, 3)},
        "nacd": {**ours, "seconds": round(t_ours, 2), "questions_per_s": round(n / t_ours, 3)},
        "acc_diff_points": round(100 * (ours["acc"] - ref["acc"]), 3),
        "acc_norm_diff_points": round(100 * (ours["acc_norm"] - ref["acc_norm"]), 3),
        "speedup": round(t_ref / t_ours, 2),
        "questions_compared": len(common),
        "same_argmax": same_pred,
        "max_abs_logprob_diff": max(diffs) if diffs else None,
        "batch_size": {"nacd": args.batch_size, "lm_eval": args.lm_eval_batch_size},
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    if args.also_unshared:
        t_unshared = statistics.median(times["nacd_unshared"])
        report["nacd_unshared"] = {
            **unshared,
            "seconds": round(t_unshared, 2),
            "max_abs_logprob_diff_to_shared": max(
                abs(a - b) for i in our_lls for a, b in zip(our_lls[i], unshared_lls[i], strict=True)
            ),
        }
        report["speedup_from_shared_prefix"] = round(t_unshared / t_ours, 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
