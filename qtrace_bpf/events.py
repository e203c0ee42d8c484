"""Ring-buffer records -> event dicts (the JSON contract) and their one-line rendering."""

from __future__ import annotations

import ctypes as ct
import time
from dataclasses import dataclass

from .catalog import Catalog
from .kvm_ioctls import ioctl_name
from .qemu_abi import PUT_LEVELS, cause_name

PHASES = ("boot", "reset", "hotplug", "migration", "runtime")
K_LIFECYCLE, K_STATE_WRITE, K_EXEC, K_EXIT = 1, 2, 3, 4
FOLLOWUP_FLAG = 0x100  # reset_counts: a guest reset right after a host-requested one
# Decoded values, in the order of vals[] in qtrace.bpf.c.
VALUES = ("apic_base", "tsc_khz", "msr_tsc", "msr_tsc_deadline")


class RawEvent(ct.Structure):
    """Mirror of `struct event` in probes/qtrace.bpf.c."""

    _fields_ = [
        ("ts", ct.c_uint64), ("tgid", ct.c_uint32), ("tid", ct.c_uint32),
        ("kind", ct.c_uint32), ("id", ct.c_uint32), ("vcpu", ct.c_int32),
        ("phase", ct.c_uint32), ("cause", ct.c_uint32), ("level", ct.c_uint32),
        ("ret", ct.c_int64), ("arg1", ct.c_uint64), ("arg2", ct.c_uint64),
        ("fd", ct.c_uint32), ("have", ct.c_uint32), ("known", ct.c_uint32),
        ("changed", ct.c_uint32), ("vals", ct.c_uint64 * 4),
    ]


def phase_name(value: int) -> str:
    return PHASES[value] if 0 <= value < len(PHASES) else f"phase-{value}"


@dataclass
class Decoder:
    """Turns raw records into contract dicts for one host (VM names by pid)."""

    catalog: Catalog
    vm_names: dict[int, str]
    qemu_versions: dict[int, str | None]
    functions: dict[int, str]  # probe slot -> the function attached for it
    # CLOCK_MONOTONIC (bpf_ktime_get_ns) -> wall clock
    _offset: float = time.time() - time.monotonic()

    def decode(self, data: bytes) -> dict:
        raw = RawEvent.from_buffer_copy(data[: ct.sizeof(RawEvent)])
        version = self.qemu_versions.get(raw.tgid)
        ev: dict = {
            "ts": round(raw.ts / 1e9 + self._offset, 6),
            "vm": self.vm_names.get(raw.tgid, f"pid-{raw.tgid}"),
            "pid": raw.tgid,
            "tid": raw.tid,
            "vcpu": raw.vcpu if raw.vcpu >= 0 else None,
            "kind": "state_write" if raw.kind == K_STATE_WRITE else "lifecycle",
            "phase": phase_name(raw.phase),
        }
        if raw.phase == 1:
            ev["cause"] = cause_name(raw.cause, version)
        if raw.kind == K_STATE_WRITE:
            ev["event"] = ioctl_name(raw.id)
            ev["ioctl"] = f"{raw.id:#x}"
            ev["fd"] = raw.fd
            ev["ret"] = raw.ret
            if raw.ret < 0:
                ev["error"] = True
            if raw.level:
                ev["level"] = raw.level
            if ev["event"] == "KVM_CREATE_VCPU":
                ev["vcpu"] = int(raw.arg1)
            for i, name in enumerate(VALUES):
                if raw.have & (1 << i):
                    val = int(raw.vals[i])
                    ev[name] = val if name == "tsc_khz" else f"{val:#x}"
                    ev[f"{name}_changed"] = bool(raw.changed & (1 << i)) \
                        if raw.known & (1 << i) else None
        else:
            probe = self.catalog.by_slot(raw.id)
            ev["event"] = probe.event
            ev["function"] = self.functions.get(raw.id, probe.functions[0])
            if probe.arg1 == "shutdown_cause":
                ev["cause"] = cause_name(int(raw.arg1), version)
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
        for key in VALUES:
            if key in ev:
                ch = ev.get(f"{key}_changed")
                mark = "" if ch is None else (" changed" if ch else " unchanged")
                detail.append(f"{key}={ev[key]}{mark}")
        if ev.get("error"):
            detail.append(f"FAILED ret={ev['ret']}")
        if ev["event"] == "KVM_CREATE_VCPU":
            detail.append(f"fd={ev['ret']}")
    return f"{t}  {vcpu:<7} {phase:<32} {name:<24} {' '.join(detail)}".rstrip()
