"""Reading an x86-64 ELF file with pyelftools: opening it safely, its build-id, PT_LOAD
segments, function symbols, .gnu_debuglink, and where a virtual address lies in the file.

Why apart: every other module (symbol resolution, debug-file search, debuginfod's check
of what a server sent) reads ELF the same way; this one knows nothing else of qtrace.
"""

from __future__ import annotations

import io
import lzma
import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from elftools.common.exceptions import ELFError as PyElfError
from elftools.elf.elffile import ELFFile

from qtrace_bpf.errors import ElfError

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


_NOTE = struct.Struct("<III")  # namesz, descsz, type
_BUILD_ID = re.compile(r"[0-9a-f]{2,128}")
NT_GNU_BUILD_ID = 3
PF_X = 1


def section_data(sec, what: str = "") -> bytes:
    """A section's bytes, refused when its header claims more than the file holds (Python
    would allocate the claimed size before reading a byte)."""
    elf_size = _stream_size(sec.stream)
    if sec["sh_type"] != "SHT_NOBITS" and sec["sh_offset"] + sec["sh_size"] > elf_size:
        raise ValueError(f"section {what or sec.name} claims {sec['sh_size']} bytes past the "
                         "end of the file")
    return sec.data()


def _stream_size(stream) -> int:
    pos = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(pos)
    return end


def notes(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each note in a SHT_NOTE section's bytes; sizes that overrun
    the section end the walk."""
    pos = 0
    while pos + _NOTE.size <= len(data):
        namesz, descsz, ntype = _NOTE.unpack_from(data, pos)
        name_at = pos + _NOTE.size
        desc_at = name_at + ((namesz + 3) & ~3)
        end = desc_at + ((descsz + 3) & ~3)
        if desc_at + descsz > len(data):
            return
        yield data[name_at:name_at + namesz].rstrip(b"\0"), ntype, data[desc_at:desc_at + descsz]
        pos = end


def build_id(elf: ELFFile) -> str | None:
    """The GNU build-id note, as lowercase hex; a note of another owner, or a value that is
    not 1-64 bytes, is no build-id (it names paths under the debug roots)."""
    for sec in elf.iter_sections():
        if sec["sh_type"] != "SHT_NOTE":
            continue
        for name, ntype, desc in notes(section_data(sec)):
            if ntype == NT_GNU_BUILD_ID and name == b"GNU":
                bid = desc.hex()
                return bid if _BUILD_ID.fullmatch(bid) else None
    return None


def loads(elf: ELFFile, file_size: int, executable: bool = False) -> list[tuple[int, int, int]]:
    """PT_LOAD segments (vaddr, filesz, offset) whose bytes are in the file: a segment that
    points past its end (a truncated or corrupt file) can place no uprobe.  executable: only
    the segments the process can execute (where a function can start)."""
    return [
        (seg["p_vaddr"], seg["p_filesz"], seg["p_offset"])
        for seg in elf.iter_segments()
        if seg["p_type"] == "PT_LOAD" and seg["p_offset"] + seg["p_filesz"] <= file_size
        and (not executable or seg["p_flags"] & PF_X)
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
    data = section_data(sec)
    strtab = section_data(elf.get_section(sec["sh_link"]))
    usable = len(data) - len(data) % _SYM.size
    for st_name, st_info, _other, shndx, value, size in _SYM.iter_unpack(data[:usable]):
        if st_info & 0xF not in _FUNC_TYPES or shndx == 0 or not value:
            continue
        end = strtab.find(b"\0", st_name)
        name = strtab[st_name:end if end >= 0 else len(strtab)].decode(errors="replace")
        yield name.split("@", 1)[0], value, size, _BINDS.get(st_info >> 4, "STB_OTHER")


def debuglink(elf: ELFFile) -> tuple[str, int] | None:
    """(file name, CRC) of .gnu_debuglink.  The name must be a bare file name (it is looked
    for in fixed directories): a path (/proc/self/pagemap, ../../etc) is no debug link."""
    sec = elf.get_section_by_name(".gnu_debuglink")
    if sec is None:
        return None
    data = section_data(sec)
    end = data.find(b"\0")
    if end <= 0 or not is_basename(data[:end].decode(errors="replace")):
        return None
    crc_at = (end + 4) & ~3
    if len(data) < crc_at + 4:
        return None
    (crc,) = struct.unpack_from("<I", data, crc_at)
    return data[:end].decode(errors="replace"), crc


def is_basename(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and "\0" not in name


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


NT_STAPSDT = 3


def usdt_notes(elf: ELFFile) -> list[Usdt]:
    """The binary's .note.stapsdt entries, addresses adjusted as SystemTap does when the
    file was prelinked (.stapsdt.base moved)."""
    sec = elf.get_section_by_name(".note.stapsdt")
    if sec is None:
        return []
    base_sec = elf.get_section_by_name(".stapsdt.base")
    out = []
    for owner, ntype, desc in notes(section_data(sec)):
        if ntype != NT_STAPSDT or owner != b"stapsdt" or len(desc) < 27:
            continue
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


def usdt_sites(elf: ELFFile, loads: list[tuple[int, int, int]],
               code: list[tuple[int, int, int]]) -> dict[str, list[UsdtSite]]:
    """The binary's static probes by "provider:name", placed in the file (sites outside
    the executable PT_LOADs `code` are dropped: a uprobe must go into code; semaphores
    are in data, anywhere in `loads`)."""
    out: dict[str, list[UsdtSite]] = {}
    for note in usdt_notes(elf):
        off = vaddr_to_offset(code, note.pc)
        sem = vaddr_to_offset(loads, note.semaphore) if note.semaphore else 0
        if off is None or sem is None:
            continue
        out.setdefault(note.full_name, []).append(UsdtSite(off, sem, note.pc))
    return out


SHF_ALLOC = 2


def _alloc_sections(elf: ELFFile) -> dict[str, tuple[int, int]]:
    return {sec.name: (sec["sh_addr"], sec["sh_size"]) for sec in elf.iter_sections()
            if sec["sh_flags"] & SHF_ALLOC and sec["sh_size"]}


def layout_mismatch(binary: ELFFile, debug: ELFFile) -> str:
    """Why a separate debug file does not describe this binary ("" if it does): its
    loaded sections (.text above all) must sit at the binary's addresses with its sizes,
    as objcopy --only-keep-debug leaves them.  A matching build-id alone proves nothing:
    whoever links a file chooses it."""
    ours, theirs = _alloc_sections(binary), _alloc_sections(debug)
    if ".text" not in ours or ".text" not in theirs:
        return "no .text to compare"
    for name, where in ours.items():
        if name in theirs and theirs[name] != where:
            return (f"section {name} at {theirs[name][0]:#x}+{theirs[name][1]:#x}, the "
                    f"binary's at {where[0]:#x}+{where[1]:#x}")
    return ""


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


def inflate_xz(data: bytes, cap: int) -> bytes:
    """An xz stream (MiniDebugInfo) inflated to at most `cap` bytes: a decompression bomb
    is refused before it is in memory."""
    dec = lzma.LZMADecompressor()
    out = dec.decompress(data, max_length=cap)
    if not dec.eof:
        raise ValueError(f"inflates past {cap >> 20} MiB: refused (a decompression bomb?)")
    return out
