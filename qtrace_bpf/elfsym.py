"""Function name -> uprobe location, with pyelftools, honest about where it came from.

Sources, in order: .symtab, .dynsym, .gnu_debugdata (MiniDebugInfo), a debug file by
build-id, a debug file by .gnu_debuglink (CRC-checked).  A uprobe is placed at a *file
offset*: the symbol's virtual address mapped through the PT_LOAD segment that holds it,
which is right for PIE and non-PIE alike, also where p_vaddr != p_offset.
"""

from __future__ import annotations

import io
import lzma
import os
import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.elf.elffile import ELFFile

from .debuginfod import Debuginfod
from .dwarf_inline import DwarfFile, inlined_instances
from .errors import ElfError

DEFAULT_DEBUG_ROOTS = ("/usr/lib/debug",)
# GCC clones of a function: entering one means the function ran (`.cold` is a split-off
# tail, never an entry, so it is not one of them).  .isra/.constprop drop or reorder
# arguments and .part is the outlined rest of a partly inlined function: their registers
# need not hold the function's arguments.  .lto_priv/.localalias are the function itself.
_CLONE_RE = re.compile(r"^(?P<base>[^.]+)\.(?:isra|constprop|part|lto_priv|localalias)\.\d+")
ARG_CHANGING_CLONES = ("isra", "constprop", "part")
_VERSION_RE = re.compile(rb"QEMU emulator version ([0-9][0-9A-Za-z.+~:() _-]{0,80})")

# First-instruction prefixes the x86 uprobe code emulates instead of single-stepping
# (cheap: ~0.7 us a hit) and a few that are single-stepped (~20 us a hit).
_FIRST_INSN = [
    (b"\xf3\x0f\x1e\xfa", "endbr64", None),
    (b"\x55", "push %rbp", True),
    (b"\x53", "push %rbx", True),
    (b"\x41\x54", "push %r12", True),
    (b"\x41\x55", "push %r13", True),
    (b"\x41\x56", "push %r14", True),
    (b"\x41\x57", "push %r15", True),
    (b"\x90", "nop", True),
    (b"\x0f\x1f", "nop", True),
    (b"\xe9", "jmp rel32", True),
    (b"\xeb", "jmp rel8", True),
    (b"\xe8", "call rel32", True),
    (b"\x48\x8d", "lea", False),
    (b"\x48\x83\xec", "sub $imm8,%rsp", False),
    (b"\x48\x81\xec", "sub $imm32,%rsp", False),
    (b"\x48\x89", "mov", False),
    (b"\x48\x8b", "mov", False),
    (b"\x8b", "mov", False),
    (b"\x89", "mov", False),
    (b"\x31", "xor", False),
    (b"\xc3", "ret", False),
]


@dataclass(frozen=True)
class Symbol:
    """One resolved function: where a uprobe goes and how we know."""

    name: str  # the symbol as found (may be a clone: foo.isra.0)
    wanted: str  # the function asked for
    vaddr: int
    size: int
    offset: int  # file offset: what the uprobe API takes
    source: str  # ".symtab" | ".dynsym" | ".gnu_debugdata" | "build-id:PATH" | "debuglink:PATH"
    binding: str
    first_insn: str = ""
    emulated: bool | None = None  # None: not known

    @property
    def is_clone(self) -> bool:
        return self.name != self.wanted

    @property
    def args_trusted(self) -> bool:
        """Do registers at this entry hold the function's own arguments?"""
        parts = self.name.split(".")[1:]
        return not any(k in parts for k in ARG_CHANGING_CLONES)


@dataclass
class Missing:
    wanted: str
    reason: str


