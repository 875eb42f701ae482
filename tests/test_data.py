"""Tests of nacd.data: loading every format, bad input, mixing, the loss mask, truncation, batches."""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import re
from pathlib import Path

import pytest

from nacd.chat import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    corpus_stats,
    encode_prompt,
    tokenize_corpus,
    tokenize_example,
)
from nacd.config import DataConfig, SourceConfig
from nacd.data import Example, LoadReport, corpus_hash, detect_format, load_corpus, load_source
from nacd.errors import DataError

DOLLY = "instruct/dolly/dolly_subset_dev1000.jsonl"
OASST1 = "instruct/oasst1/oasst1_en_validation_paths_messages.jsonl"
FLAN_COT = "instruct/flan_cot/*_train.tsv"
SNI = "instruct/sni/sni_dev500.jsonl"

CHAT = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 12 times 4?"},
    {"role": "assistant", "content": "The answer is 48."},
)


# --------------------------------------------------------------------------- helpers


def write_jsonl(path: Path, records: list) -> Path:
    """One JSON value per line (a str is written verbatim, for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def load(path: str | Path, root: str | Path = ".", strict: bool = False, **kw) -> tuple[list[Example], LoadReport]:
    report = LoadReport()
    examples = load_source(SourceConfig(path=str(path), **kw), root, strict, report, key="data.sources.0")
    return examples, report


def raw_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def loss_runs(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each contiguous run of loss-carrying positions."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def example(messages=CHAT, origin="chat.jsonl:7", fmt="chat") -> Example:
    return Example("t/1", "t", tuple(dict(m) for m in messages), origin, fmt)


# --------------------------------------------------------------------------- real shared-data slices


def test_dolly_instruction_with_context_and_extra_prompt_field(shared_data: Path) -> None:
    examples, report = load(DOLLY, shared_data, name="dolly")
    raw = raw_lines(shared_data / DOLLY)
    assert report.available == {"dolly": 1000} and len(examples) == 1000 and not report.skipped
    assert {"instruction", "input", "output", "prompt"} <= set(raw[0])
    assert detect_format(raw[0]) == "instruction"  # not prompt_completion, despite `prompt`
    first = examples[0]
    assert first.format == "instruction"
    assert first.origin == f"{shared_data / DOLLY}:1"
    assert raw[0]["input"]  # the first Dolly row has a context: it follows the instruction
    assert first.messages == (
        {"role": "user", "content": raw[0]["instruction"] + "\n\n" + raw[0]["input"]},
        {"role": "assistant", "content": raw[0]["output"]},
    )
    no_context = next(i for i, r in enumerate(raw) if not r["input"].strip())
    assert examples[no_context].messages[0]["content"] == raw[no_context]["instruction"]
    assert re.fullmatch(r"dolly/[0-9a-f]{12}", first.id)
    assert len({e.id for e in examples}) == 1000


def test_oasst1_multi_turn_keeps_turns_and_upstream_ids(shared_data: Path) -> None:
    examples, report = load(OASST1, shared_data)
    raw = raw_lines(shared_data / OASST1)
    assert report.available == {"oasst1_en_validation_paths_messages": 1241}
    assert examples[1].id == f"oasst1_en_validation_paths_messages/{raw[1]['id']}"
    assert len(raw[1]["messages"]) == 4
    assert [m["role"] for m in examples[1].messages] == ["user", "assistant", "user", "assistant"]
    assert list(examples[1].messages) == [{"role": m["role"], "content": m["content"]} for m in raw[1]["messages"]]
    assert examples[1].origin.endswith("oasst1_en_validation_paths_messages.jsonl:2")


def test_flan_cot_tsv_glob_unescapes_newlines_and_keeps_quotes(shared_data: Path) -> None:
    examples, report = load(FLAN_COT, shared_data)
    files = sorted((shared_data / "instruct/flan_cot").glob("*_train.tsv"))
    lines = sum(f.read_bytes().count(b"\n") for f in files)
    assert len(files) == 7 and report.available == {"flan_cot": lines} and not report.skipped
    assert len({e.id for e in examples}) == lines  # ids are unique across the files of the one source
    first = examples[0]  # aqua_train.tsv, line 1
    assert first.origin == f"{files[0]}:1" and files[0].name == "aqua_train.tsv"
    question, answer, rationale = files[0].read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert "\\n" in question  # stored escaped on disk ...
    assert first.messages[0]["content"] == question.replace("\\n", "\n")  # ... a real newline after loading
    assert "Options:\n(A) 300\n(B) 992" in first.messages[0]["content"]
    assert first.messages[1]["content"] == rationale.replace("\\n", "\n") + "\nSo the answer is: (C)"
    assert answer == "(C)"
    # creak_train.tsv line 2 starts with a quote: TSV cells are not CSV-quoted, so it stays
    creak = next(e for e in examples if e.origin.endswith("creak_train.tsv:2"))
    assert creak.messages[0]["content"].startswith('"Marlboro used iconic imagery to promote its brand."\nIs the')


def test_sni_instruction_with_input(shared_data: Path) -> None:
    examples, _ = load(SNI, shared_data)
    raw = raw_lines(shared_data / SNI)
    assert len(examples) == 500 and examples[3].format == "instruction"
    assert examples[3].messages[0]["content"] == f"{raw[3]['instruction']}\n\n{raw[3]['input']}"
    assert examples[3].messages[1]["content"] == raw[3]["output"]


def test_default_mix_caps_each_source(shared_data: Path) -> None:
    cfg = DataConfig(root=str(shared_data))
    examples, report = load_corpus(cfg)
    assert report.loaded == {"dolly": 100, "oasst1": 100, "flan_cot": 100, "sni": 100}
    assert report.available["dolly"] == 1000 and report.available["sni"] == 500
    assert [e.source for e in examples[::100]] == ["dolly", "oasst1", "flan_cot", "sni"]
    summary = report.summary()
    assert "loaded 400 examples from 4 source(s)" in summary and "100 of 1241" in summary


# --------------------------------------------------------------------------- generated formats


def test_sharegpt_conversations(tmp_path: Path) -> None:
    conv = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "user", "value": "Bye"},
        {"from": "bot", "value": "Goodbye."},
    ]
    path = write_jsonl(tmp_path / "sg.jsonl", [{"id": 7, "conversations": conv}])
    (ex,), _ = load(path)
    assert ex.format == "chat" and ex.id == "sg/7"
    assert ex.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    )


def test_prompt_completion_and_qa_without_rationale(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    (ex,), _ = load(path)
    assert ex.format == "prompt_completion" and ex.messages[1] == {"role": "assistant", "content": "4"}
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A", "rationale": ""}])
    (ex,), _ = load(path)
    assert ex.format == "qa" and ex.messages[1]["content"] == "A"


def test_multiple_choice_rows_read_as_the_evaluation_prompts_them(tmp_path: Path) -> None:
    """ARC rows (choices {text, label}, answerKey) and {question, choices, answer} rows become the text
    protocol's prompt and the gold choice; detection prefers them over qa; bad answers are skipped by field."""
    from nacd.evaluate import doc_from_record, doc_to_text

    arc = {
        "id": "Mercury_1",
        "question": "Which is a gas at room temperature?",
        "choices": {"text": ["iron", "oxygen", "salt"], "label": ["1", "2", "3"]},
        "answerKey": "2",
    }
    rows = [
        arc,
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
        {"question": "Sky?", "choices": ["green", "blue"], "answer": "B"},
        {"question": "Bad?", "choices": ["x", "y"], "answer": 5},
        {"question": "Bad?", "choices": "x", "answer": 0},
    ]
    examples, report = load(write_jsonl(tmp_path / "train.jsonl", rows))
    assert [ex.format for ex in examples] == ["multiple_choice"] * 3
    assert examples[0].messages == (
        {"role": "user", "content": doc_to_text(doc_from_record(arc, "x", "x"), "text")},
        {"role": "assistant", "content": "oxygen"},
    )
    assert examples[0].messages[0]["content"] == "Question: Which is a gas at room temperature?\nAnswer:"
    assert [ex.messages[1]["content"] for ex in examples[1:]] == ["4", "blue"]
    assert report.skip_counts() == {"bad multiple-choice field": 2}
    assert sorted(s.field for s in report.skipped) == ["answer", "choices"]
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"q": "2+2?", "options": ["3", "4"], "gold": 0}])
    (ex,), _ = load(renamed, fields={"question": "q", "choices": "options", "answer": "gold"})
    assert ex.format == "multiple_choice" and ex.messages[1]["content"] == "3"
    with pytest.raises(DataError, match=r"train\.jsonl:4: field .answer."):
        load(tmp_path / "train.jsonl", strict=True)


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_array_rows(tmp_path: Path, wrapped: bool) -> None:
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "ctx", "response": "d"}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": rows} if wrapped else rows), encoding="utf-8")
    examples, _ = load(path)
    assert [e.origin for e in examples] == [f"{path}:row 0", f"{path}:row 1"]
    assert examples[1].messages == ({"role": "user", "content": "c\n\nctx"}, {"role": "assistant", "content": "d"})


