"""Selection: random, BM25, DSIR (and the LESS dispatch): determinism, budgets, targets, the artifact."""

import hashlib
import json
import math
import sys
import types

import numpy as np
import pytest

from nacd import select as selection
from nacd.artifacts import RunDir, read_manifest
from nacd.cli import main
from nacd.config import load_config
from nacd.data import Example
from nacd.errors import NacdError


def _examples(n):
    msgs = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})
    return [Example(f"s/{i}", "s", msgs, f"f:{i}") for i in range(n)]


def _ex(id_, user, assistant, source="corpus"):
    msgs = ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})
    return Example(id_, source, msgs, f"test:{id_}")


#: A small mixed corpus: one science example, one recipe, four other off-target chats of similar length.
CORPUS = [
    _ex(
        "c/recipe",
        "Give me a simple recipe for pancakes for a weekend breakfast.",
        "Whisk flour, milk, two eggs and a pinch of sugar, then fry ladlefuls of batter in a hot buttered pan.",
    ),
    _ex(
        "c/poem",
        "Write a short poem about the sea at night.",
        "The silver waves roll slowly in, the moon above them thin, the sailors dream of home again.",
    ),
    _ex(
        "c/photosynthesis",
        "Which process do green plants use to turn sunlight, water and carbon dioxide into sugar?",
        "Photosynthesis: in the chloroplast, light energy is used to make glucose and oxygen is released.",
    ),
    _ex(
        "c/travel",
        "What should I see on a three day trip to Paris?",
        "Visit the Louvre, walk along the Seine, climb the Eiffel Tower and eat at a small bistro in Montmartre.",
    ),
    _ex(
        "c/code",
        "How do I reverse a list in Python?",
        "Use slicing with a negative step, my_list[::-1], or call my_list.reverse() to reverse it in place.",
    ),
    _ex(
        "c/email",
        "Write an email to my landlord about a broken heater.",
        "Dear landlord, the heater in my flat stopped working on Monday; could you send someone to repair it soon?",
    ),
]

#: ARC-like science questions in the target format (question prompt, gold answer).
TARGETS = [
    _ex(
        "target/1", "Question: Which gas do plants take in from the air for photosynthesis?\nAnswer:", "carbon dioxide"
    ),
    _ex("target/2", "Question: What part of a plant cell captures light energy?\nAnswer:", "the chloroplast"),
    _ex(
        "target/3", "Question: Which form of energy do green plants turn into chemical energy?\nAnswer:", "light energy"
    ),
    _ex("target/4", "Question: What do plants release into the air during the day?\nAnswer:", "oxygen"),
]


# --------------------------------------------------------------------------- budgets and random


def test_random_is_seeded_and_respects_the_budget():
    ex = _examples(100)
    a = selection.select(ex, 0.05, "random", seed=1)
    assert len(a.ids) == 5 and len(set(a.ids)) == 5
    assert a.ids == selection.select(ex, 0.05, "random", seed=1).ids
    assert a.ids != selection.select(ex, 0.05, "random", seed=2).ids
    assert len(selection.select(ex, 12, "random").ids) == 12  # a count


@pytest.mark.parametrize("method", ["random", "bm25", "dsir"])
@pytest.mark.parametrize(
    ("budget", "message"),
    [(0.001, "selects nothing"), (101, "asks for 101 examples but the corpus has 100"), (0, "must be positive")],
)
def test_bad_budgets(method, budget, message):
    with pytest.raises(NacdError, match=message):
        selection.select(_examples(100), budget, method, targets=TARGETS)


@pytest.mark.parametrize("method", ["bm25", "dsir"])
def test_budget_as_fraction_and_count(method):
    assert len(selection.select(CORPUS, 0.5, method, targets=TARGETS).ids) == 3
    sel = selection.select(CORPUS, 6, method, targets=TARGETS)
    assert sorted(sel.ids) == sorted(e.id for e in CORPUS) and len(sel.scores) == 6


# --------------------------------------------------------------------------- targets required


@pytest.mark.parametrize("method", ["bm25", "dsir", "less"])
@pytest.mark.parametrize("targets", [None, []])
def test_targeted_methods_need_targets(method, targets):
    with pytest.raises(NacdError, match=r"select\.target"):
        selection.select(CORPUS, 2, method, targets=targets)


@pytest.mark.parametrize("method", ["bm25", "dsir"])
def test_check_refuses_a_targeted_method_without_target(method):
    with pytest.raises(NacdError, match=r"select\.target.*nothing was run"):
        selection.check(load_config(None, [f"select.method={method}"]))
    selection.check(load_config(None, [f"select.method={method}", "select.target=arc_easy"]))


