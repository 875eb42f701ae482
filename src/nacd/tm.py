"""The core of trajectory matching: Eqs. 2-3 and the differentiable student unroll.

Small pure functions of tensors that tests check against hand computations, the
:class:`Student` (the model as a function of its LoRA tensors), and three unroll
modes behind :func:`unroll`:

- ``naive``: autograd through the N steps with ``create_graph=True``; exact; memory
  grows with N (every step's second-order graph is alive until the backward).
- ``flat``: exact and memory-flat. The forward pass takes N plain steps and keeps only
  theta_0..theta_{N-1} (LoRA tensors, small). The backward pass walks the steps in
  reverse and rebuilds one step's second-order graph at a time. With lambda_n =
  dL/dtheta_n and g_n the gradient of step n at theta_{n-1}:
  dL/dalpha -= <g_n, lambda_n>; dL/dp_n -= alpha * d<g_n, lambda_n>/dp_n;
  lambda_{n-1} = lambda_n - alpha * H_n lambda_n (H_n lambda_n = d<g_n, lambda_n>/dtheta:
  one double-backward gives both).
- ``fd``: approximate (documented as such), memory-flat and cheaper: the same reverse
  walk, but H_n lambda_n and the mixed product for the prompts are forward finite
  differences of gradients, (grad(theta + eps lambda) - grad(theta)) / eps, reusing
  the gradients of the forward pass: one extra plain gradient per step.

Importing this module imports torch; the stage module :mod:`nacd.distill` imports it
only when it runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from nacd.errors import NacdError

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- the math (pure)


def matching_loss(theta_n: Sequence[Any], target: Sequence[Any], start: Sequence[Any]) -> Any:
    """Eq. 2: ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 over all LoRA tensors."""
    num = sum(((a - b) ** 2).sum() for a, b in zip(theta_n, target, strict=True))
    den = sum(((a - b) ** 2).sum() for a, b in zip(start, target, strict=True))
    return num / den


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
    kind: str, vocab: Any, n: int, k: int, seed: int, example_rows: Sequence[Sequence[int]] | None = None
) -> Any:
    """D_syn of shape (n, k, d).

    ``mean_vocab``: every vector at the mean vocabulary embedding (the paper's choice);
    ``random_vocab``: random vocabulary rows; ``random``: Gaussian noise with the vocabulary's mean
    and std; ``frequent_vocab``: distinct rows drawn from the tokens most frequent in the data
    (prompt tuning's "sampled vocab" init); ``example_tokens``: each example's own tokens, k distinct
    rows drawn from the distinctive tokens of its instruction. ``example_rows`` (per example, the
    candidate-row indices of its instruction tokens) is needed by the last two.
    """

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


def prompted_inputs(embed: Any, scale: float, prompts: Any, text: dict[str, Any]) -> dict[str, Any]:
    """``inputs_embeds = concat(prompts * scale, E(input_ids))`` with the attention mask and labels
    extended over the k prompt positions (attended, no loss). Prompts live in the raw vocabulary
    space (Eq. 3), so they get the same scale the embedding module gives token rows."""
    b, k = prompts.shape[:2]
    with torch.no_grad():
        embeds = embed(text["input_ids"])
    return {
        "inputs_embeds": torch.cat([(prompts * scale).to(embeds.dtype), embeds], dim=1),
        "attention_mask": torch.cat([text["attention_mask"].new_ones(b, k), text["attention_mask"]], dim=1),
        "labels": torch.cat([text["labels"].new_full((b, k), IGNORE_INDEX), text["labels"]], dim=1),
    }


class Student:
    """The distilling model as a function of its LoRA tensors: the loss of one student step.

    ``step_loss(theta, prompts, batch)`` runs the model with the LoRA parameters replaced by
    ``theta`` (``torch.func.functional_call``), on ``concat(prompts, E(text))`` with an
    attention mask and labels that cover the prompt positions with no loss, and returns the
    mean token loss. The frozen base never enters the unrolled state.
    """

    def __init__(self, model: Any, data: Sequence[Any], pad_token_id: int):
        from nacd.train import SparseLogitsForward, causal_lm, lora_parameters

        self.model = model
        self.data = data
        self.pad_token_id = pad_token_id
        params = lora_parameters(model)
        self.names = list(params)
        self.dtypes = [p.dtype for p in params.values()]  # peft keeps LoRA in float32 on a bf16 base
        embed = causal_lm(model).get_input_embeddings()
        self.embed = embed
        self.vocab = embed.weight
        self.vocab_ids: Any = None  # LongTensor of the candidate rows for prompt vectors; None = every row
        self.embed_scale = embed_scale(embed)
        self.sparse = SparseLogitsForward()
        self._sparse_ready: bool | None = None  # decided on the first batch
        self.steps: list[tuple[float, float]] = []  # (loss, gradient norm) of each step of the last unroll

    @property
    def device(self) -> Any:
        return self.vocab.device

    def text_batch(self, idx: Sequence[int]) -> dict[str, Any]:
        from nacd.data import collate

        return {k: v.to(self.device) for k, v in collate([self.data[i] for i in idx], self.pad_token_id).items()}

    def inputs(self, prompts: Any, text: dict[str, Any]) -> dict[str, Any]:
        """The model inputs of a step: concat(prompts, E(text)), prompt positions without loss."""
        return prompted_inputs(self.embed, self.embed_scale, prompts, text)

    def _call(self, theta: Sequence[Any]) -> Any:
        from torch.func import functional_call

        params = dict(zip(self.names, theta, strict=True))

        def call(**kwargs: Any) -> Any:
            return functional_call(self.model, params, args=(), kwargs=kwargs, strict=False)

        return call

    def step_loss(self, theta: Sequence[Any], prompts: Any, text: dict[str, Any]) -> Any:
        """Mean token loss of one student step at LoRA tensors ``theta`` on (prompts, text batch)."""
        from nacd.train import default_forward

        batch = self.inputs(prompts, text)
        if self._sparse_ready is None:  # check once that logits-at-loss-positions is exact here
            with torch.no_grad():
                self._sparse_ready = self.sparse.install(self.model, batch)
        forward = self.sparse if self._sparse_ready else default_forward
        loss_sum, n = forward(self._call(theta), batch)
        return loss_sum / max(1, n)

    def record_step(self, loss: Any, grads: Sequence[Any]) -> None:
        """Keep the loss and LoRA-gradient norm of each student step of the current unroll (for the history)."""
        norm = global_norm([g.detach().float() for g in grads])
        self.steps.append((float(loss.detach()), float(norm)))

    def close(self) -> None:
        self.sparse.remove()


# --------------------------------------------------------------------------- unrolls


def global_norm(tensors: Sequence[Any]) -> Any:
    """The euclidean norm of a list of tensors taken as one vector (``clip_grad_norm_``'s total norm)."""
    return torch.sqrt(sum((t**2).sum() for t in tensors))


CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: scale = max_norm / (norm + 1e-6), at most 1


def clip_scale(norm: Any, clip: float | None) -> Any:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies a gradient of norm ``norm`` by (differentiable)."""
    if clip is None:
        return torch.ones_like(norm)
    return torch.clamp(clip / (norm + CLIP_EPS), max=1.0)


def clip_vjp(grads: Sequence[Any], lam: Sequence[Any], clip: float | None) -> tuple[Any, list[Any]]:
    """For the clipped step s(g) = g * clip_scale(||g||): ``(<s(g), lam>, (ds/dg)^T lam)``.

    Unclipped, ds/dg = I. Clipped (c / (n + eps) < 1, n = ||g||): s = c g / (n + eps), so
    ds/dg = c / (n + eps) I - c g g^T / (n (n + eps)^2), a symmetric matrix.
    """
    norm = global_norm(grads)
    g_lam = sum((g * li).sum() for g, li in zip(grads, lam, strict=True))
    scale = clip_scale(norm, clip)
    if clip is None or float(scale) >= 1.0:
        return g_lam, list(lam)
    radial = clip * g_lam / (norm * (norm + CLIP_EPS) ** 2)
    return scale * g_lam, [scale * li - radial * g for g, li in zip(grads, lam, strict=True)]


def unroll_naive(
    student: Student, theta0: Sequence[Any], alpha: Any, syn: Any, batches: Sequence[Any], clip: float | None = None
) -> list[Any]:
    """N differentiable SGD steps through plain autograd (``create_graph=True``)."""
    theta = [t.detach().requires_grad_(True) for t in theta0]
    for idx in batches:
        loss = student.step_loss(theta, syn[idx], student.text_batch(idx.tolist()))
        grads = torch.autograd.grad(loss, theta, create_graph=True)
        student.record_step(loss, grads)
        scale = clip_scale(global_norm(grads), clip)
        theta = [t - alpha * scale * g for t, g in zip(theta, grads, strict=True)]
    return theta


def _rng_state(device: Any) -> tuple[Any, Any]:
    """The random state a student step draws its dropout masks from (CPU, and the accelerator's)."""
    device = torch.device(device)
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def _replayed_rng(state: tuple[Any, Any], device: Any) -> Iterator[None]:
    """Run the block with the random state ``state`` (the one a forward step saw), leaving the
    caller's state as it was (``torch.random.fork_rng``): a step rebuilt in the reverse walk draws
    the same LoRA-dropout masks as the step it rebuilds, as ``torch.utils.checkpoint`` does."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if state[1] is not None else [], device_type=device.type):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _step_grads(student: Student, theta: Sequence[Any], p: Any, idx: Any, create_graph: bool) -> tuple[Any, list[Any]]:
    """Loss of one student step and its gradients w.r.t. theta, and w.r.t. p when p requires grad."""
    loss = student.step_loss(theta, p, student.text_batch(idx.tolist()))
    wrt = [*theta, p] if p.requires_grad else list(theta)
    return loss, list(torch.autograd.grad(loss, wrt, create_graph=create_graph))


def _plain_step(
    student: Student, theta: Sequence[Any], p: Any, idx: Any, alpha: Any, clip: float | None, with_p: bool = False
) -> tuple[list[Any], Any, list[Any]]:
    """One plain (first-order) clipped student step from ``theta``: (theta_next, loss, gradients
    w.r.t. theta and, when ``with_p``, the prompts ``p``), all detached."""
    with torch.enable_grad():
        th = [t.detach().clone().requires_grad_(True) for t in theta]
        p = p.detach().clone().requires_grad_(with_p)
        loss, g = _step_grads(student, th, p, idx, create_graph=False)
    g = [x.detach() for x in g]
    step = g[: len(th)]
    scale = clip_scale(global_norm(step), clip)
    return [t.detach() - alpha * scale * gi for t, gi in zip(theta, step, strict=True)], loss.detach(), g


def endpoint(
    student: Student, theta0: Sequence[Any], alpha: Any, syn: Any, batches: Sequence[Any], clip: float | None = None
) -> list[Any]:
    """theta_N after the N plain clipped student steps of an unroll, without any graph: what the
    student reaches (for evaluation; the unrolls give the same point, differentiably)."""
    theta = [t.detach() for t in theta0]
    alpha = torch.as_tensor(alpha).detach()
    for idx in batches:
        theta, _, _ = _plain_step(student, theta, syn[idx], idx, alpha, clip)
    return theta


def _forward_steps(
    student: Student,
    theta0: Sequence[Any],
    alpha: Any,
    syn: Any,
    batches: Sequence[Any],
    with_p: bool,
    clip: float | None = None,
) -> tuple[list[list[Any]], list[list[Any]], list[Any], list[Any]]:
    """The forward pass of the flat and fd modes: N plain (clipped) steps, keeping theta_0..theta_{N-1},
    each step's gradients (LoRA-sized; the reverse walk needs them for the clipping Jacobian and
    fd also for its differences) and the random state each step started from (its dropout masks)."""
    thetas, grads, rngs = [], [], []
    theta = [t.detach() for t in theta0]
    for idx in batches:
        thetas.append(theta)
        rngs.append(_rng_state(student.device))
        nxt, loss, g = _plain_step(student, theta, syn[idx], idx, alpha, clip, with_p)
        grads.append(g)
        student.record_step(loss, g[: len(theta)])
        theta = nxt
    return thetas, grads, theta, rngs


def _zeros_if_none(grads: Sequence[Any], like: Sequence[Any]) -> list[Any]:

    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


def _reverse_walk(thetas, grads, batches, alpha, syn, lam, products, clip=None) -> tuple[Any, Any, list[Any]]:
    """dL/dalpha, dL/dD_syn and dL/dtheta_0 from lambda_N = dL/dtheta_N, walking the steps backwards.

    Step n is theta_n = theta_{n-1} - alpha * s(g_n) with s the (optional) norm clipping; with
    u = (ds/dg)^T lambda_n (:func:`clip_vjp`; u = lambda_n unclipped): dL/dalpha -= <s(g_n), lambda_n>,
    dL/dp_n -= alpha * d<g_n, u>/dp_n, lambda_{n-1} = lambda_n - alpha * H_n u.
    ``products(n, theta_prev, idx, u)`` returns ``[H_n u ..., d<g_n, u>/dp_n]``:
    exactly (one double-backward) in flat mode, by finite differences in fd mode.
    """
    a = alpha.detach()
    lam = _zeros_if_none(lam, thetas[0])
    d_alpha = torch.zeros_like(a)
    d_syn = torch.zeros_like(syn)
    for n in reversed(range(len(batches))):
        dot, u = clip_vjp(grads[n][: len(lam)], lam, clip)
        hv = products(n, thetas[n], batches[n], u)
        d_alpha = d_alpha - dot
        d_syn.index_add_(0, batches[n], -a * hv[-1])
        lam = [li - a * hi for li, hi in zip(lam, hv[:-1], strict=True)]
    return d_alpha, d_syn, lam


def _exact_products(student: Student, syn: Any, rngs: Sequence[Any]):
    def products(n: int, theta_prev: Sequence[Any], idx: Any, lam: Sequence[Any]) -> list[Any]:
        with torch.enable_grad(), _replayed_rng(rngs[n], student.device):
            th = [t.clone().requires_grad_(True) for t in theta_prev]
            p = syn[idx].detach().clone().requires_grad_(True)
            _, g = _step_grads(student, th, p, idx, create_graph=True)
            dot = sum((gi * li).sum() for gi, li in zip(g[: len(th)], lam, strict=True))
            hv = torch.autograd.grad(dot, [*th, p], allow_unused=True)
        return _zeros_if_none(hv, [*th, p])

    return products


def _fd_products(student: Student, syn: Any, grads: Sequence[Sequence[Any]], rel_eps: float, rngs: Sequence[Any]):
    def products(n: int, theta_prev: Sequence[Any], idx: Any, lam: Sequence[Any]) -> list[Any]:
        g0 = grads[n]
        lam_norm = global_norm(lam)
        th_norm = global_norm(theta_prev)
        eps = rel_eps * torch.clamp(th_norm, min=1.0) / torch.clamp(lam_norm, min=1e-30)
        with torch.enable_grad(), _replayed_rng(rngs[n], student.device):
            th = [(t + eps * li).requires_grad_(True) for t, li in zip(theta_prev, lam, strict=True)]
            p = syn[idx].detach().clone().requires_grad_(True)
            _, g1 = _step_grads(student, th, p, idx, create_graph=False)
        return [(x1 - x0) / eps for x1, x0 in zip(g1, g0, strict=True)]

    return products


class _Flat(torch.autograd.Function):
    """Exact, memory-flat: N plain steps forward; the reverse walk rebuilds one step's graph at a time."""

    @staticmethod
    def forward(ctx, student, batches, alpha, syn, clip, *theta0):  # type: ignore[override]
        thetas, grads, theta_n, rngs = _forward_steps(student, theta0, alpha.detach(), syn, batches, False, clip)
        ctx.student, ctx.batches, ctx.thetas, ctx.grads = student, batches, thetas, grads
        ctx.clip, ctx.rngs = clip, rngs
        ctx.save_for_backward(alpha, syn)
        return tuple(theta_n)

    @staticmethod
    def backward(ctx, *lam):  # type: ignore[override]
        alpha, syn = ctx.saved_tensors
        products = _exact_products(ctx.student, syn, ctx.rngs)
        d_alpha, d_syn, lam0 = _reverse_walk(ctx.thetas, ctx.grads, ctx.batches, alpha, syn, lam, products, ctx.clip)
        return (None, None, d_alpha, d_syn, None, *lam0)


class _FD(torch.autograd.Function):
    """Approximate, memory-flat: the reverse walk with finite-difference Hessian products."""

    @staticmethod
    def forward(ctx, student, batches, alpha, syn, rel_eps, clip, *theta0):  # type: ignore[override]
        thetas, grads, theta_n, rngs = _forward_steps(student, theta0, alpha.detach(), syn, batches, True, clip)
        ctx.student, ctx.batches, ctx.thetas, ctx.grads, ctx.rel_eps = student, batches, thetas, grads, rel_eps
        ctx.clip, ctx.rngs = clip, rngs
        ctx.save_for_backward(alpha, syn)
        return tuple(theta_n)

    @staticmethod
    def backward(ctx, *lam):  # type: ignore[override]
        alpha, syn = ctx.saved_tensors
        products = _fd_products(ctx.student, syn, ctx.grads, ctx.rel_eps, ctx.rngs)
        d_alpha, d_syn, lam0 = _reverse_walk(ctx.thetas, ctx.grads, ctx.batches, alpha, syn, lam, products, ctx.clip)
        return (None, None, d_alpha, d_syn, None, None, *lam0)


def unroll(
    mode: str,
    student: Student,
    theta0: Sequence[Any],
    alpha: Any,
    syn: Any,
    batches: Sequence[Any],
    fd_eps: float = 1e-3,
    clip: float | None = None,
) -> list[Any]:
    """theta_N after N student steps from ``theta0``, differentiable in ``alpha`` and ``syn``.

    Each step is theta - alpha * g, with g's norm clipped to ``clip`` as
    ``torch.nn.utils.clip_grad_norm_`` does (None: no clipping); the clipping is differentiated too.
    """
    theta0 = [t.detach() for t in theta0]
    if mode == "naive":
        return unroll_naive(student, theta0, alpha, syn, batches, clip)
    if mode == "flat":
        return list(_Flat.apply(student, list(batches), alpha, syn, clip, *theta0))
    if mode == "fd":
        return list(_FD.apply(student, list(batches), alpha, syn, fd_eps, clip, *theta0))
    raise NacdError(f"distill.unroll={mode!r}: expected flat, naive or fd")