def test_csv_with_header_and_multiline_quoted_cell(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["instruction", "input", "output", "category"])
        writer.writerow(["Say hi", "", "hi", "x"])
        writer.writerow(["Two\nlines", "", "ok \\n kept", "y"])
        writer.writerow(["Third", "", "three", "z"])
    examples, _ = load(path)
    assert [e.origin for e in examples] == [f"{path}:2", f"{path}:3", f"{path}:5"]  # a record starts on its first line
    assert examples[1].messages[0]["content"] == "Two\nlines"
    assert examples[1].messages[1]["content"] == "ok \\n kept"  # CSV cells are not unescaped


def test_headerless_csv_needs_columns_and_fields_rename(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("Say hi,hello\nSay bye,goodbye\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"plain\.csv:1: .*set data\.sources\.0\.columns"):
        load(path)
    examples, _ = load(path, columns=["q", "a"], fields={"instruction": "q", "output": "a"})
    assert [e.messages[1]["content"] for e in examples] == ["hello", "goodbye"]
    assert examples[0].format == "instruction"


def test_tsv_with_header(tmp_path: Path) -> None:
    path = tmp_path / "h.tsv"
    path.write_text("prompt\tcompletion\nline one\\nline two\tdone\n", encoding="utf-8")
    (ex,), _ = load(path)
    assert ex.messages[0]["content"] == "line one\nline two" and ex.origin == f"{path}:2"


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "v"}, {"role": "assistant", "content": "b"}]},
    ]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples, _ = load(path)
    assert [e.origin for e in examples] == [f"{path}:row 0", f"{path}:row 1"]
    assert examples[1].messages[1] == {"role": "assistant", "content": "b"}


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep `datasets` offline and its cache in tmp_path."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_datasets_folder_path(tmp_path: Path, datasets_cache: None) -> None:
    folder = tmp_path / "my_corpus"
    write_jsonl(folder / "part.jsonl", [{"question": "Q1", "answer": "A1"}, {"question": "Q2", "answer": "A2"}])
    examples, report = load(folder)
    assert report.available == {"my_corpus": 2}
    assert examples[1].origin == f"{folder}[train]:row 1"
    assert examples[1].messages == ({"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"})
    with pytest.raises(DataError, match=r"data\.sources\.0\.path: datasets\.load_dataset.*split='validation'"):
        load(folder, split="validation")


