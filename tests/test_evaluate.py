"""Evaluation: lm-eval's tokenization, packed scoring against a hand computation, metrics, prompts,
loaders on the shared data, adapters, the stage's output files, and SmolLM2 on ARC-Easy."""

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nacd import evaluate as ev
from nacd.artifacts import RunDir, read_jsonl, read_manifest
from nacd.config import EvalConfig, ModelConfig, load_config
from nacd.errors import ConfigError, DataError, NacdError
from nacd.evaluate import (
    Benchmark,
    Doc,
    build_context,
    doc_from_record,
    encode_pair,
    evaluate,
    evaluation,
    load_benchmark,
    score_loglikelihood,
    scoring,
)
from nacd.models import load_model

REQUESTS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " Berlin is the capital of Germany"),
    ("Question: What is the capital of France?\nAnswer:", " Paris"),  # a duplicate choice
    ("Question: What is 2 + 3?\nAnswer: ", "5"),  # the trailing space moves to the continuation
    ("The quick brown fox jumps over the lazy dog. " * 3 + "Answer:", " It travels 60 * 3 = 180 miles."),
    ("", " The sea is wide"),  # an empty context: the BOS (or EOS) token conditions
    ("Question: Why is the sky blue?\nAnswer:", " Because air scatters blue light"),
]


def _load(folder, **kwargs):
    return load_model(ModelConfig(spec=str(folder), **kwargs), torch.device("cpu"))


