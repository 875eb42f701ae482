"""Step 2 of NACD: learn k prompt vectors per selected example by trajectory matching.

Paper Section 3.2, Algorithm 1, Eqs. 1-4; the math and the unroll modes are in
:mod:`nacd.tm`. Each example of D_sel gets ``k`` vectors in the input-embedding
space (D_syn, initialised to the mean vocabulary embedding). An iteration
samples an expert run and a start epoch ``t < T^m``, starts the student at the
expert snapshot theta*_t, takes N differentiable SGD steps on
concat(prompt, text) mini-batches of D_sel with the learnable lr alpha, and
updates D_syn and log(alpha) with Adam on

    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 + beta * L_reg.

Output, ``<run>/distill/``::

    prompts.safetensors  "prompts" (n, k, d) float32, "nearest_ids" (n, k), "nearest_dist" (n, k)
    records.jsonl        per example: id, source, nearest token ids and pieces, decoded prompt text,
                         the original messages (plain text: usable by any tokenizer)
    history.jsonl        per iteration: L_distill, L_reg, L, alpha, expert run, start epoch, seconds
    manifest.json        kind "distilled": ids in order, alpha, model fingerprint, config, dims
    checkpoint/          D_syn, alpha, optimizer and RNG state every distill.checkpoint_every iterations
                         (kept at the end: a rerun with more iterations continues from it)
    loss.png             written by ``nacd inspect``
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nacd.artifacts import (
    MetricsWriter,
    RunDir,
    atomic_dir,
    atomic_save_safetensors,
    atomic_write_text,
    check_identity,
    read_jsonl,
    read_manifest,
    read_matching_manifest,
    setup_logging,
    write_manifest,
)
from nacd.errors import NacdError

log = logging.getLogger(__name__)

KIND = "distilled"


def check(config: Any) -> None:
    """Raise if this stage cannot run with ``config`` (every valid config can)."""


# --------------------------------------------------------------------------- inputs


def selected_ids(config: Any, run_dir: RunDir) -> tuple[list[str], Path]:
    from nacd.finetune import read_ids

    path = Path(config.distill.ids_file) if config.distill.ids_file else run_dir.select_dir / "selection.json"
    if not path.is_file():
        raise NacdError(f"distill needs D_sel: no selection at {path}; run `nacd select` or set distill.ids_file")
    return read_ids(path), path


def check_experts(
    store: Any, fingerprint: str, lora: dict[str, Any], shapes: dict[str, list[int]], config: Any
) -> None:
    """Experts must come from the same base model and LoRA config, and reach epoch T^m - 1 + M."""
    if not store.runs:
        raise NacdError(f"{store.folder}: no complete expert run; run `nacd experts` first")
    need = config.distill.max_start_epoch - 1 + config.distill.expert_epochs
    for run in store.runs:
        folder = store.folder / f"run_{run:03d}"
        manifest = store.manifest(run)
        hint = "record the experts again with the model and LoRA config being distilled"
        check_identity(folder, manifest, {"parameters": shapes}, hint)
        check_identity(folder, manifest["base_model"], {"fingerprint": fingerprint}, hint + " (base_model differs)")
        check_identity(folder, manifest["lora"], lora, hint)
        epochs = store.epochs(run)
        if max(epochs) < need:
            raise NacdError(
                f"{folder / 'manifest.json'}: snapshots up to epoch {max(epochs)}, but distill.max_start_epoch="
                f"{config.distill.max_start_epoch} and distill.expert_epochs={config.distill.expert_epochs} need "
                f"epoch {need}; record longer experts or lower them"
            )


# --------------------------------------------------------------------------- state and checkpoints


@dataclass
class DistillState:
    iteration: int = 0  # iterations done (applied or skipped)
    bad_in_a_row: int = 0
    skipped: int = 0
    seconds: float = 0.0


def _save_checkpoint(
    folder: Path, syn: Any, log_alpha: Any, opts: dict[str, Any], gen: Any, state: DistillState
) -> None:
    import torch

    from nacd.train import optimizer_tensors

    tensors = {"syn": syn.detach(), "log_alpha": log_alpha.detach().reshape(1), "generator": gen.get_state()}
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {}
    for name, opt in opts.items():
        t, m = optimizer_tensors(opt)
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        meta[name] = m
    with atomic_dir(folder) as tmp:
        atomic_save_safetensors(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps({"state": asdict(state), "optimizers": meta}, indent=2))


def _load_checkpoint(folder: Path, syn: Any, log_alpha: Any, opts: dict[str, Any], gen: Any) -> DistillState:
    import torch
    from safetensors.torch import load_file

    from nacd.train import restore_optimizer

    body = json.loads((folder / "state.json").read_text())
    tensors = load_file(folder / "state.safetensors")
    with torch.no_grad():
        syn.copy_(tensors["syn"])
        log_alpha.copy_(tensors["log_alpha"][0])
    gen.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch_rng"])
    for name, opt in opts.items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: v.to(syn.device) for k, v in tensors.items() if k.startswith(prefix)}
        restore_optimizer(opt, own, body["optimizers"][name])
    return DistillState(**body["state"])


# --------------------------------------------------------------------------- the loop


def _identity(
    config: Any, fingerprint: str, ids: list[str], data_hash: str, alpha0: float, clip: float | None
) -> dict[str, Any]:
    dc = asdict(config.distill)
    for key in ("iterations", "checkpoint_every", "max_bad_iterations"):  # may change between resumes
        dc.pop(key)
    return {
        "base_model": {"spec": config.model.spec, "fingerprint": fingerprint},
        "distill": dc,
        "seed": config.run.seed,
        "ids": ids,
        "data_hash": data_hash,
        "alpha0": alpha0,
        "student_clip_norm": clip,
    }


def distill(
    student: Any,
    store: Any,
    config: Any,
    folder: Path,
    alpha0: float,
    progress: bool = True,
    clip: float | None = None,
) -> dict[str, Any]:
    """The distillation loop (Algorithm 1) with checkpoints; returns the final tensors and state."""
    import torch
    from tqdm.auto import tqdm

    from nacd.tm import initial_prompts, matching_loss, regularizer, unroll

    dc = config.distill
    device = student.device
    n, k = len(student.data), dc.num_prompt_tokens
    vocab = candidate_rows(student)
    syn = torch.nn.Parameter(initial_prompts(dc.init, vocab, n, k, config.run.seed).to(device))
    log_alpha = torch.nn.Parameter(torch.tensor(math.log(alpha0), device=device))
    opts = {"syn": torch.optim.Adam([syn], lr=dc.lr_syn), "lr": torch.optim.Adam([log_alpha], lr=dc.lr_lr)}
    gen = torch.Generator().manual_seed(config.run.seed)
    history_path = folder / "history.jsonl"
    ckpt = folder / "checkpoint"
    state = DistillState()
    if (ckpt / "state.json").is_file():
        state = _load_checkpoint(ckpt, syn, log_alpha, opts, gen)
        rows = (
            [r for r in read_jsonl(history_path) if r["iteration"] <= state.iteration] if history_path.is_file() else []
        )
        atomic_write_text(history_path, "".join(json.dumps(r) + "\n" for r in rows))
        log.info("distill: resumed from %s at iteration %d", ckpt, state.iteration)
    else:
        history_path.unlink(missing_ok=True)
    history = MetricsWriter(history_path)
    runs = store.runs
    batch = min(dc.batch_size, n)
    bar = tqdm(total=dc.iterations, initial=state.iteration, desc="distill", disable=not progress, dynamic_ncols=True)
    cache: dict[tuple[int, int], list[Any]] = {}

    def snapshot(run: int, epoch: int) -> list[Any]:
        if (run, epoch) not in cache:
            if len(cache) > 16:
                cache.clear()
            snap = store.snapshot(run, epoch, device=device)
            cache[(run, epoch)] = [
                snap[name].to(dtype) for name, dtype in zip(student.names, student.dtypes, strict=True)
            ]
        return cache[(run, epoch)]

    try:
        while state.iteration < dc.iterations:
            start = time.perf_counter()
            run = runs[int(torch.randint(len(runs), (1,), generator=gen))]
            t = int(torch.randint(dc.max_start_epoch, (1,), generator=gen))
            batches = [torch.randperm(n, generator=gen)[:batch].to(device) for _ in range(dc.syn_steps)]
            theta_t, target = snapshot(run, t), snapshot(run, t + dc.expert_epochs)
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            student.steps.clear()
            theta_n = unroll(dc.unroll, student, theta_t, log_alpha.exp(), syn, batches, dc.fd_eps, clip)
            l_distill = matching_loss(theta_n, target, theta_t)
            used = torch.unique(torch.cat(batches))
            l_reg = regularizer(syn[used].reshape(-1, syn.shape[-1]), vocab, dc.vocab_chunk)
            loss = l_distill + dc.beta * l_reg
            loss.backward()
            grads = [syn.grad, log_alpha.grad]
            finite = bool(torch.isfinite(loss)) and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
            state.iteration += 1
            record = {
                "iteration": state.iteration,
                "run": run,
                "start_epoch": t,
                "l_distill": float(l_distill.detach()),
                "l_reg": float(l_reg.detach()),
                "loss": float(loss.detach()),
                # the student's own N steps (forward pass): their losses and LoRA-gradient norms
                "student_losses": [round(x, 5) for x, _ in student.steps[: dc.syn_steps]],
                "student_grad_norms": [round(x, 5) for _, x in student.steps[: dc.syn_steps]],
            }
            if not finite:
                state.bad_in_a_row += 1
                state.skipped += 1
                log.warning("distill: iteration %d has a non-finite loss or gradient; skipped", state.iteration)
                for opt in opts.values():
                    opt.zero_grad(set_to_none=True)
            else:
                state.bad_in_a_row = 0
                grad_norm = float(syn.grad.norm())
                if dc.clip_syn is not None:
                    torch.nn.utils.clip_grad_norm_([syn], dc.clip_syn)
                for opt in opts.values():
                    opt.step()
                record["grad_norm_syn"] = grad_norm
            elapsed = time.perf_counter() - start
            state.seconds += elapsed
            record.update(alpha=float(log_alpha.exp()), skipped=not finite, seconds=round(elapsed, 3))
            history.write(**record)
            bar.update(1)
            bar.set_postfix(
                l_distill=f"{record['l_distill']:.4f}", l_reg=f"{record['l_reg']:.3f}", alpha=f"{record['alpha']:.3g}"
            )
            if state.bad_in_a_row >= dc.max_bad_iterations:
                raise NacdError(
                    f"distill: {state.bad_in_a_row} iterations in a row had a non-finite loss or gradient "
                    f"(last: iteration {state.iteration}); lower distill.lr_syn / distill.lr_lr or "
                    f"distill.lr_init. D_syn was not changed by them; the last checkpoint is kept"
                )
            if state.iteration % dc.checkpoint_every == 0 or state.iteration == dc.iterations:
                _save_checkpoint(ckpt, syn, log_alpha, opts, gen, state)
    finally:
        bar.close()
    return {"syn": syn.detach(), "alpha": float(log_alpha.exp()), "state": state}


# --------------------------------------------------------------------------- outputs


def candidate_rows(student: Any) -> Any:
    """The vocabulary rows prompt vectors are initialised from, regularized toward and decoded as
    (``distill.nearest``: the text tokens, or every row)."""
    vocab = student.vocab.detach()
    return vocab if student.vocab_ids is None else vocab[student.vocab_ids.to(vocab.device)]


def write_distilled(
    folder: Path,
    result: dict[str, Any],
    student: Any,
    tokenizer: Any,
    examples: list[Any],
    identity: dict[str, Any],
    chunk: int,
) -> None:
    """The self-describing distilled data set (see the module docstring)."""
    from nacd.tm import nearest_vocab

    syn = result["syn"].float().cpu()
    n, k, d = syn.shape
    dist, idx = nearest_vocab(syn.reshape(-1, d), candidate_rows(student).float().cpu(), chunk)
    if student.vocab_ids is not None:
        idx = student.vocab_ids.cpu()[idx]
    dist, idx = dist.reshape(n, k).detach(), idx.reshape(n, k)
    atomic_save_safetensors(
        {"prompts": syn, "nearest_ids": idx, "nearest_dist": dist},
        folder / "prompts.safetensors",
        {"kind": KIND, "alpha": repr(result["alpha"])},
    )
    lines = []
    for i, ex in enumerate(examples):
        ids = idx[i].tolist()
        lines.append(
            json.dumps(
                {
                    "id": ex.id,
                    "source": ex.source,
                    "prompt_token_ids": ids,
                    "prompt_tokens": [tokenizer.decode([t]) for t in ids],
                    "prompt_text": tokenizer.decode(ids),
                    "nearest_distance": [round(x, 6) for x in dist[i].tolist()],
                    "messages": list(ex.messages),
                },
                ensure_ascii=False,
            )
        )
    atomic_write_text(folder / "records.jsonl", "\n".join(lines) + "\n")
    st = result["state"]
    write_manifest(
        folder,
        KIND,
        **identity,
        alpha=result["alpha"],
        n_examples=n,
        num_prompt_tokens=k,
        hidden_size=d,
        iterations=st.iteration,
        skipped_iterations=st.skipped,
        seconds=round(st.seconds, 2),
        mean_nearest_distance=float(dist.mean()),
        complete=True,
    )


def run(config: Any, run_dir: RunDir) -> DistilledSet:
    """``nacd distill``: distill D_sel against the run's expert trajectories; resumable."""
    from nacd.data import load_corpus, tokenize_corpus
    from nacd.experts import ExpertStore
    from nacd.finetune import select_examples
    from nacd.models import load_model, model_fingerprint, resolve_device
    from nacd.tm import Student
    from nacd.train import add_lora, lora_parameters, tokenized_hash

    check(config)
    ids, ids_path = selected_ids(config, run_dir)
    store = ExpertStore(run_dir.experts_dir)
    if not store.runs:
        raise NacdError(f"{run_dir.experts_dir}: no complete expert run; run `nacd experts` first")
    run_dir.init(config)
    setup_logging(config.run.log_level, run_dir.log_path)
    model, tokenizer = load_model(config.model, resolve_device(config.run.device), needs_double_backward=True)
    fingerprint = model_fingerprint(model)
    corpus, _ = load_corpus(config.data)
    examples = select_examples(corpus, ids, str(ids_path))
    data = tokenize_corpus(examples, tokenizer, config.data)
    if len(data) != len(examples):
        raise NacdError(
            f"distill: {len(examples) - len(data)} selected example(s) could not be tokenized (see the log)"
        )
    model = add_lora(model, config.lora)
    shapes = {name: list(p.shape) for name, p in lora_parameters(model).items()}
    lora = {**asdict(config.lora), "target_modules": sorted(model.peft_config["default"].target_modules)}
    check_experts(store, fingerprint, lora, shapes, config)
    expert_train = store.manifest(store.runs[0])["train"]
    alpha0 = config.distill.lr_init or float(expert_train["lr"])
    clip = expert_train.get("max_grad_norm") if config.distill.student_clip else None
    identity = _identity(config, fingerprint, ids, tokenized_hash(data), alpha0, clip)
    folder = run_dir.distill_dir
    hint = f"delete {folder} to distill again with these settings"
    existing = read_matching_manifest(folder, KIND, identity, hint)
    if existing is not None and existing.get("complete") and existing.get("iterations") == config.distill.iterations:
        log.info("distill: complete in %s, skipped", folder)
        return DistilledSet.load(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, KIND, **identity, complete=False)
    student = Student(model, data, tokenizer.pad_token_id)
    if config.distill.nearest == "text":
        import torch

        from nacd.tm import text_token_ids

        student.vocab_ids = torch.tensor(text_token_ids(tokenizer, student.vocab.shape[0]))
    model.train()  # LoRA dropout, if any, as the experts had it
    try:
        result = distill(student, store, config, folder, alpha0, clip=clip)
    finally:
        student.close()
    # the checkpoint stays: raising distill.iterations and rerunning continues from it
    write_distilled(folder, result, student, tokenizer, examples, identity, config.distill.vocab_chunk)
    log.info("distill: %d examples x %d prompt vectors -> %s", len(data), config.distill.num_prompt_tokens, folder)
    return DistilledSet.load(folder)


