"""TLS for the metrics server, from exporter-toolkit's tls_server_config, in Python's ssl.

Go's names are translated (cipher suites, curves, TLS versions, client auth types).  Where
Python's ssl cannot do what Go does, the nearest stricter behaviour is taken and the web
config says so once (webconfig.py's warnings): it has no "ask for a certificate but do not
verify it", and sets one ECDHE curve, not a preference list.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from typing import Any

from qtrace_bpf.errors import QtraceError
from qtrace_bpf.log import Log, null_log

CLIENT_AUTH = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert",
               "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# Go's crypto/tls CipherSuites() for TLS <= 1.2 -> OpenSSL's names
CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
# TLS 1.3's suites: not configurable, in Go as in OpenSSL's default
TLS13_CIPHERS = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                 "TLS_CHACHA20_POLY1305_SHA256")
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1",
          "X25519": "X25519"}


def _pem_file(text: str, name: str) -> tuple[str, int]:
    """Inline PEM (cert:, key:, client_ca:) as a path OpenSSL can read: a memfd, never a
    file on disk (the key stays in memory)."""
    fd = os.memfd_create(f"qtrace-{name}", os.MFD_CLOEXEC)
    os.write(fd, text.encode())
    return f"/proc/self/fd/{fd}", fd


def san_allowed(peercert: dict | None, allowed: tuple[str, ...]) -> bool:
    """Does the (verified) client certificate carry one of the allowed SANs (DNS, IP,
    e-mail or URI, exact match)?"""
    if not allowed:
        return True
    sans = {value for _kind, value in (peercert or {}).get("subjectAltName", ())}
    return bool(sans & set(allowed))


class TlsContext:
    """An SSLContext rebuilt when the certificate files change (checked at most each second).
    A rebuild that fails (files half-written by a rotation) keeps the previous context."""

    def __init__(self, cfg: Any, log: Log | None = None):  # a WebConfig
        self.cfg = cfg
        self.log = log or null_log
        self._files = [f for f in (cfg.cert_file, cfg.key_file, cfg.client_ca_file) if f]
        self._stamp: tuple | None = None
        self._ctx: ssl.SSLContext | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def _load_chain(self, ctx: ssl.SSLContext) -> None:
        cfg = self.cfg
        fds = []
        try:
            cert, key = cfg.cert_file, cfg.key_file
            if cfg.cert:
                cert, fd = _pem_file(cfg.cert, "cert")
                fds.append(fd)
            if cfg.key:
                key, fd = _pem_file(cfg.key, "key")
                fds.append(fd)
            for what, path in (("cert_file", cfg.cert_file), ("key_file", cfg.key_file)):
                if path and not os.access(path, os.R_OK):
                    why = "not readable" if os.path.exists(path) else "no such file"
                    raise QtraceError(f"tls_server_config.{what} {path}: {why}")
            try:
                ctx.load_cert_chain(cert, key)
            except ssl.SSLError as exc:
                raise QtraceError(f"tls_server_config: the certificate ({cfg.cert_file or 'cert'}"
                                  f") and key ({cfg.key_file or 'key'}) do not load: "
                                  f"{exc.reason or exc}") from None
        finally:
            for fd in fds:
                os.close(fd)

    def _load_clients(self, ctx: ssl.SSLContext) -> None:
        cfg = self.cfg
        try:
            if cfg.client_ca_file:
                if not os.access(cfg.client_ca_file, os.R_OK):
                    raise QtraceError(f"tls_server_config.client_ca_file {cfg.client_ca_file}: "
                                      "not readable")
                ctx.load_verify_locations(cfg.client_ca_file)
            if cfg.client_ca:
                ctx.load_verify_locations(cadata=cfg.client_ca)
        except ssl.SSLError as exc:
            raise QtraceError(f"tls_server_config: the client CA does not load: "
                              f"{exc.reason or exc}") from None
        has_ca = bool(cfg.client_ca_file or cfg.client_ca)
        auth = cfg.client_auth_type
        if auth == "RequireAnyClientCert" and not has_ca:
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)  # verified: see the warning
        ctx.verify_mode = {
            "NoClientCert": ssl.CERT_NONE,
            "RequestClientCert": ssl.CERT_OPTIONAL if has_ca else ssl.CERT_NONE,
            "RequireAnyClientCert": ssl.CERT_REQUIRED,
            "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
            "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
        }[auth]

    def _build(self) -> ssl.SSLContext:
        cfg = self.cfg
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[cfg.min_version]
        ctx.maximum_version = TLS_VERSIONS[cfg.max_version]
        if cfg.cipher_suites:
            names = [CIPHERS[c] for c in cfg.cipher_suites if c in CIPHERS]
            if names:
                ctx.set_ciphers(":".join(names))
        if cfg.prefer_server_cipher_suites:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        else:
            ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        if cfg.curve_preferences:
            ctx.set_ecdh_curve(CURVES[cfg.curve_preferences[0]])
        self._load_chain(ctx)
        self._load_clients(ctx)
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