def test_hub_id_offline_is_a_data_error(datasets_cache: None) -> None:
    with pytest.raises(DataError, match=r"data\.sources\.0\.path: datasets\.load_dataset\('nobody/nothing'"):
        load("hf:nobody/nothing")


# --------------------------------------------------------------------------- paths


def test_relative_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cwd = tmp_path / "root", tmp_path / "cwd"
    write_jsonl(root / "d.jsonl", [{"prompt": "from root", "completion": "x"}])
    write_jsonl(cwd / "d.jsonl", [{"prompt": "from cwd", "completion": "x"}])
    monkeypatch.chdir(tmp_path)
    (ex,), _ = load("d.jsonl", root)
    assert ex.messages[0]["content"] == "from root"
    monkeypatch.chdir(cwd)
    (ex,), _ = load("d.jsonl", root)  # exists relative to the CWD: taken as is
    assert ex.messages[0]["content"] == "from cwd"


def test_missing_file_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"data\.sources\.0\.path: file not found: .*" + re.escape(str(tmp_path / "nope.jsonl"))
    ):
        load("nope.jsonl", tmp_path)
    with pytest.raises(DataError, match=r"data\.sources\.0\.path: no file matches"):
        load("sub/*.tsv", tmp_path)
    with pytest.raises(DataError, match=r"not a file with a known extension"):
        load(str(tmp_path / "no_such_folder"), tmp_path)


