"""Where a stripped binary's symbols are: its separate debug file, by build-id
(<root>/.build-id/xx/rest.debug), by .gnu_debuglink (CRC-checked) in the standard
directories, or fetched by build-id from a debuginfod server.

Why apart: the search has rules of its own (a debug file of another build is refused, a
CRC mismatch is said) and reports every problem it met, for the resolution's hint.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

from elftools.elf.elffile import ELFFile

from qtrace_bpf.errors import ElfError
from qtrace_bpf.symbols import elf as elfio
from qtrace_bpf.symbols.debuginfod import Debuginfod

DEFAULT_DEBUG_ROOTS = ("/usr/lib/debug",)


class DebugSearch:
    """The separate debug file of one binary, found once; `problems` says what was not
    used and why, `fetch_failed` that a debuginfod fetch is worth another try later."""

    def __init__(self, path: str, display: str, build_id: str | None,
                 debug_roots: Iterable[str], debuginfod: Debuginfod | None):
        self.path, self.display, self.build_id = path, display, build_id
        self.debuginfod = debuginfod
        # a debuginfod cache is a debug root too: what was fetched once is found offline
        self.roots = tuple(debug_roots) + ((debuginfod.cache,) if debuginfod else ())
        self.problems: list[str] = []
        self.fetch_failed = False
        self.streams: list[io.BufferedIOBase] = []  # closed by the owner
        self._binary: ELFFile | None = None  # what a debug file must describe

    def find(self, elf: ELFFile) -> tuple[str, ELFFile] | None:
        """(source, opened debug ELF): "build-id:PATH", "debuglink:PATH" or "debuginfod:PATH"."""
        self._binary = elf
        if self.build_id and len(self.build_id) > 2:
            for root in self.roots:
                cand = os.path.join(root, ".build-id", self.build_id[:2],
                                    self.build_id[2:] + ".debug")
                if os.path.exists(cand):
                    found = self._open(cand, f"build-id:{cand}")
                    if found is not None:
                        return f"build-id:{cand}", found
        link = elfio.debuglink(elf)
        if link:
            found_link = self._by_debuglink(*link)
            if found_link is not None:
                return found_link
        return self._fetch(elf)

    def _by_debuglink(self, name: str, crc: int) -> tuple[str, ELFFile] | None:
        bindir = os.path.dirname(os.path.realpath(self.path)) if "/proc/" not in self.path \
            else os.path.dirname(self.display)
        dirs = [bindir, os.path.join(bindir, ".debug")]
        dirs += [os.path.join(root, bindir.lstrip("/")) for root in self.roots]
        tried = []
        for d in dirs:
            cand = os.path.join(d, name)
            if not os.path.isfile(cand):
                continue
            tried.append(cand)
            if not _elf_magic(cand) or elfio.crc32(cand) != crc:
                self.problems.append(f"debuglink:{cand}: CRC mismatch: ignored")
                continue
            found = self._open(cand, f"debuglink:{cand}")
            if found is not None:
                return f"debuglink:{cand}", found
        if not tried:
            self.problems.append(f"debuglink {name!r}: not found in {', '.join(dirs)}")
        return None

    def _fetch(self, elf: ELFFile) -> tuple[str, ELFFile] | None:
        """From a debuginfod server, for a binary without its own symbol table."""
        d = self.debuginfod
        if d is None or not d.urls or not self.build_id or \
                elf.get_section_by_name(".symtab") is not None:
            return None
        path = d.fetch(self.build_id)
        self.problems.extend(d.problems)
        self.fetch_failed = path is None
        if path is None:
            return None
        found = self._open(path, f"debuginfod:{path}")
        return (f"debuginfod:{path}", found) if found is not None else None

    def _open(self, path: str, source: str) -> ELFFile | None:
        try:
            elf, stream = elfio.open_elf(path, path)
        except ElfError as exc:
            self.problems.append(f"{source}: {exc}")
            return None
        bid = elfio.build_id(elf)
        if self.build_id and bid and bid != self.build_id:
            self.problems.append(
                f"{source}: build-id {bid} does not match the binary's {self.build_id}: ignored"
            )
            stream.close()
            return None
        why = elfio.layout_mismatch(self._binary, elf)
        if why:
            self.problems.append(f"{source}: does not describe this binary ({why}): ignored")
            stream.close()
            return None
        self.streams.append(stream)
        return elf


def _elf_magic(path: str) -> bool:
    """Only an ELF file is worth reading whole for its CRC."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def dwz_candidates(name: str, build_id: str, here: str, roots: Iterable[str]) -> list[str]:
    """Where the dwz file a .gnu_debugaltlink names may be: a bare name beside the debug
    file, Debian's absolute /usr/lib/debug/.dwz/... under each debug root, or by the
    link's build-id; never a path that leaves the debug roots."""
    cands = []
    if elfio.is_basename(name):
        cands.append(os.path.join(here, name))
    elif name.startswith("/usr/lib/debug/"):
        rel = os.path.normpath(name.removeprefix("/usr/lib/debug/"))
        if not rel.startswith(".."):
            cands += [os.path.join(root, rel) for root in roots]
    if len(build_id) > 2 and all(c in "0123456789abcdef" for c in build_id):
        cands += [os.path.join(root, ".build-id", build_id[:2], build_id[2:] + ".debug")
                  for root in roots]
    return cands
