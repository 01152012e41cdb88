"""Hooks for the test suite; nothing here runs unless a test sets it up.

``fault(point, step)`` kills the process with SIGKILL when the environment variable
``SPARSEROUTE_FAULT`` is ``"<point>:<step>"``: the training loop, the checkpoint writer and the
lab call it at the moments where a real kill would hurt most (after a step, after a checkpoint's
files are written but before they are published, after a run is trained but before it is
recorded), so that the tests can check that nothing is lost there.
"""

from __future__ import annotations

import os
import signal

__all__ = ["fault", "FAULT_ENV"]

FAULT_ENV = "SPARSEROUTE_FAULT"


def fault(point: str, step: int) -> None:
    """SIGKILL this process when ``$SPARSEROUTE_FAULT`` is ``"<point>:<step>"``."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
