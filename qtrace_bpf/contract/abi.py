"""The kernel/user contract, read from probes/qtrace.h (the header the BPF C includes).

Numbers are never typed twice: each `#define NAME value` and each enumerator of the header
becomes a module attribute of the same name (abi.K_EXEC, abi.PH_RESET, ...), and the name
lists below are derived from the C names.  Each struct becomes a ctypes Structure built
from the header's own field list (STRUCTS), so that a process without BCC (the daemon)
reads the maps and events with the layout the BPF C compiled; tests compare every offset
with gcc's and BCC's.
"""

from __future__ import annotations

import ctypes as ct
import re
from importlib import resources

HEADER = "qtrace.h"
_DEFINE = re.compile(r"^#define\s+([A-Z][A-Z0-9_]*)\s+(0x[0-9a-fA-F]+|\d+)(?:ULL|UL|U)?\s*(?://.*)?$")
_ENUM = re.compile(r"\benum\s+(\w+)\s*\{(.*?)\}", re.S)
_ENUMERATOR = re.compile(r"([A-Z][A-Z0-9_]*)\s*=\s*(0x[0-9a-fA-F]+|\d+)")
# #define NAME (expression): names, numbers, parentheses, << and | only
_DEFINE_EXPR = re.compile(r"^#define\s+([A-Z][A-Z0-9_]*)\s+(\([A-Z0-9_ ()<|]+\))\s*(?://.*)?$")
_TOKEN = re.compile(r"\s*([A-Z][A-Z0-9_]*|\d+|<<|\||\(|\))")


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
    exprs: dict[str, str] = {}
    for line in text.splitlines():
        m = _DEFINE_EXPR.match(line.strip())
        if m:
            exprs[m.group(1)] = m.group(2)
    for m in _ENUM.finditer(text_nc):
        body = [part.strip() for part in m.group(2).split(",") if part.strip()]
        members = {}
        for part in body:
            em = _ENUMERATOR.fullmatch(part)
            if em is None:
                raise ValueError(f"{HEADER}: enum {m.group(1)}: {part!r} has no explicit value")
            members[em.group(1)] = int(em.group(2), 0)
        enums[m.group(1)] = members
    known = {**defines, **{k: v for members in enums.values() for k, v in members.items()}}
    for name, expr in exprs.items():
        defines[name] = _evaluate(expr, known)
    return defines, enums


def _evaluate(expr: str, known: dict[str, int]) -> int:
    """A constant expression of the header: (1 << ACT_RESET) | (1 << ACT_PUT)."""
    tokens, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"{HEADER}: cannot read {expr!r}")
        tok = m.group(1)
        if tok[0].isalpha() or tok[0] == "_":
            if tok not in known:
                raise ValueError(f"{HEADER}: {expr!r}: {tok} is not defined above")
            tok = str(known[tok])
        tokens.append(tok)
        pos = m.end()
    return int(eval(" ".join(tokens), {"__builtins__": {}}))  # noqa: S307 - digits, <<, |


_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{(.*?)\};", re.S)
_FIELD = re.compile(r"^(u8|u16|u32|s32|u64|s64)\s+(\w+)(?:\[(\w+)\])?$")
CTYPES: dict[str, type] = {"u8": ct.c_uint8, "u16": ct.c_uint16, "u32": ct.c_uint32,
                           "s32": ct.c_int32, "u64": ct.c_uint64, "s64": ct.c_int64,
                           "int": ct.c_int}


def parse_structs(text: str, known: dict[str, int]) -> dict[str, type]:
    """struct name -> ctypes Structure, fields in order, C's natural alignment (x86-64)."""
    text_nc = re.sub(r"//[^\n]*", "", text)
    out: dict[str, type] = {}
    for m in _STRUCT.finditer(text_nc):
        fields = []
        for decl in (d.strip() for d in m.group(2).split(";")):
            if not decl:
                continue
            f = _FIELD.match(" ".join(decl.split()))
            if f is None:
                raise ValueError(f"{HEADER}: struct {m.group(1)}: cannot read {decl!r}")
            ctype = CTYPES[f.group(1)]
            if f.group(3):
                n = f.group(3)
                ctype = ctype * (int(n) if n.isdigit() else known[n])
            fields.append((f.group(2), ctype))
        out[m.group(1)] = type(m.group(1), (ct.Structure,), {"_fields_": fields})
    return out


def _names(members: dict[str, int], prefix: str, sep: str = "_") -> tuple[str, ...]:
    """{PH_BOOT: 0, PH_RESET: 1} -> ("boot", "reset"): dense, in value order."""
    by_value = {v: k.removeprefix(prefix).lower().replace("_", sep) for k, v in members.items()}
    if sorted(by_value) != list(range(len(by_value))):
        raise ValueError(f"{HEADER}: {prefix}* values are not 0..{len(by_value) - 1}")
    return tuple(by_value[i] for i in range(len(by_value)))


def _load() -> None:
    with open(header_path()) as f:
        text = f.read()
    defines, enums = parse_header(text)
    g = globals()
    STRUCTS.update(parse_structs(text, {**defines, **{k: v for m in enums.values()
                                                      for k, v in m.items()}}))
    g.update(defines)
    for members in enums.values():
        g.update(members)
    g["PHASES"] = _names(enums["phase"], "PH_")
    g["ACTIONS"] = {k.removeprefix("ACT_").lower(): v for k, v in enums["action"].items()}
    g["KINDS"] = {v: k.removeprefix("K_").lower() for k, v in enums["kind"].items()}
    g["MAPS"] = _names(enums["map_id"], "M_")
    causes = {k: v for k, v in defines.items() if k.startswith("CAUSE_")}
    g["CAUSES"] = _names(causes, "CAUSE_", "-")
    vals = {k: v for k, v in defines.items() if k.startswith("V_")}
    g["VALUES"] = _names(vals, "V_")
    g["STEPS"] = _names(enums["step"], "S_")
    g["DURATION_BUCKETS"] = tuple(defines[f"DUR_BUCKET_{i}_US"] / 1e6
                                  for i in range(defines["NDUR_BUCKETS"]))


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
K_STEP: int
S_RESET: int
S_HOTPLUG: int
S_MIGRATION: int
NDUR_BUCKETS: int
DUR_SUM: int
FOLLOWUP_FLAG: int
MAX_SLOTS: int
USER_VM_ID_BASE: int
ARG_UNKNOWN: int
RETURN_ACTIONS: int
RESET_CAUSE_ARG: int
PUT_LEVEL_ARG: int
NVALS: int
NCAUSES: int
NMAPS: int
PHASES: tuple[str, ...]
ACTIONS: dict[str, int]
KINDS: dict[int, str]
MAPS: tuple[str, ...]
CAUSES: tuple[str, ...]
VALUES: tuple[str, ...]
STEPS: tuple[str, ...]  # enum step: reset, hotplug, migration
DURATION_BUCKETS: tuple[float, ...]  # histogram upper bounds in seconds (+Inf not included)
STRUCTS: dict[str, type] = {}  # struct name -> ctypes Structure

_load()


def ctype(name: str) -> type:
    """A map's key or value type by its C name: "u64", "proc_state", ..."""
    return CTYPES[name] if name in CTYPES else STRUCTS[name]
