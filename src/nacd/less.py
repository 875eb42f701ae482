"""LESS data selection (Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning").

:func:`less_scores` gives every corpus example a score for ``select.method=less``:

1. **Warm-up.** A fresh LoRA (``config.lora``, seed ``run.seed``) is trained with AdamW on a seeded
   random ``select.less.warmup_fraction`` of the corpus (at least one batch) for
   ``select.less.warmup.epochs`` epochs, through the shared :class:`~nacd.train.TrainLoop`. At
   every epoch end the LoRA parameters, the Adam moments and the epoch's average lr are saved.
2. **Gradient features.** At each warm-up checkpoint ``c``, for every corpus example ``x`` the
   Adam update direction of its own loss (:func:`~nacd.less_math.adam_direction`), for every target example ``z``
   its plain gradient; the loss of an example is its mean token loss over response tokens. Both
   are projected to ``proj_dim`` by a seeded random projection that is generated block by block
   from the seed and never held as a dense matrix (``select.less.projection``: a sparse
   Johnson-Lindenstrauss transform, :class:`~nacd.less_math.SparseProjection`, by default, or a Gaussian one,
   :class:`~nacd.less_math.GaussianProjection`), then L2-normalized.
3. **Matching** (:func:`~nacd.less_math.less_match`, as ``less/data_selection/matching.py`` of the LESS code)::

       score(x) = max_s  sum_c  w_c * mean_{z in D_s} < f_c(x), t_c(z) >,   w_c = lr_c / sum_c' lr_c'

   ``f_c``/``t_c``: the normalized projected features (so the inner product is a cosine),
   ``D_s``: the target examples of subtask ``s`` (their ``Example.source``, e.g. an MMLU
   subject), ``lr_c``: the average lr of warm-up epoch ``c``. The mean within a subtask and the
   weighted sum over checkpoints commute; the max over subtasks comes last. Scores lie in [-1, 1].

Per-example gradients come from one batched forward and backward per ``grad_batch_size``
examples (:func:`~nacd.less_grads.batched_grads`): every trainable LoRA weight is a bias-free ``nn.Linear``
``y = x W^T``, so the gradient of example ``i``'s loss is ``sum_t dL_i/dy[i,t]^T x[i,t]``, read
from the layer's input and the gradient of its output (examples do not interact in a causal LM,
so the gradient of the summed loss with respect to ``y[i]`` is example ``i``'s own).
:func:`~nacd.less_grads.per_example_grads_loop` is the one-backward-per-example reference.

Layout of ``workdir``::

    warmup/manifest.json               kind "less_warmup": base model, LoRA config, warm-up config,
                                       seed, data hash of the warm-up subset, parameter shapes,
                                       snapshot list (epoch, step, lr_avg, loss), complete
    warmup/epoch_NNN.safetensors       at the end of epoch NNN: lora/<name>, exp_avg/<name>,
                                       exp_avg_sq/<name>; metadata epoch, step, adam_step, lr_avg,
                                       beta1, beta2, eps
    warmup/metrics.jsonl, warmup/checkpoint/   per-step metrics; resumable state while incomplete
    features/epoch_NNN/train/manifest.json   kind "less_features": the snapshot's sha256, the
                                       projection, the data hash, gradient kind (adam / sgd),
                                       shard size, feature dtype
    features/epoch_NNN/train/shard_KKKKK.safetensors   "features" [n, proj_dim]: corpus examples
                                       [start, stop) (metadata start, stop, rank)
    features/epoch_NNN/target/...      the same for the target examples (plain gradients)

Resumable: a complete warm-up is skipped and an interrupted one resumes from its checkpoint; a
warm-up folder made with another model, LoRA, data or config is refused. Feature shards are
written atomically and never recomputed while their size and sha256 match the manifest (one that
does not is computed again, with a warning naming it); a features folder made with other settings (projection,
data, dtype, a redone warm-up) is recomputed, with a warning: new targets recompute only the
target features. With several processes (``torchrun``) the warm-up is data-parallel and process
``r`` computes the shards ``k`` with ``k % world == r``; every process then reads all shards.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nacd.artifacts import (
    MetricsWriter,
    atomic_save_safetensors,
    entry_record,
    file_record,
    load_tensors,
    read_manifest,
    read_matching_manifest,
    record_files,
    remove_dir,
    sha256_file,
    verify_file,
    write_manifest,
)
from nacd.less_grads import LessError, shard_features
from nacd.less_math import (
    AdamMoments,
    less_match,
    make_projection,
    subtask_means,
)
from nacd.lora import init_lora, load_lora_state, lora_parameters, lora_state, optimizer_tensors
from nacd.progress import bar as progress_bar
from nacd.ranks import release_at_exit
from nacd.train import (
    Callback,
    SparseLogitsForward,
    TrainLoop,
    default_forward,
    lr_factor,
    setup_training,
    tokenized_hash,
)

log = logging.getLogger(__name__)

WARMUP_KIND = "less_warmup"
FEATURES_KIND = "less_features"

#: Score of a corpus example that tokenization dropped (no response tokens): below every real score.
UNSCORED = -2.0


# --------------------------------------------------------------------------- warm-up


def warmup_indices(n: int, fraction: float, batch_size: int, seed: int) -> list[int]:
    """A seeded random ``fraction`` of ``range(n)`` (at least ``batch_size``, at most ``n``), sorted."""
    import torch

    count = min(n, max(math.ceil(fraction * n), batch_size))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=gen)[:count].tolist())


def epoch_lr_mean(cfg: Any, epoch: int, steps_per_epoch: int, total_steps: int, warmup_steps: int) -> float:
    """The average lr of the optimizer steps of epoch ``epoch`` (1-based) of a run with TrainConfig ``cfg``."""
    steps = range((epoch - 1) * steps_per_epoch, min(epoch * steps_per_epoch, total_steps))
    factors = [lr_factor(s, total_steps, warmup_steps, cfg.lr_schedule) for s in steps]
    return cfg.lr * sum(factors) / max(1, len(factors))


def snapshot_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.safetensors"


class WarmupSnapshots(Callback):
    """At every epoch end: LoRA parameters, Adam moments and the epoch's average lr, and the manifest."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder = folder
        self.manifest = manifest

    def on_epoch_end(self, loop: TrainLoop) -> bool:
        st = loop.state
        lr_avg = epoch_lr_mean(loop.cfg, st.epoch, loop.steps_per_epoch, loop.total_steps, loop.warmup_steps)
        name = snapshot_name(st.epoch)
        entry = {"file": name, "epoch": st.epoch, "step": st.step, "lr_avg": lr_avg, "loss": st.window_mean()}
        st.window_loss_sum, st.window_steps = 0.0, 0  # the next entry's loss is over its own epoch
        snaps = [s for s in self.manifest["snapshots"] if s["file"] != name] + [entry]
        self.manifest["snapshots"] = sorted(snaps, key=lambda s: s["epoch"])  # on every process
        if loop.is_main:
            tensors, metadata = self._snapshot(loop)
            atomic_save_safetensors(tensors, self.folder / name, {**metadata, "lr_avg": repr(lr_avg)})
            entry.update(file_record(self.folder / name))
            write_manifest(self.folder, WARMUP_KIND, **self.manifest)
        return True

    @staticmethod
    def _snapshot(loop: TrainLoop) -> tuple[dict[str, Any], dict[str, str]]:
        """LoRA parameters and Adam moments by parameter name, and the Adam hyperparameters."""
        tensors, meta = optimizer_tensors(loop.optimizer)
        group = meta["param_groups"][0]
        out = {f"lora/{k}": v for k, v in lora_state(loop.model).items()}
        for i, name in enumerate(lora_parameters(loop.model)):  # the optimizer's parameter order
            out[f"exp_avg/{name}"] = tensors[f"{i}.exp_avg"]
            out[f"exp_avg_sq/{name}"] = tensors[f"{i}.exp_avg_sq"]
        adam_step = float(tensors["0.step"]) if "0.step" in tensors else meta["scalars"]["0.step"]
        metadata = {
            "epoch": str(loop.state.epoch),
            "step": str(loop.state.step),
            "adam_step": str(int(adam_step)),
            "beta1": repr(float(group["betas"][0])),
            "beta2": repr(float(group["betas"][1])),
            "eps": repr(float(group["eps"])),
        }
        return out, metadata


