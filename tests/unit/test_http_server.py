"""/metrics served like a production exporter: hostile and idle clients, TLS, basic auth,
IPv6, the web config file, config checking.  Real clients (urllib, ssl, curl)."""

from __future__ import annotations

import gzip
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from qtrace_bpf.exporters.http import Limits, Server, make_app
from qtrace_bpf.exporters.webconfig import WebConfig
from support import QPROBE, ROOT
from support.caps import require
from support.web import ACCEPT_OM, get, make_cert


def bcrypt_hash(password: bytes, rounds: int = 4) -> str:
    import bcrypt

    return bcrypt.hashpw(password, bcrypt.gensalt(rounds=rounds)).decode()


class Fake:
    """A Server around a trivial app (the HTTP side alone, no BPF)."""

    def __init__(self, web: WebConfig | None = None, limits: Limits | None = None,
                 host: str = "127.0.0.1", delay: float = 0.0):
        self.renders = 0

        def metrics(fmt: str, gz: bool) -> bytes:
            self.renders += 1
            time.sleep(delay)
            body = b"# TYPE x gauge\nx 1\n"
            return gzip.compress(body) if gz else body

        self.server = Server(make_app(metrics, lambda: (True, "ok")), [(host, 0)], web=web,
                             limits=limits)
        self.server.start()
        self.port = self.server.ports[0]

    def url(self, path: str = "/metrics", scheme: str = "http", host: str = "127.0.0.1") -> str:
        h = f"[{host}]" if ":" in host else host
        return f"{scheme}://{h}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def fake():
    made: list[Fake] = []

    def start(**kw) -> Fake:
        made.append(Fake(**kw))
        return made[-1]

    yield start
    for f in made:
        f.close()


def test_landing_page_404_and_health(fake):
    f = fake()
    assert b'href="metrics"' in get(f.url("/")).read()
    with pytest.raises(urllib.error.HTTPError) as err:
        get(f.url("/nothing"))
    assert err.value.code == 404
    assert get(f.url("/-/healthy")).read() == b"ok\n"
    r = get(f.url(), headers={"Accept": ACCEPT_OM, "Accept-Encoding": "gzip"})
    assert r.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert r.headers["Content-Encoding"] == "gzip" and gzip.decompress(r.read())
    r = get(f.url())
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")


def test_one_idle_tls_connection_does_not_delay_a_scrape(fake, tmp_path):
    require("openssl", subprocess.run(["which", "openssl"]).returncode == 0,
            "apt-get install openssl")
    crt, key = make_cert(tmp_path)
    f = fake(web=WebConfig(cert_file=str(crt), key_file=str(key)))
    ctx = ssl.create_default_context(cafile=str(crt))
    idle = socket.create_connection(("127.0.0.1", f.port))  # never sends a ClientHello
    try:
        started = time.monotonic()
        assert get(f.url(scheme="https"), ctx=ctx).status == 200
        assert time.monotonic() - started < 1.0
    finally:
        idle.close()


def test_tls_handshakes_count_against_max_connections(fake, tmp_path):
    """Connections that never finish a handshake hold a slot each (they cannot pile up
    outside the limit), and the oldest makes room for a scraper."""
    crt, key = make_cert(tmp_path)
    f = fake(web=WebConfig(cert_file=str(crt), key_file=str(key)),
             limits=Limits(max_connections=16))
    ctx = ssl.create_default_context(cafile=str(crt))
    stalled = [socket.create_connection(("127.0.0.1", f.port)) for _ in range(40)]
    try:
        deadline = time.monotonic() + 10
        while f.server.active < 16 or f.server.evicted < 24:
            assert time.monotonic() < deadline, (f.server.active, f.server.evicted)
            time.sleep(0.05)
        assert f.server.active == 16, "a handshake under way holds a connection slot"
        assert get(f.url(scheme="https"), ctx=ctx).status == 200
    finally:
        for s in stalled:
            s.close()