# --------------------------------------------------------------------------- bad input

BAD_INSTRUCTION_LINES = [
    ('{"instruction": "a", "output": "b"', "", "malformed JSON"),
    ({"instruction": "a"}, "output", "missing field"),
    ({"instruction": "a", "output": 3}, "output", "not a string"),
    ({"instruction": "a", "output": "  "}, "output", "empty response"),
    ('["a", "b"]', "", "not a JSON object"),
]
BAD_CHAT_LINES = [
    (
        {"messages": [{"role": "user", "content": "u"}, {"role": "robot", "content": "a"}]},
        "messages[1].role",
        "bad role",
    ),
    (
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]},
        "messages[1].content",
        "empty response",
    ),
    (
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]},
        "messages",
        "no final assistant turn",
    ),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "messages", "no user turn first"),
    (
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
        "messages",
        "no user turn first",
    ),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "messages[0].content", "missing field"),
    ({"messages": []}, "messages", "empty conversation"),
]
GOOD = {
    "instruction": {"instruction": "fine", "output": "ok"},
    "chat": {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
}


@pytest.mark.parametrize(
    ("kind", "bad", "field", "reason"),
    [("instruction", *case) for case in BAD_INSTRUCTION_LINES] + [("chat", *case) for case in BAD_CHAT_LINES],
)
def test_bad_record_strict_and_skipped(tmp_path: Path, kind: str, bad, field: str, reason: str) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD[kind], bad, GOOD[kind]])
    examples, report = load(path)
    assert [e.origin for e in examples] == [f"{path}:1", f"{path}:3"]
    (skip,) = report.skipped
    assert (skip.origin, skip.field, skip.reason) == (f"{path}:2", field, reason)
    assert report.skip_counts() == {reason: 1}
    where = f"{path}:2: field '{field}'" if field else f"{path}:2"
    with pytest.raises(DataError, match=re.escape(f"{where}: {reason}")):
        load(path, strict=True)


def test_unknown_format_is_an_error_even_when_not_strict(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "x", "label": 1}, GOOD["instruction"]])
    with pytest.raises(
        DataError, match=re.escape(f"{path}:1: unknown format: keys label, text; expected one of: chat")
    ) as info:
        load(path)
    assert "data.sources.0.format" in str(info.value)
    with pytest.raises(DataError, match=re.escape(f"{path}:1: unknown format")):
        load(path, strict=True)
    # a malformed first line does not decide the format: the first valid record does
    path = write_jsonl(tmp_path / "late.jsonl", ["{oops", GOOD["instruction"]])
    examples, report = load(path)
    assert len(examples) == 1 and report.skip_counts() == {"malformed JSON": 1}


def test_explicit_format_reports_missing_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: field 'question': missing field: record keys: text")):
        load(path, strict=True, format="qa")