def run_warmup(config: Any, setup: Any, data: Sequence[Any], folder: Path) -> list[dict[str, Any]]:
    """Train (resume, or skip when complete) the warm-up LoRA on ``data``; returns its snapshot list."""
    lc = config.select.less
    identity = {
        "base_model": {"spec": config.model.spec, "fingerprint": setup.base_fingerprint},
        "lora": {**asdict(config.lora), "target_modules": setup.lora_targets},
        "train": asdict(lc.warmup),
        "seed": config.run.seed,
        "warmup_fraction": lc.warmup_fraction,
        "data_hash": tokenized_hash(data),
        "parameters": {name: list(p.shape) for name, p in lora_parameters(setup.model).items()},
    }
    hint = f"delete {folder} to redo the warm-up (its features are then recomputed) or choose another run.out_dir"
    existing = read_matching_manifest(folder, WARMUP_KIND, identity, hint)
    for entry in (existing or {}).get("snapshots", []):  # what a skip or a resume trusts, at its recorded size
        verify_file(folder / entry["file"], entry_record(entry), hint)
    if existing is not None and existing.get("complete"):
        log.info("LESS warm-up: complete in %s, skipped", folder)
        return existing["snapshots"]
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {**identity, "n_examples": len(data), "snapshots": (existing or {}).get("snapshots", [])}
    manifest["complete"] = False
    init_lora(setup.model, config.run.seed)
    loop = TrainLoop(
        model=setup.model,
        dataset=data,
        cfg=lc.warmup,
        collate=setup.collate,
        seed=config.run.seed,
        callbacks=[WarmupSnapshots(folder, manifest)],
        checkpoint_dir=folder / "checkpoint",
        metrics=MetricsWriter(folder / "metrics.jsonl"),
        desc="LESS warm-up",
    )
    manifest.update(steps_per_epoch=loop.steps_per_epoch, total_steps=loop.total_steps)
    if loop.is_main:
        write_manifest(folder, WARMUP_KIND, **manifest)
    state = loop.run()
    if loop.is_main:
        manifest.update(complete=True, seconds=round(state.seconds, 2))
        write_manifest(folder, WARMUP_KIND, **manifest)
        remove_dir(folder / "checkpoint")
    loop.accelerator.wait_for_everyone()
    return manifest["snapshots"]


