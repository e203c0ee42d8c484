#!/usr/bin/env bash
# Break each safety promise on purpose, run the tests that guard it, and restore: every line
# but one must say FAILED (a struct field added to qtrace.h must PASS: Python follows C).
# Needs a clean work tree (it restores with `git checkout`).  Takes ~10 minutes, and ~40
# more for the Debian guest cases at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "$(git status --porcelain)" ]; then echo "sabotage: commit or stash first" >&2; exit 2; fi
# The ref_ctr_offset case makes bpftrace fail to attach; bpftrace then leaves its tracefs
# uprobe event (p_..._bcc_<pid>), which can only be removed once pytest has exited.
cleanup() {
  git checkout -q -- .
  local ev=/sys/kernel/tracing/uprobe_events
  grep -o '^p:uprobes/p__usr_bin_qemu[^ ]*_bcc_[0-9]*' "$ev" 2>/dev/null | while read -r name; do
    echo "-:${name#p:}" >> "$ev" 2>/dev/null || true
  done
}
trap cleanup EXIT
PY=.venv/bin/python
run() {  # name, expectation, pytest args...   (SABOTAGE_ONLY="a b": only those cases)
  local name=$1 want=$2; shift 2
  if [ -n "${SABOTAGE_ONLY:-}" ] && [[ " $SABOTAGE_ONLY " != *" $name "* ]]; then
    EDIT_FAILED=; git checkout -q -- .; return; fi
  if [ -n "${EDIT_FAILED:-}" ]; then  # the code moved: this case would prove nothing
    printf '%-14s EDIT FAILED (want %s)\n' "$name" "$want"; EDIT_FAILED=
    git checkout -q -- .; return
  fi
  local log="${TMPDIR:-/tmp}/sabotage-$name.log" got
  if timeout "${SABOTAGE_TIMEOUT:-900}" "$PY" -m pytest -q -x -p no:cacheprovider "$@" >"$log" 2>&1; then got=PASSED; else got=FAILED; fi
  # a run that only skipped proved nothing (BCC or KVM missing): say so; a red that no test
  # gave (a plugin or conftest that cannot load, a usage error) proves nothing either
  if [ "$got" = PASSED ] && ! grep -qE '[0-9]+ passed' "$log"; then got=SKIPPED; fi
  if [ "$got" = FAILED ] && ! grep -qE '^(FAILED|ERROR) tests/\S+::' "$log" &&
     ! { [ -n "${SABOTAGE_EXPECT:-}" ] && grep -qF "$SABOTAGE_EXPECT" "$log"; }; then
    got=BROKEN  # (SABOTAGE_EXPECT: the message of a red that comes before any test)
  fi
  printf '%-14s %s (want %s)  %s\n' "$name" "$got" "$want" "$(grep -m1 -E '^(FAILED|ERROR)' "$log")"
  git checkout -q -- .
}
edit() { "$PY" - "$@" <<'P'
import sys
path, old, new = sys.argv[1:4]
text = open(path).read()
assert text.count(old) == 1, f"{path}: {old!r} found {text.count(old)} times, not once"
open(path, "w").write(text.replace(old, new, 1))
P
[ $? = 0 ] || EDIT_FAILED=1
}
edit probes/catalog.toml '"kvm_arch_put_registers"]' '"kvm_arch_put_registers_gone"]'
run put_registers FAILED tests/integration/test_watch.py -k "put_levels or counts_equal or boot_phase"
edit probes/catalog.toml '"qdev_device_add"]' '"qdev_device_add_gone"]'
run hotplug FAILED tests/integration/test_watch.py -k "hotplug or matrix"
edit qtrace_bpf/contract/kvm_ioctl_numbers.py '"KVM_SET_TSC_KHZ": 0xaea2,' '"KVM_SET_TSC_KHZ": 0xaea1,'
run tsc_number FAILED tests/unit/test_kernel_user_contract.py tests/integration/test_watch.py -k "generated or counts_equal"
edit probes/qtrace.h $'    u32 changed;   // V_* bits: it differed\n    u32 pad;\n' \
  $'    u32 changed;   // V_* bits: it differed\n    u64 sabotage_extra;\n    u32 pad;\n    u32 pad2;\n'
