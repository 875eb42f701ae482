"""The one LoRA training loop.

Expert trajectories (``nacd experts``), the FULL / selected-data baselines and
tuning on distilled data (``nacd finetune``) are all this loop with different
data and callbacks; only the differentiable unroll of distillation is separate.

Design points:

- **Exact global batches.** Each optimizer step takes one global batch of
  ``batch_size`` example indices from a seeded per-epoch permutation. With
  several processes (``accelerate launch`` / ``torchrun``, DDP through
  accelerate) the batch is split across ranks and each rank accumulates over
  micro-batches; the loss is the sum of token losses divided by the number of
  loss tokens in the *global* batch, so one process and N processes compute the
  same gradient up to summation order.
- **Resumable, bitwise.** A checkpoint (LoRA tensors, optimizer state, RNG
  state, position in the data) is written atomically whenever a callback asks
  for one (:mod:`nacd.lora`); rerunning continues from it and gives the same
  numbers as an uninterrupted run on CPU.
- **Small pure pieces.** :func:`lr_factor`, :func:`epoch_order`,
  :func:`global_batches` and :func:`token_loss_sum` are plain functions that
  tests check by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacd.artifacts import recover_dir, trim_jsonl
from nacd.chat import IGNORE_INDEX
from nacd.errors import TrainingError
from nacd.lora import TrainState, add_lora, load_checkpoint, lora_parameters, save_checkpoint, unwrap
from nacd.progress import bar as progress_bar
from nacd.ranks import release_at_exit

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pure pieces


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, then decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def global_batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive global batches; the last one may be smaller."""
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def token_loss_sum(logits: Any, labels: Any) -> tuple[Any, int]:
    """Sum of next-token cross-entropies over positions whose label is not -100, and their count.

    ``logits[:, t]`` predicts ``labels[:, t + 1]`` (labels are the input ids with masked positions),
    computed in float32 whatever the model dtype.
    """
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum())


def loss_tokens(example: Any) -> int:
    """How many positions of an example carry loss (labels shifted by one, as in token_loss_sum)."""
    return sum(1 for lab in example.labels[1:] if lab != IGNORE_INDEX)


# --------------------------------------------------------------------------- the loop


class Callback:
    """Hooks of :func:`train_lora`. Return True from a hook to ask for a checkpoint now."""

    def on_train_start(self, loop: TrainLoop) -> bool | None:
        return None

    def on_step_end(self, loop: TrainLoop) -> bool | None:
        return None

    def on_epoch_end(self, loop: TrainLoop) -> bool | None:
        return None


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of a causal-LM forward for a batch of token ids or of input embeddings."""
    key = "inputs_embeds" if "inputs_embeds" in batch else "input_ids"
    return {key: batch[key], "attention_mask": batch["attention_mask"], "use_cache": False}


def default_forward(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Causal-LM forward returning (sum of token losses, loss tokens), from the full logits.

    ``model`` is any callable with a causal LM's keyword arguments (a model, or a
    ``functional_call`` closure); ``batch`` holds ``input_ids`` or ``inputs_embeds``,
    ``attention_mask`` and ``labels``.
    """
    return token_loss_sum(model(**model_inputs(batch)).logits, batch["labels"])


