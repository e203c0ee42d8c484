"""qprobe daemon on real VMs, scraped directly and by a real Prometheus with our rules."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from support import QPROBE, ROOT
from support.caps import check_kvm, require
from support.kernel_state import added, bpf_state, wait_settled
from support.processes import popen
from support.prometheus import RULES, Prometheus
from support.qemu import call_ioctl_inside, host_tsc_khz, upstream_qemu, vcpu_fd
from support.qprobe import DaemonProcess, daemon_toml
from support.strace_count import count_state_writes, strace_argv
from support.web import free_port, http_get, make_cert, samples, scrape

from qtrace_bpf.commands.demo_vm import DemoQemu

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]
DASHBOARD = ROOT / "exporters" / "grafana" / "qtrace-dashboard.json"
GRACE = 6.0
HOSTILE = "evil\"quote\\back\nnew,,line{}=" + "x" * 10_000 + os.fsdecode(b"\xff\xfe")


QEMU_GLOB = "/usr/bin/qemu-system-*"


class Daemon(DaemonProcess):
    def __init__(self, tmp: Path, binaries: tuple[str, ...] = ()):
        port = free_port()
        cfg = tmp / "qtrace.toml"
        extra: dict[str, object] = {"qemu_binaries": [QEMU_GLOB, *binaries]} if binaries else {}
        cfg.write_text(daemon_toml(port, grace_period=GRACE, rescan_interval=2, **extra))
        super().__init__(cfg, port)


def qmp_resets(vm: DemoQemu) -> Counter:
    return Counter(e["data"]["reason"] for e in vm.collect_events() if e["event"] == "RESET")


def strace_wrapper(path: Path) -> list[str]:
    return strace_argv(str(path))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Daemon first; then VMs under strace from exec (one on the upstream QEMU 10.0 build);
    Prometheus scraping all along."""
    check_kvm()
    up10 = upstream_qemu()
    require("upstream QEMU 10.0", up10 is not None, "bash scripts/build-qemu.sh")
    tmp = tmp_path_factory.mktemp("fleet")
    before = bpf_state()
    from qtrace_bpf.vms.targets import running_qemus

    already = len(running_qemus())  # other QEMUs on this host: found by scan, late
    daemon = Daemon(tmp, binaries=(str(up10),))
    prom = Prometheus(tmp, [daemon.port])
    vms: dict[str, DemoQemu] = {}
    try:
        vms["loop-vm"] = DemoQemu("loop-vm", paused=False, extra=["-boot", "reboot-timeout=500"],
                            wrapper=strace_wrapper(tmp / "loop.strace"))
        vms["ops-vm"] = DemoQemu("ops-vm", wrapper=strace_wrapper(tmp / "ops.strace"))
        vms["quit-vm"] = DemoQemu("quit-vm", wrapper=strace_wrapper(tmp / "quit.strace"))
        vms["hostile"] = DemoQemu(HOSTILE)  # argv keeps ',,': QEMU's escaped comma
        vms["up10-vm"] = DemoQemu("up10-vm", qemu=up10, wrapper=strace_wrapper(tmp / "up10.strace"))
        vms["tsc-vm"] = DemoQemu("tsc-vm")
        ops, up, tsc = vms["ops-vm"], vms["up10-vm"], vms["tsc-vm"]
        for vm in (ops, up, vms["quit-vm"], tsc):
            vm.cmd("cont")
        time.sleep(0.5)
        # An unexpected write, made from inside a running QEMU (what a debugger or an agent
        # injected into it would do): a TSC frequency 1 kHz off (within KVM's tolerance).
        tsc.cmd("stop")
        khz = host_tsc_khz()
        assert call_ioctl_inside(tsc.pid, vcpu_fd(tsc.pid), 0xAEA2, khz + 1, tmp) == 0
        tsc.cmd("cont")
        ops.hotplug_cpu()
        up.hotplug_cpu()
        time.sleep(0.5)
        ops.cmd("system_reset")
        up.cmd("system_reset")
        time.sleep(1.0)
        ops.cmd("system_reset")
        deadline = time.monotonic() + 40
        while qmp_resets(vms["loop-vm"])["guest-reset"] < 3:
            assert time.monotonic() < deadline, "loop-vm did not reboot 3 times"
            time.sleep(0.2)
        # let Prometheus see it all and evaluate the rules
        deadline = time.monotonic() + 40
        while not prom.firing("QemuVmUnexpectedReset"):
            assert time.monotonic() < deadline, "QemuVmUnexpectedReset never fired"
            time.sleep(0.5)
        while not prom.firing("QemuVmUnexpectedStateWrite"):
            assert time.monotonic() < deadline, "QemuVmUnexpectedStateWrite never fired"
            time.sleep(0.5)
        time.sleep(3)
        alerts = {a: prom.firing(a) for a in ("QemuVmUnexpectedReset", "QemuVmResetLoop",
                                              "QemuVmUnexpectedStateWrite")}
        prom_resets = prom.query("qtrace_vm_resets_total > 0")
        resets = {}
        traced = ("loop-vm", "ops-vm", "quit-vm", "up10-vm")
        for name in traced:
            vms[name].cmd("stop")
        time.sleep(0.3)
        for name in traced:
            resets[name] = qmp_resets(vms[name])
            vms[name].quit()
        time.sleep(1.0)
        metrics = scrape(daemon.url)
        raw = http_get(daemon.url)
        straces = {n: count_state_writes(str(tmp / f"{n.split('-')[0]}.strace"))
                   for n in traced}
        yield {"already": already, "before": before, "daemon": daemon, "prom": prom,
               "metrics": metrics, "raw": raw, "tmp": tmp, "resets": resets,
               "straces": straces, "alerts": alerts, "prom_resets": prom_resets, "vms": vms,
               "tsc_khz": khz}
    finally:
        for vm in vms.values():
            vm.close()
        prom.stop()
        if daemon.proc.poll() is None:
            daemon.stop()


