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
from collections.abc import Iterable
from dataclasses import dataclass, field

from elftools.elf.elffile import ELFFile

from qtrace_bpf.errors import ElfError
from qtrace_bpf.symbols import elf as elfio
from qtrace_bpf.symbols.debugfiles import DEFAULT_DEBUG_ROOTS, DebugSearch
from qtrace_bpf.symbols.debuginfod import Debuginfod
from qtrace_bpf.symbols.dwarf_inline import DwarfFile, inlined_instances
from qtrace_bpf.symbols.first_insn import MAX_FUNCTION_READ, describe

# GCC clones of a function: entering one means the function ran (`.cold` is a split-off
# tail, never an entry, so it is not one of them).  .isra/.constprop drop or reorder
# arguments and .part is the outlined rest of a partly inlined function: their registers
# need not hold the function's arguments.  .lto_priv/.localalias are the function itself.
_CLONE_RE = re.compile(r"^(?P<base>[^.]+)\.(?:isra|constprop|part|lto_priv|localalias)\.\d+")
ARG_CHANGING_CLONES = ("isra", "constprop", "part")
_VERSION_RE = re.compile(rb"QEMU emulator version ([0-9][0-9A-Za-z.+~:() _-]{0,80})")
# MiniDebugInfo (QEMU's: ~1 MB) past these is a decompression bomb
MINIDEBUG_MAX = 256 << 20
MINIDEBUG_RATIO = 16

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
    # first_insn.emulated_site: a cheaper entry (0: none), its insn, the registers written before
    entry_at: int = 0
    entry_insn: str = ""
    entry_writes: list[int] = field(default_factory=list)

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
    # executable PT_LOADs (vaddr, filesz, off): functions are probed only in code
    loads: list[tuple[int, int, int]] = field(default_factory=list)
    retry: bool = False  # a debuginfod fetch failed: do not cache this resolution
    usdt: dict[str, list[elfio.UsdtSite]] = field(default_factory=dict)  # "prov:name" -> sites

    def inlined_offsets(self, name: str) -> list[int]:
        """File offsets of the inlined instances of `name` (for uprobes)."""
        offs = (elfio.vaddr_to_offset(self.loads, a) for a in self.inlined.get(name, ()))
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