def test_idle_connections_are_closed_after_the_timeout(fake):
    f = fake(limits=Limits(read_timeout=0.5, idle_timeout=0.5))
    s = socket.create_connection(("127.0.0.1", f.port))
    s.settimeout(5)
    started = time.monotonic()
    assert s.recv(1) == b""  # closed by the server
    assert time.monotonic() - started < 3
    s.close()


def test_at_the_limit_the_longest_idle_connection_makes_room(fake):
    f = fake(limits=Limits(max_connections=16))
    idle = [socket.create_connection(("127.0.0.1", f.port)) for _ in range(40)]
    try:
        for _ in range(5):
            assert get(f.url()).status == 200
        assert f.server.evicted >= 24
    finally:
        for s in idle:
            s.close()


def test_ipv6_and_dual_stack(fake):
    if not socket.has_ipv6:
        require("IPv6", False, "a kernel with IPv6")
    v6 = fake(host="::1")
    assert get(v6.url(host="::1")).status == 200
    both = fake(host="::")  # like node_exporter's ":PORT"
    assert get(both.url(host="::1")).status == 200
    assert get(both.url(host="127.0.0.1")).status == 200


def test_concurrent_scrapes_share_renders(fake):
    f = fake(delay=0.3)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(get(f.url()).status))
               for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 10
    # Fake renders every time: sharing is Exposition's (see test_exposition_* below); the
    # server's pool must still have answered all ten in parallel, not one after the other.


def test_basic_auth(fake):
    f = fake(web=WebConfig(users={"prom": bcrypt_hash(b"s3cret", rounds=10)}),
             limits=Limits(auth_failures=100))  # timed below: no 429 for this address
    with pytest.raises(urllib.error.HTTPError) as err:
        get(f.url())
    assert err.value.code == 401 and "Basic" in err.value.headers["WWW-Authenticate"]
    for user, password in (("prom", "wrong"), ("nobody", "x"), ("prom", "p" * 200)):
        with pytest.raises(urllib.error.HTTPError) as err:
            get(f.url(), auth=(user, password))
        assert err.value.code == 401, (user, password)
    assert get(f.url(), auth=("prom", "s3cret")).status == 200

    def timed(user: str, password: str) -> float:
        started = time.perf_counter()
        with pytest.raises(urllib.error.HTTPError):
            get(f.url(), auth=(user, password))
        return time.perf_counter() - started

    known = statistics.median(timed("prom", f"bad{i}") for i in range(5))
    unknown = statistics.median(timed(f"ghost{i}", "bad") for i in range(5))
    assert unknown > 0.5 * known, (known, unknown)  # bcrypt's work for unknown users too
    cached = time.perf_counter()
    get(f.url(), auth=("prom", "s3cret"))
    assert time.perf_counter() - cached < known, "a successful check is cached"


def test_repeated_bad_logins_get_429_without_a_bcrypt_and_scrapes_go_on(fake):
    """Each bad password costs a bcrypt (~0.2 s at cost 12); an address that keeps failing
    is answered 429 at once, and a known scraper is checked on the loop from its cache."""
    f = fake(web=WebConfig(users={"prom": bcrypt_hash(b"s3cret", rounds=12)}),
             limits=Limits(auth_failures=3, auth_window=60))
    assert get(f.url(), auth=("prom", "s3cret")).status == 200  # now cached
    codes = []
    for i in range(3):
        with pytest.raises(urllib.error.HTTPError) as err:
            get(f.url(), auth=("prom", f"bad{i}"))
        codes.append(err.value.code)
    assert codes == [401, 401, 401]
    bcrypts = f.server.auth.bcrypts
    for i in range(20):
        with pytest.raises(urllib.error.HTTPError) as err:
            get(f.url(), auth=("prom", f"again{i}"))
        assert err.value.code == 429 and err.value.headers["Retry-After"] == "60"
    assert f.server.auth.throttled == 20
    assert f.server.auth.bcrypts == bcrypts, "a 429 costs no bcrypt"
    stop = threading.Event()

    def storm() -> None:  # bad logins from this address go on meanwhile
        while not stop.is_set():
            try:
                get(f.url(), auth=("prom", "storm"))
            except urllib.error.HTTPError:
                pass

    t = threading.Thread(target=storm)
    t.start()
    try:
        for _ in range(10):
            assert get(f.url(), auth=("prom", "s3cret")).status == 200
        assert f.server.auth.bcrypts == bcrypts, "the scraper is known from the cache"
    finally:
        stop.set()
        t.join()