def test_file_without_examples_and_empty_corpus(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{empty}: no examples")):
        load(empty, strict=True)
    examples, report = load(empty)
    assert examples == [] and report.skip_counts() == {"no examples": 1}
    bad_only = write_jsonl(tmp_path / "bad.jsonl", ["{", "{"])
    cfg = DataConfig(root=str(tmp_path), sources=[SourceConfig(path="empty.jsonl"), SourceConfig(path="bad.jsonl")])
    with pytest.raises(DataError, match="empty corpus"):
        load_corpus(cfg)
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD["instruction"]])
    cfg.sources.append(SourceConfig(path=str(good)))
    examples, report = load_corpus(cfg)
    assert len(examples) == 1 and report.skip_counts() == {"malformed JSON": 2, "no examples": 2}
    assert str(bad_only) in {s.origin for s in report.skipped}


def test_first_skips_are_logged_then_a_summary(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "many.jsonl", [GOOD["instruction"]] + ["{"] * 15)
    cfg = DataConfig(root=str(tmp_path), sources=[SourceConfig(path="many.jsonl")])
    with caplog.at_level(logging.WARNING, logger="nacd.data"):
        _, report = load_corpus(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(report.skipped) == 15
    assert sum(m.startswith(f"skipped {path}:") for m in warnings) == 10
    assert any("skipped 15 records in all (15 malformed JSON)" in m for m in warnings)


def test_duplicate_source_names(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [GOOD["instruction"]])
    cfg = DataConfig(root=str(tmp_path), sources=[SourceConfig(path="a.jsonl"), SourceConfig(path="a.jsonl")])
    with pytest.raises(DataError, match=r"data\.sources\.1\.name: two sources are named 'a'"):
        load_corpus(cfg)


# --------------------------------------------------------------------------- ids, caps, hashes


def test_stable_ids_and_duplicate_suffixes(tmp_path: Path) -> None:
    rec = {"instruction": "same", "output": "same"}
    path = write_jsonl(tmp_path / "dup.jsonl", [rec, {"instruction": "other", "output": "x"}, rec, rec])
    first, _ = load(path, name="s")
    again, _ = load(path, name="s")
    ids = [e.id for e in first]
    assert ids == [e.id for e in again]
    assert re.fullmatch(r"s/[0-9a-f]{12}", ids[0]) and ids[1] != ids[0]
    assert ids[2:] == [ids[0] + "-2", ids[0] + "-3"]
    path = write_jsonl(tmp_path / "up.jsonl", [{"id": "q", **rec}, {"id": "q", **rec}, {"id": "q-2", **rec}])
    assert [e.id for e in load(path, name="u")[0]] == ["u/q", "u/q-2", "u/q-2-2"]


def test_caps_are_seeded_ordered_and_independent_per_source(tmp_path: Path) -> None:
    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)]
    write_jsonl(tmp_path / "one.jsonl", records)
    write_jsonl(tmp_path / "two.jsonl", records)

    def lines(seed: int) -> tuple[list[int], list[int], LoadReport]:
        cfg = DataConfig(
            root=str(tmp_path),
            seed=seed,
            sources=[SourceConfig(path="one.jsonl", max_examples=10), SourceConfig(path="two.jsonl", max_examples=10)],
        )
        examples, report = load_corpus(cfg)
        by = {s: [int(e.origin.rsplit(":", 1)[1]) for e in examples if e.source == s] for s in ("one", "two")}
        return by["one"], by["two"], report

    one, two, report = lines(0)
    assert report.loaded == {"one": 10, "two": 10} and report.available == {"one": 50, "two": 50}
    assert one == sorted(one) and len(set(one)) == 10  # file order kept
    assert lines(0)[:2] == (one, two)  # deterministic
    assert one != two  # the source name enters the seed
    assert lines(1)[0] != one


