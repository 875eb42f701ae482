"""``nacd run``: the paper's protocol (Section 4) with one command, in one run folder.

select -> experts -> distill -> fine-tune every variant -> evaluate every variant -> report.
The variants (``compare.variants``, the rows of paper Table 1) are tuned and evaluated on the
distilling model (``model.spec``) and on every receiving model (``compare.receivers``):

* ``baseline``: no tuning, evaluated once per model;
* ``full``: LoRA on D_full; ``sel``: on D_sel; ``sel_nacd``: on D_sel with the distilled prompts
  (prompt embeddings on the distilling model, decoded nearest-token text on a receiver),
  each once per seed of ``compare.seeds``;
* controls: ``sel_soft`` (D_sel toward the expert's soft labels) and ``sel_init`` (D_sel with the
  initial prompt tokens, placed as ``sel_nacd`` places the learned ones: what prepending k tokens does);
  ``sel_nacd_soft``: the distilled set toward the expert's soft labels (both at once);
* with ``compare.sizes``, SEL at other sizes (``sel_<m>x``, ``random_<m>x``: :mod:`nacd.sizes`), for the
  effective data size of SEL+NACD.

Every stage skips work whose outputs are complete, so rerunning the same command resumes where
it stopped; changed settings are redone or refused by the stages' manifests. Each stage call's
cost (wall time, peak memory, device) goes to ``<run>/costs.json``; a call that found its outputs
complete keeps the cost recorded when they were made. The report (:mod:`nacd.report`) is written
to ``<run>/report/`` (report.md, report.html, PNG plots, results.json).

Folders: ``finetune/<model>/<variant>/seed<S>/`` and ``eval/<model>/<variant>[/seed<S>]/``.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nacd.artifacts import RunDir, atomic_write_json, setup_logging
from nacd.errors import NacdError
from nacd.evaluate import model_name
from nacd.ranks import current as current_ranks
from nacd.sizes import ids_path

log = logging.getLogger(__name__)

#: finetune.dataset of each tuned variant.
DATASETS = {
    "full": "full",
    "sel": "selected",
    "sel_soft": "selected",
    "sel_init": "distilled",
    "sel_nacd": "distilled",
    "sel_nacd_soft": "distilled",
}
#: The variants tuned toward the expert's soft labels (the distilling model's tokens: no receiver).
SOFT = ("sel_soft", "sel_nacd_soft")


@dataclass(frozen=True)
class Cell:
    """One model x variant x seed of the table: a fine-tune (unless baseline) and an evaluation."""

    model: str  # model spec
    role: str  # distilling | receiver
    variant: str  # baseline | full | sel | sel_soft | sel_init | sel_nacd | sel_nacd_soft | a size (sel_2x, ...)
    seed: int | None  # None for the baseline

    @property
    def name(self) -> str:
        base = f"{model_name(self.model)}/{self.variant}"
        return base if self.seed is None else f"{base}/seed{self.seed}"


def plan(config: Any) -> list[Cell]:
    """Every cell of the comparison, in run order (distilling model first, then each receiver)."""
    cc = config.compare
    models = [(config.model.spec, "distilling")] + [(spec, "receiver") for spec in cc.receivers]
    tags = [model_name(spec) for spec, _ in models]
    if len(set(tags)) != len(tags):
        raise NacdError(f"compare.receivers: two models share the folder name {tags}; give distinct model specs")
    from nacd.sizes import variants as size_variants

    if cc.sizes and "sel" not in cc.variants:
        raise NacdError("compare.sizes: SEL at other sizes needs the variant sel in compare.variants (its 1x)")
    sizes = [v.name for v in size_variants(config)]
    cells = []
    for spec, role in models:
        for variant in cc.variants:
            seeds = [None] if variant == "baseline" else list(cc.seeds)
            if variant == "full" and cc.full_seeds is not None:
                seeds = list(cc.full_seeds)
            if variant in SOFT and role != "distilling":
                continue  # the expert's soft labels are in the distilling model's tokens
            cells += [Cell(spec, role, variant, seed) for seed in seeds]
            if variant == "sel" and (role == "distilling" or cc.size_models == "all"):
                cells += [Cell(spec, role, size, seed) for size in sizes for seed in cc.seeds]
    return cells


def needed_stages(config: Any) -> list[str]:
    """The shared stages the variants need: select for every SEL variant, experts for the soft labels and
    the distilled set, distill for sel_nacd, sel_nacd_soft and sel_init, and for every tuned variant with
    ``finetune.recipe=student`` (its lr is the distilled alpha)."""
    variants = set(config.compare.variants)
    student = config.finetune.recipe == "student" and bool(variants - {"baseline"})
    distilled = {"sel_init", "sel_nacd", "sel_nacd_soft"}
    stages = []
    if variants & {"sel", "sel_soft", *distilled} or config.compare.sizes or student:
        stages.append("select")
    if variants & {"sel_soft", *distilled} or student:
        stages.append("experts")
    if variants & distilled or student:  # sel_init takes the set's initial tokens
        stages.append("distill")
    return stages


def cell_configs(config: Any, cell: Cell, run_dir: RunDir) -> tuple[Any | None, Any]:
    """(fine-tune config or None for the baseline, evaluation config) of one cell."""
    ft = None
    adapter = None
    if cell.variant != "baseline":
        size = cell.variant not in DATASETS  # SEL at another size (nacd.sizes)
        fc = replace(
            config.finetune,
            dataset="selected" if size else DATASETS[cell.variant],
            model=None if cell.role == "distilling" else cell.model,
            name=cell.name,
            seed=cell.seed,
            ids_file=str(ids_path(run_dir, cell.variant)) if size else None,
            soft_labels=cell.variant in SOFT,
            prompts="initial" if cell.variant == "sel_init" else "learned",
            prompt_dropout=config.finetune.prompt_dropout
            if cell.variant in ("sel_init", "sel_nacd", "sel_nacd_soft")
            else 0.0,
        )
        if size:
            fc = _fit_batch(fc, ids_path(run_dir, cell.variant))
        ft = replace(config, finetune=fc)
        adapter = str(run_dir.finetune_dir(cell.name) / "adapter")
    ev = replace(
        config,
        model=replace(config.model, spec=cell.model),
        eval=replace(config.eval, adapter=adapter, name=cell.name),
    )
    return ft, ev


def _fit_batch(fc: Any, ids_file: Path) -> Any:
    """A size smaller than one batch is tuned with one batch of all its examples (the same epochs), not
    refused: the smallest sizes of a small corpus are below ``finetune.train.batch_size``."""
    if not ids_file.is_file():  # written by nacd.sizes.prepare before any cell is tuned
        return fc
    count = json.loads(ids_file.read_text(encoding="utf-8"))["count"]
    tc = fc.train
    if count >= tc.batch_size:
        return fc
    micro = tc.micro_batch_size if tc.micro_batch_size and count % tc.micro_batch_size == 0 else None
    return replace(fc, train=replace(tc, batch_size=count, micro_batch_size=micro))


# --------------------------------------------------------------------------- stage costs


def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (since the last reset on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _manifest_times(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("manifest.json")} if folder.is_dir() else {}


def _recorded_seconds(folder: Path) -> float | None:
    """The sum of the ``seconds`` the complete manifests below ``folder`` recorded (None if none did)."""
    times = []
    for path in folder.rglob("manifest.json") if folder.is_dir() else []:
        body = json.loads(path.read_text(encoding="utf-8"))
        if body.get("complete") and isinstance(body.get("seconds"), (int, float)):
            times.append(float(body["seconds"]))
    return round(sum(times), 2) if times else None


class CostBook:
    """``<run>/costs.json``: wall time, peak memory and device of every stage call."""

    def __init__(self, path: Path, device: str, writes: bool = True):
        self.path = path
        self.device = device
        self.writes = writes  # under a launcher only the main process writes the file
        self.entries: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    @contextmanager
    def measure(self, key: str, folder: Path) -> Iterator[None]:
        """Time the block; it counts as run only if it wrote a manifest below ``folder``."""
        import torch

        before = _manifest_times(folder)
        exact = _peak_rss_reset()
        cuda = self.device.startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        ran = _manifest_times(folder) != before
        if not ran and key in self.entries:
            self.entries[key]["reused"] = True
        elif not ran and (recorded := _recorded_seconds(folder)) is not None:
            # made before this run folder's pipeline ran (e.g. by `nacd experts`): the manifests' own times
            self.entries[key] = {
                "status": "made by an earlier command",
                "seconds": recorded,
                "peak_rss_mb": None,
                "peak_rss_scope": None,
                "peak_gpu_mb": None,
                "device": self.device,
                "finished": None,
            }
        else:
            self.entries[key] = {
                "status": "ran" if ran else "reused",
                "seconds": round(seconds, 6),
                "peak_rss_mb": round(_peak_rss_mb(), 1),
                "peak_rss_scope": "stage" if exact else "process",
                "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                "device": self.device,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        self._write(key)

    def read(self) -> dict[str, Any]:
        """Every entry of the file (of every process that wrote to it)."""
        return json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else dict(self.entries)

    def _write(self, key: str) -> None:
        """Merge this call's entry into the file as it is now: pipelines running other cells of the
        same run folder at the same time keep their entries."""
        if not self.writes:
            return
        current = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        current[key] = self.entries[key]
        self.entries = {**self.entries, **current}
        atomic_write_json(self.path, current)


# --------------------------------------------------------------------------- the stage


class _SharedRunDir(RunDir):
    """The run folder as the pipeline's stages see it: the config is saved once, by the pipeline."""

    def init(self, config: Any) -> RunDir:  # noqa: ARG002 - same signature as RunDir.init
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def check(config: Any) -> None:
    """Raise (before any work) if the protocol cannot run with ``config``."""
    import importlib

    plan(config)
    for name in [*needed_stages(config), "finetune", "evaluate"]:
        importlib.import_module(f"nacd.{name}").check(config)
    if {"sel_init", "sel_nacd"} & set(config.compare.variants) and config.distill.ids_file:
        raise NacdError("distill.ids_file: nacd run distills the run's own selection; leave distill.ids_file unset")


