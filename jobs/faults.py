"""Test seams that real failures cannot give on demand: kill this worker at a named point, and
journal which task bodies actually ran. Both are off unless their environment variables are set;
Ray workers inherit the driver's environment, so a test sets them before the run.

ORCHESTRATOR_CRASH_AT="encode:3"       the process dies (like an OOM kill) at point `encode`, item 3
                                       (`settle`, when given, runs first: e.g. the commit in flight
                                       finishes, so what a resume finds does not depend on timing)
ORCHESTRATOR_CRASH_ONCE_DIR=DIR        ...only the first time (a marker file in DIR remembers)
ORCHESTRATOR_TASK_JOURNAL=FILE         every task body appends "<name> <item>" to FILE
"""

from __future__ import annotations

import os
from typing import Callable


def crash_point(point: str, item: int, settle: Callable[[], None] | None = None) -> None:
    if os.environ.get("ORCHESTRATOR_CRASH_AT") != f"{point}:{item}":
        return
    once_dir = os.environ.get("ORCHESTRATOR_CRASH_ONCE_DIR")
    if once_dir:
        marker = os.path.join(once_dir, f"crashed-{point}-{item}")
        if os.path.exists(marker):
            return
        os.makedirs(once_dir, exist_ok=True)
        open(marker, "w").close()
    if settle is not None:
        settle()
    os._exit(137)


def journal_task(name: str, item: int) -> None:
    path = os.environ.get("ORCHESTRATOR_TASK_JOURNAL")
    if path:
        with open(path, "a") as f:
            f.write(f"{name} {item}\n")
