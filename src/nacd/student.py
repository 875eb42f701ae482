"""The student of trajectory matching: the distilling model as a function of its LoRA tensors.

:class:`Student` wraps the model, its data and the forward that the unrolls (:mod:`nacd.unrolls`)
differentiate through; the pure math it uses (prompt placement, norms, the matching loss) is in
:mod:`nacd.tm`. Importing this module imports torch, peft's helpers and the training loop's forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.func import functional_call

from nacd import tm
from nacd.chat import collate
from nacd.lora import lora_parameters
from nacd.soft_labels import SoftExample, collate_soft, soft_cross_entropy
from nacd.train import SparseLogitsForward, causal_lm, default_forward, loss_logits


class Student:
    """The distilling model as a function of its LoRA tensors: the loss of one student step.

    ``step_loss(theta, prompts, batch)`` runs the model with the LoRA parameters replaced by
    ``theta`` (``torch.func.functional_call``), on the text embeddings with the prompts inserted (``prompted_inputs``), with an
    attention mask and labels that cover the prompt positions with no loss, and returns the
    mean token loss. The frozen base never enters the unrolled state.
    """

    def __init__(self, model: Any, data: Sequence[Any], pad_token_id: int, prompt_offset: int = 0):
        self.model = model
        self.data = data
        self.pad_token_id = pad_token_id
        # steps toward the teacher's soft labels (distill.soft_labels): the data are SoftExamples
        self.soft = bool(data) and isinstance(data[0], SoftExample)
        self.prompt_offset = prompt_offset  # text tokens before the prompt vectors (``prompted_inputs``)
        params = lora_parameters(model)
        self.names = list(params)
        self.dtypes = [p.dtype for p in params.values()]  # peft keeps LoRA in float32 on a bf16 base
        embed = causal_lm(model).get_input_embeddings()
        self.embed = embed
        self.vocab = embed.weight
        self.vocab_ids: Any = None  # LongTensor of the candidate rows for prompt vectors; None = every row
        self.embed_scale = tm.embed_scale(embed)
        self.sparse = SparseLogitsForward()
        self._sparse_ready: bool | None = None  # decided on the first batch
        self.steps: list[tuple[float, float]] = []  # (loss, gradient norm) of each step of the last unroll

    @property
    def device(self) -> Any:
        return self.vocab.device

    def text_batch(self, idx: Sequence[int]) -> dict[str, Any]:
        items = [self.data[i] for i in idx]
        batch = collate_soft(items, self.pad_token_id) if self.soft else collate(items, self.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def inputs(self, prompts: Any, text: dict[str, Any]) -> dict[str, Any]:
        """The model inputs of a step: the prompts in the text at ``prompt_offset``, their positions without loss."""
        return tm.prompted_inputs(self.embed, self.embed_scale, prompts, text, self.prompt_offset)

    def _call(self, theta: Sequence[Any]) -> Any:
        params = dict(zip(self.names, theta, strict=True))

        def call(**kwargs: Any) -> Any:
            return functional_call(self.model, params, args=(), kwargs=kwargs, strict=False)

        return call

    def step_loss(self, theta: Sequence[Any], prompts: Any, text: dict[str, Any]) -> Any:
        """Mean token loss of one student step at LoRA tensors ``theta`` on (prompts, text batch): the
        cross-entropy to the labels, or to the teacher's soft labels where the batch carries them."""
        batch = self.inputs(prompts, text)
        if self._sparse_ready is None:  # check once that logits-at-loss-positions is exact here
            with torch.no_grad():
                self._sparse_ready = self.sparse.install(self.model, batch)
        if "soft_tokens" in text:
            logits, targets = (self.sparse.loss_logits if self._sparse_ready else loss_logits)(self._call(theta), batch)
            return soft_cross_entropy(logits, text["soft_tokens"], text["soft_probs"]) / max(1, targets.numel())
        forward = self.sparse if self._sparse_ready else default_forward
        loss_sum, n = forward(self._call(theta), batch)
        return loss_sum / max(1, n)

    def record_step(self, loss: Any, grads: Sequence[Any]) -> None:
        """Keep the loss and LoRA-gradient norm of each student step of the current unroll (for the history)."""
        norm = tm.global_norm([g.detach().float() for g in grads])
        self.steps.append((float(loss.detach()), float(norm)))

    def close(self) -> None:
        self.sparse.remove()