def test_web_config_errors_at_start(tmp_path):
    from qtrace_bpf.exporters.webconfig import load_web_config

    from qtrace_bpf.errors import QtraceError

    crt, key = make_cert(tmp_path)
    cases = {
        "basic_auth_users:\n  prom: $2y$10$...\n": "user 'prom': not a bcrypt hash",
        f"tls_server_config:\n  cert_file: {crt}\n  key_file: /nonexistent.key\n":
            "key_file /nonexistent.key: no such file",
        f"tls_server_config:\n  cert_file: {crt}\n": "cert_file and key_file go together",
        f"tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  client_auth_type: X\n":
            "client_auth_type 'X'",
        "tls_config:\n  a: b\n": "unknown key(s): tls_config",
        "basic_auth_users: [a]\n": "basic_auth_users: expected a mapping",
        f"tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  min_version: TLS13\n"
        "  max_version: TLS12\n": "min_version TLS13 is above max_version TLS12",
        f"tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n"
        "  cipher_suites: [RC4]\n": "cipher_suites: unknown RC4",
        "http_server_config:\n  headers:\n    X-Powered-By: me\n": "'X-Powered-By' is not one",
        "http_server_config:\n  headers:\n    X-Frame-Options: allow\n": "one of deny, sameorigin",
        "rate_limit:\n  interval: 1 second\n  burst: 2\n": "expected a duration",
        "rate_limit:\n  interval: 1s\n": "burst must be at least 1",
        "tls_server_config:\n  max_versoin: TLS12\n": "unknown key(s): max_versoin",
    }
    for text, message in cases.items():
        path = tmp_path / "web.yml"
        path.write_text(text)
        with pytest.raises(QtraceError) as err:
            load_web_config(str(path))
        assert message in str(err.value), (text, str(err.value))


def test_certificate_rotation_without_restart(fake, tmp_path):
    crt, key = make_cert(tmp_path, "a", cn="first")
    f = fake(web=WebConfig(cert_file=str(crt), key_file=str(key)))
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

    def served_cn() -> str:
        with socket.create_connection(("127.0.0.1", f.port)) as raw, \
                ctx.wrap_socket(raw) as s:
            der = s.getpeercert(binary_form=True)
        out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject"],
                             input=der, capture_output=True).stdout.decode()
        return out.strip().split("CN", 1)[1].strip(" =")

    assert served_cn() == "first"
    new_crt, new_key = make_cert(tmp_path, "b", cn="second")
    key.write_bytes(new_key.read_bytes())
    crt.write_bytes(new_crt.read_bytes())
    time.sleep(1.2)  # files are looked at once a second
    assert served_cn() == "second"


# -- the daemon -------------------------------------------------------------------------