def few_shot_requests() -> list[tuple[str, str]]:
    """Three contexts with the same few-shot preamble (two answers each), and one context of its own."""
    preamble = "The following are questions (with answers) about geography.\n\n" + "".join(
        f"Question: What is the capital of {c}?\nAnswer: {a}\n\n"
        for c, a in [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid")]
    )
    questions = ["What is the capital of Japan?", "Is it true?", "Where is the Great Wall? Tell me a fun fact."]
    requests = [(f"{preamble}Question: {q}\nAnswer:", f" {a}") for q in questions for a in ("Tokyo", "It is in China")]
    return [*requests, ("Question: Why?\nAnswer:", " Because")]


def hand_logprob(model, context_ids, cont_ids) -> float:
    """Plain forward pass on context + continuation; sum of log-softmax at the continuation tokens."""
    ids = torch.tensor([context_ids + cont_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logp[len(context_ids) - 1 + j, t].item() for j, t in enumerate(cont_ids))


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    return _load(tiny_llama_dir)


# --------------------------------------------------------------------------- tokenization and scoring


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma_dir"])
def test_encode_pair_is_lm_evals(fixture, request):
    folder = request.getfixturevalue(fixture)
    _, tok = _load(folder)
    ctx, cont = encode_pair(tok, "Question: What is 2 + 3?\nAnswer: ", "5")
    assert (ctx, cont) == encode_pair(tok, "Question: What is 2 + 3?\nAnswer:", " 5")
    whole = tok("Question: What is 2 + 3?\nAnswer: 5")["input_ids"]
    assert ctx + cont == whole  # encoded together, then split after the context's own encoding
    # BOS as the tokenizer adds it: the Gemma-like one puts <bos> in front, the SmolLM2-like one nothing
    assert (ctx[0] == tok.bos_token_id) == (fixture == "tiny_gemma_dir")
    empty_ctx, empty_cont = encode_pair(tok, "", " hello")
    assert empty_ctx == [tok.bos_token_id] and empty_cont == tok(" hello", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma_dir"])
@pytest.mark.parametrize("method", ["packed", "plain", "auto"])
def test_scores_equal_a_hand_computation(fixture, method, request):
    model, tok = _load(request.getfixturevalue(fixture))
    scores = score_loglikelihood(model, tok, REQUESTS, batch_size=2, method=method)
    assert len(scores) == len(REQUESTS)
    for (ctx, cont), (logprob, n_tokens) in zip(REQUESTS, scores, strict=True):
        ctx_ids, cont_ids = encode_pair(tok, ctx, cont)
        assert n_tokens == len(cont_ids)
        assert logprob == pytest.approx(hand_logprob(model, ctx_ids, cont_ids), abs=1e-4)
    assert scores[0] == scores[2]
    assert scores[1][1] > 3 and scores[1][0] < scores[0][0]  # many tokens, and less likely


def test_plain_scoring_computes_logits_only_where_continuations_are_read(tiny_gemma_dir):
    model, tok = _load(tiny_gemma_dir)
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: widths.append(i[0].shape[1]))
    try:
        scores = score_loglikelihood(model, tok, REQUESTS, batch_size=8, method="plain")
    finally:
        hook.remove()
    encoded = [encode_pair(tok, ctx, cont) for ctx, cont in REQUESTS]
    longest = max(len(c) + len(x) - 1 for c, x in encoded)
    assert widths and max(widths) < longest  # not every position of the batch
    for (ctx_ids, cont_ids), (logprob, _) in zip(encoded, scores, strict=True):
        assert logprob == pytest.approx(hand_logprob(model, ctx_ids, cont_ids), abs=1e-4)


def test_shared_few_shot_prefix_runs_once_and_scores_the_same(tiny_llama):
    """Contexts with the same long few-shot preamble share its forward pass (through the KV cache)."""
    model, tok = tiny_llama
    requests = few_shot_requests()
    groups = ev._group_requests([encode_pair(tok, c, k) for c, k in requests])
    plan = ev._plan(groups, batch_size=8, share=True)
    shared = [prefix for _, prefix in plan if prefix]
    assert len(shared) == 1 and shared[0] >= ev.SHARED_PREFIX_MIN  # the three few-shot contexts, one prefix
    for method in ("packed", "auto"):
        scores = score_loglikelihood(model, tok, requests, batch_size=8, method=method)
        for (ctx, cont), (logprob, _) in zip(requests, scores, strict=True):
            assert logprob == pytest.approx(hand_logprob(model, *encode_pair(tok, ctx, cont)), abs=1e-4)


def test_packed_scoring_respects_a_sliding_window(tiny_gemma_dir):
    """Gemma3 mixes sliding-window and full layers: the packed masks must apply the window by position."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_gemma_dir)
    config.sliding_window = 4
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, config=config, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(tiny_gemma_dir)
    assert "sliding_attention" in config.layer_types
    packed = score_loglikelihood(model, tok, REQUESTS, batch_size=3, method="packed")
    for (ctx, cont), (logprob, _) in zip(REQUESTS, packed, strict=True):
        assert logprob == pytest.approx(hand_logprob(model, *encode_pair(tok, ctx, cont)), abs=1e-4)
    config.sliding_window = 4096  # the same weights without the window score differently: the window mattered
    wide = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, config=config, attn_implementation="sdpa").eval()
    assert abs(score_loglikelihood(wide, tok, REQUESTS[4:5])[0][0] - packed[4][0]) > 1e-3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("window", [4096, 40])
def test_sliding_window_models_share_a_prefix_inside_their_window(tiny_gemma_dir, window, device, monkeypatch):
    """Gemma3 shares the few-shot prefix when the batch fits in its window (the window masks nothing
    then) and not otherwise; both score as the plain forward pass does (on CUDA too, where SDPA takes
    the packed batch's 4D masks on its GPU kernels)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_gemma_dir)
    config.sliding_window = window
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, config=config, attn_implementation="sdpa")
    model = model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gemma_dir)
    requests = few_shot_requests()
    longest = max(len(c) + len(k) - 1 for c, k in (encode_pair(tok, *r) for r in requests))
    assert (longest < window) == (window == 4096)  # the small window cuts through the few-shot contexts
    prefixes = []
    real = scoring._score_packed
    # score_loglikelihood looks _score_packed up in nacd.evaluate.scoring
    monkeypatch.setattr(scoring, "_score_packed", lambda m, g, prefix=0: prefixes.append(prefix) or real(m, g, prefix))
    scores = score_loglikelihood(model, tok, requests, batch_size=8, method="packed")
    for (ctx, cont), (logprob, _) in zip(requests, scores, strict=True):
        assert logprob == pytest.approx(hand_logprob(model, *encode_pair(tok, ctx, cont)), abs=1e-4)
    assert (max(prefixes) >= ev.SHARED_PREFIX_MIN) == (window == 4096)


def test_packed_scoring_on_opt_learned_positions(tiny_llama_tokenizer):
    """OPT (the paper's model family) adds learned position embeddings from position_ids."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=len(tiny_llama_tokenizer),
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    model = OPTForCausalLM(config).eval()
    tok = tiny_llama_tokenizer
    scores = score_loglikelihood(model, tok, REQUESTS, batch_size=3, method="packed")
    for (ctx, cont), (logprob, _) in zip(REQUESTS, scores, strict=True):
        assert logprob == pytest.approx(hand_logprob(model, *encode_pair(tok, ctx, cont)), abs=1e-4)


class _IgnoresCustomMasks(torch.nn.Module):
    """A model whose forward drops position_ids and 4D attention masks: packing scores wrongly on it."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, **kwargs):
        kwargs.pop("position_ids", None)
        if getattr(kwargs.get("attention_mask"), "ndim", 2) == 4:
            kwargs["attention_mask"] = None
        return self.inner(**kwargs)


def test_auto_falls_back_when_packing_is_wrong_for_a_model(tiny_llama, caplog):
    model, tok = tiny_llama
    odd = _IgnoresCustomMasks(model)
    assert score_loglikelihood(odd, tok, REQUESTS, method="packed") != score_loglikelihood(
        odd, tok, REQUESTS, method="plain"
    )
    with caplog.at_level("WARNING", logger="nacd.evaluate"):
        scores = score_loglikelihood(odd, tok, REQUESTS, method="auto")
    assert "packed scoring differs from plain scoring" in caplog.text
    for (ctx, cont), (logprob, _) in zip(REQUESTS, scores, strict=True):
        assert logprob == pytest.approx(hand_logprob(model, *encode_pair(tok, ctx, cont)), abs=1e-4)


def test_eager_attention_scores_the_same(tiny_llama_dir, tiny_llama):
    eager, tok = _load(tiny_llama_dir, attn_implementation="eager")
    a = score_loglikelihood(eager, tok, REQUESTS, method="packed")
    b = score_loglikelihood(tiny_llama[0], tok, REQUESTS, method="plain")
    assert [s for s, _ in a] == pytest.approx([s for s, _ in b], abs=1e-4)


# --------------------------------------------------------------------------- metrics


def _bench(docs, **kwargs):
    return Benchmark("toy", docs, "toy.jsonl", "validation", **kwargs)


def test_acc_and_acc_norm_differ_on_a_constructed_case(monkeypatch):
    """acc: largest summed log-prob; acc_norm: largest log-prob per character of the choice text."""
    docs = [
        Doc("q1", "Which?", ("a", "abcdefgh"), gold=1),  # -2 vs -4: acc picks "a"; -2/1 vs -4/8: acc_norm "abcdefgh"
        Doc("q2", "Which?", ("xyz", "uvw", "rst"), gold=0),  # a tie: the first maximum wins, as numpy's argmax
    ]
    fake = {" a": -2.0, " abcdefgh": -4.0, " xyz": -1.0, " uvw": -1.0, " rst": -3.0}
    seen = []

    def fake_score(model, tokenizer, requests, batch_size, **kwargs):
        seen.extend(requests)
        return [(fake[cont], 1) for _, cont in requests]

    monkeypatch.setattr(evaluation, "score_loglikelihood", fake_score)  # evaluate() looks it up there
    results, samples = evaluate(None, None, [_bench(docs)], EvalConfig(), progress=False)
    assert seen[0] == ("Question: Which?\nAnswer:", " a")
    assert [(s["pred"], s["pred_norm"], s["acc"], s["acc_norm"]) for s in samples] == [(0, 1, 0, 1), (0, 0, 1, 1)]
    r = results["toy"]
    assert (r["n"], r["acc"], r["acc_norm"]) == (2, 0.5, 1.0)
    assert r["acc_stderr"] == pytest.approx(0.5)  # sample std (ddof=1) / sqrt(n), as lm-eval
    assert r["acc_norm_stderr"] == 0.0
    assert samples[0]["logprobs"] == [-2.0, -4.0]


def test_subject_and_macro_averages():
    samples = [
        {"subject": "a", "acc": 1.0, "acc_norm": 1.0},
        {"subject": "a", "acc": 1.0, "acc_norm": 0.0},
        {"subject": "a", "acc": 1.0, "acc_norm": 0.0},
        {"subject": "b", "acc": 0.0, "acc_norm": 0.0},
    ]
    out = ev.aggregate(samples)
    assert out["acc"] == 0.75  # micro: over questions
    assert out["macro"]["acc"] == 0.5  # macro: over subjects
    assert out["subjects"]["a"]["acc_norm"] == pytest.approx(1 / 3)
    assert out["subjects"]["b"]["n"] == 1 and out["subjects"]["b"]["acc_stderr"] is None


# --------------------------------------------------------------------------- prompts


def test_two_shot_mmlu_prompt_is_exact():
    shots = [
        Doc("s1", "What is 1 + 1?", ("1", "2", "3", "4"), 1, "high_school_math"),
        Doc("s2", "What is 2 * 3?", ("5", "6", "7", "8"), 1, "high_school_math"),
        Doc("s3", "What is 9 - 1?", ("8", "7", "6", "5"), 0, "high_school_math"),
    ]
    doc = Doc("q", "What is 3 + 4?", ("6", "7", "8", "9"), 1, "high_school_math")
    bench = ev._mmlu_benchmark("mmlu", [doc], "x", "validation", shots, "dev")
    protocol, k = ev.resolve_protocol(bench, "auto", 2)
    assert (protocol, k) == ("letter", 2)
    context = build_context(bench, doc, protocol, ev.fewshot_docs(bench, doc, k))
    assert context == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2 * 3?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer: B\n\n"
        "What is 3 + 4?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer:"
    )
    assert ev.doc_to_choices(doc, protocol) == ["A", "B", "C", "D"]
    assert ev.resolve_protocol(bench, "auto", None) == ("letter", 5)
    with pytest.raises(DataError, match="num_fewshot=4 but the few-shot pool"):
        ev.fewshot_docs(bench, doc, 4)
    text = build_context(bench, doc, "text", ev.fewshot_docs(bench, doc, 1))  # lm-eval's mmlu_continuation
    assert text == (
        "The following are questions (with answers) about high school math.\n\n"
        "Question: What is 1 + 1?\nAnswer: 2\n\nQuestion: What is 3 + 4?\nAnswer:"
    )


