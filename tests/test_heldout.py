"""The held-out instruction loss (issue #26): the split out of D_full, its disjointness checks, the
score against a hand computation on the tiny models, and the same numbers with 1 and 2 processes."""

import json
from pathlib import Path

import pytest
import torch

from nacd.chat import IGNORE_INDEX, tokenize_example
from nacd.config import DataConfig, EvalConfig, ModelConfig, SourceConfig, load_config
from nacd.data import load_corpus, split_heldout
from nacd.errors import ConfigError, DataError
from nacd.evaluate import HeldoutBenchmark, check, check_disjoint, evaluate, load_benchmarks, score_heldout
from nacd.models import load_model


def _corpus(path: Path, n: int, name: str = "c", dup_of: int | None = None) -> Path:
    """``n`` instruction records (record ``n - 1`` repeats record ``dup_of``'s content when given)."""
    rows = [
        {"instruction": f"Say the number {i} in words, {name}.", "output": f"The number is {i}, friend."}
        for i in range(n)
    ]
    if dup_of is not None:
        rows[-1] = dict(rows[dup_of])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(tmp_path: Path, heldout: float, *paths: Path, **kw) -> DataConfig:
    return DataConfig(
        root=str(tmp_path), sources=[SourceConfig(path=str(p), name=p.stem) for p in paths], heldout=heldout, **kw
    )


def test_heldout_is_drawn_before_the_cap_seeded_and_never_in_d_full(tmp_path):
    a, b = _corpus(tmp_path / "a.jsonl", 40, "a"), _corpus(tmp_path / "b.jsonl", 30, "b")
    none, _ = load_corpus(_data(tmp_path, 0, a, b))
    corpus, report = load_corpus(_data(tmp_path, 0.1, a, b))
    held = report.heldout
    assert {k: len(v) for k, v in held.items()} == {"a": 4, "b": 3}
    assert not {ex.id for ex in corpus} & {ex.id for v in held.values() for ex in v}
    assert len(corpus) == 70 - 7 and [
        ex.id for ex in none if ex.id not in {e.id for v in held.values() for e in v}
    ] == [ex.id for ex in corpus]
    again, report2 = load_corpus(_data(tmp_path, 0.1, a, b))
    assert [ex.id for ex in again] == [ex.id for ex in corpus] and report2.heldout == held
    other, _ = load_corpus(_data(tmp_path, 0.1, a, b, seed=1))
    assert [ex.id for ex in other] != [ex.id for ex in corpus]
    # a count per source, capped after the split: the cap samples what is left
    capped, report3 = load_corpus(
        DataConfig(root=str(tmp_path), sources=[SourceConfig(path=str(a), max_examples=10)], heldout=5)
    )
    assert len(report3.heldout["a"]) == 5 and len(capped) == 10
    assert not {ex.id for ex in capped} & {ex.id for ex in report3.heldout["a"]}


def test_a_duplicate_record_is_never_held_out_against_its_twin(tmp_path):
    path = _corpus(tmp_path / "d.jsonl", 10, dup_of=0)  # records 0 and 9 have the same messages
    examples, _ = load_corpus(_data(tmp_path, 0, path))
    held, rest = split_heldout(examples, 0.9, 0, "d")
    twins = {examples[0].id, examples[9].id}
    assert not twins & {ex.id for ex in held} and twins <= {ex.id for ex in rest}
    assert (
        len(held) == 8
        and len(held) + len(rest) == 10
        and [ex.id for ex in rest] == [ex.id for ex in examples if ex in rest]
    )


def test_overlaps_are_refused_naming_the_set(tmp_path):
    a = _corpus(tmp_path / "a.jsonl", 20, "a")
    twin = tmp_path / "twin.jsonl"
    twin.write_text(a.read_text())  # the same records under another source name
    corpus, report = load_corpus(_data(tmp_path, 0.2, a, twin))
    held = report.heldout["a"]
    with pytest.raises(DataError, match=r"overlap D_full \(data.sources\): \d+ example"):
        check_disjoint(held, corpus)
    clean, report = load_corpus(_data(tmp_path, 0.2, a))
    check_disjoint(report.heldout["a"], clean)  # no overlap: no error
    with pytest.raises(DataError, match=r"overlap D_sel \(run/select/selection.json\): 1 example"):
        check_disjoint(report.heldout["a"], clean, {"D_sel (run/select/selection.json)": [report.heldout["a"][0].id]})
    with pytest.raises(DataError, match="overlap the selection target"):
        check_disjoint(report.heldout["a"], clean, {"the selection target": report.heldout["a"][1:2]})


