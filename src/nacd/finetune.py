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

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from nacd.artifacts import (
    MetricsWriter,
    RunDir,
    atomic_dir,
    record_files,
    remove_dir,
    setup_logging,
    verify_files,
    write_manifest,
)
from nacd.errors import NacdError
from nacd.locks import locked
from nacd.lora import init_lora, lora_parameters
from nacd.select import read_ids, select_examples
from nacd.train import CheckpointEvery, TrainLoop, setup_training

log = logging.getLogger(__name__)

KIND = "finetune"


def check(config: Any) -> None:
    """Raise if this stage cannot run with ``config`` (every valid config can)."""


#: Where the decoded prompt text goes in text mode: before the first user message's content.
PROMPT_TEXT_SEPARATOR = "\n"


def prompted_messages(messages: Any, prompt_text: str, example_id: str = "") -> list[dict[str, str]]:
    """A copy of ``messages`` with ``prompt_text`` + newline prepended to the first user message (text mode).

    The chat template (or the fallback format) then renders it inside the user turn, so the
    pseudo tokens sit where the prompt vectors sit for the distilling model: before the
    instruction, after the template's own header tokens. ``nacd export`` writes the same chats.
    """
    out = [dict(m) for m in messages]
    first = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
    if first is None:
        raise NacdError(f"example {example_id!r} has no user message to put its prompt text in")
    out[first]["content"] = prompt_text + PROMPT_TEXT_SEPARATOR + out[first]["content"]
    return out


def with_prompt_text(example: Any, prompt_text: str) -> Any:
    """The example with its messages :func:`prompted_messages`."""
    from dataclasses import replace

    return replace(example, messages=tuple(prompted_messages(example.messages, prompt_text, example.id)))


def plain_batch(ids: list[str], seed: int, dropout: float) -> bool:
    """Whether a batch of these example ids is tuned without its prompts (``finetune.prompt_dropout``): a
    hash of the seed and the ids against ``dropout``, so a resumed run takes the same decisions."""
    if dropout <= 0:
        return False
    key = f"{seed}:" + ",".join(ids)
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32 < dropout


@dataclass(frozen=True)
class TextPair:
    """A receiving model's example tokenized with its prompt text and without (text mode with
    ``finetune.prompt_dropout``); both hold the same response, and the loop counts loss tokens on the
    prompted form's labels."""

    prompted: Any
    plain: Any

    @property
    def id(self) -> str:
        return self.prompted.id

    @property
    def labels(self) -> list[int]:
        return self.prompted.labels


def text_pairs(prompted: list[Any], plain: list[Any]) -> list[TextPair]:
    """Pair each prompted example with its plain tokenization by id (every prompted example has one: the
    prompt text only lengthens an example, so tokenization never keeps it and skips its plain form)."""
    by_id = {ex.id: ex for ex in plain}
    return [TextPair(ex, by_id[ex.id]) for ex in prompted]


def prompt_text_lost(pairs: list[TextPair]) -> int:
    """How many examples tokenize the same with their prompt text as without: truncation
    (``data.truncation: keep_response`` keeps the start of a long prompt, and the text sits after the chat
    template's header) cut the whole text away, so the receiving model never reads it."""
    return sum(1 for p in pairs if p.prompted.input_ids == p.plain.input_ids)


def text_dropout_collate(pad_token_id: int, seed: int, dropout: float) -> Any:
    """Collate :class:`TextPair` batches: the plain tokenizations for a batch :func:`plain_batch` drops,
    the prompted ones otherwise."""
    from nacd.chat import collate

    def collate_pairs(items: list[TextPair]) -> dict[str, Any]:
        plain = plain_batch([it.id for it in items], seed, dropout)
        return collate([it.plain if plain else it.prompted for it in items], pad_token_id)

    return collate_pairs


