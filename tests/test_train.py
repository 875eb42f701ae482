"""The shared LoRA training loop: pure pieces, LoRA behaviour, accumulation, checkpoints, failures."""

import math

import pytest
import torch

from nacd.chat import TokenizedExample, collate
from nacd.config import LoraConfig, ModelConfig, TrainConfig
from nacd.lora import add_lora, init_lora, lora_parameters, lora_state
from nacd.models import load_model
from nacd.train import Callback, TrainingError, TrainLoop, epoch_order, global_batches, lr_factor, token_loss_sum

# ---------------------------------------------------------------- pure pieces


def test_lr_factor_by_hand():
    # 10 steps, 2 warmup: warmup 1/2, 2/2, then linear decay over the 8 remaining steps
    assert [lr_factor(s, 10, 2, "linear") for s in range(4)] == [0.5, 1.0, 1.0, 0.875]
    assert lr_factor(9, 10, 2, "linear") == pytest.approx(1 / 8)
    assert lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(7, 10, 0, "constant") == 1.0


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=3, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(50, seed=3, epoch=0)
    assert a != epoch_order(50, seed=3, epoch=1)
    assert a != epoch_order(50, seed=4, epoch=0)
    assert global_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_token_loss_sum_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, 2, -100, 4]])
    loss, n = token_loss_sum(logits, labels)
    logp = torch.log_softmax(logits, -1)
    expected = -(logp[0, 0, 2] + logp[0, 2, 4])  # position t predicts label t+1
    assert n == 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------- on a tiny model


def _examples(tokenizer, n=8, length=24):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, tokenizer.vocab_size, (length - (i % 3),), generator=g).tolist()
        labels = [-100] * 8 + ids[8:]
        out.append(TokenizedExample(f"x/{i}", "x", ids, labels, False))
    return out


@pytest.fixture
def lora_model(tiny_llama_dir):
    model, tok = load_model(ModelConfig(spec=str(tiny_llama_dir)), torch.device("cpu"))
    model = add_lora(model, LoraConfig(r=4, alpha=8))
    init_lora(model, 0)
    return model, tok


def _loop(model, tok, data, **kw):
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 4, "optimizer": "adamw", "lr": 1e-2, "warmup_ratio": 0.0, **kw})
    return TrainLoop(model=model, dataset=data, cfg=cfg, collate=lambda b: collate(b, tok.pad_token_id), progress=False)


def test_lora_moves_base_stays_and_loss_falls(tiny_llama_dir):
    model, tok = load_model(ModelConfig(spec=str(tiny_llama_dir)), torch.device("cpu"))
    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = add_lora(model, LoraConfig(r=8, alpha=16, target_modules=every_linear))
    init_lora(model, 0)
    data = _examples(tok, n=4)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = lora_state(model)
    losses = []

    class Record(Callback):
        def on_step_end(self, loop):
            losses.append(loop.state.last_loss)

    loop = _loop(model, tok, data, epochs=40, batch_size=4, lr=1e-2, lr_schedule="constant", max_grad_norm=None)
    loop.callbacks = [Record()]
    loop.run()
    assert len(losses) == 40
    # the same batch again and again: the loss must fall (from ln(vocab) = 6.24 on random tokens)
    assert losses[-1] < 0.85 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[5:10]) < sum(losses[:5])
    after = lora_state(model)
    assert all(not torch.equal(after[k], lora_before[k]) for k in after)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[name]), name
    assert all("lora_" in name for name in lora_parameters(model))


def test_gradient_accumulation_matches_one_big_batch(tiny_llama_dir):
    states = []
    for micro in (4, 1):
        model, tok = load_model(ModelConfig(spec=str(tiny_llama_dir)), torch.device("cpu"))
        model = add_lora(model, LoraConfig(r=4, alpha=8))
        init_lora(model, 0)
        loop = _loop(model, tok, _examples(tok, n=8), micro_batch_size=micro, optimizer="sgd", lr=0.5)
        loop.run()
        states.append(lora_state(model))
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(states[0][k], torch.zeros_like(states[0][k])) for k in states[0])


def test_non_finite_loss_stops_with_the_step_number(lora_model):
    model, tok = lora_model
    loop = _loop(model, tok, _examples(tok), epochs=3)
    calls = {"n": 0}

    def forward(m, batch):
        calls["n"] += 1
        loss, n = token_loss_sum(m(input_ids=batch["input_ids"]).logits, batch["labels"])
        return (loss * float("nan") if calls["n"] == 3 else loss), n

    loop.forward = forward
    before = None

    class Keep(Callback):
        def on_step_end(self, loop):
            nonlocal before
            before = lora_state(loop.model)

    loop.callbacks = [Keep()]
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at optimizer step 3 \(epoch 2\)"):
        loop.run()
    for k, v in lora_state(model).items():  # the bad step changed nothing
        assert torch.equal(v, before[k])


def test_bad_setups_fail_before_training(lora_model):
    model, tok = lora_model
    with pytest.raises(TrainingError, match=r"3 examples, fewer than one batch \(batch_size=4\)"):
        _loop(model, tok, _examples(tok, n=3))
    no_loss = [TokenizedExample(f"x/{i}", "x", [5, 6, 7], [-100, -100, -100], False) for i in range(4)]
    with pytest.raises(TrainingError, match="no example of the training set carries loss tokens"):
        _loop(model, tok, no_loss)


# ---------------------------------------------------------------- logits only at loss positions


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma_dir"])
def test_sparse_logits_forward_gives_the_exact_loss_and_gradients(fixture, request):
    from nacd.train import SparseLogitsForward, causal_lm, default_forward

    model, tok = load_model(ModelConfig(spec=str(request.getfixturevalue(fixture))), torch.device("cpu"))
    model = add_lora(model, LoraConfig(r=4, alpha=8))
    init_lora(model, 0)
    with torch.no_grad():  # non-zero B so that LoRA matters
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = collate(_examples(tok, n=3), tok.pad_token_id)
    params = list(lora_parameters(model).values())
    ref_loss, ref_n = default_forward(model, batch)
    ref_grads = torch.autograd.grad(ref_loss, params)

    sparse = SparseLogitsForward()
    assert sparse.install(model, batch)
    loss, n = sparse(model, batch)
    grads = torch.autograd.grad(loss, params)
    assert n == ref_n == (24 - 8) + (23 - 8) + (22 - 8)  # loss from position 8 on; lengths 24, 23, 22
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    sparse.remove()
    vocab = causal_lm(model).get_output_embeddings().weight.shape[0]
    assert model(input_ids=batch["input_ids"]).logits.shape[-1] == vocab  # the real head is back


def test_sparse_logits_forward_falls_back_when_the_check_fails(lora_model):
    from nacd.train import SparseLogitsForward, causal_lm

    model, tok = lora_model
    inner = causal_lm(model)
    head = inner.get_output_embeddings()
    inner.config.final_logit_softcapping = 1e-3  # Llama's forward ignores this; the sparse path would apply it
    batch = collate(_examples(tok, n=2), tok.pad_token_id)
    assert not SparseLogitsForward().install(model, batch)
    assert inner.get_output_embeddings() is head and inner.config.final_logit_softcapping == 1e-3