def causal_lm(model: Any) -> Any:
    """The Hugging Face causal LM inside DDP and peft wrappers."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SparseLogitsForward:
    """Causal-LM loss that computes logits only where a label carries loss.

    The output head (``lm_head``; 49k x 576 in SmolLM2, 262k x 640 in Gemma3) is the
    largest single matmul of a small model, and responses are often under half of
    the tokens. This forward swaps the head for an identity, so the model's own
    forward (through DDP, if wrapped) returns the last hidden states, then applies the
    real head (and Gemma's final logit soft-capping) to the loss positions only.
    :meth:`install` checks on a real batch that the loss equals the full-logits loss
    and otherwise leaves the model untouched (architectures that scale logits in
    their forward), so the result is always the exact loss.
    """

    def __init__(self) -> None:
        self.head: Any = None
        self.head_name: str | None = None
        self.owner: Any = None
        self.softcap: float | None = None

    def install(self, model: Any, batch: dict[str, Any]) -> bool:
        import torch

        inner = causal_lm(model)
        head = inner.get_output_embeddings()
        name = next((n for n, m in inner.named_children() if m is head), None)
        if head is None or name is None:
            return False
        batch = {k: v.to(_model_device(inner)) for k, v in batch.items()}  # the check batch follows the model
        with torch.no_grad():
            reference, _ = default_forward(inner, batch)
            self.head, self.head_name, self.owner = head, name, inner
            self.softcap = getattr(inner.config, "final_logit_softcapping", None)
            setattr(inner, name, torch.nn.Identity())
            if self.softcap is not None:
                inner.config.final_logit_softcapping = None
            sparse, _ = self(inner, batch)
        if not torch.allclose(sparse.double(), reference.double(), rtol=1e-4, atol=1e-4):
            log.info(
                "%s: logits-at-loss-positions path disagrees with the full logits; using the full logits",
                type(inner).__name__,
            )
            self.remove()
            return False
        return True

    def remove(self) -> None:
        if self.owner is not None:
            setattr(self.owner, self.head_name, self.head)
            if self.softcap is not None:
                self.owner.config.final_logit_softcapping = self.softcap
            self.owner = None

    def loss_logits(self, model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
        """(float32 logits at the loss positions, their labels), in the batch's row-major order."""
        import torch

        hidden = model(**model_inputs(batch)).logits  # the last hidden states: the head is an identity now
        shift = batch["labels"][:, 1:]
        mask = shift != IGNORE_INDEX
        logits = self.head(hidden[:, :-1][mask]).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits, shift[mask]

    def __call__(self, model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        import torch.nn.functional as F

        logits, targets = self.loss_logits(model, batch)
        return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def loss_logits(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """(float32 logits at the loss positions, their labels) from the full logits (:meth:`SparseLogitsForward.
    loss_logits` computes the same from the hidden states at those positions only)."""
    shift = batch["labels"][:, 1:]
    mask = shift != IGNORE_INDEX
    return model(**model_inputs(batch)).logits[:, :-1][mask].float(), shift[mask]


@dataclass
class TrainLoop:
    """One LoRA training run. Build it, then call :meth:`run` (see :func:`train_lora`)."""

    model: Any  # a peft model (see add_lora)
    dataset: Sequence[Any]  # examples with .labels (TokenizedExample or compatible)
    cfg: Any  # TrainConfig
    collate: Callable[[list[Any]], dict[str, Any]]
    seed: int = 0
    callbacks: Sequence[Callback] = ()
    checkpoint_dir: Path | None = None  # where checkpoints go; resumed from when present
    metrics: Any = None  # MetricsWriter or None
    #: (model, batch) -> (sum of token losses, loss tokens); None = SparseLogitsForward when it is exact
    forward: Callable[[Any, dict[str, Any]], tuple[Any, int]] | None = None
    accelerator: Any = None
    desc: str = "train"
    progress: bool = True
    state: TrainState = field(default_factory=TrainState)

    # ------------------------------------------------------------------ setup
    def __post_init__(self) -> None:
        from accelerate import Accelerator

        if self.accelerator is None:  # the processes' backend follows the model: gloo for a model on the CPU
            self.accelerator = Accelerator(cpu=_model_device(self.model).type != "cuda")
            release_at_exit()
        if self.accelerator.num_processes > 1:
            self.model = self.accelerator.prepare_model(self.model)  # DDP over the LoRA parameters
        n = len(self.dataset)
        if n == 0:
            raise TrainingError("the training set is empty")
        world = self.accelerator.num_processes
        if n < self.cfg.batch_size:
            raise TrainingError(
                f"the training set has {n} examples, fewer than one batch (batch_size={self.cfg.batch_size}); "
                "lower the batch size or add data"
            )
        if self.cfg.batch_size < world:
            raise TrainingError(f"batch_size={self.cfg.batch_size} is smaller than the number of processes ({world})")
        self.steps_per_epoch = math.ceil(n / self.cfg.batch_size)
        planned = self.steps_per_epoch * self.cfg.epochs
        self.total_steps = min(planned, self.cfg.max_steps) if self.cfg.max_steps else planned
        self.warmup_steps = int(self.cfg.warmup_ratio * self.total_steps)
        self.micro = self.cfg.micro_batch_size or self.cfg.batch_size
        self.params = list(lora_parameters(self.model).values())
        if not self.params:
            raise TrainingError("the model has no trainable (LoRA) parameters; call add_lora first")
        self.device = self.params[0].device  # batches go where the model is
        self.optimizer = _make_optimizer(self.params, self.cfg)
        self.scaler = None
        if self.params[0].device.type == "cuda" and _base_dtype(self.model) == "float16":
            import torch

            self.scaler = torch.amp.GradScaler("cuda")
        self._tokens_per_example = [loss_tokens(ex) for ex in self.dataset]
        if sum(self._tokens_per_example) == 0:
            raise TrainingError("no example of the training set carries loss tokens")

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps

    # ------------------------------------------------------------------ one step
    def _local_share(self, batch: list[int]) -> list[int]:
        acc = self.accelerator
        return batch[acc.process_index :: acc.num_processes]

    def _step(self, batch: list[int]) -> tuple[float, int, float]:
        import torch

        acc = self.accelerator
        n_global = sum(self._tokens_per_example[i] for i in batch)
        local = self._local_share(batch)
        weight_zero = False
        if not local:  # this rank got nothing: join the gradient sync with a zero-weight pass
            local, weight_zero = batch[:1], True
        micro_batches = [local[i : i + self.micro] for i in range(0, len(local), self.micro)]
        lr = self.cfg.lr * lr_factor(self.state.step, self.total_steps, self.warmup_steps, self.cfg.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_total = torch.zeros((), dtype=torch.float64)
        for j, idx in enumerate(micro_batches):
            batch_tensors = {k: v.to(self.device) for k, v in self.collate([self.dataset[i] for i in idx]).items()}
            last = j == len(micro_batches) - 1
            ctx = acc.no_sync(self.model) if not last else contextlib.nullcontext()
            with ctx:
                loss_sum, _ = self.forward(self.model, batch_tensors)
                scale = 0.0 if weight_zero else acc.num_processes / max(1, n_global)
                loss = loss_sum * scale
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            if not weight_zero:
                loss_total += loss_sum.detach().double().cpu()
        # mean token loss over the global batch, identical on every rank
        loss_total = (
            acc.reduce(loss_total.to(self.device), reduction="sum").cpu() if acc.num_processes > 1 else loss_total
        )
        mean_loss = float(loss_total) / max(1, n_global)
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"{self.desc}: non-finite loss ({mean_loss}) at optimizer step {self.state.step + 1} "
                f"(epoch {self.state.epoch + 1}); the last good snapshot/checkpoint is kept. Lower the lr?"
            )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))  # the norm before clipping
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, n_global, grad_norm

    # ------------------------------------------------------------------ run
    def _fire(self, hook: str) -> None:
        want = False
        for cb in self.callbacks:
            want = bool(getattr(cb, hook)(self)) or want
        if want:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        if self.checkpoint_dir is not None and self.is_main:
            save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.state, {"desc": self.desc})
        self.accelerator.wait_for_everyone()

    def maybe_resume(self) -> bool:
        """Load the checkpoint in ``checkpoint_dir`` if there is one (checkpoints are folders renamed
        into place whole, so one with a missing or damaged part is refused, not skipped)."""
        if self.checkpoint_dir is None or not recover_dir(self.checkpoint_dir).is_dir():
            return False
        self.state, _ = load_checkpoint(self.checkpoint_dir, self.model, self.optimizer)
        log.info(
            "%s: resumed from %s at step %d (epoch %d)",
            self.desc,
            self.checkpoint_dir,
            self.state.step,
            self.state.epoch,
        )
        return True

    def run(self) -> TrainState:

        resumed = self.maybe_resume()
        if self.metrics is not None and self.is_main:  # rows past the checkpoint are redone: drop them
            trim_jsonl(self.metrics.path, self.state.step, key="step")
        sparse = None
        if self.forward is None:
            sparse = SparseLogitsForward()
            first = [self.dataset[i] for i in range(min(2, len(self.dataset)))]
            probe = {k: v.to(self.device) for k, v in self.collate(first).items()}
            self.forward = sparse if sparse.install(self.model, probe) else default_forward
        self.model.train()
        if not resumed:
            self._fire("on_train_start")
        bar = progress_bar(
            total=self.total_steps,
            initial=self.state.step,
            desc=self.desc,
            disable=not (self.progress and self.is_main),
            dynamic_ncols=True,
        )
        try:
            while not self.done:
                order = epoch_order(len(self.dataset), self.seed, self.state.epoch)
                batches = global_batches(order, self.cfg.batch_size)
                while self.state.batch_in_epoch < len(batches) and not self.done:
                    start = time.perf_counter()
                    loss, n_tok, grad_norm = self._step(batches[self.state.batch_in_epoch])
                    elapsed = time.perf_counter() - start
                    st = self.state
                    st.step += 1
                    st.batch_in_epoch += 1
                    st.loss_tokens += n_tok
                    st.seconds += elapsed
                    st.last_loss = loss
                    st.window_loss_sum += loss
                    st.window_steps += 1
                    tps = n_tok / elapsed if elapsed > 0 else float("nan")
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}", refresh=False)
                    bar.update(1)
                    if self.metrics is not None and self.is_main:
                        self.metrics.write(
                            step=st.step,
                            epoch=st.epoch + st.batch_in_epoch / len(batches),
                            loss=loss,
                            lr=self.optimizer.param_groups[0]["lr"],
                            grad_norm=grad_norm,
                            loss_tokens=n_tok,
                            tokens_per_s=tps,
                            step_s=elapsed,
                        )
                    self._fire("on_step_end")
                if self.state.batch_in_epoch >= len(batches):
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                    self._fire("on_epoch_end")
        finally:
            bar.close()
            if sparse is not None:
                sparse.remove()
                self.forward = None
        self.model.eval()
        return self.state