@dataclass(frozen=True)
class PromptedExample:
    """A tokenized example with its k distilled prompt vectors (embeddings mode)."""

    example: Any
    prompt: Any  # (k, d)

    @property
    def labels(self) -> list[int]:
        return self.example.labels


class PromptedForward:
    """Loss on the text embeddings with the prompt vectors inserted at ``offset`` (as they were distilled)
    through the shared loop (embeddings mode)."""

    def __init__(self, model: Any, offset: int = 0, dropout: float = 0.0, seed: int = 0):
        from nacd.tm import embed_scale
        from nacd.train import SparseLogitsForward, causal_lm

        self.embed = causal_lm(model).get_input_embeddings()
        self.scale = embed_scale(self.embed)
        self.offset = offset
        self.dropout, self.seed = dropout, seed
        self.sparse = SparseLogitsForward()
        self.ready: bool | None = None

    def plain(self, items: list[PromptedExample]) -> bool:
        """Whether this batch is tuned without its prompts (``finetune.prompt_dropout``): a hash of the seed
        and the batch's ids, so a resumed run takes the same decisions."""
        return plain_batch([it.example.id for it in items], self.seed, self.dropout)

    def collate(self, items: list[PromptedExample], pad_token_id: int) -> dict[str, Any]:
        import torch

        from nacd.chat import collate

        batch = collate([it.example for it in items], pad_token_id)
        if self.plain(items):
            return batch
        return {**batch, "prompts": torch.stack([it.prompt for it in items])}

    def inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The model's inputs for a collated batch: the prompt vectors inserted among the text embeddings, or
        the token ids as they are for a batch of plain input (``prompt_dropout``)."""
        from nacd.tm import prompted_inputs

        if "prompts" in batch:
            return prompted_inputs(self.embed, self.scale, batch["prompts"], batch, self.offset)
        return batch

    def __call__(self, model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        import torch

        from nacd.train import default_forward

        inputs = self.inputs(batch)
        if self.ready is None:
            with torch.no_grad():
                self.ready = self.sparse.install(model, inputs)
        return (self.sparse if self.ready else default_forward)(model, inputs)

    def close(self) -> None:
        self.sparse.remove()


def _examples_for(config: Any, run_dir: RunDir) -> tuple[list[Any] | None, str | None, Any]:
    """(examples or None for D_full, where they came from, the distilled set or None)."""
    from nacd.data import load_corpus

    fc = config.finetune
    if fc.dataset == "full":
        return None, None, None
    if fc.dataset == "distilled":
        from nacd.distill import DistilledSet

        ds = DistilledSet.load(run_dir.distill_dir)
        corpus, _ = load_corpus(config.data)
        return select_examples(corpus, ds.ids, str(ds.folder / "records.jsonl")), str(ds.folder), ds
    ids_path = Path(fc.ids_file) if fc.ids_file else run_dir.select_dir / "selection.json"
    if not ids_path.is_file():
        raise NacdError(
            f"finetune.dataset=selected: no selection at {ids_path}; run `nacd select` first "
            "or set finetune.ids_file to a file of example ids"
        )
    ids = read_ids(ids_path)
    examples, _ = load_corpus(config.data)
    return select_examples(examples, ids, str(ids_path)), str(ids_path), None


def student_recipe(config: Any, run_dir: RunDir, n_examples: int | None = None, distilled: Any = None) -> Any:
    """``config`` with ``finetune.train`` as the distillation's student stepped (``finetune.recipe=student``):
    SGD at the distilled set's alpha, its batch size (at most ``n_examples``) and clip, constant lr, no
    warmup or weight decay. ``distilled``: the run's set when the caller has loaded it already."""
    from nacd.distilled import DistilledSet

    fc = config.finetune
    if fc.recipe != "student":
        return config
    if distilled is None and not (run_dir.distill_dir / "manifest.json").is_file():
        raise NacdError(
            f"finetune.recipe=student: no distilled set in {run_dir.distill_dir} to take the student's lr and batch "
            "from; run `nacd distill` first, or set finetune.recipe=own"
        )
    ds = distilled if distilled is not None else DistilledSet.load(run_dir.distill_dir)
    batch = int(ds.manifest["distill"]["batch_size"])
    batch = min(batch, n_examples) if n_examples else batch  # a size below one batch: one batch of all
    micro = fc.train.micro_batch_size if fc.train.micro_batch_size and batch % fc.train.micro_batch_size == 0 else None
    train = replace(
        fc.train,
        optimizer="sgd",
        lr=ds.alpha,
        batch_size=batch,
        micro_batch_size=micro,
        lr_schedule="constant",
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=ds.manifest.get("student_clip_norm"),
    )
    return replace(config, finetune=replace(fc, train=train))


