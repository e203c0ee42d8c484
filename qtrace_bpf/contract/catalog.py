"""The probe catalog (probes/catalog.toml) as typed data.

The catalog, not the code, says which QEMU function means which event; the BPF side
only knows a handful of actions (enum action in probes/qtrace.h, read through abi).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources

from qtrace_bpf.contract import abi
from qtrace_bpf.contract.kvm_ioctls import BY_NAME

# What an argument of a probed function may mean (catalog `arg1`/`arg2`): how the event
# shows it.  Two are read by the kernel too (RESET_CAUSE_ARG, PUT_LEVEL_ARG in qtrace.h).
ARG_MEANINGS = ("shutdown_cause", "level", "hex")
KERNEL_ARGS = {"reset": (abi.RESET_CAUSE_ARG, "shutdown_cause"),
               "put": (abi.PUT_LEVEL_ARG, "level")}


@dataclass(frozen=True)
class Probe:
    slot: int
    event: str
    functions: tuple[str, ...]
    action: str
    what: str = ""
    lost: str = ""  # what is lost where it does not resolve
    arg1: str | None = None
    arg2: str | None = None
    inlined: tuple[str, ...] = ()
    since: str = ""  # first QEMU version that has the function
    attach_inlined: bool = False  # also probe inlined instances found in DWARF
    usdt: tuple[str, ...] = ()  # static probes ("provider:name") used instead, where present

    @property
    def action_id(self) -> int:
        return abi.ACTIONS[self.action]

    @property
    def has_return(self) -> bool:
        """A uretprobe too: qtrace.h's RETURN_ACTIONS."""
        return bool(abi.RETURN_ACTIONS & (1 << self.action_id))


@dataclass(frozen=True)
class Expect:
    """A state write QEMU makes only in some lifecycle phases (catalog `[[expect]]`): seen
    in any other phase it is unexpected.  `source` names the QEMU code the rule comes from."""

    ioctl: str
    phases: frozenset[str]
    source: str = ""


@dataclass(frozen=True)
class Catalog:
    probes: tuple[Probe, ...] = field(default_factory=tuple)
    expects: tuple[Expect, ...] = field(default_factory=tuple)

    def unexpected(self, ioctl: str, phase: str) -> bool:
        """True when a write of `ioctl` in `phase` breaks an [[expect]] rule."""
        return any(e.ioctl == ioctl and phase not in e.phases for e in self.expects)

    @property
    def functions(self) -> list[str]:
        """Every function any probe may use (what the resolver looks up)."""
        return [fn for p in self.probes for fn in p.functions]

    def by_slot(self, slot: int) -> Probe:
        return self.probes[slot]

    def by_event(self, event: str) -> Probe:
        for p in self.probes:
            if p.event == event:
                return p
        raise KeyError(event)


def version_tuple(version: str | None) -> tuple[int, ...]:
    """'7.2.22 (Debian 1:7.2+dfsg)' -> (7, 2, 22); () when unknown."""
    head = (version or "").split(" ", 1)[0]
    out = []
    for part in head.split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def absent_in(probe: Probe, version: str | None) -> bool:
    """True when this QEMU predates the probe's function (catalog `since`)."""
    have, since = version_tuple(version), version_tuple(probe.since)
    return bool(have and since and have < since)


def parse_catalog(text: str) -> Catalog:
    data = tomllib.loads(text)
    probes = []
    known = {f.name for f in fields(Probe)} - {"slot"}
    for slot, raw in enumerate(data.get("probe", [])):
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"catalog: {raw.get('event')}: unknown key(s) {', '.join(unknown)}")
        if raw["action"] not in abi.ACTIONS:
            raise ValueError(f"catalog: {raw['event']}: unknown action {raw['action']!r}")
        if raw.get("attach_inlined") and abi.RETURN_ACTIONS & (1 << abi.ACTIONS[raw["action"]]):
            raise ValueError(f"catalog: {raw['event']}: attach_inlined needs an entry-only "
                             "action (inlined code has no return to probe)")
        for n in (1, 2):
            meaning = raw.get(f"arg{n}")
            if meaning is not None and meaning not in ARG_MEANINGS:
                raise ValueError(f"catalog: {raw['event']}: arg{n} = {meaning!r}: not one of "
                                 f"{', '.join(ARG_MEANINGS)}")
        if raw.get("usdt") and (raw["action"] != "mark" or raw.get("arg1") or raw.get("arg2")):
            raise ValueError(f"catalog: {raw['event']}: a USDT site replaces only a `mark` "
                             "probe without arguments (it has no return, and its arguments "
                             "are not in rdi/rsi)")
        if raw["action"] in KERNEL_ARGS:
            n, meaning = KERNEL_ARGS[raw["action"]]
            if raw.get(f"arg{n}") != meaning:
                raise ValueError(f"catalog: {raw['event']}: action {raw['action']} reads arg{n} "
                                 f"in the kernel (qtrace.h): it must be arg{n} = {meaning!r}")
        probes.append(
            Probe(
                slot=slot,
                event=raw["event"],
                functions=tuple(raw["functions"]),
                action=raw["action"],
                what=raw.get("what", ""),
                lost=raw.get("lost", ""),
                arg1=raw.get("arg1"),
                arg2=raw.get("arg2"),
                inlined=tuple(raw.get("inlined", ())),
                since=raw.get("since", ""),
                attach_inlined=bool(raw.get("attach_inlined", False)),
                usdt=tuple(raw.get("usdt", ())),
            )
        )
    expects = tuple(parse_expect(raw) for raw in data.get("expect", []))
    if len(probes) > abi.MAX_SLOTS:
        raise ValueError(f"catalog: {len(probes)} probes, the BPF program has {abi.MAX_SLOTS} "
                         "slots")
    return Catalog(tuple(probes), expects)


def parse_expect(raw: dict) -> Expect:
    unknown = sorted(set(raw) - {"ioctl", "phases", "source"})
    if unknown:
        raise ValueError(f"catalog: expect {raw.get('ioctl')}: unknown key(s) {', '.join(unknown)}")
    name, phases = raw.get("ioctl"), raw.get("phases")
    entry = BY_NAME.get(name or "")
    if entry is None or not entry.state_write:
        raise ValueError(f"catalog: expect: {name!r} is not a state-writing KVM ioctl "
                         "(qtrace_bpf/contract/kvm_ioctls.py)")
    if not phases or not set(phases) <= set(abi.PHASES):
        raise ValueError(f"catalog: expect {name}: phases {phases!r}: a non-empty list of "
                         f"{', '.join(abi.PHASES)}")
    if not raw.get("source"):
        raise ValueError(f"catalog: expect {name}: say which QEMU code the rule comes from "
                         "(source = \"function, file, versions\")")
    return Expect(name, frozenset(phases), raw["source"])


def load_catalog() -> Catalog:
    text = resources.files("qtrace_bpf.probes").joinpath("catalog.toml").read_text()
    return parse_catalog(text)


def bpf_source(name: str = "qtrace.bpf.c") -> str:
    return resources.files("qtrace_bpf.probes").joinpath(name).read_text()
