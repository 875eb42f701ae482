"""LoRA adapters and training checkpoints: what every stage that trains shares.

- :func:`add_lora` freezes a base model and wraps it with peft's LoRA adapter;
  :func:`lora_parameters` lists the trainable tensors in one stable order (the order
  snapshots, LESS features and the distillation's flat vectors all use);
  :func:`lora_state` / :func:`load_lora_state` copy them out and in; :func:`init_lora`
  re-initialises them from a seed.
- :func:`save_checkpoint` / :func:`load_checkpoint`: LoRA tensors, optimizer state
  (safetensors + JSON, no pickles) and RNG state, written atomically and verified (size and
  sha256 of every part) before anything is restored.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nacd.artifacts import (
    atomic_dir,
    atomic_save_safetensors,
    load_tensors,
    read_checkpoint_body,
    record_files,
    verify_files,
)
from nacd.errors import TrainingError

# --------------------------------------------------------------------------- LoRA


def add_lora(model: Any, lora_cfg: Any) -> Any:
    """Freeze the base model and wrap it with a peft LoRA adapter (named ``default``)."""
    from peft import LoraConfig, get_peft_model

    from nacd.models import default_lora_targets

    targets = list(lora_cfg.target_modules) if lora_cfg.target_modules else default_lora_targets(model)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        raise TrainingError(
            f"lora.target_modules: {', '.join(missing)} not found in {type(model).__name__} "
            f"(its linear layers include: {', '.join(sorted(_linear_names(model))[:12])})"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    peft_cfg = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with peft_quietly():
        return get_peft_model(model, peft_cfg)


@contextmanager
def peft_quietly() -> Iterator[None]:
    """peft's wrappers without the FutureWarning they raise on transformers 5: peft reads
    ``model.is_gradient_checkpointing``, which transformers deprecates (a warning in every run that is
    neither nacd's nor the user's to act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _linear_names(model: Any) -> set[str]:
    import torch

    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def lora_parameters(model: Any) -> dict[str, Any]:
    """The trainable LoRA parameters by name, in a stable (sorted) order."""
    params = {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}
    return dict(sorted(params.items()))


def lora_state(model: Any) -> dict[str, Any]:
    """Detached CPU copies of the LoRA parameters (what a snapshot stores)."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in lora_parameters(model).items()}


def load_lora_state(model: Any, state: dict[str, Any]) -> None:
    """Copy ``state`` into the model's LoRA parameters; names and shapes must match exactly."""
    import torch

    params = lora_parameters(model)
    if set(params) != set(state):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise TrainingError(f"LoRA state does not match the model: unexpected {extra[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise TrainingError(
                    f"LoRA parameter {name}: shape {tuple(state[name].shape)} != model {tuple(p.shape)}"
                )
            p.copy_(state[name].to(p.device, p.dtype))


def unwrap(model: Any) -> Any:
    return getattr(model, "module", model)  # DDP


def init_lora(model: Any, seed: int) -> None:
    """Re-initialise every LoRA layer from ``seed`` (A: peft's Kaiming init, B: zeros)."""
    import torch
    from peft.tuners.lora import LoraLayer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in unwrap(model).modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters("default", True)


# --------------------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # optimizer steps done inside the current epoch
    loss_tokens: int = 0  # loss-carrying tokens seen
    seconds: float = 0.0  # training time so far
    last_loss: float = float("nan")
    window_loss_sum: float = 0.0  # loss accumulated since the last snapshot (for its mean)
    window_steps: int = 0

    def window_mean(self) -> float | None:
        return self.window_loss_sum / self.window_steps if self.window_steps else None


def optimizer_tensors(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer's state as (tensors for safetensors, JSON-able rest): no pickles."""
    import torch

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: Any, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    folder: str | Path, model: Any, optimizer: Any, state: TrainState, extra: dict | None = None
) -> None:
    """LoRA tensors, optimizer state (safetensors + JSON) and RNG state, written atomically."""
    import torch

    tensors, meta = optimizer_tensors(optimizer)
    with atomic_dir(folder) as tmp:
        names = ["lora.safetensors", "rng.safetensors"]
        atomic_save_safetensors(lora_state(model), tmp / "lora.safetensors")
        if tensors:  # plain SGD keeps no tensors (and safetensors cannot read back an empty file)
            atomic_save_safetensors(tensors, tmp / "optimizer.safetensors")
            names.append("optimizer.safetensors")
        atomic_save_safetensors({"cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
        body = {"state": asdict(state), "optimizer": meta, "files": record_files(tmp, names), **(extra or {})}
        (tmp / "state.json").write_text(json.dumps(body, indent=2, default=float))


def load_checkpoint(folder: str | Path, model: Any, optimizer: Any) -> tuple[TrainState, dict[str, Any]]:
    """Restore what :func:`save_checkpoint` wrote; returns the state and the extra fields.

    Every file the checkpoint's ``state.json`` lists is checked (size and sha256) before anything is
    restored: a checkpoint with a missing or damaged part is refused, never half-used (a lost
    optimizer state would silently restart AdamW's moments)."""
    import torch

    folder = Path(folder)
    fix = f"the checkpoint is incomplete or damaged; delete {folder} to train again from step 0"
    body = read_checkpoint_body(folder, fix, TrainState, "optimizer")
    records = body.get("files")  # absent in checkpoints written before nacd recorded files
    if records is not None:
        verify_files(folder, records, fix)  # sizes of every part first, before anything is restored
    else:
        records = {name: None for name in ("lora.safetensors", "rng.safetensors")}
        if (folder / "optimizer.safetensors").is_file():
            records["optimizer.safetensors"] = None
    parts = {name: load_tensors(folder / name, record, fix) for name, record in records.items()}
    device = next(iter(lora_parameters(model).values())).device
    load_lora_state(model, parts["lora.safetensors"])
    opt = {k: v.to(device) for k, v in parts.get("optimizer.safetensors", {}).items()}
    restore_optimizer(optimizer, opt, body["optimizer"])
    torch.set_rng_state(parts["rng.safetensors"]["cpu"])
    extra = {k: v for k, v in body.items() if k not in ("state", "optimizer", "files")}
    return TrainState(**body["state"]), extra
