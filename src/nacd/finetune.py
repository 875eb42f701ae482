"""Step 3 of NACD: LoRA fine-tuning on a data set, through the shared training loop.

``finetune.dataset`` picks the data: ``full`` (D_full: the FULL baseline),
``selected`` (D_sel: the selection-only baseline; ids from ``finetune.ids_file``
or the run's ``select/selection.json``), or ``distilled`` (D_sel plus learned
prompts: built with the distillation stage).

Output, ``<run>/finetune/<variant>/``::

    adapter/         peft adapter (adapter_config.json + adapter_model.safetensors)
    metrics.jsonl    one line per optimizer step
    manifest.json    kind "finetune": base model, LoRA, training config, seed, data hash, ids, final loss
    checkpoint/      resumable state while the run is incomplete (removed when done)
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nacd.artifacts import (
    MetricsWriter,
    RunDir,
    atomic_dir,
    check_identity,
    read_manifest,
    setup_logging,
    write_manifest,
)
from nacd.errors import NacdError, StageNotImplementedError
from nacd.train import CheckpointEvery, TrainLoop, init_lora, lora_parameters, setup_training

log = logging.getLogger(__name__)

KIND = "finetune"


def read_ids(path: str | Path) -> list[str]:
    """Example ids from a JSON list, a JSON object with ``ids``, or a text file with one id per line."""
    path = Path(path)
    if not path.is_file():
        raise NacdError(f"ids file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NacdError(f"{path}: not valid JSON ({exc})") from None
        ids = body.get("ids") if isinstance(body, dict) else body
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise NacdError(f"{path}: field 'ids' must be a list of example id strings")
    else:
        ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise NacdError(f"{path}: no example ids")
    return ids


def select_examples(examples: list[Any], ids: list[str], where: str) -> list[Any]:
    """The examples whose ids are listed, in the listed order; unknown ids are an error."""
    by_id = {ex.id: ex for ex in examples}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise NacdError(
            f"{where}: {len(unknown)} id(s) not in the corpus, e.g. {unknown[:3]} "
            "(was the selection made with other data settings?)"
        )
    return [by_id[i] for i in ids]


def check(config: Any) -> None:
    """Raise if this stage cannot run with ``config``."""
    if config.finetune.dataset == "distilled":
        raise StageNotImplementedError(
            "finetune.dataset=distilled (tuning on distilled prompts) is not implemented yet (issue #5); nothing was run"
        )


def _examples_for(config: Any, run_dir: RunDir) -> tuple[list[Any] | None, str | None]:
    from nacd.data import load_corpus

    check(config)
    if config.finetune.dataset == "full":
        return None, None
    ids_path = Path(config.finetune.ids_file) if config.finetune.ids_file else run_dir.select_dir / "selection.json"
    if not ids_path.is_file():
        raise NacdError(
            f"finetune.dataset=selected: no selection at {ids_path}; run `nacd select` first "
            "or set finetune.ids_file to a file of example ids"
        )
    ids = read_ids(ids_path)
    examples, _ = load_corpus(config.data)
    return select_examples(examples, ids, str(ids_path)), str(ids_path)


def run(config: Any, run_dir: RunDir) -> dict[str, Any]:
    """``nacd finetune``: tune ``config.model`` with LoRA on the chosen data set; resumable."""
    fc = config.finetune
    variant = fc.name or fc.dataset
    folder = run_dir.finetune_dir(variant)
    examples, ids_path = _examples_for(config, run_dir)  # fails before any loading if data is missing
    run_dir.init(config)
    setup_logging(config.run.log_level, run_dir.log_path)
    setup = setup_training(config, examples)
    seed = config.run.seed if fc.seed is None else fc.seed
    identity = {
        "base_model": {"spec": config.model.spec, "fingerprint": setup.base_fingerprint},
        "lora": {**asdict(config.lora), "target_modules": setup.lora_targets},
        "train": asdict(fc.train),
        "seed": seed,
        "data_hash": setup.data_hash,
        "dataset": fc.dataset,
    }
    existing = read_manifest(folder, KIND)
    if existing is not None:
        check_identity(folder, existing, identity, f"delete {folder} or set finetune.name to a new variant")
        if existing.get("complete"):
            log.info("finetune %s: complete in %s, skipped", variant, folder)
            return existing
    folder.mkdir(parents=True, exist_ok=True)
    init_lora(setup.model, seed)
    loop = TrainLoop(
        model=setup.model,
        dataset=setup.data,
        cfg=fc.train,
        collate=setup.collate,
        seed=seed,
        callbacks=[CheckpointEvery(fc.train.checkpoint_every)],
        checkpoint_dir=folder / "checkpoint",
        metrics=MetricsWriter(folder / "metrics.jsonl"),
        desc=f"finetune {variant}",
    )
    manifest = {
        **identity,
        "variant": variant,
        "ids_file": ids_path,
        "n_examples": len(setup.data),
        "ids": [ex.id for ex in setup.data] if examples is not None else None,
        "total_steps": loop.total_steps,
        "complete": False,
    }
    if loop.is_main:
        write_manifest(folder, KIND, **manifest)
    state = loop.run()
    if loop.is_main:
        with atomic_dir(folder / "adapter") as tmp:
            setup.model.save_pretrained(tmp)
        manifest.update(
            complete=True,
            final_loss=state.last_loss,
            seconds=round(state.seconds, 2),
            loss_tokens=state.loss_tokens,
            parameters={name: list(p.shape) for name, p in lora_parameters(setup.model).items()},
        )
        write_manifest(folder, KIND, **manifest)
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    loop.accelerator.wait_for_everyone()
    log.info("finetune %s: adapter saved in %s", variant, folder / "adapter")
    return manifest
