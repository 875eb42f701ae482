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
    """Check that every stage can run with ``config`` (before any work), then run them in order."""
    stages = [importlib.import_module(f"nacd.{name}") for name in STAGES]
    for stage in stages:
        stage.check(config)
    return {name: stage.run(config, run_dir) for name, stage in zip(STAGES, stages, strict=True)}