# --------------------------------------------------------------------------- reading it back


@dataclass
class DistilledSet:
    """A distilled data set, for the same model (embeddings) or any other (text records)."""

    folder: Path
    manifest: dict[str, Any]
    prompts: Any  # (n, k, d) float32
    nearest_ids: Any  # (n, k)
    nearest_dist: Any  # (n, k)
    records: list[dict[str, Any]]

    @classmethod
    def load(cls, folder: str | Path) -> DistilledSet:
        from safetensors.torch import load_file

        folder = Path(folder)
        manifest = read_manifest(folder, KIND)
        if manifest is None or not manifest.get("complete"):
            raise NacdError(f"{folder}: no complete distilled data set (run `nacd distill`)")
        tensors = load_file(folder / "prompts.safetensors")
        return cls(
            folder,
            manifest,
            tensors["prompts"],
            tensors["nearest_ids"],
            tensors["nearest_dist"],
            read_jsonl(folder / "records.jsonl"),
        )

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]

    @property
    def alpha(self) -> float:
        return float(self.manifest["alpha"])

    def embeddings(self, example_id: str) -> Any:
        """The (k, d) prompt vectors of one example, for the distilling model."""
        return self.prompts[self.ids.index(example_id)]

    def history(self) -> list[dict[str, Any]]:
        return read_jsonl(self.folder / "history.jsonl")


