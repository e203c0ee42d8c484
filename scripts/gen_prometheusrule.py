#!/usr/bin/env python3
"""Write deploy/kubernetes/prometheusrule.yaml from exporters/prometheus/qtrace-alerts.yml:
the prometheus-operator's PrometheusRule holds the very groups the rule file holds, so the
rules have one source.  tests/unit/test_kubernetes_manifests.py fails when the committed
file is not what this prints.  Usage: python3 scripts/gen_prometheusrule.py > FILE"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "exporters" / "prometheus" / "qtrace-alerts.yml"
HEADER = ("# Generated from exporters/prometheus/qtrace-alerts.yml by "
          "scripts/gen_prometheusrule.py:\n# edit the rule file, then run the script.\n")


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None  # PromQL and descriptions stay readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def prometheus_rule(rules_text: str) -> str:
    groups = yaml.safe_load(rules_text)["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "qtrace", "namespace": "qtrace",
                     "labels": {"app.kubernetes.io/name": "qtrace",
                                "app.kubernetes.io/component": "exporter",
                                "prometheus": "k8s", "role": "alert-rules"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(prometheus_rule(RULES.read_text()))