def test_cli_select_without_target_exits_before_any_work(tmp_path, capsys):
    code = main(["select", f"run.out_dir={tmp_path / 'run'}", "select.method=bm25"])
    assert code == 1 and "select.target" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_method_refuses():
    with pytest.raises(NacdError, match="expected one of random, bm25, dsir, less"):
        selection.select(CORPUS, 2, "kmeans", targets=TARGETS)


# --------------------------------------------------------------------------- BM25


def test_bm25_ranks_the_on_target_example_first():
    sel = selection.select(CORPUS, 2, "bm25", targets=TARGETS)
    assert sel.ids[0] == "c/photosynthesis"
    scores = dict(zip(sel.ids, sel.scores, strict=True))
    full = selection.bm25_scores(CORPUS, TARGETS)
    assert full[2] == pytest.approx(scores["c/photosynthesis"]) and full[2] > 0
    assert full[0] == 0.0  # the recipe shares no term with the targets


def test_bm25_aggregate_max_and_mean_and_determinism():
    cfg = load_config(None, ["select.bm25.aggregate=mean"])
    per_query = np.stack([selection.bm25_scores(CORPUS, [t]) for t in TARGETS])
    assert selection.bm25_scores(CORPUS, TARGETS) == pytest.approx(per_query.max(axis=0))
    assert selection.bm25_scores(CORPUS, TARGETS, cfg.select.bm25) == pytest.approx(per_query.mean(axis=0))
    a = selection.select(CORPUS, 3, "bm25", seed=0, targets=TARGETS)
    assert a == selection.select(CORPUS, 3, "bm25", seed=0, targets=TARGETS)
    assert a.ids == selection.select(CORPUS, 3, "bm25", seed=5, targets=TARGETS).ids  # no randomness at all


def test_bm25_ties_keep_corpus_order():
    sel = selection.select(CORPUS, 4, "bm25", targets=[_ex("t", "nothing in common", "zzz")])
    assert sel.ids == [e.id for e in CORPUS[:4]] and sel.scores == [0.0] * 4


# --------------------------------------------------------------------------- DSIR


def test_hashed_ngrams_are_blake2b_of_lowercase_words_and_bigrams():
    def bucket(gram):
        return int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "little") % 10000

    got = selection.hashed_ngrams("Hello, World!", 2, 10000).tolist()
    assert got == [bucket("hello"), bucket("world"), bucket("hello world")]
    assert got == [5191, 6552, 6775]  # pinned: the same in every process and version
    assert selection.hashed_ngrams("a b c", 1, 10).shape == (3,)
    assert selection.hashed_ngrams("...", 2, 10).shape == (0,)


def test_dsir_log_weights_match_a_hand_computation():
    cfg = load_config(None, ["select.dsir.ngrams=1", "select.dsir.num_buckets=1000"]).select.dsir
    buckets = {w: int(selection.hashed_ngrams(w, 1, 1000)[0]) for w in ("apple", "banana", "cherry")}
    assert len(set(buckets.values())) == 3  # no collision, so the model below is exact
    corpus = [_ex("c/1", "apple", "Apple"), _ex("c/2", "cherry", "cherry")]
    target = [_ex("t/1", "apple", "banana")]
    B = 1000  # add-one smoothing: p(b) = (count_b + 1) / (total + B)
    p_t = {"apple": 2 / (2 + B), "banana": 2 / (2 + B), "cherry": 1 / (2 + B)}
    p_raw = {"apple": 3 / (4 + B), "banana": 1 / (4 + B), "cherry": 3 / (4 + B)}
    expected = [
        2 * (math.log(p_t["apple"]) - math.log(p_raw["apple"])),
        2 * (math.log(p_t["cherry"]) - math.log(p_raw["cherry"])),
    ]
    assert selection.dsir_log_weights(corpus, target, cfg) == pytest.approx(expected, rel=1e-12)


def test_dsir_ranks_the_on_target_example_above_the_recipe():
    weights = selection.dsir_log_weights(CORPUS, TARGETS)
    ids = [e.id for e in CORPUS]
    assert weights[ids.index("c/photosynthesis")] > weights[ids.index("c/recipe")]
    assert int(np.argmax(weights)) == ids.index("c/photosynthesis")
    cfg = load_config(None, ["select.dsir.gumbel=false"])
    top = selection.select(CORPUS, 1, "dsir", targets=TARGETS, config=cfg)
    assert top.ids == ["c/photosynthesis"] and top.scores == [pytest.approx(weights.max())]


