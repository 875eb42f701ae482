"""SEL with the expert's soft labels (issue #26's reviewer baseline): the teacher's top-k targets, the soft
cross-entropy against a hand computation, and a tuning toward them that moves the student to the teacher."""

import json

import pytest
import torch

from nacd import experts, finetune
from nacd.artifacts import RunDir
from nacd.chat import collate
from nacd.config import load_config
from nacd.errors import ConfigError, NacdError
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
    with pytest.raises(ConfigError, match="finetune.soft_labels"):
        load_config(None, [*args, "finetune.soft_labels=true", "finetune.dataset=distilled"])
    with pytest.raises(NacdError, match="soft_labels_epoch=7"):
        finetune.run(load_config(None, [*args, "finetune.soft_labels=true", "finetune.soft_labels_epoch=7"]), run_dir)
