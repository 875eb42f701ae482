"""Typed, documented configuration.

One dataclass per concern (run, model, LoRA, data, and one per stage), grouped
in :class:`Config`. The defaults below *are* the embedded default config: a
YAML file only lists what it changes, and ``key.sub=value`` overrides on the
command line change single values (``distill.syn_steps=8``,
``data.sources.0.max_examples=100``).

Every field carries a one-line doc (``field_doc``); ``nacd config --explain``
prints them and ``docs/CONFIG.md`` is written from them. Values are checked
when the config is built: a wrong type, an unknown key or an out-of-range
value raises :class:`~nacd.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nacd.config_distill import DistillConfig
from nacd.configlib import build, deep_merge, f, load_yaml, parse_override, set_dotted, to_dict
from nacd.configlib import check as _check
from nacd.errors import ConfigError

SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    """Where a run writes and how it runs."""

    out_dir: str = f("runs/default", "Run folder; every stage writes below it and the resolved config is saved there.")
    seed: int = f(0, "Global seed (data order, sampling, initialisation).")
    device: str = f("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps.")
    num_threads: int | None = f(None, "torch CPU threads; None leaves torch's default.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = f("INFO", "Logging level.")

    def __post_init__(self) -> None:
        _check(bool(self.out_dir), "out_dir", "must not be empty")
        _check(
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
            "device",
            f"expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}",
        )
        _check(self.num_threads is None or self.num_threads > 0, "num_threads", "must be positive")


@dataclass
class ModelConfig:
    """Which causal LM to use and how to load it."""

    spec: str = f(
        "smollm2-135m",
        "Model spec: a built-in name (smollm2-135m, gemma3-270m), a local folder, a .gguf file, or a Hugging Face hub id.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = f(
        "auto", "Weights dtype: auto = float32 on CPU, bfloat16 on GPUs that support it (else float16)."
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = f(
        "auto",
        "Attention kernel: auto = sdpa (the distillation's double backward runs on SDPA's math backend), but "
        "eager for the distilling model on a CPU (level in time there; docs/BENCHMARKS.md).",
    )
    trust_remote_code: bool = f(False, "Allow model code from the hub. Off unless you turn it on.")
    revision: str | None = f(None, "Hub revision (branch, tag or commit) for hub ids.")
    cache_dir: str | None = f(
        None, "Where converted GGUF and built-in models are cached; default $NACD_CACHE or ~/.cache/nacd."
    )

    def __post_init__(self) -> None:
        _check(bool(self.spec.strip()), "spec", "must not be empty")


@dataclass
class LoraConfig:
    """LoRA adapter shared by every stage that trains (via peft)."""

    r: int = f(8, "LoRA rank.")
    alpha: float = f(16.0, "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = f(0.0, "LoRA dropout (0 keeps trajectories deterministic).")
    target_modules: list[str] | None = f(
        None, "Module names to adapt; None = per-architecture default (q_proj, v_proj for Llama/Gemma/OPT)."
    )

    def __post_init__(self) -> None:
        _check(self.r > 0, "r", "must be positive")
        _check(self.alpha > 0, "alpha", "must be positive")
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _check(
            self.target_modules is None or len(self.target_modules) > 0, "target_modules", "must not be an empty list"
        )


@dataclass
class SourceConfig:
    """One instruction corpus; several are mixed into D_full."""

    path: str = f(
        "",
        "Local file (.jsonl/.json/.tsv/.csv/.parquet, glob allowed), local folder, or hub dataset id (hf:owner/name or owner/name).",
    )
    format: Literal["auto", "chat", "instruction", "multiple_choice", "qa", "prompt_completion"] = f(
        "auto", "Record format; auto detects it from the fields of the first record."
    )
    name: str = f("", "Source name used in example ids and statistics; default: file stem or dataset id.")
    split: str = f("train", "Split to read from a folder or hub dataset.")
    subset: str | None = f(None, "Hub dataset configuration name.")
    max_examples: int | None = f(None, "Per-source cap: a seeded uniform sample of at most this many examples.")
    columns: list[str] | None = f(
        None, "Column names of a headerless CSV/TSV; default for a 3-column TSV: question, answer, rationale."
    )
    fields: dict[str, str] = f(
        {}, "Rename map from a canonical field (instruction, input, output, messages, ...) to the column that holds it."
    )

    def __post_init__(self) -> None:
        _check(bool(self.path.strip()), "path", "must name a file, folder or dataset id")
        _check(self.max_examples is None or self.max_examples > 0, "max_examples", "must be positive")


def _default_sources() -> list[SourceConfig]:
    """The paper's "All" mix (Flan v2, CoT, Dolly, oasst1) from the shared public slices."""
    return [
        SourceConfig(path="instruct/dolly/dolly_subset_dev1000.jsonl", name="dolly", max_examples=100),
        SourceConfig(path="instruct/oasst1/oasst1_en_validation_paths_messages.jsonl", name="oasst1", max_examples=100),
        SourceConfig(path="instruct/flan_cot/*_train.tsv", name="flan_cot", max_examples=100),
        SourceConfig(path="instruct/sni/sni_dev500.jsonl", name="sni", max_examples=100),
    ]


