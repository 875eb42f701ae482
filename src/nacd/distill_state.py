"""The resumable state of ``nacd distill``: counters, the checkpoint (D_syn, alpha, the optimizers' and the
random generators' state, one safetensors file and a JSON body, written atomically), and the trimming of the
per-iteration logs back to a checkpoint's iteration on resume."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nacd.artifacts import atomic_dir, atomic_save_safetensors, atomic_write_text, read_jsonl
from nacd.errors import NacdError


@dataclass
class DistillState:
    iteration: int = 0  # iterations done (applied or skipped)
    bad_in_a_row: int = 0
    skipped: int = 0
    seconds: float = 0.0


def save_checkpoint(
    folder: Path, syn: Any, log_alpha: Any, opts: dict[str, Any], gen: Any, state: DistillState
) -> None:
    import torch

    from nacd.train import optimizer_tensors

    tensors = {"syn": syn.detach(), "log_alpha": log_alpha.detach().reshape(-1), "generator": gen.get_state()}
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {}
    for name, opt in opts.items():
        t, m = optimizer_tensors(opt)
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        meta[name] = m
    with atomic_dir(folder) as tmp:
        atomic_save_safetensors(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps({"state": asdict(state), "optimizers": meta}, indent=2))


def load_checkpoint(folder: Path, syn: Any, log_alpha: Any, opts: dict[str, Any], gen: Any) -> DistillState:
    import torch
    from safetensors.torch import load_file

    from nacd.train import restore_optimizer

    hint = f"the distillation checkpoint is damaged; restore it, or delete {folder.parent} to distill from iteration 0"
    try:
        body = json.loads((folder / "state.json").read_text())
        DistillState(**body["state"])
        body["optimizers"]  # noqa: B018 (checked here, used below)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NacdError(f"{folder / 'state.json'}: {type(exc).__name__}: {exc}; {hint}") from None
    try:
        tensors = load_file(folder / "state.safetensors")
    except Exception as exc:  # missing, truncated or not safetensors
        raise NacdError(f"{folder / 'state.safetensors'}: {type(exc).__name__}: {exc}; {hint}") from None
    with torch.no_grad():
        syn.copy_(tensors["syn"])
        log_alpha.copy_(tensors["log_alpha"].reshape(log_alpha.shape))
    gen.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch_rng"])
    for name, opt in opts.items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: v.to(syn.device) for k, v in tensors.items() if k.startswith(prefix)}
        restore_optimizer(opt, own, body["optimizers"][name])
    return DistillState(**body["state"])


def trim_jsonl(path: Path, iteration: int) -> None:
    """Keep the rows of ``path`` up to ``iteration`` (a resume continues from its checkpoint)."""
    rows = [r for r in read_jsonl(path) if r["iteration"] <= iteration] if path.is_file() else []
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
