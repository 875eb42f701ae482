"""The prompt-gain panel's pure parts: draws, statistics, cosines, residual shares."""

import pytest
import torch

from nacd.panel import (
    all_residual_shares,
    flat_cosine,
    gain_line,
    lora_layer,
    lora_module,
    panel_draws,
    prompt_gain,
    residual_shares,
    sample_draw,
    split_runs,
)


def test_one_run_is_held_out_when_there_are_two_or_more():
    assert split_runs([0, 1, 2], holdout=True) == ([0, 1], [2])
    assert split_runs([0], holdout=True) == ([0], [0])
    assert split_runs([0, 1], holdout=False) == ([0, 1], [0, 1])


def test_panel_draws_are_fixed_stratified_and_apart_from_training():
    a = panel_draws([1], max_start_epoch=3, n=10, batch=4, steps=2, size=7, seed=0)
    b = panel_draws([1], max_start_epoch=3, n=10, batch=4, steps=2, size=7, seed=0)
    assert [d.start_epoch for d in a] == [0, 1, 2, 0, 1, 2, 0]
    assert all(d.run == 1 and len(d.batches) == 2 and len(set(d.batches[0].tolist())) == 4 for d in a)
    assert all(
        torch.equal(x, y) for da, db in zip(a, b, strict=True) for x, y in zip(da.batches, db.batches, strict=True)
    )
    train = sample_draw(torch.Generator().manual_seed(0), [1], 3, 10, 4, 2)  # training's stream, same seed
    assert not torch.equal(train.batches[0], a[0].batches[0])


def test_prompt_gain_statistics():
    init = [1.0, 0.9, 1.1, 1.0, 0.95, 1.05]
    better = [x - 0.1 for x in init]
    g = prompt_gain(init, better)
    assert g["mean"] == pytest.approx(0.1) and g["relative"] == pytest.approx(0.1)
    assert g["ci_low"] == pytest.approx(0.1) and g["ci_high"] == pytest.approx(0.1) and g["draws"] == 6
    same = prompt_gain(init, init)
    assert same["mean"] == 0 and same["ci_low"] <= 0 <= same["ci_high"]
    noisy = prompt_gain(init, [x + d for x, d in zip(init, [0.05, -0.05, 0.04, -0.04, 0.03, -0.03], strict=True)])
    assert noisy["ci_low"] < 0 < noisy["ci_high"]
    row = {"iteration": 5, "prompt_gain": g, "l_initial_mean": 1.0, "cosine": {"initial": 0.3, "current": 0.4}}
    assert "above 0" in gain_line(row) and "+10.00%" in gain_line(row)
    assert "contains 0" in gain_line({**row, "prompt_gain": noisy})


def test_cosine_and_residual_shares_by_hand():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0]])]
    b = [torch.tensor([1.0, 1.0]), torch.tensor([[0.0]])]
    assert flat_cosine(a, b) == pytest.approx(2**-0.5)
    assert flat_cosine(a, [torch.zeros(2), torch.zeros(1, 1)]) == 0.0
    names = ["layer.0.lora_A.default.weight", "layer.0.lora_B.default.weight"]
    theta = [torch.tensor([3.0]), torch.tensor([1.0])]
    shares = residual_shares(theta, [torch.tensor([0.0]), torch.tensor([0.0])], names)
    assert shares == {"lora_A": pytest.approx(0.9), "lora_B": pytest.approx(0.1)}


def test_residual_shares_by_layer_and_module_by_hand():
    names = [
        "base_model.model.model.layers.10.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.model.layers.10.self_attn.v_proj.lora_B.default.weight",
        "base_model.model.model.layers.2.self_attn.q_proj.lora_B.default.weight",
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight",  # GPT-2 names its blocks h
    ]
    assert [lora_layer(n) for n in names] == ["10", "10", "2", "0"]
    assert [lora_module(n) for n in names] == ["q_proj", "v_proj", "q_proj", "c_attn"]
    assert lora_layer("lm_head.weight") == "other" and lora_module("lm_head.weight") == "other"
    theta = [torch.tensor([1.0]), torch.tensor([2.0, 0.0]), torch.tensor([[2.0]]), torch.tensor([1.0])]
    zeros = [torch.zeros_like(t) for t in theta]  # squared residuals 1, 4, 4, 1: total 10
    shares = all_residual_shares(theta, zeros, names)
    assert shares["layer"] == {"0": pytest.approx(0.1), "2": pytest.approx(0.4), "10": pytest.approx(0.5)}
    assert list(shares["layer"]) == ["0", "2", "10"]  # numeric order, not "10" before "2"
    assert shares["module"] == {
        "c_attn": pytest.approx(0.1),
        "q_proj": pytest.approx(0.5),
        "v_proj": pytest.approx(0.4),
    }
    assert shares["factor"] == {"lora_A": pytest.approx(0.2), "lora_B": pytest.approx(0.8)}


def test_fit_alpha_walks_the_grid_to_the_minimum():
    import math

    from nacd.panel import fit_alpha

    calls = []

    def bowl(center):
        def loss(a):
            calls.append(a)
            return (math.log2(a) - math.log2(center)) ** 2

        return loss

    best, curve = fit_alpha(bowl(8.0), 1.0)  # up: 1, 2, 4, 8, 16 (worse: stop); no walk down
    assert best == pytest.approx(8.0) and [a for a, _ in curve] == pytest.approx([1, 2, 4, 8, 16])
    calls.clear()
    best, curve = fit_alpha(bowl(0.25), 1.0)  # up once (worse), then down: 0.5, 0.25, 0.125 (worse)
    assert best == pytest.approx(0.25) and calls == pytest.approx([1, 2, 0.5, 0.25, 0.125])
    best, curve = fit_alpha(bowl(1.0), 1.0)  # alpha_0 is best: one step each way
    assert best == 1.0 and [a for a, _ in curve] == pytest.approx([0.5, 1, 2])
    best, _ = fit_alpha(bowl(1e6), 1.0, max_steps=3)  # the walk is bounded
    assert best == pytest.approx(8.0)
    best, curve = fit_alpha(bowl(9.0), 0.3, factor=3.0)  # any factor, any start (no float round trips)
    assert best == pytest.approx(8.1) and len(curve) == 5
