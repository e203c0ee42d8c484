"""An independent count of KVM state writes: `strace -f -y -ttt -e trace=ioctl` output.

strace names each ioctl itself (its own copy of <linux/kvm.h>): a number qtrace got wrong
shows up as a different name, never as the same mistake on both sides.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from qtrace_bpf.contract.kvm_ioctls import STATE_WRITE_NAMES

# 3795  1796549415.193866 ioctl(14<anon_inode:kvm-vcpu:1>, KVM_SET_CPUID2, {nent=23, ...}) = 0
_TS = r"(?:(?P<ts>\d+\.\d+)\s+)?"
_CALL = re.compile(r"^(?P<tid>\d+)\s+" + _TS + r"ioctl\((?P<fd>\d+)<(?P<path>[^>]*)>, "
                   r"(?P<cmd>[A-Z][A-Z0-9_]*), (?P<arg>[^,)]+)")
_UNFINISHED = re.compile(r"^(?P<tid>\d+)\s+(?P<call>(?:\d+\.\d+\s+)?ioctl\(.*) "
                         r"<unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(?P<tid>\d+)\s+" + _TS + r"<\.\.\. ioctl resumed>(?P<rest>.*)$")
_RET = re.compile(r"\)\s+= (?P<ret>-?\d+)")
_VCPU = re.compile(r"kvm-vcpu:(\d+)")


def strace_argv(out: str) -> list[str]:
    return ["strace", "-f", "-y", "-ttt", "-e", "trace=ioctl", "-o", out]


@dataclass(frozen=True)
class Call:
    """One state-writing ioctl as strace saw it (ts: when it was entered)."""

    tid: int
    ts: float
    vcpu: int | None
    name: str
    ret: int


def state_write_calls(path: str) -> list[Call]:
    """Every state-writing ioctl, failed ones too, in the order strace logged them."""
    pending: dict[str, str] = {}
    out: list[Call] = []
    with open(path) as f:
        lines = [ln.rstrip("\n") for ln in f]
    for line in lines:
        m = _UNFINISHED.match(line)
        if m:
            pending[m.group("tid")] = f"{m.group('tid')}  {m.group('call')}"
            continue
        m = _RESUMED.match(line)
        if m and m.group("tid") in pending:
            line = pending.pop(m.group("tid")) + m.group("rest")
        call = _CALL.match(line)
        ret = _RET.search(line)
        if not call or not ret:
            continue
        name = call.group("cmd")
        if name not in STATE_WRITE_NAMES:
            continue
        if name == "KVM_CREATE_VCPU":
            vcpu: int | None = int(call.group("arg"), 0)
        else:
            v = _VCPU.search(call.group("path"))
            vcpu = int(v.group(1)) if v else None
        out.append(Call(int(call.group("tid")), float(call.group("ts") or 0), vcpu, name,
                        int(ret.group("ret"))))
    return out


def count_state_writes(path: str) -> Counter:
    """(vcpu or None, ioctl name as strace decodes it) -> successful state writes."""
    return Counter((c.vcpu, c.name) for c in state_write_calls(path) if c.ret >= 0)


def strace_times(events: list[dict], path: str) -> list[float]:
    """strace's timestamp of each state_write event of `qprobe watch --json`, in the same
    order: the n-th write of a thread in one is the n-th in the other (names checked)."""
    by_tid: dict[int, list[Call]] = defaultdict(list)
    for c in state_write_calls(path):
        by_tid[c.tid].append(c)
    seen: Counter = Counter()
    out = []
    for e in events:
        if e["kind"] != "state_write":
            continue
        calls = by_tid[e["tid"]]
        i = seen[e["tid"]]
        seen[e["tid"]] += 1
        assert i < len(calls) and calls[i].name == e["event"], (e, calls[i:i + 1])
        out.append(calls[i].ts)
    return out
