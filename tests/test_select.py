"""Selection (random so far): determinism, budgets, the artifact."""

import json

import pytest

from nacd import select as selection
from nacd.artifacts import RunDir, read_manifest
from nacd.config import load_config
from nacd.data import Example
from nacd.errors import NacdError, StageNotImplementedError


def _examples(n):
    msgs = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})
    return [Example(f"s/{i}", "s", msgs, f"f:{i}") for i in range(n)]


def test_random_is_seeded_and_respects_the_budget():
    ex = _examples(100)
    a = selection.select(ex, 0.05, "random", seed=1)
    assert len(a.ids) == 5 and len(set(a.ids)) == 5
    assert a.ids == selection.select(ex, 0.05, "random", seed=1).ids
    assert a.ids != selection.select(ex, 0.05, "random", seed=2).ids
    assert len(selection.select(ex, 12, "random").ids) == 12  # a count


@pytest.mark.parametrize(
    ("budget", "message"),
    [(0.001, "selects nothing"), (101, "asks for 101 examples but the corpus has 100"), (0, "must be positive")],
)
def test_bad_budgets(budget, message):
    with pytest.raises(NacdError, match=message):
        selection.select(_examples(100), budget)


def test_unbuilt_methods_refuse():
    with pytest.raises(StageNotImplementedError, match="issue #6"):
        selection.select(_examples(10), 2, "less")


def test_run_writes_a_self_describing_artifact(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "select.budget=0.25"])
    run_dir = RunDir(cfg.run.out_dir)
    sel = selection.run(cfg, run_dir)
    assert len(sel.ids) == 10
    body = json.loads((run_dir.select_dir / "selection.json").read_text())
    assert body["ids"] == sel.ids and len(body["scores"]) == 10
    manifest = read_manifest(run_dir.select_dir, "selection")
    assert manifest["method"] == "random" and manifest["n_corpus"] == 40 and len(manifest["corpus_hash"]) == 64
    lines = [json.loads(x) for x in (run_dir.select_dir / "selected.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == sel.ids and lines[0]["messages"][-1]["role"] == "assistant"
    assert selection.run(cfg, run_dir).ids == sel.ids  # skipped: same selection