def daemon_cmd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*QPROBE, "daemon", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("text,message", [
    ('max_vms = "10"\n', "max_vms = '10': expected an integer from 1 to 65536"),
    ('grace_period = "abc"\n', "grace_period = 'abc': expected a number"),
    ('qemu_binaries = "/usr/bin/qemu-system-x86_64"\n',
     "qemu_binaries = '/usr/bin/qemu-system-x86_64': expected a list of strings"),
    ("max_vms = 0\n", "max_vms = 0: out of range"),
    ("listen = 'nowhere'\n", "expected HOST:PORT"),
    ('[tls]\ncert_file = "/nonexistent.crt"\nkey_file = "/nonexistent.key"\n',
     "cert_file /nonexistent.crt: no such file"),
    ('[basic_auth_users]\nprom = "$2y$10$..."\n', "user 'prom': not a bcrypt hash"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    cfg = tmp_path / "q.toml"
    cfg.write_text(text)
    r = daemon_cmd("--config", str(cfg), "--check-config")
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = daemon_cmd("--config", str(cfg))  # and the daemon itself refuses to start
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_check_config_reports_every_error_at_once(tmp_path):
    """An unknown key is an error (with a did-you-mean), and all errors come in one go."""
    cfg = tmp_path / "q.toml"
    cfg.write_text('max_vm = 10\ncolour = "blue"\nmax_vcpus_per_vm = 0\n'
                   'listen = "127.0.0.1:10999"\n')
    r = daemon_cmd("--config", str(cfg), "--check-config")
    assert r.returncode == 1 and "3 errors" in r.stderr, r.stderr
    assert "unknown key 'max_vm' (did you mean 'max_vms'?)" in r.stderr, r.stderr
    assert "unknown key 'colour' (known: " in r.stderr, r.stderr
    assert "max_vcpus_per_vm = 0: out of range" in r.stderr, r.stderr
    cfg.write_text('listen = "127.0.0.1:10999"\n')
    r = daemon_cmd("--config", str(cfg), "--check-config")
    assert r.returncode == 0 and "config OK: listen 127.0.0.1:10999" in r.stdout
    shipped = daemon_cmd("--config", str(ROOT / "systemd" / "qtrace.toml"), "--check-config")
    assert shipped.returncode == 0, shipped.stderr


SHUTDOWN_WITH_OPEN_CONNECTIONS = r"""
import gc, socket, sys
from qtrace_bpf.exporters.http import Server, make_app
server = Server(make_app(lambda fmt, gz: b"x 1\n", lambda: (True, "ok")), [("127.0.0.1", 0)])
server.start()
port = server.ports[0]
socks = []
for i in range(4):  # three keep-alive connections after a scrape, one that never asked
    s = socket.create_connection(("127.0.0.1", port))
    if i:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    socks.append(s)
server.shutdown()
gc.collect()
print("closed", file=sys.stderr)
"""


def test_shutdown_with_open_connections_is_quiet():
    """Prometheus keeps its connection open: stopping the daemon must close it while the
    event loop still runs (it once left a task to die at garbage collection, with a
    traceback in the daemon's log)."""
    r = subprocess.run([sys.executable, "-c", SHUTDOWN_WITH_OPEN_CONNECTIONS],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stderr.strip() == "closed", r.stderr


def client_cert(tmp: Path, ca: tuple[Path, Path], name: str, san: str) -> tuple[Path, Path]:
    """A client certificate signed by ca, with one subjectAltName."""
    key, csr, crt = tmp / f"{name}.key", tmp / f"{name}.csr", tmp / f"{name}.crt"
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName={san}", "-keyout", str(key), "-out", str(csr)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey",
                    str(ca[1]), "-set_serial", "7", "-days", "2", "-copy_extensions", "copy",
                    "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def tls_client(cert: tuple[Path, Path] | None = None, version: ssl.TLSVersion | None = None):
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def refused_in_tls(url: str, ctx: ssl.SSLContext, auth: tuple[str, str] | None = None) -> None:
    """The connection ends in or right after the handshake: no HTTP answer at all."""
    with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)) as err:
        get(url, ctx=ctx, auth=auth)
    assert not isinstance(err.value, urllib.error.HTTPError), err.value


def test_every_key_of_the_exporter_toolkit_format_is_honoured_or_warned(fake, tmp_path):
    """A fleet's web.yml with every documented key: each is honoured (TLS version bounds,
    ciphers, client certificates and their SANs, headers, basic auth, rate limit) or
    warned about once (http2, a second curve)."""
    from qtrace_bpf.exporters.webconfig import load_web_config

    crt, key = make_cert(tmp_path)
    ca = make_cert(tmp_path, "ca", cn="clients-ca")
    good = client_cert(tmp_path, ca, "prom", "DNS:prom.example")
    other = client_cert(tmp_path, ca, "other", "DNS:other.example")
    web = tmp_path / "web.yml"
    web.write_text(f"""
tls_server_config:
  cert_file: {crt}
  key_file: {key}
  client_ca_file: {ca[0]}
  client_auth_type: RequireAndVerifyClientCert
  client_allowed_sans: [prom.example]
  min_version: TLS12
  max_version: TLS12
  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]
  prefer_server_cipher_suites: true
  curve_preferences: [CurveP256, X25519]
http_server_config:
  http2: true
  headers:
    Content-Security-Policy: default-src 'self'
    X-Frame-Options: deny
    X-Content-Type-Options: nosniff
    X-XSS-Protection: 1; mode=block
    Strict-Transport-Security: max-age=31536000
basic_auth_users:
  prom: {bcrypt_hash(b"secret")}
rate_limit:
  interval: 1s
  burst: 3
""")
    cfg = load_web_config(str(web))
    assert [w.split(":")[0] for w in cfg.warnings] == ["http_server_config.http2",
                                                       "curve_preferences"], cfg.warnings
    f = fake(web=cfg)
    url = f.url(scheme="https")
    auth = ("prom", "secret")
    resp = get(url, ctx=tls_client(good), auth=auth)  # 1 of the burst of 3
    assert resp.status == 200
    assert resp.headers["X-Frame-Options"] == "deny"
    assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert resp.headers["Content-Security-Policy"] == "default-src 'self'"
    with socket.create_connection(("127.0.0.1", f.port)) as raw, \
            tls_client(good).wrap_socket(raw) as s:
        assert s.version() == "TLSv1.2" and s.cipher()[0] == "ECDHE-RSA-AES128-GCM-SHA256"
    refused_in_tls(url, tls_client(good, ssl.TLSVersion.TLSv1_3), auth)  # above max_version
    refused_in_tls(url, tls_client(), auth)  # no client certificate
    refused_in_tls(url, tls_client(other), auth)  # a certificate without an allowed SAN
    assert f.server.refused_sans == 1
    with pytest.raises(urllib.error.HTTPError) as err:  # 2 of 3: basic auth still asked
        get(url, ctx=tls_client(good))
    assert err.value.code == 401
    get(url, ctx=tls_client(good), auth=auth)  # 3 of 3
    with pytest.raises(urllib.error.HTTPError) as err:  # over the burst, within 1 s
        get(url, ctx=tls_client(good), auth=auth)
    assert err.value.code == 429
    time.sleep(1.1)  # one token back
    assert get(url, ctx=tls_client(good), auth=auth).status == 200


@pytest.mark.parametrize("auth_type, client_gets_in", [
    ("RequestClientCert", True), ("RequireAnyClientCert", False),
    ("VerifyClientCertIfGiven", True), ("NoClientCert", True)])
def test_client_auth_types_without_a_certificate(fake, tmp_path, auth_type, client_gets_in):
    """Each of Go's five client auth types is taken; a client that sends no certificate
    gets in or not as Go would decide (RequireAndVerifyClientCert is above)."""
    from qtrace_bpf.exporters.webconfig import parse_web_config

    crt, key = make_cert(tmp_path)
    ca = make_cert(tmp_path, "ca", cn="clients-ca")
    tls = {"cert_file": str(crt), "key_file": str(key), "client_auth_type": auth_type}
    if auth_type != "NoClientCert":
        tls["client_ca_file"] = str(ca[0])
    cfg = parse_web_config({"tls_server_config": tls}, "test")
    f = fake(web=cfg)
    if client_gets_in:
        assert get(f.url(scheme="https"), ctx=tls_client()).status == 200
    else:
        refused_in_tls(f.url(scheme="https"), tls_client())


def test_inline_certificate_key_and_client_ca(fake, tmp_path):
    from qtrace_bpf.exporters.webconfig import parse_web_config

    crt, key = make_cert(tmp_path)
    ca = make_cert(tmp_path, "ca", cn="clients-ca")
    good = client_cert(tmp_path, ca, "prom", "DNS:prom.example")
    cfg = parse_web_config({"tls_server_config": {
        "cert": crt.read_text(), "key": key.read_text(), "client_ca": ca[0].read_text(),
        "client_auth_type": "RequireAndVerifyClientCert"}}, "test")
    f = fake(web=cfg)
    assert get(f.url(scheme="https"), ctx=tls_client(good)).status == 200
    refused_in_tls(f.url(scheme="https"), tls_client())
