"""The Debian package under a real systemd: a Debian 12 container booted with
systemd-nspawn (PID 1 is systemd), the host's /dev/kvm and bpffs passed in.  Installed with
apt as an operator would; the unit, its user, its sandbox and its watchdog for real."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from support import ROOT
from support.caps import check_kvm, require
from support.processes import popen
from support.web import http_get, samples, scrape

from qtrace_bpf.commands.demo_vm import DemoQemu

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]
PORT = 10471  # the packaged config's
URL = f"http://127.0.0.1:{PORT}"


class Container:
    """systemd-nspawn --boot on a pristine copy (--volatile=overlay) of the cached root."""

    def __init__(self, root: str, dist: Path, log: Path):
        self.name = f"qtrace-test-{os.getpid()}"
        # QMP sockets, at the same path inside and out.  Never bind /tmp: the container's
        # systemd empties its /tmp at boot (tmpfiles), which would be the host's.
        self.shared = f"/run/qtrace-nspawn-{os.getpid()}"
        os.makedirs(self.shared, exist_ok=True)
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.log_path = log
        self.proc = popen(["systemd-nspawn", "-D", root, "--volatile=overlay", "--boot",
                           "--register=no", "--keep-unit", "--capability=all",
                           # nspawn's seccomp filter refuses bpf() and perf_event_open()
                           # to everything the container's systemd starts (EPERM, even as
                           # root; nsenter'd commands escape it): allow them
                           "--system-call-filter=bpf perf_event_open",
                           "--bind=/dev/kvm", "--bind=/sys/fs/bpf", f"--bind={self.shared}",
                           f"--bind-ro={dist}:/mnt/dist", "-M", self.name,
                           "--console=passive"], stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_booted()
        except BaseException:
            self.stop()  # never leave a half-booted container (and its BPF programs) behind
            raise

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + 60
        self.pid1 = 0
        while not self.pid1:  # nspawn's child, once it has become the container's systemd
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            try:
                child = int(kids.read_text().split()[0])
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    self.pid1 = child
                    break
            except (OSError, IndexError, ValueError):
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, self.console()
            time.sleep(0.1)
        while True:  # until systemd answers on its bus ("offline" before), then has booted
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=90)
            if state.stdout.strip() not in ("", "offline") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert state.stdout.strip() in ("running", "degraded"), (state, self.console())

    def console(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def run(self, *argv: str, check: bool = True, timeout: float = 180) \
            -> subprocess.CompletedProcess:
        done = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *argv],
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: {done.returncode}\n{done.stdout}\n"
                                 f"{done.stderr}")
        return done

    def journal(self) -> str:
        return self.run("journalctl", "-u", "qtrace", "--no-pager", "-o", "cat",
                        check=False).stdout[-4000:]

    def main_pid(self) -> int:
        return int(self.run("systemctl", "show", "-p", "MainPID", "--value", "qtrace")
                   .stdout.strip())

    def stop(self) -> None:
        if self.proc.poll() is None and not getattr(self, "pid1", 0):
            self.proc.terminate()  # no systemd to ask yet: nspawn stops the container
        elif self.proc.poll() is None:
            self.run("systemctl", "poweroff", check=False, timeout=30)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.shared, ignore_errors=True)


def host_pid(container: Container, pid: int) -> int:
    """The host pid of a process the container calls `pid`."""
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            text = Path(status).read_text()
        except OSError:
            continue
        ns = next((ln.split()[1:] for ln in text.splitlines() if ln.startswith("NSpid:")), [])
        if len(ns) == 2 and int(ns[1]) == pid:
            return int(ns[0])
    raise AssertionError(f"no host process is {pid} in the container")


def resets(vm: str) -> dict[str, int]:
    return {lab["cause"]: int(v) for lab, v in
            samples(scrape(f"{URL}/metrics"), "qtrace_vm_resets_total", vm=vm) if v}


def wait(what, timeout: float = 30.0, why=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = what()
        except OSError:
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, why()
        time.sleep(0.3)


@pytest.fixture(scope="module")
def container(tmp_path_factory, built_deb):
    check_kvm()
    require("systemd-nspawn", subprocess.run(["which", "systemd-nspawn"]).returncode == 0,
            "apt-get install systemd-container")
    with __import__("socket").socket() as s:
        free = s.connect_ex(("127.0.0.1", PORT)) != 0
    require(f"port {PORT} free (the packaged config's)", free, "stop what listens there")
    root = subprocess.run(["bash", "scripts/nspawn-root.sh"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    assert root.returncode == 0, root.stderr
    # the packaged pin root is the host's /sys/fs/bpf/qtrace: a previous run's stays there
    # if it was killed (nothing else uses it on a test machine)
    shutil.rmtree("/sys/fs/bpf/qtrace", ignore_errors=True)
    tmp = tmp_path_factory.mktemp("nspawn")
    c = Container(root.stdout.strip().splitlines()[-1], ROOT / "dist", tmp / "console.log")
    try:
        # BCC compiles against the running kernel's headers (as scripts/setup.sh links them)
        rel = os.uname().release
        c.run("sh", "-c", f"h=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n1) && "
                          f"mkdir -p /lib/modules/{rel} && ln -sfn $h /lib/modules/{rel}/build "
                          f"&& ln -sfn ${{h%-amd64}}-common /lib/modules/{rel}/source")
        yield c
    finally:
        c.stop()


def test_apt_install_starts_a_non_root_daemon_that_counts_a_vm(container):
    c = container
    name = os.path.basename(deb_path())
    install = c.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
                    f"/mnt/dist/{name}", timeout=300)
    assert c.run("systemctl", "is-active", "qtrace", check=False).stdout.strip() == "active", \
        install.stdout[-2000:] + c.journal()
    # Type=notify: active only after READY=1, which comes once ready
    assert http_get(f"{URL}/-/ready").startswith("ok: kernel hook"), c.journal()
    pid = c.main_pid()
    status = c.run("cat", f"/proc/{pid}/status").stdout
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M)[1])
    assert c.run("id", "-u", "qtrace").stdout.strip() == str(uid) and uid != 0
    caps = int(re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.M)[1], 16)
    cap_bpf, cap_perfmon, cap_sys_admin = 39, 38, 21
    assert caps & (1 << cap_bpf) and caps & (1 << cap_perfmon), hex(caps)
    assert not caps & (1 << cap_sys_admin), hex(caps)
    assert "msg=tracing" in c.journal()
    docs = c.run("systemctl", "show", "-p", "Documentation", "--value", "qtrace").stdout \
        .replace('"', "").split()
    assert docs, "the unit has Documentation="
    for doc in docs:  # each resolves to an installed page or file
        if doc.startswith("file://"):
            c.run("test", "-s", doc.removeprefix("file://"))
            continue
        page, section = re.fullmatch(r"man:([\w.-]+)\((\d)\)", doc).groups()
        c.run("test", "-s", f"/usr/share/man/man{section}/{page}.{section}.gz")
    with DemoQemu("in-container", wrapper=["nsenter", "-t", str(c.pid1), "-a"],
                  tmp_root=c.shared) as vm:
        vm.cmd("cont")
        time.sleep(0.3)
        vm.cmd("system_reset")
        time.sleep(1)
        want = Counter(e["data"]["reason"] for e in vm.collect_events()
                       if e["event"] == "RESET")
        want.pop("none", None)
        wait(lambda: resets("in-container") == dict(want), why=lambda: (
            resets("in-container"), dict(want), c.journal()))
        info = samples(scrape(f"{URL}/metrics"), "qtrace_vm_info", vm="in-container")
        in_ns = next(int(ln.split()[-1]) for ln in
                     Path(f"/proc/{vm.pid}/status").read_text().splitlines()
                     if ln.startswith("NSpid:"))
        assert info and info[0][0]["pid"] == str(in_ns), (info, in_ns, vm.pid)

        # a restart keeps the counts (pins), and the program need not be compiled again
        c.run("systemctl", "restart", "qtrace")
        assert resets("in-container") == dict(want)
        full = c.run("journalctl", "-u", "qtrace", "--no-pager", "-o", "cat").stdout
        assert "program=reused" in full, full[-3000:]
        after = full.split("program=reused")[-1]  # the restarted daemon adopts every link
        assert "links_replaced=0" in after.splitlines()[0] and "differs" not in after, after
        vm.cmd("system_reset")
        wait(lambda: resets("in-container").get("host-qmp-system-reset", 0) ==
             want["host-qmp-system-reset"] + 1, why=c.journal)

        # the watchdog restarts a stopped daemon
        c.run("mkdir", "-p", "/run/systemd/system/qtrace.service.d")
        c.run("sh", "-c", "printf '[Service]\\nWatchdogSec=3s\\n' > "
                          "/run/systemd/system/qtrace.service.d/watchdog.conf")
        c.run("systemctl", "daemon-reload")
        c.run("systemctl", "restart", "qtrace")
        stopped = c.main_pid()
        os.kill(host_pid(c, stopped), signal.SIGSTOP)
        wait(lambda: c.main_pid() not in (0, stopped) and
             c.run("systemctl", "is-active", "qtrace", check=False).stdout.strip() == "active",
             timeout=60, why=c.journal)
        assert "Watchdog timeout" in c.run("journalctl", "--no-pager", "-u", "qtrace",
                                           check=False).stdout
        c.run("rm", "-r", "/run/systemd/system/qtrace.service.d")
        c.run("systemctl", "daemon-reload")


def test_the_unit_is_sandboxed(container):
    out = container.run("systemd-analyze", "security", "--no-pager", "qtrace.service",
                        check=False).stdout
    level = float(re.search(r"Overall exposure level for qtrace.service: ([0-9.]+)", out)[1])
    assert level <= 3.0, out[-3000:]


def test_a_start_that_cannot_succeed_stops_after_the_burst(container):
    """StartLimitBurst: a config that cannot load is tried 5 times, then the unit stays
    failed, with the reason in `systemctl status` (not a restart every 5 s forever)."""
    c = container
    conf = "/etc/qtrace/qtrace.toml"
    c.run("cp", conf, f"{conf}.saved")
    try:
        c.run("sh", "-c", f"echo 'bogus_key = 1' >> {conf}")
        c.run("systemctl", "restart", "--no-block", "qtrace")

        def journal() -> str:
            return c.run("journalctl", "-u", "qtrace", "--no-pager", "-o", "cat",
                         check=False).stdout

        # systemd 252 keeps Result=exit-code; the start limit says itself in the journal
        wait(lambda: "Start request repeated too quickly" in journal(), timeout=150,
             why=lambda: journal()[-3000:])
        status = c.run("systemctl", "status", "--no-pager", "-n", "30", "qtrace",
                       check=False).stdout
        assert "unknown key 'bogus_key'" in status, status
        assert c.run("systemctl", "is-active", "qtrace", check=False).stdout.strip() == "failed"
        starts = journal().count("unknown key 'bogus_key'")
        assert starts == 5, starts  # the burst, each failed start saying why
        time.sleep(12)  # RestartSec=5s: nothing more is tried
        assert journal().count("unknown key 'bogus_key'") == 5
    finally:
        c.run("mv", f"{conf}.saved", conf)
        c.run("systemctl", "reset-failed", "qtrace")
        c.run("systemctl", "start", "qtrace")


def test_apt_purge_removes_what_it_made_and_keeps_the_admins(container):
    """Debian practice: purge takes the package's files and its cache, never an
    administrator's keys in /etc/qtrace; the system user stays (as node_exporter's does)."""
    c = container
    c.run("sh", "-c", "umask 077; echo 'admin key' > /etc/qtrace/tls.key")
    c.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y", "qtrace",
          timeout=300)
    assert not os.path.exists("/sys/fs/bpf/qtrace") or not os.listdir("/sys/fs/bpf/qtrace")
    assert c.run("id", "qtrace", check=False).returncode == 0, "the system user is kept"
    assert c.run("cat", "/etc/qtrace/tls.key").stdout == "admin key\n"
    for made in ("/etc/qtrace/qtrace.toml", "/var/cache/qtrace", "/usr/bin/qprobe"):
        assert c.run("test", "-e", made, check=False).returncode != 0, made
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                      text=True).stdout or "[]")
    assert not [p for p in progs if p.get("name", "").startswith(("qt_", "tp_sched", "tp_"))
                and "qtrace" in json.dumps(p)], progs


def deb_path() -> str:
    found = sorted(glob.glob(str(ROOT / "dist" / "qtrace_*_all.deb")))
    assert found, "scripts/build-deb.sh made no package"
    return found[-1]

