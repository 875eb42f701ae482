"""Prompts and lm-eval's tokenization: how a :class:`~nacd.evaluate.benchmarks.Doc` becomes a context
string (``text`` or ``letter`` protocol, description and few-shot examples) and one continuation per choice,
and how (context, continuation) becomes token ids exactly as lm-eval's ``HFLM`` makes them
(:func:`encode_pair`), with the model's context length (:func:`model_max_length`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nacd.errors import DataError
from nacd.evaluate.benchmarks import Benchmark, Doc
from nacd.questions import doc_to_choices, doc_to_text

#: lm-eval's defaults: between a context and its answer, and between few-shot examples.
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"

#: lm-eval's HFLM max length when neither the model config nor the tokenizer gives one.
DEFAULT_MAX_LENGTH = 2048


# --------------------------------------------------------------------------- prompts


def fewshot_docs(bench: Benchmark, doc: Doc, k: int) -> list[Doc]:
    """The first ``k`` docs of the few-shot pool with ``doc``'s subject (itself excluded), as lm-eval's first_n."""
    if k == 0:
        return []
    subjects = {d.subject for d in bench.fewshot_pool}
    pool = [d for d in bench.fewshot_pool if d.id != doc.id and (d.subject == doc.subject or len(subjects) == 1)]
    if len(pool) < k:
        where = f" for subject {doc.subject!r}" if doc.subject else ""
        raise DataError(
            f"benchmark {bench.name!r}: num_fewshot={k} but the few-shot pool ({bench.fewshot_source or 'none'}) "
            f"has {len(pool)} example(s){where}; lower eval.num_fewshot"
        )
    return pool[:k]


def build_context(bench: Benchmark, doc: Doc, protocol: str, shots: Sequence[Doc]) -> str:
    """Description + shots (each ``text + " " + answer + "\\n\\n"``) + the question, as lm-eval assembles it."""
    description = bench.descriptions.get(protocol, "").format(subject=doc.subject.replace("_", " "))
    parts = [
        doc_to_text(s, protocol) + TARGET_DELIMITER + doc_to_choices(s, protocol)[s.gold] + FEWSHOT_DELIMITER
        for s in shots
    ]
    return description + "".join(parts) + doc_to_text(doc, protocol)


# --------------------------------------------------------------------------- tokenization (lm-eval's)


def _prefix_token_id(tokenizer: Any) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else tokenizer.eos_token_id


def _tok_encode(tokenizer: Any, text: str) -> list[int]:
    """lm-eval's ``HFLM.tok_encode``: the tokenizer's own special tokens, unless ``text`` starts with the BOS text."""
    add = not text.startswith(tokenizer.decode(_prefix_token_id(tokenizer)))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def encode_pair(
    tokenizer: Any, context: str, continuation: str, cache: dict[str, list[int]] | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as lm-eval's ``HFLM`` makes them.

    Trailing spaces of the context move to the continuation; context + continuation are encoded
    together and the ids after the context's own encoding are the continuation. An empty context
    becomes the BOS (else EOS) token. ``cache`` (context text -> ids) saves encoding a context again.
    """
    if context == "":
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tok_encode(tokenizer, context + continuation)
    if cache is None:
        ctx = _tok_encode(tokenizer, context)
    elif (ctx := cache.get(context)) is None:
        ctx = cache[context] = _tok_encode(tokenizer, context)
    return list(ctx), whole[len(ctx) :]


def model_max_length(model: Any, tokenizer: Any) -> int:
    """lm-eval's ``HFLM.max_length``: the model config's context size, else the tokenizer's, else 2048."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and value < 1_000_000_000:
        return value
    return DEFAULT_MAX_LENGTH
