"""/metrics from a fake daemon (support/doubles.FakeObserved): what the collectors make of
the maps and the tracker, with no root, BPF or VM.  The whole page, in both formats, is
held to a golden file that a reviewer reads in the diff: `pytest tests/unit/test_exporter.py
--update-golden` rewrites it after a deliberate change.  The other tests check the rules
behind the numbers (sums, zeros, splits, what is left out)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from qtrace_bpf.exporters import self_metrics
from qtrace_bpf.exporters.exposition import OPENMETRICS, TEXT
from qtrace_bpf.exporters.metrics import RESET_CAUSES, Exposition
from support.caps import require
from support.doubles import FakeObserved
from support.web import samples

from qtrace_bpf.contract import abi, decoders, kvm_ioctls, maps

GOLDEN = Path(__file__).parent / "golden"
WEB, DB, WEB_BEFORE, PROBE = 1, 2, 0x80000001, 3
SET = {name: kvm_ioctls.BY_NAME[name].number for name in
       ("KVM_SET_SREGS2", "KVM_SET_TSC_KHZ", "KVM_SET_LAPIC", "KVM_SET_CLOCK", "KVM_SET_MSRS")}
PHASE = {name: i for i, name in enumerate(abi.PHASES)}


@pytest.fixture(autouse=True)
def fixed_build(monkeypatch):
    """What qtrace_build_info reads of the machine, fixed, and decode errors counted from
    zero (a process-wide Counter other tests add to): the page is then the same everywhere,
    whatever ran before it (Debian's prometheus-client 0.16 and PyPI's alike)."""
    from collections import Counter
    from types import SimpleNamespace

    monkeypatch.setattr(decoders, "DECODE_ERRORS", Counter())
    monkeypatch.setattr(self_metrics, "__version__", "1.2.3")
    monkeypatch.setattr(self_metrics, "revision", lambda: "0123abc")
    monkeypatch.setattr(self_metrics, "build_info", lambda: {"branch": "main"})
    monkeypatch.setattr(self_metrics, "platform", SimpleNamespace(python_version=lambda: "3.11.2"))
    monkeypatch.setattr(self_metrics, "os", SimpleNamespace(
        uname=lambda: SimpleNamespace(release="6.1.0-28-amd64")))


def a_host() -> FakeObserved:
    """Two VMs (one of them restarted within the grace period: two processes named web),
    a QEMU that never made a vCPU, and a little of everything the maps count."""
    d = FakeObserved()
    m = d.start()
    d.add_vm(WEB, 4242, "web", uuid="5a2e3f10-0c1b-4d2e-9f3a-1b2c3d4e5f60", build_id="b1d0")
    d.add_vm(WEB_BEFORE, 4100, "web", exited_at=100.0, build_id="b1d0")
    d.add_vm(DB, 4343, "db", qemu_version="10.0.3", build_id="c0de")
    d.add_vm(PROBE, 4444, "libvirt-probe", has_vcpus=False)
    boot, reset, runtime = PHASE["boot"], PHASE["reset"], PHASE["runtime"]
    for vcpu in (0, 1):
        m.add(maps.WRITES.name, 3, vm=WEB, vcpu=vcpu, cmd=SET["KVM_SET_SREGS2"], phase=boot)
    m.add(maps.WRITES.name, 2, vm=WEB_BEFORE, vcpu=0, cmd=SET["KVM_SET_SREGS2"], phase=reset)
    m.add(maps.WRITES.name, 1, vm=WEB, vcpu=0, cmd=SET["KVM_SET_SREGS2"], phase=reset)
    m.add(maps.WRITES.name, 1, vm=WEB, vcpu=0, cmd=SET["KVM_SET_TSC_KHZ"], phase=boot)
    m.add(maps.WRITES.name, 1, vm=WEB, vcpu=1, cmd=SET["KVM_SET_TSC_KHZ"], phase=runtime)
    m.add(maps.WRITES.name, 1, vm=WEB, vcpu=-1, cmd=SET["KVM_SET_CLOCK"], phase=boot)
    m.add(maps.WRITES.name, 4, vm=DB, vcpu=0, cmd=SET["KVM_SET_LAPIC"], phase=reset)
    m.add(maps.WRITES.name, 1, vm=DB, vcpu=0, cmd=SET["KVM_SET_LAPIC"], phase=7)  # unknown
    m.add(maps.WRITES.name, 9, vm=PROBE, vcpu=0, cmd=SET["KVM_SET_LAPIC"], phase=boot)
    m.add(maps.ERRORS.name, 1, vm=DB, cmd=SET["KVM_SET_MSRS"])
    slot = {p.event: p.slot for p in d.catalog.probes}
    m.add(maps.LIFECYCLE.name, 2, vm=WEB, probe=slot["system_reset"])
    m.add(maps.LIFECYCLE.name, 1, vm=DB, probe=slot["device_add"])
    m.add(maps.VALUE_CHANGES.name, 1, vm=WEB, vcpu=0, which=abi.V_TSC_KHZ)
    m.add(maps.RESETS.name, 2, vm=WEB, cause=abi.CAUSE_HOST_QMP_SYSTEM_RESET)
    m.add(maps.RESETS.name, 2, vm=WEB, cause=abi.CAUSE_GUEST_RESET | abi.FOLLOWUP_FLAG)
    m.add(maps.RESETS.name, 1, vm=DB, cause=abi.CAUSE_GUEST_RESET)
    m.add(maps.STEP_DURATIONS.name, 2, vm=WEB, step=abi.S_RESET, bucket=2)
    m.add(maps.STEP_DURATIONS.name, 1, vm=WEB, step=abi.S_RESET, bucket=abi.NDUR_BUCKETS)
    m.add(maps.STEP_DURATIONS.name, 27_000_000_000, vm=WEB, step=abi.S_RESET,
          bucket=abi.DUR_SUM)
    m.add(maps.LAST_VAL, 2_000_000, vm=WEB, vcpu=0, which=abi.V_TSC_KHZ)
    m.add(maps.LAST_VAL, 0xFEE00900, vm=WEB, vcpu=0, which=abi.V_APIC_BASE)
    m.add(maps.LAST_VAL, 0xFEE00800, vm=WEB, vcpu=1, which=abi.V_APIC_BASE)
    m.lost = {"state_write": 0, "lifecycle": 3}
    m.failed = {"procs": 0, "write_counts": 1}
    from types import SimpleNamespace as NS

    probe = lambda event, ok: NS(probe=NS(event=event), ok=ok)  # noqa: E731
    d.binaries.plans[(2049, 1234)] = NS(
        display="/usr/bin/qemu-system-x86_64", key=(2049, 1234),
        resolution=NS(build_id="b1d0"), missing=["vcpu_create"],
        attached=[probe("system_reset", True), probe("put_registers", True),
                  probe("vcpu_create", False)])
    d.binaries.errors[(2049, 99)] = "not an ELF file"
    d.binaries.untrusted_total = 1
    d.tracker.refused, d.tracker.not_vms = 1, 2
    d.tracker.attach_errors = {"vanished": 1}
    d.tracker.gaps = {("web", "found_running"): 1, ("", "layout_replaced"): 1}
    d.http = NS(active=3, refused=0, evicted=1, timeouts=2, resource_errors={"EMFILE": 1},
                limits=NS(max_connections=64))
    d.resource_errors = {"ENOMEM": 1}
    return d


def page(d: FakeObserved, fmt: str = TEXT) -> str:
    """/metrics as the daemon serves it, less prometheus_client's process_* collector
    (this process's own numbers) and the time the collection took."""
    text = Exposition(d, share_window=0).get(fmt, gzipped=False).decode()
    kept = [ln for ln in text.splitlines(keepends=True)
            if not re.match(r"(# (HELP|TYPE) )?process_", ln)]
    return re.sub(r"(?m)^(qtrace_scrape_duration_seconds) \S+$", r"\1 <seconds>", "".join(kept))


@pytest.mark.parametrize("fmt,name", [(TEXT, "metrics.txt"), (OPENMETRICS, "metrics.om.txt")],
                         ids=["text", "openmetrics"])
def test_the_whole_page_is_the_golden_one(request, fmt, name):
    """Names, help, types, labels, values and order: what dashboards, rules and an operator's
    eyes read, changed only on purpose."""
    got = page(a_host(), fmt)
    golden = GOLDEN / name
    if request.config.getoption("--update-golden"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(got)
    assert golden.exists(), f"no {golden}: run pytest {__file__} --update-golden"
    assert got == golden.read_text(), (
        f"/metrics differs from {golden.name}: if the change is meant, rerun with "
        "--update-golden and review the diff")


def test_the_golden_page_passes_promtool():
    promtool = shutil.which("promtool")
    require("promtool", promtool is not None, "apt-get install prometheus")
    text = (GOLDEN / "metrics.txt").read_text().replace("<seconds>", "0.25")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def parsed(d: FakeObserved) -> dict[str, list]:
    text = page(d).replace("<seconds>", "0")
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples]
            for f in text_string_to_metric_families(text)}


