"""Whether a helper thread would find a core of its own.

The SQLite reader scans a large level, or reads a large block, as two halves on two threads (two
connections) only when the machine has a core to spare: on a busy one the second thread waits for
the same core and its hand-offs cost more than they save (MBTiles -> PMTiles measured 5-10 % slower
on 2 cores at load 2; 8-10 % faster at load 0.8).
"""
from __future__ import annotations

import os
import time

_CHECK_SECONDS = 1.0
_last = (-1e9, True)


def spare_core() -> bool:
    """True when the 1-minute load average leaves at least half a core idle (checked at most once a second)."""
    global _last
    now = time.monotonic()
    if now - _last[0] < _CHECK_SECONDS:
        return _last[1]
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):          # no load average (Windows): assume the cores are ours
        load = 0.0
    spare = cores > 1 and load < cores - 0.5
    _last = (now, spare)
    return spare
