"""Gradient-guided token swaps (``distill.discrete: swap``): AutoPrompt's and GCG's search (Shin et al.
2020; Zou et al. 2023) with L_distill as the objective.

The prompts are vocabulary rows throughout. Each iteration, after the meta-gradient G = dL/dP of the
iteration's draws is taken at the current tokens (:func:`nacd.distill_loop.meta_gradient`, the same exact
unroll as the continuous mode):

1. for every prompt position of the examples the draws use, the first-order estimate of the loss change
   of putting token v there, (e_v - e_current) . G, ranks the vocabulary; its ``distill.swap_topk`` best
   are the position's candidates (:func:`top_candidates`);
2. ``distill.swap_candidates`` single swaps (position, candidate) are drawn uniformly from them;
3. each swap, and the current prompts, are scored by the true L_distill on the same draws (first-order
   student steps, :func:`nacd.unrolls.endpoint`, the same dropout masks for all), split over the
   processes under a launcher; the best swap is kept if it lowers the loss. With ``distill.swap_keep`` m
   > 1, the m best swaps that lower it (one per position) are scored together once more, and kept together
   when that beats the best one alone (:func:`combine_swaps`): up to m tokens move per iteration.

One iteration costs a meta-gradient plus (B + 1) x meta_batch forward unrolls of N student steps
(B = ``swap_candidates``; m > 1 adds one more scoring when two or more swaps improve), so B stays
small (8-64); the first-order ranking costs one u·k x V product per iteration (u: the examples the
draws use), taken ``vocab_chunk`` rows at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

SWAP_SEED_OFFSET = 3_000_017  # the dropout masks of the swap scores: run.seed + this + iteration


def top_candidates(grad: Any, current: Any, vocab: Any, topk: int, chunk: int = 8192) -> Any:
    """(m, topk) candidate-row indices for m prompt positions: the rows v with the lowest first-order
    loss change (e_v - e_current) . g, where ``grad`` (m, d) is dL/dP at the positions and ``current``
    (m, d) their embeddings. The current token scores 0 and is left in (a swap to it changes nothing)."""
    import torch

    g = grad.detach().float()
    base = (current.detach().float() * g).sum(-1, keepdim=True)
    best_val = torch.full((g.shape[0], 0), float("inf"), device=g.device)
    best_idx = torch.zeros((g.shape[0], 0), dtype=torch.long, device=g.device)
    for start in range(0, vocab.shape[0], chunk):
        change = g @ vocab[start : start + chunk].float().to(g.device).T - base  # (m, chunk)
        val = torch.cat([best_val, change], dim=1)
        idx = torch.cat([best_idx, torch.arange(start, start + change.shape[1], device=g.device).expand_as(change)], 1)
        keep = val.topk(min(topk, val.shape[1]), dim=1, largest=False).indices
        best_val, best_idx = val.gather(1, keep), idx.gather(1, keep)
    return best_idx


def swap_step(
    student: Any,
    draws: Sequence[Any],
    syn: Any,
    vocab: Any,
    alpha_of: Callable[[int], Any],
    snapshot: Callable[[int, int], list[Any]],
    dc: Any,
    clip: float | None,
    gen: Any,
    seed: int,
    ranks: Any,
) -> dict[str, Any]:
    """One GCG step on ``syn`` (n, k, d), whose ``grad`` holds the iteration's mean meta-gradient:
    draws ``distill.swap_candidates`` single swaps among the top candidates of the positions the
    ``draws`` use, scores them and the current prompts by L_distill on those draws, and writes the
    best into ``syn`` when it is lower. Returns what was tried and kept, for the history."""
    import torch

    from nacd.panel import seeded_endpoint
    from nacd.tm import matching_loss

    k = syn.shape[1]
    used = torch.unique(torch.cat([torch.cat([b.reshape(-1) for b in draw.batches]) for draw in draws])).cpu()
    positions = torch.stack(torch.meshgrid(used, torch.arange(k), indexing="ij"), dim=-1).reshape(-1, 2)
    rows = syn.grad[positions[:, 0], positions[:, 1]]
    now = syn.detach()[positions[:, 0], positions[:, 1]]
    cands = top_candidates(rows, now, vocab, dc.swap_topk, dc.vocab_chunk).cpu()
    count = dc.swap_candidates
    pick = torch.randint(0, positions.shape[0], (count,), generator=gen)
    which = torch.randint(0, cands.shape[1], (count,), generator=gen)
    trials = [(-1, -1, -1)] + [
        (int(positions[p, 0]), int(positions[p, 1]), int(cands[p, c])) for p, c in zip(pick, which, strict=True)
    ]

    def score(swaps: Sequence[tuple[int, int, int]]) -> float:
        prompts = syn.detach().clone()
        for i, j, row in swaps:
            prompts[i, j] = vocab[row].to(prompts.dtype)
        total = 0.0
        for i, draw in enumerate(draws):  # every trial sees the same dropout masks (seed + i)
            theta_t = snapshot(draw.run, draw.start_epoch)
            target = snapshot(draw.run, draw.start_epoch + dc.expert_epochs)
            alpha = alpha_of(draw.start_epoch).detach()
            theta_n = seeded_endpoint(student, theta_t, draw, alpha, prompts, clip, seed + i)
            total += float(matching_loss(theta_n, target, theta_t))
        return total / len(draws)

    with torch.no_grad():
        mine = [(j, score([trials[j]] if j else [])) for j in ranks.mine(len(trials))]
    scores = dict(pair for part in ranks.gather(mine) for pair in part)
    losses = [scores[j] for j in range(len(trials))]
    best = min(range(1, len(trials)), key=lambda j: losses[j])
    kept, l_kept, l_combined = combine_swaps(trials, losses, dc.swap_keep), losses[best], None
    if len(kept) > 1:  # the improving swaps together, scored once (by the main process) against the best alone
        with torch.no_grad():
            l_combined = ranks.from_main(score(kept) if ranks.is_main else None)
        kept, l_kept = (kept, l_combined) if l_combined < losses[best] else (kept[:1], losses[best])
    with torch.no_grad():
        for i, j, row in kept:
            syn[i, j] = vocab[row].to(syn.dtype)
    return {
        "l_current": losses[0],
        "l_best": l_kept,
        "l_best_single": losses[best],
        "l_combined": l_combined,
        "swapped": bool(kept),
        "tried": len(trials) - 1,
        "swaps": [list(t) for t in kept],
    }


def combine_swaps(
    trials: Sequence[tuple[int, int, int]], losses: Sequence[float], keep: int
) -> list[tuple[int, int, int]]:
    """The swaps to keep from scored ``trials`` (index 0: the current prompts, ``losses[0]``): those that
    score below the current prompts, best first, one per prompt position, at most ``keep``; [] when none
    improves."""
    order = sorted((j for j in range(1, len(trials)) if losses[j] < losses[0]), key=lambda j: losses[j])
    chosen: list[tuple[int, int, int]] = []
    for j in order:
        if len(chosen) < keep and all(trials[j][:2] != c[:2] for c in chosen):
            chosen.append(trials[j])
    return chosen
