"""deploy/kubernetes as a cluster would take it: every core object valid against
Kubernetes' own schemas (kubernetes-validate, strict), the prometheus-operator objects
against their CRDs' schemas (cloudcoil's models: an unknown key is an error too), the
PrometheusRule generated from the rule file, the DaemonSet's capabilities those of the
systemd unit, its probes and its resources those the daemon serves and the benchmarks
measured.  Nothing here needs a cluster: what ran for real is tests/integration/
test_kubernetes_pod.py (the same pod spec under podman)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml
from support import ROOT
from support.caps import require

from qtrace_bpf.commands.config import load_config

DEPLOY = ROOT / "deploy" / "kubernetes"
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (PyPI only: the venv "
    "of scripts/setup.sh has it)")


def documents() -> dict[str, dict]:
    """kind -> the object, for every YAML file under deploy/kubernetes."""
    out = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in out, f"two {doc['kind']} objects"
            out[doc["kind"]] = doc
    return out


def unit_capabilities() -> set[str]:
    text = (ROOT / "systemd" / "qtrace.service").read_text()
    line = re.search(r"^AmbientCapabilities=(.*)$", text, re.M).group(1)
    return {c.removeprefix("CAP_") for c in line.split()}


def test_core_objects_are_valid_for_kubernetes():
    docs = documents()
    assert {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service"} <= set(docs)
    for kind in ("Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service"):
        kubernetes_validate.validate(docs[kind], kubernetes_validate.latest_version(),
                                     strict=True)


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PrometheusRule"])
def test_operator_objects_are_valid_for_their_crds(kind):
    models = pytest.importorskip("cloudcoil.models.prometheus_operator.v1",
                                 reason="cloudcoil-models-prometheus-operator is not installed")
    doc = documents()[kind]
    back = getattr(models, kind).model_validate(doc).model_dump(
        by_alias=True, exclude_unset=True, mode="json")
    assert back == doc, "a key the CRD does not know (the model dropped it)"


def test_the_prometheusrule_is_the_rule_file():
    """One source for the rules: the PrometheusRule is generated from the rule file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gen_prometheusrule", ROOT / "scripts" / "gen_prometheusrule.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rules = (ROOT / "exporters" / "prometheus" / "qtrace-alerts.yml").read_text()
    assert (DEPLOY / "prometheusrule.yaml").read_text() == gen.prometheus_rule(rules), \
        "run: python3 scripts/gen_prometheusrule.py > deploy/kubernetes/prometheusrule.yaml"
    assert documents()["PrometheusRule"]["spec"]["groups"] == yaml.safe_load(rules)["groups"]


def test_the_prometheusrules_groups_pass_promtool(tmp_path):
    promtool = shutil.which("promtool")
    require("promtool", promtool is not None, "apt-get install prometheus")
    out = tmp_path / "rules.yml"
    out.write_text(yaml.safe_dump({"groups": documents()["PrometheusRule"]["spec"]["groups"]}))
    r = subprocess.run([promtool, "check", "rules", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def pod() -> dict:
    return documents()["DaemonSet"]["spec"]["template"]["spec"]


def test_the_daemon_has_the_units_capabilities_and_the_loader_what_its_prestart_has():
    daemon, = pod()["containers"]
    load, = pod()["initContainers"]
    for c in (daemon, load):
        sc = c["securityContext"]
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert set(daemon["securityContext"]["capabilities"]["add"]) == unit_capabilities()
    # the unit's ExecStartPre=+ runs as full root; here only what loading needs: fentry on a
    # module's BTF and perf events under perf_event_paranoid=3 take CAP_SYS_ADMIN
    assert set(load["securityContext"]["capabilities"]["add"]) == \
        unit_capabilities() | {"SYS_ADMIN"}
    assert load["command"][:2] == ["qprobe", "load"]
    assert daemon["command"][:2] == ["qprobe", "daemon"]
    assert not pod().get("hostPID") and not pod().get("hostNetwork")


def test_the_config_reads_the_hosts_proc_where_it_is_mounted():
    daemon, = pod()["containers"]
    mounts = {m["name"]: m for m in daemon["volumeMounts"]}
    volumes = {v["name"]: v for v in pod()["volumes"]}
    conf = tomllib.loads(documents()["ConfigMap"]["data"]["qtrace.toml"])
    proc = next(n for n, m in mounts.items() if m["mountPath"] == conf["proc_root"])
    assert volumes[proc]["hostPath"]["path"] == "/proc" and mounts[proc]["readOnly"]
    pins = next(n for n, m in mounts.items() if conf["bpf_pin_root"].startswith(m["mountPath"]))
    assert volumes[pins]["hostPath"]["path"] == "/sys/fs/bpf", "pins must outlive the pod"
    assert conf["kubevirt_names"] is True
    cfg = load_config(None, **{**conf, "proc_root": "/proc"})  # the keys and values check
    assert cfg.host_port[1] == daemon["ports"][0]["containerPort"]


def test_probes_ask_what_the_daemon_answers():
    daemon, = pod()["containers"]
    assert daemon["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert daemon["startupProbe"]["httpGet"]["path"] == "/-/healthy"
    assert daemon["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    service = documents()["Service"]
    monitor = documents()["ServiceMonitor"]["spec"]
    assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert monitor["endpoints"][0]["honorLabels"] is True, \
        "qtrace_vm_info's namespace/name would become exported_namespace/exported_name"
    # job="qtrace": the name the rules' qtrace:up selects
    assert service["metadata"]["labels"][monitor["jobLabel"]] == "qtrace"


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_resources_are_sized_from_the_benchmarks_and_the_unit():
    results = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    [rest] = [t for t in results["tables"] if t["title"].startswith("The daemon at rest")]
    rss = max(row[2]["max"] for row in rest["rows"].values())  # MB, any number of VMs
    daemon, = pod()["containers"]
    res = daemon["resources"]
    assert mebibytes(res["requests"]["memory"]) >= 1.5 * rss, (res, rss)
    unit = (ROOT / "systemd" / "qtrace.service").read_text()
    assert res["limits"]["memory"] == re.search(r"^MemoryMax=(\d+)M$", unit, re.M).group(1) + "Mi"
    quota = int(re.search(r"^CPUQuota=(\d+)%$", unit, re.M).group(1))
    assert res["limits"]["cpu"] == f"{quota * 10}m"
