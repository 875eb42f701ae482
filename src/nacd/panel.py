"""Did the prompts learn? The held-out prompt-gain panel of ``nacd distill``.

L_distill falls when alpha grows toward its best value for the draws, whatever the prompts
are; a fall of the training curve says nothing about the prompts. The panel measures what
alpha cannot fake:

- **Draws held out.** P draws (an expert run, a start epoch, the N student batches), sampled
  once from a generator seeded apart from training (:data:`PANEL_SEED_OFFSET`) and never used
  to update anything. With two or more expert runs, the last run is kept out of training
  altogether (``distill.holdout_run``) and the panel draws from it, so the prompts must help on
  a trajectory they never matched. Start epochs are stratified (draw i starts at epoch
  i mod T^m) so every start epoch weighs the same.
- **Paired, at the same alpha.** For every draw, L_distill of the student with the current
  prompts and with the initial prompts, both at the current alpha (the per-epoch alpha when
  alpha is per start epoch), with the same dropout masks. The **prompt gain** is the mean
  paired difference L(initial) - L(current); the relative gain divides it by mean L(initial);
  its 95% interval is a paired bootstrap over draws (:func:`nacd.stats.paired_bootstrap`).
- **Direction.** The cosine between the student's displacement theta_N - theta_t and the
  expert's theta*_{t+M} - theta*_t, for both prompt sets: with clipped student steps alpha sets
  only the length of the student's path, the prompts its direction.
- **Where the residual sits.** The share of ||theta_N - theta*_{t+M}||^2 (current prompts) in
  the LoRA A and B tensors, in each block (layer) and in each adapted module (``q_proj``, ...),
  averaged over the draws.

Cost per evaluation: 2 x P x N first-order student steps (P x N when the initial prompts'
endpoints are cached: alpha fixed or fitted; the cache is part of the checkpoint, so a resumed run
does not measure them again); ``distill.eval_every`` sets how often. Results go to
``<run>/distill/panel.jsonl`` (one row per evaluation) and the final one to the manifest's
``prompt_gain``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nacd.ranks import Ranks

PANEL_SEED_OFFSET = 1_000_003  # the panel's generator: run.seed + this, apart from training's run.seed
FIT_SEED_OFFSET = 2_000_029  # the fitted alpha's draws (training runs): run.seed + this


@dataclass(frozen=True)
class Draw:
    """What one distillation iteration samples: an expert run, a start epoch, N student batches."""

    run: int
    start_epoch: int
    batches: tuple[Any, ...]  # N LongTensors of example indices into D_sel


def split_runs(runs: Sequence[int], holdout: bool) -> tuple[list[int], list[int]]:
    """(training runs, panel runs): with ``holdout`` and two or more runs, the last run is the
    panel's alone; otherwise both use every run (the panel then differs in epochs and batches)."""
    runs = list(runs)
    if holdout and len(runs) >= 2:
        return runs[:-1], runs[-1:]
    return runs, runs


def sample_draw(gen: Any, runs: Sequence[int], max_start_epoch: int, n: int, batch: int, steps: int) -> Draw:
    """One training draw from ``gen``: a run and a start epoch uniformly, then N batches of
    ``batch`` examples of D_sel without replacement (the order :func:`nacd.distill_loop.distill` draws in)."""
    import torch

    run = runs[int(torch.randint(len(runs), (1,), generator=gen))]
    t = int(torch.randint(max_start_epoch, (1,), generator=gen))
    batches = tuple(torch.randperm(n, generator=gen)[:batch] for _ in range(steps))
    return Draw(run, t, batches)


def panel_draws(
    runs: Sequence[int], max_start_epoch: int, n: int, batch: int, steps: int, size: int, seed: int
) -> list[Draw]:
    """The panel: ``size`` draws from the panel runs, start epochs stratified, from their own generator."""
    import torch

    gen = torch.Generator().manual_seed(seed + PANEL_SEED_OFFSET)
    draws = []
    for i in range(size):
        run = runs[int(torch.randint(len(runs), (1,), generator=gen))]
        batches = tuple(torch.randperm(n, generator=gen)[:batch] for _ in range(steps))
        draws.append(Draw(run, i % max_start_epoch, batches))
    return draws


# --------------------------------------------------------------------------- the math (pure)


