"""nacd distill end to end on the tiny model: learning, the artifact, resume, failures."""

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

from nacd import distill, distill_loop, experts
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
    # the paper's recipe (learned alpha, mean-vocabulary init, Eq. 3): the tests of the loop's mechanics
    "distill.alpha_mode=shared",
    "distill.init=mean_vocab",
    "distill.regularizer=distance",
)


def _prepare(overrides):
    cfg = load_config(None, [*overrides, *REACHABLE, "distill.iterations=30"])
    run_dir = RunDir(cfg.run.out_dir)
    selection.run(cfg, run_dir)
    experts.run(cfg, run_dir)
    return cfg, run_dir, overrides


@pytest.fixture
def prepared(tiny_overrides):
    return _prepare(tiny_overrides)


@pytest.fixture
def prepared_float32(tiny_overrides):
    """``prepared`` in float32 on a GPU too, where dtype auto is bf16: for the tests of small effects that
    the tiny model's bf16 rounding swamps (seen on an H200, docs/BENCHMARKS.md). On the CPU it is ``prepared``."""
    return _prepare([*tiny_overrides, "model.dtype=float32"])


@pytest.fixture
def prepared_multiprocess(tiny_overrides):
    """``prepared`` on the device a 2-process test runs on (the CPU where fewer than 2 GPUs are), so that
    its experts were recorded on the base model the processes load (bf16 on one GPU, float32 on the CPU)."""
    from conftest import multiprocess_overrides

    return _prepare([*tiny_overrides, *multiprocess_overrides()])


def test_distillation_learns_and_writes_a_self_describing_set(prepared, capsys):
    cfg, run_dir, overrides = prepared
    ds = distill.run(cfg, run_dir)
    hist = ds.history()
    assert [h["iteration"] for h in hist] == list(range(1, 31))
    first = sum(h["l_distill"] for h in hist[:5]) / 5
    last = sum(h["l_distill"] for h in hist[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert all(not h["skipped"] for h in hist)
    draws = [d for h in hist for d in h["draws"]]
    assert len(draws) == 30 and {d["run"] for d in draws} == {0}  # run 1 is held out for the panel
    assert all(len(d["student_grad_norms"]) == len(d["student_losses"]) == 2 for d in draws)  # N = 2 steps
    assert all(g > 0 for d in draws for g in d["student_grad_norms"])
    assert hist[-1]["alpha"] != pytest.approx(0.2)  # the learnable lr moved

    # the artifact
    assert ds.prompts.shape == (16, 2, 64) and ds.prompts.dtype == torch.float32
    assert ds.ids == json.loads((run_dir.select_dir / "selection.json").read_text())["ids"]
    assert ds.manifest["complete"] and ds.manifest["iterations"] == 30 and ds.alpha == pytest.approx(hist[-1]["alpha"])
    from nacd.config import ModelConfig
    from nacd.models import load_model, resolve_device

    # the vocabulary as the run had it (bf16 on a GPU with dtype auto), searched in float32 here
    model, tok = load_model(ModelConfig(spec=cfg.model.spec), resolve_device(cfg.run.device))
    vocab = model.get_input_embeddings().weight.detach().float().cpu()
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

    from nacd import unrolls

    real = unrolls.unroll
    calls = {"n": 0}

    def unroll_then_stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # iteration 8, after the checkpoint at iteration 6
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(unrolls, "unroll", unroll_then_stop)
    with pytest.raises(KeyboardInterrupt):
        distill.run(clean_cfg, run_dir)
    state = json.loads((run_dir.distill_dir / "checkpoint" / "state.json").read_text())["state"]
    assert state["iteration"] == 6
    monkeypatch.setattr(unrolls, "unroll", real)
    resumed = distill.run(clean_cfg, run_dir)
    assert torch.equal(resumed.prompts, clean.prompts)
    assert resumed.alpha == clean.alpha
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "time")} for r in rows]  # noqa: E731
    assert strip(resumed.history()) == strip(clean_hist)


def tmp_dir(run_dir):
    return run_dir.root.parent


def shutil_rm(path):
    import shutil

    shutil.rmtree(path)


def test_a_finished_set_survives_fewer_iterations_and_a_damaged_checkpoint(prepared):
    cfg, run_dir, overrides = prepared
    base = [*overrides, *REACHABLE, "distill.panel_size=0"]
    done = distill.run(load_config(None, [*base, "distill.iterations=4"]), run_dir)
    folder, ckpt = run_dir.distill_dir, run_dir.distill_dir / "checkpoint"
    before = (folder / "prompts.safetensors").read_bytes()

    def intact():  # the finished 4-iteration set is still there, complete, loadable
        again = distill.DistilledSet.load(folder)
        assert again.manifest["complete"] and again.manifest["iterations"] == 4
        assert (folder / "prompts.safetensors").read_bytes() == before and torch.equal(again.prompts, done.prompts)

    with pytest.raises(NacdError, match=r"finished distillation of 4 iterations, more than distill.iterations=2"):
        distill.run(load_config(None, [*base, "distill.iterations=2"]), run_dir)
    intact()
    (ckpt / "state.safetensors").write_bytes((ckpt / "state.safetensors").read_bytes()[:100])  # truncated
    with pytest.raises(NacdError, match=r"checkpoint/state.safetensors: .*damaged"):
        distill.run(load_config(None, [*base, "distill.iterations=6"]), run_dir)
    intact()
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(NacdError, match=r"checkpoint/state.json: JSONDecodeError.*damaged"):
        distill.run(load_config(None, [*base, "distill.iterations=6"]), run_dir)
    intact()
    shutil_rm(ckpt)
    with pytest.raises(NacdError, match=r"checkpoint: missing, so the finished 4-iteration distillation cannot"):
        distill.run(load_config(None, [*base, "distill.iterations=6"]), run_dir)
    intact()
    assert distill.run(load_config(None, [*base, "distill.iterations=4"]), run_dir).manifest["iterations"] == 4

    # the exact unroll modes make the same set: one made with auto is reused under flat or naive, not fd;
    # so with another search chunk
    assert done.manifest["distill"]["unroll"] == "auto"
    for change in ("distill.unroll=flat", "distill.unroll=naive", "distill.vocab_chunk=7"):
        again = distill.run(load_config(None, [*base, "distill.iterations=4", change]), run_dir)
        assert again.manifest["iterations"] == 4 and again.manifest["distill"]["unroll"] == "auto"
    intact()
    with pytest.raises(NacdError, match=r"field 'distill.unroll' was 'auto' when this was made, now 'fd'"):
        distill.run(load_config(None, [*base, "distill.iterations=4", "distill.unroll=fd"]), run_dir)

    # a set distilled before an option existed matches when the option has its default now, not otherwise
    path = folder / "manifest.json"
    body = json.loads(path.read_text())
    del body["distill"]["alpha_fit_draws"]  # default
    path.write_text(json.dumps(body))
    assert distill.run(load_config(None, [*base, "distill.iterations=4"]), run_dir).manifest["iterations"] == 4
    del body["distill"]["alpha_mode"]  # "shared" here, "fixed" by default
    path.write_text(json.dumps(body))
    with pytest.raises(NacdError, match=r"field 'distill.alpha_mode' was 'fixed' when this was made, now 'shared'"):
        distill.run(load_config(None, [*base, "distill.iterations=4"]), run_dir)