def test_corpus_hash_is_content_and_order_sensitive() -> None:
    a = example()
    b = Example("t/2", "t", (CHAT[1], {"role": "assistant", "content": "other"}), "x:2")
    h = corpus_hash([a, b])
    assert h == corpus_hash([example(), b]) and re.fullmatch(r"[0-9a-f]{64}", h)
    assert corpus_hash([b, a]) != h
    changed = example(messages=(*CHAT[:-1], {"role": "assistant", "content": "The answer is 49."}))
    assert corpus_hash([changed, b]) != h


# --------------------------------------------------------------------------- loss mask


def test_chat_template_mask_is_exactly_the_responses(tiny_llama_tokenizer) -> None:
    tok = tiny_llama_tokenizer
    t = tokenize_example(example(), tok, 512)
    end = "<|im_end|>"
    turn = [f"<|im_start|>{m['role']}\n{m['content']}{end}\n" for m in CHAT]
    assert tok.decode(t.input_ids) == "".join(turn)
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(t.input_ids, t.labels, strict=True))
    runs = loss_runs(t.input_ids, t.labels)
    assert [tok.decode(t.input_ids[a:b]) for a, b in runs] == [CHAT[2]["content"] + end, CHAT[4]["content"] + end]
    # independently: a response starts after the tokens of the text before it and ends with <|im_end|>
    expected = []
    for k in (2, 4):
        head = "".join(turn[:k]) + "<|im_start|>assistant\n"
        upto = head + CHAT[k]["content"] + end
        expected.append(
            (len(tok(head, add_special_tokens=False).input_ids), len(tok(upto, add_special_tokens=False).input_ids))
        )
    assert runs == expected
    assert not t.truncated
    assert encode_prompt(CHAT[:4], tok) == t.input_ids[: runs[1][0]]


def test_fallback_mask_and_bos(tiny_gemma_tokenizer) -> None:
    tok = tiny_gemma_tokenizer
    assert not tok.chat_template
    t = tokenize_example(example(), tok, 512)  # auto -> fallback
    text = (
        "System: You are a helpful assistant.\n\nUser: What is 2 + 3?\n\nAssistant: 2 + 3 = 5.<eos>\n\n"
        "User: And 12 times 4?\n\nAssistant: The answer is 48.<eos>\n\n"
    )
    assert t.input_ids[0] == tok.bos_token_id and t.input_ids.count(tok.bos_token_id) == 1
    assert tok.decode(t.input_ids) == "<bos>" + text
    runs = loss_runs(t.input_ids, t.labels)
    assert [tok.decode(t.input_ids[a:b]) for a, b in runs] == [" 2 + 3 = 5.<eos>", " The answer is 48.<eos>"]
    # the prompt encoder stops exactly where the first response begins
    assert encode_prompt(CHAT[:2], tok) == t.input_ids[: runs[0][0]]
    assert encode_prompt(CHAT[:4], tok) == t.input_ids[: runs[1][0]]  # history includes the first <eos>


class NoOffsets:
    """A view of a tokenizer that cannot give offsets (like a slow, Python tokenizer)."""

    is_fast = False

    def __init__(self, tok) -> None:
        self._tok = tok

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def __call__(self, text: str, **kw):
        assert "return_offsets_mapping" not in kw
        return self._tok(text, **kw)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_mask_without_offsets(kind: str, tiny_llama_tokenizer, tiny_gemma_tokenizer) -> None:
    tok = tiny_llama_tokenizer if kind == "llama" else tiny_gemma_tokenizer
    fast = tokenize_example(example(), tok, 512)
    slow = tokenize_example(example(), NoOffsets(tok), 512)
    decode = [tok.decode(t.input_ids[a:b]) for t in (fast, slow) for a, b in loss_runs(t.input_ids, t.labels)]
    assert decode[:2] == decode[2:] and len(decode) == 4
    assert tok.decode(slow.input_ids) == tok.decode(fast.input_ids)


