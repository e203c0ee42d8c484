"""Basic auth as the HTTP loop applies it: who may cost a bcrypt, and when.

Why apart from webconfig (which parses and checks the users' hashes): this is the
server's policy against password guessing, with its own pool and counters.
"""

from __future__ import annotations

import concurrent.futures

from .basic_auth import BasicAuth


class Throttle:
    """Bad passwords per client address: past `failures` within `window` seconds the
    address is refused without a bcrypt until the window ends.  Bounded: a spray of
    addresses forgets the oldest."""

    MAX_ADDRESSES = 4096

    def __init__(self, failures: int, window: float):
        self.failures, self.window = failures, window
        self._seen: dict[str, tuple[int, float]] = {}  # address -> (count, since)

    def _current(self, addr: str, now: float) -> tuple[int, float]:
        count, since = self._seen.get(addr, (0, now))
        return (0, now) if now - since > self.window else (count, since)

    def blocked(self, addr: str, now: float) -> bool:
        return self._current(addr, now)[0] >= self.failures

    def failed(self, addr: str, now: float) -> None:
        count, since = self._current(addr, now)
        if addr not in self._seen and len(self._seen) >= self.MAX_ADDRESSES:
            self._seen.pop(next(iter(self._seen)))
        self._seen[addr] = (count + 1, since)


class AuthGate:
    """Basic auth for the HTTP loop: a known scraper is recognised from the cache on the
    loop itself; bcrypt (~0.2 s a check at cost 12) runs in its own small pool, so bad
    passwords never wait in front of a scrape; an address that keeps failing, or a full
    queue, is refused at once (None: the server answers 429)."""

    def __init__(self, basic: BasicAuth, workers: int, queue: int, throttle: Throttle):
        self.basic, self.queue, self.throttle = basic, queue, throttle
        self.pool = concurrent.futures.ThreadPoolExecutor(workers,
                                                          thread_name_prefix="qtrace-auth")
        self.pending = 0
        self.throttled = 0  # requests refused without a bcrypt
        self.bcrypts = 0  # password checks that ran bcrypt

    @property
    def enabled(self) -> bool:
        return self.basic.enabled

    async def check(self, loop, header: str | None, addr: str) -> bool | None:
        known = self.basic.cached(header)
        if known is not None:
            return known
        if self.throttle.blocked(addr, loop.time()) or self.pending >= self.queue:
            self.throttled += 1
            return None
        self.pending += 1
        self.bcrypts += 1
        try:
            ok = await loop.run_in_executor(self.pool, self.basic.verify, header)
        finally:
            self.pending -= 1
        if not ok:
            self.throttle.failed(addr, loop.time())
        return ok


class TokenBucket:
    """rate_limit from the web config (exporter-toolkit's golang.org/x/time/rate limiter):
    one request every `interval` seconds on average, up to `burst` at once; over it, 429.
    On the event loop only: no lock."""

    def __init__(self, interval: float, burst: int):
        self.interval, self.burst = interval, burst
        self.tokens = float(burst)
        self.stamp = 0.0
        self.refused = 0

    def allow(self, now: float) -> bool:
        if not self.interval:
            return True
        if self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) / self.interval)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.refused += 1
        return False