def test_two_processes_of_one_name_are_one_series_summed():
    m = parsed(a_host())
    writes = samples(m, "qtrace_kvm_state_writes_total", vm="web", vcpu="0",
                     ioctl="KVM_SET_SREGS2")
    assert {lab["phase"]: v for lab, v in writes} == {"boot": 3, "reset": 3}  # 1 + 2 before
    assert sorted(lab["pid"] for lab, _ in samples(m, "qtrace_vm_info", vm="web")) == \
        ["4100", "4242"]


def test_a_process_without_a_vcpu_is_never_a_vm():
    m = parsed(a_host())
    assert "libvirt-probe" not in {lab["vm"] for fam in m.values() for _, lab, _ in fam
                                   if "vm" in lab}
    assert samples(m, "qtrace_tracked_vms") == [({}, 2)]  # web and db; not web's old process
    assert samples(m, "qtrace_tracked_processes") == [({}, 3)]  # the probe is one


def test_every_reset_cause_is_a_series_and_the_firmwares_reboot_is_apart():
    m = parsed(a_host())
    web = {lab["cause"]: v for lab, v in samples(m, "qtrace_vm_resets_total", vm="web")}
    assert set(web) == set(RESET_CAUSES)
    assert web["host-qmp-system-reset"] == 2 and web["guest-reset"] == 0
    following = {lab["cause"]: v for lab, v in
                 samples(m, "qtrace_vm_resets_following_host_total", vm="web")}
    assert following["guest-reset"] == 2
    assert samples(m, "qtrace_vm_resets_total", vm="db", cause="guest-reset")[0][1] == 1


