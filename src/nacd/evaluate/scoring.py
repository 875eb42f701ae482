"""Scoring: ``(sum of log-probs, number of tokens)`` of (context, continuation) requests, as lm-eval's
``loglikelihood`` computes them (:func:`score_loglikelihood`), with each context run once: the context and
all its choices are packed into one row under an attention mask, several contexts per forward pass, a
long shared prefix (few-shot examples) runs once per batch, and the plain one-row-per-request way stays
as the reference and the fallback."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nacd.errors import NacdError
from nacd.evaluate.prompts import encode_pair, model_max_length
from nacd.ranks import Ranks

log = logging.getLogger(__name__)

#: Contexts that agree on this many first tokens are batched together and share their common prefix.
SHARED_PREFIX_MIN = 64


@dataclass
class _Group:
    """The requests that share one context: scored in one packed row."""

    context: list[int]
    continuations: list[list[int]] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # positions in the request list

    @property
    def packed_len(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)

    @property
    def scored_tail(self) -> int:
        """Positions at the end of the row whose logits are needed: the last context token and the choices."""
        return 1 + sum(len(c) - 1 for c in self.continuations)

    @property
    def packed_choices(self) -> int:
        """Continuations with tokens in the packed row (all but their last token is fed)."""
        return sum(len(c) > 1 for c in self.continuations)

    @property
    def fits(self) -> int:
        """The longest request's input length (lm-eval feeds context + continuation minus its last token)."""
        return len(self.context) + max(len(c) for c in self.continuations) - 1


def _sliding(config: Any) -> tuple[int | None, bool]:
    """(sliding window, whether only some layers slide) of a model config."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None, False
    types = set(getattr(config, "layer_types", None) or [])
    if types and "sliding_attention" not in types:
        return None, False
    return window, len(types) > 1


def _packed_batch(
    groups: Sequence[_Group], config: Any, dtype: Any, device: Any, prefix: int = 0
) -> tuple[dict[str, Any], int, list]:
    """Model inputs of a batch of packed, left-padded rows that follow ``prefix`` cached context tokens;
    the kept-logits count; where each continuation token's log-prob is read (kept position, token ids)."""
    import torch

    width = max(g.packed_len for g in groups) - prefix
    keep = max(g.scored_tail for g in groups)
    ids = torch.zeros(len(groups), width, dtype=torch.long)
    pos = torch.zeros(len(groups), width, dtype=torch.long)
    seg = torch.full((len(groups), width), -1, dtype=torch.long)  # -1 pad, 0 context, i + 1 choice i
    reads = []
    for r, g in enumerate(groups):
        off = width - (g.packed_len - prefix)
        n_ctx = len(g.context)
        ids[r, off : off + n_ctx - prefix] = torch.tensor(g.context[prefix:])
        pos[r, off : off + n_ctx - prefix] = torch.arange(prefix, n_ctx)
        seg[r, off : off + n_ctx - prefix] = 0
        at = off + n_ctx - prefix
        last_ctx = at - 1
        group_reads = []
        for i, cont in enumerate(g.continuations):
            n = len(cont) - 1
            if n:
                ids[r, at : at + n] = torch.tensor(cont[:-1])
                pos[r, at : at + n] = torch.arange(n_ctx, n_ctx + n)
                seg[r, at : at + n] = i + 1
            # token j of the continuation is predicted at the last context token (j = 0) or at its token j - 1
            where = [last_ctx, *range(at, at + n)]
            group_reads.append(([w - (width - keep) for w in where], cont))
            at += n
        reads.append(group_reads)
    q, k = seg[:, :, None], seg[:, None, :]
    order = torch.arange(width)
    allowed = (order[None, :, None] >= order[None, None, :]) & (k >= 0) & ((k == 0) | (k == q)) & (q >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)[None]  # pads attend to themselves: no empty softmax rows
    if prefix:  # every row sees the cached prefix
        allowed = torch.cat([torch.ones(len(groups), width, prefix, dtype=torch.bool), allowed], dim=-1)
    window, hybrid = _sliding(config)
    masks: Any
    if window is not None and int(pos.max()) >= window:
        assert not prefix, "no shared prefix with a sliding window"
        near = (pos[:, :, None] - pos[:, None, :]) < window
        slide_mask = _additive(allowed & near, dtype, device)
        masks = {"full_attention": _additive(allowed, dtype, device), "sliding_attention": slide_mask}
        masks = masks if hybrid else slide_mask
    else:
        masks = _additive(allowed, dtype, device)
    inputs = {"input_ids": ids.to(device), "position_ids": pos.to(device), "attention_mask": masks}
    return inputs, keep, reads