def test_counts_equal_strace_boot_included(fleet):
    for name, expected in fleet["straces"].items():
        assert expected, f"strace saw nothing for {name}"
        ours = Counter()
        for lab, val in samples(fleet["metrics"], "qtrace_kvm_state_writes_total", vm=name):
            vcpu = None if lab["vcpu"] == "vm" else int(lab["vcpu"])
            ours[(vcpu, lab["ioctl"])] += int(val)
        assert ours == expected, name
        boot = samples(fleet["metrics"], "qtrace_kvm_state_writes_total", vm=name, vcpu="0",
                       ioctl="KVM_CREATE_VCPU", phase="boot")
        assert boot and boot[0][1] == 1, f"{name}: boot not traced from the first write"


def test_hotplug_and_reset_phases(fleet):
    m = fleet["metrics"]
    for vm in ("ops-vm", "up10-vm"):  # QMP device_add: qdev_device_add_from_qdict alone on 10.0
        assert samples(m, "qtrace_kvm_state_writes_total", vm=vm, vcpu="1",
                       ioctl="KVM_SET_LAPIC", phase="hotplug"), vm
        assert samples(m, "qtrace_kvm_state_writes_total", vm=vm, vcpu="1",
                       ioctl="KVM_SET_SREGS2", phase="reset"), vm
        phases = {lab["phase"] for lab, v in samples(m, "qtrace_kvm_state_writes_total", vm=vm,
                                                      vcpu="1") if v}
        assert phases == {"hotplug", "reset"}, (vm, phases)


def test_resets_equal_qmp_events(fleet):
    for name, qmp in fleet["resets"].items():
        ours = {lab["cause"]: int(v) for lab, v in
                samples(fleet["metrics"], "qtrace_vm_resets_total", vm=name) if v}
        assert ours == dict(qmp), name
        # every cause QEMU resets with is exported, zero or not (increase() needs the zero);
        # shutdown-only causes, which never move, are not
        causes = {lab["cause"] for lab, _ in
                  samples(fleet["metrics"], "qtrace_vm_resets_total", vm=name)}
        assert causes == {"host-error", "host-qmp-system-reset", "host-ui", "guest-reset",
                          "guest-panic", "subsystem-reset", "snapshot-load"}, causes
    assert fleet["resets"]["ops-vm"]["host-qmp-system-reset"] == 2
    assert fleet["resets"]["loop-vm"]["guest-reset"] >= 3


