"""`qprobe daemon`: every QEMU on the host, from exec to exit, counted in BPF maps.

Uprobes go on the host's QEMU binaries at start (before any VM exists); the kernel starts
tracking a new QEMU at its exec (or its KVM_CREATE_VM), so its boot is counted from the
first state write; user space only learns names for labels.  A periodic rescan is the
safety net.  Series of a VM that quit are dropped after a grace period.
"""

from __future__ import annotations

import ctypes as ct
import glob
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

from . import elfsym, targets
from .catalog import load_catalog
from .config import Config
from .errors import QtraceError
from .events import K_EXEC, K_EXIT, RawEvent
from .session import BinaryPlan, Session

log = logging.getLogger("qtrace")


@dataclass
class VmRecord:
    pid: int
    name: str  # the `vm` label (sanitised, unique among live VMs)
    uuid: str
    exe: str
    qemu_version: str
    build_id: str
    binary: str
    discovered: str  # "exec" | "scan"
    exited_at: float | None = None


def _starts_with_elf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return True  # let the resolver report why it cannot be read


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.catalog = load_catalog()
        self.names = [fn for p in self.catalog.probes for fn in p.functions]
        self._pending: deque[bytes] = deque()
        self.lock = threading.RLock()
        self.vms: dict[int, VmRecord] = {}
        self.refused = 0
        self.gaps = 0
        self.binary_errors: dict[str, str] = {}
        self.session = Session(self.catalog, hook=None if cfg.kernel_hook == "auto"
                               else cfg.kernel_hook, log=log.info,
                               ringbuf_cb=self._pending.append, discovery=True)
        self._last_scan = 0.0

    # -- binaries -----------------------------------------------------------------

    def attach_binary(self, path: str, display: str | None = None) -> BinaryPlan | None:
        """Resolve and attach one QEMU binary (once per build-id); errors are per binary."""
        shown = display or path
        try:
            res = elfsym.resolve_cached(path, self.names, debug_roots=self.cfg.debug_roots,
                                        display=shown, inline_names=self.names)
        except QtraceError as exc:
            self.binary_errors[shown] = str(exc)
            log.warning("binary=%s cannot resolve: %s", shown, exc)
            return None
        key = res.build_id or shown
        if key in self.session.binaries:
            return self.session.binaries[key]
        plan = self.session.add_binary(key, path, res)
        log.info("binary=%s build_id=%s qemu=%s probes_attached=%d probes_missing=%d", shown,
                 res.build_id, res.qemu_version, len(plan.attached) - len(plan.missing),
                 len(plan.missing))
        for a in plan.missing:
            log.info("binary=%s probe=%s missing: %s", shown, a.probe.event, a.reason)
        return plan

    def attach_host_binaries(self) -> None:
        for pattern in self.cfg.qemu_binaries:
            for path in sorted(glob.glob(pattern)):
                if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                    continue
                if not _starts_with_elf_magic(path):
                    # e.g. Debian's qemu-system-i386 is a shell wrapper (xen redirect)
                    log.debug("binary=%s skipped: not an ELF file (a wrapper script?)", path)
                    continue
                self.attach_binary(os.path.realpath(path), path)

    # -- VMs ----------------------------------------------------------------------

    def _unique_name(self, name: str, pid: int) -> str:
        live = {v.name for v in self.vms.values() if v.pid != pid}
        return name if name not in live else f"{name}~{pid}"[-targets.VM_NAME_MAX:]

    def adopt(self, pid: int, discovered: str) -> VmRecord | None:
        """Start labelling (and, for a scan, tracking) one QEMU process."""
        with self.lock:
            old = self.vms.get(pid)
            if old is not None and old.exited_at is None:
                return old
            if old is not None:  # pid reused within the grace period
                self.session.forget(pid)
                del self.vms[pid]
            try:
                t = targets.open_target(pid)
            except QtraceError as exc:
                self.session.forget(pid)
                log.debug("pid=%d not adopted: %s", pid, exc)
                return None
            live = sum(1 for v in self.vms.values() if v.exited_at is None)
            if live >= self.cfg.max_vms:
                self.session.forget(pid)  # and what it counted since exec
                self.refused += 1
                log.warning("pid=%d vm=%s refused: max_vms=%d reached", pid, t.name,
                            self.cfg.max_vms)
                return None
            display = t.exe.removesuffix(" (deleted)")
            attached_before = set(self.session.binaries)
            plan = self.attach_binary(t.exe_path, display)
            if plan is None:
                self.session.forget(pid)
                return None
            fds = targets.vcpu_fds(pid)
            if discovered == "scan" or not self.session.is_tracked_in_kernel(pid):
                # Found after its start: counting began late (daemon restart, missed exec).
                self.session.track(pid, boot_done=bool(fds), vcpu_fds=fds)
                self.gaps += 1
            elif plan.key not in attached_before and fds:
                # Its binary was attached only now: the boot windows were not observed.
                self.session.track(pid, boot_done=True, vcpu_fds=fds)
            res = plan.resolution
            vm = VmRecord(pid, self._unique_name(t.name, pid), t.uuid, display,
                          res.qemu_version or "", res.build_id or "", plan.path, discovered)
            self.vms[pid] = vm
            log.info("vm=%s pid=%d uuid=%s discovered=%s tracking", vm.name, pid, vm.uuid or "-",
                     discovered)
            return vm

    def exited(self, pid: int) -> None:
        with self.lock:
            vm = self.vms.get(pid)
            if vm is not None and vm.exited_at is None:
                vm.exited_at = time.monotonic()
                log.info("vm=%s pid=%d exited; series kept for %ss", vm.name, pid,
                         self.cfg.grace_period)
            self.session.untrack(pid)

    def expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            for pid, vm in list(self.vms.items()):
                if vm.exited_at is not None and now - vm.exited_at >= self.cfg.grace_period:
                    self.session.forget(pid)
                    del self.vms[pid]
                    log.info("vm=%s pid=%d forgotten", vm.name, pid)

    def rescan(self) -> None:
        self._last_scan = time.monotonic()
        running = set(targets.find_qemus())
        with self.lock:
            for pid, vm in self.vms.items():
                if vm.exited_at is None and pid not in running:
                    self.exited(pid)  # an exit we did not see
            for pid in sorted(running):
                vm = self.vms.get(pid)
                if vm is None or vm.exited_at is not None:
                    self.adopt(pid, "scan")

    # -- loop ---------------------------------------------------------------------

    def _handle(self, data: bytes) -> None:
        raw = RawEvent.from_buffer_copy(data[: ct.sizeof(RawEvent)])
        if raw.kind == K_EXEC:
            self.adopt(raw.tgid, "exec")
        elif raw.kind == K_EXIT:
            self.exited(raw.tgid)

    def start(self) -> None:
        self.attach_host_binaries()
        self.rescan()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.session.poll(200)
            while self._pending:
                self._handle(self._pending.popleft())
            now = time.monotonic()
            if now - self._last_scan >= self.cfg.rescan_interval:
                self.rescan()
            self.expire()

    def close(self) -> None:
        self.session.close()

    def snapshot(self) -> dict[int, VmRecord]:
        with self.lock:
            return dict(self.vms)


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) we are ready; a no-op outside systemd."""
    import socket

    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), addr)


def run_daemon(cfg: Config) -> int:
    """Serve /metrics until SIGTERM/SIGINT; every probe is detached on the way out."""
    import signal

    from prometheus_client import CollectorRegistry

    from qtrace_bpf.exporters.http import serve
    from qtrace_bpf.exporters.metrics import QtraceCollector

    logging.basicConfig(level=cfg.log_level.upper(),
                        format="level=%(levelname)s logger=%(name)s msg=%(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    daemon = Daemon(cfg)
    server = None
    try:
        daemon.start()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(QtraceCollector(daemon))
        host, port = cfg.host_port
        try:
            server = serve(registry, host, port, certfile=cfg.tls_cert_file,
                           keyfile=cfg.tls_key_file, client_cafile=cfg.tls_client_ca_file,
                           users=cfg.basic_auth_users)
        except OSError as exc:
            raise QtraceError(f"cannot listen on {cfg.listen}: {exc.strerror}") from None
        log.info("listening on %s (%s) kernel_hook=%s binaries=%d vms=%d ready_in=%.2fs",
                 cfg.listen, "https" if cfg.tls_cert_file else "http",
                 daemon.session.hook_mode, len(daemon.session.binaries), len(daemon.vms),
                 time.monotonic() - started)
        _sd_notify("READY=1")
        daemon.run(stop)
        log.info("stopping: detaching all probes")
        return 0
    finally:
        _sd_notify("STOPPING=1")
        if server is not None:
            server.shutdown()
        daemon.close()
