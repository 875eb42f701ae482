"""LoRA adapters and training checkpoints (nacd.lora) on a tiny model."""

import re
import warnings

import pytest
import torch

from nacd.config import LoraConfig, ModelConfig
from nacd.errors import TrainingError
from nacd.evaluate.stage import apply_adapter
from nacd.lora import (
    add_lora,
    init_lora,
    load_checkpoint,
    load_lora_state,
    lora_parameters,
    lora_state,
    save_checkpoint,
)
from nacd.models import load_model
from nacd.train import TrainState


@pytest.fixture
def lora_model(tiny_llama_dir):
    model, _ = load_model(ModelConfig(spec=str(tiny_llama_dir)), torch.device("cpu"))
    model = add_lora(model, LoraConfig(r=4, alpha=8))
    init_lora(model, 0)
    return model


def _adam_step(model):
    """One AdamW step on random gradients: an optimizer with moments to save and restore."""
    params = list(lora_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(5)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    return opt


def test_add_lora_freezes_the_base_and_lists_the_adapter_in_a_stable_order(lora_model, tiny_llama_dir):
    names = list(lora_parameters(lora_model))
    assert names == sorted(names) and names and all("lora_" in n for n in names)
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable == set(names)
    base, _ = load_model(ModelConfig(spec=str(tiny_llama_dir)), torch.device("cpu"))
    with pytest.raises(TrainingError, match=r"lora.target_modules: query_proj not found in LlamaForCausalLM"):
        add_lora(base, LoraConfig(target_modules=["query_proj"]))


def test_peft_s_deprecation_warning_stays_out_of_the_run(tiny_llama_dir, tmp_path):
    base, _ = load_model(ModelConfig(spec=str(tiny_llama_dir)), torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = add_lora(base, LoraConfig(r=4, alpha=8))
        tuned.save_pretrained(tmp_path / "adapter")
        fresh, _ = load_model(ModelConfig(spec=str(tiny_llama_dir)), torch.device("cpu"))
        apply_adapter(fresh, tmp_path / "adapter")  # nacd eval's way in: peft's from_pretrained
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_init_lora_is_seeded_and_starts_b_at_zero(lora_model):
    init_lora(lora_model, 3)
    first = lora_state(lora_model)
    init_lora(lora_model, 4)
    other = lora_state(lora_model)
    init_lora(lora_model, 3)
    again = lora_state(lora_model)
    for name, t in first.items():
        assert torch.equal(t, again[name]), name
        if "lora_B" in name:
            assert torch.count_nonzero(t) == 0, name
        else:
            assert not torch.equal(t, other[name]), name


def test_load_lora_state_refuses_a_state_that_does_not_fit(lora_model):
    state = lora_state(lora_model)
    name = next(iter(state))
    with pytest.raises(TrainingError, match=re.escape(f"missing ['{name}']")):
        load_lora_state(lora_model, {k: v for k, v in state.items() if k != name})
    bad = dict(state, **{name: torch.zeros(state[name].shape[0] + 1, state[name].shape[1])})
    with pytest.raises(TrainingError, match=re.escape(f"LoRA parameter {name}: shape")):
        load_lora_state(lora_model, bad)
    changed = {k: v + 1 for k, v in state.items()}
    load_lora_state(lora_model, changed)
    for k, v in lora_state(lora_model).items():
        assert torch.equal(v, changed[k])


def test_checkpoint_roundtrip_restores_lora_optimizer_and_rng(lora_model, tmp_path):
    opt = _adam_step(lora_model)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    state = TrainState(step=2, epoch=1, loss_tokens=40, last_loss=1.5)
    save_checkpoint(tmp_path / "ck", lora_model, opt, state, {"desc": "x"})
    expected = lora_state(lora_model)
    opt_before = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    init_lora(lora_model, 99)
    for v in opt.state.values():
        for t in v.values():
            t.zero_()
    torch.manual_seed(7)
    restored, extra = load_checkpoint(tmp_path / "ck", lora_model, opt)
    assert restored == state and extra == {"desc": "x"}
    for k, v in lora_state(lora_model).items():
        assert torch.equal(v, expected[k])
    for pid, st in opt.state_dict()["state"].items():
        for name, t in st.items():
            assert torch.equal(t, opt_before[pid][name])
    assert torch.equal(torch.get_rng_state(), rng)