def prompt_mode(config: Any, distilled: Any) -> str | None:
    """embeddings or text for a distilled set (auto: embeddings when tuning the distilling model)."""
    if distilled is None:
        return None
    mode = config.finetune.prompt_mode
    if mode == "auto":
        spec = config.finetune.model or config.model.spec
        mode = "embeddings" if spec == distilled.manifest["base_model"]["spec"] else "text"
    return mode


def _check_options(config: Any, mode: str | None, model_spec: str) -> None:
    """Refuse the finetune options that do not apply to this data set or model, naming the option."""
    fc = config.finetune
    if fc.prompt_dropout and fc.dataset != "distilled":
        raise NacdError("finetune.prompt_dropout: applies to dataset=distilled only")
    if fc.soft_labels and model_spec != config.model.spec:
        raise NacdError(
            f"finetune.soft_labels: the expert's soft labels are in {config.model.spec!r}'s tokens; "
            f"{model_spec!r} cannot take them (tune the distilling model, or turn soft_labels off)"
        )
    if fc.soft_labels and mode == "text":
        raise NacdError(
            "finetune.soft_labels: on the distilled set the soft labels go with the prompt vectors "
            "(prompt_mode=embeddings); with prompt_mode=text the teacher would read the decoded prompt text"
        )


def _prompted_data(config: Any, setup: Any, distilled: Any, seed: int) -> tuple[list[Any], Any, PromptedForward]:
    """(dataset, collate, forward) that feed the distilling model its prompt vectors (embeddings mode):
    the learned ones, or the initial tokens' embedding rows (``finetune.prompts=initial``)."""
    fc = config.finetune
    if setup.base_fingerprint != distilled.manifest["base_model"]["fingerprint"]:
        raise NacdError(
            f"finetune.prompt_mode=embeddings: {fc.model or config.model.spec!r} is not the model that distilled "
            f"{distilled.folder} ({distilled.manifest['base_model']['spec']!r}); use prompt_mode=text"
        )
    from nacd.tm import check_prompt_offset

    offset = int(distilled.manifest["distill"].get("prompt_offset", 0))
    check_prompt_offset(setup.data, offset, f"{distilled.folder}: distill.prompt_offset")
    forward = PromptedForward(setup.model, offset, fc.prompt_dropout, seed)
    if fc.prompts == "initial":
        table = setup.model.get_input_embeddings().weight
        dataset = [PromptedExample(ex, distilled.initial_embeddings(ex.id, table)) for ex in setup.data]
    else:
        dataset = [PromptedExample(ex, distilled.embeddings(ex.id)) for ex in setup.data]

    def collate(items: list[PromptedExample]) -> dict[str, Any]:
        return forward.collate(items, setup.tokenizer.pad_token_id)

    return dataset, collate, forward


