"""Step 2 of NACD: learn k prompt vectors per selected example by trajectory matching.

Paper Section 3.2, Algorithm 1, Eqs. 1-4; the math and the unroll modes are in
:mod:`nacd.tm` and :mod:`nacd.unrolls`. Each example of D_sel gets ``k`` vectors in the input-embedding
space (D_syn, initialised per ``distill.init``). An iteration
samples an expert run and a start epoch ``t < T^m``, starts the student at the
expert snapshot theta*_t, takes N differentiable SGD steps on
concat(prompt, text) mini-batches of D_sel with the learnable lr alpha, and
updates D_syn and log(alpha) with Adam on

    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 + beta * L_reg.

Output, ``<run>/distill/``::

    prompts.safetensors  "prompts" (n, k, d) float32, "nearest_ids" (n, k), "nearest_dist" (n, k),
                         "initial_ids" (n, k): the tokens nearest the initial prompts
    records.jsonl        per example: id, source, nearest token ids and pieces, decoded prompt text, the
                         initial prompt's tokens,
                         the original messages (plain text: usable by any tokenizer)
    history.jsonl        per iteration: L_distill, L_reg, L, alpha, the draws (expert run, start epoch), seconds
    panel.jsonl          per evaluation of the held-out panel: the prompt gain (:mod:`nacd.panel`)
    alpha_fit.json       alpha_mode=fitted: the alphas chosen and every (alpha, L_distill) tried
    unroll.json          unroll=auto or fd: the mode used and why (naive's memory; fd's self-check against flat)
    manifest.json        kind "distilled": ids in order, alpha, model fingerprint, config, dims
    checkpoint/          D_syn, alpha, optimizer and RNG state every distill.checkpoint_every iterations
                         (kept at the end: a rerun with more iterations continues from it)
    loss.png             written by ``nacd inspect``
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nacd.artifacts import (
    RunDir,
    check_identity,
    read_manifest,
    recover_dir,
    remove_if_stale,
    setup_logging,
    write_manifest,
)
from nacd.distill_loop import distill
from nacd.distilled import KIND, DistilledSet, write_distilled
from nacd.errors import NacdError
from nacd.locks import locked
from nacd.ranks import Ranks
from nacd.ranks import current as current_ranks

log = logging.getLogger(__name__)

__all__ = ["KIND", "DistilledSet", "check", "distill", "run", "write_distilled"]


def check(config: Any) -> None:
    """Raise if this stage cannot run with ``config`` (every valid config can)."""


# --------------------------------------------------------------------------- inputs


def selected_ids(config: Any, run_dir: RunDir) -> tuple[list[str], Path]:
    from nacd.select import read_ids, verify_selection

    path = Path(config.distill.ids_file) if config.distill.ids_file else run_dir.select_dir / "selection.json"
    if not path.is_file():
        raise NacdError(f"distill needs D_sel: no selection at {path}; run `nacd select` or set distill.ids_file")
    if not config.distill.ids_file:
        verify_selection(run_dir.select_dir, read_manifest(run_dir.select_dir) or {})
    return read_ids(path), path


def check_experts(
    store: Any, fingerprint: str, lora: dict[str, Any], shapes: dict[str, list[int]], config: Any
) -> None:
    """Experts must come from the same base model and LoRA config, and reach epoch T^m - 1 + M."""
    if not store.runs:
        raise NacdError(f"{store.folder}: no complete expert run; run `nacd experts` first")
    need = config.distill.max_start_epoch - 1 + config.distill.expert_epochs
    for run in store.runs:
        folder = store.folder / f"run_{run:03d}"
        manifest = store.manifest(run)
        hint = "record the experts again with the model and LoRA config being distilled"
        check_identity(folder, manifest, {"lora": lora}, hint)  # names the setting (lora.r) before the shapes
        check_identity(folder, manifest, {"base_model": {**manifest["base_model"], "fingerprint": fingerprint}}, hint)
        check_identity(folder, manifest, {"parameters": shapes}, hint)
        epochs = store.epochs(run)
        if max(epochs) < need:
            raise NacdError(
                f"{folder / 'manifest.json'}: snapshots up to epoch {max(epochs)}, but distill.max_start_epoch="
                f"{config.distill.max_start_epoch} and distill.expert_epochs={config.distill.expert_epochs} need "
                f"epoch {need}; record longer experts or lower them"
            )


# --------------------------------------------------------------------------- the loop


def _identity(
    config: Any, fingerprint: str, ids: list[str], data_hash: str, alpha0: float, clip: float | None
) -> dict[str, Any]:
    dc = asdict(config.distill)
    for key in ("iterations", "checkpoint_every", "max_bad_iterations", "eval_every"):  # may change between resumes
        dc.pop(key)
    return {
        "base_model": {"spec": config.model.spec, "fingerprint": fingerprint},
        "distill": dc,
        "seed": config.run.seed,
        "ids": ids,
        "data_hash": data_hash,
        "alpha0": alpha0,
        "student_clip_norm": clip,
    }


#: Identity fields that the selection decides: when only they differ, the set is stale and is made again
#: (a setting that differs is refused).
UPSTREAM_FIELDS = ("ids", "data_hash")

#: Unroll modes that give the same meta-gradients up to rounding: a set made with one is the set any
#: other would make, so switching among them never makes a distillation "other settings".
EXACT_UNROLLS = ("auto", "flat", "naive")
#: ``distill`` keys that change how the work is done, not its result (up to rounding).
RESULT_FREE = ("vocab_chunk",)


def same_up_to_rounding(made: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """``made`` (a manifest) with the settings that cannot change the result read as ``now``'s: an exact
    ``distill.unroll`` where both are exact (:data:`EXACT_UNROLLS`; ``fd``, an approximation, differs
    from all of them) and the :data:`RESULT_FREE` keys. The manifest on disk keeps what it was made with."""
    then, asked = (x.get("distill") for x in (made, now))
    if not (isinstance(then, dict) and isinstance(asked, dict)):
        return made
    same = {k: asked[k] for k in RESULT_FREE if k in asked and k in then}
    if then.get("unroll") in EXACT_UNROLLS and asked.get("unroll") in EXACT_UNROLLS:
        same["unroll"] = asked["unroll"]
    return {**made, "distill": {**then, **same}}


def with_new_defaults(manifest: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with the ``distill`` keys added since it was written filled in at their defaults: a
    set distilled before a new option existed was made as that option's default makes it, so it stays
    usable and continuable (a key set to anything else still differs, and is refused)."""
    from nacd.config import DistillConfig

    made = manifest.get("distill")
    if not isinstance(made, dict):
        return manifest
    defaults = asdict(DistillConfig())
    added = {k: defaults[k] for k in now if k not in made and k in defaults}
    return {**manifest, "distill": {**added, **made}}