def load_warmup_snapshot(
    path: Path, names: Sequence[str], record: dict[str, Any] | None = None
) -> tuple[dict[str, Any], AdamMoments]:
    """The LoRA parameters and the flattened Adam moments (in the order of ``names``) of a snapshot,
    checked against its manifest ``record`` (size and sha256) when given."""
    import torch
    from safetensors import safe_open

    fix = f"the warm-up snapshot is damaged; delete {path.parent} to redo the warm-up"
    tensors = load_tensors(path, record, fix)
    with safe_open(path, "pt") as fh:
        meta = fh.metadata()
    missing = [n for n in names if f"exp_avg/{n}" not in tensors or f"lora/{n}" not in tensors]
    if missing:
        raise LessError(f"{path}: no LoRA parameter or Adam moment for {missing[0]}; delete {path.parent} to redo")
    lora = {n: tensors[f"lora/{n}"] for n in names}
    moments = AdamMoments(
        exp_avg=torch.cat([tensors[f"exp_avg/{n}"].reshape(-1) for n in names]).float(),
        exp_avg_sq=torch.cat([tensors[f"exp_avg_sq/{n}"].reshape(-1) for n in names]).float(),
        step=int(meta["adam_step"]),
        beta1=float(meta["beta1"]),
        beta2=float(meta["beta2"]),
        eps=float(meta["eps"]),
    )
    return lora, moments


# --------------------------------------------------------------------------- feature shards


def shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard_{k:05d}.safetensors"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every shard of ``n`` examples."""
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


def _dist() -> Any:
    """The process group (accelerate's, as TrainLoop makes it: without CUDA, torchrun means gloo on CPU)."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    release_at_exit()
    return state


def _prepare_features_dir(folder: Path, identity: dict[str, Any]) -> None:
    """Keep ``folder``'s shards when its manifest matches ``identity``; otherwise empty it (main process)."""
    state = _dist()
    if state.is_main_process:
        existing = read_manifest(folder, FEATURES_KIND)
        changed = [k for k, v in identity.items() if existing is not None and existing.get(k) != v]
        if changed:
            log.warning(
                "%s: field '%s' was %r, now %r; recomputing these features",
                folder / "manifest.json",
                changed[0],
                existing.get(changed[0]),
                identity[changed[0]],
            )
            shutil.rmtree(folder)
        if changed or existing is None:
            folder.mkdir(parents=True, exist_ok=True)
            write_manifest(folder, FEATURES_KIND, **identity)
    state.wait_for_everyone()


