"""Stripped binaries resolved through a real debuginfod server (Debian's `debuginfod`).

The server indexes a debug file the tests build with gcc/objcopy; `qprobe symbols` on the
stripped binary must fetch it by build-id, verify it, cache it, and work offline after.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from support import QPROBE, ROOT
from support.caps import require
from support.elf_fixtures import build_id, run
from support.processes import popen
from support.web import free_port


class Server:
    """debuginfod -F over one directory, on a free port, ready once it serves `bid`."""

    def __init__(self, tmp: Path, serve: Path, bid: str | None):
        exe = shutil.which("debuginfod")
        require("debuginfod", exe is not None, "apt-get install debuginfod")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = popen([exe, "-F", "-d", str(tmp / "db.sqlite"), "-p", str(self.port),
                           "-t", "1", str(serve)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        probe = f"{self.url}/buildid/{bid}/debuginfo" if bid else f"{self.url}/metrics"
        while True:
            try:
                with urllib.request.urlopen(probe, timeout=2):
                    break
            except urllib.error.HTTPError:
                pass  # up, not indexed yet
            except OSError:
                assert self.proc.poll() is None, "debuginfod exited"
            assert time.monotonic() < deadline, f"debuginfod did not serve {probe}"
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def symbols(binary: Path, urls: str, cache: Path) -> dict:
    env = {**os.environ, "DEBUGINFOD_URLS": urls, "QTRACE_DEBUGINFO_CACHE": str(cache),
           "QTRACE_DEBUGINFOD_ALLOW_HTTP": "1"}  # a loopback server: plain http allowed
    out = subprocess.run([*QPROBE, "symbols", str(binary), "--json",
                          "--debug-root", "/nonexistent-debug-root"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_fetched_verified_cached_and_used_offline(fixtures, tmp_path):
    fx = fixtures["bare"]  # stripped: no .symtab, no debuglink, no local debug file
    bid = build_id(fx.full)
    serve = tmp_path / "serve"
    serve.mkdir()
    run("objcopy", "--only-keep-debug", fx.full, serve / "app.debug")  # what -dbgsym ships
    server = Server(tmp_path, serve, bid)
    cache = tmp_path / "cache"
    try:
        report = symbols(fx.path, server.url, cache)
    finally:
        server.stop()
    cached = cache / ".build-id" / bid[:2] / f"{bid[2:]}.debug"
    assert cached.is_file() and build_id(cached) == bid
    assert report["sources"][-1] == f"debuginfod:{cached}"
    assert report["dwarf"] is True
    # Debian-style static catalog functions need exactly this: the symbol of a static
    # function, from the fetched file (here: the fixture's lifecycle_step)
    from qtrace_bpf.symbols import elfsym

    res = elfsym.resolve(str(fx.path), ["lifecycle_step"],
                         debug_roots=("/nonexistent-debug-root",),
                         debuginfod=elfsym.Debuginfod(urls=(server.url,), cache=str(cache),
                                                                       allow_http=True))
    assert res.found["lifecycle_step"][0].source == f"build-id:{cached}"  # offline, cached
    # with the server gone, the CLI still resolves from the cache
    offline = symbols(fx.path, server.url, cache)
    assert offline["sources"][-1] == f"build-id:{cached}"


def test_unknown_build_id_says_why(fixtures, tmp_path):
    fx = fixtures["bare"]
    serve = tmp_path / "serve"
    serve.mkdir()
    server = Server(tmp_path, serve, None)
    try:
        report = symbols(fx.path, server.url, tmp_path / "cache")
    finally:
        server.stop()
    assert f"debuginfod {server.url}: 404" in report["notes"]
    assert not (tmp_path / "cache" / ".build-id").exists() or \
        not any((tmp_path / "cache" / ".build-id").rglob("*.debug"))


def test_a_wrong_file_from_a_server_is_rejected(fixtures, tmp_path):
    """A server that answers with another build's debug file (or garbage) is not trusted."""
    fx = fixtures["bare"]
    wrong = (fixtures["wrong-buildid"].debug_root.rglob("*.debug").__next__()).read_bytes()
    answers = iter([wrong, b"not an ELF at all"])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = next(answers, b"")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        for expected in ("is not the one asked for", "not an ELF file"):
            report = symbols(fx.path, url, tmp_path / "cache")
            assert expected in report["notes"], report["notes"]
            assert not list((tmp_path / "cache").rglob("*.debug"))
            assert not list((tmp_path / "cache").rglob(".fetch-*"))
    finally:
        httpd.shutdown()