def test_experts_of_another_lora_config_are_refused(prepared):
    cfg, run_dir, overrides = prepared
    other = load_config(None, [*overrides, *REACHABLE, "lora.r=4"])
    with pytest.raises(
        NacdError,
        match=r"run_000/manifest.json: field 'lora.r' was 8 when this was made, now 4; record the experts again",
    ):
        distill.run(other, run_dir)
    assert not run_dir.distill_dir.exists()


def test_start_epochs_beyond_the_experts_are_refused(prepared):
    cfg, run_dir, overrides = prepared
    other = load_config(None, [*overrides, *REACHABLE, "distill.max_start_epoch=3", "distill.expert_epochs=2"])
    with pytest.raises(NacdError, match=r"snapshots up to epoch 3, but distill.max_start_epoch=3 .* need epoch 4"):
        distill.run(other, run_dir)


def test_non_finite_iterations_are_skipped_then_stop(prepared, monkeypatch):
    cfg, run_dir, overrides = prepared
    cfg = load_config(
        None,
        [*overrides, *REACHABLE, "distill.iterations=20", "distill.max_bad_iterations=3", "distill.panel_size=0"],
    )
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


def test_a_prompt_offset_is_distilled_and_tuned_at_the_same_place(prepared, monkeypatch):
    """``distill.prompt_offset=1``: the student and the tuning of the distilling model both put the
    prompts after the first token (the tuning reads the offset from the distilled set's manifest)."""
    from nacd import finetune, tm

    cfg, run_dir, overrides = prepared
    seen: list[int] = []
    real = tm.prompted_inputs

    def spy(embed, scale, prompts, text, offset=0):
        seen.append(offset)
        return real(embed, scale, prompts, text, offset)

    monkeypatch.setattr(tm, "prompted_inputs", spy)
    with pytest.raises(NacdError, match="distill.prompt_offset=999: example .* has only"):
        distill.run(load_config(None, [*overrides, *REACHABLE, "distill.prompt_offset=999"]), run_dir)
    assert not (run_dir.distill_dir / "manifest.json").exists()  # refused before anything is written
    moved = load_config(None, [*overrides, *REACHABLE, "distill.iterations=3", "distill.prompt_offset=1"])
    ds = distill.run(moved, run_dir)
    assert ds.manifest["distill"]["prompt_offset"] == 1 and seen and set(seen) == {1}
    seen.clear()
    tune = load_config(None, [*overrides, *REACHABLE, "finetune.dataset=distilled", "finetune.name=nacd"])
    assert finetune.run(tune, run_dir)["prompt_mode"] == "embeddings"
    assert seen and set(seen) == {1}


def test_finetune_on_the_distilled_set_same_and_other_architecture(prepared, tiny_gemma_dir):
    from nacd import finetune

    cfg, run_dir, overrides = prepared
    ds = distill.run(cfg, run_dir)
    same = load_config(None, [*overrides, *REACHABLE, "finetune.dataset=distilled", "finetune.name=nacd"])
    m = finetune.run(same, run_dir)
    assert m["complete"] and m["prompt_mode"] == "embeddings" and m["ids"] == ds.ids
    assert m["distilled"]["alpha"] == ds.alpha

    # the prompts really enter the model: zero prompts give a different loss on the same batch
    from nacd.chat import tokenize_corpus
    from nacd.config import ModelConfig
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


def test_a_continued_distilled_set_retunes_its_cells_and_a_changed_setting_is_still_refused(prepared):
    """A tuning on the distilled set is stale once the set is continued (``distill.iterations`` raised): the
    next ``nacd finetune`` / ``nacd run`` tunes it again on the new prompts instead of refusing; after another
    selection the distillation is made again too. A tuning whose own setting differs is still refused, and
    an unchanged one is skipped."""
    from nacd import finetune
    from nacd.artifacts import stale_upstream
    from nacd.finetune import UPSTREAM_FIELDS

    cfg, run_dir, overrides = prepared
    short = [*overrides, *REACHABLE, "distill.panel_size=0"]
    first = distill.run(load_config(None, [*short, "distill.iterations=2"]), run_dir)
    tune = [*short, "distill.iterations=2", "finetune.dataset=distilled", "finetune.name=nacd"]
    folder = run_dir.finetune_dir("nacd")

    def made() -> str:
        return json.loads((folder / "manifest.json").read_text())["created"]

    m1 = finetune.run(load_config(None, tune), run_dir)
    assert m1["distilled"]["created"] == first.manifest["created"]
    t1 = made()
    assert finetune.run(load_config(None, tune), run_dir)["created"] == t1  # unchanged: skipped

    second = distill.run(load_config(None, [*short, "distill.iterations=4"]), run_dir)
    assert second.manifest["created"] != first.manifest["created"]
    with pytest.raises(NacdError, match=r"field 'train.lr' was .*set finetune.name"):  # a setting: refused
        finetune.run(load_config(None, [*tune, "finetune.train.lr=0.5"]), run_dir)
    m2 = finetune.run(load_config(None, [*short, "distill.iterations=4", *tune[-2:]]), run_dir)
    assert m2["complete"] and made() != t1
    assert m2["distilled"]["created"] == second.manifest["created"]
    assert m2["distilled"]["alpha"] == second.alpha

    # another selection (a smaller budget): select, the distillation and its tuning are made again
    fewer = [*short, "distill.iterations=4", "select.budget=12"]
    selection.run(load_config(None, fewer), run_dir)
    third = distill.run(load_config(None, fewer), run_dir)
    assert len(third.ids) == 12 and [h["iteration"] for h in third.history()] == [1, 2, 3, 4]
    m3 = finetune.run(load_config(None, [*fewer, *tune[-2:]]), run_dir)
    assert m3["n_examples"] == 12 and m3["distilled"]["created"] == third.manifest["created"]

    # the rule itself: an upstream field alone -> stale (named); with a setting too -> not stale (refused)
    before = {"seed": 0, "distilled": {"created": "a", "alpha": 0.1}}
    assert stale_upstream(before, {"seed": 0, "distilled": {"created": "b", "alpha": 0.1}}, UPSTREAM_FIELDS) == (
        "distilled.created was 'a', now 'b'"
    )
    assert stale_upstream(before, {"seed": 1, "distilled": {"created": "b", "alpha": 0.1}}, UPSTREAM_FIELDS) is None
    assert stale_upstream(before, dict(before), UPSTREAM_FIELDS) is None


