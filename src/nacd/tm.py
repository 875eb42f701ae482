"""The math of trajectory matching: Eqs. 2-3, the prompt initialisations, the projections onto the
vocabulary and where the prompts go in a batch.

Small pure functions of tensors that tests check against hand computations. The student (the model
as a function of its LoRA tensors) is :class:`nacd.student.Student`; the differentiable N-step unrolls
are in :mod:`nacd.unrolls`.

Importing this module imports torch; the stage module :mod:`nacd.distill` imports it
only when it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nacd.chat import IGNORE_INDEX
from nacd.errors import NacdError

# --------------------------------------------------------------------------- the math (pure)


def matching_loss(theta_n: Sequence[Any], target: Sequence[Any], start: Sequence[Any]) -> Any:
    """Eq. 2: ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 over all LoRA tensors."""
    num = sum(((a - b) ** 2).sum() for a, b in zip(theta_n, target, strict=True))
    den = sum(((a - b) ** 2).sum() for a, b in zip(start, target, strict=True))
    return num / den


def global_norm(tensors: Sequence[Any]) -> Any:
    """The euclidean norm of a list of tensors taken as one vector (``clip_grad_norm_``'s total norm)."""
    return torch.sqrt(sum((t**2).sum() for t in tensors))


def nearest_vocab(vectors: Any, vocab: Any, chunk: int = 8192) -> tuple[Any, Any]:
    """(distance, index) of each row of ``vectors`` (n, d) to its nearest row of ``vocab`` (V, d).

    The search runs without a graph, ``chunk`` vocabulary rows at a time (a 262k x 640
    vocabulary never needs an n x V matrix); the returned distance is differentiable in
    ``vectors``: d/dp ||p - e*|| = (p - e*) / ||p - e*||.
    """

    with torch.no_grad():
        flat = vectors.detach()
        best = torch.full((flat.shape[0],), float("inf"), dtype=flat.dtype, device=flat.device)
        index = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        for start in range(0, vocab.shape[0], chunk):
            block = vocab[start : start + chunk].to(flat.dtype)
            d2 = torch.cdist(flat, block).pow(2)
            value, where = d2.min(dim=1)
            better = value < best
            best = torch.where(better, value, best)
            index = torch.where(better, where + start, index)
    dist = (vectors - vocab[index].to(vectors.dtype)).norm(dim=-1)
    return dist, index


def nearest_rows(vectors: Any, vocab: Any, metric: str = "l2", chunk: int = 8192) -> Any:
    """Index of each row of ``vectors`` (n, d) into ``vocab`` (V, d): the nearest row by euclidean
    distance (``l2``, how the distilled set decodes) or the most similar by cosine (``cosine``, PEZ's
    projection); no graph, ``chunk`` vocabulary rows at a time."""
    if metric == "l2":
        return nearest_vocab(vectors.detach(), vocab, chunk)[1]
    if metric != "cosine":
        raise NacdError(f"distill.projection={metric!r}: expected l2 or cosine")
    with torch.no_grad():
        flat = torch.nn.functional.normalize(vectors.detach().float(), dim=-1)
        best = torch.full((flat.shape[0],), -float("inf"), device=flat.device)
        index = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        for start in range(0, vocab.shape[0], chunk):
            block = torch.nn.functional.normalize(vocab[start : start + chunk].float().to(flat.device), dim=-1)
            value, where = (flat @ block.T).max(dim=1)
            better = value > best
            best = torch.where(better, value, best)
            index = torch.where(better, where + start, index)
    return index


def snap(prompts: Any, vocab: Any, metric: str = "l2", chunk: int = 8192) -> Any:
    """``prompts`` (..., d) replaced by their nearest vocabulary rows (:func:`nearest_rows`): the hard
    tokens a receiving model reads, as embeddings of the distilling model."""
    d = prompts.shape[-1]
    idx = nearest_rows(prompts.reshape(-1, d), vocab, metric, chunk)
    return vocab[idx].to(device=prompts.device, dtype=prompts.dtype).reshape(prompts.shape)


def straight_through(syn: Any, vocab: Any, rows: Any, metric: str = "l2", chunk: int = 8192) -> Any:
    """PEZ's projection (Wen et al. 2023): the forward pass sees the examples ``rows`` of ``syn``
    (n, k, d) at their nearest vocabulary rows, and the gradient with respect to those hard
    embeddings is applied to the continuous copy ``syn`` unchanged (straight-through). Rows not in
    ``rows`` are left as they are (the unroll does not read them), so each iteration projects only
    the examples its draws use: b x k x V, not n x k x V."""
    hard = syn.detach().clone()
    hard[rows] = snap(hard[rows], vocab, metric, chunk)
    return syn + (hard - syn).detach()


def text_token_ids(tokenizer: Any, n_rows: int) -> list[int]:
    """Ids of the embedding rows that are ordinary text tokens: not special (``<|im_end|>``, ``<bos>``,
    added control tokens) and within the tokenizer (embedding matrices are often padded past it).

    Prompt vectors are pulled toward and decoded as these only, so the decoded prompt is text that
    another tokenizer can read, not control tokens that would end a turn or a document.
    """
    special = set(tokenizer.all_special_ids)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(token_id))
    return [i for i in range(min(len(tokenizer), n_rows)) if i not in special]