@dataclass
class DataConfig:
    """The instruction corpus D_full and how it is tokenized."""

    root: str = f("../shared/data", "Relative source paths are resolved against this folder.")
    sources: list[SourceConfig] = field(
        default_factory=_default_sources,
        metadata={"doc": "Corpora mixed into D_full (each with its own format and cap)."},
    )
    max_seq_len: int = f(256, "Examples longer than this many tokens are truncated.")
    truncation: Literal["keep_response", "right"] = f(
        "keep_response",
        "keep_response: shorten the prompt (middle) before the response; right: cut the end like a plain tokenizer.",
    )
    template: Literal["auto", "model", "fallback"] = f(
        "auto", "auto: the model's chat template if it has one, else the fallback format (docs/DATA.md)."
    )
    strict: bool = f(False, "True: the first bad record stops loading; False: it is skipped, counted and logged.")
    seed: int = f(0, "Seed of the per-source sampling caps and of the held-out split.")
    heldout: float = f(
        0,
        "Examples of each source held out of D_full before its cap, for the `heldout` benchmark (docs/EVAL.md): "
        "a fraction (< 1) or a count (>= 1) per source; 0 holds nothing out.",
    )

    def __post_init__(self) -> None:
        _check(len(self.sources) > 0, "sources", "needs at least one source")
        _check(self.max_seq_len >= 8, "max_seq_len", "must be at least 8")
        _check(
            self.heldout == 0 or 0 < self.heldout < 1 or float(self.heldout).is_integer() and self.heldout >= 1,
            "heldout",
            f"expected 0, a fraction in (0, 1) or a whole count >= 1, got {self.heldout!r}",
        )


@dataclass
class TrainConfig:
    """One LoRA training run: shared by expert trajectories and fine-tuning."""

    epochs: int = f(3, "Passes over the data.")
    max_steps: int | None = f(None, "Stop after this many optimizer steps (overrides epochs when set).")
    batch_size: int = f(16, "Global batch size (examples per optimizer step).")
    micro_batch_size: int | None = f(
        None, "Examples per forward pass; None = batch_size (gradient accumulation fills the rest)."
    )
    optimizer: Literal["adamw", "sgd"] = f("adamw", "Optimizer of the LoRA parameters.")
    lr: float = f(2e-4, "Peak learning rate.")
    weight_decay: float = f(0.0, "Decoupled weight decay (AdamW) or L2 (SGD).")
    lr_schedule: Literal["linear", "cosine", "constant"] = f("linear", "Decay after warmup.")
    warmup_ratio: float = f(0.03, "Fraction of steps with linear warmup.")
    max_grad_norm: float | None = f(1.0, "Gradient clipping norm; None disables clipping.")
    checkpoint_every: int | None = f(
        None, "Also write a resumable checkpoint every K optimizer steps (one is always written at each epoch end)."
    )

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "epochs", "must be at least 1")
        _check(self.max_steps is None or self.max_steps > 0, "max_steps", "must be positive")
        _check(self.batch_size > 0, "batch_size", "must be positive")
        _check(
            self.micro_batch_size is None
            or (0 < self.micro_batch_size <= self.batch_size and self.batch_size % self.micro_batch_size == 0),
            "micro_batch_size",
            "must divide batch_size",
        )
        _check(self.lr > 0, "lr", "must be positive")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be positive or null")
        _check(self.checkpoint_every is None or self.checkpoint_every > 0, "checkpoint_every", "must be positive")