def test_dsir_gumbel_sampling_is_seeded():
    same = [_ex(f"c/{i}", "plants need light", "and water") for i in range(40)]  # equal weights: noise decides
    picks = {tuple(selection.select(same, 5, "dsir", seed=s, targets=TARGETS).ids) for s in range(4)}
    assert len(picks) > 1
    a = selection.select(same, 5, "dsir", seed=3, targets=TARGETS)
    assert a == selection.select(same, 5, "dsir", seed=3, targets=TARGETS)
    topk = load_config(None, ["select.dsir.gumbel=false"])
    assert selection.select(same, 5, "dsir", seed=9, targets=TARGETS, config=topk).ids == [f"c/{i}" for i in range(5)]


# --------------------------------------------------------------------------- LESS dispatch (no model)


def test_less_dispatches_to_less_scores(monkeypatch, tmp_path):
    calls = {}

    def fake_less_scores(config, examples, targets, workdir):
        calls.update(n=len(examples), targets=len(targets), workdir=workdir)
        return [float(i) for i in range(len(examples))]

    monkeypatch.setitem(sys.modules, "nacd.less", types.SimpleNamespace(less_scores=fake_less_scores))
    run_dir = RunDir(tmp_path / "run")
    sel = selection.select(CORPUS, 2, "less", targets=TARGETS, config=load_config(None), run_dir=run_dir)
    assert sel.ids == ["c/email", "c/code"] and sel.scores == [5.0, 4.0]
    assert calls == {"n": 6, "targets": 4, "workdir": run_dir.select_dir / "less"}


# --------------------------------------------------------------------------- load_target


def test_load_target_arc_easy_train(shared_data):
    if not (shared_data / "eval" / "arc_easy" / "train.jsonl").is_file():
        pytest.skip("no eval/arc_easy/train.jsonl in the shared data")
    cfg = load_config(None, [f"data.root={shared_data}", "select.method=bm25", "select.target=arc_easy"])
    targets = selection.load_target(cfg)
    assert len(targets) == 2251
    first = targets[0]
    assert first.id == "target/Mercury_7220990" and first.source == "arc_easy"
    assert first.messages[0] == {
        "role": "user",
        "content": "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:",
    }
    assert first.messages[1] == {"role": "assistant", "content": "a bacterial population in the bloodstream"}
    capped = load_config(None, [f"data.root={shared_data}", "select.target=arc_easy", "select.target_max_examples=7"])
    assert len(selection.load_target(capped)) == 7
    assert selection.load_target(capped) == selection.load_target(capped)


def test_load_target_mmlu_dev_uses_subjects_as_sources(shared_data):
    if not (shared_data / "eval" / "mmlu" / "dev").is_dir():
        pytest.skip("no eval/mmlu/dev in the shared data")
    cfg = load_config(None, [f"data.root={shared_data}", "select.target=mmlu", "select.target_split=dev"])
    targets = selection.load_target(cfg)
    assert {"abstract_algebra", "anatomy"} <= {t.source for t in targets}
    assert targets[0].messages[0]["content"].startswith("Question: ")


def test_load_target_jsonl_benchmark_and_instruction_data(tmp_path):
    bench = tmp_path / "quiz.jsonl"
    bench.write_text(
        json.dumps({"id": "q1", "question": "2+2?", "choices": ["3", "4"], "answer": 1, "subject": "math"}) + "\n"
    )
    targets = selection.load_target(load_config(None, [f"select.target={bench}"]))
    assert [(t.id, t.source, t.messages[1]["content"]) for t in targets] == [("target/q1", "math", "4")]

    instr = tmp_path / "mine.jsonl"
    instr.write_text("".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(5)))
    targets = selection.load_target(load_config(None, [f"select.target={instr}", "select.target_max_examples=2"]))
    assert len(targets) == 2 and all(t.source == "mine" for t in targets)
    assert targets[0].messages[-1]["role"] == "assistant"


def test_load_target_errors_name_the_key(tmp_path):
    with pytest.raises(NacdError, match=r"select\.target"):
        selection.load_target(load_config(None, ["select.method=dsir"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"instruction": "x", "output": " "}) + "\n")  # skipped: an empty response
    with pytest.raises(NacdError, match=r"select\.target.*no target examples"):
        selection.load_target(load_config(None, [f"select.target={empty}"]))
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(NacdError, match=r"unknown format: keys foo") as err:
        selection.load_target(load_config(None, [f"select.target={unknown}"]))
    assert "select.target.format" not in str(err.value)
    with pytest.raises(NacdError, match=r"select\.target"):
        selection.load_target(load_config(None, [f"select.target={tmp_path / 'missing.tsv'}"]))


# --------------------------------------------------------------------------- the stage