def _additive(allowed: Any, dtype: Any, device: Any) -> Any:
    """A 4D float mask (0 where allowed, the dtype's minimum elsewhere): works with eager and SDPA attention."""
    import torch

    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None].to(device)


def _forward(model: Any, inputs: dict[str, Any], keep: Any) -> Any:
    """The model's output with logits for the last ``keep`` positions only (or, a 1D tensor, at those
    positions), where the model allows it; otherwise at every position."""
    try:
        return model(**inputs, logits_to_keep=keep)
    except TypeError as exc:
        if "logits_to_keep" not in str(exc):
            raise
        return model(**inputs)


def _score_packed(model: Any, groups: Sequence[_Group], prefix: int = 0) -> list[list[tuple[float, int]]]:
    """Log-prob and token count of every continuation of ``groups``, in one forward pass (two with a
    shared ``prefix``: its first ``prefix`` context tokens, the same in every group, run once and are cached)."""
    import torch

    param = next(model.parameters())
    inputs, keep, reads = _packed_batch(groups, model.config, param.dtype, param.device, prefix)
    if prefix:
        head = torch.tensor([groups[0].context[:prefix]], device=param.device)
        out = _forward(model, {"input_ids": head, "use_cache": True}, 1)
        # transformers >= 5.2x returns and takes ``cache`` (``past_key_values`` warns there, goes in 5.40)
        key = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
        cache = out[key]
        cache.batch_repeat_interleave(len(groups))
        inputs.update({key: cache, "use_cache": True})
    else:
        inputs["use_cache"] = False
    logits = _forward(model, inputs, keep).logits[:, -keep:]
    out = []
    for r, group_reads in enumerate(reads):
        rows = []
        for where, cont in group_reads:
            picked = logits[r, where].float()  # [len(cont), vocab]
            lp = torch.log_softmax(picked, dim=-1).gather(-1, torch.tensor(cont, device=param.device)[:, None])
            rows.append((float(lp.sum()), len(cont)))
        out.append(rows)
    return out


