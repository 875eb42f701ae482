"""``nacd export``: a run's selected and distilled data as ordinary data sets any trainer reads.

``nacd export RUN_DIR --out DIR`` writes

- ``DIR/distilled.jsonl``: one chat per distilled example, ``{"id", "source", "messages", "prompt_text",
  "prompt_tokens", "prompt_token_ids"}``; the decoded prompt text is placed where a receiving model gets it
  in ``nacd finetune`` (text mode: the prompt text and a newline before the first user message's content),
  so tuning any model on ``messages`` is what nacd does for a receiving model;
- ``DIR/selected.jsonl``: the selection D_sel, ``{"id", "source", "messages"}`` (SEL, the baseline);
- ``DIR/hf/``: both as a Hugging Face ``datasets.DatasetDict`` (splits ``distilled`` and ``selected``,
  ``save_to_disk``; ``datasets.load_from_disk(DIR/hf)``);
- ``DIR/README.md`` (and ``DIR/hf/README.md``): a dataset card with YAML metadata (the splits for
  ``datasets.load_dataset(DIR)``, tags) and what produced it: the model, the selection, the distillation's
  settings, its prompt gain and hard-token gain, the tokens moved, the gap closed where the run measured it,
  the source corpora (whose licences apply), and the hashes of the run's files.

``--push-to-hub REPO`` uploads ``DIR`` as a dataset repository through ``huggingface_hub`` (needs a
token and a network; not exercised by the tests, which run offline).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nacd.artifacts import atomic_dir, atomic_write_text, read_jsonl, read_manifest
from nacd.errors import NacdError


def distilled_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distilled set's records as chats, the prompt text placed as text mode places it."""
    from nacd.finetune import prompted_messages

    keys = ("prompt_text", "prompt_tokens", "prompt_token_ids")
    return [
        {
            "id": rec["id"],
            "source": rec["source"],
            "messages": prompted_messages(rec["messages"], rec["prompt_text"], rec["id"]),
            **{key: rec[key] for key in keys},
        }
        for rec in records
    ]


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def card(config: Any, run_dir: Any, counts: dict[str, int], ds: Any) -> str:
    """The dataset card: YAML metadata, then what produced the data and what it measured."""
    m = ds.manifest if ds is not None else {}
    dc = m.get("distill") or {}
    files = "\n".join(f"  - split: {split}\n    path: {split}.jsonl" for split in counts)
    lines = [
        "---",
        "license: other  # the licences of the source corpora below apply",
        "task_categories:\n- text-generation",
        "tags:\n- nacd\n- data-distillation\n- instruction-tuning",
        f"configs:\n- config_name: default\n  data_files:\n{files}",
        "---",
        "",
        "# Distilled instruction data (nacd)",
        "",
        f"Made by [nacd](https://arxiv.org/abs/2504.09818)'s `nacd export` from the run folder `{run_dir.root}`.",
        "",
        "| split | examples | what |",
        "| --- | --: | --- |",
    ]
    if "distilled" in counts:
        lines.append(
            f"| distilled | {counts['distilled']} | the selected examples, each with its distilled prompt text before "
            "its first user message (what a receiving model is tuned on) |"
        )
    if "selected" in counts:
        lines.append(f"| selected | {counts['selected']} | the selection D_sel as it is (the SEL baseline) |")
    lines += [
        "",
        "## How it was made",
        "",
        f"- model: `{config.model.spec}`; corpus sources (their licences apply): "
        + ", ".join(f"`{s.path}`" for s in config.data.sources),
        f"- selection: {config.select.method}, budget {config.select.budget}",
    ]
    if ds is not None:
        lines.append(
            f"- distillation: {m.get('iterations')} iterations, k = {m.get('num_prompt_tokens')} prompt tokens, "
            f"N = {dc.get('syn_steps')}, mode `{dc.get('discrete', 'none')}`, student lr {ds.alpha:.4g}"
        )
        lines += [f"- {ds.gain_line()}", f"- {ds.hard_gain_line()}", f"- {ds.moved_line()}"]
    results = run_dir.root / "report" / "results.json"
    if results.is_file():
        gaps = (json.loads(results.read_text(encoding="utf-8")).get("summary") or {}).get("gap_closed") or {}
        for model, per in gaps.items():
            for bench, gap in per.items():
                value, lo, hi = gap.get("ratio"), gap.get("lo"), gap.get("hi")
                text = gap.get("status", "-").replace("_", " ")
                if all(isinstance(v, (int, float)) for v in (value, lo, hi)):
                    text = f"{100 * value:+.1f}% [{100 * lo:+.1f}%, {100 * hi:+.1f}%]"
                lines.append(f"- gap closed by SEL+NACD, {model} on {bench}: {text}")
    lines += ["", "## Files of the run", ""]
    for name, folder, kind in (
        ("select", run_dir.select_dir, "selection"),
        ("distill", run_dir.distill_dir, "distilled"),
    ):
        for file, record in ((read_manifest(folder, kind) or {}).get("files") or {}).items():
            if isinstance(record, dict) and "sha256" in record:
                lines.append(f"- `{name}/{file}`: sha256 `{record['sha256']}`")
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset, load_from_disk",
        'ds = load_dataset("json", data_files={"train": "distilled.jsonl"})  # or load_from_disk("hf")',
        "```",
        "",
        "Each row's `messages` is a chat (user, assistant); TRL's `SFTTrainer` and most trainers take it as it is.",
        "",
    ]
    return "\n".join(lines)


def export(config: Any, run_dir: Any, out: Path, push_to_hub: str | None = None) -> dict[str, Any]:
    """Write the run's selection and distilled set under ``out`` (see the module docstring)."""
    from datasets import Dataset, DatasetDict

    from nacd.distilled import DistilledSet

    out = Path(out)
    selected_path = run_dir.select_dir / "selected.jsonl"
    made = read_manifest(run_dir.distill_dir, "distilled")  # a distillation still running is left out
    ds = DistilledSet.load(run_dir.distill_dir) if made is not None and made.get("complete") else None
    splits: dict[str, list[dict[str, Any]]] = {}
    if ds is not None:
        splits["distilled"] = distilled_rows(ds.records)
    if selected_path.is_file():
        splits["selected"] = [{k: r[k] for k in ("id", "source", "messages")} for r in read_jsonl(selected_path)]
    if not splits:
        raise NacdError(
            f"{run_dir.root}: no selection (select/selected.jsonl) and no complete distilled set (distill/) to "
            "export; run `nacd select` and `nacd distill` (or `nacd run`) first"
        )
    out.mkdir(parents=True, exist_ok=True)
    counts = {name: len(rows) for name, rows in splits.items()}
    text = card(config, run_dir, counts, ds)
    for name, rows in splits.items():
        atomic_write_text(out / f"{name}.jsonl", _jsonl(rows))
    atomic_write_text(out / "README.md", text)
    with atomic_dir(out / "hf") as tmp:
        DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(tmp))
        (tmp / "README.md").write_text(text, encoding="utf-8")
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, repo_type="dataset", exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=push_to_hub, repo_type="dataset")
    return {"out": out, "counts": counts}