def flat_cosine(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cosine between two lists of tensors taken as one vector each."""
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))
    na = sum(float((x.double() ** 2).sum()) for x in a) ** 0.5
    nb = sum(float((y.double() ** 2).sum()) for y in b) ** 0.5
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def lora_factor(name: str) -> str:
    """``lora_A`` / ``lora_B`` (``other`` for anything else): the factor a LoRA tensor belongs to."""
    return "lora_A" if "lora_A" in name else "lora_B" if "lora_B" in name else "other"


def lora_layer(name: str) -> str:
    """The block a LoRA tensor sits in: the first number in its dotted name (``layers.3.`` -> ``3``),
    whatever the architecture calls its blocks; ``other`` where the name has none."""
    return next((part for part in name.split(".") if part.isdigit()), "other")


def lora_module(name: str) -> str:
    """The adapted linear layer of a LoRA tensor (``...q_proj.lora_A.default.weight`` -> ``q_proj``)."""
    parts = name.split(".")
    i = next((i for i, part in enumerate(parts) if part in ("lora_A", "lora_B")), 0)
    return parts[i - 1] if i > 0 else "other"


def _squared_residuals(theta_n: Sequence[Any], target: Sequence[Any], names: Sequence[str]) -> dict[str, float]:
    return {
        name: float(((a.double() - b.double()) ** 2).sum()) for name, a, b in zip(names, theta_n, target, strict=True)
    }


def _shares(squared: dict[str, float], group: Callable[[str], str]) -> dict[str, float]:
    parts: dict[str, float] = {}
    for name, value in squared.items():
        parts[group(name)] = parts.get(group(name), 0.0) + value
    total = sum(parts.values()) or 1.0
    order = sorted(parts, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))  # blocks numerically
    return {k: parts[k] / total for k in order}


def residual_shares(
    theta_n: Sequence[Any], target: Sequence[Any], names: Sequence[str], group: Callable[[str], str] = lora_factor
) -> dict[str, float]:
    """Shares of ||theta_N - target||^2 by ``group`` of the tensor names (default: LoRA A and B)."""
    return _shares(_squared_residuals(theta_n, target, names), group)


def all_residual_shares(theta_n: Sequence[Any], target: Sequence[Any], names: Sequence[str]) -> dict[str, dict]:
    """The residual's shares by LoRA factor, by block (layer) and by adapted module (one pass over the tensors)."""
    squared = _squared_residuals(theta_n, target, names)
    return {
        "factor": _shares(squared, lora_factor),
        "layer": _shares(squared, lora_layer),
        "module": _shares(squared, lora_module),
    }


def prompt_gain(l_initial: Sequence[float], l_current: Sequence[float], seed: int = 0) -> dict[str, float]:
    """The prompt gain over the panel: mean of L(initial) - L(current), relative to mean L(initial),
    and its 95% paired-bootstrap interval over draws (2000 resamples)."""
    from nacd.stats import paired_bootstrap

    res = paired_bootstrap(list(l_initial), list(l_current), 2000, 0.95, seed)
    base = sum(l_initial) / len(l_initial)
    return {
        "mean": res["diff"],
        "relative": res["diff"] / base if base else 0.0,
        "ci_low": res["lo"],
        "ci_high": res["hi"],
        "draws": len(l_initial),
    }


def seeded_endpoint(
    student: Any, theta_t: Sequence[Any], draw: Draw, alpha: Any, syn: Any, clip: float | None, seed: int
) -> list[Any]:
    """theta_N of ``draw`` from ``theta_t`` with prompts ``syn`` (first-order steps, no graph), the random
    stream forked and seeded with ``seed``: every prompt set measured with one seed sees the same dropout
    masks, and training's stream is untouched (the panel, the swap scores)."""
    import torch

    from nacd.unrolls import endpoint

    device = torch.device(student.device)
    batches = [b.to(device) for b in draw.batches]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        return endpoint(student, theta_t, torch.as_tensor(alpha, device=device), syn, batches, clip)


# --------------------------------------------------------------------------- the evaluation


class Panel:
    """Evaluates the prompt gain on fixed held-out draws (see the module docstring)."""

    def __init__(
        self,
        student: Any,
        draws: Sequence[Draw],
        snapshot: Callable[[int, int], list[Any]],
        expert_epochs: int,
        initial: Any,
        clip: float | None,
        seed: int,
        ranks: Ranks = Ranks(),
    ):
        self.ranks = ranks  # under a launcher each process measures its share of the draws
        self.student, self.draws, self.snapshot = student, list(draws), snapshot
        self.expert_epochs, self.clip, self.seed = expert_epochs, clip, seed
        self.initial = initial.detach().clone()
        self._initial_cache: dict[tuple[int, float], tuple[float, float]] = {}

    def initial_entries(self) -> list[list[float]]:
        """The initial prompts' measured values, ``[draw, alpha, L, cosine]`` each, for a checkpoint: a resumed
        run then does not measure them again while alpha stays where it was (fixed or fitted alpha)."""
        return [[i, a, loss, cos] for (i, a), (loss, cos) in self._initial_cache.items()]

    def restore_initial(self, entries: Sequence[Sequence[float]], source: str) -> None:
        """Take back :meth:`initial_entries` from a checkpoint (``source`` names it in an error)."""
        from nacd.errors import NacdError

        for entry in entries:
            ok = isinstance(entry, (list, tuple)) and len(entry) == 4
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry)
            if not ok or not float(entry[0]).is_integer() or not 0 <= int(entry[0]) < len(self.draws):
                raise NacdError(
                    f"{source}: panel_initial entry {entry!r} is not [draw, alpha, L, cosine] of this panel"
                )
            self._initial_cache[(int(entry[0]), float(entry[1]))] = (float(entry[2]), float(entry[3]))

    def _endpoint(self, i: int, draw: Draw, alpha: float, syn: Any) -> list[Any]:
        """theta_N of draw ``i`` with prompts ``syn``, seeded per draw (:func:`seeded_endpoint`)."""
        theta_t = self.snapshot(draw.run, draw.start_epoch)
        return seeded_endpoint(self.student, theta_t, draw, alpha, syn, self.clip, self.seed + PANEL_SEED_OFFSET + i)

    def _measure(self, i: int, draw: Draw, alpha: float, syn: Any) -> tuple[float, float, list[Any]]:
        from nacd.tm import matching_loss

        theta_t = self.snapshot(draw.run, draw.start_epoch)
        target = self.snapshot(draw.run, draw.start_epoch + self.expert_epochs)
        theta_n = self._endpoint(i, draw, alpha, syn)
        loss = float(matching_loss(theta_n, target, theta_t))
        cos = flat_cosine(
            [a - b for a, b in zip(theta_n, theta_t, strict=True)],
            [a - b for a, b in zip(target, theta_t, strict=True)],
        )
        return loss, cos, theta_n

    def evaluate(self, syn: Any, alpha_of: Callable[[int], float]) -> dict[str, Any]:
        """One evaluation: per-draw losses and cosines for both prompt sets, the gain and its interval."""
        import torch

        measured = []
        with torch.no_grad():
            syn = syn.detach()
            same = torch.equal(syn, self.initial.to(syn.device))
            for i in self.ranks.mine(len(self.draws)):
                draw = self.draws[i]
                alpha = float(alpha_of(draw.start_epoch))
                loss, cos, theta_n = self._measure(i, draw, alpha, syn)
                if same:
                    li, ci = loss, cos
                elif (i, alpha) in self._initial_cache:
                    li, ci = self._initial_cache[(i, alpha)]
                else:
                    li, ci, _ = self._measure(i, draw, alpha, self.initial.to(syn.device))
                target = self.snapshot(draw.run, draw.start_epoch + self.expert_epochs)
                measured.append((i, li, loss, ci, cos, all_residual_shares(theta_n, target, self.student.names)))
        measured = sorted((m for part in self.ranks.gather(measured) for m in part), key=lambda m: m[0])
        for i, li, _, ci, _, _ in measured:  # cached on every process, every draw (a checkpoint holds them all)
            self._initial_cache[(i, float(alpha_of(self.draws[i].start_epoch)))] = (li, ci)
        _, l_init, l_cur, c_init, c_cur, shares = (list(column) for column in zip(*measured, strict=True))
        if len(self._initial_cache) > 4 * len(self.draws):  # alpha moves: keep only the latest values
            self._initial_cache = {k: v for k, v in list(self._initial_cache.items())[-len(self.draws) :]}
        return {
            "prompt_gain": prompt_gain(l_init, l_cur, self.seed),
            "cosine": {"initial": _mean(c_init), "current": _mean(c_cur), "gain": _mean(c_cur) - _mean(c_init)},
            "l_initial_mean": _mean(l_init),
            "l_current_mean": _mean(l_cur),
            "residual_share": _mean_shares([s["factor"] for s in shares]),
            "residual_share_by_layer": _mean_shares([s["layer"] for s in shares]),
            "residual_share_by_module": _mean_shares([s["module"] for s in shares]),
            "per_draw": [
                {
                    "run": d.run,
                    "start_epoch": d.start_epoch,
                    "l_initial": round(a, 6),
                    "l_current": round(b, 6),
                    "cos_initial": round(c, 6),
                    "cos_current": round(e, 6),
                }
                for d, a, b, c, e in zip(self.draws, l_init, l_cur, c_init, c_cur, strict=True)
            ],
        }

    def hard_token_gain(
        self,
        final: Any,
        vocab: Any,
        alpha_of: Callable[[int], float],
        last_row: dict[str, Any] | None,
        chunk: int = 8192,
    ) -> dict[str, Any]:
        """The gain of the decoded tokens (``final``'s nearest ``vocab`` rows by L2, as the distilled set
        decodes them) against the initial prompts' nearest tokens, on this panel's draws at the same alpha:
        what a receiving model, which reads tokens, can get of what was learned. ``last_row``: this panel's
        evaluation of ``final`` (the loop's last), reused where the prompts are tokens already (pez, swap, a
        token init) or where no token moved (gain 0)."""
        import torch

        from nacd.tm import snap

        initial = self.initial.to(final.device)
        hard_final, hard_initial = snap(final, vocab, "l2", chunk), snap(initial, vocab, "l2", chunk)
        same_initial = torch.equal(hard_initial, initial)
        if same_initial and last_row is not None and torch.equal(hard_final, final):
            row = last_row
        elif same_initial and last_row is not None and torch.equal(hard_final, hard_initial):
            zero = {"mean": 0.0, "relative": 0.0, "ci_low": 0.0, "ci_high": 0.0, "draws": len(self.draws)}
            level = last_row["l_initial_mean"]
            row = {"prompt_gain": zero, "l_initial_mean": level, "l_current_mean": level}
        else:
            hard = Panel(self.student, self.draws, self.snapshot, self.expert_epochs, hard_initial, self.clip,
                         self.seed, self.ranks)  # fmt: skip
            if same_initial:
                hard.restore_initial(self.initial_entries(), "the panel")
            row = hard.evaluate(hard_final, alpha_of)
        gain = {key: row["prompt_gain"][key] for key in ("mean", "relative", "ci_low", "ci_high", "draws")}
        return {**gain, "l_initial_mean": row["l_initial_mean"], "l_current_mean": row["l_current_mean"]}


