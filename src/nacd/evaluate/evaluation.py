"""Evaluation: :func:`evaluate` prompts every question of some benchmarks, scores its choices and gives
per-benchmark metrics (``acc``, ``acc_norm``, standard errors, per-subject and macro averages, timing)
and one sample per question; :func:`aggregate` and :func:`resolve_protocol` are its parts."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from nacd.errors import NacdError
from nacd.evaluate.benchmarks import Benchmark, Doc
from nacd.evaluate.prompts import TARGET_DELIMITER, build_context, doc_to_choices, fewshot_docs
from nacd.evaluate.scoring import score_loglikelihood
from nacd.progress import bar as progress_bar
from nacd.ranks import Ranks

log = logging.getLogger(__name__)


def _mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as numpy


def _metrics(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    acc, acc_se = _mean_stderr([s["acc"] for s in samples])
    norm, norm_se = _mean_stderr([s["acc_norm"] for s in samples])
    return {"n": len(samples), "acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se}


def aggregate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Micro averages over all questions, per-subject metrics and their macro average (with pooled stderr)."""
    out = _metrics(samples)
    subjects = sorted({s["subject"] for s in samples if s["subject"]})
    if subjects:
        per = {sub: _metrics([s for s in samples if s["subject"] == sub]) for sub in subjects}
        out["subjects"] = per
        macro: dict[str, Any] = {"n_subjects": len(per)}
        for key in ("acc", "acc_norm"):
            macro[key] = sum(m[key] for m in per.values()) / len(per)
            ses = [m[f"{key}_stderr"] for m in per.values()]
            macro[f"{key}_stderr"] = None if None in ses else math.sqrt(sum(se**2 for se in ses)) / len(per)
        out["macro"] = macro
    return out


def _limited(bench: Benchmark, limit: int | None) -> list[Doc]:
    if limit is None:
        return list(bench.docs)
    if not bench.per_subject_limit:
        return bench.docs[:limit]
    counts: dict[str, int] = {}
    out = []
    for doc in bench.docs:
        if counts.get(doc.subject, 0) < limit:
            counts[doc.subject] = counts.get(doc.subject, 0) + 1
            out.append(doc)
    return out


def resolve_protocol(bench: Benchmark, protocol: str, num_fewshot: int | None) -> tuple[str, int]:
    """``(protocol, shots)`` of a benchmark under the config's choices (``auto`` / None: its defaults)."""
    chosen = bench.protocol if protocol == "auto" else protocol
    if chosen not in ("text", "letter"):
        raise NacdError(f"eval.protocol: expected auto, text or letter, got {protocol!r}")
    return chosen, bench.default_fewshot if num_fewshot is None else num_fewshot