def _shard_ok(folder: Path, k: int, files: dict[str, Any]) -> bool:
    """A shard counts as written if it is there with the size and sha256 ``files`` (its manifest's) records,
    when it records one; one of another size or content (damaged outside nacd: shards are written
    atomically) is computed again with a warning naming it. The hash costs a read of the shard, far less
    than its gradients."""
    path = shard_path(folder, k)
    if not path.is_file():
        return False
    record = files.get(path.name)
    if record is None:
        return True
    size = path.stat().st_size
    if size != record["size"]:
        log.warning("%s: %d bytes, its manifest recorded %d; computing it again", path, size, record["size"])
        return False
    if sha256_file(path) != record["sha256"]:
        log.warning("%s: its sha256 differs from its manifest's (damaged); computing it again", path)
        return False
    return True


def compute_features(
    folder: Path,
    identity: dict[str, Any],
    model: Any,
    data: Sequence[Any],
    collate: Callable,
    projection: Any,
    lc: Any,
    *,
    adam: AdamMoments | None,
    forward: Callable = default_forward,
    desc: str = "LESS features",
) -> int:
    """Write the missing feature shards of ``data`` that fall to this process; returns how many it computed.

    ``identity`` (what the features depend on) is checked against ``folder``'s manifest first; ``lc``
    is the LessConfig (shard size, gradient batch, dtype). Process ``r`` of ``world`` takes the
    shards ``k`` with ``k % world == r``.
    """
    import torch

    _prepare_features_dir(folder, identity)
    state = _dist()
    ranges = shard_ranges(len(data), lc.shard_size)
    mine = [k for k in range(len(ranges)) if k % state.num_processes == state.process_index]
    recorded = (read_manifest(folder, FEATURES_KIND) or {}).get("files") or {}
    todo = [k for k in mine if not _shard_ok(folder, k, recorded)]
    if len(todo) < len(mine):
        log.info("%s: %d of %d shard(s) already in %s", desc, len(mine) - len(todo), len(mine), folder)
    total = sum(ranges[k][1] - ranges[k][0] for k in todo)
    with progress_bar(total=total, desc=desc, unit="ex", disable=not (state.is_main_process and total)) as bar:
        for k in todo:
            start, stop = ranges[k]
            feats = shard_features(
                model,
                data[start:stop],
                collate,
                projection,
                adam=adam,
                grad_batch_size=lc.grad_batch_size,
                forward=forward,
                progress=bar,
            )
            meta = {"start": str(start), "stop": str(stop), "rank": str(state.process_index)}
            atomic_save_safetensors(
                {"features": feats.to(getattr(torch, lc.feature_dtype))}, shard_path(folder, k), meta
            )
    state.wait_for_everyone()
    if state.is_main_process:  # every shard is written: the manifest now vouches for each
        names = [shard_path(folder, k).name for k in range(len(ranges))]
        files = (read_manifest(folder, FEATURES_KIND) or {}).get("files") or {}
        sizes = {name: (folder / name).stat().st_size for name in names}
        if any(files.get(name, {}).get("size") != size for name, size in sizes.items()) or todo:
            write_manifest(folder, FEATURES_KIND, **identity, files=record_files(folder, names))
    state.wait_for_everyone()
    return len(todo)


def iter_shards(folder: Path, n: int, shard_size: int) -> Iterator[Any]:
    """The feature shards of ``n`` examples, in order, one at a time (float32), each checked against the
    size and sha256 the folder's manifest records once all are written; a missing or damaged one is an error."""
    files = (read_manifest(folder, FEATURES_KIND) or {}).get("files") or {}
    for k, (start, stop) in enumerate(shard_ranges(n, shard_size)):
        path = shard_path(folder, k)
        fix = f"delete it and rerun to recompute examples {start}..{stop - 1}"
        tensors = load_tensors(path, files.get(path.name), fix)
        if "features" not in tensors:
            raise LessError(f"{path}: no tensor 'features'; {fix}")
        feats = tensors["features"].float()
        if feats.shape[0] != stop - start:
            raise LessError(f"{path}: {feats.shape[0]} rows, expected {stop - start}; delete it to recompute")
        yield feats


# --------------------------------------------------------------------------- the entry point