class ElfSymbols:
    """One ELF binary opened once; symbol tables loaded lazily, source by source."""

    def __init__(self, path: str, debug_roots: Iterable[str] = DEFAULT_DEBUG_ROOTS,
                 display: str | None = None, debuginfod: Debuginfod | None = None):
        self.path = path
        self.display = display or path
        self.elf, self._stream = elfio.open_elf(path, self.display)
        self._extra_streams: list[io.BufferedIOBase] = []
        try:
            self.build_id = elfio.build_id(self.elf)
            self.size = os.fstat(self._stream.fileno()).st_size
            self.loads = elfio.loads(self.elf, self.size)
            self.code = elfio.loads(self.elf, self.size, executable=True)
            self.elf_type = self.elf["e_type"]
        except elfio.MALFORMED as exc:
            self.close()
            raise ElfError(f"{self.display}: malformed ELF: {exc}") from None
        self.debug = DebugSearch(path, self.display, self.build_id, debug_roots, debuginfod)
        self.debug_roots = self.debug.roots
        self._tables: list[tuple[str, dict[str, list[tuple[str, int, int, str]]]]] | None = None
        self.problems: list[str] = []
        # the file whose DWARF says where functions were inlined (this one or a debug file)
        self.dwarf_path: str | None = path if elfio.has_debug_info(self.elf) else None

    def close(self) -> None:
        self._stream.close()
        debug = getattr(self, "debug", None)
        for s in self._extra_streams + (debug.streams if debug else []):
            s.close()

    def __enter__(self) -> ElfSymbols:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sources -------------------------------------------------------------------

    def _table(self, elf: ELFFile, section: str) -> dict[str, list[tuple[str, int, int, str]]]:
        table: dict[str, list[tuple[str, int, int, str]]] = {}
        try:
            for name, vaddr, size, bind in elfio.iter_funcs(elf, section):
                table.setdefault(name, []).append((name, vaddr, size, bind))
                m = _CLONE_RE.match(name)
                if m:
                    table.setdefault(m.group("base"), []).append((name, vaddr, size, bind))
        except elfio.MALFORMED as exc:
            self.problems.append(f"{section}: unreadable ({exc})")
        return table

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
                inner, stream = elfio.open_elf(elfio.inflate_xz(
                    elfio.section_data(mini), min(MINIDEBUG_MAX, MINIDEBUG_RATIO * self.size)),
                    ".gnu_debugdata")
                self._extra_streams.append(stream)
                tables.append((".gnu_debugdata", self._table(inner, ".symtab")))
            except (lzma.LZMAError, ElfError, elfio.PyElfError, ValueError) as exc:
                self.problems.append(f".gnu_debugdata: unreadable ({exc})")
        sep = self.debug.find(self.elf)
        self.problems.extend(self.debug.problems)
        if sep is not None:
            source, elf = sep
            tables.append((source, self._table(elf, ".symtab")))
            if self.dwarf_path is None and elfio.has_debug_info(elf):
                self.dwarf_path = source.split(":", 1)[1]
        self._tables = tables
        return tables

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
                offset = elfio.vaddr_to_offset(self.code, vaddr)
                if offset is None:  # not in code: no breakpoint goes there, whatever it says
                    self.problems.append(f"{source}: {sym_name} at {vaddr:#x} is outside "
                                         "the binary's executable segments: ignored")
                    continue
                self._stream.seek(offset)  # the code: its first instruction and a cheaper entry
                code = self._stream.read(size if 0 < size <= MAX_FUNCTION_READ else 8)
                out.append(Symbol(sym_name, name, vaddr, size, offset, source,
                                  bind.replace("STB_", "").lower(), *describe(code, size)))
            if out:
                return out
        return []

    def qemu_version(self) -> str | None:
        sec = self.elf.get_section_by_name(".rodata")
        if sec is None:
            return None
        try:
            m = _VERSION_RE.search(elfio.section_data(sec))
        except (elfio.PyElfError, ValueError, OSError):
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
    debuginfod: where to fetch a missing debug file from (None: nowhere).

    pyelftools reports malformed input with many exception types (even assertions);
    callers (watch, the daemon) get exactly one.
    """
    try:
        return _resolve(path, names, debug_roots, display, inline_names, debuginfod)
    except (ElfError, MemoryError):  # out of memory: the resolver child's limit says why
        raise
    except Exception as exc:  # noqa: BLE001 - the resolver's error boundary
        raise ElfError(f"{display or path}: malformed ELF: {type(exc).__name__}: {exc}") from None


def _resolve(path: str, names: Iterable[str], debug_roots: Iterable[str], display: str | None,
             inline_names: Iterable[str], debuginfod: Debuginfod | None) -> Resolution:
    with ElfSymbols(path, debug_roots, display, debuginfod) as binary:
        res = Resolution(binary.display, binary.build_id, binary.qemu_version(),
                         binary.elf_type, loads=list(binary.code))
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
        res.usdt = elfio.usdt_sites(binary.elf, binary.loads, binary.code)
        res.dwarf = binary.dwarf_path is not None
        res.retry = binary.debug.fetch_failed
        res.inlined = binary.inlined_instances(inline_names, res.found)
        problems = list(binary.problems)
        if not res.dwarf:
            problems.append("no DWARF: inlining not verifiable")
        res.debug_hint = "; ".join(problems)
        return res


_CACHE: dict[tuple, Resolution] = {}


def resolve_cached(path: str, names: Iterable[str], *,
                   debug_roots: Iterable[str] = DEFAULT_DEBUG_ROOTS,
                   display: str | None = None, inline_names: Iterable[str] = (),
                   debuginfod: Debuginfod | None = None) -> Resolution:
    """Like resolve(), once per file (device, inode, size, mtime), never per build-id:
    whoever links a file chooses its build-id, so a file claiming a real QEMU's must not
    lend that QEMU its offsets."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ElfError(f"{display or path}: cannot read: {exc.strerror}") from None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, tuple(names), tuple(debug_roots))
    if key in _CACHE:
        return _CACHE[key]
    res = resolve(path, key[4], debug_roots=debug_roots, display=display,
                  inline_names=inline_names, debuginfod=debuginfod)
    if not res.retry:
        _CACHE[key] = res
    return res
