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
