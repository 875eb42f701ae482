"""Looking at a distilled data set: pseudo tokens beside the data (paper Figure 3), the loss curves,
and the prompt gain of the held-out panel (``nacd inspect`` and the report)."""

from __future__ import annotations

from pathlib import Path

from nacd.artifacts import read_jsonl
from nacd.distill import DistilledSet
from nacd.errors import NacdError


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
        f"mean distance to the nearest token {float(ds.nearest_dist.mean()):.4f}, "
        f"{len({tuple(r) for r in ds.nearest_ids.tolist()})} distinct prompts",
        ds.gain_line(),
        ds.moved_line(),
        ds.hard_gain_line(),
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
            f"  prompt text   : {rec['prompt_text']!r}"
            + (f" (initially {''.join(rec['initial_prompt_tokens'])!r})" if "initial_prompt_tokens" in rec else ""),
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
    draws = [(r["iteration"], d) for r in rows for d in r["draws"]]
    for t in sorted({d["start_epoch"] for _, d in draws}):
        sub = [(i, d) for i, d in draws if d["start_epoch"] == t]
        axes[0].plot([i for i, _ in sub], [d["l_distill"] for _, d in sub], "o-", ms=3, lw=1, label=f"start epoch {t}")
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


def plot_panel(folder: Path, out: Path) -> Path | None:
    """The prompt gain per evaluation with its 95% interval band, and the cosines; None without a panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(folder) / "panel.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    if not rows:
        return None
    it = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    g = [r["prompt_gain"] for r in rows]
    axes[0].fill_between(it, [x["ci_low"] for x in g], [x["ci_high"] for x in g], alpha=0.25, label="95% CI")
    axes[0].plot(it, [x["mean"] for x in g], "o-", ms=3, label="L(initial) - L(current)")
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set_title(f"prompt gain on {g[0]['draws']} held-out draws")
    axes[1].plot(it, [r["cosine"]["current"] for r in rows], "o-", ms=3, label="current prompts")
    axes[1].plot(it, [r["cosine"]["initial"] for r in rows], "o--", ms=3, label="initial prompts")
    axes[1].set_title("cosine(student path, expert path)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