@dataclass
class Bm25Config:
    """select.method=bm25: rank D_full by BM25 relevance to the target examples (docs/SELECT.md)."""

    k1: float = f(1.5, "BM25 term-frequency saturation k1.")
    b: float = f(0.75, "BM25 length normalisation b (0 = none, 1 = full).")
    aggregate: Literal["max", "mean"] = f(
        "max", "How an example's scores over all target queries combine: max (best match) or mean."
    )

    def __post_init__(self) -> None:
        _check(self.k1 >= 0, "k1", "must be >= 0")
        _check(0.0 <= self.b <= 1.0, "b", "must be in [0, 1]")


@dataclass
class DsirConfig:
    """select.method=dsir: importance resampling with hashed n-gram features (Xie et al. 2023; docs/SELECT.md)."""

    num_buckets: int = f(10000, "Hash buckets of the n-gram features.")
    ngrams: int = f(2, "Largest n-gram order: 1 = unigrams, 2 = unigrams + bigrams, ...")
    smoothing: float = f(1.0, "Pseudo-count added to every bucket of both bag-of-n-gram models (1 = add-one).")
    gumbel: bool = f(
        True, "True: sample without replacement by importance weight (Gumbel top-k, seeded by run.seed); False: top-k."
    )

    def __post_init__(self) -> None:
        _check(self.num_buckets >= 2, "num_buckets", "must be at least 2")
        _check(self.ngrams >= 1, "ngrams", "must be at least 1")
        _check(self.smoothing > 0, "smoothing", "must be positive")


@dataclass
class LessConfig:
    """select.method=less: warm-up LoRA, Adam-preconditioned gradient features, matching (Xia et al. 2024)."""

    warmup_fraction: float = f(
        0.05, "Fraction of D_full the warm-up LoRA trains on: a seeded random sample, at least one batch."
    )
    warmup: TrainConfig = f(
        TrainConfig(epochs=4, batch_size=16, optimizer="adamw", lr=2e-5, lr_schedule="linear", warmup_ratio=0.03),
        "Warm-up training (the paper's: 4 epochs, AdamW, lr 2e-5, linear decay, 3% warmup); features are taken "
        "at the end of every epoch.",
    )
    proj_dim: int = f(8192, "Dimension of the random projection of the LoRA gradients.")
    proj_seed: int = f(0, "Seed of the random projection (the same in every process).")
    projection: Literal["sparse", "gaussian"] = f(
        "sparse",
        "sparse: a sparse Johnson-Lindenstrauss transform (proj_nnz +-1 entries per gradient coordinate; fast); "
        "gaussian: dense N(0, 1/proj_dim) entries generated block by block (slow on CPU: ~50 s per shard for "
        "SmolLM2-135M).",
    )
    proj_nnz: int = f(4, "Nonzeros per gradient coordinate of the sparse projection.")
    grad_batch_size: int = f(8, "Examples per batched forward/backward when computing per-example gradients.")
    shard_size: int = f(
        256,
        "Examples per feature shard: their gradients are projected together, so the random projection is "
        "generated once per shard (memory: shard_size x LoRA parameters floats, 0.5 GB for SmolLM2-135M "
        "r=8 q/v); a shard is the unit of resumption and of the split between processes.",
    )
    feature_dtype: Literal["float16", "float32"] = f("float16", "dtype of the stored projected features.")

    def __post_init__(self) -> None:
        _check(0.0 < self.warmup_fraction <= 1.0, "warmup_fraction", "must be in (0, 1]")
        _check(self.warmup.optimizer == "adamw", "warmup.optimizer", "LESS preconditions with Adam: must be adamw")
        _check(self.warmup.max_steps is None, "warmup.max_steps", "features are taken at epoch ends: use epochs")
        for name in ("proj_dim", "grad_batch_size", "shard_size", "proj_nnz"):
            _check(getattr(self, name) > 0, name, "must be positive")
        _check(self.proj_seed >= 0, "proj_seed", "must be >= 0")


