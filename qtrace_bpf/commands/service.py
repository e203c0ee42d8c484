"""What the service manager and the operator talk to the daemon with: signals (stop,
rescan), sd_notify (READY, STATUS, the watchdog, STOPPING) and socket activation."""

from __future__ import annotations

import os
import socket
import time

from qtrace_bpf.errors import QtraceError


class Signals:
    """What signals asked for, as plain attributes.  A handler must not take a lock (an
    Event's): it runs in the main thread between two bytecodes, maybe while that thread
    holds the same lock, and would deadlock."""

    stop = False  # SIGTERM, SIGINT
    rescan = False  # SIGHUP: an operator asks for a /proc rescan now

    def install(self) -> None:
        import signal

        def on_stop(*_: object) -> None:
            self.stop = True

        def on_hup(*_: object) -> None:
            self.rescan = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGHUP, on_hup)


class Notifier:
    """sd_notify (Type=notify): READY, STATUS, the watchdog, STOPPING.  A no-op outside
    systemd, and never an error: a failed notification must not skip the shutdown path."""

    def __init__(self, log) -> None:
        import socket

        self.log = log
        addr = os.environ.get("NOTIFY_SOCKET", "")
        self.addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.interval = int(usec) / 2e6 if usec.isdigit() else 0.0
        self._kicked = 0.0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self.addr else None

    def send(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode(), self.addr)
        except OSError as exc:
            self.log("sd_notify failed", level="debug", message=message, error=exc)

    def watchdog(self) -> None:
        if self.interval and time.monotonic() - self._kicked >= self.interval:
            self._kicked = time.monotonic()
            self.send("WATCHDOG=1")


def systemd_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed (sd_listen_fds(3): fds 3.. when LISTEN_PID is
    this process), as node_exporter's --web.systemd-socket takes them."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or \
            not os.environ.get("LISTEN_FDS", "").isdigit():
        raise QtraceError("--web.systemd-socket: systemd passed no socket (LISTEN_FDS and "
                          "LISTEN_PID unset: start the daemon from a .socket unit, or "
                          "systemd-socket-activate -l ADDRESS)")
    count = int(os.environ["LISTEN_FDS"])
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for the loader or any other child
    socks = []
    for fd in range(3, 3 + count):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            raise QtraceError(f"--web.systemd-socket: fd {fd} is not a stream socket "
                              "(the .socket unit needs ListenStream=)")
        socks.append(sock)
    if not socks:
        raise QtraceError("--web.systemd-socket: systemd passed 0 sockets")
    return socks


def sock_address(sock: socket.socket) -> str:
    """HOST:PORT or [HOST]:PORT of a listening socket, as --web.listen-address spells it."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