def _identity(config: Any, setup: Any, spec: str, seed: int, mode: str | None, distilled: Any) -> dict[str, Any]:
    """What defines the tuned adapter: a folder made with anything else is refused, not reused."""
    fc = config.finetune
    return {
        "base_model": {"spec": spec, "fingerprint": setup.base_fingerprint},
        "lora": {**asdict(config.lora), "target_modules": setup.lora_targets},
        "train": asdict(fc.train),
        "seed": seed,
        "data_hash": setup.data_hash,
        "dataset": fc.dataset,
        "prompt_mode": mode,
        **({"prompts": fc.prompts} if fc.prompts != "learned" else {}),
        **({"prompt_dropout": fc.prompt_dropout} if fc.prompt_dropout else {}),
        **({"recipe": fc.recipe} if fc.recipe != "own" else {}),
        "distilled": {"created": distilled.manifest["created"], "alpha": distilled.alpha} if distilled else None,
    }


#: Identity fields that another stage's output decides: the distilled set, and the tokenized data (D_sel
#: comes from the selection). When only they differ (the set was continued, the selection redone) the tuning
#: is stale and is redone, as an evaluation is redone when its adapter changes; a setting is refused.
UPSTREAM_FIELDS = ("distilled", "data_hash")
#: Under ``finetune.recipe=student`` these fields of ``train`` come from the distilled set (its alpha, batch
#: and clip): when only they change the tuning is stale; a change of the others (epochs, seed) is refused.
RECIPE_FIELDS = ("lr", "batch_size", "micro_batch_size", "max_grad_norm")


