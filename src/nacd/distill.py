"""Step 2 of NACD: learn k prompt vectors per selected example by trajectory matching.

Paper Section 3.2, Algorithm 1, Eqs. 1-4; the math and the unroll modes are in
:mod:`nacd.tm` and :mod:`nacd.unrolls`. Each example of D_sel gets ``k`` vectors in the input-embedding
space (D_syn, initialised per ``distill.init``). An iteration
samples an expert run and a start epoch ``t < T^m``, starts the student at the
expert snapshot theta*_t, takes N differentiable SGD steps on
concat(prompt, text) mini-batches of D_sel with the learnable lr alpha, and
updates D_syn and log(alpha) with Adam on

    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 + beta * L_reg.

Output, ``<run>/distill/``::

    prompts.safetensors  "prompts" (n, k, d) float32, "nearest_ids" (n, k), "nearest_dist" (n, k),
                         "initial_ids" (n, k): the tokens nearest the initial prompts
    records.jsonl        per example: id, source, nearest token ids and pieces, decoded prompt text, the
                         initial prompt's tokens,
                         the original messages (plain text: usable by any tokenizer)
    history.jsonl        per iteration: L_distill, L_reg, L, alpha, the draws (expert run, start epoch), seconds
    panel.jsonl          per evaluation of the held-out panel: the prompt gain (:mod:`nacd.panel`)
    alpha_fit.json       alpha_mode=fitted: the alphas chosen and every (alpha, L_distill) tried
    unroll.json          unroll=auto or fd: the mode used and why (naive's memory; fd's self-check against flat)
    manifest.json        kind "distilled": ids in order, alpha, model fingerprint, config, dims
    checkpoint/          D_syn, alpha, optimizer and RNG state every distill.checkpoint_every iterations
                         (kept at the end: a rerun with more iterations continues from it)
    loss.png             written by ``nacd inspect``
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nacd.artifacts import (
    MetricsWriter,
    RunDir,
    atomic_write_json,
    check_identity,
    read_jsonl,
    read_manifest,
    recover_dir,
    setup_logging,
    trim_jsonl,
    write_manifest,
)
from nacd.distill_state import DistillState, load_checkpoint, save_checkpoint
from nacd.distilled import KIND, DistilledSet, write_distilled
from nacd.errors import NacdError
from nacd.locks import locked
from nacd.ranks import Ranks
from nacd.ranks import current as current_ranks

log = logging.getLogger(__name__)

__all__ = ["KIND", "DistilledSet", "check", "distill", "meta_gradient", "run", "write_distilled"]


def check(config: Any) -> None:
    """Raise if this stage cannot run with ``config`` (every valid config can)."""


# --------------------------------------------------------------------------- inputs


def selected_ids(config: Any, run_dir: RunDir) -> tuple[list[str], Path]:
    from nacd.select import read_ids, verify_selection

    path = Path(config.distill.ids_file) if config.distill.ids_file else run_dir.select_dir / "selection.json"
    if not path.is_file():
        raise NacdError(f"distill needs D_sel: no selection at {path}; run `nacd select` or set distill.ids_file")
    if not config.distill.ids_file:
        verify_selection(run_dir.select_dir, read_manifest(run_dir.select_dir) or {})
    return read_ids(path), path


def check_experts(
    store: Any, fingerprint: str, lora: dict[str, Any], shapes: dict[str, list[int]], config: Any
) -> None:
    """Experts must come from the same base model and LoRA config, and reach epoch T^m - 1 + M."""
    if not store.runs:
        raise NacdError(f"{store.folder}: no complete expert run; run `nacd experts` first")
    need = config.distill.max_start_epoch - 1 + config.distill.expert_epochs
    for run in store.runs:
        folder = store.folder / f"run_{run:03d}"
        manifest = store.manifest(run)
        hint = "record the experts again with the model and LoRA config being distilled"
        check_identity(folder, manifest, {"lora": lora}, hint)  # names the setting (lora.r) before the shapes
        check_identity(folder, manifest, {"base_model": {**manifest["base_model"], "fingerprint": fingerprint}}, hint)
        check_identity(folder, manifest, {"parameters": shapes}, hint)
        epochs = store.epochs(run)
        if max(epochs) < need:
            raise NacdError(
                f"{folder / 'manifest.json'}: snapshots up to epoch {max(epochs)}, but distill.max_start_epoch="
                f"{config.distill.max_start_epoch} and distill.expert_epochs={config.distill.expert_epochs} need "
                f"epoch {need}; record longer experts or lower them"
            )


# --------------------------------------------------------------------------- the loop


def _identity(
    config: Any, fingerprint: str, ids: list[str], data_hash: str, alpha0: float, clip: float | None
) -> dict[str, Any]:
    dc = asdict(config.distill)
    for key in ("iterations", "checkpoint_every", "max_bad_iterations", "eval_every"):  # may change between resumes
        dc.pop(key)
    return {
        "base_model": {"spec": config.model.spec, "fingerprint": fingerprint},
        "distill": dc,
        "seed": config.run.seed,
        "ids": ids,
        "data_hash": data_hash,
        "alpha0": alpha0,
        "student_clip_norm": clip,
    }


#: Unroll modes that give the same meta-gradients up to rounding: a set made with one is the set any
#: other would make, so switching among them never makes a distillation "other settings".
EXACT_UNROLLS = ("auto", "flat", "naive")
#: ``distill`` keys that change how the work is done, not its result (up to rounding).
RESULT_FREE = ("vocab_chunk",)


def same_up_to_rounding(made: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """``made`` (a manifest) with the settings that cannot change the result read as ``now``'s: an exact
    ``distill.unroll`` where both are exact (:data:`EXACT_UNROLLS`; ``fd``, an approximation, differs
    from all of them) and the :data:`RESULT_FREE` keys. The manifest on disk keeps what it was made with."""
    then, asked = (x.get("distill") for x in (made, now))
    if not (isinstance(then, dict) and isinstance(asked, dict)):
        return made
    same = {k: asked[k] for k in RESULT_FREE if k in asked and k in then}
    if then.get("unroll") in EXACT_UNROLLS and asked.get("unroll") in EXACT_UNROLLS:
        same["unroll"] = asked["unroll"]
    return {**made, "distill": {**then, **same}}


def with_new_defaults(manifest: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with the ``distill`` keys added since it was written filled in at their defaults: a
    set distilled before a new option existed was made as that option's default makes it, so it stays
    usable and continuable (a key set to anything else still differs, and is refused)."""
    from nacd.config import DistillConfig

    made = manifest.get("distill")
    if not isinstance(made, dict):
        return manifest
    defaults = asdict(DistillConfig())
    added = {k: defaults[k] for k in now if k not in made and k in defaults}
    return {**manifest, "distill": {**added, **made}}


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
    """The distillation loop (Algorithm 1) with checkpoints and the prompt-gain panel; returns the final
    tensors, alpha(s), state and the last panel evaluation. Under a launcher (``ranks``) every process
    runs this loop on the same draws, unrolls its share of each meta-batch and of the panel, and applies
    the same summed gradient, so the prompts stay identical everywhere; only the main process writes."""
    import torch
    from tqdm.auto import tqdm

    from nacd import tm, unrolls
    from nacd.panel import FIT_SEED_OFFSET, Panel, fit_alphas, gain_line, panel_draws, sample_draw, split_runs
    from nacd.swap import SWAP_SEED_OFFSET, swap_step

    dc = config.distill
    device = student.device
    n, k = len(student.data), dc.num_prompt_tokens
    vocab = tm.candidate_rows(student)
    initial = tm.initial_prompts(dc.init, vocab, n, k, config.run.seed, example_rows, dc.init_toward_mean).to(device)
    if dc.discrete == "swap":  # tokens throughout: the initial prompts' nearest tokens
        initial = tm.snap(initial, vocab, "l2", dc.vocab_chunk)
    syn = torch.nn.Parameter(initial.clone())
    ema = initial.clone() if dc.ema is not None else None  # the prompts measured and written, when kept
    n_alpha = dc.max_start_epoch if dc.alpha_mode in ("per_epoch", "fitted") else 1
    learned = dc.alpha_mode in ("shared", "per_epoch")
    log_alpha = torch.nn.Parameter(torch.full((n_alpha,), math.log(alpha0), device=device), requires_grad=learned)
    opts = {"syn": torch.optim.Adam([syn], lr=dc.lr_syn)}
    if learned:
        opts["lr"] = torch.optim.Adam([log_alpha], lr=dc.lr_lr)
    spacing = tm.vocab_spacing(vocab, chunk=dc.vocab_chunk) if dc.regularizer != "distance" else 1.0
    gen = torch.Generator().manual_seed(config.run.seed)
    history_path, panel_path, ckpt = folder / "history.jsonl", folder / "panel.jsonl", folder / "checkpoint"
    state = DistillState()
    if recover_dir(ckpt).is_dir():  # renamed into place whole: one with a part missing is refused, not ignored
        state = load_checkpoint(ckpt, syn, log_alpha, opts, gen, ema)
        if state.iteration > dc.iterations:
            raise NacdError(
                f"{ckpt}: the checkpoint is at iteration {state.iteration}, past distill.iterations={dc.iterations}; "
                f"use another run.out_dir to distill {dc.iterations} iterations, or ask for {state.iteration} or more"
            )
        if ranks.is_main:
            trim_jsonl(history_path, state.iteration)
            trim_jsonl(panel_path, state.iteration)
        log.info("distill: resumed from %s at iteration %d", ckpt, state.iteration)
    elif ranks.is_main:
        for path in (history_path, panel_path, folder / "alpha_fit.json", folder / "unroll.json"):
            path.unlink(missing_ok=True)
    ranks.barrier()
    history, panel_log = MetricsWriter(history_path), MetricsWriter(panel_path)
    train_runs, held_runs = split_runs(store.runs, dc.holdout_run and dc.panel_size > 0)
    fit_seed = config.run.seed + FIT_SEED_OFFSET
    batch = min(dc.batch_size, n)
    cache: dict[tuple[int, int], list[Any]] = {}

    def snapshot(run: int, epoch: int) -> list[Any]:
        if (run, epoch) not in cache:
            if len(cache) > 16:
                cache.clear()
            snap = store.snapshot(run, epoch, device=device)
            cache[(run, epoch)] = [
                snap[name].to(dtype) for name, dtype in zip(student.names, student.dtypes, strict=True)
            ]
        return cache[(run, epoch)]

    def alpha_of(epoch: int) -> Any:
        return log_alpha[epoch if n_alpha > 1 else 0].exp()

    alpha_of.leaf = log_alpha  # type: ignore[attr-defined]

    panel = None
    if dc.panel_size:
        draws = panel_draws(held_runs, dc.max_start_epoch, n, batch, dc.syn_steps, dc.panel_size, config.run.seed)
        panel = Panel(student, draws, snapshot, dc.expert_epochs, initial, clip, config.run.seed, ranks)
        panel.restore_initial(state.panel_initial, str(ckpt / "state.json"))
    fit_path = folder / "alpha_fit.json"
    if dc.alpha_mode == "fitted" and state.iteration == 0:  # before the first update; a resume keeps the checkpoint's
        fit_panel = Panel(
            student,
            panel_draws(train_runs, dc.max_start_epoch, n, batch, dc.syn_steps, dc.alpha_fit_draws, fit_seed),
            snapshot, dc.expert_epochs, initial, clip, config.run.seed, ranks,
        )  # fmt: skip
        fitted, curves = fit_alphas(fit_panel, alpha0, n_alpha)
        log_alpha.data.copy_(torch.tensor(fitted, device=device).log())
        if ranks.is_main:
            atomic_write_json(fit_path, {"alphas": fitted, "curves": curves})
        log.info("distill: alpha fitted with the initial prompts: %s (alpha, L: %s)", fitted, curves)
    unroll_path = folder / "unroll.json"
    if dc.unroll in ("auto", "fd") and state.iteration == 0:  # decided on one training draw, kept on resume
        d = panel_draws(train_runs, dc.max_start_epoch, n, batch, dc.syn_steps, 1, fit_seed + 1)[0]
        theta_t, target = snapshot(d.run, d.start_epoch), snapshot(d.run, d.start_epoch + dc.expert_epochs)
        batches = [b.to(device) for b in d.batches]
        info = unrolls.choose_unroll(
            dc.unroll, student, theta_t, target, alpha_of(d.start_epoch), syn, batches, dc.fd_eps, dc.fd_check, clip
        )
        info = unrolls.agreed_unroll(ranks.gather(info))  # free memory may differ between devices
        (log.warning if dc.unroll == "fd" and info["used"] != "fd" else log.info)("distill: unroll %s", info)
        if ranks.is_main:
            atomic_write_json(unroll_path, info)
    ranks.barrier()
    unroll_info = json.loads(unroll_path.read_text()) if unroll_path.is_file() else {"used": dc.unroll}
    done = read_jsonl(panel_path) if panel_path.is_file() else []
    last_panel = done[-1] if done else None

    def current() -> Any:
        """The prompts as measured and written: the moving average or the prompts, projected under pez."""
        shown = (syn if ema is None else ema).detach()
        return tm.snap(shown, vocab, dc.projection, dc.vocab_chunk) if dc.discrete == "pez" else shown

    def evaluate_panel() -> None:
        nonlocal last_panel
        start = time.perf_counter()
        shown = current()
        row = {"iteration": state.iteration, **panel.evaluate(shown, lambda t: float(alpha_of(t).detach()))}
        row["seconds"] = round(time.perf_counter() - start, 3)
        if ranks.is_main:
            panel_log.write(**row)
        log.info("distill: %s (%.1f s)", gain_line(row), row["seconds"])
        last_panel = row

    if panel is not None and state.iteration == 0:
        evaluate_panel()
    disable = not (progress and ranks.is_main)
    bar = tqdm(total=dc.iterations, initial=state.iteration, desc="distill", disable=disable, dynamic_ncols=True)
    try:
        while state.iteration < dc.iterations:
            start = time.perf_counter()
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            beta = beta_at(dc, state.iteration) if dc.discrete != "swap" else 0.0  # tokens: no distance to pull
            draws = [
                sample_draw(gen, train_runs, dc.max_start_epoch, n, batch, dc.syn_steps) for _ in range(dc.meta_batch)
            ]
            rows, accepted, finite = meta_gradient(
                student, draws, syn, alpha_of, snapshot, vocab, dc, beta, spacing, clip, unroll_info["used"], ranks
            )
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
                    seed = config.run.seed + SWAP_SEED_OFFSET + state.iteration
                    record["swap"] = swap_step(
                        student, draws, syn, vocab, alpha_of, snapshot, dc, clip, gen, seed, ranks
                    )
                elif dc.clip_syn is not None:
                    torch.nn.utils.clip_grad_norm_([syn], dc.clip_syn)
                for name, opt in opts.items():
                    if name != "syn" or dc.discrete != "swap":
                        opt.step()
                if ema is not None:
                    ema.lerp_(syn.detach(), 1.0 - dc.ema)
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            state.seconds += elapsed
            record.update(alpha=float(alpha_of(0).detach()), skipped=not finite, seconds=round(elapsed, 3))
            if n_alpha > 1:
                record["alphas"] = [float(a) for a in log_alpha.detach().exp()]
            if ranks.is_main:
                history.write(**record)
            bar.update(1)
            bar.set_postfix(
                l_distill=f"{record['l_distill']:.4f}", l_reg=f"{record['l_reg']:.3f}", alpha=f"{record['alpha']:.3g}"
            )
            if state.bad_in_a_row >= dc.max_bad_iterations:
                kept = (
                    f"the last checkpoint ({ckpt}) is kept and the same command resumes from it"
                    if recover_dir(ckpt).is_dir()
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
            if panel is not None and (state.iteration % dc.eval_every == 0 or state.iteration == dc.iterations):
                evaluate_panel()
            if state.iteration % dc.checkpoint_every == 0 or state.iteration == dc.iterations:
                if ranks.is_main:
                    state.panel_initial = panel.initial_entries() if panel is not None else []
                    save_checkpoint(ckpt, syn, log_alpha, opts, gen, state, ema)
                ranks.barrier()
    finally:
        bar.close()
    final = current()

    alphas = [float(a) for a in log_alpha.detach().exp()]
    return {
        "syn": final,
        "continuous": (syn if ema is None else ema).detach() if dc.discrete == "pez" else None,
        "hard_gain": None if panel is None else hard_gain(panel, final, vocab, alpha_of, last_panel, state, dc),
        "initial": initial.detach(),
        "alpha": sum(alphas) / len(alphas),
        "alphas": alphas,
        "state": state,
        "panel": last_panel,
        "alpha_fit": json.loads(fit_path.read_text()) if fit_path.is_file() else None,
        "unroll": unroll_info,
    }


@locked("distill", lambda config, run_dir: run_dir.distill_dir)
def run(config: Any, run_dir: RunDir) -> DistilledSet:
    """``nacd distill``: distill D_sel against the run's expert trajectories; resumable."""
    from nacd.chat import tokenize_corpus
    from nacd.data import load_corpus
    from nacd.experts import ExpertStore
    from nacd.lora import add_lora, lora_parameters
    from nacd.models import load_model, model_fingerprint, resolve_device
    from nacd.select import select_examples
    from nacd.tm import TOKEN_INITS, Student, check_prompt_offset, instruction_rows
    from nacd.train import tokenized_hash

    check(config)
    ids, ids_path = selected_ids(config, run_dir)
    store = ExpertStore(run_dir.experts_dir)
    if not store.runs:
        raise NacdError(f"{run_dir.experts_dir}: no complete expert run; run `nacd experts` first")
    device = resolve_device(config.run.device)
    ranks = current_ranks(cpu=device.type == "cpu")
    if ranks.is_main:
        run_dir.init(config)
    setup_logging(config.run.log_level, run_dir.log_path if ranks.is_main else None)
    model, tokenizer = load_model(config.model, device, needs_double_backward=True)
    fingerprint = model_fingerprint(model)
    corpus, _ = load_corpus(config.data)
    examples = select_examples(corpus, ids, str(ids_path))
    data = tokenize_corpus(examples, tokenizer, config.data)
    if len(data) != len(examples):
        raise NacdError(
            f"distill: {len(examples) - len(data)} selected example(s) could not be tokenized (see the log)"
        )
    offset = config.distill.prompt_offset
    check_prompt_offset(data, offset)
    model = add_lora(model, config.lora)
    shapes = {name: list(p.shape) for name, p in lora_parameters(model).items()}
    lora = {**asdict(config.lora), "target_modules": sorted(model.peft_config["default"].target_modules)}
    check_experts(store, fingerprint, lora, shapes, config)
    expert_train = store.manifest(store.runs[0])["train"]
    alpha0 = config.distill.lr_init or float(expert_train["lr"])
    clip = expert_train.get("max_grad_norm") if config.distill.student_clip else None
    identity = _identity(config, fingerprint, ids, tokenized_hash(data), alpha0, clip)
    folder = run_dir.distill_dir
    hint = f"delete {folder} to distill again with these settings"
    existing = ranks.from_main(read_manifest(folder, KIND))  # one decision for all processes
    if existing is not None:
        made = same_up_to_rounding(with_new_defaults(existing, identity["distill"]), identity)
        check_identity(folder, made, identity, hint)
    finished = existing.get("iterations") if existing is not None and existing.get("complete") else None
    if finished == config.distill.iterations:  # finished work first: how it would be computed does not matter
        done = DistilledSet.load(folder)  # checked before it is called complete
        log.info("distill: complete in %s, skipped", folder)
        return done
    if ranks.world > config.distill.meta_batch:
        raise NacdError(
            f"distill: {ranks.world} processes but distill.meta_batch={config.distill.meta_batch} draws per update; "
            f"each process unrolls its share of a meta-batch, so set distill.meta_batch to {ranks.world} (or a "
            f"multiple of it), or launch fewer processes"
        )
    if finished is not None and finished > config.distill.iterations:
        raise NacdError(
            f"{folder}: holds a finished distillation of {finished} iterations, more than "
            f"distill.iterations={config.distill.iterations}; it is kept as it is. Use another run.out_dir to "
            f"distill {config.distill.iterations} iterations, or ask for {finished} or more to keep or continue it"
        )
    if finished is not None and not recover_dir(folder / "checkpoint").is_dir():
        raise NacdError(
            f"{folder / 'checkpoint'}: missing, so the finished {finished}-iteration distillation cannot be "
            f"continued to {config.distill.iterations}; it is kept as it is. Use another run.out_dir to distill anew"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if finished is None and ranks.is_main:  # a finished set stays valid until its continuation is written
        write_manifest(folder, KIND, **identity, complete=False)
    ranks.barrier()
    student = Student(model, data, tokenizer.pad_token_id, prompt_offset=offset)
    if config.distill.nearest == "text":
        import torch

        from nacd.tm import text_token_ids

        student.vocab_ids = torch.tensor(text_token_ids(tokenizer, student.vocab.shape[0]))
    model.train()  # LoRA dropout, if any, as the experts had it
    rows = instruction_rows(data, student.vocab_ids) if config.distill.init in TOKEN_INITS else None
    try:
        result = distill(student, store, config, folder, alpha0, clip=clip, example_rows=rows, ranks=ranks)
    finally:
        student.close()
    # the checkpoint stays: raising distill.iterations and rerunning continues from it
    result["processes"] = {
        "count": ranks.world,
        "draws_per_update": [len(Ranks(r, ranks.world).mine(config.distill.meta_batch)) for r in range(ranks.world)],
    }
    if ranks.is_main:
        write_distilled(folder, result, student, tokenizer, examples, identity, config.distill.vocab_chunk)
    ranks.barrier()
    log.info("distill: %d examples x %d prompt vectors -> %s", len(data), config.distill.num_prompt_tokens, folder)
    return DistilledSet.load(folder)