def test_firmware_reboot_after_host_reset_is_marked(fleet):
    m = fleet["metrics"]
    follow = {lab["vm"]: int(v) for lab, v in
              samples(m, "qtrace_vm_resets_following_host_total", cause="guest-reset")}
    assert follow["ops-vm"] == fleet["resets"]["ops-vm"]["guest-reset"] >= 1
    assert follow["loop-vm"] == 0


def test_prometheus_alerts(fleet):
    unexpected = {a["vm"] for a in fleet["alerts"]["QemuVmUnexpectedReset"]}
    assert unexpected == {"loop-vm"}, "fires for the reboot loop, not for host resets"
    assert {a["vm"] for a in fleet["alerts"]["QemuVmResetLoop"]} == {"loop-vm"}
    seen = {(r["metric"]["vm"], r["metric"]["cause"]) for r in fleet["prom_resets"]}
    assert ("ops-vm", "host-qmp-system-reset") in seen


def test_unexpected_state_write_counted_once_and_alerted(fleet):
    """The injected KVM_SET_TSC_KHZ counts once, for tsc-vm's vCPU 0 only; boot, QMP and
    HMP hotplug, host and guest resets on the other VMs raise none; the real Prometheus
    fires QemuVmUnexpectedStateWrite for tsc-vm alone."""
    m = fleet["metrics"]
    unexpected = {(lab["vm"], lab["vcpu"], lab["ioctl"]): v
                  for lab, v in samples(m, "qtrace_unexpected_state_writes_total")}
    assert unexpected[("tsc-vm", "0", "KVM_SET_TSC_KHZ")] == 1, unexpected
    assert {k for k, v in unexpected.items() if v} == {("tsc-vm", "0", "KVM_SET_TSC_KHZ")}
    assert {vm for vm, _, _ in unexpected} >= {"loop-vm", "ops-vm", "quit-vm", "up10-vm"}
    assert [(a["vm"], a["ioctl"]) for a in fleet["alerts"]["QemuVmUnexpectedStateWrite"]] == \
        [("tsc-vm", "KVM_SET_TSC_KHZ")]
    # the injected value is the vCPU's last one, and a change
    assert samples(m, "qtrace_vcpu_tsc_khz", vm="tsc-vm", vcpu="0")[0][1] == fleet["tsc_khz"] + 1
    changes = {(lab["vm"], lab["vcpu"]): v for lab, v in
               samples(m, "qtrace_state_value_changes_total", what="tsc_khz")}
    assert changes == {("tsc-vm", "0"): 1}, changes


def test_step_durations(fleet):
    """One observation per reset and per vCPU hotplug, each under a second."""
    m = fleet["metrics"]
    count = {(lab["vm"], lab["step"]): v for lab, v in
             samples(m, "qtrace_lifecycle_duration_seconds_count")}
    for vm in ("ops-vm", "up10-vm"):
        assert count[(vm, "hotplug")] == 1, count
    for vm in ("ops-vm", "up10-vm", "loop-vm"):
        assert count[(vm, "reset")] == sum(fleet["resets"][vm].values()) > 0, (vm, count)
    assert not any(step == "migration" for _, step in count)
    under_1s = {(lab["vm"], lab["step"]): v for lab, v in
                samples(m, "qtrace_lifecycle_duration_seconds_bucket", le="1.0")}
    assert under_1s == count
    sums = samples(m, "qtrace_lifecycle_duration_seconds_sum", vm="ops-vm", step="reset")
    assert 0 < sums[0][1] < count[("ops-vm", "reset")]


def test_vm_info_and_self_metrics(fleet):
    m = fleet["metrics"]
    info = {lab["vm"]: lab for lab, _ in samples(m, "qtrace_vm_info")}
    assert {"loop-vm", "ops-vm", "quit-vm"} <= set(info)
    assert info["ops-vm"]["qemu_version"] and info["ops-vm"]["build_id"]
    assert samples(m, "qtrace_kernel_hook_info")[0][0]["mode"] in ("fentry", "kprobe",
                                                                   "tracepoint")
    lost = {lab["kind"]: v for lab, v in samples(m, "qtrace_events_lost_total")}
    assert set(lost) == {"lifecycle", "state_write", "exec", "exit", "step"}
    assert not any(lost.values())
    # ours were all found at exec; only QEMUs that ran before the daemon started count
    gaps = samples(m, "qtrace_counting_gaps_total")
    assert sum(v for _, v in gaps) == fleet["already"], gaps
    # wrapper scripts among qemu-system-* (Debian's i386 xen redirect) are not errors
    assert samples(m, "qtrace_binary_errors")[0][1] == 0
    attached = samples(m, "qtrace_probe_attached", event="system_reset")
    assert any(v == 1 for _, v in attached)


