"""Step 1 of NACD: expert LoRA trajectories on D_full.

``nacd experts`` trains ``experts.num_experts`` LoRA runs on the full corpus
(expert ``e`` uses seed ``run.seed + e`` for its LoRA init and data order) and
saves the LoRA parameters at step 0 and at the end of every epoch (optionally
every K steps as well). These snapshots are the targets distillation matches.

Layout of ``<run>/experts/run_XXX/``::

    manifest.json          kind "expert_run": base model, LoRA config, parameter shapes,
                           training config, seed, data hash, steps per epoch, snapshot list
    epoch_000.safetensors  LoRA parameters before training (step 0)
    epoch_001.safetensors  ... after each epoch (metadata: epoch, step, loss)
    step_000050.safetensors  optional, every experts.save_every_steps steps
    metrics.jsonl          one line per optimizer step
    checkpoint/            resumable state while the run is incomplete (removed when done)

Only LoRA parameters are stored, never the frozen base. An interrupted run is
resumed from its last checkpoint and finishes with the same snapshots as a
clean run (bitwise on CPU); completed runs are skipped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nacd.artifacts import (
    MetricsWriter,
    RunDir,
    atomic_save_safetensors,
    entry_record,
    file_record,
    load_tensors,
    read_manifest,
    read_matching_manifest,
    remove_dir,
    setup_logging,
    verify_file,
    write_manifest,
)
from nacd.errors import NacdError
from nacd.locks import locked
from nacd.lora import init_lora, lora_parameters, lora_state
from nacd.train import Callback, TrainingSetup, TrainLoop, setup_training

log = logging.getLogger(__name__)

KIND = "expert_run"


def snapshot_name(epoch: int | None = None, step: int | None = None) -> str:
    return f"epoch_{epoch:03d}.safetensors" if epoch is not None else f"step_{step:06d}.safetensors"


class SnapshotCallback(Callback):
    """Writes the LoRA snapshots of one expert run and keeps its manifest's snapshot list current."""

    def __init__(self, folder: Path, manifest: dict[str, Any], every_steps: int | None):
        self.folder = folder
        self.manifest = manifest
        self.every_steps = every_steps

    def _save(self, loop: TrainLoop, name: str, epoch: int | None, loss: float | None) -> None:
        if loop.is_main:
            st = loop.state
            meta = {"epoch": str(epoch if epoch is not None else ""), "step": str(st.step), "loss": str(loss)}
            atomic_save_safetensors(lora_state(loop.model), self.folder / name, meta)
            entry = {"file": name, "epoch": epoch, "step": st.step, "loss": loss, **file_record(self.folder / name)}
            snaps = [s for s in self.manifest["snapshots"] if s["file"] != name] + [entry]
            self.manifest["snapshots"] = sorted(snaps, key=lambda s: (s["step"], s["epoch"] is None))
            write_manifest(self.folder, KIND, **self.manifest)

    def on_train_start(self, loop: TrainLoop) -> bool:
        self._save(loop, snapshot_name(epoch=0), 0, None)
        return True

    def on_step_end(self, loop: TrainLoop) -> bool:
        st = loop.state
        if self.every_steps and st.step % self.every_steps == 0:
            self._save(loop, snapshot_name(step=st.step), None, st.last_loss)
            return True
        return False

    def on_epoch_end(self, loop: TrainLoop) -> bool:
        st = loop.state
        self._save(loop, snapshot_name(epoch=st.epoch), st.epoch, st.window_mean())
        st.window_loss_sum, st.window_steps = 0.0, 0  # the next snapshot's loss is over its own epoch
        return True


def _identity(config: Any, setup: TrainingSetup, seed: int) -> dict[str, Any]:
    """Manifest fields that must agree for a run folder to be resumed or reused."""
    return {
        "base_model": {"spec": config.model.spec, "fingerprint": setup.base_fingerprint},
        "lora": {**asdict(config.lora), "target_modules": setup.lora_targets},
        "train": asdict(config.experts.train),
        "seed": seed,
        "data_hash": setup.data_hash,
        "parameters": {name: list(p.shape) for name, p in lora_parameters(setup.model).items()},
        "save_every_steps": config.experts.save_every_steps,
    }


