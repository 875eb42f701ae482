"""Chats as model input: render a chat with the model's chat template (or the fallback format of
``docs/DATA.md``), put the loss on the assistant responses only, truncate to ``max_seq_len``, pad
batches, describe a tokenized corpus.

* :func:`tokenize_example` / :func:`tokenize_corpus` turn :class:`~nacd.data.Example` s into
  :class:`TokenizedExample` s (a bad one raises under ``data.strict``, else is skipped and counted).
* :func:`render_chat` / :func:`encode_prompt` render a chat (whole, or up to the generation prompt).
* :func:`collate` pads a batch; :func:`corpus_stats` describes a tokenized corpus.

Importing this module does no work; ``torch`` and ``tqdm`` are imported where they are needed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nacd.config import DataConfig
from nacd.data import RESPONSE_FIELD, Example, ExampleError, LoadReport, Skip, reject
from nacd.errors import DataError
from nacd.progress import bar as progress_bar

__all__ = [
    "IGNORE_INDEX",
    "TokenizedExample",
    "render_chat",
    "encode_prompt",
    "tokenize_example",
    "tokenize_corpus",
    "collate",
    "corpus_stats",
]

#: Label of a token that carries no loss (the ``ignore_index`` of ``torch.nn.CrossEntropyLoss``).
IGNORE_INDEX = -100

#: Fallback format (docs/DATA.md): the text before a system or user turn's content; an assistant turn is
#: the generation prompt, then `` {content}{eos}``; every turn ends with FALLBACK_TURN_END.
FALLBACK_PREFIX = {"system": "System: ", "user": "User: "}
FALLBACK_GENERATION_PROMPT = "Assistant:"
FALLBACK_TURN_END = "\n\n"

#: keep_response truncation keeps this many tokens of the prompt's end (the assistant header).
PROMPT_TAIL_TOKENS = 16

#: Corpora with more examples than this get a progress bar while tokenizing.
PROGRESS_MIN_EXAMPLES = 1000


# --------------------------------------------------------------------------- rendering and the loss mask


class _TemplateError(Exception):
    pass


def _use_chat_template(tokenizer: Any, template: str) -> bool:
    """Whether ``template`` (auto, model, fallback) means the tokenizer's chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "fallback":
        return False
    if template == "model":
        if not has_template:
            raise DataError(
                "data.template=model, but the tokenizer has no chat_template; use data.template=auto or fallback"
            )
        return True
    if template == "auto":
        return has_template
    raise DataError(f"data.template: expected auto, model or fallback, got {template!r}")


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise _TemplateError(f"apply_chat_template returned {type(text).__name__}, not text")
    return text