def is_word(text: str) -> bool:
    """Whether a decoded token is a whole word: a leading space and two or more letters (any script)."""
    return len(text) >= 3 and text[0] == " " and text[1:].isalpha()


def word_token_ids(tokenizer: Any, n_rows: int) -> list[int]:
    """The text tokens (:func:`text_token_ids`) that decode to a whole word (:func:`is_word`), such as
    ``' ocean'``: prompts made of them decode to a row of words a receiving model reads as text, not to
    subword pieces and punctuation (``distill.nearest=words``)."""
    return [i for i in text_token_ids(tokenizer, n_rows) if is_word(tokenizer.decode([i]))]


def regularizer(vectors: Any, vocab: Any, chunk: int = 8192, kind: str = "distance", spacing: float = 1.0) -> Any:
    """The nearest-vocabulary penalty over prompt vectors (n, d).

    ``distance``: Eq. 3, the mean euclidean distance to the nearest vocabulary row (its gradient has
    norm 1/n per vector everywhere, so a large beta snaps every vector to its nearest row at once).
    ``spacing``: the same distance divided by ``spacing``, the vocabulary's typical nearest-neighbour
    distance (:func:`vocab_spacing`), so beta means the same for every model's embedding scale.
    ``spacing_squared``: the mean of (distance / spacing)^2: its pull fades near a token, so prompts
    stay near real tokens without all collapsing onto one.
    """
    dist, _ = nearest_vocab(vectors, vocab, chunk)
    if kind == "distance":
        return dist.mean()
    if kind == "spacing":
        return (dist / spacing).mean()
    if kind == "spacing_squared":
        return ((dist / spacing) ** 2).mean()
    raise NacdError(f"distill.regularizer={kind!r}: expected distance, spacing or spacing_squared")


def vocab_spacing(vocab: Any, sample: int = 1024, seed: int = 0, chunk: int = 8192) -> float:
    """The median distance from a vocabulary row to its nearest *other* row, over ``sample`` rows
    drawn with ``seed`` (all rows when the vocabulary is smaller): the embedding space's own length
    scale, which the ``spacing`` regularizers divide by."""
    w = vocab.detach().float()
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(w.shape[0], generator=gen)[: min(sample, w.shape[0])].to(w.device)
    best = torch.full((rows.shape[0],), float("inf"), device=w.device)
    for start in range(0, w.shape[0], chunk):
        d = torch.cdist(w[rows], w[start : start + chunk])
        own = (rows >= start) & (rows < start + d.shape[1])
        d[own.nonzero().squeeze(1), (rows[own] - start)] = float("inf")
        best = torch.minimum(best, d.min(dim=1).values)
    return float(best.median())


def initial_prompts(
    kind: str,
    vocab: Any,
    n: int,
    k: int,
    seed: int,
    example_rows: Sequence[Sequence[int]] | None = None,
    toward_mean: float = 0.0,
) -> Any:
    """D_syn of shape (n, k, d).

    ``mean_vocab``: every vector at the mean vocabulary embedding (the paper's choice);
    ``random_vocab``: random vocabulary rows; ``random``: Gaussian noise with the vocabulary's mean
    and std; ``frequent_vocab``: distinct rows drawn from the tokens most frequent in the data
    (prompt tuning's "sampled vocab" init); ``example_tokens``: each example's own tokens, k distinct
    rows drawn from the distinctive tokens of its instruction. ``example_rows`` (per example, the
    candidate-row indices of its instruction tokens) is needed by the last two. ``toward_mean`` in
    [0, 1] then moves every vector that fraction of the way to the mean embedding: distinct starts
    nearer the paper's neutral one.
    """
    if not 0.0 <= toward_mean <= 1.0:
        raise NacdError(f"distill.init_toward_mean={toward_mean}: expected a fraction in [0, 1]")
    out = _initial_prompts(kind, vocab, n, k, seed, example_rows)
    if toward_mean == 0.0:
        return out
    mean = vocab.detach().float().cpu().mean(0)
    return torch.lerp(out, mean.expand_as(out), toward_mean)


def _initial_prompts(
    kind: str, vocab: Any, n: int, k: int, seed: int, example_rows: Sequence[Sequence[int]] | None
) -> Any:

    gen = torch.Generator().manual_seed(seed)
    w = vocab.detach().float().cpu()
    if kind == "mean_vocab":
        return w.mean(0).expand(n, k, -1).clone()
    if kind == "random_vocab":
        return w[torch.randint(0, w.shape[0], (n, k), generator=gen)].clone()
    if kind == "random":
        return w.mean(0) + w.std(0) * torch.randn(n, k, w.shape[1], generator=gen)
    if kind in ("frequent_vocab", "example_tokens"):
        if example_rows is None or len(example_rows) != n:
            raise NacdError(f"distill.init={kind!r} needs the instruction tokens of each of the {n} examples")
        return w[torch.tensor(token_init_rows(kind, example_rows, k, gen))]
    raise NacdError(
        f"distill.init={kind!r}: expected mean_vocab, random_vocab, random, frequent_vocab or example_tokens"
    )


