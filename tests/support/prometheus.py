"""A real Prometheus (Debian's) for the tests: scraping qtrace daemons every second with the
project's recording and alert rules, evaluated every second."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

from support import ROOT
from support.caps import require
from support.processes import popen
from support.web import free_port, http_get

RULES = ROOT / "exporters" / "prometheus" / "qtrace-alerts.yml"


class Prometheus:
    def __init__(self, tmp: Path, target_ports: list[int], **scrape: object):
        """One job, "qtrace" (the name the rules select), scraping each port on loopback;
        scrape: more of the scrape config (scheme, tls_config, basic_auth)."""
        exe = shutil.which("prometheus")
        require("prometheus", exe is not None, "apt-get install prometheus")
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api/v1"
        conf = tmp / "prometheus.yml"
        conf.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "qtrace", "static_configs": [
                {"targets": [f"127.0.0.1:{port}" for port in target_ports]}], **scrape}],
        }))
        self.proc = popen(
            [exe, f"--config.file={conf}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                http_get(f"http://127.0.0.1:{self.port}/-/ready", 2)
                break
            except OSError:
                assert time.monotonic() < deadline, "prometheus did not start"
                assert self.proc.poll() is None, "prometheus exited"
                time.sleep(0.3)

    def firing(self, alert: str) -> list[dict]:
        data = json.loads(http_get(f"{self.api}/alerts"))["data"]["alerts"]
        return [a["labels"] for a in data
                if a["labels"].get("alertname") == alert and a["state"] == "firing"]

    def query(self, expr: str) -> list[dict]:
        q = urllib.parse.urlencode({"query": expr})
        return json.loads(http_get(f"{self.api}/query?{q}"))["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
