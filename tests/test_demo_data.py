"""The demo data nacd generates: deterministic, well formed, loadable by the data and eval loaders."""

import json

import pytest

from nacd import demo_data
from nacd.config import load_config
from nacd.data import load_corpus
from nacd.errors import DataError
from nacd.evaluate import load_benchmark


def test_generation_is_deterministic_and_well_formed():
    a, b = demo_data.generate(), demo_data.generate()
    assert json.dumps(a) == json.dumps(b)
    corpus, train, val = a["corpus.jsonl"], a["mc/train.jsonl"], a["mc/validation.jsonl"]
    assert len(corpus) == 2 * sum(map(len, (demo_data.CAPITALS, demo_data.ANIMALS, demo_data.ANTONYMS,
                                            demo_data.VERBS, demo_data.UNITS)))  # fmt: skip
    assert len({r["id"] for r in corpus}) == len(corpus)
    for q in train + val:
        assert len(q["choices"]) == 4 == len(set(q["choices"]))
        assert 0 <= q["answer"] < 4
    assert not {q["id"] for q in train} & {q["id"] for q in val}
    # every question asks about a fact the corpus states: the gold answer appears in some response
    responses = " ".join(r["messages"][-1]["content"] for r in corpus)
    assert all(q["choices"][q["answer"]] in responses for q in val)


def test_builtin_paths_load_through_the_data_and_eval_loaders(tmp_path, monkeypatch):
    monkeypatch.setenv("NACD_CACHE", str(tmp_path))
    cfg = load_config(None, ["data.sources=[{path: 'builtin:demo/corpus.jsonl', name: demo}]"])
    examples, _ = load_corpus(cfg.data)
    assert len(examples) == len(demo_data.generate()["corpus.jsonl"])
    assert examples[0].messages[-1]["role"] == "assistant"
    assert (tmp_path / "data" / f"demo-v{demo_data.VERSION}" / "complete").is_file()
    bench = load_benchmark("builtin:demo/mc", "validation")
    assert bench.name == "demo_mc" and len(bench.docs) == len(demo_data.generate()["mc/validation.jsonl"])
    assert len(load_benchmark("builtin:demo/mc", "train").docs) == len(demo_data.generate()["mc/train.jsonl"])
    with pytest.raises(DataError, match="unknown built-in data"):
        demo_data.builtin_path("builtin:demo/nothing.jsonl")