def _soft_targets(model: Any, data: list[Any], pad_token_id: int, run_dir: RunDir, topk: int) -> list[Any]:
    """``distill.soft_labels``: D_sel with the top-``topk`` distributions of expert run 0's last snapshot at
    every response position; the model's own LoRA parameters are put back (the student replaces them anyway)."""
    from nacd.lora import load_lora_state, lora_state
    from nacd.soft_labels import teacher_state, teacher_targets

    state, teacher = teacher_state(run_dir, None, "distill.soft_labels")
    own = lora_state(model)
    load_lora_state(model, state)
    log.info("distill: soft labels of expert run %d, epoch %d, top %d tokens", teacher["run"], teacher["epoch"], topk)
    try:
        return teacher_targets(model, data, pad_token_id, topk, 8)
    finally:
        load_lora_state(model, own)


def _candidate_ids(tokenizer: Any, n_rows: int, config: Any) -> Any:
    """The vocabulary rows a prompt may take (``distill.nearest``: the text tokens, or the whole-word ones)."""
    import torch

    from nacd.tm import text_token_ids, word_token_ids

    ids = (word_token_ids if config.distill.nearest == "words" else text_token_ids)(tokenizer, n_rows)
    if not ids:
        raise NacdError(
            f"distill.nearest={config.distill.nearest}: {config.model.spec!r}'s tokenizer has no such token "
            "(words: a leading space and two or more letters); use nearest=text"
        )
    return torch.tensor(ids)