def train_expert(config: Any, setup: TrainingSetup, folder: Path, index: int) -> dict[str, Any]:
    """Train (or finish, or skip) expert ``index`` into ``folder``; returns its manifest."""
    seed = config.run.seed + index
    identity = _identity(config, setup, seed)
    existing = read_matching_manifest(folder, KIND, identity, f"delete {folder} or choose another run.out_dir")
    if existing is not None:  # what a skip or a resume trusts: every snapshot listed, at its recorded size
        verify_snapshots(folder, existing)
    if existing is not None and existing.get("complete"):
        remove_dir(folder / "checkpoint")  # a kill between the manifest and the removal left it
        log.info("expert %d: complete in %s, skipped", index, folder)
        return existing
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {**identity, "index": index, "snapshots": (existing or {}).get("snapshots", []), "complete": False}
    init_lora(setup.model, seed)
    loop = TrainLoop(
        model=setup.model,
        dataset=setup.data,
        cfg=config.experts.train,
        collate=setup.collate,
        seed=seed,
        callbacks=[SnapshotCallback(folder, manifest, config.experts.save_every_steps)],
        checkpoint_dir=folder / "checkpoint",
        metrics=MetricsWriter(folder / "metrics.jsonl"),
        desc=f"expert {index + 1}/{config.experts.num_experts}",
    )
    manifest.update(steps_per_epoch=loop.steps_per_epoch, total_steps=loop.total_steps, n_examples=len(setup.data))
    if loop.is_main:
        write_manifest(folder, KIND, **manifest)
    state = loop.run()
    if loop.is_main:
        manifest.update(complete=True, seconds=round(state.seconds, 2), loss_tokens=state.loss_tokens)
        write_manifest(folder, KIND, **manifest)
        remove_dir(folder / "checkpoint")
    loop.accelerator.wait_for_everyone()
    return manifest


def snapshot_fix(folder: Path) -> str:
    return f"delete {folder} and run `nacd experts` again to record it anew"


def verify_snapshots(folder: Path, manifest: dict[str, Any]) -> None:
    """Every snapshot an expert run's manifest lists exists at its recorded size (cheap: no hashing;
    each snapshot's sha256 is checked when it is loaded)."""
    for entry in manifest.get("snapshots", []):
        verify_file(folder / entry["file"], entry_record(entry), snapshot_fix(folder))


def check(config: Any) -> None:
    """Raise if this stage cannot run with ``config`` (every valid config can)."""


@locked("experts", lambda config, run_dir: run_dir.experts_dir)
def run(config: Any, run_dir: RunDir) -> ExpertStore:
    """``nacd experts``: record every expert run of ``config.experts`` into ``run_dir``."""
    run_dir.init(config)
    setup_logging(config.run.log_level, run_dir.log_path)
    setup = setup_training(config)
    for index in range(config.experts.num_experts):
        train_expert(config, setup, run_dir.expert_run_dir(index), index)
    store = ExpertStore(run_dir.experts_dir)
    log.info("experts: %d complete run(s) in %s", len(store.runs), run_dir.experts_dir)
    return store


class ExpertStore:
    """Read access to recorded trajectories; snapshots are loaded one at a time, on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._manifests: dict[int, dict[str, Any]] = {}
        for sub in sorted(self.folder.glob("run_*")):
            body = read_manifest(sub, KIND)
            if body is not None and body.get("complete"):
                verify_snapshots(sub, body)  # a damaged run stops its reader before any work, not hours in
                self._manifests[int(body["index"])] = body

    @property
    def runs(self) -> list[int]:
        return sorted(self._manifests)

    def manifest(self, run: int) -> dict[str, Any]:
        if run not in self._manifests:
            raise NacdError(f"{self.folder}: no complete expert run {run} (complete: {self.runs})")
        return self._manifests[run]

    def epochs(self, run: int) -> list[int]:
        return [s["epoch"] for s in self.manifest(run)["snapshots"] if s["epoch"] is not None]

    def _load(self, run: int, name: str, device: Any = None) -> dict[str, Any]:
        folder = self.folder / f"run_{run:03d}"
        entry = next((s for s in self.manifest(run)["snapshots"] if s["file"] == name), {})
        return load_tensors(folder / name, entry_record(entry), snapshot_fix(folder), device)

    def snapshot(self, run: int, epoch: int, device: Any = None) -> dict[str, Any]:
        """LoRA parameters of expert ``run`` at the end of ``epoch`` (0 = before training)."""
        if epoch not in self.epochs(run):
            raise NacdError(f"expert run {run} has no snapshot for epoch {epoch} (has {self.epochs(run)})")
        return self._load(run, snapshot_name(epoch=epoch), device)

    def snapshot_at_step(self, run: int, step: int, device: Any = None) -> dict[str, Any]:
        steps = [s["step"] for s in self.manifest(run)["snapshots"]]
        if step not in steps:
            raise NacdError(f"expert run {run} has no snapshot at step {step} (has {steps})")
        entry = next(s for s in self.manifest(run)["snapshots"] if s["step"] == step)
        return self._load(run, entry["file"], device)