@dataclass
class Resolution:
    """What one binary offers for a set of function names."""

    path: str
    build_id: str | None
    qemu_version: str | None
    elf_type: str
    found: dict[str, list[Symbol]] = field(default_factory=dict)
    missing: dict[str, Missing] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # symbol sources that were read
    debug_hint: str = ""
    inlined: dict[str, list[int]] = field(default_factory=dict)  # name -> inlined instance vaddrs
    dwarf: bool = False
    loads: list[tuple[int, int, int]] = field(default_factory=list)  # PT_LOAD (vaddr, filesz, off)
    retry: bool = False  # a debuginfod fetch failed: do not cache this resolution

    def inlined_offsets(self, name: str) -> list[int]:
        """File offsets of the inlined instances of `name` (for uprobes)."""
        offs = (vaddr_to_offset(self.loads, a) for a in self.inlined.get(name, ()))
        return sorted({o for o in offs if o is not None})

    def best(self, name: str) -> Symbol | None:
        """The single location to probe, or None when absent or ambiguous."""
        syms = self.found.get(name) or []
        exact = [s for s in syms if not s.is_clone]
        if len(exact) == 1:
            return exact[0]
        if not exact and len(syms) == 1:
            return syms[0]
        return None


def _open_elf(data_or_path: str | bytes, what: str) -> tuple[ELFFile, io.BufferedIOBase]:
    try:
        if isinstance(data_or_path, bytes):
            stream: io.BufferedIOBase = io.BytesIO(data_or_path)
        else:
            stream = open(data_or_path, "rb")  # noqa: SIM115 - kept open with the ELFFile
    except OSError as exc:
        raise ElfError(f"{what}: cannot read: {exc.strerror}") from None
    try:
        magic = stream.read(4)
        stream.seek(0)
        if magic != b"\x7fELF":
            raise ElfError(f"{what}: not an ELF file")
        elf = ELFFile(stream)
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise ElfError(f"{what}: not an x86-64 ELF ({elf['e_machine']}, ELF{elf.elfclass})")
        elf.num_sections()  # touches the section headers: truncation shows here
        return elf, stream
    except ElfError:
        stream.close()
        raise
    except (_PyElfError, struct.error, ValueError, OSError, EOFError, KeyError) as exc:
        stream.close()
        raise ElfError(f"{what}: malformed ELF: {exc}") from None


def _build_id(elf: ELFFile) -> str | None:
    for sec in elf.iter_sections():
        if sec["sh_type"] != "SHT_NOTE":
            continue
        for note in sec.iter_notes():
            if note["n_type"] == "NT_GNU_BUILD_ID":
                return str(note["n_desc"])
    return None


def _loads(elf: ELFFile, file_size: int) -> list[tuple[int, int, int]]:
    """PT_LOAD segments (vaddr, filesz, offset) whose bytes are in the file: a segment that
    points past its end (a truncated or corrupt file) can place no uprobe."""
    return [
        (seg["p_vaddr"], seg["p_filesz"], seg["p_offset"])
        for seg in elf.iter_segments()
        if seg["p_type"] == "PT_LOAD" and seg["p_offset"] + seg["p_filesz"] <= file_size
    ]


def vaddr_to_offset(loads: Iterable[tuple[int, int, int]], vaddr: int) -> int | None:
    """File offset of a virtual address, through the PT_LOAD segment that holds it."""
    for p_vaddr, p_filesz, p_offset in loads:
        if p_vaddr <= vaddr < p_vaddr + p_filesz:
            return vaddr - p_vaddr + p_offset
    return None


_BINDS = {0: "STB_LOCAL", 1: "STB_GLOBAL", 2: "STB_WEAK", 10: "STB_GNU_UNIQUE"}
_FUNC_TYPES = (2, 10)  # STT_FUNC, STT_GNU_IFUNC
_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym, little-endian (x86-64 only)


def _iter_funcs(elf: ELFFile, section_name: str) -> Iterator[tuple[str, int, int, str]]:
    """Defined functions of a symbol table.  Unpacked in bulk: pyelftools' per-symbol
    objects cost ~15 us each, and an unstripped QEMU has 50,000+ symbols."""
    sec = elf.get_section_by_name(section_name)
    if sec is None or sec["sh_type"] not in ("SHT_SYMTAB", "SHT_DYNSYM"):
        return
    data = sec.data()
    strtab = elf.get_section(sec["sh_link"]).data()
    usable = len(data) - len(data) % _SYM.size
    for st_name, st_info, _other, shndx, value, size in _SYM.iter_unpack(data[:usable]):
        if st_info & 0xF not in _FUNC_TYPES or shndx == 0 or not value:
            continue
        end = strtab.find(b"\0", st_name)
        name = strtab[st_name:end if end >= 0 else len(strtab)].decode(errors="replace")
        yield name.split("@", 1)[0], value, size, _BINDS.get(st_info >> 4, "STB_OTHER")


