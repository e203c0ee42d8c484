"""The kernel/user contract, read from probes/qtrace.h (the header the BPF C includes).

Numbers are never typed twice: each `#define NAME value` and each enumerator of the header
becomes a module attribute of the same name (abi.K_EXEC, abi.PH_RESET, ...), and the name
lists below are derived from the C names.  Struct layouts come from BCC, which compiles the
same header (program.py); nothing here mirrors a struct.
"""

from __future__ import annotations

import re
from importlib import resources

HEADER = "qtrace.h"
_DEFINE = re.compile(r"^#define\s+([A-Z][A-Z0-9_]*)\s+(0x[0-9a-fA-F]+|\d+)(?:ULL|UL|U)?\s*(?://.*)?$")
_ENUM = re.compile(r"\benum\s+(\w+)\s*\{(.*?)\}", re.S)
_ENUMERATOR = re.compile(r"([A-Z][A-Z0-9_]*)\s*=\s*(0x[0-9a-fA-F]+|\d+)")


def header_path() -> str:
    return str(resources.files("qtrace_bpf.probes").joinpath(HEADER))


def include_dir() -> str:
    """Where BCC finds qtrace.h (-I)."""
    return str(resources.files("qtrace_bpf.probes"))


def parse_header(text: str) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(#define constants, enum name -> {enumerator: value}); every enumerator needs `= N`."""
    text_nc = re.sub(r"//[^\n]*", "", text)
    defines: dict[str, int] = {}
    for line in text.splitlines():
        m = _DEFINE.match(line.strip())
        if m:
            defines[m.group(1)] = int(m.group(2), 0)
    enums: dict[str, dict[str, int]] = {}
    for m in _ENUM.finditer(text_nc):
        body = [part.strip() for part in m.group(2).split(",") if part.strip()]
        members = {}
        for part in body:
            em = _ENUMERATOR.fullmatch(part)
            if em is None:
                raise ValueError(f"{HEADER}: enum {m.group(1)}: {part!r} has no explicit value")
            members[em.group(1)] = int(em.group(2), 0)
        enums[m.group(1)] = members
    return defines, enums


def _names(members: dict[str, int], prefix: str, sep: str = "_") -> tuple[str, ...]:
    """{PH_BOOT: 0, PH_RESET: 1} -> ("boot", "reset"): dense, in value order."""
    by_value = {v: k.removeprefix(prefix).lower().replace("_", sep) for k, v in members.items()}
    if sorted(by_value) != list(range(len(by_value))):
        raise ValueError(f"{HEADER}: {prefix}* values are not 0..{len(by_value) - 1}")
    return tuple(by_value[i] for i in range(len(by_value)))


def _load() -> None:
    with open(header_path()) as f:
        defines, enums = parse_header(f.read())
    g = globals()
    g.update(defines)
    for members in enums.values():
        g.update(members)
    g["ENUMS"] = enums
    g["PHASES"] = _names(enums["phase"], "PH_")
    g["ACTIONS"] = {k.removeprefix("ACT_").lower(): v for k, v in enums["action"].items()}
    g["KINDS"] = {v: k.removeprefix("K_").lower() for k, v in enums["kind"].items()}
    g["MAPS"] = _names(enums["map_id"], "M_")
    causes = {k: v for k, v in defines.items() if k.startswith("CAUSE_")}
    g["CAUSES"] = _names(causes, "CAUSE_", "-")
    vals = {k: v for k, v in defines.items() if k.startswith("V_")}
    g["VALUES"] = _names(vals, "V_")


# Filled from the header by _load(); declared for readers and type checkers.
QTRACE_ABI_VERSION: int
PH_BOOT: int
PH_RESET: int
PH_HOTPLUG: int
PH_MIGRATION: int
PH_RUNTIME: int
K_LIFECYCLE: int
K_STATE_WRITE: int
K_EXEC: int
K_EXIT: int
FOLLOWUP_FLAG: int
MAX_SLOTS: int
USER_VM_ID_BASE: int
ARG_UNKNOWN: int
NVALS: int
NCAUSES: int
NMAPS: int
ENUMS: dict[str, dict[str, int]]
PHASES: tuple[str, ...]
ACTIONS: dict[str, int]
KINDS: dict[int, str]
MAPS: tuple[str, ...]
CAUSES: tuple[str, ...]
VALUES: tuple[str, ...]

_load()

# Maps whose keys start with the VM id: Tracker.forget() deletes a VM's entries from each.
# A test fails if a map of the program keyed by `vm` is missing here.
PER_VM_MAPS = ("vcpu_fds", "last_val", "write_counts", "error_counts", "lifecycle_counts",
               "reset_counts")
