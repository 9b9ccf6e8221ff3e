"""Fault injection for tests: named points where a test makes a process die the way a killed
one dies (``os._exit``: no cleanup, no ``finally``), to check that a crash there loses nothing.

Off unless a test arms it. Stage code marks a point with one call, ``fire(faults, point,
step=..., rank=...)``, which returns at once when ``faults`` is empty (always, outside tests).
A test arms a fault in one of two ways, matching where the point runs:

- in the job dict the train loop is handed (``job["faults"]``): Ray Train workers, torchrun
  ranks and test subprocesses all get the job, whatever environment they started in;
- in the driver's environment (``STEELWORKS_FAULTS``, the ``inject_faults`` test fixture):
  the data stage reads it in the driver with ``from_env`` and hands it to its Ray Data tasks,
  whose worker processes may have started before the test set anything.

Each fault fires once: it creates its marker file exclusively (``O_EXCL``) before dying, so of
several tasks that reach the point together exactly one dies, and the retried task or the
restarted run goes through. The tests read the marker (it holds the pid) to check the process
is gone. ``tests/test_train.py``, ``test_storage.py`` and ``test_faults_*.py`` use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENV = "STEELWORKS_FAULTS"
EXIT_CODE = 17  # a fault's exit status, so a test can tell it from a real crash

# Every point stage code marks, and where it is. ``where`` keys a fault may match on.
POINTS = {
    "train.step": "train loop, after the optimizer step of `step` on `rank`",
    "train.save_inflight": "train loop, an async checkpoint save of `step` still writing",
    "train.save": "train loop, checkpoint `step` written but not yet renamed into place",
    "train.committed": "train loop, checkpoint `step` renamed but not yet reported to Ray",
    "data.clean": "data stage, a Ray Data worker about to clean a batch",
}


def fault(point: str, marker: str | Path, **where: int) -> dict[str, Any]:
    """One armed fault: die at ``point`` when every ``where`` matches (``step=6, rank=1``);
    ``rank`` defaults to 0 for the train points."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; the points are {sorted(POINTS)}")
    return {"point": point, "marker": str(marker), **where}


def from_env() -> list[dict[str, Any]]:
    """The faults armed in this process's environment (``[]`` when ``STEELWORKS_FAULTS`` is
    unset): the driver reads them and hands them to the workers it starts."""
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else []


def fire(faults: Sequence[dict[str, Any]] | None, point: str, **where: int) -> None:
    """Die here if an armed fault names ``point`` and matches ``where``, once per marker."""
    for f in faults or ():
        if f["point"] != point:
            continue
        wanted = {k: v for k, v in f.items() if k not in ("point", "marker")}
        if point.startswith("train."):
            wanted.setdefault("rank", 0)
        if any(where.get(k) != v for k, v in wanted.items()):
            continue
        try:
            fd = os.open(f["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # fired already: the retry goes through
            continue
        os.write(fd, f"{os.getpid()} {point} {where}\n".encode())
        os.close(fd)
        os._exit(EXIT_CODE)
