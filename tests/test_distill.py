"""nacd distill end to end on the tiny model: learning, the artifact, resume, failures."""

import json

import pytest
import torch

from nacd import distill, experts
from nacd import select as selection
from nacd.artifacts import RunDir, read_jsonl
from nacd.config import load_config
from nacd.errors import NacdError

# D_full = D_sel (16 examples), SGD experts with 2 steps per epoch: a student taking N=2 steps of
# batch 8 can imitate an expert epoch, so the matching target is reachable.
REACHABLE = (
    "data.sources.0.max_examples=4",
    "data.sources.1.max_examples=4",
    "data.sources.2.max_examples=4",
    "data.sources.3.max_examples=4",
    "select.budget=16",
    "experts.num_experts=2",
    "experts.train.epochs=3",
    "experts.train.batch_size=8",
    "experts.train.optimizer=sgd",
    "experts.train.lr=0.5",
    "experts.train.lr_schedule=constant",
    "experts.train.warmup_ratio=0",
    "experts.train.max_grad_norm=null",
    "distill.syn_steps=2",
    "distill.batch_size=8",
    "distill.num_prompt_tokens=2",
    "distill.max_start_epoch=2",
    "distill.beta=1.0",
    "distill.lr_syn=0.05",
    "distill.lr_lr=0.05",
    "distill.lr_init=0.2",
)


@pytest.fixture
def prepared(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, *REACHABLE, "distill.iterations=30"])
    run_dir = RunDir(cfg.run.out_dir)
    selection.run(cfg, run_dir)
    experts.run(cfg, run_dir)
    return cfg, run_dir, tiny_overrides


def test_distillation_learns_and_writes_a_self_describing_set(prepared, capsys):
    cfg, run_dir, overrides = prepared
    ds = distill.run(cfg, run_dir)
    hist = ds.history()
    assert [h["iteration"] for h in hist] == list(range(1, 31))
    first = sum(h["l_distill"] for h in hist[:5]) / 5
    last = sum(h["l_distill"] for h in hist[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert all(not h["skipped"] for h in hist)
    assert all(len(h["student_grad_norms"]) == len(h["student_losses"]) == 2 for h in hist)  # N = 2 steps
    assert all(g > 0 for h in hist for g in h["student_grad_norms"])
    assert hist[-1]["alpha"] != pytest.approx(0.2)  # the learnable lr moved

    # the artifact
    assert ds.prompts.shape == (16, 2, 64) and ds.prompts.dtype == torch.float32
    assert ds.ids == json.loads((run_dir.select_dir / "selection.json").read_text())["ids"]
    assert ds.manifest["complete"] and ds.manifest["iterations"] == 30 and ds.alpha == pytest.approx(hist[-1]["alpha"])
    from nacd.config import ModelConfig
    from nacd.models import load_model

    model, tok = load_model(ModelConfig(spec=cfg.model.spec), torch.device("cpu"))
    vocab = model.get_input_embeddings().weight.detach()
    d = torch.cdist(ds.prompts.reshape(-1, 64), vocab)
    special = sorted(set(tok.all_special_ids) | set(range(len(tok), vocab.shape[0])))
    assert special  # the tiny tokenizer has special tokens: they are never a prompt's nearest token
    d[:, special] = float("inf")
    assert torch.equal(d.argmin(1).reshape(16, 2), ds.nearest_ids)
    torch.testing.assert_close(d.min(1).values.reshape(16, 2), ds.nearest_dist)
    rec = ds.records[0]
    assert rec["prompt_text"] == tok.decode(rec["prompt_token_ids"]) and rec["messages"][-1]["role"] == "assistant"
    assert torch.equal(ds.embeddings(rec["id"]), ds.prompts[0])
    # the same command again is skipped; with more iterations it continues from the final checkpoint
    again = distill.run(cfg, run_dir)
    assert again.manifest["created"] == ds.manifest["created"]
    more = distill.run(load_config(None, [*overrides, *REACHABLE, "distill.iterations=33"]), run_dir)
    assert [h["l_distill"] for h in more.history()[:30]] == [h["l_distill"] for h in hist]
    assert len(more.history()) == 33 and more.manifest["iterations"] == 33

    # nacd inspect: pseudo tokens beside the data, and the loss curves
    from nacd.cli import main

    assert main(["inspect", *overrides, *REACHABLE, "--examples", "2"]) == 0
    out = capsys.readouterr().out
    assert f"[{ds.ids[0]}]" in out and "pseudo tokens" in out and "instruction" in out
    assert (run_dir.distill_dir / "loss.png").stat().st_size > 10_000


def test_interrupted_distill_resumes_exactly(prepared, monkeypatch, tmp_path):
    cfg, run_dir, overrides = prepared
    short = [*overrides, *REACHABLE, "distill.iterations=8", "distill.checkpoint_every=3"]
    clean_cfg = load_config(None, short)
    clean = distill.run(clean_cfg, run_dir)
    clean_hist = clean.history()
    shutil_rm(run_dir.distill_dir)

    from nacd import tm

    real = tm.unroll
    calls = {"n": 0}

    def unroll_then_stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # iteration 8, after the checkpoint at iteration 6
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tm, "unroll", unroll_then_stop)
    with pytest.raises(KeyboardInterrupt):
        distill.run(clean_cfg, run_dir)
    state = json.loads((run_dir.distill_dir / "checkpoint" / "state.json").read_text())["state"]
    assert state["iteration"] == 6
    monkeypatch.setattr(tm, "unroll", real)
    resumed = distill.run(clean_cfg, run_dir)
    assert torch.equal(resumed.prompts, clean.prompts)
    assert resumed.alpha == clean.alpha
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "time")} for r in rows]  # noqa: E731
    assert strip(resumed.history()) == strip(clean_hist)