def less_scores(config: Any, examples: list[Any], targets: list[Any], workdir: Path) -> list[float]:
    """One LESS score per corpus example, in corpus order (higher = more influential on ``targets``).

    ``examples``: the corpus (:class:`~nacd.data.Example`); ``targets``: target examples whose
    ``source`` names their subtask; ``workdir``: where the warm-up and the features are kept
    (reused and resumed across calls). Settings: ``config.select.less``, ``config.model``,
    ``config.lora``, ``config.data`` (tokenization), ``config.run.seed``. See the module docstring
    for the formula; examples that tokenization drops score :data:`UNSCORED`.
    """
    import torch

    from nacd.chat import tokenize_corpus

    lc = config.select.less
    workdir = Path(workdir)
    if not examples or not targets:
        raise LessError(f"LESS needs a corpus and target examples (got {len(examples)} and {len(targets)})")
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        raise LessError(f"LESS: corpus example id {next(i for i in ids if ids.count(i) > 1)!r} appears twice")

    setup = setup_training(config, examples)
    corpus = setup.data
    target_data = tokenize_corpus(targets, setup.tokenizer, config.data)
    if len(corpus) < lc.warmup.batch_size:
        raise LessError(
            f"select.less.warmup.batch_size={lc.warmup.batch_size} is larger than the corpus "
            f"({len(corpus)} examples after tokenization); lower it"
        )
    warm = warmup_indices(len(corpus), lc.warmup_fraction, lc.warmup.batch_size, config.run.seed)
    log.info("LESS: warm-up on %d of %d examples, %d target example(s)", len(warm), len(corpus), len(target_data))
    snapshots = run_warmup(config, setup, [corpus[i] for i in warm], workdir / "warmup")
    if not snapshots:
        raise LessError(f"{workdir / 'warmup' / 'manifest.json'}: the warm-up has no epoch snapshot")

    model = setup.model
    model.eval()
    params = lora_parameters(model)
    n_params = sum(p.numel() for p in params.values())
    device = next(iter(params.values())).device
    projection = make_projection(lc.projection, n_params, lc.proj_dim, lc.proj_seed, device, lc.proj_nnz)
    common = {
        "projection": {**projection.describe(), "n_params": n_params},
        "shard_size": lc.shard_size,
        "feature_dtype": lc.feature_dtype,
        "loss": "mean token loss over response tokens",
    }
    data_ids = {
        "train": {"hash": tokenized_hash(corpus), "n": len(corpus)},
        "target": {"hash": tokenized_hash(target_data), "n": len(target_data)},
    }
    sparse = SparseLogitsForward()
    probe = {k: v.to(device) for k, v in setup.collate(corpus[:2]).items()}
    forward = sparse if sparse.install(model, probe) else default_forward
    folders = []
    try:
        for snap in snapshots:
            snap_path = workdir / "warmup" / snap["file"]
            lora, moments = load_warmup_snapshot(snap_path, list(params), entry_record(snap))
            load_lora_state(model, lora)
            origin = {"snapshot": {"file": snap["file"], "sha256": sha256_file(snap_path)}, **common}
            folder = workdir / "features" / Path(snap["file"]).stem
            for kind, data, adam in (("train", corpus, moments), ("target", target_data, None)):
                identity = {**origin, "gradient": "adam" if adam else "sgd", "data": data_ids[kind]}
                desc = f"LESS {kind} features, epoch {snap['epoch']}"
                compute_features(
                    folder / kind,
                    identity,
                    model,
                    data,
                    setup.collate,
                    projection,
                    lc,
                    adam=adam,
                    forward=forward,
                    desc=desc,
                )
            folders.append(folder)
    finally:
        sparse.remove()
    _dist().wait_for_everyone()

    subtasks = [t.source for t in target_data]
    target_means = []
    for folder in folders:
        feats = torch.cat(list(iter_shards(folder / "target", len(target_data), lc.shard_size)))
        groups, means = subtask_means(feats, subtasks)
        target_means.append(means)
    log.info("LESS: %d checkpoint(s), %d target subtask(s): %s", len(folders), len(groups), ", ".join(groups[:8]))
    lrs = [s["lr_avg"] for s in snapshots]
    shards = zip(*(iter_shards(f / "train", len(corpus), lc.shard_size) for f in folders), strict=True)
    scores = torch.cat([less_match(list(parts), target_means, lrs) for parts in shards])
    by_id = {ex.id: float(s) for ex, s in zip(corpus, scores.tolist(), strict=True)}
    if len(by_id) < len(examples):
        log.warning(
            "LESS: %d example(s) dropped by tokenization get the score %s", len(examples) - len(by_id), UNSCORED
        )
    return [by_id.get(ex.id, UNSCORED) for ex in examples]