@dataclass
class SelectConfig:
    """Step 0: choose D_sel from D_full."""

    method: Literal["random", "bm25", "dsir", "less"] = f("random", "Selection method.")
    budget: float = f(0.05, "Fraction of D_full (< 1) or number of examples (>= 1) to select.")
    target: str | None = f(
        None,
        "Target examples of bm25/dsir/less: a benchmark (arc_easy, arc_challenge, mmlu, a .jsonl of "
        "{question, choices, answer}, a hub id owner/name[:config]) or instruction data (any data.sources path).",
    )
    target_split: str = f("train", "Split of a benchmark target (MMLU has dev and val locally, no train).")
    target_max_examples: int | None = f(None, "Use a seeded sample of at most this many target examples.")
    bm25: Bm25Config = f(Bm25Config(), "BM25 settings.")
    dsir: DsirConfig = f(DsirConfig(), "DSIR settings.")
    less: LessConfig = f(LessConfig(), "LESS settings.")

    def __post_init__(self) -> None:
        _check(self.budget > 0, "budget", "must be positive (a fraction < 1 or a count >= 1)")
        _check(self.budget < 1 or float(self.budget).is_integer(), "budget", "a count must be a whole number")
        _check(self.target is None or bool(self.target.strip()), "target", "must name a data set or be null")
        _check(bool(self.target_split.strip()), "target_split", "must not be empty")
        _check(
            self.target_max_examples is None or self.target_max_examples > 0, "target_max_examples", "must be positive"
        )


@dataclass
class ExpertsConfig:
    """Step 1: expert LoRA trajectories on D_full."""

    num_experts: int = f(3, "Number of expert runs (different seeds / data orders).")
    train: TrainConfig = f(
        TrainConfig(epochs=3, batch_size=16, optimizer="sgd", lr=0.1, warmup_ratio=0.0, lr_schedule="constant"),
        "Training of each expert: plain SGD at a constant lr like the student (MTT's experts); lr 0.1, not 1: the "
        "prompts learn several times more on held-out draws (docs/DISTILL.md, docs/TRAINING.md).",
    )
    save_every_steps: int | None = f(
        None, "Also snapshot every K optimizer steps (snapshots are always taken at each epoch end)."
    )

    def __post_init__(self) -> None:
        _check(self.num_experts > 0, "num_experts", "must be at least 1")
        _check(self.save_every_steps is None or self.save_every_steps > 0, "save_every_steps", "must be positive")


