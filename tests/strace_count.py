"""An independent count of KVM state writes: `strace -f -y -X raw -e trace=ioctl` output."""

from __future__ import annotations

import re
from collections import Counter

from qtrace_bpf.kvm_ioctls import STATE_WRITES, ioctl_name

# 3795  ioctl(14<anon_inode:kvm-vcpu:1>, 0x4008ae90, {nent=23, ...}) = 0
_CALL = re.compile(r"^(?P<tid>\d+)\s+ioctl\((?P<fd>\d+)<(?P<path>[^>]*)>, "
                   r"(?P<cmd>0x[0-9a-f]+|\d+), (?P<arg>\S+?)[,)]")
_UNFINISHED = re.compile(r"^(?P<tid>\d+)\s+(?P<call>ioctl\(.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(?P<tid>\d+)\s+<\.\.\. ioctl resumed>(?P<rest>.*)$")
_RET = re.compile(r"\)\s+= (?P<ret>-?\d+)")
_VCPU = re.compile(r"kvm-vcpu:(\d+)")


def count_state_writes(path: str) -> Counter:
    """(vcpu or None, ioctl name) -> successful state writes, as QEMU made them."""
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
        if not call or not ret:
            continue
        cmd = int(call.group("cmd"), 0)
        if cmd not in STATE_WRITES or int(ret.group("ret")) < 0:
            continue
        name = ioctl_name(cmd)
        if name == "KVM_CREATE_VCPU":
            vcpu: int | None = int(call.group("arg"), 0)
        else:
            v = _VCPU.search(call.group("path"))
            vcpu = int(v.group(1)) if v else None
        counts[(vcpu, name)] += 1
    return counts
