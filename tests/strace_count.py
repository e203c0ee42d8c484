"""An independent count of KVM state writes: `strace -f -y -e trace=ioctl` output.

strace names each ioctl itself (its own copy of <linux/kvm.h>): a number qtrace got wrong
shows up as a different name, never as the same mistake on both sides.
"""

from __future__ import annotations

import re
from collections import Counter

from qtrace_bpf.kvm_ioctls import STATE_WRITE_NAMES

# 3795  ioctl(14<anon_inode:kvm-vcpu:1>, KVM_SET_CPUID2, {nent=23, ...}) = 0
_CALL = re.compile(r"^(?P<tid>\d+)\s+ioctl\((?P<fd>\d+)<(?P<path>[^>]*)>, "
                   r"(?P<cmd>[A-Z][A-Z0-9_]*), (?P<arg>[^,)]+)")
_UNFINISHED = re.compile(r"^(?P<tid>\d+)\s+(?P<call>ioctl\(.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(?P<tid>\d+)\s+<\.\.\. ioctl resumed>(?P<rest>.*)$")
_RET = re.compile(r"\)\s+= (?P<ret>-?\d+)")
_VCPU = re.compile(r"kvm-vcpu:(\d+)")


def strace_argv(out: str) -> list[str]:
    return ["strace", "-f", "-y", "-e", "trace=ioctl", "-o", out]


def count_state_writes(path: str) -> Counter:
    """(vcpu or None, ioctl name as strace decodes it) -> successful state writes."""
    pending: dict[str, str] = {}
    counts: Counter = Counter()
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
        if not call or not ret or int(ret.group("ret")) < 0:
            continue
        name = call.group("cmd")
        if name not in STATE_WRITE_NAMES:
            continue
        if name == "KVM_CREATE_VCPU":
            vcpu: int | None = int(call.group("arg"), 0)
        else:
            v = _VCPU.search(call.group("path"))
            vcpu = int(v.group(1)) if v else None
        counts[(vcpu, name)] += 1
    return counts