def test_the_student_recipe_tunes_every_variant_as_the_student_stepped(prepared, tmp_path):
    """``finetune.recipe=student``: SGD at the distilled alpha, the distillation's batch and clip, constant lr,
    no warmup or decay, for the selection as for the distilled set (a size below one batch: one batch of
    all); refused, naming the option, where no distilled set exists; a continued set re-tunes it."""
    from nacd import finetune
    from nacd.pipeline import needed_stages

    cfg, run_dir, overrides = prepared
    student = [*overrides, *REACHABLE, "distill.panel_size=0", "distill.iterations=2", "finetune.recipe=student"]
    with pytest.raises(NacdError, match=r"finetune.recipe=student: no distilled set in .*distill"):
        finetune.run(load_config(None, [*student, "finetune.dataset=selected", "finetune.name=s"]), run_dir)
    ds = distill.run(load_config(None, student), run_dir)
    for dataset in ("selected", "distilled"):
        m = finetune.run(
            load_config(None, [*student, f"finetune.dataset={dataset}", f"finetune.name={dataset}"]), run_dir
        )
        t = m["train"]
        assert m["recipe"] == "student" and t["optimizer"] == "sgd" and t["lr"] == ds.alpha
        assert t["batch_size"] == 8 == ds.manifest["distill"]["batch_size"]
        assert t["max_grad_norm"] == ds.manifest["student_clip_norm"]
        assert (t["lr_schedule"], t["warmup_ratio"], t["weight_decay"]) == ("constant", 0.0, 0.0)
        assert m["total_steps"] == cfg.finetune.train.epochs * 2  # 16 examples in batches of 8
    five = tmp_path / "five.txt"
    five.write_text("\n".join(ds.ids[:5]) + "\n")
    m = finetune.run(
        load_config(None, [*student, "finetune.dataset=selected", f"finetune.ids_file={five}", "finetune.name=five"]),
        run_dir,
    )
    assert m["train"]["batch_size"] == 5 and m["n_examples"] == 5
    # the recipe's lr follows the set: continued, the set's tunings are stale, not refused
    longer = [*student[:-2], "distill.iterations=4", "finetune.recipe=student"]
    distill.run(load_config(None, longer), run_dir)
    again = finetune.run(load_config(None, [*longer, "finetune.dataset=selected", "finetune.name=selected"]), run_dir)
    assert again["complete"] and again["train"]["lr"] == distill.DistilledSet.load(run_dir.distill_dir).alpha
    # only the recipe's fields follow the set: another number of epochs is a setting, refused by name
    epochs = f"finetune.train.epochs={cfg.finetune.train.epochs + 1}"
    with pytest.raises(NacdError, match=r"field 'train.epochs' was"):
        finetune.run(
            load_config(None, [*longer, "finetune.dataset=selected", "finetune.name=selected", epochs]), run_dir
        )
    # nacd run distills for a student-tuned FULL even without sel_nacd
    plan = load_config(None, [*overrides, "finetune.recipe=student", "compare.variants=[baseline, full]"])
    assert needed_stages(plan) == ["select", "experts", "distill"]
    assert needed_stages(load_config(None, [*overrides, "compare.variants=[baseline, full]", "compare.sizes=[]"])) == []


def test_prompt_dropout_tunes_a_share_of_batches_on_plain_input(prepared, tiny_gemma_dir):
    """``finetune.prompt_dropout``: a batch goes without its prompts by a hash of the seed and its ids (the
    same decision on a resume), about the asked share of batches; the tuning records the setting; a
    receiving model (text mode) takes the plain tokenization of a dropped batch, the prompted one otherwise,
    by the same decision."""
    from nacd import finetune
    from nacd.finetune import PromptedExample, PromptedForward

    cfg, run_dir, overrides = prepared
    distill.run(load_config(None, [*overrides, *REACHABLE, "distill.iterations=2", "distill.panel_size=0"]), run_dir)

    class Ex:
        def __init__(self, i):
            self.id, self.input_ids, self.labels = f"x{i}", [1, 2, 3], [-100, 2, 3]

    fwd = PromptedForward.__new__(PromptedForward)
    fwd.dropout, fwd.seed = 0.5, 7
    batches = [[PromptedExample(Ex(i), torch.zeros(2, 4)), PromptedExample(Ex(i + 1000), torch.zeros(2, 4))]
               for i in range(400)]  # fmt: skip
    plain = [fwd.plain(b) for b in batches]
    assert 0.4 < sum(plain) / len(plain) < 0.6 and plain == [fwd.plain(b) for b in batches]
    fwd.dropout = 0.0
    assert not any(fwd.plain(b) for b in batches)

    # a plain batch after a prompted one goes through the same forward and gives the plain loss
    from nacd.chat import tokenize_corpus
    from nacd.config import ModelConfig
    from nacd.data import load_corpus
    from nacd.models import load_model
    from nacd.train import default_forward

    model, tok = load_model(ModelConfig(spec=cfg.model.spec), torch.device("cpu"))
    ds = distill.DistilledSet.load(run_dir.distill_dir)
    corpus = {ex.id: ex for ex in load_corpus(cfg.data)[0]}
    data = tokenize_corpus([corpus[i] for i in ds.ids[:4]], tok, cfg.data)
    items = [PromptedExample(ex, ds.embeddings(ex.id)) for ex in data]
    fwd = PromptedForward(model, dropout=0.0)
    with torch.no_grad():
        prompted = fwd.collate(items, tok.pad_token_id)
        assert "prompts" in prompted
        fwd(model, prompted)
        assert fwd.ready  # the sparse-logits hook is on the model from here
        fwd.dropout = 0.999999
        plain_batch = fwd.collate(items, tok.pad_token_id)
        assert "prompts" not in plain_batch
        a, n = fwd(model, plain_batch)
        fwd.close()
        b, m = default_forward(model, plain_batch)
    assert n == m and a.item() == pytest.approx(b.item(), rel=1e-5)

    tune = [*overrides, *REACHABLE, "distill.iterations=2", "distill.panel_size=0", "finetune.dataset=distilled"]
    m = finetune.run(load_config(None, [*tune, "finetune.prompt_dropout=0.5", "finetune.name=drop"]), run_dir)
    assert m["complete"] and m["prompt_dropout"] == 0.5
    assert "prompt_text_lost" not in m  # embeddings mode: nothing to lose
    other = [*tune, "finetune.prompt_dropout=0.5", f"finetune.model={tiny_gemma_dir}", "finetune.name=t"]
    m = finetune.run(load_config(None, other), run_dir)
    assert m["complete"] and m["prompt_dropout"] == 0.5 and m["prompt_mode"] == "text"

    # text mode: a dropped batch is the examples tokenized without their prompt text, the same decision
    from nacd.chat import collate
    from nacd.finetune import plain_batch, prompt_text_lost, text_dropout_collate, text_pairs, with_prompt_text

    texts = ds.prompt_texts("learned")
    plain_ex = [corpus[i] for i in ds.ids[:4]]
    whole = replace(cfg.data, max_seq_len=4096)  # at 64 tokens truncation cuts the text after the system turn
    prompted_tok = tokenize_corpus([with_prompt_text(ex, texts[ex.id]) for ex in plain_ex], tok, whole)
    plain_tok = tokenize_corpus(plain_ex, tok, whole)
    pairs = text_pairs(prompted_tok, plain_tok)
    # at 64 tokens the tiny chat template's system turn leaves no room: all four lose their prompt text
    cut = [
        tokenize_corpus(x, tok, cfg.data) for x in ([with_prompt_text(ex, texts[ex.id]) for ex in plain_ex], plain_ex)
    ]
    assert prompt_text_lost(text_pairs(*cut)) == 4 and prompt_text_lost(pairs) == 0
    _, gtok = load_model(ModelConfig(spec=str(tiny_gemma_dir)), torch.device("cpu"))
    sel = [corpus[i] for i in ds.ids]
    g_prompted = tokenize_corpus([with_prompt_text(ex, texts[ex.id]) for ex in sel], gtok, cfg.data)
    g_plain = tokenize_corpus(sel, gtok, cfg.data)
    assert m["prompt_text_lost"] == sum(a.input_ids == b.input_ids for a, b in zip(g_prompted, g_plain, strict=True))
    assert [p.id for p in pairs] == [ex.id for ex in plain_ex] and all(p.labels is p.prompted.labels for p in pairs)
    assert all(p.prompted.input_ids != p.plain.input_ids for p in pairs)  # the prompt text is in one only
    for dropout, want in ((0.0, prompted_tok), (0.999999, plain_tok)):
        got = text_dropout_collate(tok.pad_token_id, 7, dropout)(pairs)
        assert torch.equal(got["input_ids"], collate(want, tok.pad_token_id)["input_ids"])
    assert [plain_batch([it.example.id for it in b], 7, 0.5) for b in batches] == plain  # as embeddings mode
    half = text_dropout_collate(tok.pad_token_id, 7, 0.5)
    orders = [[pairs[(i + j) % 4] for j in range(2)] for i in range(4)] + [pairs[::-1], pairs]
    dropped = [plain_batch([p.id for p in b], 7, 0.5) for b in orders]
    assert 0 < sum(dropped) < len(orders)  # both kinds occur among these batches
    for b, drop in zip(orders, dropped, strict=True):
        want = collate([p.plain if drop else p.prompted for p in b], tok.pad_token_id)
        assert torch.equal(half(b)["input_ids"], want["input_ids"])
    with pytest.raises(NacdError, match="prompt_dropout: applies to dataset=distilled only"):
        finetune.run(load_config(None, [*overrides, "finetune.prompt_dropout=0.5", "finetune.name=s"]), run_dir)


