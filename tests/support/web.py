"""A scrape as the tests read it, and the addresses and certificates they serve on."""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from support.caps import require


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return r.read().decode()


def scrape(url: str) -> dict[str, list]:
    """family name -> samples (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(http_get(url)):
        out[fam.name] = [(s.name, s.labels, s.value) for s in fam.samples]
    return out


def samples(metrics: dict, name: str, **labels: str) -> list[tuple[dict, float]]:
    fam = name.removesuffix("_total")
    for suffix in ("_bucket", "_count", "_sum"):  # a histogram's samples
        if fam not in metrics and fam.endswith(suffix):
            fam = fam.removesuffix(suffix)
    return [(lab, val) for n, lab, val in metrics.get(fam, [])
            if n == name and all(lab.get(k) == v for k, v in labels.items())]


def make_cert(tmp: Path, name: str = "srv", cn: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and ::1: (cert, key)."""
    require("openssl", shutil.which("openssl") is not None, "apt-get install openssl")
    key, crt = tmp / f"{name}.key", tmp / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={cn}", "-addext", "subjectAltName=IP:127.0.0.1,IP:::1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def vm_resets(m: dict, vm: str) -> dict[str, int]:
    return {lab["cause"]: int(v) for lab, v in samples(m, "qtrace_vm_resets_total", vm=vm) if v}


ACCEPT_OM = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
             "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")  # Prometheus'


def get(url: str, *, ctx: ssl.SSLContext | None = None, auth: tuple[str, str] | None = None,
        headers: dict | None = None, timeout: float = 10.0):
    req = urllib.request.Request(url, headers=headers or {})
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    return urllib.request.urlopen(req, context=ctx, timeout=timeout)  # noqa: S310
