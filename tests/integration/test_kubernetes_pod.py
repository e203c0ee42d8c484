"""The DaemonSet's pod, for real, on this kernel: deploy/kubernetes/daemonset.yaml's pod
template run by `podman kube play` with the image scripts/build-image.sh builds (the .deb
installed by apt), its ConfigMap, capabilities, mounts and no hostPID.  It counts a QEMU
started on the host from its first write, names it by its host pid with KubeVirt's
namespace and name, and a restart of the pod (the kernel counting in the pins meanwhile)
loses nothing.  No cluster runs here: what podman 4.3 needs said otherwise is changed in
the pod it plays, and nothing else (see PODMAN_ONLY)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml
from support import QPROBE, ROOT
from support.caps import check_kvm, require
from support.kernel_state import bpf_state, wait_settled
from support.qemu import qmp_resets
from support.qprobe import PIN_TEST_ROOT
from support.web import free_port, samples, scrape

from qtrace_bpf.commands.demo_vm import DemoQemu

pytestmark = [pytest.mark.bpf, pytest.mark.kvm, pytest.mark.root]
DEPLOY = ROOT / "deploy" / "kubernetes"
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "scripts" / "podman.conf")}
# What podman 4.3 takes differently from a kubelet: init containers restarted under
# restartPolicy Always; seccomp from the (older) annotation; a hostPort, since no cluster
# network reaches the pod; no cluster objects to refer to.
PODMAN_ONLY = ("restartPolicy", "hostPort", "seccomp annotation",
               "nodeSelector, tolerations, priorityClassName, serviceAccountName dropped")


def podman(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def pod_files(tmp, image: str, port: int) -> tuple[str, str]:
    """The DaemonSet's pod template as a Pod, and its ConfigMap with a test pin root."""
    ds = yaml.safe_load((DEPLOY / "daemonset.yaml").read_text())
    spec = copy.deepcopy(ds["spec"]["template"]["spec"])
    for key in ("nodeSelector", "tolerations", "priorityClassName", "serviceAccountName",
                "automountServiceAccountToken"):
        spec.pop(key)
    spec["restartPolicy"] = "OnFailure"
    for c in (*spec["initContainers"], *spec["containers"]):
        c["image"] = image
    spec["containers"][0]["ports"][0]["hostPort"] = port
    assert spec["securityContext"]["seccompProfile"] == {"type": "Unconfined"}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"qtrace-{port}",
                        "labels": ds["spec"]["template"]["metadata"]["labels"],
                        "annotations": {"seccomp.security.alpha.kubernetes.io/pod":
                                        "unconfined"}},
           "spec": spec}
    cm = yaml.safe_load((DEPLOY / "configmap.yaml").read_text())
    conf = cm["data"]["qtrace.toml"]
    pins = 'bpf_pin_root = "/sys/fs/bpf/qtrace"'
    assert pins in conf
    cm["data"]["qtrace.toml"] = conf.replace(
        pins, f'bpf_pin_root = "{PIN_TEST_ROOT}/qtrace-test-{port}"')
    pod_path, cm_path = tmp / "pod.yaml", tmp / "configmap.yaml"
    pod_path.write_text(yaml.safe_dump(pod, sort_keys=False))
    cm_path.write_text(yaml.safe_dump(cm, sort_keys=False))
    return str(pod_path), str(cm_path)


def ready(port: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        if time.monotonic() > deadline:
            logs = podman("logs", "--tail", "20", f"qtrace-{port}-qtrace")
            raise AssertionError(f"the pod is not ready: {logs.stdout}{logs.stderr}")
        time.sleep(0.5)


def resets(port: int, vm: str) -> dict[str, int]:
    return {lab["cause"]: int(v) for lab, v in
            samples(scrape(f"http://127.0.0.1:{port}/metrics"), "qtrace_vm_resets_total",
                    vm=vm) if v}


def test_the_daemonsets_pod_counts_a_host_vm_and_survives_its_restart(tmp_path):
    check_kvm()
    build = subprocess.run(["bash", "scripts/build-image.sh"], cwd=ROOT, capture_output=True,
                           text=True, timeout=1800)  # installs podman, buildah, catatonit
    require("podman", shutil.which("podman") is not None, "apt-get install podman")
    assert build.returncode == 0, build.stderr[-3000:]
    image = build.stdout.strip().splitlines()[-1]
    port = free_port()
    pod_path, cm_path = pod_files(tmp_path, image, port)
    before = bpf_state()
    played = podman("kube", "play", "--configmap", cm_path, pod_path)
    assert played.returncode == 0, played.stderr
    try:
        ready(port)
        with DemoQemu("default_pod-vm") as vm:
            vm.cmd("cont")
            time.sleep(0.3)
            vm.cmd("system_reset")
            time.sleep(1.0)
            deadline = time.monotonic() + 30
            while resets(port, "default_pod-vm") != dict(qmp_resets(vm)):
                assert time.monotonic() < deadline, (resets(port, "default_pod-vm"),
                                                     qmp_resets(vm))
                time.sleep(0.5)
            m = scrape(f"http://127.0.0.1:{port}/metrics")
            [(info, _)] = samples(m, "qtrace_vm_info", vm="default_pod-vm")
            assert info["pid"] == str(vm.pid), "named by its host pid, without hostPID"
            assert (info["namespace"], info["name"]) == ("default", "pod-vm")
            boot = sum(v for _, v in samples(m, "qtrace_kvm_state_writes_total",
                                             vm="default_pod-vm", phase="boot"))
            assert boot > 0 and not samples(m, "qtrace_counting_gaps_total",
                                            vm="default_pod-vm"), "counted from its exec"
            assert samples(m, "qtrace_kernel_hook_info")[0][1] == 1

            # as a kubelet deletes a pod: SIGTERM, a grace period (`kube down` alone kills)
            stop = podman("pod", "stop", "--time", "30", f"qtrace-{port}")
            assert stop.returncode == 0, stop.stderr
            down = podman("kube", "down", pod_path)
            assert down.returncode == 0, down.stderr
            vm.cmd("system_reset")  # the pod is gone: the kernel counts into the pins
            time.sleep(1.0)
            played = podman("kube", "play", "--configmap", cm_path, pod_path)
            assert played.returncode == 0, played.stderr
            ready(port)
            want = dict(qmp_resets(vm))
            deadline = time.monotonic() + 30
            while resets(port, "default_pod-vm") != want:
                assert time.monotonic() < deadline, (resets(port, "default_pod-vm"), want)
                time.sleep(0.5)
            assert want.get("host-qmp-system-reset") == 2
    finally:
        podman("kube", "down", pod_path)
        subprocess.run([*QPROBE, "cleanup", "--pin-root",
                        f"{PIN_TEST_ROOT}/qtrace-test-{port}"], cwd=ROOT, capture_output=True)
    assert wait_settled(before) == {}, "the pod left BPF state behind"