def evaluate(
    model: Any,
    tokenizer: Any,
    benchmarks: Sequence[Benchmark],
    cfg: Any,
    *,
    progress: bool = True,
    ranks: Ranks = Ranks(),
    data: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``benchmarks`` under ``cfg`` (an :class:`~nacd.config.EvalConfig`): ``(results, samples)``.

    ``results[name]`` holds n, acc, acc_norm, their standard errors, per-subject metrics and macro
    averages, protocol, shots and timing; ``samples`` one dict per question (see docs/EVAL.md).
    A held-out benchmark (:class:`~nacd.evaluate.heldout.HeldoutBenchmark`) gives ``loss`` instead,
    tokenized as ``data`` (a :class:`~nacd.config.DataConfig`) says.
    Under a launcher (``ranks``) each process scores its share of the batches and every process
    returns the same results (with the contexts each process scored under ``processes``).
    """

    from nacd.evaluate.heldout import HeldoutBenchmark, evaluate_heldout

    results: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    for bench in benchmarks:
        if isinstance(bench, HeldoutBenchmark):
            if data is None:
                raise NacdError(f"{bench.name}: a held-out benchmark needs the data config (evaluate(..., data=))")
            results[bench.name], part = evaluate_heldout(
                model, tokenizer, bench, cfg, data, progress=progress, ranks=ranks
            )
            samples.extend(part)
            continue
        protocol, shots = resolve_protocol(bench, getattr(cfg, "protocol", "auto"), cfg.num_fewshot)
        docs = _limited(bench, (getattr(cfg, "limits", None) or {}).get(bench.name, cfg.limit))
        requests: list[tuple[str, str]] = []
        spans = []
        chat = getattr(cfg, "format", "plain") == "chat"
        for doc in docs:
            context = build_context(bench, doc, protocol, fewshot_docs(bench, doc, shots))
            answers = doc_to_choices(doc, protocol)
            spans.append((len(requests), answers))
            if chat:
                context = chat_context(context, tokenizer, getattr(data, "template", "auto"))
            requests.extend((context, ("" if chat else TARGET_DELIMITER) + a) for a in answers)
        start = time.perf_counter()
        shares: list[int] = []
        quiet = not (progress and ranks.is_main)
        with progress_bar(total=len(docs), desc=f"eval {bench.name}", unit="q", disable=quiet) as bar:
            scores = score_loglikelihood(
                model, tokenizer, requests, cfg.batch_size, progress=bar.update, ranks=ranks, shares=shares
            )
        seconds = time.perf_counter() - start
        bench_samples = []
        for doc, (first, answers) in zip(docs, spans, strict=True):
            lls = [s for s, _ in scores[first : first + len(answers)]]
            pred = _argmax(lls)
            pred_norm = _argmax([ll / len(a) for ll, a in zip(lls, answers, strict=True)])
            bench_samples.append(
                {
                    "benchmark": bench.name,
                    "id": doc.id,
                    "subject": doc.subject,
                    "gold": doc.gold,
                    "pred": pred,
                    "pred_norm": pred_norm,
                    "acc": float(pred == doc.gold),
                    "acc_norm": float(pred_norm == doc.gold),
                    "logprobs": lls,
                    "n_tokens": [n for _, n in scores[first : first + len(answers)]],
                    "answers": answers,
                }
            )
        results[bench.name] = {
            **aggregate(bench_samples),
            "protocol": protocol,
            "format": "chat" if chat else "plain",
            "num_fewshot": shots,
            "split": bench.split,
            "source": bench.source,
            "fewshot_source": bench.fewshot_source if shots else None,
            "seconds": round(seconds, 3),
            "questions_per_s": round(len(docs) / seconds, 3) if seconds > 0 else None,
        }
        if ranks.world > 1:
            results[bench.name]["processes"] = {"count": ranks.world, "contexts": shares}
            idle = idle_message(bench.name, shares, cfg.batch_size)
            if idle and ranks.is_main:
                log.warning(idle)
        log.info(
            "%s (%s, %d-shot, n=%d): acc %.4f, acc_norm %.4f, %.1f questions/s",
            bench.name,
            protocol,
            shots,
            len(docs),
            results[bench.name]["acc"],
            results[bench.name]["acc_norm"],
            len(docs) / max(seconds, 1e-9),
        )
        samples.extend(bench_samples)
    return results, samples


def chat_context(context: str, tokenizer: Any, template: str) -> str:
    """A plain prompt as the tuned model reads a user turn (``eval.format=chat``): its trailing ``Answer:`` is
    dropped (the assistant turn answers), the rest is the user's message, rendered with the generation prompt."""
    from nacd.chat import prompt_text

    text = context.rstrip()
    text = text[: -len("Answer:")].rstrip() if text.endswith("Answer:") else text
    return prompt_text([{"role": "user", "content": text}], tokenizer, template)


def idle_message(bench: str, contexts: list[int], batch_size: int) -> str | None:
    """Why some processes scored nothing of ``bench`` (``contexts``: what each scored), or None. The
    scores are the same with any number of processes; the idle ones only cost their device."""
    idle = [r for r, n in enumerate(contexts) if n == 0]
    if not idle:
        return None
    return (
        f"eval {bench}: {len(idle)} of {len(contexts)} processes had nothing to score (process(es) "
        f"{', '.join(map(str, idle))}): its {sum(contexts)} answer contexts make fewer batches of "
        f"eval.batch_size={batch_size} than there are processes; the scores are unaffected. Use fewer "
        "processes or a smaller eval.batch_size to spread it"
    )