run event_field PASSED tests/unit/test_kernel_user_contract.py tests/integration/test_compiled_program.py tests/unit/test_decoders.py tests/integration/test_watch.py
edit qtrace_bpf/program/attachments.py $'        while self._undo:\n            self._undo.pop()()\n' $'        self._undo.clear()\n'
run no_detach FAILED tests/integration/test_compiled_program.py tests/integration/test_uprobes_on_resolved_offsets.py -k "forget_removes or inlined_instances"
edit qtrace_bpf/contract/maps.py 'PER_VM: tuple[str, ...] = (VCPU_FDS, ' 'PER_VM: tuple[str, ...] = ('
run per_vm_map FAILED tests/integration/test_compiled_program.py
edit qtrace_bpf/vms/tracker.py '            return {i: vm for i, vm in self.vms.items() if vm.has_vcpus}' '            return dict(self.vms)'
run non_vm FAILED tests/integration/test_daemon_on_a_host.py -k "short_lived"
edit qtrace_bpf/symbols/binaries.py '        key, version = bf.key, bf.version' '        key, version = (0, bf.version[0]), bf.version'
run file_key FAILED tests/integration/test_daemon_on_a_host.py -k "copy_of_the_binary or reinstall"
edit qtrace_bpf/vms/tracker.py '                    subscriber(vm)' '                    pass'
run carried FAILED tests/integration/test_daemon_on_a_host.py -k "restarted_domain"
edit qtrace_bpf/program/pinned.py $'        if not keep_pins:\n' $'        if True:\n'
run keep_pins FAILED tests/integration/test_restart.py -k "survive"
edit qtrace_bpf/bpf/pins.py '        if old is not None and same_program(old, prog_fd):' '        if old is not None:'
run tag_check FAILED tests/integration/test_restart.py -k "changed_program"
edit qtrace_bpf/bpf/perf_events.py '    attr.config = (1 if retprobe else 0) | (ref_ctr << 32)' '    attr.config = (1 if retprobe else 0) | ((ref_ctr or 0x1234) << 32)'
QTRACE_UPROBES=perf run ref_ctr_offset FAILED tests/integration/test_beside_other_tracers.py
edit probes/catalog.toml '"migration_incoming_state_destroy"]' '"migration_incoming_state_destroy_gone"]'
run migration_end FAILED tests/integration/test_watch.py -k "failed_incoming and upstream"
edit qtrace_bpf/symbols/elfsym.py '            found, _units = inlined_instances(df, wanted, defined)' '            found = {}'
run dwarf_inline FAILED tests/unit/test_symbol_resolution.py tests/integration/test_uprobes_on_resolved_offsets.py -k "inlined or dwz"
edit probes/qtrace.bpf.c 'return on_probe(ctx, n, 0, 0); }' 'return on_probe(ctx, n, 0, 1); }'
run clone_args FAILED tests/integration/test_uprobes_on_resolved_offsets.py -k "clone_arguments"
edit qtrace_bpf/symbols/debuginfod.py '            if got != build_id:' '            if False:'
run debuginfod_verify FAILED tests/unit/test_debuginfod.py -k "wrong"
edit exporters/http.py '                for writer in list(self._writers):
                    writer.transport.abort()' '                pass'
