"""The distillation loop (Algorithm 1) of :mod:`nacd.distill`, in named steps: :class:`Distillation` (setup
and resume, the alpha fit and unroll choice, one iteration, the held-out panel, checkpoints, the
result) and :func:`distill`, which runs them; :func:`meta_gradient`, one meta-batch's gradient, and
:func:`hard_gain`, the decoded tokens' gain on the panel. Importing this module imports no torch; its
functions import it when they run."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from nacd.artifacts import MetricsWriter, atomic_write_json, read_jsonl, recover_dir, trim_jsonl
from nacd.distill_state import DistillState, load_checkpoint, save_checkpoint
from nacd.errors import NacdError
from nacd.progress import bar as progress_bar
from nacd.ranks import Ranks

log = logging.getLogger("nacd.distill")


def beta_at(dc: Any, iteration: int) -> float:
    """beta for the iteration after ``iteration`` done: linear from 0 over ``distill.beta_warmup`` iterations."""
    if dc.beta_warmup <= 0:
        return dc.beta
    return dc.beta * min(1.0, (iteration + 1) / dc.beta_warmup)


def meta_gradient(
    student: Any,
    draws: list[Any],
    syn: Any,
    alpha_of: Any,
    snapshot: Any,
    vocab: Any,
    dc: Any,
    beta: float,
    spacing: float,
    clip: float | None,
    mode: str | None = None,
    ranks: Ranks = Ranks(),
) -> tuple[list[dict[str, Any]], int, bool]:
    """Accumulate into ``syn.grad`` (and log alpha's) the mean over ``draws`` of the gradient of
    L_distill + beta * L_reg, one draw's unroll at a time; draws above ``distill.skip_above`` are left
    out of the mean. Returns the per-draw history rows, the number of draws used and whether every
    loss and gradient was finite. ``alpha_of(start_epoch)`` gives the student lr, its ``leaf``
    attribute the learnable tensor behind it (None when alpha is fixed); ``mode``: the unroll (default
    ``distill.unroll``). Under a launcher each process unrolls its share of ``draws`` (``ranks``) and
    the gradients are summed over the processes, so every process ends with the same mean gradient
    (and the same rows) as one process unrolling them all."""
    import torch

    from nacd import tm, unrolls

    rows, accepted, finite = [], 0, True
    for index in ranks.mine(len(draws)):
        draw = draws[index]
        batches = [b.to(student.device) for b in draw.batches]
        theta_t = snapshot(draw.run, draw.start_epoch)
        target = snapshot(draw.run, draw.start_epoch + dc.expert_epochs)
        student.steps.clear()
        alpha = alpha_of(draw.start_epoch)
        used = torch.unique(torch.cat(batches))
        prompts = syn  # pez: the unroll sees hard tokens, the gradient reaches syn straight through
        if dc.discrete == "pez":
            prompts = tm.straight_through(syn, vocab, used, dc.projection, dc.vocab_chunk)
        theta_n = unrolls.unroll(mode or dc.unroll, student, theta_t, alpha, prompts, batches, dc.fd_eps, clip)
        l_distill = tm.matching_loss(theta_n, target, theta_t)
        l_reg = tm.regularizer(syn[used].reshape(-1, syn.shape[-1]), vocab, dc.vocab_chunk, dc.regularizer, spacing)
        loss = l_distill + beta * l_reg
        above = dc.skip_above is not None and float(l_distill.detach()) > dc.skip_above
        rows.append(
            {
                "draw": index,
                "run": draw.run,
                "start_epoch": draw.start_epoch,
                "l_distill": float(l_distill.detach()),
                "l_reg": float(l_reg.detach()),
                "above_threshold": above,
                # the student's own N steps (forward pass): their losses and LoRA-gradient norms
                "student_losses": [round(x, 5) for x, _ in student.steps[: dc.syn_steps]],
                "student_grad_norms": [round(x, 5) for _, x in student.steps[: dc.syn_steps]],
            }
        )
        finite = finite and bool(torch.isfinite(loss))
        if not above and finite:
            (loss / len(draws)).backward()  # the mean over the draws, one draw's graph at a time
            accepted += 1
    leaf = getattr(alpha_of, "leaf", None)
    params = [p for p in (syn, leaf) if p is not None and p.requires_grad]
    if ranks.world > 1:  # the sums over every process's draws, on every process
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ranks.sum_([p.grad for p in params])
        shares = ranks.gather((rows, accepted, finite))
        rows = sorted((row for part in shares for row in part[0]), key=lambda row: row["draw"])
        accepted, finite = sum(part[1] for part in shares), all(part[2] for part in shares)
        if not accepted:
            for p in params:
                p.grad = None
    if accepted:
        finite = finite and all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params)
    if accepted and finite and accepted < len(draws):
        for p in params:
            p.grad.mul_(len(draws) / accepted)  # the mean over the accepted draws
    return rows, accepted, finite


def hard_gain(panel: Any, final: Any, vocab: Any, alpha_of: Any, last_row: Any, state: Any, dc: Any) -> dict:
    """The panel's hard-token gain of the final prompts (:meth:`nacd.panel.Panel.hard_token_gain`), logged."""
    from nacd.panel import gain_line

    start = time.perf_counter()
    last = last_row if last_row is not None and last_row["iteration"] == state.iteration else None
    gain = panel.hard_token_gain(final, vocab, lambda t: float(alpha_of(t).detach()), last, dc.vocab_chunk)
    line = gain_line({"iteration": state.iteration, "prompt_gain": gain, **gain}, "hard-token gain")
    log.info("distill: %s (%.1f s)", line, time.perf_counter() - start)
    return gain


class Distillation:
    """One distillation (Algorithm 1) in named steps: the tensors and optimizers (``__init__``), the resume
    from a checkpoint (:meth:`resume`), the alpha fit and the unroll choice before the first update,
    one iteration (:meth:`step`), the prompt-gain panel (:meth:`evaluate_panel`), the checkpoint and the
    result. :func:`distill` runs them in order. Under a launcher (``ranks``) every process runs the same
    steps on the same draws, unrolls its share of each meta-batch and of the panel, and applies the same
    summed gradient, so the prompts stay identical everywhere; only the main process writes."""

    def __init__(
        self,
        student: Any,
        store: Any,
        config: Any,
        folder: Path,
        alpha0: float,
        clip: float | None = None,
        example_rows: list[list[int]] | None = None,
        ranks: Ranks = Ranks(),
    ) -> None:
        import torch

        from nacd import tm
        from nacd.panel import FIT_SEED_OFFSET, split_runs

        self.student, self.store, self.config, self.folder = student, store, config, folder
        self.alpha0, self.clip, self.ranks = alpha0, clip, ranks
        self.dc = dc = config.distill
        self.device = device = student.device
        self.n, k = len(student.data), dc.num_prompt_tokens
        self.vocab = vocab = tm.candidate_rows(student)
        initial = tm.initial_prompts(dc.init, vocab, self.n, k, config.run.seed, example_rows, dc.init_toward_mean)
        initial = initial.to(device)
        if dc.discrete == "swap":  # tokens throughout: the initial prompts' nearest tokens
            initial = tm.snap(initial, vocab, "l2", dc.vocab_chunk)
        self.initial = initial
        self.syn = torch.nn.Parameter(initial.clone())
        self.ema = initial.clone() if dc.ema is not None else None  # the prompts measured and written, when kept
        self.n_alpha = dc.max_start_epoch if dc.alpha_mode in ("per_epoch", "fitted") else 1
        learned = dc.alpha_mode in ("shared", "per_epoch")
        self.log_alpha = torch.nn.Parameter(
            torch.full((self.n_alpha,), math.log(alpha0), device=device), requires_grad=learned
        )
        self.opts = {"syn": torch.optim.Adam([self.syn], lr=dc.lr_syn)}
        if learned:
            self.opts["lr"] = torch.optim.Adam([self.log_alpha], lr=dc.lr_lr)
        self.spacing = tm.vocab_spacing(vocab, chunk=dc.vocab_chunk) if dc.regularizer != "distance" else 1.0
        self.gen = torch.Generator().manual_seed(config.run.seed)
        self.history_path, self.panel_path = folder / "history.jsonl", folder / "panel.jsonl"
        self.ckpt, self.fit_path, self.unroll_path = (
            folder / "checkpoint",
            folder / "alpha_fit.json",
            folder / "unroll.json",
        )
        self.state = DistillState()
        self.train_runs, self.held_runs = split_runs(store.runs, dc.holdout_run and dc.panel_size > 0)
        self.fit_seed = config.run.seed + FIT_SEED_OFFSET
        self.batch = min(dc.batch_size, self.n)
        self.cache: dict[tuple[int, int], list[Any]] = {}
        self.panel: Any = None
        self.last_panel: dict[str, Any] | None = None
        self.unroll_info: dict[str, Any] = {"used": dc.unroll}

    # ------------------------------------------------------------------ setup and resume

    def resume(self) -> None:
        """Continue from the checkpoint when there is one (the logs trimmed to it), else start afresh."""
        dc, ranks, ckpt = self.dc, self.ranks, self.ckpt
        if recover_dir(ckpt).is_dir():  # renamed into place whole: one with a part missing is refused, not ignored
            self.state = load_checkpoint(ckpt, self.syn, self.log_alpha, self.opts, self.gen, self.ema)
            if self.state.iteration > dc.iterations:
                raise NacdError(
                    f"{ckpt}: the checkpoint is at iteration {self.state.iteration}, past distill.iterations="
                    f"{dc.iterations}; use another run.out_dir to distill {dc.iterations} iterations, or ask for "
                    f"{self.state.iteration} or more"
                )
            if ranks.is_main:
                trim_jsonl(self.history_path, self.state.iteration)
                trim_jsonl(self.panel_path, self.state.iteration)
            log.info("distill: resumed from %s at iteration %d", ckpt, self.state.iteration)
        elif ranks.is_main:
            for path in (self.history_path, self.panel_path, self.fit_path, self.unroll_path):
                path.unlink(missing_ok=True)
        ranks.barrier()
        self.history, self.panel_log = MetricsWriter(self.history_path), MetricsWriter(self.panel_path)

    def snapshot(self, run: int, epoch: int) -> list[Any]:
        """An expert snapshot's LoRA tensors in the student's order and dtypes (a few kept in memory)."""
        if (run, epoch) not in self.cache:
            if len(self.cache) > 16:
                self.cache.clear()
            snap = self.store.snapshot(run, epoch, device=self.device)
            names, dtypes = self.student.names, self.student.dtypes
            self.cache[(run, epoch)] = [snap[name].to(dtype) for name, dtype in zip(names, dtypes, strict=True)]
        return self.cache[(run, epoch)]

    def alpha_of(self, epoch: int) -> Any:
        return self.log_alpha[epoch if self.n_alpha > 1 else 0].exp()

    def _alpha_fn(self) -> Any:
        """:meth:`alpha_of` as the unrolls take it: a function with its leaf tensor attached."""

        def alpha_of(epoch: int) -> Any:
            return self.alpha_of(epoch)

        alpha_of.leaf = self.log_alpha  # type: ignore[attr-defined]
        return alpha_of

    def build_panel(self) -> None:
        """The held-out panel (``distill.panel_size`` draws of the held-out expert run), its initial results
        restored from the checkpoint on a resume."""
        from nacd.panel import Panel, panel_draws

        dc, seed = self.dc, self.config.run.seed
        if not dc.panel_size:
            return
        draws = panel_draws(self.held_runs, dc.max_start_epoch, self.n, self.batch, dc.syn_steps, dc.panel_size, seed)
        self.panel = Panel(
            self.student, draws, self.snapshot, dc.expert_epochs, self.initial, self.clip, seed, self.ranks
        )
        self.panel.restore_initial(self.state.panel_initial, str(self.ckpt / "state.json"))

    def fit_alpha(self) -> None:
        """alpha_mode=fitted, before the first update (a resume keeps the checkpoint's)."""
        import torch

        from nacd.panel import Panel, fit_alphas, panel_draws

        dc = self.dc
        if dc.alpha_mode != "fitted" or self.state.iteration != 0:
            return
        draws = panel_draws(
            self.train_runs, dc.max_start_epoch, self.n, self.batch, dc.syn_steps, dc.alpha_fit_draws, self.fit_seed
        )
        fit_panel = Panel(
            self.student, draws, self.snapshot, dc.expert_epochs, self.initial, self.clip, self.config.run.seed,
            self.ranks,
        )  # fmt: skip
        fitted, curves = fit_alphas(fit_panel, self.alpha0, self.n_alpha)
        self.log_alpha.data.copy_(torch.tensor(fitted, device=self.device).log())
        if self.ranks.is_main:
            atomic_write_json(self.fit_path, {"alphas": fitted, "curves": curves})
        log.info("distill: alpha fitted with the initial prompts: %s (alpha, L: %s)", fitted, curves)

    def choose_unroll(self) -> None:
        """unroll=auto or fd: decided on one training draw before the first update, kept on resume."""
        from nacd import unrolls
        from nacd.panel import panel_draws

        dc, ranks = self.dc, self.ranks
        if dc.unroll in ("auto", "fd") and self.state.iteration == 0:
            d = panel_draws(
                self.train_runs, dc.max_start_epoch, self.n, self.batch, dc.syn_steps, 1, self.fit_seed + 1
            )[0]
            theta_t = self.snapshot(d.run, d.start_epoch)
            target = self.snapshot(d.run, d.start_epoch + dc.expert_epochs)
            batches = [b.to(self.device) for b in d.batches]
            info = unrolls.choose_unroll(
                dc.unroll, self.student, theta_t, target, self.alpha_of(d.start_epoch), self.syn, batches,
                dc.fd_eps, dc.fd_check, self.clip,
            )  # fmt: skip
            info = unrolls.agreed_unroll(ranks.gather(info))  # free memory may differ between devices
            (log.warning if dc.unroll == "fd" and info["used"] != "fd" else log.info)("distill: unroll %s", info)
            if ranks.is_main:
                atomic_write_json(self.unroll_path, info)
        ranks.barrier()
        if self.unroll_path.is_file():
            self.unroll_info = json.loads(self.unroll_path.read_text())
        done = read_jsonl(self.panel_path) if self.panel_path.is_file() else []
        self.last_panel = done[-1] if done else None

    # ------------------------------------------------------------------ the panel

    def current(self) -> Any:
        """The prompts as measured and written: the moving average or the prompts, projected under pez."""
        from nacd import tm

        shown = (self.syn if self.ema is None else self.ema).detach()
        dc = self.dc
        return tm.snap(shown, self.vocab, dc.projection, dc.vocab_chunk) if dc.discrete == "pez" else shown

    def evaluate_panel(self) -> None:
        from nacd.panel import gain_line

        start = time.perf_counter()
        row = {
            "iteration": self.state.iteration,
            **self.panel.evaluate(self.current(), lambda t: float(self.alpha_of(t).detach())),
        }
        row["seconds"] = round(time.perf_counter() - start, 3)
        if self.ranks.is_main:
            self.panel_log.write(**row)
        log.info("distill: %s (%.1f s)", gain_line(row), row["seconds"])
        self.last_panel = row

    # ------------------------------------------------------------------ one iteration

    def step(self) -> dict[str, Any]:
        """One iteration: a meta-batch of draws, the meta-gradient, the update (or a scored swap); returns
        the history row (also written)."""
        import torch

        from nacd.panel import sample_draw
        from nacd.swap import SWAP_SEED_OFFSET, swap_step

        dc, state, syn, opts = self.dc, self.state, self.syn, self.opts
        start = time.perf_counter()
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        beta = beta_at(dc, state.iteration) if dc.discrete != "swap" else 0.0  # tokens: no distance to pull
        draws = [
            sample_draw(self.gen, self.train_runs, dc.max_start_epoch, self.n, self.batch, dc.syn_steps)
            for _ in range(dc.meta_batch)
        ]
        alpha_of = self._alpha_fn()
        rows, accepted, finite = meta_gradient(
            self.student, draws, syn, alpha_of, self.snapshot, self.vocab, dc, beta, self.spacing, self.clip,
            self.unroll_info["used"], self.ranks,
        )  # fmt: skip
        state.iteration += 1
        l_mean, reg_mean = (sum(r[key] for r in rows) / len(rows) for key in ("l_distill", "l_reg"))
        record = {
            "iteration": state.iteration,
            "l_distill": l_mean,
            "l_reg": reg_mean,
            "beta": beta,
            "loss": l_mean + beta * reg_mean,
            "accepted": accepted,
            "draws": rows,
        }
        if not finite:
            state.bad_in_a_row += 1
            state.skipped += 1
            log.warning("distill: iteration %d has a non-finite loss or gradient; skipped", state.iteration)
        elif accepted:
            state.bad_in_a_row = 0
            record["grad_norm_syn"] = float(syn.grad.norm())
            if dc.discrete == "swap":  # the tokens change by a scored swap, not by Adam
                seed = self.config.run.seed + SWAP_SEED_OFFSET + state.iteration
                record["swap"] = swap_step(
                    self.student, draws, syn, self.vocab, alpha_of, self.snapshot, dc, self.clip, self.gen, seed,
                    self.ranks,
                )  # fmt: skip
            elif dc.clip_syn is not None:
                torch.nn.utils.clip_grad_norm_([syn], dc.clip_syn)
            for name, opt in opts.items():
                if name != "syn" or dc.discrete != "swap":
                    opt.step()
            if self.ema is not None:
                self.ema.lerp_(syn.detach(), 1.0 - dc.ema)
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        state.seconds += elapsed
        record.update(alpha=float(self.alpha_of(0).detach()), skipped=not finite, seconds=round(elapsed, 3))
        if self.n_alpha > 1:
            record["alphas"] = [float(a) for a in self.log_alpha.detach().exp()]
        if self.ranks.is_main:
            self.history.write(**record)
        return record

    def stop_if_failing(self) -> None:
        """Stop after ``distill.max_bad_iterations`` non-finite iterations in a row, saying why and what is kept."""
        state, dc = self.state, self.dc
        if state.bad_in_a_row < dc.max_bad_iterations:
            return
        kept = (
            f"the last checkpoint ({self.ckpt}) is kept and the same command resumes from it"
            if recover_dir(self.ckpt).is_dir()
            else "no checkpoint was written yet"
        )
        cause = (
            "no iteration was finite: the experts' snapshots or the data give the student a non-finite "
            "loss at once (a too-large distill.lr_init can too)"
            if state.bad_in_a_row == state.iteration
            else "lower distill.lr_syn / distill.lr_lr or distill.lr_init"
        )
        raise NacdError(
            f"distill: {state.bad_in_a_row} iterations in a row had a non-finite loss or gradient "
            f"(last: iteration {state.iteration}); {cause}. The prompts were not changed by them; {kept}"
        )

    def checkpoint(self) -> None:
        if self.ranks.is_main:
            self.state.panel_initial = self.panel.initial_entries() if self.panel is not None else []
            save_checkpoint(self.ckpt, self.syn, self.log_alpha, self.opts, self.gen, self.state, self.ema)
        self.ranks.barrier()

    # ------------------------------------------------------------------ the result

    def result(self) -> dict[str, Any]:
        """The final tensors, alpha(s), state, the last panel evaluation and the hard-token gain."""
        dc, panel = self.dc, self.panel
        final = self.current()
        alphas = [float(a) for a in self.log_alpha.detach().exp()]
        hard = None
        if panel is not None:
            hard = hard_gain(panel, final, self.vocab, self._alpha_fn(), self.last_panel, self.state, dc)
        return {
            "syn": final,
            "continuous": (self.syn if self.ema is None else self.ema).detach() if dc.discrete == "pez" else None,
            "hard_gain": hard,
            "initial": self.initial.detach(),
            "alpha": sum(alphas) / len(alphas),
            "alphas": alphas,
            "state": self.state,
            "panel": self.last_panel,
            "alpha_fit": json.loads(self.fit_path.read_text()) if self.fit_path.is_file() else None,
            "unroll": self.unroll_info,
        }


def distill(
    student: Any,
    store: Any,
    config: Any,
    folder: Path,
    alpha0: float,
    progress: bool = True,
    clip: float | None = None,
    example_rows: list[list[int]] | None = None,
    ranks: Ranks = Ranks(),
) -> dict[str, Any]:
    """The distillation loop (Algorithm 1) with checkpoints and the prompt-gain panel
    (:class:`Distillation`'s steps in order); returns :meth:`Distillation.result`."""

    run = Distillation(student, store, config, folder, alpha0, clip, example_rows, ranks)
    dc = run.dc
    run.resume()
    state = run.state
    run.build_panel()
    run.fit_alpha()
    run.choose_unroll()
    if run.panel is not None and state.iteration == 0:
        run.evaluate_panel()
    disable = not (progress and ranks.is_main)
    bar = progress_bar(
        total=dc.iterations, initial=state.iteration, desc="distill", disable=disable, dynamic_ncols=True
    )
    try:
        while state.iteration < dc.iterations:
            record = run.step()
            bar.set_postfix(
                l_distill=f"{record['l_distill']:.4f}",
                l_reg=f"{record['l_reg']:.3f}",
                alpha=f"{record['alpha']:.3g}",
                refresh=False,
            )
            bar.update(1)
            run.stop_if_failing()
            if run.panel is not None and (state.iteration % dc.eval_every == 0 or state.iteration == dc.iterations):
                run.evaluate_panel()
            if state.iteration % dc.checkpoint_every == 0 or state.iteration == dc.iterations:
                run.checkpoint()
    finally:
        bar.close()
    return run.result()
