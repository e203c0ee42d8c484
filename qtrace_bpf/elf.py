"""Reading an x86-64 ELF file with pyelftools: opening it safely, its build-id, PT_LOAD
segments, function symbols, .gnu_debuglink, and where a virtual address lies in the file.

Why apart: every other module (symbol resolution, debug-file search, debuginfod's check
of what a server sent) reads ELF the same way; this one knows nothing else of qtrace.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from elftools.common.exceptions import ELFError as PyElfError
from elftools.elf.elffile import ELFFile

from .errors import ElfError

# What pyelftools raises on malformed input, besides its own error.
MALFORMED = (PyElfError, struct.error, ValueError, OSError, EOFError, KeyError)


def open_elf(data_or_path: str | bytes, what: str) -> tuple[ELFFile, io.BufferedIOBase]:
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
    except MALFORMED as exc:
        stream.close()
        raise ElfError(f"{what}: malformed ELF: {exc}") from None


def build_id(elf: ELFFile) -> str | None:
    for sec in elf.iter_sections():
        if sec["sh_type"] != "SHT_NOTE":
            continue
        for note in sec.iter_notes():
            if note["n_type"] == "NT_GNU_BUILD_ID":
                return str(note["n_desc"])
    return None


def loads(elf: ELFFile, file_size: int) -> list[tuple[int, int, int]]:
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


def iter_funcs(elf: ELFFile, section_name: str) -> Iterator[tuple[str, int, int, str]]:
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


def debuglink(elf: ELFFile) -> tuple[str, int] | None:
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


@dataclass(frozen=True)
class Usdt:
    """A static probe site (SystemTap SDT note, what `dtrace -G` builds): `provider:name`
    at `pc`, enabled by the 16-bit counter at `semaphore` (0: none)."""

    provider: str
    name: str
    pc: int
    semaphore: int
    args: str

    @property
    def full_name(self) -> str:
        return f"{self.provider}:{self.name}"


_NOTE = struct.Struct("<III")  # namesz, descsz, type
NT_STAPSDT = 3


def usdt_notes(elf: ELFFile) -> list[Usdt]:
    """The binary's .note.stapsdt entries, addresses adjusted as SystemTap does when the
    file was prelinked (.stapsdt.base moved)."""
    sec = elf.get_section_by_name(".note.stapsdt")
    if sec is None:
        return []
    base_sec = elf.get_section_by_name(".stapsdt.base")
    data, pos, out = sec.data(), 0, []
    while pos + _NOTE.size <= len(data):
        namesz, descsz, ntype = _NOTE.unpack_from(data, pos)
        name_at = pos + _NOTE.size
        desc_at = name_at + ((namesz + 3) & ~3)
        pos = desc_at + ((descsz + 3) & ~3)
        if ntype != NT_STAPSDT or data[name_at:name_at + namesz].rstrip(b"\0") != b"stapsdt" \
                or descsz < 27 or pos > len(data) + 3:
            continue
        desc = data[desc_at:desc_at + descsz]
        pc, base, sem = struct.unpack_from("<QQQ", desc)
        provider, name, args = (desc[24:].split(b"\0") + [b"", b"", b""])[:3]
        if base_sec is not None and base:
            delta = base_sec["sh_addr"] - base
            pc += delta
            sem = sem + delta if sem else 0
        out.append(Usdt(provider.decode(errors="replace"), name.decode(errors="replace"), pc,
                        sem, args.decode(errors="replace")))
    return out


@dataclass(frozen=True)
class UsdtSite:
    """Where a static probe's uprobe goes: file offsets of the site and its semaphore."""

    offset: int
    semaphore: int  # 0: no semaphore
    vaddr: int


def usdt_sites(elf: ELFFile, loads: list[tuple[int, int, int]]) -> dict[str, list[UsdtSite]]:
    """The binary's static probes by "provider:name", placed in the file (sites outside
    any PT_LOAD are dropped: a uprobe cannot go there)."""
    out: dict[str, list[UsdtSite]] = {}
    for note in usdt_notes(elf):
        off = vaddr_to_offset(loads, note.pc)
        sem = vaddr_to_offset(loads, note.semaphore) if note.semaphore else 0
        if off is None or sem is None:
            continue
        out.setdefault(note.full_name, []).append(UsdtSite(off, sem, note.pc))
    return out


def has_debug_info(elf: ELFFile) -> bool:
    """Real DWARF (pyelftools' has_dwarf_info() also counts a bare .eh_frame)."""
    return any(elf.get_section_by_name(n) is not None for n in (".debug_info", ".zdebug_info"))


def crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc & 0xFFFFFFFF


def read_build_id(path: str, display: str | None = None) -> str | None:
    elf, stream = open_elf(path, display or path)
    try:
        return build_id(elf)
    finally:
        stream.close()
