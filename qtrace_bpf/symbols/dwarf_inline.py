"""Where a few functions were inlined, without reading all of a binary's DWARF.

A QEMU built with full debug info carries ~100 MB of .debug_info in ~2,000 compile units;
walking every DIE with pyelftools took 30 s and 2.3 GB.  We need the inlined instances
of ~17 functions, so we read only what can hold them:

1. the function's name in .debug_str (any string that ends with it: the linker merges
   tails), then the compile units whose .debug_info bytes contain that string offset;
2. in those units only, only the subtrees that can hold an inlined call (concrete
   subprograms, lexical blocks, inlined subroutines); DW_AT_sibling skips the rest.

Sections are slices of one mmap, never copied (compressed sections are the exception:
they are inflated, and said so).  dwz-compressed debug files (.gnu_debugaltlink, as
Debian's -dbgsym packages use) are followed: names and abstract origins then live in
the shared "alt" file.
"""

from __future__ import annotations

import bisect
import inspect
import io
import mmap
import os
import struct
from collections.abc import Iterable, Iterator

from elftools.dwarf.dwarfinfo import DebugSectionDescriptor, DwarfConfig, DWARFInfo
from elftools.elf.elffile import ELFFile

from qtrace_bpf.symbols.debugfiles import dwz_candidates
from qtrace_bpf.symbols.elf import build_id as elf_build_id

# pyelftools >= 0.30 takes .debug_types too (DWARF 4 type units; none here); 0.29 (Debian 12)
# does not know the argument.
_TYPES_SEC = {"debug_types_sec": None} \
    if "debug_types_sec" in inspect.signature(DWARFInfo.__init__).parameters else {}

_SECTIONS = (".debug_info", ".debug_aranges", ".debug_abbrev", ".debug_str", ".debug_line",
             ".debug_loc", ".debug_ranges", ".debug_addr", ".debug_str_offsets",
             ".debug_line_str", ".debug_loclists", ".debug_rnglists", ".gnu_debugaltlink")
# Only these tags can contain a DW_TAG_inlined_subroutine with an address.
_DESCEND = {"DW_TAG_subprogram", "DW_TAG_lexical_block", "DW_TAG_inlined_subroutine",
            "DW_TAG_compile_unit", "DW_TAG_partial_unit"}
_ADDR_FORMS = {"DW_FORM_addr", "DW_FORM_addrx", "DW_FORM_addrx1", "DW_FORM_addrx2",
               "DW_FORM_addrx4"}


class _Slice:
    """A read-only file-like window on an mmap: what pyelftools reads sections through."""

    def __init__(self, mm: mmap.mmap, start: int, size: int):
        self._mm, self._start, self._size, self._pos = mm, start, size, 0

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if self._pos >= end:
            return b""
        data = self._mm[self._start + self._pos:self._start + end]
        self._pos = end
        return data


