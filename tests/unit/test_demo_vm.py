"""The throwaway VM the demo and the tests drive (commands/demo_vm.py): its QMP connection.

qemu.qmp comes from PyPI (Debian 12 does not package it): the run on Debian's own Python
packages (scripts/test-debian-deps.sh) skips this file, saying so; the main run has it."""

from __future__ import annotations

import pytest

pytest.importorskip("qemu.qmp", reason="qemu.qmp is not installed (PyPI only: the "
                    "venv of scripts/setup.sh has it)")


def test_qmp_connect_retries_a_socket_bound_but_not_yet_listening(tmp_path):
    """QEMU binds its QMP socket before it listens; a test VM's start must not fail in between
    (12 daemon tests once errored at setup on that refusal)."""
    import json
    import socket
    import threading
    import time

    from qtrace_bpf.commands.demo_vm import connect_qmp

    path = str(tmp_path / "qmp.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    probe = socket.socket(socket.AF_UNIX)
    with pytest.raises(ConnectionRefusedError):  # the window this test is about
        probe.connect(path)
    probe.close()

    def serve_later() -> None:
        time.sleep(0.3)
        server.listen(1)
        conn, _ = server.accept()
        with conn:
            greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                            "package": ""}, "capabilities": []}}
            conn.sendall(json.dumps(greeting).encode() + b"\n")
            asked = b""
            while b"qmp_capabilities" not in asked:  # QMP messages end without a newline
                asked += conn.recv(4096) or b"qmp_capabilities (hung up)"
            conn.sendall(b'{"return": {}}\n')
            while conn.recv(4096):  # until the client hangs up
                pass

    thread = threading.Thread(target=serve_later, daemon=True)
    thread.start()
    qmp = connect_qmp(path, time.monotonic() + 10, lambda: True)
    qmp.close()
    thread.join(5)
    server.close()
