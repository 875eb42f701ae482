"""Step 1 of NACD: record expert LoRA trajectories on D_full.

Not built yet (issue #3): `run` refuses with a clear message instead of pretending.
"""

from __future__ import annotations

from typing import Any

from nacd.errors import StageNotImplementedError

STAGE = "experts"


def run(config: Any, run_dir: Any) -> Any:
    """Entry point shared by the CLI and the tests."""
    raise StageNotImplementedError(f"stage '{STAGE}' is not implemented yet (issue #3); nothing was run")