def test_a_finished_set_is_kept_before_the_process_count_is_checked(prepared, monkeypatch):
    """Finished work first: a one-process distillation, asked for again by two processes with the same
    settings, is complete (the meta-batch split concerns only how it would be computed); an unfinished one
    is refused with the advice."""
    from nacd.ranks import Ranks

    cfg, run_dir, overrides = prepared
    done = load_config(None, [*overrides, *REACHABLE, "distill.iterations=2", "distill.panel_size=0"])
    ds = distill.run(done, run_dir)

    class Two(Ranks):
        def from_main(self, obj):
            return obj

        def barrier(self):
            pass

    monkeypatch.setattr(distill, "current_ranks", lambda cpu=False: Two(0, 2))
    again = distill.run(done, run_dir)
    assert again.manifest["created"] == ds.manifest["created"]
    more = load_config(None, [*overrides, *REACHABLE, "distill.iterations=3", "distill.panel_size=0"])
    with pytest.raises(NacdError, match="2 processes but distill.meta_batch=1"):
        distill.run(more, run_dir)


def test_finetune_on_the_initial_prompt_tokens_the_control(prepared, tiny_gemma_dir, monkeypatch):
    """``finetune.prompts=initial`` (nacd run's sel_init): the distilling model takes the embedding rows of
    the initial tokens, a receiving model their decoded text; both recorded in the manifest."""
    from nacd import finetune

    cfg, run_dir, overrides = prepared
    ds = distill.run(cfg, run_dir)
    seen = {}
    real = finetune.PromptedExample

    def spy(example, prompt):
        seen[example.id] = prompt
        return real(example, prompt)

    monkeypatch.setattr(finetune, "PromptedExample", spy)
    tune = [*overrides, *REACHABLE, "finetune.dataset=distilled", "finetune.prompts=initial"]
    m = finetune.run(load_config(None, [*tune, "finetune.name=init"]), run_dir)
    assert m["complete"] and m["prompt_mode"] == "embeddings" and m["prompts"] == "initial"
    from nacd.config import ModelConfig
    from nacd.models import load_model, resolve_device

    # the embedding table as the run had it (bf16 on a GPU with dtype auto), compared in float32
    model, _ = load_model(ModelConfig(spec=cfg.model.spec), resolve_device(cfg.run.device))
    table = model.get_input_embeddings().weight.detach().float().cpu()
    assert set(seen) == set(ds.ids)
    for i, example_id in enumerate(ds.ids):
        assert torch.equal(seen[example_id], table[ds.initial_ids[i]])
    texts = ds.prompt_texts("initial")
    assert all(r["initial_prompt_text"] == texts[r["id"]] for r in ds.records)
    seen_text = []
    real_text = finetune.with_prompt_text
    monkeypatch.setattr(finetune, "with_prompt_text", lambda ex, t: seen_text.append(t) or real_text(ex, t))
    other = load_config(None, [*tune, f"finetune.model={tiny_gemma_dir}", "finetune.name=init_text"])
    m2 = finetune.run(other, run_dir)
    assert m2["prompt_mode"] == "text" and m2["prompts"] == "initial"
    assert sorted(seen_text) == sorted(texts.values())
    with pytest.raises(NacdError, match="finetune.prompts"):
        load_config(None, [*overrides, "finetune.dataset=selected", "finetune.prompts=initial"])


# --------------------------------------------------------------------------- the prompt-gain panel


def _gain(cfg, run_dir):
    ds = distill.run(cfg, run_dir)
    return ds, ds.manifest["prompt_gain"], ds.panel()


def test_prompt_gain_is_positive_when_prompts_learn_and_zero_when_frozen(prepared_float32):
    """The diagnostic: on held-out draws (expert run 1, never trained on), learned prompts beat their
    initialisation at the same alpha with the interval above 0; frozen prompts give an interval with 0."""
    cfg, run_dir, overrides = prepared_float32
    common = [*overrides, *REACHABLE, "distill.iterations=30", "distill.eval_every=15"]
    recipe = ["distill.alpha_mode=fixed", "distill.init=example_tokens", "distill.regularizer=spacing_squared"]
    ds, gain, panel = _gain(load_config(None, [*common, *recipe]), run_dir)
    assert [r["iteration"] for r in panel] == [0, 15, 30]
    assert panel[0]["prompt_gain"]["mean"] == 0 and panel[0]["prompt_gain"]["ci_low"] == 0
    assert {d["run"] for d in panel[-1]["per_draw"]} == {1}  # the held-out expert run
    assert sorted({d["start_epoch"] for d in panel[-1]["per_draw"]}) == [0, 1]  # stratified
    assert gain["draws"] == 16 and gain["ci_low"] > 0 and gain["mean"] > 0 and gain["relative"] > 0.01, gain
    assert gain["ci_low"] <= gain["mean"] <= gain["ci_high"]
    assert set(panel[-1]["residual_share"]) == {"lora_A", "lora_B"}
    assert sum(panel[-1]["residual_share"].values()) == pytest.approx(1.0)
    by_layer = panel[-1]["residual_share_by_layer"]  # the tiny model's blocks, in order
    assert list(by_layer) == [str(i) for i in range(len(by_layer))] and len(by_layer) >= 2
    assert sum(by_layer.values()) == pytest.approx(1.0)
    assert sum(panel[-1]["residual_share_by_module"].values()) == pytest.approx(1.0)
    assert "prompt gain on 16 held-out draws at iteration 30" in ds.gain_line() and "above 0" in ds.gain_line()

    shutil_rm(run_dir.distill_dir)
    frozen = load_config(None, [*common, "distill.lr_syn=1e-12"])  # the paper's shared, learned alpha
    ds2, gain2, _ = _gain(frozen, run_dir)
    assert gain2["ci_low"] <= 0 <= gain2["ci_high"], gain2
    assert abs(gain2["mean"]) < 1e-6
    assert ds2.alpha != pytest.approx(0.2)  # alpha learned all the same: the panel is blind to it
    # frozen prompts decode to their initial tokens: a receiving model gets nothing new, and is told so
    assert torch.equal(ds2.nearest_ids, ds2.initial_ids)
    assert ds2.manifest["tokens_moved"] == 0 and ds2.manifest["examples_moved"] == 0
    assert ds2.moved_line().startswith(f"nearest tokens: 0 of {ds2.nearest_ids.numel()} prompt vectors left")
    # ... and the hard-token gain (decoded tokens against the initial tokens, mean_vocab's nearest) is 0
    hard = ds2.manifest["prompt_gain_hard"]
    assert hard["mean"] == 0 and hard["draws"] == 16 and hard["l_initial_mean"] == hard["l_current_mean"]
    assert ds2.hard_gain_line().startswith("hard-token gain") and "contains 0" in ds2.hard_gain_line()


