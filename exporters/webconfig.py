"""Prometheus' exporter-toolkit web config (the file node_exporter takes as
--web.config.file), every documented key, checked at start:

    tls_server_config:       cert_file/key_file or inline cert/key; client_ca_file or inline
                             client_ca; client_auth_type; client_allowed_sans; min_version,
                             max_version; cipher_suites; prefer_server_cipher_suites;
                             curve_preferences
    http_server_config:      http2; headers (the five the toolkit knows)
    basic_auth_users:        user: bcrypt hash
    rate_limit:              interval (Go duration), burst

A fleet's shared file is taken as it is: each key is honoured (tls.py, http.py), or, where
Python's ssl or an HTTP/1.1 server cannot, the nearest stricter behaviour is taken and one
warning says so (WebConfig.warnings: logged once at start and by --check-config).  Keys
outside the format are refused (a typo must not silently drop TLS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qtrace_bpf.errors import QtraceError

from .basic_auth import BasicAuth
from .tls import CIPHERS, CLIENT_AUTH, CURVES, TLS13_CIPHERS, TLS_VERSIONS, TlsContext

_TLS_STRINGS = ("cert_file", "key_file", "cert", "key", "client_ca_file", "client_ca",
                "client_auth_type", "min_version", "max_version")
_TLS_LISTS = ("client_allowed_sans", "cipher_suites", "curve_preferences")
_TLS_KEYS = {*_TLS_STRINGS, *_TLS_LISTS, "prefer_server_cipher_suites"}
HEADERS = {"Content-Security-Policy": None, "X-Frame-Options": ("deny", "sameorigin"),
           "X-Content-Type-Options": ("nosniff",), "X-XSS-Protection": None,
           "Strict-Transport-Security": None}
_TOP = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass
class WebConfig:
    cert_file: str = ""
    key_file: str = ""
    cert: str = ""  # inline PEM
    key: str = ""
    client_ca_file: str = ""
    client_ca: str = ""
    client_auth_type: str = "NoClientCert"
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()
    users: dict[str, str] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)  # added to every response
    rate_interval: float = 0.0  # seconds between requests (token bucket); 0: no limit
    rate_burst: int = 0
    warnings: list[str] = field(default_factory=list)  # said once at start

    @property
    def tls(self) -> bool:
        return bool(self.cert_file or self.cert)


def go_duration(key: str, value: object) -> float:
    """'1s', '500ms', '1m30s', '0' (Go's time.ParseDuration) -> seconds."""
    text = str(value).strip()
    if text == "0":
        return 0.0
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise QtraceError(f"{key} {value!r}: expected a duration such as 1s, 500ms or 0")
    return sum(float(n) * _UNIT[u] for n, u in parts)


def _mapping(where: str, name: str, value: object) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise QtraceError(f"{where}: {name}: expected a mapping")
    return value


def _tls(tls: dict, where: str, cfg: WebConfig) -> None:
    unknown = sorted(set(tls) - _TLS_KEYS)
    if unknown:
        raise QtraceError(f"{where}: tls_server_config: unknown key(s): {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(_TLS_KEYS))})")
    for key in _TLS_STRINGS:
        if key in tls and not isinstance(tls[key], str):
            raise QtraceError(f"{where}: tls_server_config.{key}: expected a string")
        if tls.get(key):
            setattr(cfg, key, tls[key])
    for key in _TLS_LISTS:
        value = tls.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise QtraceError(f"{where}: tls_server_config.{key}: expected a list of strings")
        setattr(cfg, key, tuple(value))
    if "prefer_server_cipher_suites" in tls:
        if not isinstance(tls["prefer_server_cipher_suites"], bool):
            raise QtraceError(f"{where}: tls_server_config.prefer_server_cipher_suites: "
                              "expected true or false")
        cfg.prefer_server_cipher_suites = tls["prefer_server_cipher_suites"]
    if not tls.get("client_auth_type") and (cfg.client_ca_file or cfg.client_ca):
        cfg.client_auth_type = "RequireAndVerifyClientCert"


def parse_web_config(data: object, where: str) -> WebConfig:
    """The exporter-toolkit structure (a dict, from YAML or the TOML config) -> WebConfig."""
    if data is None:
        return WebConfig()
    if not isinstance(data, dict):
        raise QtraceError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP))
    if unknown:
        raise QtraceError(f"{where}: unknown key(s): {', '.join(unknown)} "
                          f"(known: {', '.join(_TOP)})")
    tls, http, users, rate = (_mapping(where, k, data.get(k)) for k in _TOP)
    cfg = WebConfig(users={str(u): str(h) for u, h in users.items()})
    _tls(tls, where, cfg)
    unknown = sorted(set(http) - {"http2", "headers"})
    if unknown:
        raise QtraceError(f"{where}: http_server_config: unknown key(s): {', '.join(unknown)}")
    if http.get("http2"):
        cfg.warnings.append("http_server_config.http2: qtrace serves HTTP/1.1 (what "
                            "Prometheus scrapes with); ignored")
    for name, value in _mapping(where, "http_server_config.headers",
                                http.get("headers")).items():
        if name not in HEADERS:
            raise QtraceError(f"{where}: http_server_config.headers: {name!r} is not one of "
                              f"{', '.join(HEADERS)}")
        allowed = HEADERS[name]
        if value and allowed and str(value).lower() not in allowed:
            raise QtraceError(f"{where}: http_server_config.headers.{name} {value!r}: one of "
                              f"{', '.join(allowed)}")
        if value:
            cfg.headers[name] = str(value)
    unknown = sorted(set(rate) - {"interval", "burst"})
    if unknown:
        raise QtraceError(f"{where}: rate_limit: unknown key(s): {', '.join(unknown)}")
    if rate:
        cfg.rate_interval = go_duration(f"{where}: rate_limit.interval", rate.get("interval", 0))
        burst = rate.get("burst", 0)
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
            raise QtraceError(f"{where}: rate_limit.burst {burst!r}: expected an integer >= 0")
        cfg.rate_burst = burst
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
    t = "tls_server_config"
    if cfg.cert_file and cfg.cert or cfg.key_file and cfg.key:
        raise QtraceError(f"{where}: {t}: give the certificate and key inline (cert, key) or "
                          "as files (cert_file, key_file), not both")
    if bool(cfg.cert_file or cfg.cert) != bool(cfg.key_file or cfg.key):
        raise QtraceError(f"{where}: {t}: cert_file and key_file go together")
    if cfg.client_auth_type not in CLIENT_AUTH:
        raise QtraceError(f"{where}: {t}.client_auth_type {cfg.client_auth_type!r}: one of "
                          f"{', '.join(CLIENT_AUTH)}")
    has_ca = bool(cfg.client_ca_file or cfg.client_ca)
    auth = cfg.client_auth_type
    if auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert") and not has_ca:
        raise QtraceError(f"{where}: client_auth_type {auth} needs client_ca_file")
    if has_ca and auth == "NoClientCert":
        raise QtraceError(f"{where}: client_ca_file is set but client_auth_type is "
                          "NoClientCert: choose a client auth policy")
    if auth == "RequestClientCert":
        cfg.warnings.append("client_auth_type RequestClientCert: Python's TLS cannot ask for "
                            "a certificate it does not verify: " + (
                                "a certificate sent is verified against the client CA" if has_ca
                                else "no certificate is asked for"))
    if auth == "RequireAnyClientCert":
        cfg.warnings.append("client_auth_type RequireAnyClientCert: Python's TLS cannot "
                            "require a certificate it does not verify: it is verified against "
                            + ("the client CA" if has_ca else "the system's CA store"))
    if cfg.client_allowed_sans and auth not in ("RequireAnyClientCert",
                                                "RequireAndVerifyClientCert"):
        raise QtraceError(f"{where}: client_allowed_sans needs client_auth_type "
                          "RequireAnyClientCert or RequireAndVerifyClientCert")
    for key in ("min_version", "max_version"):
        if getattr(cfg, key) not in TLS_VERSIONS:
            raise QtraceError(f"{where}: {t}.{key} {getattr(cfg, key)!r}: one of "
                              f"{', '.join(TLS_VERSIONS)}")
    if TLS_VERSIONS[cfg.min_version] > TLS_VERSIONS[cfg.max_version]:
        raise QtraceError(f"{where}: {t}: min_version {cfg.min_version} is above max_version "
                          f"{cfg.max_version}")
    bad = [c for c in cfg.cipher_suites if c not in CIPHERS and c not in TLS13_CIPHERS]
    if bad:
        raise QtraceError(f"{where}: {t}.cipher_suites: unknown {', '.join(bad)} (Go's names, "
                          f"e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)")
    if any(c in TLS13_CIPHERS for c in cfg.cipher_suites):
        cfg.warnings.append("cipher_suites: TLS 1.3 suites are not configurable (in Go "
                            "neither); they stay the defaults")
    bad = [c for c in cfg.curve_preferences if c not in CURVES]
    if bad:
        raise QtraceError(f"{where}: {t}.curve_preferences: unknown {', '.join(bad)} (one of "
                          f"{', '.join(CURVES)})")
    if len(cfg.curve_preferences) > 1:
        cfg.warnings.append(f"curve_preferences: Python's ssl sets one ECDHE curve: "
                            f"{cfg.curve_preferences[0]} only")
    if has_ca and not cfg.tls:
        raise QtraceError(f"{where}: client_ca_file needs cert_file and key_file")
    if cfg.rate_interval and cfg.rate_burst < 1:
        raise QtraceError(f"{where}: rate_limit.burst must be at least 1 when interval is set")
    if cfg.tls:
        TlsContext(cfg).get()  # unreadable or mismatched files: said now, not at a scrape
    BasicAuth(cfg.users, where)