def _render_template(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """Text by the chat template and each response's character span, found by rendering prefixes.

    Response i starts where ``messages[:i]`` + generation prompt ends and stops where ``messages[:i+1]``
    ends, without trailing whitespace (so ``<|im_end|>`` is in, the newline after it is not).
    """
    full = _apply_template(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:i], True)
        upto = _apply_template(tokenizer, messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
            raise _TemplateError(f"the rendering of the first {i} turns is not a prefix of the whole conversation")
        end = max(len(upto.rstrip()), len(before) + 1)
        spans.append((len(before), end))
    return full, spans


def _render_fallback(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """Text in the fallback format (docs/DATA.md) and each response's span: `` {content}{eos}``."""
    eos = tokenizer.eos_token or ""
    text, spans = "", []
    for message in messages:
        if message["role"] == "assistant":
            text += FALLBACK_GENERATION_PROMPT
            start = len(text)
            text += " " + message["content"] + eos
            spans.append((start, len(text)))
        else:
            text += FALLBACK_PREFIX[message["role"]] + message["content"]
        text += FALLBACK_TURN_END
    return text, spans


def _fallback_bos(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer puts a bos in front of text itself (as in pretraining), else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def render_chat(
    messages: Iterable[dict[str, str]], tokenizer: Any, template: str = "auto"
) -> tuple[str, list[tuple[int, int]], list[int]]:
    """``(text, response character spans, ids to put in front)`` of a chat, by the chat template or the fallback.

    Raises DataError when the chat template cannot be masked by prefix rendering.
    """
    messages = [dict(m) for m in messages]
    if not _use_chat_template(tokenizer, template):
        text, spans = _render_fallback(messages, tokenizer)
        return text, spans, _fallback_bos(tokenizer)
    try:
        text, spans = _render_template(messages, tokenizer)
    except _TemplateError as exc:
        raise DataError(
            f"this chat template cannot be masked by prefix rendering ({exc}); set data.template=fallback"
        ) from None
    return text, spans, []


def prompt_text(messages: Iterable[dict[str, str]], tokenizer: Any, template: str = "auto") -> str:
    """The text of a conversation without its answer, ending with the generation prompt, as training renders
    it (the fallback format's BOS as the tokenizer's BOS text): what a tuned model reads before it answers."""
    messages = [dict(m) for m in messages]
    if _use_chat_template(tokenizer, template):
        return _apply_template(tokenizer, messages, True)
    bos = tokenizer.decode(_fallback_bos(tokenizer)) if _fallback_bos(tokenizer) else ""
    return bos + _render_fallback(messages, tokenizer)[0] + FALLBACK_GENERATION_PROMPT


def encode_prompt(messages: Iterable[dict[str, str]], tokenizer: Any, template: str = "auto") -> list[int]:
    """Token ids of a conversation without its answer, ending with the generation prompt, as training renders it.

    ``messages`` are the turns before the response (typically one user turn).
    """
    messages = [dict(m) for m in messages]
    if _use_chat_template(tokenizer, template):
        text = _apply_template(tokenizer, messages, True)
        prefix: list[int] = []
    else:
        text = _render_fallback(messages, tokenizer)[0] + FALLBACK_GENERATION_PROMPT
        prefix = _fallback_bos(tokenizer)
    return prefix + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _carries_loss(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """A token carries loss iff its characters overlap a response span (an empty span: starts inside one)."""
    if end > start:
        return any(start < b and end > a for a, b in spans)
    return any(a <= start < b for a, b in spans)


def _encode_masked(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and labels (the id inside a response span, IGNORE_INDEX elsewhere)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [
            t if _carries_loss(s, e, spans) else IGNORE_INDEX
            for t, (s, e) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        return ids, labels
    # No offsets: encode the prompt and response pieces one by one (token boundaries fall on span edges).
    ids, labels, pos = [], [], 0
    for a, b in [*spans, (len(text), len(text))]:
        for piece, loss in ((text[pos:a], False), (text[a:b], True)):
            if piece:
                piece_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
                ids += piece_ids
                labels += piece_ids if loss else [IGNORE_INDEX] * len(piece_ids)
        pos = b
    return ids, labels


def _truncate(ids: list[int], labels: list[int], max_len: int, mode: str) -> tuple[list[int], list[int]]:
    """Cut to ``max_len`` tokens: ``right`` cuts the end; ``keep_response`` shortens the prompt's middle."""
    if mode == "right":
        return ids[:max_len], labels[:max_len]
    if mode != "keep_response":
        raise DataError(f"data.truncation: expected keep_response or right, got {mode!r}")
    loss = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not loss:
        return ids[:max_len], labels[:max_len]
    resp_end = loss[-1] + 1
    resp_start = resp_end - 1
    while resp_start > 0 and labels[resp_start - 1] != IGNORE_INDEX:
        resp_start -= 1
    if resp_end <= max_len:  # prompt and last response fit: drop only what follows the response
        return ids[:max_len], labels[:max_len]
    resp_len = resp_end - resp_start
    keep_resp = resp_len if resp_len <= max_len // 2 else max_len - min(resp_start, max_len - max_len // 2)
    budget = max_len - keep_resp
    tail = min(PROMPT_TAIL_TOKENS, budget // 2)
    keep = [*range(budget - tail), *range(resp_start - tail, resp_start), *range(resp_start, resp_start + keep_resp)]
    return [ids[i] for i in keep], [labels[i] for i in keep]


@dataclass(frozen=True)
class TokenizedExample:
    """One example as model input: ``labels`` equal ``input_ids`` on response tokens and -100 elsewhere."""

    id: str
    source: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def tokenize_example(
    ex: Example, tokenizer: Any, max_seq_len: int, template: str = "auto", truncation: str = "keep_response"
) -> TokenizedExample:
    """Render, tokenize, mask and truncate one example; raises DataError naming ``ex.origin``."""
    field_name = RESPONSE_FIELD.get(ex.format, "messages")
    try:
        text, spans, prefix = render_chat(ex.messages, tokenizer, template)
    except DataError as exc:
        raise DataError(f"{ex.origin}: {exc}") from None
    except Exception as exc:  # a chat template may raise on a conversation it does not accept
        raise ExampleError(Skip(ex.origin, "messages", "chat template error", f"{type(exc).__name__}: {exc}")) from None
    ids, labels = _encode_masked(tokenizer, text, spans)
    ids, labels = prefix + ids, [IGNORE_INDEX] * len(prefix) + labels
    truncated = len(ids) > max_seq_len
    if truncated:
        ids, labels = _truncate(ids, labels, max_seq_len, truncation)
    if all(label == IGNORE_INDEX for label in labels):
        if truncated:
            skip = Skip(
                ex.origin,
                field_name,
                "no response tokens left after truncation",
                f"data.max_seq_len={max_seq_len}, data.truncation={truncation}: the prompt fills the window "
                "(use truncation=keep_response or a larger max_seq_len)",
            )
        else:
            skip = Skip(ex.origin, field_name, "no response tokens", "the response rendered to no tokens")
        raise ExampleError(skip)
    return TokenizedExample(ex.id, ex.source, ids, labels, truncated)


def tokenize_corpus(
    examples: Iterable[Example], tokenizer: Any, cfg: DataConfig, report: LoadReport | None = None
) -> list[TokenizedExample]:
    """Tokenize every example; a bad one raises (``cfg.strict``) or is skipped, counted in ``report`` and logged."""

    examples = list(examples)
    _use_chat_template(tokenizer, cfg.template)  # a wrong template setting fails before the loop
    report = report if report is not None else LoadReport()
    out = []
    bar = progress_bar(
        examples, desc="tokenize", unit="ex", disable=len(examples) <= PROGRESS_MIN_EXAMPLES, leave=False
    )
    for ex in bar:
        try:
            out.append(tokenize_example(ex, tokenizer, cfg.max_seq_len, cfg.template, cfg.truncation))
        except ExampleError as exc:
            reject(report, cfg.strict, exc.skip)
    report.log_skip_summary()
    if not out:
        raise DataError(
            f"empty corpus: none of the {len(examples)} examples is left after tokenization\n{report.summary()}"
        )
    return out


# --------------------------------------------------------------------------- batches and descriptions


def collate(batch: list[TokenizedExample], pad_token_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding) as long tensors."""
    import torch

    if not batch:
        raise ValueError("collate: empty batch")
    if pad_token_id is None:
        raise ValueError("collate: pad_token_id is None (set tokenizer.pad_token, e.g. to the eos token)")
    length = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def corpus_stats(tokenized: Iterable[TokenizedExample]) -> dict[str, Any]:
    """n, n per source, mean/max length, tokens, loss tokens and their fraction, truncated count."""
    tokenized = list(tokenized)
    lengths = [len(t.input_ids) for t in tokenized]
    tokens = sum(lengths)
    loss_tokens = sum(1 for t in tokenized for label in t.labels if label != IGNORE_INDEX)
    return {
        "n": len(tokenized),
        "per_source": dict(Counter(t.source for t in tokenized)),
        "mean_len": tokens / len(tokenized) if tokenized else 0.0,
        "max_len": max(lengths, default=0),
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "loss_token_fraction": loss_tokens / tokens if tokens else 0.0,
        "truncated": sum(t.truncated for t in tokenized),
    }
