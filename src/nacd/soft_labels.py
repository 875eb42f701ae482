"""SEL with the expert's soft labels: the baseline a reviewer of dataset distillation asks for first.

"A Label is Worth a Thousand Images" (Qin et al.) finds that much of what dataset distillation gains
comes from the teacher's soft labels, not from the learned inputs. Here the student is tuned on D_sel
toward an expert model's token distributions on the responses instead of the one-hot targets: the
expert is the distilling model with the LoRA parameters of an expert snapshot (``experts/run_000``, the
epoch ``finetune.soft_labels_epoch``, default its last), the same trajectory distillation matches.

The teacher's distributions are computed once, before tuning, and kept sparse: at every response
position the ``finetune.soft_labels_topk`` most likely tokens and their probabilities, renormalised
(top-k soft labels, as large-vocabulary distillation stores them). The loss is the soft cross-entropy
``-sum_k p_k log q(token_k)`` summed over response positions, the same count of loss tokens as the
hard loss, so the training loop and its learning rate are unchanged. Only the distilling model can
take them (a receiver's tokenizer has other tokens); ``nacd run`` has the variant ``sel_soft``.

On the distilled set (``sel_nacd_soft``: the learned prompts and the soft labels together) the teacher
reads each example as a user would write it, without prompt vectors, and the student is tuned on the
prompted input toward those distributions: the k prompt positions carry no loss, so the student's loss
positions are the teacher's, in the same order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from nacd.errors import NacdError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SoftExample:
    """A tokenized example with the teacher's top-k tokens and probabilities at its response positions."""

    example: Any
    tokens: Any  # (n loss positions, k) long
    probs: Any  # (n loss positions, k) float32, rows summing to 1

    @property
    def labels(self) -> list[int]:
        return self.example.labels


def teacher_state(
    run_dir: Any, epoch: int | None, key: str = "finetune.soft_labels"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The LoRA parameters of expert run 0 at ``epoch`` (None: its last) and what they are; errors name ``key``."""
    from nacd.experts import ExpertStore

    store = ExpertStore(run_dir.experts_dir)
    if not store.runs:
        raise NacdError(f"{key}: no complete expert run in {run_dir.experts_dir}; run `nacd experts` first")
    run = store.runs[0]
    epochs = store.epochs(run)
    chosen = epochs[-1] if epoch is None else epoch
    if chosen not in epochs or chosen == 0:
        raise NacdError(
            f"{key}_epoch={epoch}: expert run {run} has snapshots after epochs {epochs[1:]}; "
            "choose one of them (or null for the last)"
        )
    manifest = store.manifest(run)
    return store.snapshot(run, chosen), {"run": run, "epoch": chosen, "seed": manifest.get("seed")}


def teacher_targets(model: Any, data: list[Any], pad_token_id: int, topk: int, batch_size: int) -> list[SoftExample]:
    """Top-``topk`` teacher distributions at every loss position of ``data`` (the model as it is: the
    caller has loaded the teacher's LoRA parameters), in float32 on the CPU."""
    import torch

    from nacd.chat import IGNORE_INDEX, collate
    from nacd.train import model_inputs

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[SoftExample] = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            items = data[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(items, pad_token_id).items()}
            logits = model(**model_inputs(batch)).logits[:, :-1].float()
            mask = batch["labels"][:, 1:] != IGNORE_INDEX
            for row, item in enumerate(items):
                probs = torch.softmax(logits[row][mask[row]], dim=-1)
                top = probs.topk(min(topk, probs.shape[-1]), dim=-1)
                kept = top.values / top.values.sum(-1, keepdim=True)
                out.append(SoftExample(item, top.indices.cpu(), kept.cpu()))
    model.train(was_training)
    return out


def soft_cross_entropy(logits: Any, tokens: Any, probs: Any) -> Any:
    """``-sum_positions sum_k p_k log softmax(logits)[token_k]``: the soft cross-entropy summed over the loss
    positions (rows of ``logits``, float32) toward their top-k ``tokens`` with probabilities ``probs``."""
    import torch

    logq = torch.log_softmax(logits, dim=-1).gather(-1, tokens.to(logits.device))
    return -(probs.to(logits.device) * logq).sum()


def collate_soft(items: list[SoftExample], pad_token_id: int, inner: Any = None) -> dict[str, Any]:
    """A padded batch of soft examples with the teacher's targets; ``inner(examples, pad_token_id)`` collates
    the examples they wrap (default: plain token ids, :func:`nacd.chat.collate`)."""
    import torch

    from nacd.chat import collate

    return {
        **(inner or collate)([it.example for it in items], pad_token_id),
        "soft_tokens": torch.cat([it.tokens for it in items]),
        "soft_probs": torch.cat([it.probs for it in items]),
    }


class SoftLabelForward:
    """The training loop's forward for :class:`SoftExample` batches: soft cross-entropy at the loss positions.

    ``prompted``: the distilled set's :class:`nacd.finetune.PromptedForward`, whose examples (prompt
    vectors and text) the soft examples wrap; it collates them and inserts the prompts."""

    def __init__(self, pad_token_id: int, prompted: Any = None):
        self.pad = pad_token_id
        self.prompted = prompted

    def collate(self, items: list[SoftExample]) -> dict[str, Any]:
        return collate_soft(items, self.pad, self.prompted.collate if self.prompted is not None else None)

    def __call__(self, model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        from nacd.train import loss_logits

        inputs = self.prompted.inputs(batch) if self.prompted is not None else batch
        logits, targets = loss_logits(model, inputs)
        return soft_cross_entropy(logits, batch["soft_tokens"], batch["soft_probs"]), int(targets.numel())

    def close(self) -> None:
        """Close the prompted forward it collates with (the fine-tuning stage closes the forward it holds)."""
        if self.prompted is not None:
            self.prompted.close()


def soft_dataset(
    config: Any, run_dir: Any, setup: Any, prompted: tuple[list[Any], Any] | None = None
) -> tuple[list[SoftExample], SoftLabelForward, dict[str, Any]]:
    """The tuning set with the teacher's soft labels, its forward, and the identity of the teacher.

    ``prompted``: (the distilled set's prompted examples, in ``setup.data``'s order, and their forward);
    the teacher still reads ``setup.data``, the plain text. Loads the expert snapshot into the model's
    LoRA parameters, computes the targets; the caller re-initialises the LoRA parameters for the student
    afterwards."""
    from nacd.lora import load_lora_state

    fc = config.finetune
    state, teacher = teacher_state(run_dir, fc.soft_labels_epoch)
    load_lora_state(setup.model, state)
    log.info(
        "soft labels: expert run %d, epoch %d, top %d tokens", teacher["run"], teacher["epoch"], fc.soft_labels_topk
    )
    data = teacher_targets(setup.model, setup.data, setup.tokenizer.pad_token_id, fc.soft_labels_topk, 8)
    forward = SoftLabelForward(setup.tokenizer.pad_token_id)
    if prompted is not None:
        items, prompted_forward = prompted
        data = [SoftExample(item, soft.tokens, soft.probs) for item, soft in zip(items, data, strict=True)]
        forward = SoftLabelForward(setup.tokenizer.pad_token_id, prompted_forward)
    return data, forward, {**teacher, "topk": fc.soft_labels_topk}