def test_unexpected_writes_follow_the_catalogs_rules():
    m = parsed(a_host())
    unexpected = {(lab["vm"], lab["vcpu"]): v for lab, v in
                  samples(m, "qtrace_unexpected_state_writes_total", ioctl="KVM_SET_TSC_KHZ")}
    assert unexpected == {("web", "0"): 0, ("web", "1"): 1}  # boot is expected, runtime not


def test_step_durations_are_a_cumulative_histogram():
    m = parsed(a_host())
    buckets = {lab["le"]: v for lab, v in
               samples(m, "qtrace_lifecycle_duration_seconds_bucket", vm="web", step="reset")}
    assert buckets["0.0025"] == 0 and buckets["0.005"] == 2 and buckets["10.0"] == 2
    assert buckets["+Inf"] == 3
    assert samples(m, "qtrace_lifecycle_duration_seconds_sum", vm="web")[0][1] == 27.0


def test_values_are_gauges_never_labels():
    m = parsed(a_host())
    apic = {lab["vcpu"]: v for lab, v in samples(m, "qtrace_vcpu_apic_base", vm="web")}
    assert apic == {"0": 0xFEE00900, "1": 0xFEE00800}
    assert samples(m, "qtrace_vcpu_tsc_khz", vm="web", vcpu="0")[0][1] == 2_000_000


def test_a_forgotten_process_counts_go_on_under_its_name():
    """web's old process is forgotten (its map entries deleted) while web lives on: its
    counts are carried, and the series does not go down."""
    d = a_host()
    exposition = Exposition(d, share_window=0)
    before = samples(parsed(d), "qtrace_kvm_state_writes_total", vm="web", vcpu="0",
                     ioctl="KVM_SET_SREGS2", phase="reset")
    gone = d.tracker.vms.pop(WEB_BEFORE)
    exposition.vms.carry(gone)
    rows = d.prog.maps.rows
    for name in rows:
        rows[name] = [(k, n) for k, n in rows[name] if k.vm != WEB_BEFORE]
    text = exposition.get(TEXT, gzipped=False).decode()
    after = [s for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == "qtrace_kvm_state_writes_total" and s.labels.get("vm") == "web"
             and s.labels.get("phase") == "reset" and s.labels.get("vcpu") == "0"]
    assert before[0][1] == after[0].value == 3


def test_while_starting_only_the_self_metrics_answer():
    d = FakeObserved()
    m = parsed(d)
    assert samples(m, "qtrace_ready") == [({}, 0)]
    assert samples(m, "qtrace_startup_info") == [({"stage": "loading the BPF program"}, 1)]
    assert not [n for n in m if n.startswith("qtrace_vm_") or n.startswith("qtrace_kvm_")]
    assert "qtrace_kernel_hook_info" not in m


def test_kubevirt_domains_carry_namespace_and_name_when_asked():
    """A virt-launcher's domain is NAMESPACE_NAME: with kubevirt_names, qtrace_vm_info
    carries the VMI's namespace and name (the labels kubevirt_vmi_* join on); off, or for
    a name of another shape, both are empty (no label)."""
    d = a_host()
    d.add_vm(7, 4747, "prod_db-7")
    off = {lab["vm"]: lab for lab, _ in samples(parsed(d), "qtrace_vm_info")}
    assert off["prod_db-7"]["namespace"] == off["prod_db-7"]["name"] == ""  # no label
    d.kubevirt_names = True
    on = {lab["vm"]: lab for lab, _ in samples(parsed(d), "qtrace_vm_info")}
    assert (on["prod_db-7"]["namespace"], on["prod_db-7"]["name"]) == ("prod", "db-7")
    assert on["web"]["namespace"] == on["web"]["name"] == ""