def test_hostile_vm_name(fleet):
    """Untrusted names never break the exposition: prometheus_client's parser and promtool."""
    names = {lab["vm"] for lab, _ in samples(fleet["metrics"], "qtrace_vm_info")}
    hostile = [n for n in names if n.startswith("evil")]
    assert len(hostile) == 1 and len(hostile[0]) <= 64 and "\n" not in hostile[0]
    promtool = shutil.which("promtool")
    require("promtool", promtool is not None, "apt-get install prometheus")
    r = subprocess.run([promtool, "check", "metrics"], input=fleet["raw"], capture_output=True,
                       text=True)
    assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def test_dashboard_queries_use_exported_metrics(fleet):
    import re

    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v.get("query", {}).get("query", "") if isinstance(v.get("query"), dict)
              else v.get("query", "") for v in dash.get("templating", {}).get("list", [])]
    assert len(exprs) >= 8
    exported = set()
    for fam, smp in fleet["metrics"].items():
        exported |= {n for n, _, _ in smp} | {fam, f"{fam}_total"}  # counters without samples
    recorded = set(re.findall(r"record: (\S+)", RULES.read_text()))
    used = {n for e in exprs for n in re.findall(r"\b(qtrace[:_][A-Za-z0-9_:]*)", e)}
    assert used, exprs
    assert used <= exported | recorded, used - exported - recorded


def test_quit_vm_forgotten_after_grace(fleet):
    deadline = time.monotonic() + GRACE + 10
    while True:
        names = {lab["vm"] for lab, _ in samples(scrape(fleet["daemon"].url), "qtrace_vm_info")}
        if not names & {"loop-vm", "ops-vm", "quit-vm"}:
            break
        assert time.monotonic() < deadline, f"still exported after the grace period: {names}"
        time.sleep(0.5)
    left = scrape(fleet["daemon"].url)
    assert not samples(left, "qtrace_kvm_state_writes_total", vm="quit-vm")


def test_daemon_stops_cleanly(fleet):
    d = fleet["daemon"]
    assert d.stop() == 0, "".join(d.log)
    log = "".join(d.log)
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000):][:6000]
    assert wait_settled(fleet["before"]) == {}