def test_the_config_names_what_is_missing(tmp_path):
    a = _corpus(tmp_path / "a.jsonl", 20, "a")
    base = [f"data.sources=[{{path: {a}, name: a}}]", f"run.out_dir={tmp_path / 'run'}"]
    with pytest.raises(DataError, match=r"data.heldout is 0: set data.heldout"):
        check(load_config(None, [*base, "eval.benchmarks=[heldout]"]))
    with pytest.raises(DataError, match=r"no source named 'b'; the sources of data.sources are a"):
        check(load_config(None, [*base, "data.heldout=0.1", "eval.benchmarks=['heldout:b']"]))
    check(load_config(None, [*base, "data.heldout=0.1", "eval.benchmarks=['heldout:a', heldout]"]))
    with pytest.raises(ConfigError, match="data.heldout"):
        load_config(None, [*base, "data.heldout=2.5"])


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma_dir"])
def test_the_loss_is_the_mean_response_nll_of_a_hand_computation(fixture, request, tmp_path):
    """Each example's loss is the mean -log p of its response tokens, rendered as training renders it
    (chat template, mask, truncation), on plain input; batches of unequal lengths change nothing."""
    model, tok = load_model(ModelConfig(spec=str(request.getfixturevalue(fixture))), torch.device("cpu"))
    a = _corpus(tmp_path / "a.jsonl", 30, "a")
    data = _data(tmp_path, 7, a, max_seq_len=24)
    _, report = load_corpus(data)
    bench = HeldoutBenchmark("heldout", report.heldout["a"], "heldout:a")
    samples = score_heldout(model, tok, bench, data, batch_size=3)
    assert [s["id"] for s in samples] == [ex.id for ex in bench.examples]
    for ex, s in zip(bench.examples, samples, strict=True):
        t = tokenize_example(ex, tok, data.max_seq_len, data.template, data.truncation)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([t.input_ids])).logits[0].float(), dim=-1)
        nll = [-logp[i - 1, t.labels[i]].item() for i in range(1, len(t.labels)) if t.labels[i] != IGNORE_INDEX]
        assert s["n_tokens"] == len(nll) > 0
        assert s["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-4, abs=1e-4)
    results, _ = evaluate(model, tok, [bench], EvalConfig(batch_size=4), data=data, progress=False)
    r = results["heldout"]
    assert r["n"] == 7 and r["loss"] == pytest.approx(sum(s["loss"] for s in samples) / 7, rel=1e-5)
    assert r["token_loss"] == pytest.approx(sum(s["nll_sum"] for s in samples) / sum(s["n_tokens"] for s in samples))
    assert r["ids"] == [ex.id for ex in bench.examples] and r["kind"] == "loss"


def test_the_stage_refuses_a_held_out_example_in_the_runs_selection(tmp_path):
    from nacd.artifacts import RunDir

    a = _corpus(tmp_path / "a.jsonl", 20, "a")
    cfg = load_config(None, [f"data.sources=[{{path: {a}, name: a}}]", "data.heldout=3", "eval.benchmarks=[heldout]"])
    run_dir = RunDir(tmp_path / "run")
    (bench,) = load_benchmarks(cfg, run_dir)
    (run_dir.select_dir).mkdir(parents=True)
    (run_dir.select_dir / "selection.json").write_text(json.dumps({"ids": [bench.examples[0].id], "scores": [0]}))
    with pytest.raises(DataError, match=r"overlap D_sel \(.*selection.json\)"):
        load_benchmarks(cfg, run_dir)


def test_two_processes_score_like_one(tiny_llama_dir, tmp_path):
    from conftest import multiprocess_overrides, torchrun_nacd

    from nacd import cli

    a = _corpus(tmp_path / "a.jsonl", 40, "a")
    b = _corpus(tmp_path / "b.jsonl", 40, "b")
    common = [
        f"model.spec={tiny_llama_dir}",
        f"data.sources=[{{path: {a}, name: a}}, {{path: {b}, name: b}}]",
        "data.heldout=0.25",
        "data.max_seq_len=32",
        "eval.benchmarks=[heldout, 'heldout:b']",
        "eval.batch_size=4",
        *multiprocess_overrides(),
    ]
    assert cli.main(["eval", *common, f"run.out_dir={tmp_path / 'one'}"]) == 0
    proc = torchrun_nacd("eval", [*common, f"run.out_dir={tmp_path / 'two'}"], 29561)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (one_dir,) = list((tmp_path / "one" / "eval").iterdir())
    two_dir = tmp_path / "two" / "eval" / one_dir.name
    one = [json.loads(x) for x in (one_dir / "samples.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (two_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["benchmark"], s["id"], s["n_tokens"]) for s in one] == [
        (s["benchmark"], s["id"], s["n_tokens"]) for s in two
    ]
    assert [s["loss"] for s in two] == pytest.approx([s["loss"] for s in one], abs=1e-6)
    r1 = json.loads((one_dir / "results.json").read_text())["benchmarks"]
    r2 = json.loads((two_dir / "results.json").read_text())["benchmarks"]
    assert set(r1) == {"heldout", "heldout_b"} and r1["heldout"]["n"] == 20 and r1["heldout_b"]["n"] == 10
    assert set(r1["heldout"]["subjects"]) == {"a", "b"}
    for bench in r1:
        assert r2[bench]["loss"] == pytest.approx(r1[bench]["loss"], abs=1e-6)
        assert sum(r2[bench]["processes"]["examples"]) == r1[bench]["n"]


def test_select_refuses_a_target_that_holds_held_out_examples(tmp_path):
    """A targeted selection whose target sample is the held-out source's own file: the held-out questions
    are among the targets, read as the multiple_choice format reads them; refused before selecting."""
    from nacd import select
    from nacd.artifacts import RunDir

    path = tmp_path / "q.jsonl"
    rows = [{"question": f"What is {i} + 1?", "choices": [str(i), str(i + 1)], "answer": 1} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [f"data.sources=[{{path: {path}, name: q}}]", "data.heldout=4", "select.method=bm25", "select.budget=3"]
    cfg = load_config(None, [*base, f"select.target={path}", f"run.out_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match=r"overlap the selection target \(select.target=.*q.jsonl\): 4 example"):
        select.run(cfg, RunDir(cfg.run.out_dir))
    other = tmp_path / "t.jsonl"
    other.write_text(json.dumps({"question": "Sky?", "choices": ["blue", "red"], "answer": 0}) + "\n")
    cfg = load_config(None, [*base, f"select.target={other}", f"run.out_dir={tmp_path / 'run2'}"])
    assert len(select.run(cfg, RunDir(cfg.run.out_dir)).ids) == 3


def test_held_out_questions_are_read_as_their_rows_write_them(shared_data):
    """Flan's CoT rows (the qa format: rationale, then 'So the answer is: X') as multiple-choice questions:
    options listed after 'Options:' (their text, their '(D)' label or their 'Sentence A' head, as the answer
    is written), yes/no answers; a row whose answer is no option (gsm8k) is no question."""
    from nacd.data import Example
    from nacd.evaluate.heldout import example_question

    def ex(question: str, answer: str, origin: str = "x/ecqa_train.tsv:3"):
        messages = (
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"Why.\nSo the answer is: {answer}"},
        )
        return Example("flan/1", "flan", messages, origin, "qa")

    doc = example_question(ex("Where?\nOptions:\n- bedroom\n- synagogue\n- roses", "bedroom"))
    assert doc.choices == ("bedroom", "synagogue", "roses") and doc.gold == 0 and doc.subject == "ecqa_train"
    assert doc.question == "Where?\nOptions:\n- bedroom\n- synagogue\n- roses"  # the prompt as the corpus has it
    doc = example_question(ex("What?\nOptions:\n- (A) DNA\n- (B) sex\n- (C) eggs", "(B)"))
    assert doc.choices == ("(A)", "(B)", "(C)") and doc.gold == 1
    sense = 'Which is odd?\nOptions:\n- Sentence A: "He drinks apple."\n- Sentence B: "He drinks milk."\n'
    doc = example_question(ex(sense, "Sentence A"))
    assert doc.choices == ("Sentence A", "Sentence B") and doc.gold == 0
    assert example_question(ex("Could the Police arrest people?", "no")).choices == ("yes", "no")
    assert example_question(ex("Could the Police arrest people?", "no")).gold == 1
    assert example_question(ex("How many clips did Natalia sell?", "72")) is None
    assert example_question(ex("Where?\nOptions:\n- a\n- b", "c")) is None  # the answer is no option
    # heldout_content: the question without its options, the options' texts scored, the same gold
    doc = example_question(ex("What?\nOptions:\n- (A) DNA\n- (B) sex\n- (C) eggs", "(B)"), content=True)
    assert (doc.question, doc.choices, doc.gold) == ("What?", ("DNA", "sex", "eggs"), 1)
    doc = example_question(ex("Where?\nOptions:\n- bedroom\n- synagogue\n- roses", "synagogue"), content=True)
    assert (doc.question, doc.choices, doc.gold) == ("Where?", ("bedroom", "synagogue", "roses"), 1)
    doc = example_question(ex(sense, "Sentence B"), content=True)  # heads are the answers: kept as written
    assert (doc.question, doc.choices, doc.gold) == (sense, ("Sentence A", "Sentence B"), 1)
    assert example_question(ex("Could the Police arrest people?", "no"), content=True).choices == ("yes", "no")
    # the shared rows: every file with options or yes/no answers gives questions, gsm8k none
    cfg = load_config(None, [f"data.root={shared_data}", "data.heldout=40", "eval.benchmarks=['heldout_mc:flan_cot']",
                             "data.sources=[{path: 'instruct/flan_cot/*_train.tsv', name: flan_cot, max_examples: 50}]"])  # fmt: skip
    (bench,) = load_benchmarks(cfg)
    assert bench.name == "heldout_mc_flan_cot" and 20 <= len(bench.docs) < 40
    assert not {d.subject for d in bench.docs} & {"gsm8k_train"} and all(
        0 <= d.gold < len(d.choices) for d in bench.docs
    )
    cfg = load_config(None, [f"data.root={shared_data}", "data.heldout=40", "eval.benchmarks=['heldout_content:flan_cot']",
                             "data.sources=[{path: 'instruct/flan_cot/*_train.tsv', name: flan_cot, max_examples: 50}]"])  # fmt: skip
    (content,) = load_benchmarks(cfg)
    assert content.name == "heldout_content_flan_cot" and [d.id for d in content.docs] == [d.id for d in bench.docs]
    assert [d.gold for d in content.docs] == [d.gold for d in bench.docs]
    assert not any("Options:" in d.question for d in content.docs if d.subject in ("qasc_train", "ecqa_train"))


def test_chat_format_scores_the_answer_as_the_assistant_turn(tiny_llama_dir, tiny_gemma_dir):
    """eval.format=chat: the prompt without its 'Answer:' is the user turn, rendered as training renders it
    (the model's chat template, or the fallback format), and each answer continues the assistant turn."""
    from nacd.chat import encode_prompt, prompt_text
    from nacd.evaluate.evaluation import chat_context
    from nacd.questions import Doc

    for folder, template in ((tiny_llama_dir, "auto"), (tiny_gemma_dir, "fallback"), (tiny_llama_dir, "fallback")):
        model, tok = load_model(ModelConfig(spec=str(folder)), torch.device("cpu"))
        messages = [{"role": "user", "content": "Question: Sky?"}]
        assert chat_context("Question: Sky?\nAnswer:", tok, template) == prompt_text(messages, tok, template)
        assert tok(prompt_text(messages, tok, template), add_special_tokens=False)["input_ids"] == encode_prompt(
            messages, tok, template
        )
        bench = __import__("nacd.evaluate", fromlist=["Benchmark"]).Benchmark(
            "b", [Doc("q", "Sky?", ("blue", "green"), 0)], "x", "validation"
        )
        results, samples = evaluate(
            model, tok, [bench], EvalConfig(format="chat"), data=DataConfig(template=template), progress=False
        )
        assert results["b"]["format"] == "chat"
        from nacd.evaluate.prompts import encode_pair

        # the model reads exactly the training rendering and the answer (lm-eval moves the prompt's trailing
        # newline into the scored continuation: the same token for every choice)
        ctx, cont = encode_pair(tok, prompt_text(messages, tok, template), "blue", {})
        assert ctx + cont == encode_prompt(messages, tok, template) + tok("blue", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
        hand = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        assert samples[0]["logprobs"][0] == pytest.approx(hand, abs=1e-3)
