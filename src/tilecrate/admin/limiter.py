"""Failed sign-ins counted per user name and per address, in bounded memory.

After `max_failures` failures of a key within `window` seconds, that key is refused (without
checking any password) until its oldest counted failure leaves the window. The table holds at
most `max_keys` keys; the least recently failed are forgotten first, so a flood of names costs
memory once. Counts live in each front-end process (N processes allow N times the attempts).
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict, deque


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