run http_close FAILED tests/unit/test_http_server.py -k "quiet"
edit qtrace_bpf/commands/daemon.py '        self.stage = "loading the BPF program"' $'        import bcc  # noqa: F401\n        self.stage = "loading the BPF program"'
run compiler_held FAILED tests/integration/test_footprint.py -k "no_compiler"
edit qtrace_bpf/program/loader.py '    if m is None or m.identity != want' '    if True or m is None or m.identity != want'
run pins_reused FAILED tests/integration/test_footprint.py -k "matching_pins"
edit qtrace_bpf/commands/daemon.py '    return soft, max(16, min(configured, soft - FD_RESERVE))' '    return soft, configured'
run fd_cap FAILED tests/integration/test_footprint.py -k "fd_limit"
edit qtrace_bpf/procfs.py '    return None if st.st_ino == INIT_PIDNS_INO else (st.st_dev, st.st_ino)' '    return None'
run pidns FAILED tests/integration/test_pid_namespace.py -k "counts_its_vms"
edit qtrace_bpf/procfs.py '    return None if st.st_ino == INIT_PIDNS_INO else (st.st_dev, st.st_ino)' '    return None'
run other_host FAILED tests/integration/test_two_hosts.py
edit debian/qtrace.prerm '    /usr/bin/qprobe cleanup --config /etc/qtrace/qtrace.toml >/dev/null 2>&1 || \' '    true || \'
edit debian/qtrace.prerm '        /usr/bin/qprobe cleanup >/dev/null 2>&1 || true' '        true'
run purge_cleanup FAILED tests/integration/test_package_under_systemd.py
edit systemd/qtrace.service 'User=qtrace' 'User=root'
run non_root FAILED tests/integration/test_package_under_systemd.py -k "apt_install"
edit exporters/metrics.py '                fam.samples[(vm.name, str(key.vcpu))] = float(value)' '                fam.samples[(vm.name, str(key.vcpu))] = float(value) + 1'
run value_gauge FAILED tests/integration/test_value_gauges.py
edit probes/catalog.toml 'phases = ["boot", "hotplug", "migration"]' 'phases = ["boot", "hotplug", "migration", "runtime"]'
run expect_rule FAILED tests/integration/test_daemon_and_prometheus.py -k "unexpected"
edit probes/qtrace.bpf.c 'step_done(ps, S_HOTPLUG, ps->step_end[S_HOTPLUG], tgid, tid);' 'step_done(ps, S_HOTPLUG, 0, tgid, tid);'
run hotplug_step FAILED tests/integration/test_watch.py -k "step_durations and debian"
edit probes/qtrace.bpf.c "        ps->step_end[S_RESET] = now;  // the last one wins" "        ps->step_end[S_RESET] = ps->step_end[S_RESET] ? ps->step_end[S_RESET] : now;"
run reset_step_end FAILED tests/integration/test_watch.py -k "step_durations and debian"
edit probes/qtrace.bpf.c '(void *)(arg + offsetof(struct kvm_sregs, apic_base)));' '(void *)(arg + offsetof(struct kvm_sregs, efer)));'
run apic_offset FAILED tests/integration/test_value_gauges.py -k "independent"
edit qtrace_bpf/symbols/binaries.py 'slot, "blind", site.semaphore)' 'slot, "blind", 0)'
run usdt_semaphore FAILED tests/integration/test_watch.py -k "usdt_and_function"
edit exporters/webconfig.py '    unknown = sorted(set(http) - {"http2", "headers"})' '    unknown = sorted(set(http) - {"headers"})'
run web_yml_key FAILED tests/unit/test_http_server.py -k "every_key"
edit exporters/http.py '        if not self.rate.allow(self._loop.time()):' '        if False:'
run rate_limit FAILED tests/unit/test_http_server.py -k "every_key"
edit systemd/qtrace.service 'StartLimitIntervalSec=2min' ''
run start_limit FAILED tests/integration/test_package_under_systemd.py -k "apt_install or burst"
# BENCHMARKS.md: a fixed sentence instead of the rule's word
edit benchmarks/report.py "f\"{judge(lo, hi, 5.0, '%')})\")" "\"not shown)\")"
run report_words FAILED tests/unit/test_bench_report.py
# A test VM's QMP socket is connected even when QEMU has bound it but not yet listened
edit qtrace_bpf/commands/demo_vm.py 'if not isinstance(e.exc, ConnectionRefusedError) or not alive()' 'if True or not alive()'
run qmp_refused FAILED tests/unit/test_demo_vm.py -k qmp_connect
# An entry probe moved off a single-stepped instruction: never into a loop, never past an argument
edit qtrace_bpf/symbols/first_insn.py '            if pos == 0 or any(0 < t <= pos for t in _jump_targets(code)):' '            if pos == 0:'
run entry_jump FAILED tests/integration/test_uprobes_on_resolved_offsets.py -k entry_probe_moves
edit qtrace_bpf/symbols/binaries.py '        moved = sym.entry_at and not keep.intersection(sym.entry_writes)' '        moved = sym.entry_at'
run entry_args FAILED tests/integration/test_uprobes_on_resolved_offsets.py -k entry_probe_moves
# The in-flight gate: a write whose entry did not count itself is never seen at exit
edit probes/qtrace.bpf.c '    else if (n)' '    else if (0)'
run inflight_gate FAILED tests/integration/test_watch.py -k "counts_equal"
edit benchmarks/between_runs.py '        spread = max(got) - min(got)' '        spread = 0.0'
run between_runs FAILED tests/unit/test_bench_report.py
# The layers: a bpf module that reaches up into the program layer
edit qtrace_bpf/bpf/pins.py 'from qtrace_bpf.errors import QtraceError' 'from qtrace_bpf.errors import QtraceError
from qtrace_bpf.program import loader  # noqa: F401'
run layering FAILED tests/unit/test_layout.py -k "each_layer"
# The test folders: a test that needs BPF marked as something else; one left unmarked
edit tests/integration/test_kernel_hooks.py 'pytestmark = [pytest.mark.bpf]' 'pytestmark = [pytest.mark.root]'
run bpf_marker FAILED tests/integration/test_kernel_hooks.py -k doctor_on_this_machine
edit tests/integration/test_kernel_hooks.py 'pytestmark = [pytest.mark.bpf]' 'pytestmark = []'
SABOTAGE_EXPECT='without a marker' run unmarked FAILED tests/integration/test_kernel_hooks.py
# /metrics against its golden page: a family renamed
edit exporters/metrics.py '"qtrace_vm_resets_following_host",' '"qtrace_vm_resets_after_host",'
run golden_page FAILED tests/unit/test_exporter.py -k golden
# Containers: KubeVirt's namespace/name dropped; proc_root taken but not used; the program
# numbering pids as the daemon's own namespace does whatever proc_root shows
edit exporters/metrics.py '*kube(vm.name)): 1' '"", ""): 1'
run kubevirt_label FAILED tests/unit/test_exporter.py tests/integration/test_containers.py -k "kubevirt"
edit qtrace_bpf/procfs.py '    _root = proc_root.rstrip("/") or DEFAULT' '    _root = DEFAULT'
run proc_root FAILED tests/integration/test_containers.py
edit qtrace_bpf/procfs.py '    if _root == DEFAULT:
        st = os.stat("/proc/self/ns/pid")' '    if True:
        st = os.stat("/proc/self/ns/pid")'