@dataclass
class FinetuneConfig:
    """Step 3: instruction-tune on a data set (FULL, selected, or distilled)."""

    dataset: Literal["full", "selected", "distilled"] = f(
        "full", "Which data set to tune on: full = D_full, selected = D_sel, distilled = D_sel + learned prompts."
    )
    ids_file: str | None = f(
        None,
        "For dataset=selected: a file of example ids (one per line, or a JSON list); default: the run's selection.",
    )
    model: str | None = f(
        None, "Spec of the model to tune; None = model.spec. Another model receives distilled prompts as text."
    )
    prompt_mode: Literal["auto", "embeddings", "text"] = f(
        "auto",
        "dataset=distilled: embeddings (the distilling model takes the prompt vectors), text (nearest tokens, "
        "decoded and re-tokenized; any model), auto = embeddings when the tuned model is the distilling model.",
    )
    prompts: Literal["learned", "initial"] = f(
        "learned",
        "dataset=distilled: learned (the distilled prompts) or initial (the initial prompts' nearest tokens, "
        "nothing learned: the control that separates what distillation learned from what prepending k tokens "
        "does; nacd run's variant sel_init).",
    )
    prompt_dropout: float = f(
        0.0,
        "dataset=distilled: the fraction of batches tuned without their prompts (plain input, as the tuned "
        "model is used): without the prompt vectors on the distilling model, without the prompt text on a "
        "receiving one; chosen by a hash of the seed and the batch's example ids. nacd run applies it to "
        "sel_nacd and sel_init on every model.",
    )
    name: str | None = f(None, "Variant folder name under finetune/ (default: the dataset name).")
    seed: int | None = f(None, "Seed of the tuned run (data order, LoRA init); None = run.seed.")
    train: TrainConfig = f(
        TrainConfig(epochs=3, batch_size=8, optimizer="adamw", lr=2e-4), "Training of the tuned model."
    )
    recipe: Literal["own", "student"] = f(
        "own",
        "own: finetune.train as written. student: tune as the distillation's student stepped (SGD without "
        "momentum at the distilled set's alpha, distill.batch_size, the student's clip, constant lr, no warmup, "
        "no weight decay; finetune.train's epochs, max_steps and micro-batch kept): every variant alike, so it "
        "needs the run's distilled set (docs/experiments/2026-12-04-testbed-candidates.md, section 7).",
    )
    soft_labels: bool = f(
        False,
        "Tune toward an expert's token distributions on the responses instead of the one-hot targets (the "
        "distilling model only; the expert run 0 snapshot of soft_labels_epoch; nacd run's variants sel_soft, "
        "and sel_nacd_soft on the distilled set, whose prompt vectors the teacher does not see).",
    )
    soft_labels_epoch: int | None = f(None, "Expert epoch whose snapshot gives the soft labels; None = the last.")
    soft_labels_topk: int = f(32, "Soft labels keep the teacher's top-k tokens per response position (renormalised).")

    def __post_init__(self) -> None:
        _check(self.soft_labels_topk >= 1, "soft_labels_topk", "must be at least 1")
        _check(self.prompts == "learned" or self.dataset == "distilled", "prompts",
               "applies to dataset=distilled only")  # fmt: skip
        _check(0.0 <= self.prompt_dropout < 1.0, "prompt_dropout", "must be in [0, 1)")