def test_template_choice(tiny_llama_tokenizer, tiny_gemma_tokenizer) -> None:
    t = tokenize_example(example(), tiny_llama_tokenizer, 512, template="fallback")
    text = tiny_llama_tokenizer.decode(t.input_ids)
    assert text.startswith("System: You are") and text.endswith("Assistant: The answer is 48.<|im_end|>\n\n")
    # this tokenizer does not put a bos in front by itself, so the fallback does not either
    assert t.input_ids[0] != tiny_llama_tokenizer.bos_token_id
    with pytest.raises(DataError, match="data.template=model, but the tokenizer has no chat_template"):
        tokenize_example(example(), tiny_gemma_tokenizer, 512, template="model")


def test_template_that_cannot_be_masked_by_prefixes(tiny_llama_tokenizer) -> None:
    tok = copy.deepcopy(tiny_llama_tokenizer)
    tok.chat_template = "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    with pytest.raises(
        DataError,
        match=r"chat\.jsonl:7: this chat template cannot be masked by prefix rendering.*data\.template=fallback",
    ):
        tokenize_example(example(), tok, 512)


# --------------------------------------------------------------------------- truncation


def long_example(prompt_words: int, answer_words: int) -> Example:
    prompt = "Question: " + " ".join(["The quick brown fox jumps over the lazy dog."] * prompt_words)
    answer = " ".join(["The capital of France is Paris."] * answer_words)
    return example(messages=({"role": "user", "content": prompt}, {"role": "assistant", "content": answer}), fmt="qa")


def test_keep_response_truncation(tiny_llama_tokenizer) -> None:
    tok = tiny_llama_tokenizer
    full = tokenize_example(long_example(20, 2), tok, 4096)
    (resp,) = loss_runs(full.input_ids, full.labels)
    assert resp[1] - resp[0] <= 24 and len(full.input_ids) > 100
    t = tokenize_example(long_example(20, 2), tok, 48)
    assert t.truncated and len(t.input_ids) == 48
    n = resp[1] - resp[0]
    assert t.input_ids[-n - 1 :] == full.input_ids[resp[0] - 1 : resp[1]]  # whole response + the line before it
    assert t.labels[-n:] == full.labels[resp[0] : resp[1]] and all(x == IGNORE_INDEX for x in t.labels[:-n])
    tail = min(16, (48 - n) // 2)
    assert (
        t.input_ids[: 48 - n - tail] == full.input_ids[: 48 - n - tail]
    )  # head of the prompt (system, question start)
    assert t.input_ids[48 - n - tail : 48 - n] == full.input_ids[resp[0] - tail : resp[0]]  # assistant header


def test_keep_response_keeps_the_start_of_a_long_response(tiny_llama_tokenizer) -> None:
    full = tokenize_example(long_example(20, 20), tiny_llama_tokenizer, 4096)
    ((start, end),) = loss_runs(full.input_ids, full.labels)
    t = tokenize_example(long_example(20, 20), tiny_llama_tokenizer, 64)
    assert end - start > 32 and len(t.input_ids) == 64
    assert loss_runs(t.input_ids, t.labels) == [(32, 64)]
    assert t.input_ids[32:] == full.input_ids[start : start + 32]


def test_right_truncation_and_no_response_left(tiny_llama_tokenizer) -> None:
    tok = tiny_llama_tokenizer
    short = example(messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is 48."}))
    full = tokenize_example(short, tok, 512)
    t = tokenize_example(short, tok, len(full.input_ids) - 3, truncation="right")
    assert t.truncated and t.input_ids == full.input_ids[:-3] and t.labels == full.labels[:-3]
    with pytest.raises(
        DataError, match=re.escape("chat.jsonl:7: field 'answer': no response tokens left after truncation")
    ):
        tokenize_example(long_example(20, 2), tok, 48, truncation="right")
    cfg = DataConfig(max_seq_len=len(full.input_ids), truncation="right")  # the short example just fits
    report = LoadReport()
    out = tokenize_corpus([long_example(20, 2), short], tok, cfg, report)
    assert [x.input_ids for x in out] == [full.input_ids]
    assert report.skip_counts() == {"no response tokens left after truncation": 1}
    assert report.skipped[0].origin == "chat.jsonl:7"
    cfg.strict = True
    with pytest.raises(DataError, match="field 'answer': no response tokens left after truncation"):
        tokenize_corpus([long_example(20, 2), short], tok, cfg)
    with pytest.raises(DataError, match="empty corpus"):
        tokenize_corpus([long_example(20, 2)], tok, DataConfig(max_seq_len=len(full.input_ids), truncation="right"))


# --------------------------------------------------------------------------- batches and statistics


def test_collate_pads_right() -> None:
    batch = [
        TokenizedExample("a", "s", [5, 6, 7], [IGNORE_INDEX, 6, 7], False),
        TokenizedExample("b", "s", [1, 2, 3, 4, 9], [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 9], True),
    ]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 3, 4, 9]]
    assert str(out["input_ids"].dtype) == "torch.int64"


