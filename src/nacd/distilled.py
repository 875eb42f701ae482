"""The distilled data set, ``<run>/distill/``: writing it (prompts, nearest tokens, records, the manifest
with the size and sha256 of each data file) and reading it back, checked, for the distilling model
(the prompt embeddings) or any other (the decoded prompt text). The files are listed in
:mod:`nacd.distill`'s docstring."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacd.artifacts import (
    atomic_save_safetensors,
    atomic_write_text,
    load_tensors,
    read_jsonl,
    read_manifest,
    read_verified,
    record_files,
    write_manifest,
)
from nacd.errors import NacdError

KIND = "distilled"
DATA_FILES = ("prompts.safetensors", "records.jsonl")  # what the manifest's ``files`` vouches for


# --------------------------------------------------------------------------- outputs


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
    from nacd.tm import candidate_rows, nearest_vocab

    syn = result["syn"].float().cpu()
    n, k, d = syn.shape
    rows = candidate_rows(student).float().cpu()

    def nearest(vectors: Any) -> tuple[Any, Any]:
        dist, idx = nearest_vocab(vectors.float().cpu().reshape(-1, d), rows, chunk)
        if student.vocab_ids is not None:
            idx = student.vocab_ids.cpu()[idx]
        return dist.reshape(n, k).detach(), idx.reshape(n, k)

    dist, idx = nearest(syn)
    init_ids = nearest(result["initial"])[1]  # what a receiving model would read had nothing been learned
    moved = idx != init_ids
    tensors = {"prompts": syn, "nearest_ids": idx, "nearest_dist": dist, "initial_ids": init_ids}
    if result.get("continuous") is not None:  # pez: the continuous copy the projection was taken of
        tensors["continuous"] = result["continuous"].float().cpu()
    atomic_save_safetensors(
        tensors,
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
                    "initial_prompt_tokens": [tokenizer.decode([t]) for t in init_ids[i].tolist()],
                    "initial_prompt_text": tokenizer.decode(init_ids[i].tolist()),
                    "nearest_distance": [round(x, 6) for x in dist[i].tolist()],
                    "messages": list(ex.messages),
                },
                ensure_ascii=False,
            )
        )
    atomic_write_text(folder / "records.jsonl", "\n".join(lines) + "\n")
    st = result["state"]
    panel = result.get("panel")
    gain = None
    if panel is not None:
        gain = {key: panel["prompt_gain"][key] for key in ("mean", "relative", "ci_low", "ci_high", "draws")}
        gain.update(
            iteration=panel["iteration"],
            cosine=panel["cosine"],
            l_initial_mean=panel["l_initial_mean"],
            l_current_mean=panel["l_current_mean"],
        )
    write_manifest(
        folder,
        KIND,
        **identity,
        alpha=result["alpha"],
        alphas=result.get("alphas", [result["alpha"]]),
        prompt_gain=gain,
        prompt_gain_hard=result.get("hard_gain"),
        alpha_fit=result.get("alpha_fit"),
        unroll=result.get("unroll"),
        processes=result.get("processes"),
        distinct_prompts=len({tuple(row) for row in idx.tolist()}),
        tokens_moved=int(moved.sum()),
        examples_moved=int(moved.any(dim=1).sum()),
        n_examples=n,
        num_prompt_tokens=k,
        hidden_size=d,
        iterations=st.iteration,
        skipped_iterations=st.skipped,
        seconds=round(st.seconds, 2),
        mean_nearest_distance=float(dist.mean()),
        files=record_files(folder, DATA_FILES),
        complete=True,
    )


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
    initial_ids: Any = None  # (n, k): the initial prompts' nearest tokens (absent in sets written before 2026-11-29)

    @classmethod
    def load(cls, folder: str | Path) -> DistilledSet:
        folder = Path(folder)
        manifest = read_manifest(folder, KIND)
        if manifest is None or not manifest.get("complete"):
            raise NacdError(f"{folder}: no complete distilled data set (run `nacd distill`)")
        files = manifest.get("files") or {}  # absent in sets written before nacd recorded files
        fix = f"the distilled set is damaged; delete {folder} and run `nacd distill` again"
        tensors = load_tensors(folder / "prompts.safetensors", files.get("prompts.safetensors"), fix)
        text = read_verified(folder / "records.jsonl", files.get("records.jsonl"), fix).decode("utf-8")
        missing = [key for key in ("prompts", "nearest_ids", "nearest_dist") if key not in tensors]
        if missing:
            raise NacdError(f"{folder / 'prompts.safetensors'}: no tensor {missing[0]!r}; {fix}")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return cls(
            folder,
            manifest,
            tensors["prompts"],
            tensors["nearest_ids"],
            tensors["nearest_dist"],
            records,
            tensors.get("initial_ids"),
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

    def initial_embeddings(self, example_id: str, embedding: Any) -> Any:
        """The (k, d) embedding rows of one example's initial tokens (``finetune.prompts=initial``), from the
        distilling model's input ``embedding`` matrix."""
        if self.initial_ids is None:
            raise NacdError(f"{self.folder}: the set records no initial tokens (made before nacd kept them); "
                            "run `nacd distill` again to tune on them")  # fmt: skip
        return embedding[self.initial_ids[self.ids.index(example_id)]].detach().float().cpu()

    def prompt_texts(self, which: str = "learned") -> dict[str, str]:
        """Example id -> the decoded prompt text a receiving model reads: the learned prompts' nearest tokens,
        or (``initial``) the initial prompts' (joined token strings in sets made before the text was kept)."""
        if which == "learned":
            return {r["id"]: r["prompt_text"] for r in self.records}
        if self.records and "initial_prompt_tokens" not in self.records[0]:
            raise NacdError(f"{self.folder / 'records.jsonl'}: no initial_prompt_tokens (a set made before nacd "
                            "kept them); run `nacd distill` again to tune on them")  # fmt: skip
        return {r["id"]: r.get("initial_prompt_text", "".join(r["initial_prompt_tokens"])) for r in self.records}

    def history(self) -> list[dict[str, Any]]:
        return read_jsonl(self.folder / "history.jsonl")

    def panel(self) -> list[dict[str, Any]]:
        """The prompt-gain evaluations (``panel.jsonl``; empty when the diagnostic was off)."""
        path = self.folder / "panel.jsonl"
        return read_jsonl(path) if path.is_file() else []

    def moved_line(self) -> str:
        """How many prompt vectors decode to another token than their initial one: what a receiving model
        (which reads the nearest tokens as text) gets that the initialisation alone would not give it."""
        if self.initial_ids is None:
            return "nearest tokens against the initial ones: not recorded (a set written before nacd kept them)"
        moved = self.nearest_ids != self.initial_ids
        return (
            f"nearest tokens: {int(moved.sum())} of {moved.numel()} prompt vectors left their initial token "
            f"({int(moved.any(dim=1).sum())} of {moved.shape[0]} examples decode to new text for a receiving model)"
        )

    def skipped_line(self) -> str | None:
        """A warning when iterations were skipped (a non-finite loss or gradient): the set is complete but
        learned from fewer updates than asked; None when none was."""
        skipped = int(self.manifest.get("skipped_iterations") or 0)
        if not skipped:
            return None
        return (
            f"warning: {skipped} of {self.manifest.get('iterations')} distillation iterations were skipped (a "
            "non-finite loss or gradient; history.jsonl says which): the prompts learned from fewer updates"
        )

    def hard_gain_line(self) -> str:
        """The prompt gain of the decoded tokens against the initial tokens (``prompt_gain_hard``): what the
        text a receiving model reads carries of what was learned."""
        from nacd.panel import gain_line

        g = self.manifest.get("prompt_gain_hard")
        if not g:
            return "hard-token gain: not measured (distill.panel_size=0, or a set written before nacd measured it)"
        row = {"iteration": self.manifest.get("iterations"), "prompt_gain": g, "l_initial_mean": g["l_initial_mean"]}
        return gain_line(
            row, "hard-token gain (the decoded tokens against the initial ones, what a receiving model reads)"
        )

    def gain_line(self) -> str:
        """The final prompt gain in one line (or why there is none)."""
        from nacd.panel import gain_line

        rows = self.panel()
        return gain_line(rows[-1]) if rows else "prompt gain: not measured (distill.panel_size=0)"