def _recipe_apart(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``identity`` with the student recipe's fields of ``train`` moved to an upstream field of their own."""
    train = dict(identity.get("train") or {})
    recipe = {key: train.pop(key, None) for key in RECIPE_FIELDS}
    return {**identity, "train": train, "student_recipe": recipe}


def _reusable_manifest(config: Any, folder: Path, variant: str, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The folder's manifest when it was made with ``identity`` (to skip or resume); None after removing a
    tuning made on an older distilled set or selection; an error naming the field when a setting differs."""
    from nacd.artifacts import check_identity, read_manifest, remove_if_stale
    from nacd.models import resolve_device
    from nacd.ranks import current as current_ranks

    ranks = current_ranks(cpu=resolve_device(config.run.device).type == "cpu")
    existing = ranks.from_main(read_manifest(folder, KIND))  # one decision for all processes
    if existing is None:
        return None
    then, now, upstream = existing, identity, UPSTREAM_FIELDS
    if config.finetune.recipe == "student":  # the student's lr, batch and clip come from the distilled set
        then, now, upstream = _recipe_apart(existing), _recipe_apart(identity), (*UPSTREAM_FIELDS, "student_recipe")
    if remove_if_stale(folder, then, now, upstream, ranks, f"finetune {variant}"):
        return None
    check_identity(folder, existing, identity, f"delete {folder} or set finetune.name to a new variant")
    return existing


@locked("finetune", lambda config, run_dir: run_dir.finetune_dir(config.finetune.name or config.finetune.dataset))
def run(config: Any, run_dir: RunDir) -> dict[str, Any]:
    """``nacd finetune``: tune ``config.model`` with LoRA on the chosen data set; resumable."""
    examples, source, distilled = _examples_for(config, run_dir)  # fails before loading a model if data is missing
    plain_examples = examples
    config = student_recipe(config, run_dir, len(examples) if examples is not None else None, distilled)
    fc = config.finetune
    variant = fc.name or fc.dataset
    folder = run_dir.finetune_dir(variant)
    mode = prompt_mode(config, distilled)
    model_cfg = replace(config.model, spec=fc.model) if fc.model else config.model
    _check_options(config, mode, model_cfg.spec)
    if mode == "text":
        by_id = distilled.prompt_texts(fc.prompts)
        examples = [with_prompt_text(ex, by_id[ex.id]) for ex in examples]
    run_dir.init(config)
    setup_logging(config.run.log_level, run_dir.log_path)
    setup = setup_training(config, examples, model_cfg)
    seed = config.run.seed if fc.seed is None else fc.seed
    dataset, collate, forward = setup.data, setup.collate, None
    if mode == "embeddings":
        dataset, collate, forward = _prompted_data(config, setup, distilled, seed)
    lost = None
    if mode == "text":
        from nacd.chat import tokenize_corpus

        pairs = text_pairs(setup.data, tokenize_corpus(plain_examples, setup.tokenizer, config.data))
        lost = prompt_text_lost(pairs)
        if lost:
            log.warning(
                "finetune %s: %d of %d examples lost their prompt text to truncation (data.max_seq_len=%d, "
                "the text sits after %s's chat-template header): raise data.max_seq_len",
                variant, lost, len(setup.data), config.data.max_seq_len, model_cfg.spec,
            )  # fmt: skip
        if fc.prompt_dropout:
            dataset = pairs
            collate = text_dropout_collate(setup.tokenizer.pad_token_id, seed, fc.prompt_dropout)
    teacher = None
    if fc.soft_labels:
        from nacd.soft_labels import soft_dataset

        prompted = (dataset, forward) if mode == "embeddings" else None
        dataset, forward, teacher = soft_dataset(config, run_dir, setup, prompted)
        collate = forward.collate
    identity = _identity(config, setup, model_cfg.spec, seed, mode, distilled)
    if teacher is not None:
        identity["soft_labels"] = teacher
    existing = _reusable_manifest(config, folder, variant, identity)
    if existing is not None and existing.get("complete"):
        verify_files(folder, existing.get("files"), f"delete {folder} and run `nacd finetune` again")
        remove_dir(folder / "checkpoint")  # a kill between the manifest and the removal left it
        log.info("finetune %s: complete in %s, skipped", variant, folder)
        return existing
    manifest = {
        **identity,
        "variant": variant,
        "data_source": source,
        "n_examples": len(setup.data),
        "ids": [ex.id for ex in setup.data] if examples is not None else None,
        **({"prompt_text_lost": lost} if lost is not None else {}),
    }
    return _train(config, setup, folder, variant, manifest, dataset, collate, forward, seed)


def _train(
    config: Any,
    setup: Any,
    folder: Path,
    variant: str,
    manifest: dict[str, Any],
    dataset: list[Any],
    collate: Any,
    forward: Any,
    seed: int,
) -> dict[str, Any]:
    """Tune a fresh LoRA (or resume its checkpoint) and save the adapter; the manifest says complete last."""
    fc = config.finetune
    folder.mkdir(parents=True, exist_ok=True)
    init_lora(setup.model, seed)
    loop = TrainLoop(
        model=setup.model,
        dataset=dataset,
        cfg=fc.train,
        collate=collate,
        forward=forward,
        seed=seed,
        callbacks=[CheckpointEvery(fc.train.checkpoint_every)],
        checkpoint_dir=folder / "checkpoint",
        metrics=MetricsWriter(folder / "metrics.jsonl"),
        desc=f"finetune {variant}",
    )
    manifest = {**manifest, "total_steps": loop.total_steps, "complete": False}
    if loop.is_main:
        write_manifest(folder, KIND, **manifest)
    try:
        state = loop.run()
    finally:
        if forward is not None:
            forward.close()
    if loop.is_main:
        with atomic_dir(folder / "adapter") as tmp:
            setup.model.save_pretrained(tmp)
        manifest.update(
            files=record_files(
                folder, sorted(f"adapter/{p.name}" for p in (folder / "adapter").iterdir() if p.is_file())
            ),
            complete=True,
            final_loss=state.last_loss,
            seconds=round(state.seconds, 2),
            loss_tokens=state.loss_tokens,
            parameters={name: list(p.shape) for name, p in lora_parameters(setup.model).items()},
        )
        write_manifest(folder, KIND, **manifest)
        remove_dir(folder / "checkpoint")
    loop.accelerator.wait_for_everyone()
    log.info("finetune %s: adapter saved in %s", variant, folder / "adapter")
    return manifest
