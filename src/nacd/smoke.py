"""The data + model smoke run (``nacd smoke``): the main job until the full pipeline lands.

Loads the configured model, loads and tokenizes the configured corpus, and
prints what a user checks first: corpus statistics, skipped records, one
example with its loss tokens marked, and a greedy continuation. Everything is
also written to ``smoke.json`` in the run folder.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from nacd.artifacts import RunDir, atomic_write_json, setup_logging

log = logging.getLogger(__name__)

PROMPT = "The capital of France is"


def mark_loss_tokens(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """Decoded example with the loss-carrying spans wrapped in [[ ]]."""
    out, run, in_loss = [], [], False
    for tok, lab in zip(input_ids, labels, strict=True):
        carries = lab != -100
        if carries != in_loss and run:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if in_loss else text)
            run = []
        in_loss = carries
        run.append(tok)
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if in_loss else text)
    return "".join(out)


def greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 16) -> str:
    import torch

    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def run(config: Any, run_dir: RunDir) -> dict[str, Any]:
    from nacd.chat import corpus_stats, tokenize_corpus
    from nacd.data import load_corpus
    from nacd.models import describe, load_model, resolve_device

    run_dir.init(config)
    setup_logging(config.run.log_level, run_dir.log_path)
    timings: dict[str, float] = {}

    start = time.time()
    device = resolve_device(config.run.device)
    model, tokenizer = load_model(config.model, device)
    timings["load_model_s"] = round(time.time() - start, 2)

    start = time.time()
    examples, report = load_corpus(config.data)
    timings["load_data_s"] = round(time.time() - start, 2)
    start = time.time()
    tokenized = tokenize_corpus(examples, tokenizer, config.data, report)
    timings["tokenize_s"] = round(time.time() - start, 2)
    stats = corpus_stats(tokenized)

    start = time.time()
    continuation = greedy(model, tokenizer, PROMPT)
    timings["generate_s"] = round(time.time() - start, 2)
    sample = tokenized[0]
    result = {
        "model": {"spec": config.model.spec, **describe(model)},
        "corpus": stats,
        "loaded": report.loaded,
        "available": report.available,
        "skipped": report.skip_counts(),
        "example": {"id": sample.id, "marked": mark_loss_tokens(tokenizer, sample.input_ids, sample.labels)},
        "generation": {"prompt": PROMPT, "continuation": continuation},
        "timings": timings,
    }
    atomic_write_json(run_dir.smoke_path, result)

    model_info = result["model"]
    print(
        f"model      {config.model.spec}: {model_info['architecture']}, {model_info['parameters'] / 1e6:.1f}M parameters, "
        f"vocab {model_info['vocab_size']}, {model_info['dtype']} on {model_info['device']} ({timings['load_model_s']} s)"
    )
    print(
        f"tokenized  {stats['n']} examples, mean {stats['mean_len']:.1f} / max {stats['max_len']} tokens "
        f"(max_seq_len {config.data.max_seq_len}), {stats['loss_token_fraction']:.1%} of tokens carry loss, "
        f"{stats['truncated']} truncated ({timings['tokenize_s']} s)"
    )
    print(f"example    {sample.id} (loss tokens in [[ ]]):\n{result['example']['marked']}")
    print(f"generate   {PROMPT!r} -> {continuation!r}")
    print(f"saved      {run_dir.smoke_path}")
    return result
