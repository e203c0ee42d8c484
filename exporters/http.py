"""/metrics over HTTP(S) with optional basic auth (bcrypt hashes, as in Prometheus'
web-config file): prometheus_client serves TLS itself but has no server-side auth."""

from __future__ import annotations

import base64
import ssl
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass


def _basic_auth(app: Callable, users: dict[str, str]) -> Callable:
    import bcrypt  # only needed when users are configured

    hashes = {u: h.encode() for u, h in users.items()}

    def wrapped(environ: dict, start_response: Callable) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION", "")
        if header.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            h = hashes.get(user)
            if h is not None and bcrypt.checkpw(password.encode(), h):
                return app(environ, start_response)
        start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="qtrace"'),
                                            ("Content-Type", "text/plain")])
        return [b"Unauthorized\n"]

    return wrapped


def serve(registry: CollectorRegistry, host: str, port: int, *, certfile: str = "",
          keyfile: str = "", client_cafile: str = "", users: dict[str, str] | None = None):
    """Start serving in a daemon thread; returns the server (call .shutdown() to stop)."""
    app = make_wsgi_app(registry)
    if users:
        app = _basic_auth(app, users)
    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    if certfile:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(certfile, keyfile)
        if client_cafile:
            ctx.load_verify_locations(client_cafile)
            ctx.verify_mode = ssl.CERT_REQUIRED
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="qtrace-http", daemon=True)
    thread.start()
    return server
