"""SEL with the expert's soft labels (issue #26's reviewer baseline): the teacher's top-k targets, the soft
cross-entropy against a hand computation, and a tuning toward them that moves the student to the teacher;
the distilled set toward them (``sel_nacd_soft``): the prompt vectors in the student's input, not the teacher's."""

import json
import math

import pytest
import torch

from nacd import experts, finetune
from nacd.artifacts import RunDir
from nacd.chat import collate
from nacd.config import load_config
from nacd.errors import NacdError
from nacd.soft_labels import SoftLabelForward, teacher_targets
from nacd.train import setup_training


def test_soft_cross_entropy_is_a_hand_computation(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    setup = setup_training(cfg)
    data = setup.data[:3]
    soft = teacher_targets(setup.model, data, setup.tokenizer.pad_token_id, topk=5, batch_size=2)
    for item in soft:
        n = sum(1 for label in item.example.labels[1:] if label != -100)
        assert item.tokens.shape == item.probs.shape == (n, 5)
        assert (
            torch.allclose(item.probs.sum(-1), torch.ones(n), atol=1e-5)
            and (item.probs[:, :-1] >= item.probs[:, 1:]).all()
        )
    forward = SoftLabelForward(setup.tokenizer.pad_token_id)
    batch = forward.collate(soft)
    loss, count = forward(setup.model, batch)
    hand, tokens = 0.0, 0
    with torch.no_grad():
        for item in soft:
            ids = torch.tensor([item.example.input_ids])
            logq = torch.log_softmax(setup.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            at = [i for i, label in enumerate(item.example.labels[1:]) if label != -100]
            hand -= float((item.probs * logq[at].gather(-1, item.tokens)).sum())
            tokens += len(at)
    assert count == tokens and float(loss) == pytest.approx(hand, rel=1e-4)
    # the teacher's own top-1 is the hard label's argmax: the model's greedy token at each position
    plain = collate(data, setup.tokenizer.pad_token_id)
    assert plain["input_ids"].shape == batch["input_ids"].shape


def test_sel_soft_tunes_toward_the_expert(tiny_overrides, tmp_path):
    """Tuned on the expert's soft labels the student moves toward the expert: its response loss under the
    expert's distribution falls, and the manifest names the teacher; receivers and the distilled set refuse."""
    args = [*tiny_overrides, "experts.num_experts=1", "experts.train.optimizer=sgd", "experts.train.lr=0.5",
            "experts.train.lr_schedule=constant", "experts.train.warmup_ratio=0"]  # fmt: skip
    cfg = load_config(None, args)
    run_dir = RunDir(cfg.run.out_dir)
    experts.run(cfg, run_dir)
    ids = tmp_path / "ids.txt"
    from nacd.data import load_corpus

    ids.write_text("\n".join(ex.id for ex in load_corpus(cfg.data)[0][:16]) + "\n")
    soft = load_config(None, [*args, "finetune.dataset=selected", f"finetune.ids_file={ids}", "finetune.soft_labels=true",
                              "finetune.name=soft", "finetune.soft_labels_topk=8", "finetune.train.epochs=3",
                              "finetune.train.lr=5e-3"])  # fmt: skip
    manifest = finetune.run(soft, run_dir)
    assert manifest["complete"] and manifest["soft_labels"] == {"run": 0, "epoch": 2, "seed": 0, "topk": 8}
    losses = [
        json.loads(line)["loss"] for line in (run_dir.finetune_dir("soft") / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < losses[0]
    with pytest.raises(NacdError, match="soft labels are in"):
        finetune.run(load_config(None, [*args, "finetune.soft_labels=true", f"finetune.model={tmp_path}"]), run_dir)
    with pytest.raises(NacdError, match="soft_labels_epoch=7"):
        finetune.run(load_config(None, [*args, "finetune.soft_labels=true", "finetune.soft_labels_epoch=7"]), run_dir)


def test_prompted_soft_cross_entropy_is_a_hand_computation(tiny_overrides):
    """With prompt vectors the student's loss positions are the teacher's plain ones shifted by k, in order:
    the soft cross-entropy equals the sum over each example's response positions of the prompted logits."""
    from nacd.finetune import PromptedExample, PromptedForward
    from nacd.soft_labels import SoftExample

    setup = setup_training(load_config(None, tiny_overrides))
    data, pad = setup.data[:3], setup.tokenizer.pad_token_id
    soft = teacher_targets(setup.model, data, pad, topk=4, batch_size=3)
    gen = torch.Generator().manual_seed(0)
    width = setup.model.get_input_embeddings().weight.shape[1]
    prompts = [torch.randn(2, width, generator=gen) for _ in data]
    prompted = PromptedForward(setup.model, offset=1)
    forward = SoftLabelForward(pad, prompted)
    items = [
        SoftExample(PromptedExample(ex, p), s.tokens, s.probs) for ex, p, s in zip(data, prompts, soft, strict=True)
    ]
    loss, count = forward(setup.model, forward.collate(items))
    forward.close()
    hand, tokens = 0.0, 0
    embed = setup.model.get_input_embeddings()
    with torch.no_grad():
        for ex, p, s in zip(data, prompts, soft, strict=True):
            e = embed(torch.tensor([ex.input_ids]))[0]
            inputs = torch.cat([e[:1], p * prompted.scale, e[1:]])[None]
            logq = torch.log_softmax(setup.model(inputs_embeds=inputs).logits[0, :-1].float(), dim=-1)
            at = [i + 2 for i, label in enumerate(ex.labels[1:]) if label != -100]  # after the 2 prompt positions
            hand -= float((s.probs * logq[at].gather(-1, s.tokens)).sum())
            tokens += len(at)
    assert count == tokens and float(loss) == pytest.approx(hand, rel=1e-4)


def test_the_distilled_set_tunes_toward_the_soft_labels_with_its_prompts(tiny_overrides):
    """``sel_nacd_soft``: the distilled set's prompt vectors and the expert's soft labels in one tuning, the
    teacher named in the manifest; the decoded text (prompt_mode=text) is refused, naming the option; nacd
    run tunes it on the distilling model only and distills for it."""
    from test_distill import REACHABLE

    from nacd import distill
    from nacd import select as selection
    from nacd.pipeline import needed_stages, plan

    args = [*tiny_overrides, *REACHABLE, "distill.iterations=2", "distill.panel_size=0"]
    cfg = load_config(None, args)
    run_dir = RunDir(cfg.run.out_dir)
    selection.run(cfg, run_dir)
    experts.run(cfg, run_dir)
    ds = distill.run(cfg, run_dir)
    both = [*args, "finetune.dataset=distilled", "finetune.soft_labels=true", "finetune.name=both"]
    m = finetune.run(load_config(None, both), run_dir)
    assert m["complete"] and m["prompt_mode"] == "embeddings" and m["ids"] == ds.ids
    assert m["soft_labels"]["epoch"] == 3 and m["distilled"]["alpha"] == ds.alpha
    losses = [
        json.loads(line)["loss"] for line in (run_dir.finetune_dir("both") / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses and all(loss > 0 for loss in losses)
    with pytest.raises(NacdError, match="soft labels go with the prompt vectors"):
        finetune.run(load_config(None, [*both, "finetune.prompt_mode=text", "finetune.name=text"]), run_dir)
    runs = load_config(None, [*tiny_overrides, "compare.variants=[sel, sel_nacd_soft]", "compare.receivers=['x']"])
    assert needed_stages(runs) == ["select", "experts", "distill"]
    assert {(c.role, c.variant) for c in plan(runs)} == {
        ("distilling", "sel"),
        ("distilling", "sel_nacd_soft"),
        ("receiver", "sel"),
    }


def test_distilling_toward_the_soft_labels(tiny_overrides):
    """``distill.soft_labels``: each student step's loss is the mean soft cross-entropy toward expert run 0's
    last snapshot (hand computation at LoRA tensors theta), and a distillation with it runs and says so."""
    from test_distill import REACHABLE

    from nacd import distill
    from nacd import select as selection
    from nacd.distill import _soft_targets
    from nacd.lora import add_lora, lora_parameters
    from nacd.models import load_model
    from nacd.student import Student

    args = [*tiny_overrides, *REACHABLE, "distill.iterations=2", "distill.panel_size=0", "distill.soft_labels=true"]
    cfg = load_config(None, args)
    run_dir = RunDir(cfg.run.out_dir)
    selection.run(cfg, run_dir)
    experts.run(cfg, run_dir)
    setup = setup_training(cfg)
    model, tok = load_model(cfg.model, torch.device("cpu"))
    model = add_lora(model, cfg.lora)
    before = {k: v.clone() for k, v in lora_parameters(model).items()}
    soft = _soft_targets(model, setup.data[:4], tok.pad_token_id, run_dir, 6)
    assert all(torch.equal(before[k], v) for k, v in lora_parameters(model).items())  # the student's own back
    student = Student(model, soft, tok.pad_token_id)
    assert student.soft
    theta = [p.detach() + 0.01 for p in lora_parameters(model).values()]
    width = student.vocab.shape[1]
    prompts = torch.randn(2, 2, width, generator=torch.Generator().manual_seed(1))
    text = student.text_batch([0, 1])
    loss = float(student.step_loss(theta, prompts, text))
    student.close()
    with torch.no_grad():
        for p, t in zip(lora_parameters(model).values(), theta, strict=True):
            p.copy_(t)
        hand, count = 0.0, 0
        embed = model.get_input_embeddings()
        for item, prompt in zip(soft[:2], prompts, strict=True):
            ex = item.example
            inputs = torch.cat([prompt * student.embed_scale, embed(torch.tensor(ex.input_ids))])[None]
            logq = torch.log_softmax(model(inputs_embeds=inputs).logits[0, :-1].float(), dim=-1)
            at = [i + 2 for i, label in enumerate(ex.labels[1:]) if label != -100]
            hand -= float((item.probs * logq[at].gather(-1, item.tokens)).sum())
            count += len(at)
    assert loss == pytest.approx(hand / count, rel=1e-4)
    ds = distill.run(cfg, run_dir)
    assert ds.manifest["distill"]["soft_labels"] is True and len(ds.history()) == 2
    assert all(math.isfinite(h["l_distill"]) for h in ds.history())