@dataclass
class EvalConfig:
    """Step 4: multiple-choice benchmarks (docs/EVAL.md)."""

    benchmarks: list[str] = f(
        ["arc_easy"],
        "Benchmarks: arc_easy, arc_challenge, mmlu, a .jsonl of {question, choices, answer}, a folder of "
        "<split>.jsonl files or of MMLU CSVs, or a hub dataset id (owner/name or owner/name:config).",
    )
    split: str = f("validation", "Split to evaluate (validation = MMLU's val); tune on validation, never on test.")
    num_fewshot: int | None = f(
        None,
        "Few-shot examples per question; None = the benchmark's protocol default (0 for ARC and JSONL, 5 for MMLU).",
    )
    protocol: Literal["auto", "text", "letter"] = f(
        "auto",
        "text: log-likelihood of each answer text (acc, acc_norm); letter: of the answer letters ' A', ' B', ... "
        "after listing the choices; auto: letter for MMLU, text otherwise.",
    )
    format: Literal["plain", "chat"] = f(
        "plain",
        "plain: lm-eval's prompts as they are; chat: each prompt (its trailing 'Answer:' removed) is the user turn, "
        "rendered as training renders it (data.template), and the answer continues the assistant turn.",
    )
    batch_size: int = f(16, "Questions per forward pass.")
    limit: int | None = f(
        None, "Evaluate the first N questions of each benchmark (of each subject for MMLU, like lm-eval's --limit)."
    )
    limits: dict[str, int] = f(
        {}, "Per-benchmark limits by benchmark name (e.g. {mmlu: 5}), overriding `limit` for that benchmark."
    )
    adapter: str | None = f(
        None, "peft adapter folder (with adapter_config.json) applied to model.spec; None evaluates the model as is."
    )
    name: str | None = f(
        None,
        "Output folder eval/<name>/; default: the adapter's variant (finetune/<variant>/adapter) or the model name.",
    )

    def __post_init__(self) -> None:
        _check(len(self.benchmarks) > 0, "benchmarks", "needs at least one benchmark")
        _check(all(b.strip() for b in self.benchmarks), "benchmarks", "must not contain an empty name")
        _check(len(set(self.benchmarks)) == len(self.benchmarks), "benchmarks", "lists a benchmark twice")
        _check(bool(self.split.strip()), "split", "must not be empty")
        _check(self.num_fewshot is None or self.num_fewshot >= 0, "num_fewshot", "must be >= 0 or null")
        _check(self.batch_size > 0, "batch_size", "must be positive")
        _check(self.limit is None or self.limit > 0, "limit", "must be positive or null")
        _check(all(v > 0 for v in self.limits.values()), "limits", "every limit must be positive")
        _check(self.adapter is None or bool(self.adapter.strip()), "adapter", "must be a folder or null")
        _check(self.name is None or _is_subfolder(self.name), "name", "must be a relative folder name without '..'")


def _is_subfolder(name: str) -> bool:
    """A relative folder path such as ``full`` or ``smollm2-135m/sel/seed0`` (no ``..``, not absolute)."""
    parts = name.split("/")
    return not name.startswith(("/", "\\")) and all(p.strip() and p not in (".", "..") for p in parts)


#: The protocol's variants (paper Table 1 rows): no tuning, D_full, D_sel, D_sel + distilled prompts; and two
#: controls: D_sel toward the expert's soft labels, D_sel with the initial (unlearned) prompt tokens; and the
#: distilled set toward the expert's soft labels (the two together).
VARIANTS = ("baseline", "full", "sel", "sel_soft", "sel_init", "sel_nacd", "sel_nacd_soft")