def test_sigkilled_daemon_leaves_only_its_pins(tmp_path):
    """SIGKILL leaves the pinned maps and links (the kernel goes on counting, by design:
    tests/integration/test_restart.py); `qprobe cleanup` then leaves nothing."""
    check_kvm()
    before = bpf_state()
    d = Daemon(tmp_path)
    assert bpf_state()["progs"] - before["progs"]
    d.proc.kill()
    d.proc.wait(10)
    time.sleep(0.5)
    left = added(before, bpf_state())
    assert left.get("pins") and all(p.startswith(d.pin_root) for p in left["pins"]), left
    r = subprocess.run([*QPROBE, "cleanup", "--pin-root", d.pin_root], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0 and "removed" in r.stdout, r.stderr
    assert wait_settled(before) == {}


def test_daemon_bad_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = 'nowhere'\n")
    r = subprocess.run([*QPROBE, "daemon", "--config", str(bad)], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "expected HOST:PORT" in r.stderr and "Traceback" not in r.stderr
    # more cases, and unknown keys (warned, not fatal): tests/unit/test_http_server.py


def test_real_prometheus_scrapes_over_tls_with_basic_auth(bpf_caps, tmp_path):
    """The web config file node_exporter takes; Debian's Prometheus scrapes through it."""
    import bcrypt

    crt, key = make_cert(tmp_path)
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=10)).decode()
    web = tmp_path / "web.yml"
    web.write_text(json.dumps({
        "tls_server_config": {"cert_file": str(crt),
                              "key_file": str(key)},
        "basic_auth_users": {"prom": hashed}}))  # JSON is YAML
    port = free_port()
    cfg = tmp_path / "q.toml"
    cfg.write_text(daemon_toml(port))
    proc = popen([*QPROBE, "daemon", "--config", str(cfg), "--web.config.file", str(web)],
                 cwd=ROOT, stderr=subprocess.PIPE, text=True)
    prom = None
    try:
        prom = Prometheus(tmp_path, [port], scheme="https",
                          tls_config={"ca_file": str(crt)},
                          basic_auth={"username": "prom", "password": "s3cret"})
        deadline = time.monotonic() + 60
        while not prom.query('up{job="qtrace"} == 1 and on() qtrace_ready == 1'):
            assert time.monotonic() < deadline, "Prometheus never scraped qtrace over TLS"
            assert proc.poll() is None
            time.sleep(0.5)
        (tmp_path / "bad").mkdir()
        bad = Prometheus(tmp_path / "bad", [port], scheme="https",
                         tls_config={"ca_file": str(crt)},
                         basic_auth={"username": "prom", "password": "wrong"})
        try:
            deadline = time.monotonic() + 30
            while not (up := bad.query('up{job="qtrace"}')):
                assert time.monotonic() < deadline, "the second Prometheus never scraped"
                time.sleep(0.5)
            assert up[0]["value"][1] == "0", "a wrong password must not scrape"
        finally:
            bad.stop()
    finally:
        if prom is not None:
            prom.stop()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_tls_and_basic_auth(bpf_caps, tmp_path):
    """TLS and bcrypt users from the TOML config; urllib as the client."""
    import base64
    import ssl
    import urllib.error

    import bcrypt

    crt, key = make_cert(tmp_path)
    port = free_port()
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    cfg = tmp_path / "q.toml"
    cfg.write_text(daemon_toml(port) + f'[tls]\ncert_file = "{crt}"\n'
                   f'key_file = "{key}"\n[basic_auth_users]\n'
                   f'prom = "{hashed}"\n')
    proc = popen([*QPROBE, "daemon", "--config", str(cfg)], cwd=ROOT,
                 stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "msg=listening" in line:
                assert "scheme=https" in line
            if "msg=tracing" in line:
                break
        ctx = ssl.create_default_context(cafile=str(crt))
        url = f"https://127.0.0.1:{port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, context=ctx, timeout=10)  # noqa: S310
        assert err.value.code == 401
        req = urllib.request.Request(url, headers={
            "Authorization": "Basic " + base64.b64encode(b"prom:wrong").decode()})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(req, context=ctx, timeout=10)  # noqa: S310
        req = urllib.request.Request(url, headers={
            "Authorization": "Basic " + base64.b64encode(b"prom:s3cret").decode()})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:  # noqa: S310
            assert b"qtrace_kernel_hook_info" in r.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_max_vms_cap(tmp_path):
    """Past max_vms a new VM is refused, counted, and gets no series."""
    check_kvm()
    port = free_port()
    cfg = tmp_path / "q.toml"
    from qtrace_bpf.vms.targets import running_qemus

    already = len(running_qemus())  # VMs already on this host take slots first
    cfg.write_text(daemon_toml(port, max_vms=already + 1, rescan_interval=1))
    proc = popen([*QPROBE, "daemon", "--config", str(cfg)], cwd=ROOT,
                 stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "msg=tracing" in line:
                break
        with DemoQemu("cap-one") as one, DemoQemu("cap-two") as two:
            one.cmd("cont")
            two.cmd("cont")
            deadline = time.monotonic() + 20
            while True:
                m = scrape(url)
                if samples(m, "qtrace_vms_refused_total")[0][1] >= 1:
                    break
                assert time.monotonic() < deadline, "no VM was refused"
                time.sleep(0.3)
            assert samples(m, "qtrace_tracked_vms")[0][1] == already + 1
            names = {lab["vm"] for lab, _ in samples(m, "qtrace_vm_info")}
            assert len(names & {"cap-one", "cap-two"}) == 1
            refused = ({"cap-one", "cap-two"} - names).pop()
            assert not samples(m, "qtrace_kvm_state_writes_total", vm=refused)
            one.quit()
            two.quit()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