class DwarfFile:
    """One ELF's DWARF, opened lazily over an mmap; `alt` is its dwz file, if any."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self.elf = ELFFile(self._file)
        self.inflated: list[str] = []  # compressed sections we had to inflate
        self.raw: dict[str, tuple[bytes | mmap.mmap, int, int]] = {}  # (buffer, start, size)
        descs: dict[str, DebugSectionDescriptor | None] = {}
        for name in _SECTIONS:
            sec = self.elf.get_section_by_name(name)
            if sec is None or sec["sh_type"] == "SHT_NOBITS":
                descs[name] = None
                continue
            if sec.compressed:
                data = sec.data()
                stream: _Slice | io.BytesIO = io.BytesIO(data)
                self.inflated.append(name)
                self.raw[name] = (data, 0, len(data))
            else:
                off, size = sec["sh_offset"], sec["sh_size"]
                stream = _Slice(self.mm, off, size)
                self.raw[name] = (self.mm, off, size)
            descs[name] = DebugSectionDescriptor(stream, name, sec["sh_offset"],
                                                 self.raw[name][2], sec["sh_addr"])
        self.dwarf = DWARFInfo(
            config=DwarfConfig(little_endian=True, default_address_size=8,
                               machine_arch="x64"),
            debug_info_sec=descs[".debug_info"], debug_aranges_sec=descs[".debug_aranges"],
            debug_abbrev_sec=descs[".debug_abbrev"], debug_frame_sec=None, eh_frame_sec=None,
            debug_str_sec=descs[".debug_str"], debug_loc_sec=descs[".debug_loc"],
            debug_ranges_sec=descs[".debug_ranges"], debug_line_sec=descs[".debug_line"],
            debug_pubtypes_sec=None, debug_pubnames_sec=None,
            debug_addr_sec=descs[".debug_addr"],
            debug_str_offsets_sec=descs[".debug_str_offsets"],
            debug_line_str_sec=descs[".debug_line_str"],
            debug_loclists_sec=descs[".debug_loclists"],
            debug_rnglists_sec=descs[".debug_rnglists"], debug_sup_sec=None,
            gnu_debugaltlink_sec=descs[".gnu_debugaltlink"], **_TYPES_SEC)
        self._units: list[int] | None = None
        self.alt: DwarfFile | None = None

    def close(self) -> None:
        self.raw.clear()
        if self.alt is not None:
            self.alt.close()
        self.mm.close()
        self._file.close()

    # -- dwz ---------------------------------------------------------------------------

    def altlink(self) -> tuple[str, str] | None:
        """(file name, build-id) from .gnu_debugaltlink."""
        raw = self.raw.get(".gnu_debugaltlink")
        if raw is None:
            return None
        data = bytes(raw[0][raw[1]:raw[1] + raw[2]])  # (buffer, start, size)
        end = data.find(b"\0")
        if end <= 0:
            return None
        return data[:end].decode(errors="replace"), data[end + 1:].hex()

    def open_alt(self, debug_roots: Iterable[str]) -> str | None:
        """Follow .gnu_debugaltlink; returns a problem to report, or None."""
        link = self.altlink()
        if link is None:
            return None
        name, build_id = link
        for cand in dwz_candidates(name, build_id, os.path.dirname(self.path), debug_roots):
            if os.path.isfile(cand):
                alt = DwarfFile(cand)
                if build_id and elf_build_id(alt.elf) not in (None, build_id):
                    alt.close()
                    return f"dwz file {cand}: not the build-id {build_id} the link names"
                self.alt = alt
                self.dwarf.supplementary_dwarfinfo = alt.dwarf
                return None
        return f"dwz file {name} (.gnu_debugaltlink) not found: inlining in it not seen"

    # -- search ------------------------------------------------------------------------

    def unit_offsets(self) -> list[int]:
        """Start of every unit in .debug_info, from the unit_length chain alone."""
        if self._units is None:
            buf, start, size = self.raw.get(".debug_info", (b"", 0, 0))
            units: list[int] = []
            off = 0
            while off + 4 <= size:
                units.append(off)
                (length,) = struct.unpack_from("<I", buf, start + off)
                if length == 0xFFFFFFFF:
                    (length,) = struct.unpack_from("<Q", buf, start + off + 4)
                    off += 12 + length
                else:
                    off += 4 + length
            self._units = units
        return self._units

    def string_offsets(self, name: str) -> list[int]:
        """Offsets in .debug_str at which `name` can be read (alone or as a merged tail)."""
        if ".debug_str" not in self.raw:
            return []
        buf, start, size = self.raw[".debug_str"]
        needle, out, at = name.encode() + b"\0", [], start
        while (at := buf.find(needle, at, start + size)) >= 0:
            out.append(at - start)
            at += 1
        return out

    def units_referencing(self, values: Iterable[int]) -> set[int]:
        """Units whose .debug_info bytes hold one of these 4-byte values (a DW_FORM_strp or
        ref offset): a superset of the units that name or reference them."""
        if ".debug_info" not in self.raw:
            return set()
        buf, start, size = self.raw[".debug_info"]
        units, found = self.unit_offsets(), set()
        for value in values:
            needle, at = struct.pack("<I", value), start
            while (at := buf.find(needle, at, start + size)) >= 0:
                found.add(units[bisect.bisect_right(units, at - start) - 1])
                at += 1
        return found

    def inlinable_subtrees(self, unit_offset: int) -> Iterator:
        """Every DIE of one unit that can be (or hold) an inlined call; a DW_AT_sibling
        that points back cannot make the walk endless."""
        stack = [self.dwarf.get_CU_at(unit_offset).get_top_DIE()]
        while stack:
            die = stack.pop()
            yield die
            if die.tag in _DESCEND and die.has_children:
                kids: set[int] = set()
                for child in die.iter_children():
                    if child.offset in kids or child.offset <= die.offset:
                        break  # met again, or before its parent: a loop
                    kids.add(child.offset)
                    stack.append(child)


def _origin_name(die) -> str | None:
    """The name of what an inlined instance instantiates (through origin/spec chains)."""
    for _ in range(4):
        attr = die.attributes.get("DW_AT_name")
        if attr is not None:
            val = attr.value
            return val.decode(errors="replace") if isinstance(val, bytes) else str(val)
        for ref in ("DW_AT_abstract_origin", "DW_AT_specification"):
            if ref in die.attributes:
                die = die.get_DIE_from_attribute(ref)
                break
        else:
            return None
    return None


def _instance_address(dwarf: DWARFInfo, cu, die) -> int | None:
    """Where an inlined instance starts: entry_pc, low_pc, or its first range."""
    for attr in ("DW_AT_entry_pc", "DW_AT_low_pc"):
        val = die.attributes.get(attr)
        if val is not None and val.form in _ADDR_FORMS:
            return int(val.value)
    if "DW_AT_ranges" in die.attributes:
        rl = dwarf.range_lists()
        if rl is not None:
            for entry in rl.get_range_list_at_offset(die.attributes["DW_AT_ranges"].value, cu=cu):
                begin = getattr(entry, "begin_offset", None)
                if begin is not None:
                    return int(begin)
    return None


def _named_in_partial_units(df: DwarfFile, units: Iterable[int], wanted: set[str]) -> set[int]:
    """Offsets of DIEs naming a wanted function inside dwz partial units: other units
    reach them by DW_FORM_ref_addr (same file) or DW_FORM_GNU_ref_alt (from the main file)."""
    out = set()
    for unit in units:
        top = df.dwarf.get_CU_at(unit).get_top_DIE()
        if top.tag != "DW_TAG_partial_unit":
            continue
        for die in top.iter_children():
            if die.tag == "DW_TAG_subprogram" and _origin_name(die) in wanted:
                out.add(die.offset)
    return out


def _is_lto(df: DwarfFile) -> bool:
    """LTO units are named <artificial>: there, any unit may inline any function."""
    for name in (".debug_str", ".debug_line_str"):
        if name in df.raw:
            buf, start, size = df.raw[name]
            if buf.find(b"<artificial>\0", start, start + size) >= 0:
                return True
    return False


def _units_at(df: DwarfFile, addresses: Iterable[int]) -> set[int] | None:
    """Units whose code holds these addresses (.debug_aranges); None without aranges."""
    aranges = df.dwarf.get_aranges()
    if aranges is None:
        return None
    out = set()
    for addr in addresses:
        unit = aranges.cu_offset_at_addr(addr)
        if unit is not None:
            out.add(unit)
    return out


def inlined_instances(df: DwarfFile, names: Iterable[str],
                      defined_at: dict[str, list[int]] | None = None,
                      ) -> tuple[dict[str, list[int]], int]:
    """name -> addresses of its inlined instances (a name with [] is inlined somewhere
    without a known address); also how many units were read.

    `defined_at`: addresses of a function's out-of-line copies (from .symtab).  Without
    LTO a function is inlined only in the unit that defines it, so that unit is all we
    read; names without a copy are looked for by their string."""
    wanted, units = set(names), set()
    by_string = set(wanted)
    if defined_at and not _is_lto(df):
        known = {n: a for n, a in defined_at.items() if n in wanted and a}
        at = _units_at(df, (addr for addrs in known.values() for addr in addrs))
        if at is not None:
            units |= at
            by_string -= set(known)
    strs = {off for n in by_string for off in df.string_offsets(n)}
    named = df.units_referencing(strs)
    units |= named | df.units_referencing(_named_in_partial_units(df, named, by_string))
    if df.alt is not None and by_string:
        alt_strs = {off for n in by_string for off in df.alt.string_offsets(n)}
        units |= df.units_referencing(alt_strs)  # DW_FORM_GNU_strp_alt
        alt_units = df.alt.units_referencing(alt_strs)
        units |= df.units_referencing(_named_in_partial_units(df.alt, alt_units, by_string))
    found: dict[str, list[int]] = {}
    for unit in sorted(units):
        cu = df.dwarf.get_CU_at(unit)
        for die in df.inlinable_subtrees(unit):
            if die.tag != "DW_TAG_inlined_subroutine":
                continue
            name = _origin_name(die)
            if name not in wanted:
                continue
            addr = _instance_address(df.dwarf, cu, die)
            found.setdefault(name, [])
            if addr is not None:
                found[name].append(addr)
    return found, len(units)