def _debuglink(elf: ELFFile) -> tuple[str, int] | None:
    sec = elf.get_section_by_name(".gnu_debuglink")
    if sec is None:
        return None
    data = sec.data()
    end = data.find(b"\0")
    if end <= 0:
        return None
    crc_at = (end + 4) & ~3
    if len(data) < crc_at + 4:
        return None
    (crc,) = struct.unpack_from("<I", data, crc_at)
    return data[:end].decode(errors="replace"), crc


def _has_debug_info(elf: ELFFile) -> bool:
    """Real DWARF (pyelftools' has_dwarf_info() also counts a bare .eh_frame)."""
    return any(elf.get_section_by_name(n) is not None for n in (".debug_info", ".zdebug_info"))


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc & 0xFFFFFFFF


def _classify(code: bytes) -> tuple[str, bool | None]:
    if code.startswith(b"\xf3\x0f\x1e\xfa"):
        rest, prefix = code[4:], "endbr64; "
    else:
        rest, prefix = code, ""
    for pattern, name, emulated in _FIRST_INSN[1:]:
        if rest.startswith(pattern):
            return prefix + name, emulated
    return prefix + (rest[:4].hex() or "?"), None


class Binary:
    """One ELF binary opened once; symbol tables loaded lazily, source by source."""

    def __init__(self, path: str, debug_roots: Iterable[str] = DEFAULT_DEBUG_ROOTS,
                 display: str | None = None, debuginfod: Debuginfod | None = None):
        self.path = path
        self.display = display or path
        self.debuginfod = debuginfod
        # a debuginfod cache is a debug root too: what was fetched once is found offline
        self.debug_roots = tuple(debug_roots) + ((debuginfod.cache,) if debuginfod else ())
        self.elf, self._stream = _open_elf(path, self.display)
        try:
            self.build_id = _build_id(self.elf)
            self.loads = _loads(self.elf, os.fstat(self._stream.fileno()).st_size)
            self.elf_type = self.elf["e_type"]
        except (_PyElfError, struct.error, ValueError, OSError, EOFError, KeyError) as exc:
            self.close()
            raise ElfError(f"{self.display}: malformed ELF: {exc}") from None
        self._tables: list[tuple[str, dict[str, list[tuple[str, int, int, str]]]]] | None = None
        self.problems: list[str] = []
        self.fetch_failed = False  # a debuginfod fetch failed: worth another try later
        # the file whose DWARF says where functions were inlined (this one or a debug file)
        self.dwarf_path: str | None = path if _has_debug_info(self.elf) else None
        self._extra_streams: list[io.BufferedIOBase] = []

    def close(self) -> None:
        self._stream.close()
        for s in getattr(self, "_extra_streams", []):
            s.close()

    def __enter__(self) -> Binary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sources -------------------------------------------------------------------

    def _table(self, elf: ELFFile, section: str) -> dict[str, list[tuple[str, int, int, str]]]:
        table: dict[str, list[tuple[str, int, int, str]]] = {}
        try:
            for name, vaddr, size, bind in _iter_funcs(elf, section):
                table.setdefault(name, []).append((name, vaddr, size, bind))
                m = _CLONE_RE.match(name)
                if m:
                    table.setdefault(m.group("base"), []).append((name, vaddr, size, bind))
        except (_PyElfError, struct.error, ValueError, OSError, EOFError, KeyError) as exc:
            self.problems.append(f"{section}: unreadable ({exc})")
        return table

    def _debug_file(self, path: str, source: str) -> ELFFile | None:
        try:
            elf, stream = _open_elf(path, path)
        except ElfError as exc:
            self.problems.append(f"{source}: {exc}")
            return None
        bid = _build_id(elf)
        if self.build_id and bid and bid != self.build_id:
            self.problems.append(
                f"{source}: build-id {bid} does not match the binary's {self.build_id}: ignored"
            )
            stream.close()
            return None
        self._extra_streams.append(stream)
        return elf

    def _separate_debug(self) -> tuple[str, ELFFile] | None:
        if self.build_id and len(self.build_id) > 2:
            for root in self.debug_roots:
                cand = os.path.join(root, ".build-id", self.build_id[:2],
                                    self.build_id[2:] + ".debug")
                if os.path.exists(cand):
                    elf = self._debug_file(cand, f"build-id:{cand}")
                    if elf is not None:
                        return f"build-id:{cand}", elf
        link = _debuglink(self.elf)
        if link:
            name, crc = link
            bindir = os.path.dirname(os.path.realpath(self.path)) if "/proc/" not in self.path \
                else os.path.dirname(self.display)
            dirs = [bindir, os.path.join(bindir, ".debug")]
            dirs += [os.path.join(root, bindir.lstrip("/")) for root in self.debug_roots]
            tried = []
            for d in dirs:
                cand = os.path.join(d, name)
                if not os.path.isfile(cand):
                    continue
                tried.append(cand)
                if _crc32(cand) != crc:
                    self.problems.append(f"debuglink:{cand}: CRC mismatch: ignored")
                    continue
                elf = self._debug_file(cand, f"debuglink:{cand}")
                if elf is not None:
                    return f"debuglink:{cand}", elf
            if not tried:
                self.problems.append(f"debuglink {name!r}: not found in {', '.join(dirs)}")
        return self._fetch_debug()

    def _fetch_debug(self) -> tuple[str, ELFFile] | None:
        """From a debuginfod server, for a binary without its own symbol table."""
        d = self.debuginfod
        if d is None or not d.urls or not self.build_id or \
                self.elf.get_section_by_name(".symtab") is not None:
            return None
        path = d.fetch(self.build_id)
        self.problems.extend(d.problems)
        self.fetch_failed = path is None
        if path is None:
            return None
        elf = self._debug_file(path, f"debuginfod:{path}")
        return (f"debuginfod:{path}", elf) if elf is not None else None

    def tables(self) -> list[tuple[str, dict[str, list[tuple[str, int, int, str]]]]]:
        if self._tables is not None:
            return self._tables
        tables = []
        for section in (".symtab", ".dynsym"):
            if self.elf.get_section_by_name(section) is not None:
                tables.append((section, self._table(self.elf, section)))
        mini = self.elf.get_section_by_name(".gnu_debugdata")
        if mini is not None:
            try:
                inner, stream = _open_elf(lzma.decompress(mini.data()), ".gnu_debugdata")
                self._extra_streams.append(stream)
                tables.append((".gnu_debugdata", self._table(inner, ".symtab")))
            except (lzma.LZMAError, ElfError, _PyElfError, ValueError) as exc:
                self.problems.append(f".gnu_debugdata: unreadable ({exc})")
        sep = self._separate_debug()
        if sep is not None:
            source, elf = sep
            tables.append((source, self._table(elf, ".symtab")))
            if self.dwarf_path is None and _has_debug_info(elf):
                self.dwarf_path = source.split(":", 1)[1]
        self._tables = tables
        return tables

    # -- lookups -------------------------------------------------------------------

    def first_insn(self, offset: int) -> tuple[str, bool | None]:
        self._stream.seek(offset)
        return _classify(self._stream.read(8))

    def lookup(self, name: str) -> list[Symbol]:
        """Every location for `name` from the first source that has it."""
        for source, table in self.tables():
            entries = table.get(name)
            if not entries:
                continue
            out, seen = [], set()
            for sym_name, vaddr, size, bind in entries:
                if vaddr in seen:
                    continue
                seen.add(vaddr)
                offset = vaddr_to_offset(self.loads, vaddr)
                if offset is None:
                    continue
                insn, emulated = self.first_insn(offset)
                out.append(Symbol(sym_name, name, vaddr, size, offset, source,
                                  bind.replace("STB_", "").lower(), insn, emulated))
            if out:
                return out
        return []

    def qemu_version(self) -> str | None:
        sec = self.elf.get_section_by_name(".rodata")
        if sec is None:
            return None
        try:
            m = _VERSION_RE.search(sec.data())
        except (_PyElfError, ValueError, OSError):
            return None
        return m.group(1).decode(errors="replace").strip() if m else None

    def inlined_instances(self, names: Iterable[str],
                          found: dict[str, list[Symbol]] | None = None) -> dict[str, list[int]]:
        """Addresses where DWARF says a function was inlined (empty without DWARF).
        `found`: symbols already looked up (not looked up again)."""
        wanted = set(names)
        if self.dwarf_path is None or not wanted:
            return {}
        df = None
        try:
            df = DwarfFile(self.dwarf_path)
            problem = df.open_alt(self.debug_roots)
            if problem:
                self.problems.append(problem)
            if df.inflated:
                self.problems.append(f"compressed DWARF ({', '.join(df.inflated)}) inflated "
                                     "in memory")
            found = found or {}
            defined = {n: [s.vaddr for s in (found[n] if n in found else self.lookup(n))]
                       for n in wanted}
            found, _units = inlined_instances(df, wanted, defined)
            return found
        except Exception as exc:  # noqa: BLE001 - pyelftools asserts on malformed DWARF
            self.problems.append(f"DWARF: unreadable ({type(exc).__name__}: {exc})")
            return {}
        finally:
            if df is not None:
                df.close()