def test_prompts_that_cross_to_other_tokens_are_counted(prepared):
    """A prompt step far larger than the vocabulary's spacing (lr_syn 1, no regulariser) carries prompt
    vectors to other tokens: the manifest counts them, the records keep both texts, inspect says so."""
    from nacd.inspection import describe_examples
    from nacd.models import load_tokenizer

    cfg, run_dir, overrides = prepared
    jump = [*overrides, *REACHABLE, "distill.iterations=3", "distill.panel_size=0", "distill.alpha_mode=fixed"]
    ds = distill.run(load_config(None, [*jump, "distill.lr_syn=1.0", "distill.beta=0"]), run_dir)
    moved = ds.nearest_ids != ds.initial_ids
    assert ds.manifest["tokens_moved"] == int(moved.sum()) > 0
    assert ds.manifest["examples_moved"] == int(moved.any(dim=1).sum()) > 0
    tok = load_tokenizer(cfg.model.spec)
    for rec, row in zip(ds.records, ds.initial_ids.tolist(), strict=True):
        assert rec["initial_prompt_tokens"] == [tok.decode([t]) for t in row]
    text = describe_examples(ds, count=len(ds.records))
    assert f"{int(moved.sum())} of {moved.numel()} prompt vectors left their initial token" in text
    assert "(initially " in text