def test_corpus_stats() -> None:
    tokenized = [
        TokenizedExample("a", "x", [1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4], False),
        TokenizedExample("b", "y", [1, 2], [IGNORE_INDEX, 2], True),
    ]
    stats = corpus_stats(tokenized)
    assert stats["n"] == 2 and stats["per_source"] == {"x": 1, "y": 1}
    assert stats["mean_len"] == 3.0 and stats["max_len"] == 4 and stats["truncated"] == 1
    assert stats["loss_token_fraction"] == pytest.approx(3 / 6)


def test_tokenize_real_slices(shared_data: Path, tiny_llama_tokenizer) -> None:
    cfg = DataConfig(
        root=str(shared_data),
        max_seq_len=128,
        sources=[SourceConfig(path=p, max_examples=5) for p in (DOLLY, OASST1, FLAN_COT, SNI)],
    )
    examples, report = load_corpus(cfg)
    out = tokenize_corpus(examples, tiny_llama_tokenizer, cfg, report)
    assert len(out) == 20 and all(len(t.input_ids) <= 128 for t in out)
    eos = tiny_llama_tokenizer.eos_token_id
    for t in out:
        runs = loss_runs(t.input_ids, t.labels)
        assert runs, t.id
        if not t.truncated:
            assert t.input_ids[runs[-1][1] - 1] == eos  # every full response ends with <|im_end|>


def real_tokenizer(builtin: str, env: str):
    """The real tokenizer from the folder named by ``env``, else the prepared built-in; skip when neither is there."""
    from transformers import AutoTokenizer

    from nacd.models import builtin_dir, builtin_status

    path = os.environ.get(env) or (builtin_dir(builtin) if builtin_status(builtin) == "ready" else None)
    if not path:
        pytest.skip(f"set {env} to a folder with the {builtin} tokenizer, or run `nacd models prepare {builtin}`")
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.real_model
def test_real_smollm2_chat_template_mask() -> None:
    tok = real_tokenizer("smollm2-135m", "NACD_TEST_SMOLLM2_DIR")
    assert tok.chat_template
    t = tokenize_example(example(), tok, 512)
    runs = loss_runs(t.input_ids, t.labels)
    assert [tok.decode(t.input_ids[a:b]) for a, b in runs] == [
        CHAT[2]["content"] + "<|im_end|>",
        CHAT[4]["content"] + "<|im_end|>",
    ]
    assert tok.decode(t.input_ids[: runs[0][0]]).endswith("What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.real_model
def test_real_gemma3_fallback_mask() -> None:
    tok = real_tokenizer("gemma3-270m", "NACD_TEST_GEMMA3_DIR")
    assert not tok.chat_template
    t = tokenize_example(example(), tok, 512)
    assert t.input_ids[0] == tok.bos_token_id and t.input_ids.count(tok.bos_token_id) == 1
    runs = loss_runs(t.input_ids, t.labels)
    assert [tok.decode(t.input_ids[a:b]) for a, b in runs] == [" 2 + 3 = 5.<eos>", " The answer is 48.<eos>"]
    assert encode_prompt(CHAT[:2], tok) == t.input_ids[: runs[0][0]]
