"""The exporter's routes: a landing page, the metrics (at the telemetry path),
/-/healthy (liveness) and /-/ready (readiness)."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


# App: (method, path, headers) -> Response; runs in a worker thread.
App = Callable[[str, str, dict[str, str]], Response]


LANDING = """<!DOCTYPE html>
<html><head><title>qtrace</title></head><body>
<h1>qtrace</h1>
<p>When, on which vCPU and in which lifecycle phase QEMU writes vCPU state into KVM.</p>
<ul><li><a href="{link}">{path}</a></li><li><a href="-/healthy">/-/healthy</a> (alive)</li>
<li><a href="-/ready">/-/ready</a> (tracing)</li></ul>
<p>{version}</p>
</body></html>
"""


def make_app(metrics: Callable[[str, bool], bytes],
             health: Callable[[], tuple[bool, str]],
             ready: Callable[[], tuple[bool, str]] | None = None,
             telemetry_path: str = "/metrics", version: str = "") -> App:
    """The routes: / (landing page), the metrics (telemetry_path), /-/healthy (liveness)
    and /-/ready (readiness), each 200 or 503 and why; Prometheus' own split."""
    checks = {"/-/healthy": health, "/-/ready": ready or health}
    from .exposition import choose_format

    landing = LANDING.format(path=html.escape(telemetry_path),
                             link=html.escape(telemetry_path.lstrip("/")),
                             version=html.escape(version)).encode()

    def app(method: str, path: str, headers: dict[str, str]) -> Response:
        if path == telemetry_path:
            fmt = choose_format(headers.get("accept"))
            gz = "gzip" in headers.get("accept-encoding", "")
            extra = (("Content-Encoding", "gzip"),) if gz else ()
            return Response(200, metrics(fmt, gz), fmt, (*extra, ("Vary", "Accept-Encoding")))
        if path in checks:
            ok, why = checks[path]()
            return Response(200 if ok else 503, why.encode() + b"\n")
        if path == "/":
            return Response(200, landing, "text/html; charset=utf-8")
        return Response(404, f"not found: try {telemetry_path}\n".encode())

    return app
