"""Step 2 of NACD: learn k prompt vectors per selected example by trajectory matching.

Paper Section 3.2, Algorithm 1, Eqs. 1-4. Each example of D_sel gets ``k``
learnable vectors in the model's input-embedding space (D_syn, initialised to
the mean vocabulary embedding). An iteration:

1. samples an expert run and a start epoch ``t < T^m`` and sets the student's
   LoRA parameters to the expert snapshot theta*_t;
2. takes N SGD steps ``theta <- theta - alpha * grad l(concat(p, E(b)), theta)``
   on mini-batches of D_sel, the prompt first and carrying no loss, keeping
   theta_N a differentiable function of D_syn and of the learnable lr alpha;
3. L_distill = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 (Eq. 2);
4. L_reg = mean distance of the prompt vectors used to their nearest
   vocabulary embedding (Eq. 3), computed in vocabulary chunks;
5. updates D_syn and log(alpha) on L_distill + beta * L_reg (Eq. 4).

The unroll has three modes (``distill.unroll``):

- ``naive``: autograd through the N steps with ``create_graph=True``; exact;
  memory grows with N.
- ``flat``: exact and memory-flat. The forward pass takes N plain steps and
  keeps only theta_0..theta_{N-1} (LoRA tensors, small); the backward pass walks
  the steps in reverse, rebuilding one step's second-order graph at a time:
  with lambda_n = dL/dtheta_n and g_n the step's gradient,
  dL/dalpha -= <g_n, lambda_n>, dL/dp -= alpha * d<g_n, lambda_n>/dp and
  lambda_{n-1} = lambda_n - alpha * H_n lambda_n (one double-backward per step).
- ``fd``: approximate, memory-flat and cheaper: the same reverse walk, but the
  Hessian- and mixed-vector products are forward finite differences of the
  gradients (one extra gradient per step, reusing those of the forward pass).

Outputs in ``<run>/distill/``: ``prompts.safetensors`` (the prompt vectors,
their nearest token ids and distances), ``records.jsonl`` (plain-text records:
decoded nearest tokens + the original example, usable by any tokenizer),
``history.jsonl`` (L_distill, L_reg, alpha per iteration), ``manifest.json``
(kind "distilled"), and ``checkpoint/`` while running.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nacd.artifacts import (
    MetricsWriter,
    RunDir,
    atomic_dir,
    atomic_save_safetensors,
    atomic_write_text,
    read_jsonl,
    read_manifest,
    setup_logging,
    write_manifest,
)
from nacd.errors import NacdError

log = logging.getLogger(__name__)

KIND = "distilled"
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
    import torch

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


def regularizer(vectors: Any, vocab: Any, chunk: int = 8192) -> Any:
    """Eq. 3: mean euclidean distance of the prompt vectors (n, d) to their nearest vocabulary row."""
    dist, _ = nearest_vocab(vectors, vocab, chunk)
    return dist.mean()


def initial_prompts(kind: str, vocab: Any, n: int, k: int, seed: int) -> Any:
    """D_syn of shape (n, k, d): the mean vocabulary embedding (the paper's choice), random
    vocabulary rows, or Gaussian noise with the vocabulary's mean and std."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    w = vocab.detach().float().cpu()
    if kind == "mean_vocab":
        return w.mean(0).expand(n, k, -1).clone()
    if kind == "random_vocab":
        return w[torch.randint(0, w.shape[0], (n, k), generator=gen)].clone()
    if kind == "random":
        return w.mean(0) + w.std(0) * torch.randn(n, k, w.shape[1], generator=gen)
    raise NacdError(f"distill.init={kind!r}: expected mean_vocab, random_vocab or random")


# --------------------------------------------------------------------------- the student


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
        self.names = list(lora_parameters(model))
        embed = causal_lm(model).get_input_embeddings()
        self.embed = embed
        self.vocab = embed.weight
        # Gemma-style models scale token embeddings inside the embedding module; prompts live in
        # the raw vocabulary space (Eq. 3), so they are scaled the same way before entering the model.
        self.embed_scale = float(getattr(embed, "embed_scale", 1.0))
        self.sparse = SparseLogitsForward()
        self._sparse_ready: bool | None = None

    @property
    def device(self) -> Any:
        return self.vocab.device

    def text_batch(self, idx: Sequence[int]) -> dict[str, Any]:
        from nacd.data import collate

        return {k: v.to(self.device) for k, v in collate([self.data[i] for i in idx], self.pad_token_id).items()}

    def inputs(self, prompts: Any, text: dict[str, Any]) -> dict[str, Any]:
        import torch

        b, k = prompts.shape[:2]
        with torch.no_grad():
            embeds = self.embed(text["input_ids"])
        dtype = embeds.dtype
        return {
            "inputs_embeds": torch.cat([(prompts * self.embed_scale).to(dtype), embeds], dim=1),
            "attention_mask": torch.cat([text["attention_mask"].new_ones(b, k), text["attention_mask"]], dim=1),
            "labels": torch.cat([text["labels"].new_full((b, k), IGNORE_INDEX), text["labels"]], dim=1),
        }

    def _call(self, theta: Sequence[Any]) -> Any:
        from torch.func import functional_call

        params = dict(zip(self.names, theta, strict=True))

        def call(**kwargs: Any) -> Any:
            return functional_call(self.model, params, args=(), kwargs=kwargs, strict=False)

        return call

    def step_loss(self, theta: Sequence[Any], prompts: Any, text: dict[str, Any]) -> Any:
        from nacd.train import default_forward

        batch = self.inputs(prompts, text)
        if self._sparse_ready is None:  # check once that logits-at-loss-positions is exact here
            self._sparse_ready = self.sparse.install(_EmbedsModel(self.model), batch)
        forward = self.sparse if self._sparse_ready else default_forward
        loss_sum, n = forward(_EmbedsCall(self._call(theta)), batch)
        return loss_sum / max(1, n)

    def close(self) -> None:
        self.sparse.remove()


class _EmbedsCall:
    """Adapts a kwargs-callable so that a forward written for input_ids feeds inputs_embeds."""

    def __init__(self, call: Any):
        self.call = call

    def __call__(self, input_ids: Any = None, **kwargs: Any) -> Any:
        return self.call(inputs_embeds=input_ids, **kwargs)


class _EmbedsModel(_EmbedsCall):
    """A model whose input_ids argument carries inputs_embeds (for SparseLogitsForward.install)."""

    def __init__(self, model: Any):
        super().__init__(model)
        self.model = model

    def get_base_model(self) -> Any:
        from nacd.train import causal_lm

        return causal_lm(self.model)


def _as_ids_batch(batch: dict[str, Any]) -> dict[str, Any]:
    return {"input_ids": batch["inputs_embeds"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}


# --------------------------------------------------------------------------- unrolls


def unroll_naive(student: Student, theta0: Sequence[Any], alpha: Any, syn: Any, batches: Sequence[Any]) -> list[Any]:
    """N differentiable SGD steps through plain autograd (``create_graph=True``)."""
    import torch

    theta = [t.detach().requires_grad_(True) for t in theta0]
    for idx in batches:
        loss = student.step_loss(theta, syn[idx], student.text_batch(idx.tolist()))
        grads = torch.autograd.grad(loss, theta, create_graph=True)
        theta = [t - alpha * g for t, g in zip(theta, grads, strict=True)]
    return theta


class _ReverseUnroll:
    """Shared forward pass of the flat and fd modes: N plain steps, keeping theta_0..theta_{N-1}."""

    @staticmethod
    def forward_steps(student: Student, theta0: Sequence[Any], alpha: float, syn: Any, batches: Sequence[Any], with_p: bool):
        import torch

        thetas, grads = [], []
        theta = [t.detach() for t in theta0]
        for idx in batches:
            thetas.append(theta)
            with torch.enable_grad():
                th = [t.clone().requires_grad_(True) for t in theta]
                p = syn[idx].detach().clone().requires_grad_(with_p)
                loss = student.step_loss(th, p, student.text_batch(idx.tolist()))
                wrt = [*th, p] if with_p else th
                g = torch.autograd.grad(loss, wrt)
            grads.append([x.detach() for x in g])
            theta = [t - alpha * gi.detach() for t, gi in zip(theta, g[: len(theta)], strict=True)]
        return thetas, grads, theta


def _grad_pair(student: Student, theta: Sequence[Any], p: Any, idx: Any, create_graph: bool) -> tuple[Any, list[Any]]:
    import torch

    loss = student.step_loss(theta, p, student.text_batch(idx.tolist()))
    return loss, list(torch.autograd.grad(loss, [*theta, p], create_graph=create_graph))


class FlatUnroll:
    """Exact, memory-flat unroll as a ``torch.autograd.Function`` (see the module docstring)."""

    @staticmethod
    def apply(student: Student, theta0: Sequence[Any], alpha: Any, syn: Any, batches: Sequence[Any]) -> list[Any]:
        return list(_FlatFunction.apply(student, batches, alpha, syn, *theta0))


def _zeros_if_none(grads: Sequence[Any], like: Sequence[Any]) -> list[Any]:
    import torch

    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


class _FlatFunction:
    pass


def _make_functions() -> None:
    """Define the autograd Functions lazily so that importing this module does not import torch."""
    import torch

    global _FlatFunction, _FDFunction
    if isinstance(_FlatFunction, type) and issubclass(_FlatFunction, torch.autograd.Function):
        return

    class _Flat(torch.autograd.Function):
        @staticmethod
        def forward(ctx, student, batches, alpha, syn, *theta0):  # type: ignore[override]
            thetas, _, theta_n = _ReverseUnroll.forward_steps(student, theta0, alpha.detach(), syn, batches, False)
            ctx.student, ctx.batches, ctx.thetas = student, batches, thetas
            ctx.save_for_backward(alpha, syn)
            return tuple(theta_n)

        @staticmethod
        def backward(ctx, *lam):  # type: ignore[override]
            alpha, syn = ctx.saved_tensors
            a = alpha.detach()
            lam = _zeros_if_none(lam, ctx.thetas[0])
            d_alpha = torch.zeros_like(a)
            d_syn = torch.zeros_like(syn)
            for theta_prev, idx in zip(reversed(ctx.thetas), reversed(ctx.batches), strict=True):
                with torch.enable_grad():
                    th = [t.clone().requires_grad_(True) for t in theta_prev]
                    p = syn[idx].detach().clone().requires_grad_(True)
                    _, g = _grad_pair(ctx.student, th, p, idx, create_graph=True)
                    g_theta = g[: len(th)]
                    dot = sum((gi * li).sum() for gi, li in zip(g_theta, lam, strict=True))
                    hv = torch.autograd.grad(dot, [*th, p], allow_unused=True)
                hv = _zeros_if_none(hv, [*th, p])
                d_alpha = d_alpha - dot.detach()
                d_syn.index_add_(0, idx, -a * hv[-1])
                lam = [li - a * hi for li, hi in zip(lam, hv[:-1], strict=True)]
            return (None, None, d_alpha, d_syn, *lam)

    class _FD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, student, batches, alpha, syn, rel_eps, *theta0):  # type: ignore[override]
            thetas, grads, theta_n = _ReverseUnroll.forward_steps(student, theta0, alpha.detach(), syn, batches, True)
            ctx.student, ctx.batches, ctx.thetas, ctx.grads, ctx.rel_eps = student, batches, thetas, grads, rel_eps
            ctx.save_for_backward(alpha, syn)
            return tuple(theta_n)

        @staticmethod
        def backward(ctx, *lam):  # type: ignore[override]
            alpha, syn = ctx.saved_tensors
            a = alpha.detach()
            lam = _zeros_if_none(lam, ctx.thetas[0])
            d_alpha = torch.zeros_like(a)
            d_syn = torch.zeros_like(syn)
            for theta_prev, g0, idx in zip(reversed(ctx.thetas), reversed(ctx.grads), reversed(ctx.batches), strict=True):
                lam_norm = torch.sqrt(sum((li**2).sum() for li in lam))
                th_norm = torch.sqrt(sum((t**2).sum() for t in theta_prev))
                eps = ctx.rel_eps * torch.clamp(th_norm, min=1.0) / torch.clamp(lam_norm, min=1e-30)
                with torch.enable_grad():
                    th = [(t + eps * li).requires_grad_(True) for t, li in zip(theta_prev, lam, strict=True)]
                    p = syn[idx].detach().clone().requires_grad_(True)
                    _, g1 = _grad_pair(ctx.student, th, p, idx, create_graph=False)
                hv = [(x1 - x0) / eps for x1, x0 in zip(g1, g0, strict=True)]
                dot = sum((gi * li).sum() for gi, li in zip(g0[: len(lam)], lam, strict=True))
                d_alpha = d_alpha - dot
                d_syn.index_add_(0, idx, -a * hv[-1])
                lam = [li - a * hi for li, hi in zip(lam, hv[:-1], strict=True)]
            return (None, None, d_alpha, d_syn, None, *lam)

    _FlatFunction = _Flat
    _FDFunction = _FD


_FDFunction: Any = None


def unroll(
    mode: str, student: Student, theta0: Sequence[Any], alpha: Any, syn: Any, batches: Sequence[Any], fd_eps: float = 1e-3
) -> list[Any]:
    """theta_N after N student steps from ``theta0``, differentiable in ``alpha`` and ``syn``."""
    _make_functions()
    theta0 = [t.detach() for t in theta0]
    if mode == "naive":
        return unroll_naive(student, theta0, alpha, syn, batches)
    if mode == "flat":
        return list(_FlatFunction.apply(student, list(batches), alpha, syn, *theta0))
    if mode == "fd":
        return list(_FDFunction.apply(student, list(batches), alpha, syn, fd_eps, *theta0))
    raise NacdError(f"distill.unroll={mode!r}: expected flat, naive or fd")