def train_lora(model: Any, dataset: Sequence[Any], cfg: Any, *, collate: Callable, **kwargs: Any) -> TrainState:
    """Train the LoRA parameters of ``model`` on ``dataset``; see :class:`TrainLoop` for the options."""
    return TrainLoop(model=model, dataset=dataset, cfg=cfg, collate=collate, **kwargs).run()


# --------------------------------------------------------------------------- helpers


def _make_optimizer(params: list[Any], cfg: Any) -> Any:
    import torch

    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    raise TrainingError(f"unknown optimizer {cfg.optimizer!r}")


def _base_dtype(model: Any) -> str:
    for p in unwrap(model).parameters():
        if not p.requires_grad:
            return str(p.dtype).replace("torch.", "")
    return "float32"


def _model_device(model: Any) -> Any:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    import torch

    return next((p.device for p in model.parameters()), torch.device("cpu"))


# --------------------------------------------------------------------------- shared setup of the stages that train


@dataclass
class TrainingSetup:
    """A base model with a fresh LoRA adapter, its tokenizer, and the tokenized corpus."""

    model: Any
    tokenizer: Any
    data: list[Any]  # TokenizedExample
    data_hash: str
    base_fingerprint: str
    lora_targets: list[str]

    def collate(self, batch: list[Any]) -> dict[str, Any]:
        from nacd.chat import collate

        return collate(batch, self.tokenizer.pad_token_id)


