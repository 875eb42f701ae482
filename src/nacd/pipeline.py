"""``nacd run``: the paper's protocol, stage after stage, in one run folder.

Each stage's ``run(config, run_dir)`` skips work whose outputs are complete, so
rerunning the pipeline resumes where it stopped.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Stage modules in pipeline order (module names under ``nacd``).
STAGES = ("select", "experts", "distill", "finetune", "evaluate")


def run(config: Any, run_dir: Any) -> dict[str, Any]:
    """Run every stage in order; the first one not built yet stops the pipeline with its message."""
    results: dict[str, Any] = {}
    for name in STAGES:
        stage = importlib.import_module(f"nacd.{name}")
        results[name] = stage.run(config, run_dir)
    return results