def test_meta_batch_gradient_is_the_mean_of_single_draw_gradients(prepared):
    cfg, run_dir, _ = prepared
    from nacd import tm
    from nacd.chat import tokenize_corpus
    from nacd.config import ModelConfig
    from nacd.experts import ExpertStore
    from nacd.lora import add_lora
    from nacd.models import load_model
    from nacd.panel import sample_draw
    from nacd.select import read_ids, select_examples

    model, tok = load_model(ModelConfig(spec=cfg.model.spec), torch.device("cpu"), needs_double_backward=True)
    model = add_lora(model, cfg.lora)
    ids = read_ids(run_dir.select_dir / "selection.json")
    data = tokenize_corpus(select_examples(load_config_corpus(cfg), ids, "sel"), tok, cfg.data)
    from nacd.student import Student

    student = Student(model, data, tok.pad_token_id)
    store = ExpertStore(run_dir.experts_dir)

    def snapshot(run, epoch):
        snap = store.snapshot(run, epoch)
        return [snap[name] for name in student.names]

    vocab = tm.candidate_rows(student)
    syn = torch.nn.Parameter(tm.initial_prompts("random_vocab", vocab, len(data), 2, 0))
    log_alpha = torch.nn.Parameter(torch.tensor([-1.0]))

    def alpha_of(epoch):
        return log_alpha[0].exp()

    alpha_of.leaf = log_alpha
    gen = torch.Generator().manual_seed(3)
    draws = [sample_draw(gen, [0, 1], 2, len(data), 8, 2) for _ in range(3)]
    dc = cfg.distill

    def grads(chosen, skip_above=None):
        syn.grad = log_alpha.grad = None
        d = type(dc)(**{**dc.__dict__, "skip_above": skip_above})
        rows, accepted, finite = distill_loop.meta_gradient(
            student, chosen, syn, alpha_of, snapshot, vocab, d, 1.0, 1.0, None
        )
        assert finite
        return syn.grad.clone(), log_alpha.grad.clone(), rows, accepted

    singles = [grads([d]) for d in draws]
    both, alpha_both, rows, accepted = grads(draws)
    assert accepted == 3 and len(rows) == 3
    torch.testing.assert_close(both, sum(s[0] for s in singles) / 3, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(alpha_both, sum(s[1] for s in singles) / 3, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(singles[0][0], singles[1][0])  # the draws really differ
    # a threshold between the draws' losses keeps only those below it, averaged over them
    losses = [r["l_distill"] for r in rows]
    cut = sorted(losses)[1] + 1e-6
    kept, _, rows2, accepted2 = grads(draws, skip_above=cut)
    below = [s for s, x in zip(singles, losses, strict=True) if x <= cut]
    assert accepted2 == 2 and [r["above_threshold"] for r in rows2] == [x > cut for x in losses]
    torch.testing.assert_close(kept, sum(s[0] for s in below) / 2, rtol=1e-5, atol=1e-7)
    student.close()


def load_config_corpus(cfg):
    from nacd.data import load_corpus

    return load_corpus(cfg.data)[0]


def test_alpha_modes_and_token_inits(prepared_float32):
    """In float32 on a GPU too: the first fd case expects fd's self-check (a difference of two forwards) to
    pass, which bf16 rounding of the tiny model fails (seen on an H200: that run fell back to flat)."""
    cfg, run_dir, overrides = prepared_float32
    base = [*overrides, *REACHABLE, "distill.iterations=4", "distill.panel_size=2", "distill.meta_batch=2"]
    fixed = distill.run(load_config(None, [*base, "distill.alpha_mode=fixed", "distill.init=example_tokens"]), run_dir)
    assert fixed.alpha == pytest.approx(0.2) and all(h["alpha"] == pytest.approx(0.2) for h in fixed.history())
    assert all(len(h["draws"]) == 2 and h["accepted"] == 2 for h in fixed.history())
    assert fixed.manifest["distinct_prompts"] > 8  # each example starts at its own tokens
    shutil_rm(run_dir.distill_dir)
    per = distill.run(
        load_config(None, [*base, "distill.alpha_mode=per_epoch", "distill.init=frequent_vocab"]), run_dir
    )
    alphas = per.manifest["alphas"]
    assert len(alphas) == 2 and alphas[0] != alphas[1] and per.alpha == pytest.approx(sum(alphas) / 2)
    assert per.history()[-1]["alphas"] == pytest.approx(alphas)
    shutil_rm(run_dir.distill_dir)
    fit = distill.run(load_config(None, [*base, "distill.alpha_mode=fitted", "distill.alpha_fit_draws=4"]), run_dir)
    alphas, curves = fit.manifest["alpha_fit"]["alphas"], fit.manifest["alpha_fit"]["curves"]
    assert fit.manifest["alphas"] == pytest.approx(alphas) and len(alphas) == 2
    for alpha, curve in zip(alphas, curves, strict=True):  # the best of its curve, on the x2 grid from alpha_0
        assert alpha == pytest.approx(min(curve, key=lambda c: c[1])[0])
        assert math.log2(alpha / 0.2) == pytest.approx(round(math.log2(alpha / 0.2)))
        assert len(curve) >= 2
    assert all(h["alphas"] == pytest.approx(alphas) for h in fit.history())  # frozen once fitted
    shutil_rm(run_dir.distill_dir)
    for eps, used in (("null", "fd"), ("30.0", "flat")):  # fd checks itself first; far off, the run uses flat
        run = distill.run(load_config(None, [*base, "distill.unroll=fd", f"distill.fd_eps={eps}"]), run_dir)
        info = run.manifest["unroll"]
        assert info["requested"] == "fd" and info["used"] == used
        assert (info["fd_relative_error"] <= 5e-2) == (used == "fd")
        shutil_rm(run_dir.distill_dir)
    none = distill.run(load_config(None, [*base, "distill.skip_above=1e-9"]), run_dir)  # every draw skipped
    assert all(h["accepted"] == 0 and not h["skipped"] for h in none.history())
    assert none.manifest["prompt_gain"]["mean"] == 0  # nothing moved


def _one_and_two_processes(prepared, tmp_path, settings, port):
    """The distilled set of one process (in the fixture's run folder) and of two under torchrun (in a copy
    of its selection and experts), with the same ``settings``; and the torchrun argv, for reruns."""
    import shutil

    from conftest import torchrun_nacd

    _, run_dir, overrides = prepared
    two = tmp_path / "two"
    for stage in ("select", "experts"):
        shutil.copytree(run_dir.root / stage, two / stage)
    one_set = distill.run(load_config(None, [*overrides, *settings]), run_dir)
    argv = [a for a in overrides if not a.startswith("run.out_dir=")] + settings + [f"run.out_dir={two}"]
    proc = torchrun_nacd("distill", argv, port)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one_set, distill.DistilledSet.load(two / "distill"), argv


def test_two_processes_give_the_one_process_result_with_the_same_meta_batch(prepared_multiprocess, tmp_path):
    """Issue #13: each process unrolls its share of every meta-batch (and of the panel, and of the fit of
    alpha); the summed gradients make the prompts, alpha and history those of one process."""
    from conftest import torchrun_nacd

    settings = [
        *REACHABLE,
        "distill.iterations=3",
        "distill.meta_batch=2",
        "distill.panel_size=4",
        "distill.eval_every=3",
        "distill.alpha_mode=fitted",
        "distill.alpha_fit_draws=4",
    ]
    one_set, two_set, argv = _one_and_two_processes(prepared_multiprocess, tmp_path, settings, 29541)
    torch.testing.assert_close(two_set.prompts, one_set.prompts, rtol=0, atol=1e-6)
    assert two_set.manifest["alphas"] == pytest.approx(one_set.manifest["alphas"], abs=1e-6)
    assert two_set.manifest["processes"] == {"count": 2, "draws_per_update": [1, 1]}
    a, b = one_set.history(), two_set.history()
    assert [r["l_distill"] for r in b] == pytest.approx([r["l_distill"] for r in a], abs=1e-6)
    assert [[d["draw"] for d in r["draws"]] for r in b] == [[0, 1]] * 3
    pa, pb = one_set.panel(), two_set.panel()
    assert [p["l_current_mean"] for p in pb] == pytest.approx([p["l_current_mean"] for p in pa], abs=1e-6)
    assert len(pb[-1]["per_draw"]) == 4

    # more processes than draws per update is refused, naming the setting (where there is work to do: a
    # finished set with the same settings is kept whatever the process count, tested in one process above)
    argv[argv.index("distill.meta_batch=2")] = "distill.meta_batch=1"
    shutil.rmtree(tmp_path / "two" / "distill")
    proc = torchrun_nacd("distill", argv, 29541)
    assert proc.returncode != 0 and "2 processes but distill.meta_batch=1" in proc.stderr


def test_two_processes_score_the_swaps_as_one_does(prepared_multiprocess, tmp_path):
    """discrete=swap under a launcher: each process scores its share of the swaps (the main process the
    combination of swap_keep > 1); the kept swaps, the tokens and the history are those of one process."""
    settings = [*REACHABLE, "distill.iterations=3", "distill.meta_batch=2", "distill.panel_size=2"]
    settings += [
        "distill.alpha_mode=fixed",
        "distill.discrete=swap",
        "distill.swap_candidates=5",
        "distill.swap_keep=3",
    ]
    one_set, two_set, _ = _one_and_two_processes(prepared_multiprocess, tmp_path, settings, 29543)
    assert torch.equal(two_set.nearest_ids, one_set.nearest_ids)
    a, b = ([r["swap"] for r in s.history()] for s in (one_set, two_set))
    assert [(r["swapped"], r["swaps"]) for r in b] == [(r["swapped"], r["swaps"]) for r in a]
    assert [r["l_best"] for r in b] == pytest.approx([r["l_best"] for r in a], abs=1e-6)
    assert any(r["l_combined"] is not None for r in b)  # the main process scored a combination


#: Run by torchrun: the second process dies without a word (``os._exit``, as the out-of-memory killer
#: would end it) in the third iteration, after the main process has checkpointed the first.
_DIES = """
import os, sys
import nacd.distill_loop as d
from nacd.cli import main
from nacd.ranks import current

if current(cpu=True).rank == 1:
    real, calls = d.meta_gradient, [0]

    def dies(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            os._exit(3)
        return real(*args, **kwargs)

    d.meta_gradient = dies
sys.exit(main(["distill", *sys.argv[1:]]))
"""


def test_a_process_that_dies_is_named_and_the_run_resumes(prepared_multiprocess, tmp_path):
    """Issue #13: when one process dies, the others say why they stop (not only torchrun's summary),
    nothing is marked complete, and the same command resumes to the uninterrupted result."""
    import re
    import shutil

    from conftest import torchrun

    cfg, run_dir, overrides = prepared_multiprocess
    settings = [*REACHABLE, "distill.iterations=5", "distill.meta_batch=2", "distill.checkpoint_every=1"]
    settings += ["distill.panel_size=2"]
    two = tmp_path / "two"
    for stage in ("select", "experts"):
        shutil.copytree(run_dir.root / stage, two / stage)
    script = tmp_path / "dies.py"
    script.write_text(_DIES)
    argv = [a for a in overrides if not a.startswith("run.out_dir=")] + settings + [f"run.out_dir={two}"]
    proc = torchrun([str(script), *argv], 29561, timeout=300)
    assert proc.returncode != 0
    said = re.search(r"nacd distill \(process 0 of 2\): (stopped by the launcher|error: lost contact)", proc.stderr)
    assert said, proc.stderr[-3000:]
    assert "run the same command again" in proc.stderr
    assert json.loads((two / "distill" / "manifest.json").read_text())["complete"] is False
    log = (two / "nacd.log").read_text()
    assert "nacd distill (process 0 of 2)" in log  # the log says it too, for runs without a terminal

    # the same command (here in one process, the same meta-batch) resumes and ends where one process does
    resumed = distill.run(load_config(None, argv), RunDir(two))
    at = re.findall(r"resumed from .* at iteration (\d+)", (two / "nacd.log").read_text())
    assert at and int(at[-1]) >= 1
    whole = distill.run(load_config(None, [*overrides, *settings]), run_dir)
    torch.testing.assert_close(resumed.prompts, whole.prompts, rtol=0, atol=1e-6)
    assert [h["iteration"] for h in resumed.history()] == [1, 2, 3, 4, 5]


def test_pez_distills_hard_tokens_and_the_panel_measures_them(prepared, capsys):
    """distill.discrete=pez: the set is the projection of a continuous copy, so every prompt is a
    vocabulary row (distance 0, its token what a receiving model reads); the continuous copy is kept;
    tokens move; the hard-token gain is the panel's gain (the prompts measured are tokens already);
    under none the same settings leave vectors between tokens and the hard-token gain is measured apart."""
    from safetensors.torch import load_file

    from nacd.config import ModelConfig
    from nacd.models import load_model, resolve_device
    from nacd.tm import nearest_rows, text_token_ids

    cfg, run_dir, overrides = prepared
    jump = [*overrides, *REACHABLE, "distill.iterations=4", "distill.panel_size=4", "distill.eval_every=2"]
    jump += ["distill.alpha_mode=fixed", "distill.init=example_tokens", "distill.lr_syn=0.5", "distill.beta=0"]
    ds = distill.run(load_config(None, [*jump, "distill.discrete=pez"]), run_dir)
    model, tok = load_model(ModelConfig(spec=cfg.model.spec), resolve_device(cfg.run.device))
    vocab = model.get_input_embeddings().weight.detach().float().cpu()
    assert torch.equal(ds.prompts, vocab[ds.nearest_ids])
    assert float(ds.nearest_dist.max()) == 0.0
    continuous = load_file(run_dir.distill_dir / "prompts.safetensors")["continuous"]
    text_ids = torch.tensor(text_token_ids(tok, vocab.shape[0]))
    rows = nearest_rows(continuous.reshape(-1, 64), vocab[text_ids], "cosine")
    assert torch.equal(text_ids[rows].reshape(16, 2), ds.nearest_ids)  # the set is the continuous copy's projection
    assert not torch.equal(continuous, ds.prompts) and ds.manifest["tokens_moved"] > 0
    hard, gain = ds.manifest["prompt_gain_hard"], ds.manifest["prompt_gain"]
    assert {key: hard[key] for key in ("mean", "ci_low", "ci_high")} == {
        key: gain[key] for key in ("mean", "ci_low", "ci_high")
    }
    assert [r["iteration"] for r in ds.panel()] == [0, 2, 4]
    # nacd inspect / report take the run folder itself, even moved elsewhere (its config.yaml, out_dir = it)
    import shutil

    from nacd.cli import main

    moved = run_dir.root.parent / "moved"
    shutil.copytree(run_dir.root, moved)
    assert main(["inspect", str(moved), "--examples", "1", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert f"{moved / 'distill'}: 16 examples" in out and "hard-token gain" in out and "pseudo tokens" in out
    assert main(["report", str(moved)]) == 0
    assert f"report: {moved / 'report' / 'report.md'}" in capsys.readouterr().out
    assert main(["inspect", str(moved / "distill")]) == 2
    assert "config.yaml: not found; is" in capsys.readouterr().err

    # nacd export: ordinary data sets (JSONL chats, a datasets folder, a card) that a trainer reads
    from datasets import load_dataset, load_from_disk

    from nacd import finetune

    out = run_dir.root.parent / "export"
    assert main(["export", str(moved), "--out", str(out)]) == 0
    assert "distilled 16, selected 16 examples" in capsys.readouterr().out
    rows = load_dataset("json", data_files=str(out / "distilled.jsonl"), split="train")
    assert len(rows) == 16 and rows[0]["id"] == ds.records[0]["id"]
    first_user = next(m for m in rows[0]["messages"] if m["role"] == "user")["content"]
    original = next(m for m in ds.records[0]["messages"] if m["role"] == "user")["content"]
    assert first_user == ds.records[0]["prompt_text"] + "\n" + original  # where a receiving model reads it
    hf = load_from_disk(str(out / "hf"))
    assert set(hf) == {"distilled", "selected"} and len(hf["selected"]) == 16
    assert hf["selected"][0]["messages"] == ds.records[0]["messages"]  # D_sel as it is, in the same order
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "split: distilled" in card and "hard-token gain" in card
    assert "sha256" in card and (out / "hf" / "README.md").read_text() == card
    # one step of the project's own loop on the exported chats
    source = f"data.sources=[{{path: {out / 'distilled.jsonl'}, name: exported}}]"
    tune = load_config(None, [*overrides, source, f"run.out_dir={tmp_dir(run_dir) / 'tune'}", "finetune.dataset=full",
                              "finetune.train.max_steps=1", "finetune.train.batch_size=4"])  # fmt: skip
    result = finetune.run(tune, RunDir(tune.run.out_dir))
    assert result["n_examples"] == 16 and result["complete"]

    shutil_rm(run_dir.distill_dir)
    cont = distill.run(load_config(None, jump), run_dir)
    assert float(cont.nearest_dist.min()) > 0  # continuous: the vectors sit between tokens
    assert "continuous" not in load_file(run_dir.distill_dir / "prompts.safetensors")
    chard = cont.manifest["prompt_gain_hard"]
    assert chard["draws"] == 4 and chard["mean"] != cont.manifest["prompt_gain"]["mean"]
    assert chard["l_initial_mean"] == pytest.approx(cont.manifest["prompt_gain"]["l_initial_mean"])  # tokens at init


def test_swap_keeps_tokens_and_only_swaps_that_lower_the_loss(prepared):
    """distill.discrete=swap: the prompts are vocabulary rows from the start (the initial prompts' nearest
    tokens) to the end; each iteration records the swaps it scored, keeps one only when it lowers
    L_distill on the iteration's draws, and every token that moved was a kept swap's; with swap_keep > 1 the
    improving swaps are kept together only when together they score below the best alone; Adam never moves
    them; ema is refused."""
    cfg, run_dir, overrides = prepared
    base = [*overrides, *REACHABLE, "distill.iterations=4", "distill.panel_size=4", "distill.eval_every=4"]
    base += ["distill.alpha_mode=fixed", "distill.discrete=swap", "distill.swap_candidates=6", "distill.swap_topk=8"]
    for keep in (1, 3):
        if run_dir.distill_dir.exists():
            shutil_rm(run_dir.distill_dir)
        ds = distill.run(load_config(None, [*base, f"distill.swap_keep={keep}"]), run_dir)
        assert float(ds.nearest_dist.max()) == 0.0
        hist = ds.history()
        assert all(h["swap"]["tried"] == 6 for h in hist)
        kept = [h["swap"] for h in hist if h["swap"]["swapped"]]
        assert kept and all(s["l_best"] < s["l_current"] and 1 <= len(s["swaps"]) <= keep for s in kept)
        assert all(
            s["l_best_single"] >= s["l_current"] and not s["swaps"]
            for h in hist
            for s in [h["swap"]]
            if not s["swapped"]
        )
        for s in kept:  # several kept together only when together they beat the best alone
            together = len(s["swaps"]) > 1
            assert s["l_best"] == (s["l_combined"] if together else s["l_best_single"])
            assert not together or s["l_combined"] < s["l_best_single"]
        if keep > 1:
            assert any(h["swap"]["l_combined"] is not None for h in hist)  # a combination was scored
        moved = (ds.nearest_ids != ds.initial_ids).nonzero().tolist()
        assert moved and all(pos in [sw[:2] for s in kept for sw in s["swaps"]] for pos in moved)
        assert ds.manifest["prompt_gain_hard"]["mean"] == ds.manifest["prompt_gain"]["mean"]
    with pytest.raises(NacdError, match="distill.ema"):
        load_config(None, [*base, "distill.ema=0.9"])


def test_nearest_words_keeps_every_prompt_a_whole_word(prepared):
    """distill.nearest=words: the initial tokens, every swap candidate and so every prompt token of the set
    decode to a whole word (a leading space and letters), and the decoded prompt text is those words; a word
    is what :func:`nacd.tm.is_word` says."""
    from nacd.config import ModelConfig
    from nacd.models import load_model
    from nacd.tm import is_word, text_token_ids, word_token_ids

    assert is_word(" ocean") and is_word(" été") and not is_word("ocean") and not is_word(" a")
    assert not is_word(" 5th") and not is_word(" (") and not is_word(" ocean,")
    cfg, run_dir, overrides = prepared
    _, tok = load_model(ModelConfig(spec=cfg.model.spec), torch.device("cpu"))
    words = word_token_ids(tok, 10**6)
    assert 0 < len(words) < len(text_token_ids(tok, 10**6))
    assert words == [i for i in text_token_ids(tok, 10**6) if is_word(tok.decode([i]))]
    base = [*overrides, *REACHABLE, "distill.iterations=3", "distill.panel_size=0", "distill.alpha_mode=fixed"]
    base += ["distill.discrete=swap", "distill.swap_candidates=6", "distill.swap_topk=8", "distill.swap_keep=3"]
    ds = distill.run(load_config(None, [*base, "distill.nearest=words", "distill.init=example_tokens"]), run_dir)
    assert ds.manifest["distill"]["nearest"] == "words" and ds.manifest["tokens_moved"] > 0
    assert {int(t) for t in ds.nearest_ids.flatten()} | {int(t) for t in ds.initial_ids.flatten()} <= set(words)
    rec = ds.records[0]
    assert rec["prompt_text"] == tok.decode(rec["prompt_token_ids"]) and all(
        is_word(tok.decode([t])) for t in rec["prompt_token_ids"]
    )


def test_combine_swaps_keeps_the_best_improving_swaps_one_per_position():
    from nacd.swap import combine_swaps

    trials = [(-1, -1, -1), (0, 0, 5), (0, 0, 6), (1, 1, 7), (2, 0, 8), (3, 1, 9)]
    losses = [1.0, 0.9, 0.8, 0.95, 1.1, 0.85]
    assert combine_swaps(trials, losses, 1) == [(0, 0, 6)]
    assert combine_swaps(trials, losses, 3) == [(0, 0, 6), (3, 1, 9), (1, 1, 7)]  # (0, 0, 5): same position
    assert combine_swaps(trials, losses, 9) == [(0, 0, 6), (3, 1, 9), (1, 1, 7)]  # (2, 0, 8) scores worse
    assert combine_swaps(trials, [0.5, *losses[1:]], 3) == []


def test_a_moving_average_of_the_prompts_is_measured_written_and_resumed(prepared):
    """distill.ema: ema_i = decay * ema_{i-1} + (1 - decay) * syn_i from the initial prompts; the set is the
    average, and a continued run goes on from the checkpoint's average."""
    from safetensors.torch import load_file

    cfg, run_dir, overrides = prepared
    base = [*overrides, *REACHABLE, "distill.ema=0.5", "distill.checkpoint_every=1", "distill.panel_size=2"]
    state = run_dir.distill_dir / "checkpoint" / "state.safetensors"
    distill.run(load_config(None, [*base, "distill.iterations=1"]), run_dir)
    one = load_file(state)
    start = 2 * one["ema"] - one["syn"]  # the initial prompts: mean_vocab, one vector everywhere
    torch.testing.assert_close(start, start[:1, :1].expand_as(start))
    assert not torch.equal(one["ema"], one["syn"])
    two_set = distill.run(load_config(None, [*base, "distill.iterations=2"]), run_dir)
    two = load_file(state)
    torch.testing.assert_close(two["ema"], 0.5 * one["ema"] + 0.5 * two["syn"])
    torch.testing.assert_close(two_set.prompts.float(), two["ema"].float())


def test_a_resumed_run_takes_the_initial_prompts_panel_values_from_the_checkpoint(prepared, monkeypatch):
    """With alpha fixed the panel measures the initial prompts once; a resumed run reads those values from
    the checkpoint instead of measuring them again, and its panel rows are the uninterrupted run's."""
    from nacd import unrolls
    from nacd.artifacts import read_jsonl
    from nacd.panel import Panel

    cfg, run_dir, overrides = prepared
    args = [*overrides, *REACHABLE, "distill.alpha_mode=fixed", "distill.iterations=6", "distill.checkpoint_every=3",
            "distill.eval_every=3", "distill.panel_size=3"]  # fmt: skip
    config = load_config(None, args)
    panel_path = run_dir.distill_dir / "panel.jsonl"
    distill.run(config, run_dir)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "time")} for r in rows]  # noqa: E731
    clean = strip(read_jsonl(panel_path))
    shutil_rm(run_dir.distill_dir)

    real_unroll, real_measure = unrolls.unroll, Panel._measure
    calls, initial_measured = {"n": 0}, []

    def unroll_then_stop(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # iteration 5, after the checkpoint at iteration 3
            raise KeyboardInterrupt
        return real_unroll(*a, **kw)

    def measure(self, i, draw, alpha, syn):
        initial_measured.append(torch.equal(syn, self.initial.to(syn.device)))
        return real_measure(self, i, draw, alpha, syn)

    monkeypatch.setattr(unrolls, "unroll", unroll_then_stop)
    monkeypatch.setattr(Panel, "_measure", measure)
    with pytest.raises(KeyboardInterrupt):
        distill.run(config, run_dir)
    state = json.loads((run_dir.distill_dir / "checkpoint" / "state.json").read_text())["state"]
    assert state["iteration"] == 3 and len(state["panel_initial"]) == 3
    assert initial_measured.count(True) == 3  # iteration 0 only (the prompts are the initial ones); cached at 3
    initial_measured.clear()
    monkeypatch.setattr(unrolls, "unroll", real_unroll)
    distill.run(config, run_dir)
    assert initial_measured[:3] == [False] * 3  # iteration 6: the current prompts only (then the hard tokens')
    assert strip(read_jsonl(panel_path)) == clean

    # a damaged entry is named, not used
    state_json = run_dir.distill_dir / "checkpoint" / "state.json"
    body = json.loads(state_json.read_text())
    body["state"]["panel_initial"][0] = [99, 0.2, 1.0, 0.5]
    state_json.write_text(json.dumps(body))
    with pytest.raises(NacdError, match="panel_initial"):
        distill.run(load_config(None, [*args, "distill.iterations=7"]), run_dir)