def resolve(path: str, names: Iterable[str], *, debug_roots: Iterable[str] = DEFAULT_DEBUG_ROOTS,
            display: str | None = None, inline_names: Iterable[str] = (),
            debuginfod: Debuginfod | None = None) -> Resolution:
    """Resolve `names` in the binary at `path` (raises ElfError for an unusable binary).

    pyelftools reports malformed input with many exception types (even assertions);
    callers (watch, the daemon) get exactly one.
    """
    try:
        return _resolve(path, names, debug_roots, display, inline_names,
                        debuginfod if debuginfod is not None else Debuginfod.from_env())
    except ElfError:
        raise
    except Exception as exc:  # noqa: BLE001 - the resolver's error boundary
        raise ElfError(f"{display or path}: malformed ELF: {type(exc).__name__}: {exc}") from None


def _resolve(path: str, names: Iterable[str], debug_roots: Iterable[str], display: str | None,
             inline_names: Iterable[str], debuginfod: Debuginfod) -> Resolution:
    with Binary(path, debug_roots, display, debuginfod) as binary:
        res = Resolution(binary.display, binary.build_id, binary.qemu_version(),
                         binary.elf_type, loads=list(binary.loads))
        res.sources = [s for s, _ in binary.tables()]
        full = [s for s in res.sources if s != ".dynsym"]
        where = (f"/usr/lib/debug/.build-id/{binary.build_id[:2]}/{binary.build_id[2:]}.debug"
                 if binary.build_id else "a debug file")
        for name in names:
            syms = binary.lookup(name)
            if syms:
                res.found[name] = syms
            elif full:
                res.missing[name] = Missing(name, f"not in {', '.join(res.sources)}")
            else:
                res.missing[name] = Missing(
                    name, "not exported in .dynsym (static, or absent in this version) and no "
                    f"debug symbols: install the debug symbols for build-id "
                    f"{binary.build_id or '?'} ({where}), or name a debuginfod server "
                    "(DEBUGINFOD_URLS)")
        res.dwarf = binary.dwarf_path is not None
        res.retry = binary.fetch_failed
        res.inlined = binary.inlined_instances(inline_names, res.found)
        problems = list(binary.problems)
        if not res.dwarf:
            problems.append("no DWARF: inlining not verifiable")
        res.debug_hint = "; ".join(problems)
        return res


_CACHE: dict[tuple[str | None, tuple[str, ...], tuple[str, ...]], Resolution] = {}


def resolve_cached(path: str, names: Iterable[str], *,
                   debug_roots: Iterable[str] = DEFAULT_DEBUG_ROOTS,
                   display: str | None = None, inline_names: Iterable[str] = ()) -> Resolution:
    """Like resolve(), once per build-id: 100 VMs of one binary resolve once.

    Reading the build-id note is cheap; the symbol tables and DWARF are not.
    """
    build_id = read_build_id(path, display)
    key = (build_id, tuple(names), tuple(debug_roots))
    if build_id and key in _CACHE:
        return _CACHE[key]
    res = resolve(path, key[1], debug_roots=debug_roots, display=display,
                  inline_names=inline_names)
    if build_id and not res.retry:
        _CACHE[key] = res
    return res


def read_build_id(path: str, display: str | None = None) -> str | None:
    with Binary(path, display=display) as b:
        return b.build_id