def run(config: Any, run_dir: RunDir) -> dict[str, Any]:
    """Run the protocol (resuming), then write the report; returns the report's summary."""
    import importlib

    from nacd import evaluate, finetune, sizes
    from nacd.models import resolve_device
    from nacd.report import write_report

    check(config)
    evaluate.load_benchmarks(config, run_dir)  # data errors (and held-out overlaps) before hours of training
    device = str(resolve_device(config.run.device))
    ranks = current_ranks(cpu=device == "cpu")  # under torchrun every stage runs on every process
    if ranks.is_main:
        run_dir.init(config)
    setup_logging(config.run.log_level, run_dir.log_path if ranks.is_main else None)
    shared = _SharedRunDir(run_dir.root)
    book = CostBook(run_dir.root / "costs.json", device, writes=ranks.is_main)
    folders = {"select": run_dir.select_dir, "experts": run_dir.experts_dir, "distill": run_dir.distill_dir}
    stages = needed_stages(config)
    cells = plan(config)
    log.info(
        "nacd run: stages %s, then %d fine-tunes and %d evaluations in %s",
        " -> ".join(stages) or "(none)",
        sum(c.variant != "baseline" for c in cells),
        len(cells),
        run_dir.root,
    )
    for name in stages:
        with book.measure(name, folders[name]):
            importlib.import_module(f"nacd.{name}").run(config, shared)
    if config.compare.sizes:  # SEL at other sizes: prefixes of the selection's ranking
        if ranks.is_main:
            sizes.prepare(config, run_dir)
        ranks.barrier()
    for i, cell in enumerate(cells, 1):
        ft, ev = cell_configs(config, cell, run_dir)
        log.info("nacd run: cell %d/%d: %s", i, len(cells), cell.name)
        if ft is not None:
            with book.measure(f"finetune/{cell.name}", run_dir.finetune_dir(cell.name)):
                finetune.run(ft, shared)
        with book.measure(f"eval/{cell.name}", run_dir.eval_dir(cell.name)):
            evaluate.run(ev, shared)
    ranks.barrier()
    if not ranks.is_main:  # the main process writes the one report
        return {}
    return write_report(config, run_dir, cells, book.read())


def report(config: Any, run_dir: RunDir) -> dict[str, Any]:
    """``nacd report``: (re)write the report from whatever the run folder holds now; cells that
    are not done yet show as ``-``. Trains and evaluates nothing."""
    from nacd.folder import guard
    from nacd.report import write_report

    if not run_dir.root.is_dir():
        raise NacdError(f"run.out_dir={str(run_dir.root)!r}: no run folder; run `nacd run` first")
    guard(config, run_dir, "report")
    setup_logging(config.run.log_level)
    book = CostBook(run_dir.root / "costs.json", "")
    return write_report(config, run_dir, plan(config), book.read())