@dataclass
class CompareConfig:
    """``nacd run``: which variants, models and seeds the comparison table holds (docs/PIPELINE.md)."""

    variants: list[str] = f(
        [v for v in VARIANTS if v not in ("sel_init", "sel_nacd_soft")],
        "Rows of the table: baseline (no tuning), full (D_full), sel (D_sel), sel_nacd (D_sel + distilled prompts); "
        "also sel_soft (D_sel toward the expert's soft labels, distilling model only) and sel_init (D_sel with "
        "the initial prompt tokens, nothing learned: what prepending k tokens does without distillation) and "
        "sel_nacd_soft (the distilled set toward the expert's soft labels, distilling model only).",
    )
    receivers: list[str] = f(
        [],
        "Receiving models (specs) tuned on the same data besides model.spec; distilled prompts reach them as text.",
    )
    seeds: list[int] = f([0], "Seeds of every tuned variant (data order, LoRA init); the table shows mean and std.")
    full_seeds: list[int] | None = f(None, "Seeds of the FULL variant, the costliest to tune; None = compare.seeds.")
    metric: Literal["acc", "acc_norm"] = f("acc", "Metric of the table and of the bootstrap.")
    bootstrap_samples: int = f(2000, "Paired bootstrap resamples (questions x seeds) for SEL+NACD vs SEL.")
    confidence: float = f(0.95, "Confidence level of the bootstrap interval.")
    sizes: list[float] = f(
        [],
        "SEL at other sizes, as multiples of select.budget (e.g. [0.5, 2, 4]): each is a variant sel_<m>x tuned "
        "like SEL on the first m x budget examples of the selection's ranking; with FULL they make the curve that "
        "gives SEL+NACD's effective data size (docs/PIPELINE.md).",
    )
    size_methods: list[Literal["select", "random"]] = f(
        ["select"],
        "Rankings the sizes are drawn from: select (select.method's) and random (variants random_<m>x, 1x included).",
    )
    size_models: Literal["all", "distilling"] = f(
        "all", "Models tuned at the other sizes: all (the distilling model and every receiver) or distilling."
    )

    def __post_init__(self) -> None:
        _check(all(m > 0 for m in self.sizes) and len(set(self.sizes)) == len(self.sizes), "sizes",
               "must be positive multiples of select.budget, no repeats")  # fmt: skip
        _check(1 not in self.sizes, "sizes", "1 is SEL itself (the variant sel); list the other multiples")
        _check(
            len(set(self.size_methods)) == len(self.size_methods) > 0, "size_methods", "must be non-empty, no repeats"
        )
        unknown = [v for v in self.variants if v not in VARIANTS]
        _check(not unknown, "variants", f"unknown {unknown}; choose from {list(VARIANTS)}")
        _check(len(set(self.variants)) == len(self.variants) > 0, "variants", "must be non-empty, no repeats")
        _check(len(set(self.seeds)) == len(self.seeds) > 0, "seeds", "must be non-empty, no repeats")
        _check(self.full_seeds is None or len(set(self.full_seeds)) == len(self.full_seeds) > 0, "full_seeds",
               "must be non-empty, no repeats (or null)")  # fmt: skip
        _check(len(set(self.receivers)) == len(self.receivers), "receivers", "lists a model twice")
        _check(self.bootstrap_samples >= 100, "bootstrap_samples", "must be >= 100")
        _check(0.5 < self.confidence < 1, "confidence", "must be in (0.5, 1)")


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    run: RunConfig = f(RunConfig(), "Run folder, seed, device.")
    model: ModelConfig = f(ModelConfig(), "The distilling model.")
    lora: LoraConfig = f(LoraConfig(), "LoRA adapter of every training stage.")
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "D_full and tokenization."})
    select: SelectConfig = f(SelectConfig(), "Selection of D_sel.")
    experts: ExpertsConfig = field(default_factory=ExpertsConfig, metadata={"doc": "Expert trajectories."})
    distill: DistillConfig = f(DistillConfig(), "Trajectory-matching distillation.")
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={"doc": "Tuning on a data set."})
    eval: EvalConfig = f(EvalConfig(), "Evaluation.")
    compare: CompareConfig = f(CompareConfig(), "nacd run: variants, receiving models, seeds, statistics.")
    schema_version: int = f(SCHEMA_VERSION, "Config schema version.")

    def __post_init__(self) -> None:
        _check(self.schema_version == SCHEMA_VERSION, "schema_version", f"this nacd reads schema {SCHEMA_VERSION}")


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, checked at once."""
    tree = to_dict(Config())
    if path is not None:
        try:
            tree = deep_merge(tree, load_yaml(path))
        except ConfigError:
            raise
    given: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
        given[key] = text
    try:
        return build(Config, tree)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{_origin(str(exc), given, path)}") from None


def _origin(message: str, given: dict[str, str], path: str | Path | None) -> str:
    """Where the bad key of ``message`` was set: a command-line override (named) or the config file."""
    match = re.search(r"config key '([^']+)'", message)
    bad = match.group(1) if match else None
    for key, text in given.items():
        if bad is not None and (bad == key or bad.startswith(key + ".") or key.startswith(bad + ".")):
            return f" (from the command-line override {text!r})"
    return f" (in {path})" if path else ""