run proc_pidns FAILED tests/integration/test_containers.py
# Kubernetes: the rule file changed and the PrometheusRule not regenerated; a key the
# ServiceMonitor's CRD does not know; a capability more than the unit's
edit exporters/prometheus/qtrace-alerts.yml '      - alert: QtraceDown' '      - alert: QtraceIsDown'
run prometheusrule FAILED tests/unit/test_kubernetes_manifests.py -k "rule_file"
edit deploy/kubernetes/servicemonitor.yaml '    honorLabels: true' '    honorLabel: true'
run crd_key FAILED tests/unit/test_kubernetes_manifests.py -k "crds"
edit deploy/kubernetes/daemonset.yaml '            add: [BPF, PERFMON, SYS_PTRACE, DAC_READ_SEARCH]' '            add: [BPF, PERFMON, SYS_PTRACE, DAC_READ_SEARCH, SYS_ADMIN]'
run daemon_caps FAILED tests/unit/test_kubernetes_manifests.py -k "capabilities"
# The DaemonSet's pod under podman: pins dropped at SIGTERM (a pod restart loses the counts);
# the daemon without CAP_SYS_PTRACE (it cannot read the host's processes)
edit deploy/kubernetes/configmap.yaml '    keep_on_exit = true' '    keep_on_exit = false'
run pod_restart FAILED tests/integration/test_kubernetes_pod.py
edit deploy/kubernetes/daemonset.yaml '            add: [BPF, PERFMON, SYS_PTRACE, DAC_READ_SEARCH]' '            add: [BPF, PERFMON, DAC_READ_SEARCH]'
run pod_ptrace FAILED tests/integration/test_kubernetes_pod.py
# Two hosts: the TSC rule blind to a second frequency; the recording rule merging hosts
edit exporters/prometheus/qtrace-alerts.yml '          max by (vm, uuid) (max_over_time(qtrace:vm_tsc_khz:by_uuid[1h]))' '          2 * max by (vm, uuid) (max_over_time(qtrace:vm_tsc_khz:by_uuid[1h]))'
run tsc_rule FAILED tests/integration/test_two_hosts.py
edit exporters/prometheus/qtrace-alerts.yml '          max by (instance, vm, uuid) (
            qtrace_vcpu_tsc_khz' '          max by (vm, uuid) (
            qtrace_vcpu_tsc_khz'
run by_uuid FAILED tests/integration/test_two_hosts.py
# The package: lintian clean, the demo not shipped, an administrator's files kept on purge
edit debian/control 'Maintainer: Seed 1a4b9429 maintainers <maintainers@users.noreply.b-seed-1a4b9429.example>' 'Maintainer: qtrace developers <qtrace-devel@localhost>'
run lintian FAILED tests/integration/test_package.py -k "lintian"
edit debian/rules '	rm $(SITE)/qtrace_bpf/commands/demo.py $(SITE)/qtrace_bpf/commands/demo_vm.py' ''
run demo_shipped FAILED tests/integration/test_package.py -k "ships or no_demo"
edit debian/qtrace.postrm '    rm -rf /var/cache/qtrace' '    rm -rf /var/cache/qtrace /etc/qtrace'
run purge_keys FAILED tests/integration/test_package_under_systemd.py -k "apt_install or purge"
# Debian's own kernels (the guest tier, bookworm only: ~12 min a case, SABOTAGE_ONLY to pick)
edit qtrace_bpf/program/compiled.py 'self.links.link_with(name, f"f-{name}",' 'self.links.hold(self._live_link(self._fentry_fds[name], exit_, fn)) or (name, f"f-{name}",'
QTRACE_DEBIAN_VM=1 SABOTAGE_TIMEOUT=2400 run fentry_pin FAILED tests/integration/test_debian_hosts.py -k "bookworm and (nested_vm and auto or restart)"
edit qtrace_bpf/bpf/fentry.py '    return found, module_btf_fd(module)' '    return found, None'
QTRACE_DEBIAN_VM=1 SABOTAGE_TIMEOUT=2400 run module_btf FAILED tests/integration/test_debian_hosts.py -k "bookworm and fentry"
edit systemd/qtrace-generator 'if grep -q bpf_uprobe_multi_link_attach' 'if true || grep -q bpf_uprobe_multi_link_attach'
QTRACE_DEBIAN_VM=1 SABOTAGE_TIMEOUT=2400 run perf_uprobes FAILED tests/integration/test_debian_hosts.py -k "bookworm and nested_vm and kprobe"
