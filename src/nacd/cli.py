"""The ``nacd`` command line.

Every stage command takes ``-c CONFIG.yaml`` and any number of dotted
``key=value`` overrides, resolves and checks the config, and calls the stage's
``run(config, run_dir)``. Errors a user can fix are printed as one message
(no traceback) with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nacd import __version__
from nacd.errors import ConfigError, NacdError, io_error

log = logging.getLogger("nacd")
_run_log: Path | None = None  # the current stage command's nacd.log, for errors raised before it is opened

STAGE_COMMANDS = {
    "select": ("select", "Step 0: select D_sel from D_full (random, bm25, dsir, less)."),
    "experts": ("experts", "Step 1: record expert LoRA trajectories on D_full."),
    "distill": ("distill", "Step 2: distill prompt vectors for D_sel by trajectory matching."),
    "finetune": ("finetune", "Step 3: LoRA fine-tune on FULL, selected or distilled data."),
    "eval": ("evaluate", "Step 4: evaluate on multiple-choice benchmarks."),
    "run": (
        "pipeline",
        "The paper's protocol: select -> experts -> distill -> tune and evaluate every variant -> report.",
    ),
    "smoke": ("smoke", "Data + model smoke run: load the model, tokenize the corpus, print statistics."),
}

#: Per stage command: what it reads, what it writes (``<run>`` is ``run.out_dir``), the config sections it
#: takes, and an example; shown by ``nacd STAGE --help``.
STAGE_HELP = {
    "select": (
        "the corpus (data.sources); with method=less, its target (select.target)",
        "<run>/select/: selection.json (the chosen ids), selected.jsonl, ranking.json (every example ranked; "
        "the selection is its prefix), manifest.json",
        "data, select, model (LESS's gradients)",
        "nacd select -c configs/cpu-small.yaml select.method=bm25 select.budget=0.05",
    ),
    "experts": (
        "the corpus (data.sources), the model",
        "<run>/experts/run_RRR/: epoch_EEE.safetensors (the LoRA parameters at every epoch, epoch 0 the "
        "initialisation), manifest.json, a checkpoint while it runs",
        "data, model, lora, experts",
        "nacd experts -c configs/cpu-small.yaml experts.num_experts=2",
    ),
    "distill": (
        "<run>/select/ (D_sel), <run>/experts/ (the trajectories to match), the corpus, the model",
        "<run>/distill/: prompts.safetensors (the prompt vectors, nearest and initial tokens), records.jsonl "
        "(per example: the decoded prompt and the original messages), history.jsonl, panel.jsonl (the held-out "
        "prompt gain), manifest.json, checkpoint/",
        "distill (and data, model, lora as the experts had them)",
        "nacd distill -c configs/demo.yaml distill.iterations=40",
    ),
    "finetune": (
        "the corpus; <run>/select/ (finetune.dataset=selected) or <run>/distill/ (dataset=distilled)",
        "<run>/finetune/<finetune.name or dataset>/: adapter/ (a peft adapter), metrics.jsonl, manifest.json",
        "finetune, lora, data",
        "nacd finetune -c configs/cpu-small.yaml finetune.dataset=distilled finetune.model=gemma3-270m",
    ),
    "eval": (
        "the benchmarks (eval.benchmarks), the model and an adapter (eval.adapter; none: the base model)",
        "<run>/eval/<name>/: results.json (per benchmark), samples.jsonl (per question), manifest.json",
        "eval, model",
        "nacd eval -c configs/cpu-small.yaml eval.adapter=runs/cpu-small/finetune/full/adapter",
    ),
    "run": (
        "everything the stages read; each stage's outputs when already complete (a rerun skips them)",
        "every stage's folder, then <run>/report/: report.md, report.html, results.json, plots; costs.json",
        "all, and compare (variants, receivers, seeds, sizes)",
        "nacd run configs/demo.yaml compare.seeds=[0,1,2] run.out_dir=runs/demo3",
    ),
    "smoke": (
        "the corpus and the model",
        "nothing: prints the corpus and token statistics and one forward pass",
        "data, model",
        "nacd smoke -c configs/cpu-small.yaml data.max_seq_len=256",
    ),
}


def stage_epilog(name: str) -> str:
    """The ``--help`` epilog of a stage command: its inputs, outputs, config sections and an example."""
    import textwrap

    reads, writes, sections, example = STAGE_HELP[name]
    rows = [("reads:", reads), ("writes:", writes), ("config:", f"{sections} (nacd config --explain SECTION)")]
    text = [textwrap.fill(body, 100, initial_indent=f"{head:9}", subsequent_indent=" " * 9) for head, body in rows]
    return "\n".join([*text, f"example: {example}"]) + "\n"


EPILOG = """\
examples:
  nacd smoke                                   # the embedded default config
  nacd run configs/demo.yaml                   # the whole protocol and its report
  nacd run -c configs/cpu-small.yaml distill.syn_steps=8 run.out_dir=runs/try1
  nacd models prepare smollm2-135m
  nacd config --explain                        # every config key with its default and meaning
  nacd inspect runs/demo                       # distilled pseudo tokens beside the data
  nacd export runs/demo --out exports/demo     # the selected and distilled data as ordinary data sets
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="YAML", help="config file (defaults: the embedded config)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides applied after the file, e.g. distill.syn_steps=8 data.sources.0.max_examples=50; "
        "a first argument without '=' is the config file (nacd run configs/demo.yaml)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nacd",
        description="Text data distillation for LLM instruction tuning by trajectory matching (NACD).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nacd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in STAGE_COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, epilog=stage_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        _add_config_args(p)

    models = sub.add_parser(
        "models",
        help="List the built-in models or prepare them.",
        description=("List the built-in models (and whether each is ready in the cache), or prepare (convert) them."),
    )
    models.add_argument("action", nargs="?", choices=("list", "prepare"), default="list")
    models.add_argument("names", nargs="*", metavar="NAME", help="built-in names to prepare (default with --all)")
    models.add_argument("--all", action="store_true", help="prepare every built-in")
    models.add_argument("--force", action="store_true", help="convert again even if ready")
    models.add_argument("--cache-dir", help="cache folder (default: $NACD_CACHE or ~/.cache/nacd)")

    cfg = sub.add_parser(
        "config",
        help="Print the resolved config, or explain every key.",
        description=("Print the resolved config as YAML (defaults <- file <- overrides), or with --explain every key."),
    )
    _add_config_args(cfg)
    cfg.add_argument(
        "--explain", nargs="?", const="", metavar="SECTION",
        help="list every key (or one section's: --explain distill) with its type, default and meaning",
    )  # fmt: skip

    rep = sub.add_parser(
        "report",
        help="Rewrite the report of a run (nacd run) from its folder, done or not.",
        description=(
            "Rewrite <run>/report/ (report.md, report.html, plots, results.json) from the run folder as it is: "
            "cells not done yet show as '-'. Trains and evaluates nothing. Takes the run folder itself "
            "(nacd report runs/demo: its config.yaml) or -c CONFIG."
        ),
        epilog="examples:\n  nacd report runs/demo\n  nacd report -c configs/cpu-small.yaml\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(rep)

    exp = sub.add_parser(
        "export",
        help="Write a run's selected and distilled data as JSONL chats and a Hugging Face dataset.",
        description=(
            "Write <out>/distilled.jsonl (each distilled example as a chat, its decoded prompt text before its "
            "first user message, as a receiving model is tuned on it), <out>/selected.jsonl (D_sel), <out>/hf/ "
            "(both as a datasets.DatasetDict, save_to_disk) and a dataset card <out>/README.md. Takes the run "
            "folder itself or -c CONFIG."
        ),
        epilog=(
            "examples:\n  nacd export runs/demo --out exports/demo\n"
            "  nacd export runs/demo --out exports/demo --push-to-hub me/demo-distilled   # needs a token\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(exp)
    exp.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    exp.add_argument("--push-to-hub", metavar="REPO", help="also upload <out> as this Hugging Face dataset repo")

    insp = sub.add_parser(
        "inspect",
        help="Show distilled pseudo tokens beside the data; plot the loss curves.",
        description=(
            "Print, for chosen examples, the decoded nearest tokens of their prompt vectors beside the original "
            "data (the paper's Figure 3), and plot L_distill, L_reg and alpha to <run>/distill/loss.png. Takes "
            "the run folder itself (nacd inspect runs/demo) or -c CONFIG."
        ),
        epilog="examples:\n  nacd inspect runs/demo --examples 3\n  nacd inspect -c configs/demo.yaml --ids ID\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(insp)
    insp.add_argument("--examples", type=int, default=5, help="how many examples to show (default 5)")
    insp.add_argument("--ids", nargs="+", metavar="ID", help="show these example ids instead")
    insp.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    return parser


def _cmd_models(args: argparse.Namespace) -> int:
    from nacd.models import BUILTINS, builtin_dir, builtin_status, prepare_builtin

    if args.action == "list":
        if args.names or args.all:
            raise NacdError("'nacd models list' takes no names; use 'nacd models prepare NAME'")
        print(f"{'name':<14} {'status':<10} description")
        for name, builtin in BUILTINS.items():
            status = builtin_status(name, args.cache_dir)
            print(f"{name:<14} {status:<10} {builtin.description}")
            if status == "ready":
                print(f"{'':<25} {builtin_dir(name, args.cache_dir)}")
            elif status == "missing":
                print(f"{'':<25} pip install --no-deps {' '.join(builtin.packages)}")
        return 0
    names = list(BUILTINS) if args.all else args.names
    if not names:
        raise NacdError("name the built-ins to prepare, or pass --all")
    unknown = [n for n in names if n not in BUILTINS]
    if unknown:
        raise NacdError(f"unknown built-in model(s) {', '.join(unknown)}; built-ins: {', '.join(BUILTINS)}")
    for name in names:
        folder = prepare_builtin(name, args.cache_dir, force=args.force)
        print(f"{name}: ready at {folder}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from nacd.config import load_config
    from nacd.configlib import dump_yaml, explain

    cfg = load_config(args.config, args.overrides)
    if args.explain is not None:
        rows = explain(cfg)
        sections = sorted({key.split(".")[0] for key, *_ in rows if "." in key})
        if args.explain and args.explain not in sections:
            raise ConfigError(f"nacd config --explain {args.explain}: no such section; sections: {', '.join(sections)}")
        for key, type_name, value, doc in rows:
            if not args.explain or key.split(".")[0] == args.explain:
                print(f"{key} ({type_name}) = {value!r}\n    {doc}")
    else:
        sys.stdout.write(dump_yaml(cfg))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from nacd.artifacts import RunDir
    from nacd.config import load_config
    from nacd.export import export
    from nacd.folder import guard

    cfg = load_config(args.config, args.overrides)
    guard(cfg, RunDir(cfg.run.out_dir), "export")
    result = export(cfg, RunDir(cfg.run.out_dir), Path(args.out), args.push_to_hub)
    counts = ", ".join(f"{name} {n}" for name, n in result["counts"].items())
    print(f"{result['out']}: {counts} examples (JSONL, hf/ for datasets.load_from_disk, README.md: the card)")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from nacd.artifacts import RunDir
    from nacd.config import load_config
    from nacd.distill import DistilledSet
    from nacd.folder import guard
    from nacd.inspection import describe_examples, plot_history, plot_panel

    cfg = load_config(args.config, args.overrides)
    guard(cfg, RunDir(cfg.run.out_dir), "inspect")
    ds = DistilledSet.load(RunDir(cfg.run.out_dir).distill_dir)
    print(describe_examples(ds, args.examples, args.ids))
    if not args.no_plot:
        print(f"\nloss curves: {plot_history(ds)}")
        gain = plot_panel(ds.folder, ds.folder / "prompt_gain.png")
        if gain is not None:
            print(f"prompt gain: {gain}")
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from nacd.artifacts import RunDir, setup_logging
    from nacd.config import load_config
    from nacd.locks import check_writable

    cfg = load_config(args.config, args.overrides)
    setup_logging(cfg.run.log_level)
    if cfg.run.num_threads:
        import torch

        torch.set_num_threads(cfg.run.num_threads)
    module = importlib.import_module(f"nacd.{STAGE_COMMANDS[args.command][0]}")
    run_dir = RunDir(cfg.run.out_dir)
    check_writable(run_dir.root)
    global _run_log
    _run_log = run_dir.log_path
    with config_kept_on_refusal(run_dir):
        result = module.run(cfg, run_dir)
    if args.command == "run" and result:  # under torchrun only the main process has the report
        _print_report(result, "\n")
    return 0


@contextlib.contextmanager
def config_kept_on_refusal(run_dir: Any) -> Iterator[None]:
    """A command whose settings are refused (a :class:`NacdError`) before it wrote anything leaves the run
    folder's ``config.yaml`` as it found it: the folder keeps describing what it holds, not what was asked
    and refused. A command that failed after writing work keeps the config that work was made with, and a
    failure to put the file back never hides the error that stopped the command."""
    from nacd.artifacts import atomic_write_bytes

    path = run_dir.config_path
    before = path.read_bytes() if path.is_file() else None
    kept = set(run_dir.root.glob("config.*.yaml"))
    written = _newest_work(run_dir.root)
    try:
        yield
    except NacdError:
        now = path.read_bytes() if path.is_file() else None
        if now != before and _newest_work(run_dir.root) <= written:
            try:
                if before is None:
                    path.unlink(missing_ok=True)
                else:
                    atomic_write_bytes(path, before)
                for backup in set(run_dir.root.glob("config.*.yaml")) - kept:  # what RunDir.init set aside
                    if backup.read_bytes() == before:
                        backup.unlink()
            except (OSError, NacdError) as exc:
                log.warning("%s: could not put the previous config back (%s)", path, exc)
        raise


def _newest_work(root: Path) -> float:
    """The newest modification time of a file a stage writes under ``root`` (its config and log aside)."""
    newest = 0.0
    if not root.is_dir():
        return newest
    for dirpath, _, files in os.walk(root):
        for name in files:
            if dirpath == str(root) and (name.startswith("config") or name == "nacd.log"):
                continue
            if os.path.basename(dirpath) == ".locks":
                continue
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
    return newest


def log_error(command: str, exc: BaseException, message: str | None = None) -> None:
    """Every failure goes to the run's ``nacd.log`` (when a stage opened one): the message as an ERROR
    line and its traceback as a DEBUG one, so the log tells what happened without a terminal. Never
    raises: a log that cannot be written (a full disk, a read-only folder) must not hide the failure."""
    if _run_log is None:
        return
    with contextlib.suppress(Exception):  # the error being reported matters more than its log line
        _log_error(command, exc, message)


def _log_error(command: str, exc: BaseException, message: str | None) -> None:
    target = str(_run_log.resolve())
    files = [h for h in logging.getLogger().handlers if getattr(h, "baseFilename", None) == target]
    opened = None
    if not files and _run_log.parent.is_dir():  # refused before the stage opened its log
        opened = logging.FileHandler(_run_log, encoding="utf-8")
        from nacd.artifacts import log_formatter

        opened.setFormatter(log_formatter())
        files = [opened]
    if message is None:
        message = (
            f"nacd {command}{who()}: error: {exc}" if isinstance(exc, NacdError) else f"nacd {command}{who()}: {exc!r}"
        )
    records = [
        log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None),
        log.makeRecord(log.name, logging.DEBUG, __file__, 0, "traceback:", (), (type(exc), exc, exc.__traceback__)),
    ]
    for handler in files:
        for record in records:
            handler.handle(record)
        handler.flush()
    if opened is not None:
        opened.close()


def _cmd_report(args: argparse.Namespace) -> int:
    from nacd.artifacts import RunDir
    from nacd.config import load_config
    from nacd.pipeline import report

    cfg = load_config(args.config, args.overrides)
    _print_report(report(cfg, RunDir(cfg.run.out_dir)))
    return 0


def _print_report(result: dict, lead: str = "") -> None:
    """The table, the distillation's prompt gain and moved tokens, and the report's path."""
    lines = [result[key] for key in ("prompt_gain", "tokens_moved", "hard_token_gain", "skipped") if result.get(key)]
    lines += result.get("effective_size") or []
    gain = "".join(f"\n{line}" for line in lines) + "\n" if lines else ""
    print(f"{lead}{result['table']}\n{gain}\nreport: {result['report']} (and report.html beside it)")


def _config_positional(args: argparse.Namespace) -> None:
    """``nacd run configs/demo.yaml k=v``: a first argument without ``=`` is the config file."""
    overrides = getattr(args, "overrides", None)
    if overrides and "=" not in overrides[0]:
        if args.config:
            raise ConfigError(f"{overrides[0]!r}: a config file was given with -c already; overrides are KEY=VALUE")
        args.config = overrides.pop(0)
        folder = Path(args.config)
        if args.command in ("report", "inspect", "export") and folder.is_dir():  # a run folder: its config
            args.config = str(folder / "config.yaml")
            if not (folder / "config.yaml").is_file():
                raise ConfigError(f"{folder / 'config.yaml'}: not found; is {folder} a run folder (run.out_dir)?")
            overrides.insert(0, f"run.out_dir={folder}")  # where it is now, even if it was moved


class Stopped(BaseException):
    """SIGTERM arrived: a launcher stopping every process because one failed, or a user's ``kill``."""


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """Turn SIGTERM into :class:`Stopped` for the command's duration, so a stopped process says so (the
    default action ends it without a word, leaving only the launcher's summary)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def who() -> str:
    """'' in one process; ' (process R of W)' under torchrun / ``accelerate launch`` (their RANK, WORLD_SIZE)."""
    return f" (process {os.environ.get('RANK', '?')} of {_world()})" if _world() > 1 else ""


_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")
_RESUME = "finished work is kept; run the same command again and the rest resumes from its last checkpoint"


def lost_contact(exc: BaseException) -> bool:
    """Under a launcher: ``exc`` is a collective failing because another process is gone."""
    if _world() <= 1:
        return False
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover (every supported torch has it)
        DistError = ()  # noqa: N806
    return isinstance(exc, DistError) or (isinstance(exc, RuntimeError) and any(s in str(exc) for s in _LOST))


#: Commands whose work resumes from checkpoints (select: LESS's gradient shards); the others redo theirs.
_CHECKPOINTED = {"run", "select", "experts", "distill", "finetune"}


def resume_advice(command: str) -> str:
    """What a stopped command left and how to go on: a checkpointed stage resumes, an evaluation redoes."""
    if command in _CHECKPOINTED:
        return _RESUME
    return "nothing of it is kept (it keeps no checkpoint); run the same command again"


def stopped_message(command: str) -> str:
    if _world() <= 1:
        return f"nacd {command}: stopped (SIGTERM); {resume_advice(command)}"
    return (
        f"nacd {command}{who()}: stopped by the launcher (SIGTERM), which stops every process when one fails: "
        "the launcher's summary below names the one that failed and its exit code (-9, SIGKILL, is often the "
        f"out-of-memory killer), and its own error is above if it could print one; {resume_advice(command)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and argv is None:  # a launched process of the console script
        _exit_launched(code)
    return code


def _exit_launched(code: int) -> None:
    """End a launched process now, its work done: destroy the process group, flush, ``os._exit``. A gloo
    process that reaches interpreter finalisation can abort there (``terminate called without an active
    exception``, exit -6) after its results are written, even with the group destroyed at exit (about 1
    in 15 two-process evaluations on 2026-12-04); skipping finalisation leaves nothing to abort."""
    from nacd.ranks import destroy_group

    destroy_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _sigterm_stops():
            return _dispatch(args)
    except OSError as exc:  # a file-system failure outside nacd's own writers: one line naming the path
        return main_error(args.command, io_error(exc))
    except NacdError as exc:
        return main_error(args.command, exc)
    except KeyboardInterrupt as exc:
        message = f"nacd {args.command}: interrupted; {resume_advice(args.command)}"
        log_error(args.command, exc, message)
        print(message, file=sys.stderr)
        return 130
    except Stopped as exc:
        message = stopped_message(args.command)
        log_error(args.command, exc, message)
        print(message, file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as exc:  # a bug: the traceback goes to the terminal and to the run's log
        if lost_contact(exc):  # another process died: say so in one line, not with a collective's traceback
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            return main_error(
                args.command,
                NacdError(
                    f"lost contact with another process ({type(exc).__name__}: {first}): it failed or was "
                    f"stopped, and its error and the launcher's summary say which; {_RESUME}"
                ),
            )
        log_error(args.command, exc)
        raise


def _dispatch(args: argparse.Namespace) -> int:
    _config_positional(args)
    if args.command == "models":
        return _cmd_models(args)
    if args.command == "config":
        return _cmd_config(args)
    if args.command == "inspect":
        return _cmd_inspect(args)
    if args.command == "report":
        return _cmd_report(args)
    if args.command == "export":
        return _cmd_export(args)
    return _cmd_stage(args)


def main_error(command: str, exc: NacdError) -> int:
    log_error(command, exc)
    print(f"nacd {command}{who()}: error: {exc}", file=sys.stderr)
    return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
