"""Step 2 of NACD: learn prompt vectors for D_sel by trajectory matching.

Not built yet (issue #4): `run` refuses with a clear message instead of pretending.
"""

from __future__ import annotations

from typing import Any

from nacd.errors import StageNotImplementedError

STAGE = "distill"


def run(config: Any, run_dir: Any) -> Any:
    """Entry point shared by the CLI and the tests."""
    raise StageNotImplementedError(f"stage '{STAGE}' is not implemented yet (issue #4); nothing was run")
