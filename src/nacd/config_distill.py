"""The distillation's section of the config (``distill.*``): :class:`DistillConfig`, re-exported by
:mod:`nacd.config`, which groups it with the other sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nacd.configlib import check as _check
from nacd.configlib import f


@dataclass
class DistillConfig:
    """Step 2: learn k prompt vectors per selected example by trajectory matching."""

    syn_steps: int = f(6, "N: differentiable student SGD steps per iteration.")
    expert_epochs: int = f(1, "M: how many expert epochs ahead the student must land.")
    iterations: int = f(3000, "S: distillation iterations.")
    num_prompt_tokens: int = f(2, "k: learnable prompt vectors per selected example.")
    prompt_offset: int = f(
        0,
        "Text tokens before the k prompt vectors: 0 puts them first (the paper); 1 after the first token (BOS or "
        "the chat template's first token, the attention-sink position). Tuning the distilling model on the "
        "distilled set places them the same way; the text mode puts the decoded prompt in the first user message.",
    )
    max_start_epoch: int = f(2, "T^m: start epochs t are drawn from [0, T^m).")
    beta: float = f(1.0, "Weight of the nearest-vocabulary regularizer (the paper's: 100 with regularizer=distance).")
    batch_size: int = f(8, "Examples per student step.")
    init: Literal["mean_vocab", "random_vocab", "random", "frequent_vocab", "example_tokens"] = f(
        "example_tokens",
        "Initialisation of the prompt vectors: mean_vocab (the paper's: all at the mean embedding), random_vocab, "
        "random, frequent_vocab (distinct frequent tokens of the data), example_tokens (each example's own "
        "distinctive instruction tokens).",
    )
    init_toward_mean: float = f(
        0.0,
        "Move every initial prompt vector this fraction of the way to the mean vocabulary embedding (0: the init "
        "as it is; 1: mean_vocab's start). Distinct starts nearer the paper's neutral one.",
    )
    regularizer: Literal["distance", "spacing", "spacing_squared"] = f(
        "spacing_squared",
        "L_reg: distance (Eq. 3, mean euclidean distance to the nearest token), spacing (the same divided by the "
        "vocabulary's median nearest-neighbour distance: beta means the same for every model), spacing_squared "
        "(mean squared scaled distance: a pull that fades near a token).",
    )
    beta_warmup: int = f(0, "Iterations over which beta ramps linearly from 0 to its value (0: no warm-up).")
    lr_syn: float = f(
        3e-3,
        "Adam learning rate of the prompt vectors (measured: docs/experiments/2026-11-distill-studies.md; the paper's recipe in nacd: 1e-2).",
    )
    lr_lr: float = f(1e-2, "Adam learning rate of log(alpha), the learnable student learning rate.")
    lr_init: float | None = f(None, "alpha_0: initial student learning rate; None = the experts' peak lr.")
    alpha_mode: Literal["shared", "per_epoch", "fixed", "fitted"] = f(
        "fixed",
        "The student lr: shared (one learned alpha, the paper's), per_epoch (one learned alpha per start epoch), "
        "fixed (alpha_0 throughout: the prompts alone lower L_distill), fitted (one alpha per start epoch, the "
        "best of a x2 grid from alpha_0 for the initial prompts on alpha_fit_draws training draws, then fixed).",
    )
    alpha_fit_draws: int = f(8, "alpha_mode=fitted: training draws (start epochs stratified) alpha is fitted on.")
    ema: float | None = f(
        None,
        "Keep an exponential moving average of the prompt vectors with this decay (FTD's and DATM's, e.g. 0.9): the "
        "panel measures it and the distilled set is it. None: the prompts as learned.",
    )
    meta_batch: int = f(1, "Draws (expert run, start epoch, N batches) whose meta-gradients are averaged per update.")
    skip_above: float | None = f(
        None, "Skip draws whose L_distill exceeds this (DATM's threshold, ~1.0); None: use every draw."
    )
    panel_size: int = f(
        16, "P: held-out draws of the prompt-gain diagnostic (docs/DISTILL.md); 0 turns the diagnostic off."
    )
    eval_every: int = f(50, "Evaluate the prompt gain every this many iterations (and at the start and the end).")
    holdout_run: bool = f(
        True, "With 2+ expert runs and panel_size > 0, keep the last run out of training: the panel draws from it."
    )
    student_clip: bool = f(
        True,
        "Clip each student step's LoRA-gradient norm as the experts' optimizer did (their train.max_grad_norm), "
        "differentiably, so that N student steps move like N expert steps; false: plain SGD steps.",
    )
    unroll: Literal["auto", "flat", "naive", "fd"] = f(
        "auto",
        "auto: naive where its measured per-step memory x (N+1) fits in half the free memory (on the CPU, "
        "half of it shared by the node's processes), else flat (the choice goes to distill/unroll.json); "
        "flat: exact, memory flat in N; naive: exact autograd unroll (memory grows with N; no rebuilt steps, "
        "about 20% faster per iteration on cpu-small); fd: central finite-difference Hessian products, "
        "memory flat, checked against flat first (fd_check). The exact three give the same set up to "
        "rounding, so a run folder made with one is reused or continued under another.",
    )
    fd_eps: float | None = f(
        None,
        "fd mode: central-difference step relative to the norm of the LoRA parameters; None: the cube root of "
        "the working precision's machine epsilon (4.9e-3 in float32 and float64 models, 0.2 in bfloat16).",
    )
    fd_check: float | None = f(
        5e-2,
        "fd mode: before the first update, fd's meta-gradient is compared with the exact one (flat) on one "
        "training draw; above this relative error the run says so and uses flat. None: no check (not advised).",
    )
    clip_syn: float | None = f(1.0, "Clip the gradient norm of the prompt vectors; None disables clipping.")
    max_bad_iterations: int = f(10, "Stop after this many consecutive iterations with a non-finite loss or gradient.")
    checkpoint_every: int = f(10, "Write a resumable checkpoint every this many iterations.")
    vocab_chunk: int = f(8192, "Vocabulary rows per chunk of the nearest-embedding search.")
    discrete: Literal["none", "pez", "swap"] = f(
        "none",
        "none: continuous prompt vectors, decoded to their nearest tokens for a receiving model (the paper's); "
        "pez: optimized in token space (PEZ, Wen et al. 2023): every unroll runs on the prompts projected onto "
        "their nearest vocabulary rows and the gradient moves a continuous copy, so the distilled set is the "
        "final projection, hard tokens for every model; swap: the prompts are tokens throughout and each "
        "iteration tries swap_candidates single-token swaps ranked by the meta-gradient (AutoPrompt, GCG), "
        "keeping the one that lowers L_distill most on the iteration's draws (docs/DISTILL.md).",
    )
    swap_topk: int = f(32, "discrete=swap: candidate tokens per prompt position, by the first-order loss change.")
    swap_candidates: int = f(
        16, "discrete=swap: single swaps scored per iteration, each by meta_batch forward unrolls of N steps."
    )
    swap_keep: int = f(
        1,
        "discrete=swap: the most swaps kept per iteration: the improving ones (one per position, best first) "
        "are scored together once more and kept together when that beats the best alone (1: GCG's one swap).",
    )
    projection: Literal["cosine", "l2"] = f(
        "cosine",
        "discrete=pez: the metric of the projection onto the vocabulary (cosine: PEZ's; l2: the decoding's).",
    )
    nearest: Literal["text", "words", "all"] = f(
        "text",
        "Vocabulary rows for the init, L_reg, decoding and the swap candidates: text = ordinary tokens "
        "(special and control tokens excluded, so prompts decode to text another tokenizer reads); words = "
        "the text tokens that decode to a whole word (a leading space and two or more letters), so the "
        "prompts read as words, not subword pieces; all = every embedding row.",
    )
    soft_labels: bool = f(
        False,
        "The student's steps descend the soft cross-entropy toward an expert's token distributions on the "
        "responses (expert run 0's last snapshot, its top soft_labels_topk tokens) instead of the one-hot "
        "targets: prompts shaped for tuning with finetune.soft_labels (nacd run's sel_nacd_soft, whose teacher "
        "is the same by default). docs/experiments/2026-12-04-levers-student-recipe.md.",
    )
    soft_labels_topk: int = f(32, "distill.soft_labels: the teacher's top-k tokens kept per response position.")
    ids_file: str | None = f(None, "D_sel as a file of example ids; default: the run's selection (select/).")

    def __post_init__(self) -> None:
        for name in (
            *("syn_steps", "expert_epochs", "iterations", "num_prompt_tokens", "max_start_epoch", "batch_size"),
            *("max_bad_iterations", "checkpoint_every", "vocab_chunk", "meta_batch", "eval_every", "alpha_fit_draws"),
            *("swap_topk", "swap_candidates", "swap_keep", "soft_labels_topk"),
        ):
            _check(getattr(self, name) > 0, name, "must be at least 1")
        _check(self.beta >= 0, "beta", "must be >= 0")
        for name in ("lr_syn", "lr_lr"):
            _check(getattr(self, name) > 0, name, "must be positive")
        for name in ("fd_eps", "fd_check"):
            _check(getattr(self, name) is None or getattr(self, name) > 0, name, "must be positive or null")
        _check(self.lr_init is None or self.lr_init > 0, "lr_init", "must be positive or null")
        _check(self.clip_syn is None or self.clip_syn > 0, "clip_syn", "must be positive or null")
        _check(self.beta_warmup >= 0, "beta_warmup", "must be >= 0")
        _check(self.prompt_offset >= 0, "prompt_offset", "must be >= 0")
        _check(self.ema is None or 0.0 < self.ema < 1.0, "ema", "must be a decay in (0, 1) or null")
        _check(0.0 <= self.init_toward_mean <= 1.0, "init_toward_mean", "must be a fraction in [0, 1]")
        _check(self.panel_size >= 0, "panel_size", "must be >= 0")
        _check(
            self.ema is None or self.discrete != "swap", "ema", "must be null with discrete=swap (tokens, not vectors)"
        )
        _check(self.skip_above is None or self.skip_above > 0, "skip_above", "must be positive or null")
        _check(self.alpha_mode != "fitted" or self.alpha_fit_draws >= self.max_start_epoch, "alpha_fit_draws",
               "must be >= max_start_epoch with alpha_mode fitted (each start epoch fits its alpha on its draws)")  # fmt: skip
