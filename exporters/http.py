"""/metrics over HTTP(S), so that no client can hold the daemon.

One asyncio loop (its own thread) owns every connection: accepting, the TLS handshake and
reading a request happen there, each under a timeout, so an idle or slow client costs a
socket and a few kilobytes, never a thread.  Rendering runs in a small thread pool, and
scrapes that arrive together share one render (exposition.SharedRender).  Standard library
only: asyncio gives per-connection timeouts, TLS off the accepting path (StreamWriter.
start_tls) and IPv4/IPv6 listening without a dependency; the routes are three.

    server = Server(app, [("::", 10471)], web=WebConfig(...))
    server.start()      # listening when it returns (OSError otherwise)
    server.shutdown()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import socket
import ssl
import threading
from dataclasses import dataclass

from qtrace_bpf.errors import RESOURCE_ERRNOS
from qtrace_bpf.log import Log, null_log
from qtrace_bpf.logfmt import RateLimited

from .auth import AuthGate, Throttle, TokenBucket
from .basic_auth import BasicAuth
from .routes import App, Response, make_app  # noqa: F401  (make_app: for callers)
from .tls import TlsContext, san_allowed
from .webconfig import WebConfig

MAX_HEADER = 16 * 1024


@dataclass
class Limits:
    max_connections: int = 1024  # at the limit the longest-idle connection makes room
    workers: int = 4  # render threads
    read_timeout: float = 10.0  # TLS handshake, and a request's head, must arrive within
    idle_timeout: float = 30.0  # an idle keep-alive connection is closed after
    backlog: int = 256
    auth_workers: int = 1  # bcrypt threads: apart from the render threads
    auth_queue: int = 8  # bcrypt checks waiting at most; more are answered 429 at once
    auth_failures: int = 5  # bad passwords from one address per window, then 429
    auth_window: float = 60.0


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 429: "Too Many Requests",
            431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


class Server:
    def __init__(self, app: App, addresses: list[tuple[str, int]], *,
                 web: WebConfig | None = None, limits: Limits | None = None,
                 log: Log | None = None,
                 sockets: list[socket.socket] | None = None):
        self.app = app
        self.addresses = addresses
        self.sockets = sockets or []  # already listening (systemd socket activation)
        self.web = web or WebConfig()
        self.limits = limits or Limits()
        self.log = log or null_log
        self.tls = TlsContext(self.web, self.log) if self.web.tls else None
        self.auth = AuthGate(BasicAuth(self.web.users), self.limits.auth_workers,
                             self.limits.auth_queue,
                             Throttle(self.limits.auth_failures, self.limits.auth_window))
        self.pool = concurrent.futures.ThreadPoolExecutor(self.limits.workers,
                                                          thread_name_prefix="qtrace-render")
        self.active = 0
        self._idle: dict[asyncio.StreamWriter, float] = {}  # connection -> idle since
        self._handlers: set[asyncio.Task] = set()  # one per open connection
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = False
        self.refused = 0  # connections closed at once: max_connections open, none idle
        self.refused_sans = 0  # TLS clients whose certificate has none of client_allowed_sans
        self.rate = TokenBucket(self.web.rate_interval, self.web.rate_burst)
        self.evicted = 0  # idle connections closed to make room for a new one
        self.timeouts = 0  # handshakes / requests that did not arrive in time
        # out of fds/memory (EMFILE at accept, ...): counted by errno name and logged at
        # most once a minute per kind, never a traceback per accept
        self.resource_errors: dict[str, int] = {}
        self.log_limited = RateLimited(self.log)
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_error)
        self._servers: list[asyncio.base_events.Server] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="qtrace-http",
                                        daemon=True)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        fut.result(30)  # OSError (address in use, no IPv6...) reaches the caller

    async def _listen(self) -> None:
        # TLS is started per connection in _serve (the current certificates: rotation
        # without a restart), so a handshake holds one of max_connections like a request
        listening = list(self.sockets)
        for host, port in self.addresses:
            sock = _bind(host, port)
            sock.listen(self.limits.backlog)
            listening.append(sock)
        for sock in listening:
            server = await asyncio.start_server(self._handle, sock=sock, limit=MAX_HEADER)
            self._servers.append(server)

    @property
    def ports(self) -> list[int]:
        return [s.sockets[0].getsockname()[1] for s in self._servers]

    def shutdown(self) -> None:
        async def close() -> None:
            """End every connection while the loop still runs (a keep-alive scraper's
            handler left pending would die at garbage collection, with a traceback).
            Aborting the socket ends a handler through its own error path; cancelling a
            task waiting in wait_for() can hang on Python 3.11."""
            self._closing = True
            for server in self._servers:
                server.close()
            for _ in range(100):  # a connection accepted just before close() starts late
                for writer in list(self._writers):
                    writer.transport.abort()
                if not self._handlers:
                    break
                await asyncio.wait(list(self._handlers), timeout=0.05)

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.auth.pool.shutdown(wait=False, cancel_futures=True)

    def _loop_error(self, _loop, context: dict) -> None:
        """asyncio's report of an error no task awaited (e.g. its accept loop hitting
        EMFILE, after which it pauses accepting for a second): counted, rate-limited."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            self.resource_errors[name] = self.resource_errors.get(name, 0) + 1
            self.log_limited(f"http_{name}", "HTTP server out of resources: connections "
                             "wait in the listen backlog", error=exc.strerror)
            return
        self.log_limited("http_loop", "HTTP event loop error", level="error",
                         error=f"{context.get('message')}: {exc!r}" if exc else
                         context.get("message"))

    # -- connections ---------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        self._writers.add(writer)
        try:
            if self._closing:
                writer.transport.abort()
                return
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(me)
            self._writers.discard(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.limits.max_connections and not self._evict_idle():
            self.refused += 1
            writer.transport.abort()
            return
        self.active += 1
        try:
            if self.tls is not None:  # a stalled handshake is idle: the first to make room
                self._idle[writer] = self._loop.time()
                await writer.start_tls(self.tls.get(),
                                       ssl_handshake_timeout=self.limits.read_timeout)
                if not san_allowed(writer.get_extra_info("peercert"),
                                   self.web.client_allowed_sans):
                    self.refused_sans += 1
                    return  # as exporter-toolkit: the connection ends, no answer
            timeout = self.limits.read_timeout
            while True:
                self._idle[writer] = self._loop.time()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                self._idle.pop(writer, None)
                if not await self._answer(head, writer):
                    break
                timeout = self.limits.idle_timeout  # waiting for the next request
        except TimeoutError:
            self.timeouts += 1
        except asyncio.LimitOverrunError:
            await self._send(writer, Response(431, b"request head too large\n"), False)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            self._idle.pop(writer, None)
            self.active -= 1
            writer.close()

    def _evict_idle(self) -> bool:
        """At the limit, the connection idle the longest makes room (a scraper's request
        beats a connection that sends nothing)."""
        if not self._idle:
            return False
        oldest = min(self._idle, key=self._idle.__getitem__)
        self._idle.pop(oldest)
        oldest.transport.abort()
        self.evicted += 1
        return True

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True to keep the connection open."""
        try:
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ")
        except ValueError:
            await self._send(writer, Response(400, b"bad request\n"), False)
            return False
        headers: dict[str, str] = {}
        for line in lines:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if "content-length" in headers or "transfer-encoding" in headers:
            keep = False  # no request bodies here: do not try to find the next request
        if method not in ("GET", "HEAD"):
            await self._send(writer, Response(405, b"GET only\n", headers=(("Allow", "GET"),)),
                             False)
            return False
        if not self.rate.allow(self._loop.time()):
            await self._send(writer, Response(429, b"Too Many Requests\n"), keep, method)
            return keep
        if self.auth.enabled:
            peer = writer.get_extra_info("peername")
            ok = await self.auth.check(self._loop, headers.get("authorization"),
                                       str(peer[0]) if peer else "?")
            if ok is None:
                await self._send(writer, Response(429, b"too many failed logins\n", headers=(
                    ("Retry-After", str(int(self.limits.auth_window))),)), False, method)
                return False
            if not ok:
                await self._send(writer, Response(401, b"Unauthorized\n", headers=(
                    ("WWW-Authenticate", 'Basic realm="qtrace"'),)), keep, method)
                return keep
        path = target.split("?", 1)[0]
        resp = await self._loop.run_in_executor(self.pool, self.app, method, path, headers)
        await self._send(writer, resp, keep, method)
        return keep

    async def _send(self, writer: asyncio.StreamWriter, resp: Response, keep: bool,
                    method: str = "GET") -> None:
        lines = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'OK')}",
                 f"Content-Type: {resp.content_type}", f"Content-Length: {len(resp.body)}",
                 f"Connection: {'keep-alive' if keep else 'close'}"]
        lines += [f"{k}: {v}" for k, v in (*resp.headers, *self.web.headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if method != "HEAD":
            writer.write(resp.body)
        await asyncio.wait_for(writer.drain(), self.limits.read_timeout)


def _bind(host: str, port: int) -> socket.socket:
    """IPv4, IPv6, or both for '::' (as node_exporter's ':port' listens)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
