"""``nacd run``: the paper's protocol, stage after stage, in one run folder.

Each stage's ``run(config, run_dir)`` skips work whose outputs are complete, so
rerunning the pipeline resumes where it stopped.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Stage modules in pipeline order (module names under ``nacd``).
STAGES = ("select", "experts", "distill", "finetune", "evaluate")


def check(config: Any) -> None:
    """The protocol (variants baseline / FULL / SEL / SEL+NACD on two models, seeds, report) is issue #5."""
    from nacd.errors import StageNotImplementedError

    raise StageNotImplementedError(
        "nacd run (the paper's protocol: variants, seeds, report) is not implemented yet (issue #5); nothing was run. "
        "Run the stages one by one: nacd select, experts, distill, finetune, eval"
    )


def run(config: Any, run_dir: Any) -> dict[str, Any]:
    """Check that every stage can run with ``config`` (before any work), then run them in order."""
    check(config)
    stages = [importlib.import_module(f"nacd.{name}") for name in STAGES]
    for stage in stages:
        stage.check(config)
    return {name: stage.run(config, run_dir) for name, stage in zip(STAGES, stages, strict=True)}
