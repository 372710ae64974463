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
import queue
import threading
import time
from typing import Callable, Hashable

from tilecrate.server.errors import EsriError

_QUEUED, _RUNNING, _STUCK, _DONE, _DROPPED = range(5)


class _Read:
    """One read: what to run, where its answer goes, and where it is (the gate's lock guards `state`)."""

    __slots__ = ("fn", "args", "key", "fut", "loop", "state")

    def __init__(self, fn: Callable, args: tuple, key: Hashable, fut: asyncio.Future, loop):
        self.fn, self.args, self.key, self.fut, self.loop = fn, args, key, fut, loop
        self.state = _QUEUED


def _deliver(fut: asyncio.Future, result, exc: BaseException | None) -> None:
    if not fut.done():
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)


class ReadGate:
    """Runs blocking cache reads for the event loop (see the module doc).

    `threads` worker threads take reads from one queue, one after the other without a trip through
    the event loop between them (a slot handed back and a new submission per read cost more CPU than
    the read); a read that outlives `timeout` leaves its thread to it, counted as stuck, and a new
    worker takes that thread's place, so `threads` reads can always run."""

    def __init__(self, threads: int, timeout: float, *, max_stuck: int | None = None, quarantine: float = 60.0):
        self.threads = max(1, int(threads))
        self.timeout = float(timeout)
        self.max_stuck = max_stuck if max_stuck is not None else 4 * self.threads
        self.quarantine = float(quarantine)
        self._queue: queue.SimpleQueue[_Read | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers = 0  # live worker threads, stuck ones included
        self._stuck = 0
        self._closed = False
        self._bad: dict[Hashable, float] = {}  # key -> quarantined until (monotonic)

    @property
    def stuck(self) -> int:
        """Reads that timed out and have not returned yet."""
        return self._stuck

    async def run(self, key: Hashable, fn: Callable, *args):
        """fn(*args) on a read thread; EsriError 503 when it takes too long or its file is quarantined."""
        self._admit(key)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        read = _Read(fn, args, key, fut, loop)
        if self._workers - self._stuck < self.threads:
            with self._lock:
                while self._workers - self._stuck < self.threads and not self._closed:
                    self._spawn_locked()
        self._queue.put(read)
        timer = loop.call_at(loop.time() + self.timeout, self._expire, read)  # waiting in the queue counts
        try:
            return await fut
        except asyncio.CancelledError:
            with self._lock:  # the request went away: a read not started yet is not made at all
                if read.state == _QUEUED:
                    read.state = _DROPPED
            raise
        finally:
            timer.cancel()

    def _expire(self, read: _Read) -> None:
        with self._lock:
            state = read.state
            if state == _QUEUED:
                read.state = _DROPPED
            elif state == _RUNNING:  # its thread stays with the read until it returns
                read.state = _STUCK
                self._stuck += 1
                if not self._closed:
                    self._spawn_locked()
            else:
                return  # done: its answer is on its way to the loop
        if state == _RUNNING:
            self._bad[read.key] = time.monotonic() + self.quarantine
        _deliver(read.fut, None, _busy(f"the cache could not be read within {self.timeout:g} seconds; "
                                       "try again later"))

    def _spawn_locked(self) -> None:
        self._workers += 1
        threading.Thread(target=self._work, name=f"tilecrate-read-{self._workers}", daemon=True).start()

    def _work(self) -> None:
        while True:
            read = self._queue.get()
            if read is None:
                with self._lock:
                    self._workers -= 1
                return
            with self._lock:
                if read.state != _QUEUED:
                    continue  # timed out or given up while queued
                read.state = _RUNNING
            result = exc = None
            try:
                self._admit(read.key)  # again: its file may have hung while this read was queued
                result = read.fn(*read.args)
            except BaseException as e:  # every failure is the request's answer
                exc = e
            with self._lock:
                stuck = read.state == _STUCK
                read.state = _DONE
                if stuck:
                    self._stuck -= 1
                    if self._workers - self._stuck > self.threads:  # a replacement took this place
                        self._workers -= 1
                        return
            if not stuck:
                try:
                    read.loop.call_soon_threadsafe(_deliver, read.fut, result, exc)
                except RuntimeError:  # the loop is closed: nobody waits for the answer
                    pass
            read = result = exc = None  # drop references while waiting for the next read

    def _admit(self, key: Hashable) -> None:
        until = self._bad.get(key) if self._bad else None
        if until is not None:
            if time.monotonic() < until:
                raise _busy(f"a read of this file did not finish within {self.timeout:g} seconds; try again later")
            self._bad.pop(key, None)
        if self._stuck >= self.max_stuck:
            raise _busy("too many cache reads are blocked; try again later")

    def close(self) -> None:
        """Stop taking reads; threads blocked in a read are left to the process exit."""
        with self._lock:
            self._closed = True
            workers = self._workers
        while True:  # reads still queued are not made
            try:
                read = self._queue.get_nowait()
            except queue.Empty:
                break
            if read is not None:
                with self._lock:
                    read.state = _DROPPED
                try:
                    read.loop.call_soon_threadsafe(read.fut.cancel)
                except RuntimeError:
                    pass
        for _ in range(workers):
            self._queue.put(None)


def _busy(text: str) -> EsriError:
    return EsriError(503, text, headers={"Retry-After": "10"})