# --------------------------------------------------------------------------- inspection


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_examples(ds: DistilledSet, count: int = 5, ids: list[str] | None = None, width: int = 160) -> str:
    """The decoded pseudo tokens of chosen examples beside their original data (paper Figure 3)."""
    chosen = [r for r in ds.records if r["id"] in ids] if ids else ds.records[:count]
    if ids and len(chosen) != len(set(ids)):
        missing = sorted(set(ids) - {r["id"] for r in chosen})
        raise NacdError(f"{ds.folder}: no distilled example with id(s) {', '.join(missing)}")
    lines = [
        f"{ds.folder}: {len(ds.records)} examples x {ds.prompts.shape[1]} prompt vectors, alpha {ds.alpha:.4g}, "
        f"mean distance to the nearest token {float(ds.nearest_dist.mean()):.4f}"
    ]
    for rec in chosen:
        pieces = " ".join(
            f"{tok!r}({dist:.3f})" for tok, dist in zip(rec["prompt_tokens"], rec["nearest_distance"], strict=True)
        )
        user = next((m["content"] for m in rec["messages"] if m["role"] == "user"), "")
        answer = rec["messages"][-1]["content"]
        lines += [
            "",
            f"[{rec['id']}] ({rec['source']})",
            f"  pseudo tokens : {pieces}",
            f"  prompt text   : {rec['prompt_text']!r}",
            f"  instruction   : {_short(user, width)}",
            f"  response      : {_short(answer, width)}",
        ]
    return "\n".join(lines)