def _pick(pool: Sequence[int], k: int, gen: Any) -> list[int]:
    """k entries of ``pool`` drawn without replacement (with replacement when the pool is smaller)."""
    if len(pool) >= k:
        return [pool[i] for i in torch.randperm(len(pool), generator=gen)[:k].tolist()]
    return [pool[i] for i in torch.randint(0, len(pool), (k,), generator=gen).tolist()]


def token_init_rows(kind: str, example_rows: Sequence[Sequence[int]], k: int, gen: Any) -> list[list[int]]:
    """Row indices (n, k) for the token initialisations (see :func:`initial_prompts`).

    ``example_tokens`` draws from the example's own instruction tokens that occur in at most half of
    the examples (template words such as ``User`` are shared by all and carry nothing; if none are
    left, from all its tokens). ``frequent_vocab`` draws, for every example, from the 64 (or k x n
    when larger) tokens most frequent over all the instructions, without repeats across examples
    as long as the pool lasts.
    """
    from collections import Counter

    if any(len(rows) == 0 for rows in example_rows):
        raise NacdError("distill.init: an example has no instruction token among the candidate rows")
    df = Counter(r for rows in example_rows for r in set(rows))
    if kind == "example_tokens":
        out = []
        for rows in example_rows:
            own = sorted(set(rows))
            rare = [r for r in own if df[r] <= max(1, len(example_rows) // 2)]
            out.append(_pick(rare or own, k, gen))
        return out
    counts = Counter(r for rows in example_rows for r in rows)
    pool = [r for r, _ in counts.most_common(max(64, k * len(example_rows)))]
    flat = _pick(pool, k * len(example_rows), gen)
    return [flat[i * k : (i + 1) * k] for i in range(len(example_rows))]


def candidate_rows(student: Any) -> Any:
    """The vocabulary rows prompt vectors are initialised from, regularized toward and decoded as
    (``distill.nearest``: the text tokens, or every row)."""
    vocab = student.vocab.detach()
    return vocab if student.vocab_ids is None else vocab[student.vocab_ids.to(vocab.device)]


TOKEN_INITS = ("frequent_vocab", "example_tokens")


def instruction_rows(data: list[Any], vocab_ids: Any) -> list[list[int]]:
    """Per tokenized example, the candidate-row indices of its instruction tokens (no loss on them),
    for the token initialisations; tokens that are not candidate rows (special tokens) are left out."""
    row_of = None if vocab_ids is None else {int(t): r for r, t in enumerate(vocab_ids.tolist())}
    out = []
    for ex in data:
        toks = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == -100]
        out.append([t if row_of is None else row_of[t] for t in toks if row_of is None or t in row_of])
    return out


# --------------------------------------------------------------------------- the student


def embed_scale(embed: Any) -> float:
    """The factor an embedding module applies to its rows (Gemma: sqrt(hidden)); 1 for most models."""
    return float(getattr(embed, "embed_scale", 1.0))


def prompted_inputs(embed: Any, scale: float, prompts: Any, text: dict[str, Any], offset: int = 0) -> dict[str, Any]:
    """``inputs_embeds = concat(E(text[:offset]), prompts * scale, E(text[offset:]))`` with the attention
    mask and labels extended over the k prompt positions (attended, no loss). ``offset`` 0 puts the
    prompts first (the paper); 1 after the first text token (BOS or the chat template's first token,
    the position most models use as an attention sink). Prompts live in the raw vocabulary space
    (Eq. 3), so they get the same scale the embedding module gives token rows."""
    b, k = prompts.shape[:2]
    mask, labels = text["attention_mask"], text["labels"]
    if not 0 <= offset < mask.shape[1]:  # per example: check_prompt_offset, once per stage, not per step
        raise ValueError(f"prompt offset {offset}: the batch has {mask.shape[1]} text positions")
    with torch.no_grad():
        embeds = embed(text["input_ids"])
    p = (prompts * scale).to(embeds.dtype)
    return {
        "inputs_embeds": torch.cat([embeds[:, :offset], p, embeds[:, offset:]], dim=1),
        "attention_mask": torch.cat([mask[:, :offset], mask.new_ones(b, k), mask[:, offset:]], dim=1),
        "labels": torch.cat([labels[:, :offset], labels.new_full((b, k), IGNORE_INDEX), labels[:, offset:]], dim=1),
    }


def check_prompt_offset(data: Sequence[Any], offset: int, key: str = "distill.prompt_offset") -> None:
    """Every tokenized example has a text token after the first ``offset`` (where its prompt goes): a
    shorter one would get its prompt among the padding. Raises naming the example."""
    if not data:  # nothing to place a prompt in; the stage says so itself
        return
    short = min(data, key=lambda ex: len(ex.input_ids))
    if len(short.input_ids) <= offset:
        raise NacdError(
            f"{key}={offset}: example {short.id!r} has only {len(short.input_ids)} token(s); "
            "the prompt must come before at least one text token"
        )
