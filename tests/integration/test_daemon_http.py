"""The daemon's HTTP side with the BPF program behind it: answering from the first second,
a file-descriptor limit too low to load named, 1,000 idle connections beside 20 scrapers."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support import QPROBE, ROOT
from support.caps import check_bpf
from support.qprobe import DaemonProcess, daemon_toml
from support.web import ACCEPT_OM, free_port, get

from qtrace_bpf import revision

pytestmark = [pytest.mark.bpf]


def test_low_fd_limit_is_named(tmp_path):
    check_bpf()
    cfg = tmp_path / "q.toml"
    cfg.write_text(daemon_toml(free_port()))
    r = subprocess.run(["prlimit", "--nofile=24", *QPROBE, "daemon", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "file-descriptor limit too low" in r.stderr, r.stderr
    assert "does not compile" not in r.stderr.split("(")[0]


def live_daemon(tmp: Path, config: str = "") -> DaemonProcess:
    """A daemon not waited for: what it serves from its first second is the test."""
    check_bpf()
    port = free_port()
    cfg = tmp / f"d{port}.toml"
    cfg.write_text(daemon_toml(port) + config)
    return DaemonProcess(cfg, port, wait=False)


def status(url: str) -> tuple[int, str]:
    try:
        with get(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_answer_from_the_first_second(tmp_path):
    """Served before the BPF program is even loaded: the self-metrics say what is going on;
    alive (/-/healthy 200) but not ready (/-/ready 503, and why) while it loads."""
    d = live_daemon(tmp_path)
    try:
        early = None
        deadline = time.monotonic() + 30
        while early is None and not d.tracing.is_set():
            try:
                early = get(f"http://127.0.0.1:{d.port}/metrics", timeout=2).read().decode()
                alive = status(f"http://127.0.0.1:{d.port}/-/healthy")
                ready = status(f"http://127.0.0.1:{d.port}/-/ready")
            except OSError:
                assert time.monotonic() < deadline, "".join(d.log)
                time.sleep(0.02)
        assert early is not None, "nothing served before tracing started"
        assert "qtrace_ready 0" in early and "qtrace_startup_info{stage=" in early, early
        assert alive[0] == 200 and alive[1].startswith("alive: "), alive
        assert ready[0] == 503 and ready[1].startswith("not ready: "), ready
        assert d.tracing.wait(60), "".join(d.log)
        late = get(f"http://127.0.0.1:{d.port}/metrics").read().decode()
        assert "qtrace_ready 1" in late and "process_resident_memory_bytes" in late
        assert "qtrace_build_info{" in late and f'revision="{revision()}"' in late
        assert status(f"http://127.0.0.1:{d.port}/-/healthy") == (200, "alive: tracing\n")
        ready = status(f"http://127.0.0.1:{d.port}/-/ready")
        assert ready[0] == 200 and ready[1].startswith("ok: kernel hook"), ready
    finally:
        assert d.stop() == 0, "".join(d.log)


def test_a_thousand_idle_connections_and_twenty_scrapers(tmp_path):
    """1,000 idle connections held open, 20 scrapers for 60 s: no failed scrape."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    d = live_daemon(tmp_path, config="max_connections = 2048\n")
    idle: list[socket.socket] = []
    try:
        assert d.tracing.wait(60), "".join(d.log)
        url = f"http://127.0.0.1:{d.port}/metrics"
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", d.port)))
        failures, times = [], []
        stop = time.monotonic() + 60

        def scraper() -> None:
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    body = get(url, headers={"Accept": ACCEPT_OM}).read()
                    assert body.endswith(b"# EOF\n")
                    times.append(time.perf_counter() - started)
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(repr(exc))
                time.sleep(0.05)

        threads = [threading.Thread(target=scraper) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        times.sort()
        p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
        print(f"\n{len(times)} scrapes, 1000 idle connections: p50 {p50 * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms")
        assert failures == [], failures[:5]
        assert d.proc.poll() is None
    finally:
        for s in idle:
            s.close()
        assert d.stop() == 0, "".join(d.log)