def plot_history(ds_or_folder: DistilledSet | Path, out: Path | None = None) -> Path:
    """L_distill, L_reg and alpha per iteration as a PNG beside the data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = ds_or_folder.folder if isinstance(ds_or_folder, DistilledSet) else Path(ds_or_folder)
    rows = read_jsonl(folder / "history.jsonl")
    if not rows:
        raise NacdError(f"{folder / 'history.jsonl'}: no iterations recorded")
    it = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    # L_distill depends strongly on the start epoch (later epochs move less): one line per start epoch
    for t in sorted({r["start_epoch"] for r in rows}):
        sub = [r for r in rows if r["start_epoch"] == t]
        axes[0].plot(
            [r["iteration"] for r in sub], [r["l_distill"] for r in sub], "o-", ms=3, lw=1, label=f"start epoch {t}"
        )
    axes[0].legend(fontsize=8)
    axes[0].set_yscale("log")  # unstable student steps give rare spikes two orders of magnitude up
    axes[1].plot(it, [r["l_reg"] for r in rows], lw=1.2)
    axes[2].plot(it, [r["alpha"] for r in rows], lw=1.2)
    for ax, title in zip(axes, ("L_distill (Eq. 2)", "L_reg (Eq. 3)", "alpha (student lr)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    skipped = [r["iteration"] for r in rows if r.get("skipped")]
    if skipped:
        axes[0].scatter(skipped, [rows[i - 1]["l_distill"] for i in skipped], color="red", s=12, label="skipped")
        axes[0].legend()
    fig.tight_layout()
    out = out or folder / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
