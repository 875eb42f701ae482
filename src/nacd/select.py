"""Step 0 of NACD: select a small subset D_sel of D_full with random, BM25, DSIR or LESS.

Not built yet (issue #6): `run` refuses with a clear message instead of pretending.
"""

from __future__ import annotations

from typing import Any

from nacd.errors import StageNotImplementedError

STAGE = "select"


def run(config: Any, run_dir: Any) -> Any:
    """Entry point shared by the CLI and the tests."""
    raise StageNotImplementedError(f"stage '{STAGE}' is not implemented yet (issue #6); nothing was run")