def tokenized_hash(data: Sequence[Any]) -> str:
    """sha256 over the ids, token ids and labels of a tokenized corpus: exactly what training sees."""
    import hashlib

    digest = hashlib.sha256()
    for ex in data:
        digest.update(ex.id.encode())
        digest.update(json.dumps([ex.input_ids, ex.labels]).encode())
    return digest.hexdigest()


def setup_training(config: Any, examples: Sequence[Any] | None = None, model_cfg: Any = None) -> TrainingSetup:
    """Load ``model_cfg`` (default ``config.model``), tokenize the corpus (``examples`` or
    ``config.data``), add LoRA."""
    from nacd.chat import tokenize_corpus
    from nacd.data import load_corpus
    from nacd.models import load_model, model_fingerprint, resolve_device

    model, tokenizer = load_model(model_cfg or config.model, resolve_device(config.run.device))
    fingerprint = model_fingerprint(model)
    report = None
    if examples is None:
        examples, report = load_corpus(config.data)
    data = tokenize_corpus(examples, tokenizer, config.data, report)
    model = add_lora(model, config.lora)
    targets = sorted(model.peft_config["default"].target_modules)
    return TrainingSetup(model, tokenizer, data, tokenized_hash(data), fingerprint, targets)


class CheckpointEvery(Callback):
    """Ask for a checkpoint at every epoch end and every ``every`` optimizer steps."""

    def __init__(self, every: int | None):
        self.every = every

    def on_step_end(self, loop: TrainLoop) -> bool:
        return bool(self.every) and loop.state.step % self.every == 0 and not loop.done

    def on_epoch_end(self, loop: TrainLoop) -> bool:
        return True
