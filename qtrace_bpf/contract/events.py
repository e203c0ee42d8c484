"""Ring-buffer events (struct event, as BCC compiled it) -> the JSON contract, and its one-line
rendering.  Numbers are named by decoders.py; nothing here knows the struct's layout."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qtrace_bpf.contract import abi, decoders
from qtrace_bpf.contract.catalog import Catalog
from qtrace_bpf.contract.decoders import PUT_LEVELS


@dataclass
class Decoder:
    """Turns ring-buffer events into contract dicts (VM names from the tracker)."""

    catalog: Catalog
    vm_name: Callable[[int, int], str]  # (vm id, pid) -> the `vm` label
    functions: Callable[[int], dict[int, str]]  # vm id -> {catalog slot: function probed}
    # CLOCK_MONOTONIC (bpf_ktime_get_ns) -> wall clock
    _offset: float = field(default_factory=lambda: time.time() - time.monotonic())

    def decode(self, raw) -> dict:
        ev: dict = {
            "ts": round(raw.ts / 1e9 + self._offset, 6),
            "vm": self.vm_name(raw.vm, raw.tgid),
            "pid": raw.tgid,
            "tid": raw.tid,
            "vcpu": decoders.vcpu(raw.vcpu),
            "kind": abi.KINDS.get(raw.kind, f"kind-{raw.kind}"),
            "phase": decoders.phase(raw.phase),
        }
        if raw.phase == abi.PH_RESET:
            ev["cause"] = decoders.cause(raw.cause)
        if raw.kind == abi.K_STATE_WRITE:
            ev["event"] = decoders.ioctl(raw.id)
            ev["ioctl"] = f"{raw.id:#x}"
            ev["fd"] = raw.fd
            ev["ret"] = raw.ret
            if raw.ret < 0:
                ev["error"] = True
            elif self.catalog.unexpected(ev["event"], ev["phase"]):
                ev["unexpected"] = True  # outside the phases a catalog [[expect]] rule allows
            if raw.level:
                ev["level"] = raw.level
            if ev["event"] == "KVM_CREATE_VCPU":
                ev["vcpu"] = int(raw.arg1)
            for i, name in enumerate(abi.VALUES):
                if raw.have & (1 << i):
                    val = int(raw.vals[i])
                    ev[name] = val if name == "tsc_khz" else f"{val:#x}"
                    ev[f"{name}_changed"] = bool(raw.changed & (1 << i)) \
                        if raw.known & (1 << i) else None
        elif raw.kind == abi.K_STEP:  # a lifecycle step ended
            ev["event"] = ev["step"] = decoders.step(raw.id)
            ev["seconds"] = round(raw.arg1 / 1e9, 6)
        elif raw.kind == abi.K_LIFECYCLE:
            probe = self.catalog.by_slot(raw.id)
            ev["event"] = probe.event
            ev["function"] = self.functions(raw.vm).get(raw.id, probe.functions[0])
            if raw.arg1 == abi.ARG_UNKNOWN and raw.arg2 == abi.ARG_UNKNOWN:
                # a GCC clone's or an inlined instance's entry: no argument was read
                if probe.arg1 or probe.arg2:
                    ev["args"] = "unknown"
                if probe.arg1 == "shutdown_cause":
                    ev["cause"] = "unknown"
            else:
                if probe.arg1 == "shutdown_cause":
                    ev["cause"] = decoders.cause(int(raw.arg1))
                if probe.arg2 == "level":
                    ev["level"] = int(raw.arg2)
                elif probe.arg2 == "hex":
                    ev["value"] = f"{int(raw.arg2):#x}"
        return ev


def render(ev: dict) -> str:
    """One readable line: time, vCPU, phase, event, detail."""
    usec = int(ev["ts"] * 1e6) % 1000000
    t = time.strftime("%H:%M:%S", time.localtime(ev["ts"])) + f".{usec:06d}"
    vcpu = f"vcpu {ev['vcpu']}" if ev.get("vcpu") is not None else "-"
    phase = ev["phase"] + (f"({ev['cause']})" if ev["phase"] == "reset" else "")
    detail = []
    if ev["kind"] == "step":
        return f"{t}  {vcpu:<7} {phase:<32} {'[' + ev['step'] + ' took]':<24} " \
               f"{ev['seconds'] * 1000:.3f} ms"
    if ev["kind"] == "lifecycle":
        detail.append(f"{ev['function']}()")
        if "cause" in ev and ev["phase"] != "reset":
            detail.append(f"cause={ev['cause']}")
        if "level" in ev:
            detail.append(f"level={ev['level']} ({PUT_LEVELS.get(ev['level'], '?')})")
        if "value" in ev:
            detail.append(f"value={ev['value']}")
        name = f"[{ev['event']}]"
    else:
        name = ev["event"]
        for key in abi.VALUES:
            if key in ev:
                ch = ev.get(f"{key}_changed")
                mark = "" if ch is None else (" changed" if ch else " unchanged")
                detail.append(f"{key}={ev[key]}{mark}")
        if ev.get("error"):
            detail.append(f"FAILED ret={ev['ret']}")
        if ev.get("unexpected"):
            detail.append(f"UNEXPECTED in {ev['phase']}")
        if ev["event"] == "KVM_CREATE_VCPU":
            detail.append(f"fd={ev['ret']}")
    return f"{t}  {vcpu:<7} {phase:<32} {name:<24} {' '.join(detail)}".rstrip()
