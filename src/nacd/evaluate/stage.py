"""The stage ``nacd eval``: :func:`check` (cheap, before anything is loaded) and :func:`run` (load the
model and benchmarks, apply the peft adapter, evaluate, write ``<run>/eval/<name>/`` or skip a complete
evaluation with the same identity), with the adapter checks and the output folder's name."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from nacd.errors import NacdError
from nacd.evaluate.benchmarks import _HUB_ID, BUILTINS, load_benchmark
from nacd.evaluate.evaluation import evaluate
from nacd.evaluate.heldout import (
    QUESTION_KINDS,
    HeldoutBenchmark,
    heldout_questions,
    heldout_sources,
    is_heldout,
    load_heldout,
)
from nacd.locks import locked

log = logging.getLogger(__name__)

KIND = "eval"
STAGE = "evaluate"


def apply_adapter(model: Any, adapter: str | Path) -> Any:
    """``model`` with the peft adapter of folder ``adapter`` (which holds adapter_config.json), in eval mode."""
    from peft import PeftModel

    from nacd.lora import peft_quietly

    folder = Path(adapter).expanduser()
    verify_adapter(folder, deep=False)  # nacd eval hashed it before loading the model
    try:
        with peft_quietly():
            peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise NacdError(f"eval.adapter={str(adapter)!r}: cannot apply it to the model: {brief_error(exc)}") from exc
    peft_model.eval()
    return peft_model


def brief_error(exc: BaseException, width: int = 300) -> str:
    """The first line of a long library error (torch lists every mismatched tensor), with a count of the rest:
    an adapter of another model gives hundreds of ``size mismatch`` lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    detail = next((line for line in lines[1:] if line.startswith("size mismatch")), None)
    head = lines[0] if detail is None else f"{lines[0]} {detail}"
    head = head if len(head) <= width else head[: width - 3] + "..."
    more = sum(line.startswith("size mismatch") for line in lines) - (detail is not None)
    rest = len(lines) - 1 - (detail is not None)
    if more > 0:
        return f"{head} (and {more} more size mismatches: the adapter was made for another model)"
    return f"{head} (and {rest} more lines)" if rest > 0 else head


def _safe(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text).strip("._") or "model"


def eval_name(config: Any) -> str:
    """The output folder name: ``eval.name``, else the adapter's variant, else the model's name."""
    ec = config.eval
    if ec.name:
        return ec.name
    if ec.adapter:
        folder = Path(ec.adapter).expanduser()
        return _safe(folder.parent.name if folder.name == "adapter" and folder.parent.name else folder.name)
    return model_name(config.model.spec)


def model_name(spec: str) -> str:
    """A folder-safe short name of a model spec (a path's last part, a GGUF's stem, a hub id's name)."""
    spec = spec.strip().rstrip("/\\")
    return _safe(Path(spec).stem if spec.endswith(".gguf") else Path(spec).name or spec)


def _adapter_identity(adapter: str | None, run_root: Path | None = None) -> dict[str, Any] | None:
    """The adapter's files and config; its path is recorded (relative to the run folder when inside it,
    so a copied or moved folder reads the same) but only the contents decide reuse (:func:`_changed`)."""
    from nacd.artifacts import sha256_file

    if adapter is None:
        return None
    folder = Path(adapter).expanduser()
    weights = sorted(folder.glob("adapter_model.*"))
    resolved = folder.resolve()
    path = str(resolved)
    if run_root is not None and resolved.is_relative_to(run_root.resolve()):
        path = str(resolved.relative_to(run_root.resolve()))
    return {
        "path": path,
        "sha256": {p.name: sha256_file(p) for p in weights},
        "config": json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")),
    }