def shutil_rm(path):
    import shutil

    shutil.rmtree(path)


def test_experts_of_another_lora_config_are_refused(prepared):
    cfg, run_dir, overrides = prepared
    other = load_config(None, [*overrides, *REACHABLE, "lora.r=4"])
    with pytest.raises(NacdError, match=r"run_000/manifest.json: field 'parameters'.*record the experts again"):
        distill.run(other, run_dir)
    assert not run_dir.distill_dir.exists()


def test_start_epochs_beyond_the_experts_are_refused(prepared):
    cfg, run_dir, overrides = prepared
    other = load_config(None, [*overrides, *REACHABLE, "distill.max_start_epoch=3", "distill.expert_epochs=2"])
    with pytest.raises(NacdError, match=r"snapshots up to epoch 3, but distill.max_start_epoch=3 .* need epoch 4"):
        distill.run(other, run_dir)


def test_non_finite_iterations_are_skipped_then_stop(prepared, monkeypatch):
    cfg, run_dir, overrides = prepared
    cfg = load_config(None, [*overrides, *REACHABLE, "distill.iterations=20", "distill.max_bad_iterations=3"])
    from nacd import tm

    real = tm.matching_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        value = real(*args)
        return value * float("nan") if calls["n"] >= 3 else value

    monkeypatch.setattr(tm, "matching_loss", poisoned)
    with pytest.raises(NacdError, match=r"3 iterations in a row had a non-finite loss .* iteration 5"):
        distill.run(cfg, run_dir)
    rows = read_jsonl(run_dir.distill_dir / "history.jsonl")
    assert [r["skipped"] for r in rows] == [False, False, True, True, True]


def test_finetune_on_the_distilled_set_same_and_other_architecture(prepared, tiny_gemma_dir):
    from nacd import finetune

    cfg, run_dir, overrides = prepared
    ds = distill.run(cfg, run_dir)
    same = load_config(None, [*overrides, *REACHABLE, "finetune.dataset=distilled", "finetune.name=nacd"])
    m = finetune.run(same, run_dir)
    assert m["complete"] and m["prompt_mode"] == "embeddings" and m["ids"] == ds.ids
    assert m["distilled"]["alpha"] == ds.alpha

    # the prompts really enter the model: zero prompts give a different loss on the same batch
    from nacd.config import ModelConfig
    from nacd.data import tokenize_corpus
    from nacd.finetune import PromptedExample, PromptedForward
    from nacd.models import load_model

    model, tok = load_model(ModelConfig(spec=cfg.model.spec), torch.device("cpu"))
    fwd = PromptedForward(model)
    from nacd.data import load_corpus

    corpus = {ex.id: ex for ex in load_corpus(cfg.data)[0]}
    data = tokenize_corpus([corpus[i] for i in ds.ids[:4]], tok, cfg.data)
    items = [PromptedExample(ex, ds.embeddings(ex.id)) for ex in data]
    zeros = [PromptedExample(ex, torch.zeros_like(ds.embeddings(ex.id))) for ex in data]
    with torch.no_grad():
        a, n = fwd(model, fwd.collate(items, tok.pad_token_id))
        b, n2 = fwd(model, fwd.collate(zeros, tok.pad_token_id))
    fwd.close()
    assert n == n2 and a.item() != pytest.approx(b.item())

    other = load_config(
        None,
        [*overrides, *REACHABLE, "finetune.dataset=distilled", f"finetune.model={tiny_gemma_dir}", "finetune.name=x"],
    )
    m2 = finetune.run(other, run_dir)
    assert m2["prompt_mode"] == "text" and m2["base_model"]["spec"] == str(tiny_gemma_dir)
    forced = load_config(
        None,
        [
            *overrides,
            *REACHABLE,
            "finetune.dataset=distilled",
            f"finetune.model={tiny_gemma_dir}",
            "finetune.prompt_mode=embeddings",
            "finetune.name=y",
        ],
    )
    with pytest.raises(NacdError, match="is not the model that distilled"):
        finetune.run(forced, run_dir)
