"""The resumable state of ``nacd distill``: counters, the checkpoint (D_syn, alpha, the optimizers' and the
random generators' state, one safetensors file and a JSON body, written atomically), every part of it
checked against the sizes and hashes its ``state.json`` records before anything is restored."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nacd.artifacts import atomic_dir, atomic_save_safetensors, load_tensors, read_checkpoint_body, record_files


@dataclass
class DistillState:
    iteration: int = 0  # iterations done (applied or skipped)
    bad_in_a_row: int = 0
    skipped: int = 0
    seconds: float = 0.0
    # the held-out panel's values for the initial prompts, [draw, alpha, L, cosine] (nacd.panel.Panel)
    panel_initial: list = field(default_factory=list)


def save_checkpoint(
    folder: Path, syn: Any, log_alpha: Any, opts: dict[str, Any], gen: Any, state: DistillState, ema: Any = None
) -> None:
    import torch

    from nacd.lora import optimizer_tensors

    tensors = {"syn": syn.detach(), "log_alpha": log_alpha.detach().reshape(-1), "generator": gen.get_state()}
    if ema is not None:
        tensors["ema"] = ema.detach()
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {}
    for name, opt in opts.items():
        t, m = optimizer_tensors(opt)
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        meta[name] = m
    with atomic_dir(folder) as tmp:
        atomic_save_safetensors(tensors, tmp / "state.safetensors")
        body = {"state": asdict(state), "optimizers": meta, "files": record_files(tmp, ["state.safetensors"])}
        (tmp / "state.json").write_text(json.dumps(body, indent=2))


def load_checkpoint(
    folder: Path, syn: Any, log_alpha: Any, opts: dict[str, Any], gen: Any, ema: Any = None
) -> DistillState:
    import torch

    from nacd.lora import restore_optimizer

    hint = f"the distillation checkpoint is damaged; restore it, or delete {folder.parent} to distill from iteration 0"
    body = read_checkpoint_body(folder, hint, DistillState, "optimizers")
    record = (body.get("files") or {}).get("state.safetensors")  # None in checkpoints from before the records
    tensors = load_tensors(folder / "state.safetensors", record, hint)
    with torch.no_grad():
        syn.copy_(tensors["syn"])
        log_alpha.copy_(tensors["log_alpha"].reshape(log_alpha.shape))
        if ema is not None:
            if "ema" not in tensors:
                from nacd.errors import NacdError

                raise NacdError(
                    f"{folder}: this checkpoint holds no moving average of the prompts (distill.ema was off when "
                    f"it was written); {hint}"
                )
            ema.copy_(tensors["ema"])
    gen.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch_rng"])
    for name, opt in opts.items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: v.to(syn.device) for k, v in tensors.items() if k.startswith(prefix)}
        restore_optimizer(opt, own, body["optimizers"][name])
    return DistillState(**body["state"])