# --------------------------------------------------------------------------- loaders


def test_arc_label_variants():
    row = {
        "id": "x",
        "question": "Q?",
        "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]},
        "answerKey": "3",
    }
    assert doc_from_record(row, "f:1", "d").gold == 2
    row5 = {**row, "choices": {"text": list("abcde"), "label": list("ABCDE")}, "answerKey": "E"}
    assert doc_from_record(row5, "f:1", "d").gold == 4
    with pytest.raises(DataError, match=r"f:1: field 'answerKey': 'E' is not one of the choice labels"):
        doc_from_record({**row, "answerKey": "E"}, "f:1", "d")


def test_arc_easy_validation_from_the_shared_files(shared_data):
    bench = load_benchmark("arc_easy", "validation", shared_data)
    assert len(bench.docs) == 570 and bench.protocol == "text" and bench.default_fewshot == 0
    first = bench.docs[0]
    assert first.id == "MCAS_2000_4_6" and first.choices[0] == "cellular telephone" and first.gold == 0
    text = (shared_data / "eval/arc_easy/validation.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    numeric = [r for r in rows if r["choices"]["label"][0] == "1"]
    assert numeric, "the shared ARC file has rows labelled 1-4"
    by_id = {d.id: d for d in bench.docs}
    for r in rows:
        assert by_id[r["id"]].gold == r["choices"]["label"].index(r["answerKey"])
    assert len(bench.fewshot_pool) == 2251  # the train split


def test_mmlu_from_the_shared_csv_files(shared_data):
    bench = load_benchmark("mmlu", "validation", shared_data)
    assert len(bench.docs) == 1531 and len({d.subject for d in bench.docs}) == 57
    assert len(bench.fewshot_pool) == 285 and bench.protocol == "letter" and bench.default_fewshot == 5
    anatomy = [d for d in bench.fewshot_pool if d.subject == "anatomy"]
    assert anatomy[0].question == "What is the embryological origin of the hyoid bone?"
    assert anatomy[0].choices[3] == "The second and third pharyngeal arches" and anatomy[0].gold == 3
    assert any("\n" in d.question for d in bench.docs)  # quoted newlines survive the CSV reader
    assert all(len(d.choices) == 4 for d in bench.docs)
    assert bench.docs[0].id == "abstract_algebra/val/0"
    assert load_benchmark("mmlu", "val", shared_data).docs == bench.docs


def test_generic_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"question": "2 + 2?", "choices": ["3", "4"], "answer": 1},
        {"question": "Sky?", "choices": ["green", "blue", "red"], "answer": "B", "subject": "nature"},
        {"id": "q3", "question": "Capital of France?", "choices": ["Rome", "Paris"], "answer": "Paris"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    bench = load_benchmark(str(path), "validation", tmp_path)
    assert bench.name == "mine" and bench.protocol == "text"
    assert [(d.id, d.gold, d.subject) for d in bench.docs] == [
        ("mine/1", 1, ""),
        ("mine/2", 1, "nature"),
        ("q3", 1, ""),
    ]
    assert load_benchmark("mine.jsonl", "validation", tmp_path).docs == bench.docs  # relative to data.root
    path.write_text(json.dumps({"question": "Q", "choices": ["a", "b"], "answer": "7"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"mine.jsonl:1: field 'answer': '7' is neither a letter A-B"):
        load_benchmark(str(path), "validation", tmp_path)


def test_folder_of_split_files_gives_a_fewshot_pool(tmp_path):
    for split in ("train", "validation"):
        row = {"question": f"{split}?", "choices": ["a", "b"], "answer": 0}
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    bench = load_benchmark(str(tmp_path), "validation")
    assert bench.docs[0].question == "validation?" and bench.fewshot_pool[0].question == "train?"


def test_hub_ids_go_through_datasets_and_fail_clearly(shared_data, tmp_path):
    with pytest.raises(DataError, match=r"datasets.load_dataset\('allenai/ai2_arc', 'ARC-Challenge'.*offline"):
        load_benchmark("arc_challenge", "validation", shared_data)  # no local copy: the hub is tried
    with pytest.raises(DataError, match=r"datasets.load_dataset\('someone/mcq', None"):
        load_benchmark("someone/mcq", "validation", tmp_path)
    with pytest.raises(DataError, match="not a built-in"):
        load_benchmark("missing.jsonl", "validation", tmp_path)


def test_config_and_check(tmp_path):
    with pytest.raises(ConfigError, match="eval.limit"):
        load_config(None, ["eval.limit=0"])
    with pytest.raises(ConfigError, match="eval.protocol"):
        load_config(None, ["eval.protocol=mc"])
    ev.check(load_config(None, ["eval.benchmarks=[arc_easy,mmlu,owner/name]", "eval.adapter=not/yet/there"]))
    with pytest.raises(NacdError, match="'nope.jsonl' is not a built-in"):
        ev.check(load_config(None, [f"data.root={tmp_path}", "eval.benchmarks=[nope.jsonl]"]))


# --------------------------------------------------------------------------- models, adapters, the stage


def _toy_file(tmp_path: Path) -> Path:
    rows = [
        {"question": "What is the capital of France?", "choices": ["Paris", "Berlin", "Rome"], "answer": 0},
        {"question": "How many days are there in a week?", "choices": ["7", "12", "365 days"], "answer": 0},
        {"question": "Why is the sky blue?", "choices": ["air scatters blue light", "cheese"], "answer": 0},
    ]
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def adapter_dir(tiny_llama_dir, tmp_path):
    """A LoRA adapter with non-zero weights, saved like the finetune stage saves one."""
    from nacd.config import LoraConfig
    from nacd.lora import add_lora

    model, _ = _load(tiny_llama_dir)
    peft_model = add_lora(model, LoraConfig(r=4, alpha=8.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    folder = tmp_path / "run" / "finetune" / "full" / "adapter"
    peft_model.save_pretrained(folder)
    return folder


def test_adapter_and_merged_model(tiny_llama_dir, adapter_dir, tmp_path):
    bench = load_benchmark(str(_toy_file(tmp_path)), "validation")
    cfg = EvalConfig(batch_size=2)
    model, tok = _load(tiny_llama_dir)
    _, base = evaluate(model, tok, [bench], cfg, progress=False)
    tuned_model = ev.apply_adapter(model, adapter_dir)
    _, tuned = evaluate(tuned_model, tok, [bench], cfg, progress=False)
    differences = [
        abs(a - b) for s, t in zip(base, tuned, strict=True) for a, b in zip(s["logprobs"], t["logprobs"], strict=True)
    ]
    assert min(differences) > 1e-3  # the adapter changes every score
    # the adapter path scores like the plain reference on the adapted model
    ctx, cont = "Question: What is the capital of France?\nAnswer:", " Paris"
    assert tuned[0]["logprobs"][0] == pytest.approx(hand_logprob(tuned_model, *encode_pair(tok, ctx, cont)), abs=1e-4)
    requests = few_shot_requests()  # the shared-prefix path (KV cache) through peft
    for (ctx, cont), (logprob, _) in zip(requests, score_loglikelihood(tuned_model, tok, requests), strict=True):
        assert logprob == pytest.approx(hand_logprob(tuned_model, *encode_pair(tok, ctx, cont)), abs=1e-4)
    merged_dir = tmp_path / "merged"
    tuned_model.merge_and_unload().save_pretrained(merged_dir)
    tok.save_pretrained(merged_dir)
    merged_model, merged_tok = _load(merged_dir)
    _, merged = evaluate(merged_model, merged_tok, [bench], cfg, progress=False)
    for t, m in zip(tuned, merged, strict=True):
        assert m["logprobs"] == pytest.approx(t["logprobs"], abs=1e-4)
    with pytest.raises(NacdError, match="no adapter_config.json"):
        ev.apply_adapter(merged_model, tmp_path)


def test_run_writes_results_samples_and_manifest(tiny_overrides, adapter_dir, tmp_path, caplog):
    toy = _toy_file(tmp_path)
    overrides = [*tiny_overrides, f"eval.benchmarks=[arc_easy,{toy}]", "eval.limit=5", f"eval.adapter={adapter_dir}"]
    config = load_config(None, overrides)
    run_dir = RunDir(config.run.out_dir)
    body = ev.run(config, run_dir)
    folder = run_dir.eval_dir("full")  # named after the adapter's variant
    results = json.loads((folder / "results.json").read_text())
    assert results == json.loads(json.dumps(body))
    samples = read_jsonl(folder / "samples.jsonl")
    assert [s["benchmark"] for s in samples] == ["arc_easy"] * 5 + ["toy"] * 3
    arc = results["benchmarks"]["arc_easy"]
    assert arc["n"] == 5 and arc["protocol"] == "text" and arc["num_fewshot"] == 0
    assert arc["acc"] == pytest.approx(sum(s["acc"] for s in samples[:5]) / 5)
    assert arc["acc_norm"] == pytest.approx(sum(s["acc_norm"] for s in samples[:5]) / 5)
    assert samples[0]["id"] == "MCAS_2000_4_6" and len(samples[0]["logprobs"]) == 4
    manifest = read_manifest(folder, "eval")
    assert manifest["complete"] and manifest["limit"] == 5 and manifest["adapter"]["path"] == "finetune/full/adapter"
    assert manifest["model"]["spec"] == config.model.spec
    assert manifest["protocols"]["arc_easy"] == {"protocol": "text", "num_fewshot": 0}
    # a second run with the same settings is skipped; another limit evaluates again
    before = (folder / "results.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="nacd.evaluate"):
        assert ev.run(config, run_dir) == results
    assert "skipped" in caplog.text and (folder / "results.json").stat().st_mtime_ns == before
    config2 = load_config(None, [*overrides, "eval.limit=2"])
    assert ev.run(config2, run_dir)["benchmarks"]["arc_easy"]["n"] == 2
    # without an adapter the folder is named after the model
    assert ev.eval_name(replace(config, eval=replace(config.eval, adapter=None))) == Path(config.model.spec).name


def test_mmlu_letter_protocol_limit_per_subject(tiny_llama, shared_data):
    model, tok = tiny_llama
    bench = load_benchmark("mmlu", "validation", shared_data)
    bench.docs = [d for d in bench.docs if d.subject in ("anatomy", "astronomy", "virology")]
    results, samples = evaluate(model, tok, [bench], EvalConfig(limit=2, num_fewshot=1), progress=False)
    r = results["mmlu"]
    assert r["n"] == 6 and set(r["subjects"]) == {"anatomy", "astronomy", "virology"}
    assert r["protocol"] == "letter" and r["num_fewshot"] == 1 and r["macro"]["n_subjects"] == 3
    assert all(s["answers"] == ["A", "B", "C", "D"] and s["pred"] == s["pred_norm"] for s in samples)
    long_contexts = [s for s in samples if s["subject"] == "anatomy"]  # about 550 tokens for a 512-token model
    assert all(len(s["logprobs"]) == 4 for s in long_contexts)


def test_contexts_longer_than_the_model_are_cut_from_the_left_as_lm_eval(tiny_llama):
    model, tok = tiny_llama
    context = "The quick brown fox jumps over the lazy dog. " * 80 + "Answer:"
    ctx_ids, cont_ids = encode_pair(tok, context, " Paris")
    assert len(ctx_ids) > model.config.max_position_embeddings
    (logprob, _), short = score_loglikelihood(model, tok, [(context, " Paris"), REQUESTS[0]])
    window = (ctx_ids + cont_ids)[-(model.config.max_position_embeddings + 1) :]
    assert logprob == pytest.approx(hand_logprob(model, window[: -len(cont_ids)], cont_ids), abs=1e-4)
    assert short[0] == pytest.approx(hand_logprob(model, *encode_pair(tok, *REQUESTS[0])), abs=1e-4)


@pytest.mark.real_model
def test_smollm2_arc_easy_well_above_chance(shared_data):
    start = time.perf_counter()
    model, tok = _load("smollm2-135m")
    bench = load_benchmark("arc_easy", "validation", shared_data)
    results, _ = evaluate(model, tok, [bench], EvalConfig(limit=40), progress=False)
    r = results["arc_easy"]
    assert r["n"] == 40
    assert r["acc"] >= 0.4 and r["acc_norm"] >= 0.35  # chance is 0.25; measured 0.50 and 0.425
    assert time.perf_counter() - start < 60


def test_two_processes_score_like_one(tiny_llama_dir, shared_data, tmp_path):
    """Issue #13: the batches of the one-process plan are dealt to the processes, so the answers and the
    numbers do not depend on the number of processes (MMLU 5-shot: shared prefixes stay in a batch)."""
    from conftest import multiprocess_overrides, torchrun_nacd

    from nacd import cli

    common = [
        f"model.spec={tiny_llama_dir}",
        f"data.root={shared_data}",
        "eval.benchmarks=['builtin:demo/mc',mmlu]",
        "eval.limits={demo_mc: 20, mmlu: 1}",
        "eval.batch_size=4",
        *multiprocess_overrides(),
    ]
    assert cli.main(["eval", *common, f"run.out_dir={tmp_path / 'one'}"]) == 0
    proc = torchrun_nacd("eval", [*common, f"run.out_dir={tmp_path / 'two'}"], 29547)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (one_dir,) = list((tmp_path / "one" / "eval").iterdir())
    two_dir = tmp_path / "two" / "eval" / one_dir.name
    one = [json.loads(x) for x in (one_dir / "samples.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (two_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["benchmark"], s["id"], s["pred"], s["pred_norm"]) for s in one] == [
        (s["benchmark"], s["id"], s["pred"], s["pred_norm"]) for s in two
    ]
    for a, b in zip(one, two, strict=True):
        assert b["logprobs"] == pytest.approx(a["logprobs"], abs=1e-5)
    r1 = json.loads((one_dir / "results.json").read_text())["benchmarks"]
    r2 = json.loads((two_dir / "results.json").read_text())["benchmarks"]
    for bench in r1:
        assert r2[bench]["acc"] == r1[bench]["acc"] and r2[bench]["n"] == r1[bench]["n"]
        contexts = r2[bench]["processes"]["contexts"]
        assert len(contexts) == 2 and sum(contexts) == r1[bench]["n"] and min(contexts) > 0
    assert json.loads((two_dir / "manifest.json").read_text())["processes"] == 2


def test_idle_processes_are_named_and_said_harmless():
    """Issue #13: more processes than batches to score is allowed (the scores do not change) and said."""
    from nacd.evaluate.evaluation import idle_message

    assert idle_message("mmlu", [12, 8], 4) is None
    msg = idle_message("demo_mc", [4, 0, 0], 4)
    assert msg.startswith("eval demo_mc: 2 of 3 processes had nothing to score (process(es) 1, 2)")
    assert "eval.batch_size=4" in msg and "scores are unaffected" in msg
