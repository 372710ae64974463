"""Failed sign-ins counted per user name and per address, in bounded memory.

After `max_failures` failures of a key within `window` seconds, that key is refused (without
checking any password) until its oldest counted failure leaves the window. The table holds at
most `max_keys` keys; the least recently failed are forgotten first, so a flood of names costs
memory once. FailureLimiter keeps the counts in one process (tests, the CLI); the server uses
SharedFailureLimiter, whose counts live in the data dir's `signins.lmdb`, so N front-end processes
allow the attempts one process would, not N times as many.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
import time
from collections import OrderedDict, deque

import lmdb

from tilecrate.errors import TilecrateError

_SHARED_MAP_SIZE = 64 << 20
_MAX_STAMPS = 10000  # stamps kept per key whatever max_failures says (a record stays under 80 KB)


class LimiterError(TilecrateError):
    """The shared sign-in counts cannot be read or written."""


class FailureLimiter:
    """Sliding-window failure counts with a lockout."""

    def __init__(self, max_failures: int = 5, window: float = 300.0, max_keys: int = 10000):
        self.max_failures = max(1, int(max_failures))
        self.window = float(window)
        self.max_keys = max(1, int(max_keys))
        self._fails: OrderedDict[str, deque] = OrderedDict()

    def _recent(self, key: str, now: float) -> deque | None:
        q = self._fails.get(key)
        if q is None:
            return None
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._fails[key]
            return None
        return q

    def wait(self, keys: list[str], now: float | None = None) -> int:
        """Seconds until any of `keys` may try again (0: it may now)."""
        now = time.monotonic() if now is None else now
        worst = 0.0
        for key in keys:
            q = self._recent(key, now)
            if q is not None and len(q) >= self.max_failures:
                worst = max(worst, q[len(q) - self.max_failures] + self.window - now)
        return math.ceil(worst) if worst > 0 else 0

    def fail(self, keys: list[str], now: float | None = None) -> None:
        """Count one failure against every key."""
        now = time.monotonic() if now is None else now
        for key in keys:
            q = self._recent(key, now)
            if q is None:
                q = self._fails[key] = deque(maxlen=self.max_failures)
            q.append(now)
            self._fails.move_to_end(key)
        while len(self._fails) > self.max_keys:
            self._fails.popitem(last=False)

    def attempt(self, keys: list[str], now: float | None = None) -> tuple[int, float]:
        """(seconds to wait, 0) when any key is locked out; else (0, stamp) with the attempt already
        counted as a failure of every key, so concurrent attempts cannot all pass before one fails."""
        now = time.monotonic() if now is None else now
        wait = self.wait(keys, now)
        if wait:
            return wait, 0.0
        self.fail(keys, now)
        return 0, now

    def forgive(self, keys: list[str], stamp: float) -> None:
        """Take back the failure `attempt` counted at `stamp` (the password was right, or not checked)."""
        for key in keys:
            q = self._fails.get(key)
            if q is not None and stamp in q:
                q.remove(stamp)
                if not q:
                    del self._fails[key]

    def succeed(self, keys: list[str]) -> None:
        """Forget the failures of a user who signed in (not of the address: it may be shared)."""
        for key in keys:
            self._fails.pop(key, None)

    def __len__(self) -> int:
        return len(self._fails)


class SharedFailureLimiter:
    """FailureLimiter's counts in an LMDB environment that every front-end process of a data dir opens.

    Each key holds the wall-clock stamps of its recent failures (keys are hashed: user names are
    client input); one write transaction checks and counts an attempt, so processes cannot race.
    """

    def __init__(self, path: str, max_failures: int = 5, window: float = 300.0, max_keys: int = 10000):
        self.max_failures = min(max(1, int(max_failures)), _MAX_STAMPS)
        self.window = float(window)
        self.max_keys = max(1, int(max_keys))
        try:
            os.makedirs(path, exist_ok=True)
            # counts need not survive a crash: no fsync per failed sign-in
            self.env = lmdb.open(path, map_size=_SHARED_MAP_SIZE, subdir=True, max_dbs=0, sync=False,
                                 metasync=False)
        except (OSError, lmdb.Error) as e:
            raise LimiterError(f"cannot open the sign-in counts {path}: {e}") from None

    def close(self) -> None:
        """Close the environment."""
        self.env.close()

    @staticmethod
    def _key(key: str) -> bytes:
        return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def _stamps(self, txn, k: bytes, now: float) -> list[float]:
        raw = txn.get(k)
        if not raw or len(raw) % 8:
            return []
        return [t for t in struct.unpack(f"<{len(raw) // 8}d", raw) if now - self.window < t <= now + self.window]

    def _store(self, txn, k: bytes, stamps: list[float]) -> None:
        stamps = stamps[-self.max_failures:]
        if stamps:
            txn.put(k, struct.pack(f"<{len(stamps)}d", *stamps))
        else:
            txn.delete(k)

    def _wait(self, txn, keys: list[str], now: float) -> int:
        worst = 0.0
        for key in keys:
            q = self._stamps(txn, self._key(key), now)
            if len(q) >= self.max_failures:
                worst = max(worst, q[len(q) - self.max_failures] + self.window - now)
        return math.ceil(worst) if worst > 0 else 0

    def _bound(self, txn, now: float) -> None:
        """Keep at most max_keys keys: drop the expired ones, then those whose last failure is oldest."""
        if txn.stat()["entries"] <= self.max_keys:
            return
        last = []
        for k, raw in txn.cursor().iternext():
            stamps = self._stamps(txn, bytes(k), now) if raw else []
            last.append((max(stamps) if stamps else 0.0, bytes(k)))
        last.sort()
        for _, k in last[:len(last) - self.max_keys * 3 // 4]:
            txn.delete(k)

    def _run(self, fn, write: bool):
        try:
            with self.env.begin(write=write) as txn:
                return fn(txn)
        except lmdb.Error as e:
            raise LimiterError(f"the sign-in counts cannot be {'written' if write else 'read'}: {e}") from None

    def wait(self, keys: list[str], now: float | None = None) -> int:
        """Seconds until any of `keys` may try again (0: it may now)."""
        now = time.time() if now is None else now
        return self._run(lambda txn: self._wait(txn, keys, now), False)

    def fail(self, keys: list[str], now: float | None = None) -> None:
        """Count one failure against every key."""
        now = time.time() if now is None else now

        def count(txn) -> None:
            for key in keys:
                k = self._key(key)
                self._store(txn, k, self._stamps(txn, k, now) + [now])
            self._bound(txn, now)
        self._run(count, True)

    def attempt(self, keys: list[str], now: float | None = None) -> tuple[int, float]:
        """(seconds to wait, 0) when any key is locked out; else (0, stamp) with the attempt already
        counted as a failure of every key (checked and counted in one transaction)."""
        now = time.time() if now is None else now

        def check_and_count(txn) -> tuple[int, float]:
            wait = self._wait(txn, keys, now)
            if wait:
                return wait, 0.0
            for key in keys:
                k = self._key(key)
                self._store(txn, k, self._stamps(txn, k, now) + [now])
            self._bound(txn, now)
            return 0, now
        return self._run(check_and_count, True)

    def forgive(self, keys: list[str], stamp: float) -> None:
        """Take back the failure `attempt` counted at `stamp`."""
        def take_back(txn) -> None:
            for key in keys:
                k = self._key(key)
                q = self._stamps(txn, k, stamp)  # the window as it was at the attempt
                if stamp in q:
                    q.remove(stamp)
                    self._store(txn, k, q)
        self._run(take_back, True)

    def succeed(self, keys: list[str]) -> None:
        """Forget the failures of a user who signed in."""
        def forget(txn) -> None:
            for key in keys:
                txn.delete(self._key(key))
        self._run(forget, True)

    def __len__(self) -> int:
        return self._run(lambda txn: txn.stat()["entries"], False)
