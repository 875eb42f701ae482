"""nacd finetune: FULL and selected-data baselines through the shared loop; adapters; resume."""

import json

import pytest
import torch

from nacd import finetune
from nacd.artifacts import RunDir
from nacd.config import ModelConfig, load_config
from nacd.errors import NacdError
from nacd.models import load_model


def _adapter_state(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


def test_full_baseline_writes_a_loadable_adapter(tiny_overrides, tiny_llama_dir):
    cfg = load_config(None, [*tiny_overrides, "finetune.dataset=full"])
    run_dir = RunDir(cfg.run.out_dir)
    manifest = finetune.run(cfg, run_dir)
    folder = run_dir.finetune_dir("full")
    assert manifest["complete"] and manifest["n_examples"] == 40 and manifest["total_steps"] == 5
    assert json.loads((folder / "manifest.json").read_text())["complete"]
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 5
    assert not (folder / "checkpoint").exists()

    # the adapter loads onto the base model with peft and changes its outputs
    from peft import PeftModel

    from nacd.lora import peft_quietly

    base, tok = load_model(ModelConfig(spec=str(tiny_llama_dir)), torch.device("cpu"))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
        with peft_quietly():
            tuned = PeftModel.from_pretrained(base, folder / "adapter")
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after)
    assert any("lora_B" in k and torch.count_nonzero(v) for k, v in _adapter_state(folder).items())

    # a second call skips the complete run
    again = finetune.run(cfg, run_dir)
    assert again["created"] == json.loads((folder / "manifest.json").read_text())["created"]


def test_selected_baseline_uses_the_listed_ids(tiny_overrides, tmp_path):
    from nacd.data import load_corpus

    cfg = load_config(None, tiny_overrides)
    examples, _ = load_corpus(cfg.data)
    chosen = [ex.id for ex in examples[::4]]  # 10 ids
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(chosen) + "\n")
    cfg = load_config(None, [*tiny_overrides, "finetune.dataset=selected", f"finetune.ids_file={ids_file}"])
    manifest = finetune.run(cfg, RunDir(cfg.run.out_dir))
    assert manifest["ids"] == chosen and manifest["n_examples"] == 10 and manifest["total_steps"] == 2

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ids": [*chosen[:2], "dolly/nope"]}))
    cfg = load_config(None, [*tiny_overrides, "finetune.dataset=selected", f"finetune.ids_file={bad}"])
    with pytest.raises(NacdError, match=r"bad.json: 1 id\(s\) not in the corpus, e.g. \['dolly/nope'\]"):
        finetune.run(cfg, RunDir(cfg.run.out_dir))


def test_selected_or_distilled_without_their_inputs_refuse(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "finetune.dataset=selected"])
    with pytest.raises(NacdError, match=r"no selection at .*select/selection.json; run `nacd select` first"):
        finetune.run(cfg, RunDir(cfg.run.out_dir))
    cfg = load_config(None, [*tiny_overrides, "finetune.dataset=distilled"])
    with pytest.raises(NacdError, match=r"distill: no complete distilled data set \(run `nacd distill`\)"):
        finetune.run(cfg, RunDir(cfg.run.out_dir))


def test_prompt_text_goes_before_the_instruction_inside_the_user_turn(tiny_llama_tokenizer, tiny_gemma_tokenizer):
    from nacd.chat import render_chat
    from nacd.data import Example

    ex = Example(
        "s/1",
        "s",
        (
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ),
        "f:1",
    )
    moved = finetune.with_prompt_text(ex, " Paris river")
    assert moved.messages[1]["content"] == " Paris river\nName a colour." and moved.messages[0] == ex.messages[0]
    text, _, _ = render_chat(list(moved.messages), tiny_llama_tokenizer)  # ChatML template
    assert "<|im_start|>user\n Paris river\nName a colour.<|im_end|>" in text
    text, _, _ = render_chat(list(moved.messages), tiny_gemma_tokenizer)  # the fallback format
    assert "User:  Paris river\nName a colour." in text


def test_interrupted_finetune_resumes_to_the_same_adapter(tiny_overrides, tmp_path, monkeypatch):
    from nacd import train

    common = [*tiny_overrides[:2], *tiny_overrides[3:], "finetune.train.epochs=2", "finetune.train.checkpoint_every=2"]
    clean_cfg = load_config(None, [*common, f"run.out_dir={tmp_path / 'clean'}"])
    finetune.run(clean_cfg, RunDir(clean_cfg.run.out_dir))

    cfg = load_config(None, [*common, f"run.out_dir={tmp_path / 'cut'}"])
    real_step = train.TrainLoop._step
    calls = {"n": 0}

    def step_then_interrupt(self, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # in the second epoch, after the checkpoint at step 6
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(train.TrainLoop, "_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, RunDir(cfg.run.out_dir))
    folder = RunDir(cfg.run.out_dir).finetune_dir("full")
    state = json.loads((folder / "checkpoint" / "state.json").read_text())["state"]
    assert state["step"] == 6 and not (folder / "adapter").exists()
    monkeypatch.setattr(train.TrainLoop, "_step", real_step)
    manifest = finetune.run(cfg, RunDir(cfg.run.out_dir))
    assert manifest["complete"]
    a, b = _adapter_state(RunDir(clean_cfg.run.out_dir).finetune_dir("full")), _adapter_state(folder)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        manifest["final_loss"]
        == json.loads((RunDir(clean_cfg.run.out_dir).finetune_dir("full") / "manifest.json").read_text())["final_loss"]
    )
