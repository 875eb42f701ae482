"""Step 4 of NACD: multiple-choice evaluation (ARC-Easy, MMLU).

Not built yet (issue #5): `run` refuses with a clear message instead of pretending.
"""

from __future__ import annotations

from typing import Any

from nacd.errors import StageNotImplementedError

STAGE = "evaluate"


def check(config: Any) -> None:
    """Raise if this stage cannot run with ``config`` (here: not built yet)."""
    raise StageNotImplementedError(f"stage '{STAGE}' is not implemented yet (issue #5); nothing was run")


def run(config: Any, run_dir: Any) -> Any:
    """Entry point shared by the CLI and the tests."""
    check(config)