@locked("distill", lambda config, run_dir: run_dir.distill_dir)
def run(config: Any, run_dir: RunDir) -> DistilledSet:
    """``nacd distill``: distill D_sel against the run's expert trajectories; resumable."""
    from nacd.chat import tokenize_corpus
    from nacd.data import load_corpus
    from nacd.experts import ExpertStore
    from nacd.lora import add_lora, lora_parameters
    from nacd.models import load_model, model_fingerprint, resolve_device
    from nacd.select import select_examples
    from nacd.student import Student
    from nacd.tm import TOKEN_INITS, check_prompt_offset, instruction_rows
    from nacd.train import tokenized_hash

    check(config)
    ids, ids_path = selected_ids(config, run_dir)
    store = ExpertStore(run_dir.experts_dir)
    if not store.runs:
        raise NacdError(f"{run_dir.experts_dir}: no complete expert run; run `nacd experts` first")
    device = resolve_device(config.run.device)
    ranks = current_ranks(cpu=device.type == "cpu")
    if ranks.is_main:
        run_dir.init(config)
    setup_logging(config.run.log_level, run_dir.log_path if ranks.is_main else None)
    model, tokenizer = load_model(config.model, device, needs_double_backward=True)
    fingerprint = model_fingerprint(model)
    corpus, _ = load_corpus(config.data)
    examples = select_examples(corpus, ids, str(ids_path))
    data = tokenize_corpus(examples, tokenizer, config.data)
    if len(data) != len(examples):
        raise NacdError(
            f"distill: {len(examples) - len(data)} selected example(s) could not be tokenized (see the log)"
        )
    offset = config.distill.prompt_offset
    check_prompt_offset(data, offset)
    model = add_lora(model, config.lora)
    shapes = {name: list(p.shape) for name, p in lora_parameters(model).items()}
    lora = {**asdict(config.lora), "target_modules": sorted(model.peft_config["default"].target_modules)}
    check_experts(store, fingerprint, lora, shapes, config)
    expert_train = store.manifest(store.runs[0])["train"]
    alpha0 = config.distill.lr_init or float(expert_train["lr"])
    clip = expert_train.get("max_grad_norm") if config.distill.student_clip else None
    identity = _identity(config, fingerprint, ids, tokenized_hash(data), alpha0, clip)
    folder = run_dir.distill_dir
    hint = f"delete {folder} to distill again with these settings"
    existing = ranks.from_main(read_manifest(folder, KIND))  # one decision for all processes
    if existing is not None:
        made = same_up_to_rounding(with_new_defaults(existing, identity["distill"]), identity)
        if remove_if_stale(folder, made, identity, UPSTREAM_FIELDS, ranks, "distill"):  # another selection
            existing = None
        else:
            check_identity(folder, made, identity, hint)
    finished = existing.get("iterations") if existing is not None and existing.get("complete") else None
    if finished == config.distill.iterations:  # finished work first: how it would be computed does not matter
        done = DistilledSet.load(folder)  # checked before it is called complete
        log.info("distill: complete in %s, skipped", folder)
        return done
    if ranks.world > config.distill.meta_batch:
        raise NacdError(
            f"distill: {ranks.world} processes but distill.meta_batch={config.distill.meta_batch} draws per update; "
            f"each process unrolls its share of a meta-batch, so set distill.meta_batch to {ranks.world} (or a "
            f"multiple of it), or launch fewer processes"
        )
    if finished is not None and finished > config.distill.iterations:
        raise NacdError(
            f"{folder}: holds a finished distillation of {finished} iterations, more than "
            f"distill.iterations={config.distill.iterations}; it is kept as it is. Use another run.out_dir to "
            f"distill {config.distill.iterations} iterations, or ask for {finished} or more to keep or continue it"
        )
    if finished is not None and not recover_dir(folder / "checkpoint").is_dir():
        raise NacdError(
            f"{folder / 'checkpoint'}: missing, so the finished {finished}-iteration distillation cannot be "
            f"continued to {config.distill.iterations}; it is kept as it is. Use another run.out_dir to distill anew"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if finished is None and ranks.is_main:  # a finished set stays valid until its continuation is written
        write_manifest(folder, KIND, **identity, complete=False)
    ranks.barrier()
    steps_on = data  # what the student steps on: the examples, or them with the teacher's soft labels
    if config.distill.soft_labels:
        steps_on = _soft_targets(model, data, tokenizer.pad_token_id, run_dir, config.distill.soft_labels_topk)
    student = Student(model, steps_on, tokenizer.pad_token_id, prompt_offset=offset)
    if config.distill.nearest != "all":
        student.vocab_ids = _candidate_ids(tokenizer, student.vocab.shape[0], config)
    model.train()  # LoRA dropout, if any, as the experts had it
    rows = instruction_rows(data, student.vocab_ids) if config.distill.init in TOKEN_INITS else None
    try:
        result = distill(student, store, config, folder, alpha0, clip=clip, example_rows=rows, ranks=ranks)
    finally:
        student.close()
    # the checkpoint stays: raising distill.iterations and rerunning continues from it
    result["processes"] = {
        "count": ranks.world,
        "draws_per_update": [len(Ranks(r, ranks.world).mine(config.distill.meta_batch)) for r in range(ranks.world)],
    }
    if ranks.is_main:
        write_distilled(folder, result, student, tokenizer, examples, identity, config.distill.vocab_chunk)
    ranks.barrier()
    log.info("distill: %d examples x %d prompt vectors -> %s", len(data), config.distill.num_prompt_tokens, folder)
    return DistilledSet.load(folder)
