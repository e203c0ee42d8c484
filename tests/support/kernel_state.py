"""The kernel's BPF state, read by the tests that promise to leave it as they found it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

from support.caps import require


def _bpftool(*what: str) -> list[dict]:
    out = subprocess.run(["bpftool", "-j", *what], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    return json.loads(out.stdout)


def bpf_state() -> dict[str, set]:
    """What the kernel holds of BPF now, by id: programs, maps, links, perf-event
    attachments (BCC's uprobes and tracepoints are perf events: `bpftool perf`), uprobe
    events in tracefs, and pins under /sys/fs/bpf."""
    require("bpftool", shutil.which("bpftool") is not None, "apt-get install bpftool")
    state = {
        "progs": {(p["id"], p.get("name", "")) for p in _bpftool("prog", "show")},
        "maps": {(m["id"], m.get("name", "")) for m in _bpftool("map", "show")},
        "links": {(lk["id"], lk.get("type", "")) for lk in _bpftool("link", "show")},
        "perf": {(e.get("pid"), e.get("fd"), e.get("prog_id"))
                 for e in _bpftool("perf", "show")},
        "uprobe_events": set(),
        "pins": set(),
    }
    try:
        with open("/sys/kernel/tracing/uprobe_events") as f:
            state["uprobe_events"] = {ln.strip() for ln in f if ln.strip()}
    except OSError:
        pass
    for dirpath, _dirs, files in os.walk("/sys/fs/bpf"):
        state["pins"] |= {os.path.join(dirpath, f) for f in files}
    return state


def added(before: dict[str, set], after: dict[str, set]) -> dict[str, set]:
    """What `after` holds that `before` did not (empty dict: nothing)."""
    return {k: after[k] - before[k] for k in after if after[k] - before[k]}


def wait_settled(before: dict[str, set], timeout: float = 10.0) -> dict[str, set]:
    """Programs and maps go when their last fd closes: give the kernel a moment."""
    deadline = time.monotonic() + timeout
    left = added(before, bpf_state())
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = added(before, bpf_state())
    return left
