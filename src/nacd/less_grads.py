"""LESS's per-example gradients (:mod:`nacd.less` is the stage): one batched backward gives every
example's LoRA weight gradient from the linear layers' inputs and output gradients; the loop of one
backward per example is its reference; :func:`shard_features` turns a shard's gradients into
normalized projected features."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from nacd.errors import NacdError
from nacd.less_math import AdamMoments, adam_direction, normalize_rows
from nacd.lora import lora_parameters
from nacd.train import IGNORE_INDEX, default_forward


class LessError(NacdError):
    """LESS cannot run with this model, data or workdir."""


def _grad_modules(model: Any) -> list[tuple[str, Any]]:
    """(parameter name, module) for every trainable parameter: each must be a bias-free Linear's weight."""
    import torch

    modules = dict(getattr(model, "module", model).named_modules())  # inside DDP, if wrapped
    out = []
    for name in lora_parameters(model):
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if leaf != "weight" or not isinstance(module, torch.nn.Linear) or module.bias is not None:
            raise LessError(
                f"LESS per-example gradients: trainable parameter {name} is not the weight of a bias-free "
                "nn.Linear (only LoRA adapters on linear layers are supported)"
            )
        out.append((name, module))
    return out


def batched_grads(model: Any, batch: dict[str, Any], forward: Callable = default_forward) -> Any:
    """Per-example gradients ``[B, n]`` of the mean response-token loss, from one batched backward.

    Forward hooks record each LoRA ``nn.Linear``'s input ``x`` and output ``y``; one
    ``torch.autograd.grad`` of the summed token loss gives ``dL/dy``; example ``i``'s weight
    gradient is ``dL/dy[i]^T x[i]`` (summed over positions), divided by its loss-token count.
    Parameters are in :func:`~nacd.lora.lora_parameters` order, each flattened row-major.
    """
    import torch

    device = next(p.device for p in lora_parameters(model).values())
    batch = {k: v.to(device) for k, v in batch.items()}  # the batch follows the model
    modules = _grad_modules(model)
    taps: dict[str, list[tuple[Any, Any]]] = {name: [] for name, _ in modules}
    handles = [
        module.register_forward_hook(lambda _m, args, out, name=name: taps[name].append((args[0], out)))
        for name, module in modules
    ]
    try:
        with torch.enable_grad():
            loss_sum, _ = forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    reused = [name for name, calls in taps.items() if len(calls) != 1]
    if reused:
        raise LessError(f"LESS per-example gradients: {reused[0]} ran {len(taps[reused[0]])} times in one forward")
    outputs = [taps[name][0][1] for name, _ in modules]
    grad_outputs = torch.autograd.grad(loss_sum, outputs)
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    flat = []
    for (name, _), g in zip(modules, grad_outputs, strict=True):
        x = taps[name][0][0].detach()
        g, x = g.reshape(g.shape[0], -1, g.shape[-1]), x.reshape(x.shape[0], -1, x.shape[-1])
        acc = torch.promote_types(g.dtype, torch.float32)  # float32, or float64 for a float64 model
        flat.append(torch.bmm(g.transpose(1, 2).to(acc), x.to(acc)).flatten(1))
    return torch.cat(flat, dim=1) / counts[:, None].to(flat[0])


def per_example_grads_loop(model: Any, examples: Sequence[Any], collate: Callable, device: Any = None) -> Any:
    """Reference for :func:`batched_grads`: one forward and backward per example, ``[len, n]``."""
    import torch

    params = list(lora_parameters(model).values())
    device = device if device is not None else params[0].device
    rows = []
    for ex in examples:
        batch = {k: v.to(device) for k, v in collate([ex]).items()}
        with torch.enable_grad():
            loss_sum, count = default_forward(model, batch)
            grads = torch.autograd.grad(loss_sum / max(1, count), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def shard_features(
    model: Any,
    data: Sequence[Any],
    collate: Callable,
    projection: Any,
    *,
    adam: AdamMoments | None = None,
    grad_batch_size: int = 8,
    forward: Callable = default_forward,
    loop: bool = False,
    progress: Any = None,
) -> Any:
    """Normalized projected gradient features of ``data`` (``[len(data), dim]`` float32, on CPU).

    Gradients are taken ``grad_batch_size`` examples at a time (sorted by length to pad little),
    turned into Adam directions when ``adam`` is given, then projected together (one pass over the
    projection for the whole shard) and normalized. ``loop=True`` uses the one-backward-per-example
    reference instead of the batched gradients.
    """
    import torch

    device = next(iter(lora_parameters(model).values())).device
    full = torch.empty(len(data), projection.n, device=device, dtype=torch.float32)
    order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))
    moments = adam.to(device) if adam is not None else None
    for start in range(0, len(order), grad_batch_size):
        idx = order[start : start + grad_batch_size]
        items = [data[i] for i in idx]
        if loop:
            grads = per_example_grads_loop(model, items, collate, device).float()
        else:
            batch = {k: v.to(device) for k, v in collate(items).items()}
            grads = batched_grads(model, batch, forward)
        full[idx] = adam_direction(grads, moments) if moments is not None else grads
        if progress is not None:
            progress.update(len(idx))
    return normalize_rows(projection(full)).cpu()