def test_run_writes_a_self_describing_artifact(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "select.budget=0.25"])
    run_dir = RunDir(cfg.run.out_dir)
    sel = selection.run(cfg, run_dir)
    assert len(sel.ids) == 10
    body = json.loads((run_dir.select_dir / "selection.json").read_text())
    assert body["ids"] == sel.ids and len(body["scores"]) == 10
    manifest = read_manifest(run_dir.select_dir, "selection")
    assert manifest["method"] == "random" and manifest["n_corpus"] == 40 and len(manifest["corpus_hash"]) == 64
    assert manifest["target_hash"] is None and manifest["method_config"] is None
    lines = [json.loads(x) for x in (run_dir.select_dir / "selected.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == sel.ids and lines[0]["messages"][-1]["role"] == "assistant"
    assert selection.run(cfg, run_dir).ids == sel.ids  # skipped: same selection


def test_run_bm25_on_arc_easy_skips_an_identical_selection_only(tiny_overrides, shared_data, monkeypatch):
    if not (shared_data / "eval" / "arc_easy" / "train.jsonl").is_file():
        pytest.skip("no eval/arc_easy/train.jsonl in the shared data")
    base = [*tiny_overrides, "select.method=bm25", "select.target=arc_easy", "select.target_max_examples=50"]
    cfg = load_config(None, [*base, "select.budget=5"])
    run_dir = RunDir(cfg.run.out_dir)
    sel = selection.run(cfg, run_dir)
    manifest = read_manifest(run_dir.select_dir, "selection")
    assert manifest["method_config"] == {"k1": 1.5, "b": 0.75, "aggregate": "max"}
    assert manifest["target"] == "arc_easy" and manifest["target_split"] == "train" and manifest["n_target"] == 50
    assert len(manifest["target_hash"]) == 64 and manifest["complete"] is True
    assert sel.scores == sorted(sel.scores, reverse=True) and len(sel.ids) == 5

    def refuse(*args, **kwargs):
        raise AssertionError("an identical selection must be skipped")

    monkeypatch.setattr(selection, "select", refuse)
    assert selection.run(cfg, run_dir) == sel
    monkeypatch.undo()
    mean = load_config(None, [*base, "select.budget=5", "select.bm25.aggregate=mean"])
    selection.run(mean, run_dir)  # another method config: selected again
    assert read_manifest(run_dir.select_dir, "selection")["method_config"]["aggregate"] == "mean"


#: Run by torchrun: the second process reads the run folder 3 s late, after the main process has written
#: the selection; both must still take one path (select, then meet at the same collectives).
_LATE_READER = """
import sys, time
import nacd.select as selection
from nacd.cli import main
from nacd.ranks import current

ranks = current(cpu=True)
if not ranks.is_main:
    read = selection.read_manifest

    def late(*args, **kwargs):
        time.sleep(3)
        return read(*args, **kwargs)

    selection.read_manifest = late
assert main(["select", *sys.argv[1:]]) == 0
sys.stdout.write(f"gathered {ranks.gather(ranks.rank)}\\n")
"""


def test_two_processes_take_one_path_when_one_reads_late(tiny_overrides, tmp_path):
    """CI on 2026-11-28 hung here: the second process found the main process's fresh selection, skipped,
    and went on to the next stage's collectives while the main process waited in select's barrier."""
    from conftest import torchrun

    script = tmp_path / "late_reader.py"
    script.write_text(_LATE_READER)
    args = [a for a in tiny_overrides if not a.startswith("run.out_dir=")]
    args += ["select.budget=8", "run.device=cpu", f"run.out_dir={tmp_path / 'run'}"]
    proc = torchrun([str(script), *args], 29557, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("gathered [0, 1]") == 2
    assert read_manifest(tmp_path / "run" / "select", "selection")["complete"] is True


_EXIT_CHECK = """
import atexit, sys
import torch.distributed as dist
from nacd.ranks import current

# registered before the group exists, so it runs after nacd's handler (atexit runs last-in first-out)
atexit.register(lambda: sys.stdout.write(f"group alive at exit: {dist.is_initialized()}\\n"))
ranks = current(cpu=True)
current(cpu=True)  # a second call registers nothing more
sys.stdout.write(f"gathered {ranks.gather(ranks.rank)}\\n")
"""


def test_processes_release_the_group_before_the_interpreter_ends(tmp_path):
    """CI on 2026-11-29: both processes aborted (SIGABRT, 'terminate called without an active exception')
    after their work was done, with the gloo group still alive in interpreter finalisation."""
    from conftest import torchrun

    script = tmp_path / "exit_check.py"
    script.write_text(_EXIT_CHECK)
    proc = torchrun([str(script)], 29558, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("gathered [0, 1]") == 2
    assert proc.stdout.count("group alive at exit: False") == 2, proc.stdout