def _changed(existing: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """None when a finished evaluation's manifest matches ``identity``, else its first difference named
    (``benchmarks.demo_mc.data_hash was '...', now '...'``). Where the adapter lies does not count."""
    from nacd.artifacts import first_difference, short_repr

    def unplaced(body: dict[str, Any]) -> dict[str, Any]:
        adapter = body.get("adapter")
        return {**body, "adapter": {k: v for k, v in adapter.items() if k != "path"}} if adapter else body

    then, now = unplaced({k: existing.get(k) for k in identity}), unplaced(identity)
    if then == now:
        return None
    where, a, b = first_difference(then, now, "")
    return f"{where.lstrip('.')} was {short_repr(a)}, now {short_repr(b)}"


def verify_adapter(adapter: str | Path, deep: bool = True) -> None:
    """Stop before any model is loaded when ``adapter`` is no peft adapter folder, or when it is a nacd
    tuning's adapter whose files differ from what that tuning's manifest records."""
    from nacd.artifacts import load_tensors, read_manifest, verify_files

    folder = Path(adapter).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise NacdError(
            f"eval.adapter={str(adapter)!r}: no adapter_config.json in {folder} "
            "(expected a peft adapter folder such as <run>/finetune/full/adapter)"
        )
    owner = folder.parent
    body = read_manifest(owner) if folder.name == "adapter" and (owner / "manifest.json").is_file() else None
    fix = "the adapter is damaged; retrain it"
    if body is not None and body.get("kind") == "finetune":
        fix = f"the adapter is damaged; delete {owner} and run `nacd finetune` again"
        verify_files(owner, body.get("files"), fix, deep=deep)
    weights = folder / "adapter_model.safetensors"
    if deep and weights.is_file():  # NaN weights would score every question alike, without a word
        load_tensors(weights, None, fix)


def check(config: Any) -> None:
    """Raise if this stage cannot run with ``config`` (cheap: nothing is loaded)."""
    ec = config.eval
    root = Path(config.data.root).expanduser()
    for spec in ec.benchmarks:
        spec = spec.strip()
        if spec in BUILTINS:
            continue
        if is_heldout(spec):
            heldout_sources(spec, config.data)
            continue
        if spec.startswith("builtin:"):
            from nacd.demo_data import builtin_path

            builtin_path(spec)  # an unknown built-in name is an error here
            continue
        path = Path(spec).expanduser()
        exists = any(c.exists() for c in ([path] if path.is_absolute() else [path, root / path]))
        if not exists and (spec.lower().endswith(".jsonl") or not _HUB_ID.match(spec)):
            raise NacdError(
                f"eval.benchmarks: {spec!r} is not a built-in ({', '.join(BUILTINS)}), an existing .jsonl file or "
                f"folder (also looked under data.root = {root}), nor a hub dataset id owner/name[:config]"
            )


def load_benchmarks(config: Any, run_dir: Any = None) -> list[Any]:
    """The benchmarks of ``eval.benchmarks``: multiple-choice ones and held-out losses, the latter checked
    disjoint from D_full, the selection target and the run folder's selection when it has one."""
    ec = config.eval
    out = []
    loaded = None  # D_full and its held-out examples, loaded once for every held-out benchmark
    for spec in ec.benchmarks:
        if not is_heldout(spec):
            out.append(load_benchmark(spec, ec.split, config.data.root))
            continue
        ids, where = None, ""
        path = run_dir.select_dir / "selection.json" if run_dir is not None else None
        if path is not None and path.is_file():
            ids, where = json.loads(path.read_text(encoding="utf-8")).get("ids"), str(path)
        if loaded is None:
            from nacd.data import load_corpus

            heldout_sources(spec, config.data)  # the key's errors before any loading
            loaded = load_corpus(config.data)
        bench = load_heldout(spec, config, ids, where, loaded)
        kind = spec.strip().partition(":")[0]
        out.append(heldout_questions(bench) if kind in QUESTION_KINDS else bench)
    return out


def _benchmark_identity(bench: Any) -> dict[str, Any]:
    from dataclasses import asdict

    from nacd.artifacts import sha256_json

    if isinstance(bench, HeldoutBenchmark):
        items = [[ex.id, list(ex.messages)] for ex in bench.examples]
        return {"source": bench.source, "n_available": len(bench.examples), "data_hash": sha256_json(items)}
    return {
        "source": bench.source,
        "n_available": len(bench.docs),
        "data_hash": sha256_json([asdict(d) for d in (*bench.docs, *bench.fewshot_pool)]),
    }


@locked("eval", lambda config, run_dir: run_dir.eval_dir(eval_name(config)))
def run(config: Any, run_dir: Any) -> dict[str, Any]:
    """``nacd eval``: evaluate ``model.spec`` (plus ``eval.adapter``) on ``eval.benchmarks``; writes
    ``<run>/eval/<name>/``. A complete evaluation with the same model, adapter and settings is skipped."""
    from dataclasses import asdict

    from nacd.artifacts import (
        atomic_dir,
        atomic_write_json,
        atomic_write_text,
        read_manifest,
        read_verified,
        record_files,
        setup_logging,
        verify_files,
        write_manifest,
    )
    from nacd.models import describe, load_model, model_fingerprint, resolve_device
    from nacd.ranks import current as current_ranks

    check(config)
    ec = config.eval
    if ec.adapter:  # here, not in check(): `nacd run` checks every stage before its tunings write adapters
        verify_adapter(ec.adapter)
    benchmarks = load_benchmarks(config, run_dir)  # data errors first
    device = resolve_device(config.run.device)
    ranks = current_ranks(cpu=device.type == "cpu")  # under a launcher each process scores its share
    if ranks.is_main:
        run_dir.init(config)
    setup_logging(config.run.log_level, run_dir.log_path if ranks.is_main else None)
    name = eval_name(config)
    folder = run_dir.eval_dir(name)
    model, tokenizer = load_model(config.model, device)
    identity = {
        "model": {"spec": config.model.spec, "fingerprint": model_fingerprint(model)},
        "adapter": _adapter_identity(ec.adapter, run_dir.root),
        "benchmarks": {b.name: _benchmark_identity(b) for b in benchmarks},
        "split": ec.split,
        "protocol": ec.protocol,
        "num_fewshot": ec.num_fewshot,
        # chat: the prompts are rendered with data.template; plain keeps the identity of earlier evaluations
        **({"format": ec.format, "template": config.data.template} if ec.format != "plain" else {}),
        "limit": ec.limit,
        "limits": ec.limits,
    }
    if any(isinstance(b, HeldoutBenchmark) for b in benchmarks):  # how its examples are tokenized
        dc = config.data
        identity["tokenization"] = {"max_seq_len": dc.max_seq_len, "template": dc.template, "truncation": dc.truncation}
    existing = ranks.from_main(read_manifest(folder, KIND))  # one decision for all processes
    if existing is not None and existing.get("complete") and (folder / "results.json").is_file():
        changed = _changed(existing, identity)
        if changed is None:
            files = existing.get("files") or {}
            try:
                verify_files(folder, {k: v for k, v in files.items() if k != "results.json"}, "", deep=True)
                body = json.loads(read_verified(folder / "results.json", files.get("results.json")).decode("utf-8"))
            except (NacdError, ValueError) as exc:  # the evaluation is its own rebuild: redo it, saying why
                log.warning("eval %s: %s; evaluating again", name, exc)
            else:
                log.info("eval %s: complete in %s, skipped", name, folder)
                return body
        else:
            log.warning("eval %s: %s was made with other settings (%s); evaluating again", name, folder, changed)
    if ec.adapter:
        model = apply_adapter(model, ec.adapter)
    start = time.time()
    results, samples = evaluate(model, tokenizer, benchmarks, ec, ranks=ranks, data=config.data)
    body = {
        "name": name,
        "model": {"spec": config.model.spec, **describe(model)},
        "adapter": ec.adapter,
        "eval": asdict(ec),
        "benchmarks": results,
    }
    if not ranks.is_main:  # the main process writes the one copy
        ranks.barrier()
        return body
    with atomic_dir(folder) as tmp:
        atomic_write_json(tmp / "results.json", body)
        atomic_write_text(tmp / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        write_manifest(
            tmp,
            KIND,
            **identity,
            name=name,
            protocols={
                k: {"protocol": v["protocol"], "num_fewshot": v["num_fewshot"]} if "protocol" in v else {"kind": "loss"}
                for k, v in results.items()
            },
            n_questions={k: v["n"] for k, v in results.items()},
            seconds=round(time.time() - start, 2),
            files=record_files(tmp, ["results.json", "samples.jsonl"]),
            processes=ranks.world,
            complete=True,
        )
    ranks.barrier()
    log.info("eval %s: results in %s", name, folder / "results.json")
    return body
