"""Prometheus' exporter-toolkit web config (the file node_exporter takes as
--web.config.file): TLS, client certificates and bcrypt basic auth, checked at start.

    tls_server_config:
      cert_file: /etc/qtrace/tls.crt
      key_file: /etc/qtrace/tls.key
      client_ca_file: /etc/qtrace/clients-ca.crt      # optional (mTLS)
      client_auth_type: RequireAndVerifyClientCert    # or VerifyClientCertIfGiven
      min_version: TLS12                              # TLS12 | TLS13
    basic_auth_users:
      prometheus: $2b$12$...                          # bcrypt hash (htpasswd -nBC 12 '')

Certificates are re-read when their files change (rotation without a restart).  A
successful basic-auth check is cached for a minute, so a scrape does not pay bcrypt each
time; unknown users cost the same bcrypt work as known ones.
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qtrace_bpf.errors import QtraceError

CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version"}


@dataclass
class WebConfig:
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    users: dict[str, str] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)  # added to every response

    @property
    def tls(self) -> bool:
        return bool(self.cert_file)


def parse_web_config(data: object, where: str) -> WebConfig:
    """The exporter-toolkit structure (a dict, from YAML or the TOML config) -> WebConfig."""
    if data is None:
        return WebConfig()
    if not isinstance(data, dict):
        raise QtraceError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - {"tls_server_config", "basic_auth_users", "http_server_config"})
    if unknown:
        raise QtraceError(f"{where}: unknown key(s): {', '.join(unknown)}")
    tls = data.get("tls_server_config") or {}
    users = data.get("basic_auth_users") or {}
    http = data.get("http_server_config") or {}
    for name, value in (("tls_server_config", tls), ("basic_auth_users", users),
                        ("http_server_config", http)):
        if not isinstance(value, dict):
            raise QtraceError(f"{where}: {name}: expected a mapping")
    unknown = sorted(set(tls) - _TLS_KEYS)
    if unknown:
        raise QtraceError(f"{where}: tls_server_config: unsupported key(s): {', '.join(unknown)}")
    for key in _TLS_KEYS:
        if key in tls and not isinstance(tls[key], str):
            raise QtraceError(f"{where}: tls_server_config.{key}: expected a string")
    cfg = WebConfig(
        cert_file=tls.get("cert_file", ""), key_file=tls.get("key_file", ""),
        client_ca_file=tls.get("client_ca_file", ""),
        client_auth_type=tls.get("client_auth_type", "") or (
            "RequireAndVerifyClientCert" if tls.get("client_ca_file") else "NoClientCert"),
        min_version=tls.get("min_version", "TLS12"),
        users={str(u): str(h) for u, h in users.items()},
        headers={str(k): str(v) for k, v in (http.get("headers") or {}).items()})
    validate(cfg, where)
    return cfg


def load_web_config(path: str) -> WebConfig:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise QtraceError(f"web config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise QtraceError(f"web config {path}: not valid YAML: {exc}") from None
    return parse_web_config(data, f"web config {path}")


def validate(cfg: WebConfig, where: str) -> None:
    """Everything that can be wrong is said now, at start, naming the key and the value."""
    if bool(cfg.cert_file) != bool(cfg.key_file):
        raise QtraceError(f"{where}: tls_server_config: cert_file and key_file go together")
    if cfg.client_auth_type not in CLIENT_AUTH:
        raise QtraceError(f"{where}: tls_server_config.client_auth_type "
                          f"{cfg.client_auth_type!r}: one of {', '.join(CLIENT_AUTH)}")
    if cfg.client_auth_type != "NoClientCert" and not cfg.client_ca_file:
        raise QtraceError(f"{where}: client_auth_type {cfg.client_auth_type} needs "
                          "client_ca_file")
    if cfg.client_ca_file and cfg.client_auth_type == "NoClientCert":
        raise QtraceError(f"{where}: client_ca_file is set but client_auth_type is "
                          "NoClientCert: choose a client auth policy")
    if cfg.min_version not in TLS_VERSIONS:
        raise QtraceError(f"{where}: tls_server_config.min_version {cfg.min_version!r}: one of "
                          f"{', '.join(TLS_VERSIONS)}")
    if cfg.client_ca_file and not cfg.tls:
        raise QtraceError(f"{where}: client_ca_file needs cert_file and key_file")
    if cfg.tls:
        TlsContext(cfg).get()  # unreadable or mismatched files: said now, not at a scrape
    BasicAuth(cfg.users, where)


class TlsContext:
    """An SSLContext rebuilt when the certificate files change (checked at most each second).
    A rebuild that fails (files half-written by a rotation) keeps the previous context."""

    def __init__(self, cfg: WebConfig, log: Callable[..., None] | None = None):
        self.cfg = cfg
        self.log = log or (lambda _msg, **_kw: None)
        self._files = [f for f in (cfg.cert_file, cfg.key_file, cfg.client_ca_file) if f]
        self._stamp: tuple | None = None
        self._ctx: ssl.SSLContext | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def _build(self) -> ssl.SSLContext:
        cfg = self.cfg
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[cfg.min_version]
        for what, path in (("cert_file", cfg.cert_file), ("key_file", cfg.key_file),
                           ("client_ca_file", cfg.client_ca_file)):
            if path and not os.access(path, os.R_OK):
                why = "not readable" if os.path.exists(path) else "no such file"
                raise QtraceError(f"tls_server_config.{what} {path}: {why}")
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        except ssl.SSLError as exc:
            raise QtraceError(f"tls_server_config: cert_file {cfg.cert_file} and key_file "
                              f"{cfg.key_file} do not load: {exc.reason or exc}") from None
        if cfg.client_ca_file:
            try:
                ctx.load_verify_locations(cfg.client_ca_file)
            except ssl.SSLError as exc:
                raise QtraceError(f"tls_server_config.client_ca_file {cfg.client_ca_file}: "
                                  f"{exc.reason or exc}") from None
        ctx.verify_mode = CLIENT_AUTH[cfg.client_auth_type]
        return ctx

    def _stat(self) -> tuple:
        out = []
        for f in self._files:
            try:
                st = os.stat(f)
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def get(self) -> ssl.SSLContext:
        with self._lock:
            now = time.monotonic()
            if self._ctx is not None and now - self._checked < 1.0:
                return self._ctx
            self._checked = now
            stamp = self._stat()
            if self._ctx is None or stamp != self._stamp:
                try:
                    ctx = self._build()
                except QtraceError as exc:
                    if self._ctx is None:
                        raise
                    self.log("TLS files changed but do not load: keeping the previous ones",
                             level="warning", error=exc)
                else:
                    if self._ctx is not None:
                        self.log("TLS certificate reloaded", cert_file=self.cfg.cert_file)
                    self._ctx, self._stamp = ctx, stamp
            return self._ctx


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