# --------------------------------------------------------------------------- alpha fitted with the initial prompts


def fit_alpha(
    loss_at: Callable[[float], float], alpha0: float, factor: float = 2.0, max_steps: int = 8
) -> tuple[float, list[tuple[float, float]]]:
    """The best alpha of the geometric grid ``alpha0 * factor**j`` for ``loss_at`` (assumed unimodal in
    log alpha): walk up from alpha0 while the loss falls; if the first step up does not improve, walk
    down instead; at most ``max_steps`` steps. Returns (best alpha, every (alpha, loss) evaluated, sorted)."""
    curve = {alpha0: float(loss_at(alpha0))}
    for direction in (factor, 1.0 / factor):
        alpha, previous = alpha0, curve[alpha0]
        for _ in range(max_steps):
            alpha *= direction
            curve[alpha] = float(loss_at(alpha))
            if curve[alpha] >= previous:
                break
            previous = curve[alpha]
        if min(curve, key=curve.get) != alpha0:  # the walk up found a better alpha: no need to go down
            break
    best = min(curve, key=curve.get)
    return best, sorted(curve.items())


def fit_alphas(panel: Panel, alpha0: float, n_alpha: int) -> tuple[list[float], list[list[tuple[float, float]]]]:
    """``distill.alpha_mode=fitted``: alpha fitted to ``panel``'s draws (training draws, never the held-out
    panel's) with the initial prompts, one per start epoch when ``n_alpha`` > 1 (each on its epoch's draws),
    then frozen: what L_distill then loses is the prompts' doing alone."""
    import torch

    alphas, curves = [], []
    rank, world = panel.ranks.rank, panel.ranks.world
    for epoch in range(n_alpha):
        mine = [(i, d) for i, d in enumerate(panel.draws) if n_alpha == 1 or d.start_epoch == epoch]

        def loss_at(alpha: float, mine: list = mine) -> float:
            with torch.no_grad():  # each process measures its share of the draws
                part = [(i, panel._measure(i, d, alpha, panel.initial)[0]) for i, d in mine if i % world == rank]
            return _mean([loss for _, loss in sorted(m for got in panel.ranks.gather(part) for m in got)])

        best, curve = fit_alpha(loss_at, alpha0)
        alphas.append(best)
        curves.append(curve)
    return alphas, curves


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _mean_shares(shares: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean over draws of each group's share (a group a draw lacks counts 0), in the draws' order."""
    groups = list(dict.fromkeys(g for s in shares for g in s))
    return {g: _mean([s.get(g, 0.0) for s in shares]) for g in groups}


def gain_line(row: dict[str, Any], label: str = "prompt gain") -> str:
    """One line for logs, ``nacd inspect`` and ``nacd run``: the gain, its interval, the cosine (when the
    row has one; the hard-token gain's has not)."""
    g = row["prompt_gain"]
    verdict = (
        "above 0: the prompts learned"
        if g["ci_low"] > 0
        else ("below 0: the prompts hurt" if g["ci_high"] < 0 else "contains 0: no evidence the prompts learned")
    )
    cosine = row.get("cosine")
    return (
        f"{label} on {g['draws']} held-out draws at iteration {row['iteration']}: "
        f"{g['mean']:+.4g} ({100 * g['relative']:+.2f}% of L_distill {row['l_initial_mean']:.4f}), "
        f"95% CI [{g['ci_low']:+.4g}, {g['ci_high']:+.4g}] ({verdict})"
        + (f"; cosine to the expert {cosine['initial']:.4f} -> {cosine['current']:.4f}" if cosine else "")
    )
