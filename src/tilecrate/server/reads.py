"""Cache reads off the event loop, bounded, with a timeout and a quarantine for files that hang.

A read that blocks (a FIFO named like a bundle, a hung network mount) keeps its thread for as long
as the kernel keeps it. So: at most `threads` reads run at once; a read not done within `timeout`
is answered 503 at once, its thread is counted as stuck (the pool has room for `max_stuck` of them
beyond `threads`), and the file it was reading (its key: service, level, bundle) is quarantined for
`quarantine` seconds, so later requests for it are answered 503 without sinking another thread.
Requests for every other file keep their threads.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Hashable

from tilecrate.server.errors import EsriError

_TIMEOUT = getattr(asyncio, "timeout", None)  # Python 3.11: no extra task per read, as wait_for makes


class ReadGate:
    """Runs blocking cache reads for the event loop (see the module doc)."""

    def __init__(self, threads: int, timeout: float, *, max_stuck: int | None = None, quarantine: float = 60.0):
        self.threads = max(1, int(threads))
        self.timeout = float(timeout)
        self.max_stuck = max_stuck if max_stuck is not None else 4 * self.threads
        self.quarantine = float(quarantine)
        self._pool = ThreadPoolExecutor(max_workers=self.threads + self.max_stuck, thread_name_prefix="tilecrate-read")
        self._sem: asyncio.Semaphore | None = None
        self._stuck = 0
        self._lock = threading.Lock()
        self._bad: dict[Hashable, float] = {}  # key -> quarantined until (monotonic)

    @property
    def stuck(self) -> int:
        """Reads that timed out and have not returned yet."""
        return self._stuck

    async def run(self, key: Hashable, fn: Callable, *args):
        """fn(*args) on a read thread; EsriError 503 when it takes too long or its file is quarantined."""
        self._admit(key)
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.threads)
        start = time.monotonic()
        async with self._sem:
            self._admit(key)  # again: the file may have hung while this request waited for a thread
            left = self.timeout - (time.monotonic() - start)  # waiting for a thread counts too
            if left <= 0:
                raise _busy(f"the cache could not be read within {self.timeout:g} seconds; try again later")
            cf = self._pool.submit(fn, *args)
            try:
                if _TIMEOUT is not None:
                    async with _TIMEOUT(left):
                        return await asyncio.wrap_future(cf)
                return await asyncio.wait_for(asyncio.wrap_future(cf), left)
            except asyncio.TimeoutError:
                if not cf.cancel():  # running: its thread stays with the read until it returns
                    with self._lock:
                        self._stuck += 1
                    cf.add_done_callback(self._unstick)
                    self._bad[key] = time.monotonic() + self.quarantine
                raise _busy(f"the cache could not be read within {self.timeout:g} seconds; try again later") from None

    def _admit(self, key: Hashable) -> None:
        until = self._bad.get(key)
        if until is not None:
            if time.monotonic() < until:
                raise _busy(f"a read of this file did not finish within {self.timeout:g} seconds; try again later")
            self._bad.pop(key, None)
        if self._stuck >= self.max_stuck:
            raise _busy("too many cache reads are blocked; try again later")

    def _unstick(self, _future) -> None:
        with self._lock:
            self._stuck -= 1

    def close(self) -> None:
        """Stop taking reads; threads blocked in a read are left to the process exit."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _busy(text: str) -> EsriError:
    return EsriError(503, text, headers={"Retry-After": "10"})
