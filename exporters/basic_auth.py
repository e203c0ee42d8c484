"""bcrypt basic auth as Prometheus' exporter-toolkit does it (basic_auth_users)."""

from __future__ import annotations

import base64
import hashlib
import threading
import time

from qtrace_bpf.errors import QtraceError


class BasicAuth:
    """bcrypt basic auth as exporter-toolkit does it: constant work for unknown users,
    any password length answered with a plain 401, successful checks cached."""

    CACHE_SECONDS = 60.0
    CACHE_MAX = 1024

    def __init__(self, users: dict[str, str], where: str = "basic_auth_users"):
        import bcrypt

        self._bcrypt = bcrypt
        self.users: dict[str, bytes] = {}
        costs = []
        for user, hashed in users.items():
            h = hashed.encode()
            try:
                bcrypt.checkpw(b"", h)  # raises on anything that is not a bcrypt hash
                costs.append(int(hashed.split("$")[2]))
            except (ValueError, IndexError):
                raise QtraceError(f"{where}: user {user!r}: not a bcrypt hash "
                                  "(make one with: htpasswd -nBC 12 '' | tr -d ':\\n')") from None
            self.users[user] = h
        # unknown users are checked against this, at the cost of the real ones
        self._dummy = bcrypt.hashpw(b"qtrace", bcrypt.gensalt(rounds=max(costs, default=4)))
        self._ok: dict[bytes, float] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.users)

    def check(self, header: str | None) -> bool:
        """The whole check (cached, then bcrypt): for callers that may block."""
        known = self.cached(header)
        return known if known is not None else self.verify(header)

    def cached(self, header: str | None) -> bool | None:
        """Cheap, for the event loop: False for a malformed header, True for one that
        passed within CACHE_SECONDS, None when only bcrypt can tell."""
        parsed = self._parse(header)
        if parsed is None:
            return not self.users
        with self._lock:
            return True if self._ok.get(parsed[2], 0.0) > time.monotonic() else None

    def _parse(self, header: str | None) -> tuple[str, str, bytes] | None:
        if not self.users or not header or not header.startswith("Basic "):
            return None
        try:
            user, sep, password = base64.b64decode(header[6:], validate=True) \
                .decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if not sep:
            return None
        return user, password, hashlib.sha256(f"{user}\0{password}".encode()).digest()

    def verify(self, header: str | None) -> bool:
        """bcrypt (~0.2 s at cost 12): run it off the event loop, in a bounded pool."""
        parsed = self._parse(header)
        if parsed is None:
            return not self.users
        user, password, key = parsed
        now = time.monotonic()
        pw = password.encode()
        h = self.users.get(user, self._dummy)
        try:
            ok = self._bcrypt.checkpw(pw, h)
        except ValueError:  # longer than bcrypt's 72 bytes: same work, then no
            self._bcrypt.checkpw(pw[:72], h)
            ok = False
        ok = ok and user in self.users
        if ok:
            with self._lock:
                if len(self._ok) >= self.CACHE_MAX:
                    self._ok.clear()
                self._ok[key] = now + self.CACHE_SECONDS
        return ok

