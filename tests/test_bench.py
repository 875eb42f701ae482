"""The benchmark scripts' own logic that a measurement rests on (their runs are in docs/, not here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

import nacd.panel as panel

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_fit_panel_trains_on_the_panels_own_draws_in_order_and_restores_the_sampler():
    ablate = _load("ablate_distill")
    real_draws, real_sample = panel.panel_draws, panel.sample_draw
    seed = 7
    with ablate.panel_as_training(seed) as captured:
        # as nacd.distill calls them: the panel (the run's seed), then the alpha fit (another seed)
        held = panel.panel_draws([1], 2, 10, 3, 2, 4, seed)
        panel.panel_draws([0], 2, 10, 3, 2, 5, seed + panel.FIT_SEED_OFFSET)
        gen = torch.Generator().manual_seed(seed)
        got = [panel.sample_draw(gen, [0], 2, 10, 3, 2) for _ in range(6)]
    assert all(c is h for c, h in zip(captured, held, strict=True))  # the panel's draws, not the fit's
    assert all(g is held[i % 4] for i, g in enumerate(got))  # cycled in order, from the held-out run
    # the training generator advanced as in a normal run (same state as 6 real draws)
    ref = torch.Generator().manual_seed(seed)
    for _ in range(6):
        real_sample(ref, [0], 2, 10, 3, 2)
    assert torch.equal(gen.get_state(), ref.get_state())
    assert (panel.panel_draws, panel.sample_draw) == (real_draws, real_sample)


def test_a_snapshot_becomes_an_adapter_that_carries_its_parameters(tiny_overrides, tmp_path):
    from nacd.artifacts import atomic_save_safetensors
    from nacd.config import load_config
    from nacd.evaluate import apply_adapter
    from nacd.lora import add_lora, lora_state
    from nacd.models import load_model

    snapshots = _load("eval_snapshots")
    config = load_config(None, tiny_overrides)
    model, _ = load_model(config.model, "cpu")
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in lora_state(add_lora(model, config.lora)).items()}
    atomic_save_safetensors(state, tmp_path / "epoch_001.safetensors")
    adapter = snapshots.make_adapter(config, tmp_path / "epoch_001.safetensors", tmp_path / "adapter")
    loaded = apply_adapter(load_model(config.model, "cpu")[0], adapter)
    got = {k: p for k, p in loaded.named_parameters() if "lora_" in k}
    assert sorted(got) == sorted(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_evaluations_are_compared_question_by_question_over_seeds(tmp_path):
    import json

    compare = _load("compare_evals")

    def write(folder: Path, accs: list[float]) -> None:
        folder.mkdir(parents=True)
        rows = [{"benchmark": "arc_easy", "id": f"q{i}", "acc": a, "acc_norm": a} for i, a in enumerate(accs)]
        (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(tmp_path / "one", [1, 1, 0, 0])
    write(tmp_path / "sel" / "seed0", [1, 0, 0, 0])
    write(tmp_path / "sel" / "seed1", [0, 0, 0, 0])
    (line,) = compare.compare(tmp_path / "one", tmp_path / "sel")
    assert line["seeds"] == [1, 2] and line["questions"] == 4
    assert (line["a"], line["b"], line["a_minus_b"]) == (50.0, 12.5, 37.5)
    assert line["ci"][0] <= 37.5 <= line["ci"][1]
    (same,) = compare.compare(tmp_path / "sel", tmp_path / "sel")
    assert same["a_minus_b"] == 0.0 and same["ci"] == [0.0, 0.0]
    # --full: the share of FULL's lead over B that A recovers, against the hand value (A - B) / (F - B)
    write(tmp_path / "full", [1, 1, 1, 1])
    write(tmp_path / "nacd" / "seed0", [1, 1, 0, 0])
    write(tmp_path / "nacd" / "seed1", [1, 0, 0, 0])
    (gap,) = compare.compare(tmp_path / "nacd", tmp_path / "sel", full=tmp_path / "full")
    assert gap["gap_closed"]["full_minus_b"] == 87.5
    assert gap["gap_closed"]["ratio"] == round((37.5 - 12.5) / (100 - 12.5), 3)
    (none,) = compare.compare(tmp_path / "sel", tmp_path / "sel", full=tmp_path / "sel")
    assert none["gap_closed"]["status"] == "no_gap" and "ratio" not in none["gap_closed"]
