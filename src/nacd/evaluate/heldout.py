"""Held-out instruction loss: a benchmark on D_full's own distribution.

What trajectory matching imitates is the full corpus's effect on the model; its most direct reading is
the loss on examples of the same distribution that nobody trained on. ``data.heldout`` holds a seeded
sample of every source out of D_full (:func:`nacd.data.split_heldout`), and the benchmark ``heldout``
(all sources) or ``heldout:<source>`` scores it:

* each example is rendered, masked and truncated exactly as training renders it
  (:func:`nacd.chat.tokenize_example`: the data config's template, ``max_seq_len`` and truncation),
  with the evaluated model's own tokenizer (a receiving model reads the same examples);
* plain input: no prompt vectors (the tuned model is judged as a user would use it);
* an example's score is the mean negative log-likelihood of its response tokens (``loss``, lower is
  better); the benchmark's ``loss`` is the mean over examples, ``token_loss`` the mean over tokens;
* batches are dealt round robin to the processes of a launch (like every benchmark) and the numbers do
  not depend on their count.

``heldout_mc`` (``heldout_mc:<source>``) scores the held-out examples that are questions (a prompt with an
``Options:`` list the answer is one of, as Flan's rows write them, or a yes/no answer) as multiple choice,
like ARC (:func:`example_question`): an accuracy benchmark on D_full's own tasks that nobody trained on.
``heldout_content`` asks the same questions without their options list and scores the options' texts: what
the model knows of the answer rather than the label it writes.

Before scoring, :func:`check_disjoint` refuses a held-out example that is also in D_full (by id or by
content: another source holding the same record) or in the run's selection; ``nacd select`` refuses
one among the target examples of a targeted selection (BM25, DSIR, LESS).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nacd.errors import DataError
from nacd.progress import bar as progress_bar
from nacd.ranks import Ranks

log = logging.getLogger(__name__)

#: The benchmark name (all sources) and the prefix of one source's benchmark.
HELDOUT = "heldout"

#: Logits (rows x scored positions x vocabulary) one forward pass may compute in the full-logits fallback.
LOGIT_BUDGET = 2**27


@dataclass
class HeldoutBenchmark:
    """Held-out examples of some sources of D_full, scored by their response loss."""

    name: str
    examples: list[Any]  # nacd.data.Example
    source: str
    """``heldout:<source>,<source>`` (what the examples are)."""
    split: str = "heldout"
    kind: str = "loss"


def is_heldout(spec: str) -> bool:
    """Whether a ``eval.benchmarks`` entry names held-out examples: the loss (``heldout``,
    ``heldout:<source>``) or the questions among them (``heldout_mc``, ``heldout_mc:<source>``)."""
    kind = spec.strip().partition(":")[0]
    return kind in (HELDOUT, *QUESTION_KINDS)


#: The benchmark of the held-out examples that are questions with their options (or yes/no), as multiple choice.
HELDOUT_MC = "heldout_mc"
#: The same questions asked without their options list, the options' texts scored (``(B)`` of ``(B) sex``
#: becomes ``sex``): what the model knows of the answer, not which label it writes.
HELDOUT_CONTENT = "heldout_content"
QUESTION_KINDS = (HELDOUT_MC, HELDOUT_CONTENT)

_OPTIONS = re.compile(r"\n\s*Options:\s*\n", re.IGNORECASE)
_ANSWER = "So the answer is:"


def example_question(example: Any, content: bool = False) -> Any:
    """A held-out example as a multiple-choice question (:class:`~nacd.questions.Doc`), or None.

    The prompt is the example's last user turn, kept whole (its options stay where the corpus puts them);
    the answer is the response's last ``So the answer is:`` part (the ``qa`` format's rationale), else the
    response. Choices: the lines after ``Options:`` (``- `` removed), their labels when the answer is one
    (``(D)`` of ``(A) DNA``, ``Sentence A`` of ``Sentence A: "..."``), or yes/no when the answer is yes or
    no. None when the answer is none of the choices: the example is no question.

    ``content`` (``heldout_content``): the question is the prompt without its options list and the choices
    are the options' texts (labels dropped), so the score reads what the model knows of the answer, as ARC's
    text protocol does; options whose heads are the answer (``Sentence A: "..."``) stay as written, their
    texts are not answers."""
    from nacd.questions import Doc

    users = [m["content"] for m in example.messages if m["role"] == "user"]
    if not users:
        return None
    prompt, reply = users[-1], example.messages[-1]["content"]
    answer = reply.rsplit(_ANSWER, 1)[-1].strip().rstrip(".").strip()
    parts = _OPTIONS.split(prompt, maxsplit=1)
    if len(parts) == 2:
        options = [re.sub(r"^\s*[-*]\s*", "", line).strip() for line in parts[1].splitlines() if line.strip()]
        choices = options
        labelled = [re.match(r"^(\([A-Z]\))\s", o) for o in options]
        heads = [o.split(":", 1)[0].strip() for o in options]
        if all(labelled) and answer in [m.group(1) for m in labelled if m]:
            choices = [m.group(1) for m in labelled if m]
            if content:
                answer = options[choices.index(answer)][len(answer) :].strip()
                choices = [o[m.end() :].strip() for o, m in zip(options, labelled, strict=True) if m]
                prompt = parts[0]
        elif all(":" in o for o in options) and answer in heads and len(set(heads)) == len(heads):
            choices = heads
        elif content:
            prompt = parts[0]
    elif answer.lower() in ("yes", "no"):
        choices = ["yes", "no"]
    else:
        return None
    lowered = [c.lower() for c in choices]
    if len(set(lowered)) != len(lowered) or len(choices) < 2 or lowered.count(answer.lower()) != 1:
        return None
    origin = example.origin.rsplit(":", 1)[0]
    subject = re.sub(r"[^\w.+-]+", "_", origin.rsplit("/", 1)[-1].rsplit(".", 1)[0]) or example.source
    return Doc(example.id, prompt, tuple(choices), lowered.index(answer.lower()), subject)


def heldout_sources(spec: str, data_cfg: Any) -> list[str]:
    """The source names a held-out spec covers; raises naming the key when it cannot be scored."""
    from nacd.data import source_name

    names = [source_name(s) for s in data_cfg.sources]
    if not is_heldout(spec):
        raise DataError(
            f"eval.benchmarks: {spec!r} is not a held-out benchmark ({', '.join((HELDOUT, *QUESTION_KINDS))})"
        )
    if not data_cfg.heldout:
        raise DataError(
            f"eval.benchmarks: {spec!r} scores the examples held out of D_full, but data.heldout is 0: set "
            "data.heldout (a fraction or a count of each source, e.g. data.heldout=0.1)"
        )
    _, _, wanted = spec.strip().partition(":")
    if not wanted:
        return names
    chosen = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in names]
    if unknown or not chosen:
        raise DataError(
            f"eval.benchmarks: {spec!r}: no source named {', '.join(map(repr, unknown)) or '(none)'}; "
            f"the sources of data.sources are {', '.join(names)}"
        )
    return chosen


def _content(example: Any) -> str:
    from nacd.data import _message_hash

    return _message_hash(example.messages)


def check_disjoint(
    heldout: Sequence[Any], corpus: Sequence[Any], others: dict[str, Sequence[Any]] | None = None
) -> None:
    """Refuse held-out examples that D_full (``corpus``) or another named set holds, by id or by content.

    ``others`` maps a description (``D_sel (<run>/select/ids.txt)``, ``select.target``) to its examples
    or ids (strings); an overlap raises a DataError naming the set, the count and the first ids."""
    held_ids = {ex.id: ex for ex in heldout}
    held_content = {_content(ex): ex for ex in heldout}
    sets: dict[str, Sequence[Any]] = {"D_full (data.sources)": corpus, **(others or {})}
    for what, items in sets.items():
        clash = []
        for item in items:
            if isinstance(item, str):
                if item in held_ids:
                    clash.append(item)
            elif item.id in held_ids or _content(item) in held_content:
                clash.append(item.id if item.id in held_ids else f"{held_content[_content(item)].id} = {item.id}")
        if clash:
            raise DataError(
                f"the held-out examples (data.heldout) overlap {what}: {len(clash)} example(s), e.g. "
                f"{', '.join(clash[:3])}. A held-out loss must be measured on examples nobody trained on: "
                "remove the duplicate records (or the source listed twice) from the data, or use another target"
            )


def load_heldout(
    spec: str, config: Any, selected_ids: Sequence[str] | None = None, where: str = "", loaded: Any = None
) -> HeldoutBenchmark:
    """The held-out benchmark ``spec`` of ``config``'s data, checked disjoint from D_full, the selection
    (``selected_ids``, read from ``where``) and the selection target (for targeted methods)."""
    from nacd.data import load_corpus

    names = heldout_sources(spec, config.data)
    corpus, report = loaded if loaded is not None else load_corpus(config.data)  # (corpus, report), once per caller
    examples = [ex for name in names for ex in report.heldout.get(name, [])]
    if not examples:
        raise DataError(
            f"eval.benchmarks: {spec!r}: no example is held out of {', '.join(names)} (data.heldout="
            f"{config.data.heldout} of sources with {', '.join(str(report.available.get(n, 0)) for n in names)} "
            "examples; a source of one example holds none out)"
        )
    others: dict[str, Sequence[Any]] = {}
    if selected_ids is not None:
        others[f"D_sel ({where or 'the selection'})"] = list(selected_ids)
    check_disjoint(examples, corpus, others)  # the selection target is checked where it is loaded (nacd select)
    kind = spec.strip().partition(":")[0]
    name = kind if ":" not in spec else f"{kind}_{'_'.join(names)}"
    return HeldoutBenchmark(name, examples, f"{kind}:{','.join(names)}")


def heldout_questions(bench: HeldoutBenchmark) -> Any:
    """The questions among a held-out benchmark's examples (:func:`example_question`) as a multiple-choice
    :class:`~nacd.evaluate.benchmarks.Benchmark` (text protocol, zero-shot; subjects: the examples' files)."""
    from nacd.evaluate.benchmarks import Benchmark

    content = bench.name.startswith(HELDOUT_CONTENT)
    docs = [doc for doc in (example_question(ex, content) for ex in bench.examples) if doc is not None]
    if not docs:
        raise DataError(
            f"{bench.name}: none of the {len(bench.examples)} held-out examples of {bench.source} is a question with "
            "options (an 'Options:' list its answer is one of) or a yes/no question; use the benchmark heldout"
        )
    log.info("%s: %d of %d held-out examples are questions", bench.name, len(docs), len(bench.examples))
    return Benchmark(bench.name, docs, bench.source, bench.split, "text", 0)


def _token_nll(model: Any, batch: dict[str, Any], sparse: Any) -> tuple[Any, Any]:
    """Negative log-likelihoods of the response tokens of a batch (flat) and the row of each."""
    import torch
    import torch.nn.functional as F

    from nacd.chat import IGNORE_INDEX
    from nacd.train import model_inputs

    shift = batch["labels"][:, 1:]
    mask = shift != IGNORE_INDEX
    out = model(**model_inputs(batch)).logits  # the last hidden states when the sparse head is installed
    if sparse is not None:
        logits = sparse.head(out[:, :-1][mask]).float()
        if sparse.softcap is not None:
            logits = torch.tanh(logits / sparse.softcap) * sparse.softcap
    else:
        logits = out[:, :-1][mask].float()
    nll = F.cross_entropy(logits, shift[mask], reduction="none")
    return nll, mask.nonzero()[:, 0]


def _batches(lengths: Sequence[int], batch_size: int, vocab: int, sparse: bool) -> list[list[int]]:
    """Indices by length, longest first, ``batch_size`` a batch; without the sparse head also within
    :data:`LOGIT_BUDGET` full logits per pass (a 262k vocabulary times a batch of long rows is gigabytes)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if (
            out
            and len(out[-1]) < batch_size
            and (sparse or (len(out[-1]) + 1) * lengths[out[-1][0]] * vocab <= LOGIT_BUDGET)
        ):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def score_heldout(
    model: Any,
    tokenizer: Any,
    bench: HeldoutBenchmark,
    data_cfg: Any,
    batch_size: int = 16,
    *,
    ranks: Ranks = Ranks(),
    progress: Callable[[int], None] | None = None,
    shares: list[int] | None = None,
) -> list[dict[str, Any]]:
    """One sample per held-out example: ``{benchmark, id, subject (its source), loss, nll_sum, n_tokens}``."""
    import torch

    from nacd.chat import ExampleError, collate, tokenize_example
    from nacd.train import SparseLogitsForward, loss_tokens

    rows, samples = [], []
    for ex in bench.examples:
        try:
            tok = tokenize_example(ex, tokenizer, data_cfg.max_seq_len, data_cfg.template, data_cfg.truncation)
        except ExampleError as exc:
            log.warning("%s: %s; not scored", bench.name, exc)
            continue
        if loss_tokens(tok) == 0:
            log.warning("%s: %s has no response token to score after the first; not scored", bench.name, ex.origin)
            continue
        rows.append(tok)
    if not rows:
        raise DataError(f"{bench.name}: none of the {len(bench.examples)} held-out examples has a response to score")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    sparse = SparseLogitsForward()
    exact = sparse.install(model, collate(rows[:2], pad))
    vocab = int(getattr(model.config, "vocab_size", None) or len(tokenizer))
    plan = _batches([len(r.input_ids) for r in rows], batch_size, vocab, exact)
    mine = ranks.mine(len(plan))
    sums: dict[int, tuple[float, int]] = {}
    try:
        with torch.no_grad():
            for j in mine:
                batch = {k: v.to(device) for k, v in collate([rows[i] for i in plan[j]], pad).items()}
                nll, row = _token_nll(model, batch, sparse if exact else None)
                per = torch.zeros(len(plan[j]), dtype=torch.float64, device=nll.device).index_add_(0, row, nll.double())
                counts = torch.bincount(row, minlength=len(plan[j]))
                for k, i in enumerate(plan[j]):
                    sums[i] = (float(per[k]), int(counts[k]))
                if progress is not None:
                    progress(len(plan[j]))
    finally:
        sparse.remove()
    if ranks.world > 1:
        for part in ranks.gather(sums):
            sums.update(part)
    if shares is not None:
        shares[:] = [sum(len(plan[j]) for j in Ranks(r, ranks.world).mine(len(plan))) for r in range(ranks.world)]
    for i, tok in enumerate(rows):
        total, n = sums[i]
        samples.append(
            {"benchmark": bench.name, "id": tok.id, "subject": tok.source, "loss": total / n, "nll_sum": total,
             "n_tokens": n}
        )  # fmt: skip
    return samples


def aggregate_loss(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``n``, ``loss`` (mean over examples) with its standard error, ``token_loss`` (over tokens), per source."""
    from nacd.stats import mean_std

    def metrics(part: Sequence[dict[str, Any]]) -> dict[str, Any]:
        loss, std = mean_std([s["loss"] for s in part])
        se = None if std is None else std / len(part) ** 0.5
        tokens = sum(s["n_tokens"] for s in part)
        return {"n": len(part), "loss": loss, "loss_stderr": se, "token_loss": sum(s["nll_sum"] for s in part) / tokens,
                "n_tokens": tokens}  # fmt: skip

    out = metrics(samples)
    sources = sorted({s["subject"] for s in samples})
    if len(sources) > 1:
        out["subjects"] = {src: metrics([s for s in samples if s["subject"] == src]) for src in sources}
    return out


def evaluate_heldout(
    model: Any, tokenizer: Any, bench: HeldoutBenchmark, cfg: Any, data_cfg: Any, *, progress: bool, ranks: Ranks
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(results, samples)`` of one held-out benchmark, as :func:`nacd.evaluate.evaluate` gives them."""

    start = time.perf_counter()
    shares: list[int] = []
    with progress_bar(
        total=len(bench.examples), desc=f"eval {bench.name}", unit="ex", disable=not (progress and ranks.is_main)
    ) as bar:
        samples = score_heldout(
            model, tokenizer, bench, data_cfg, cfg.batch_size, ranks=ranks, progress=bar.update, shares=shares
        )
    seconds = time.perf_counter() - start
    results = {
        **aggregate_loss(samples),
        "kind": "loss",
        "split": bench.split,
        "source": bench.source,
        "ids": [s["id"] for s in samples],
        "seconds": round(seconds, 3),
    }
    if ranks.world > 1:
        results["processes"] = {"count": ranks.world, "examples": shares}
    log.info("%s (n=%d): loss %.4f, token loss %.4f", bench.name, len(samples), results["loss"], results["token_loss"])
    return results, samples