def _score_plain(model: Any, pairs: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[tuple[float, int]]:
    """lm-eval's way: one right-padded row per (context, continuation), truncated from the left."""
    import torch

    device = next(model.parameters()).device
    rows = [(ctx + cont)[-(max_length + 1) :][:-1] for ctx, cont in pairs]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    # logits only where a continuation token is predicted (the union over rows): a 262k vocabulary
    # times every position of a 5-shot prompt would be gigabytes
    needed = sorted({p for r, (_, cont) in zip(rows, pairs, strict=True) for p in range(len(r) - len(cont), len(r))})
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    logits = _forward(model, inputs, torch.tensor(needed, device=device)).logits
    column = {p: j for j, p in enumerate(needed)} if logits.shape[1] == len(needed) else None
    out = []
    for i, (r, (_, cont)) in enumerate(zip(rows, pairs, strict=True)):
        where = list(range(len(r) - len(cont), len(r)))
        picked = logits[i, [column[p] for p in where] if column is not None else where].float()
        lp = torch.log_softmax(picked, dim=-1).gather(-1, torch.tensor(cont, device=device)[:, None])
        out.append((float(lp.sum()), len(cont)))
    return out


def _group_requests(encoded: Sequence[tuple[list[int], list[int]]]) -> list[_Group]:
    groups: dict[tuple[int, ...], _Group] = {}
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise NacdError(f"request {i}: the continuation encodes to no tokens")
        g = groups.setdefault(tuple(ctx), _Group(list(ctx)))
        g.continuations.append(list(cont))
        g.indices.append(i)
    return list(groups.values())


def _common_prefix(contexts: Sequence[Sequence[int]]) -> int:
    first = contexts[0]
    n = min(len(c) for c in contexts)
    for c in contexts[1:]:
        n = next((i for i in range(n) if c[i] != first[i]), n)
    return n


def _plan(groups: Sequence[_Group], batch_size: int, share: bool) -> list[tuple[list[_Group], int]]:
    """Batches of groups and the length of the context prefix they share (0: none to share).

    Contexts that agree on their first :data:`SHARED_PREFIX_MIN` tokens (MMLU's description and
    shots of one subject) are batched together and their common prefix runs once per batch;
    the rest are batched by length, longest first, as lm-eval does (memory errors show at once).
    """
    buckets: dict[tuple[int, ...], list[_Group]] = {}
    singles: list[_Group] = []
    for g in groups:
        if share and len(g.context) > SHARED_PREFIX_MIN:
            buckets.setdefault(tuple(g.context[:SHARED_PREFIX_MIN]), []).append(g)
        else:
            singles.append(g)
    plan: list[tuple[list[_Group], int]] = []
    for members in buckets.values():
        if len(members) == 1:
            singles.extend(members)
            continue
        members.sort(key=lambda g: -g.packed_len)
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            shared = min(_common_prefix([g.context for g in batch]), min(len(g.context) for g in batch) - 1)
            plan.append((batch, shared if len(batch) > 1 and shared >= SHARED_PREFIX_MIN else 0))
    singles.sort(key=lambda g: -g.packed_len)
    plan.extend((singles[i : i + batch_size], 0) for i in range(0, len(singles), batch_size))
    plan.sort(key=lambda item: -max(g.packed_len - item[1] for g in item[0]))
    return plan


def _close(a: Sequence[tuple[float, int]], b: Sequence[tuple[float, int]], half: bool) -> bool:
    """Whether packed scores ``a`` equal plain scores ``b`` up to rounding (float32: ~1e-5 seen)."""
    atol, rtol = (0.1, 1e-2) if half else (5e-4, 1e-5)
    return all(abs(x[0] - y[0]) <= atol + rtol * abs(y[0]) for x, y in zip(a, b, strict=True))


class _Scorer:
    """How :func:`score_loglikelihood` scores one batch of context groups: plainly (one row per request) or
    packed (one row per context, its prefix shared across the batch when it can be), each packed kind
    checked once against plain scoring under ``method=auto`` and dropped, with a warning, if it differs
    or fails on this model."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int, method: str):
        import torch

        self.model, self.batch_size = model, batch_size
        self.max_length = model_max_length(model, tokenizer)
        attn = getattr(model.config, "_attn_implementation", None)
        if method != "plain" and attn not in (None, "eager", "sdpa"):
            log.warning("attention %s takes no custom masks: scoring one row per request (slower)", attn)
            method = "plain"
        self.half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
        self.verify = {"packed": method == "auto", "shared": method == "auto"}
        self.modes = {"packed": method != "plain", "shared": method != "plain"}
        self.window = _sliding(model.config)[0]

    def plain(self, batch: Sequence[_Group]) -> list[list[tuple[float, int]]]:
        pairs = [(g.context, c) for g in batch for c in g.continuations]
        flat = []
        for start in range(0, len(pairs), self.batch_size):
            flat.extend(_score_plain(self.model, pairs[start : start + self.batch_size], self.max_length))
        out, at = [], 0
        for g in batch:
            out.append(flat[at : at + len(g.continuations)])
            at += len(g.continuations)
        return out

    def packed(self, batch: list[_Group], prefix: int) -> list[list[tuple[float, int]]]:
        modes, verify = self.modes, self.verify
        # a sliding-window model shares a cached prefix only when the whole batch lies inside its window:
        # the window then masks nothing, and its cache layers keep every prefix token
        inside = self.window is None or max(g.fits for g in batch) < self.window
        prefix = prefix if modes["shared"] and inside else 0
        if not modes["packed"]:
            return self.plain(batch)
        kind = "shared" if prefix else "packed"
        try:
            scores = _score_packed(self.model, batch, prefix)
        except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
            if not verify[kind]:
                raise
            log.warning("%s scoring fails on this model (%s: %s): not used", kind, type(exc).__name__, exc)
            modes[kind] = verify[kind] = False
            return self.packed(batch, 0) if prefix else self.plain(batch)
        if verify[kind]:
            verify[kind] = False
            # the shortest of the contexts with the most multi-token choices: packing errors show there
            probe = min(range(len(batch)), key=lambda i: (-batch[i].packed_choices, batch[i].packed_len))
            reference = self.plain([batch[probe]])[0]
            if not _close(scores[probe], reference, self.half):
                log.warning(
                    "%s scoring differs from plain scoring on this model (%s vs %s): not used",
                    "shared-prefix" if prefix else "packed",
                    [round(s, 4) for s, _ in scores[probe]],
                    [round(s, 4) for s, _ in reference],
                )
                modes[kind] = False
                return self.packed(batch, 0) if prefix else self.plain(batch)
        return scores


def score_loglikelihood(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    *,
    method: str = "auto",
    progress: Callable[[int], None] | None = None,
    ranks: Ranks = Ranks(),
    shares: list[int] | None = None,
) -> list[tuple[float, int]]:
    """``(sum of log-probs, number of tokens)`` of each ``(context, continuation)`` request, as lm-eval's
    ``loglikelihood`` computes it (tokenization by :func:`encode_pair`).

    ``method``:

    * ``packed``: the requests that share a context are one row (each continuation attends to the
      context and to itself), ``batch_size`` contexts per forward pass; contexts that share a long
      token prefix (few-shot examples) are batched together and the prefix runs once per batch;
    * ``plain``: one row per request, ``batch_size`` rows per pass, like lm-eval;
    * ``auto``: packed, after checking on the first batch of each kind that it gives the plain scores
      (if not, it warns and falls back: shared prefix -> packed -> plain).

    Contexts too long for the model are scored plainly (lm-eval's left truncation). ``progress(n)``
    is called with the number of contexts done after each pass.

    Under a launcher (``ranks``) the batches of the one-process plan are dealt round robin to the
    processes, each scores its batches exactly as one process would (same rows, same shapes: shared
    prefixes stay within a batch, so within a process), and every process gets all the scores; the
    numbers do not depend on the number of processes. ``shares`` (a list), when given, receives the
    number of contexts each process scored.
    """
    import torch

    if method not in ("auto", "packed", "plain"):
        raise ValueError(f"method: expected auto, packed or plain, got {method!r}")
    cache: dict[str, list[int]] = {}
    encoded = [encode_pair(tokenizer, ctx, cont, cache) for ctx, cont in requests]
    groups = _group_requests(encoded)
    scorer = _Scorer(model, tokenizer, batch_size, method)
    max_length = scorer.max_length
    results: list[tuple[float, int] | None] = [None] * len(requests)

    fits = [g for g in groups if g.fits <= max_length]
    too_long = [g for g in groups if g.fits > max_length]
    if too_long:
        log.warning("%d context(s) longer than the model's %d tokens: cut from the left", len(too_long), max_length)
    plan = _plan(fits, batch_size, scorer.modes["shared"])
    plan += [(too_long[i : i + batch_size], -1) for i in range(0, len(too_long), batch_size)]
    mine = set(ranks.mine(len(plan)))
    with torch.no_grad():
        for j, (batch, prefix) in enumerate(plan):
            if j not in mine:
                continue
            scores = scorer.plain(batch) if prefix < 0 else scorer.packed(batch, prefix)
            for g, group_scores in zip(batch, scores, strict=True):
                for i, s in zip(g.indices, group_scores, strict=True):
                    results[i] = s
            if progress is not None:
                progress(len(batch))
    if ranks.world > 1:  # every process's scores, on every process
        parts = ranks.gather({i: r for i, r in enumerate(results) if r is not None})
        for part in parts:
            for i, r in part.items():
                results[i] = r
    if shares is not None:
        shares[:] = [sum(len(plan[j][0]) for j in Ranks(r, ranks.world).mine(len(plan))) for r in range(ranks.world)]
    missing = [i for i, r in enumerate(results) if r is None]
    assert not missing, f"requests {missing[:5]} were not scored"
    return [r for r in results if r is not None]
