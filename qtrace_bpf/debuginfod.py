"""Debug files by build-id from debuginfod servers: fetched once, verified, cached.

Why: distributions strip QEMU; the static functions of the catalog (kvm_apic_reset,
kvm_arch_set_tsc_khz) are only in its debug file.  Debian, Fedora and Ubuntu run
debuginfod servers that hand it out by build-id.  Servers come from DEBUGINFOD_URLS (the
variable elfutils, gdb and perf read) or the daemon's `debuginfod_urls`.

A file is kept only if it is an x86-64 ELF whose build-id is the one asked for (a server
is not trusted to answer the right question).  The cache is laid out as a debug root
(<cache>/.build-id/xx/rest.debug), so a fetched file is found offline ever after.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from .elf import read_build_id
from .errors import ElfError

DEFAULT_CACHE = "/var/cache/qtrace/debuginfo"
MAX_BYTES = 4 << 30  # an upper bound on a sane debug file (QEMU's is ~200 MB)


@dataclass
class Debuginfod:
    urls: tuple[str, ...] = ()
    cache: str = DEFAULT_CACHE
    timeout: float = 30.0
    problems: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls, urls: tuple[str, ...] = (), cache: str | None = None) -> Debuginfod:
        """Configured URLs, else DEBUGINFOD_URLS (space-separated, as elfutils reads it)."""
        env = tuple(os.environ.get("DEBUGINFOD_URLS", "").split())
        return cls(urls=tuple(urls) or env,
                   cache=cache or os.environ.get("QTRACE_DEBUGINFO_CACHE") or DEFAULT_CACHE)

    def cached_path(self, build_id: str) -> str:
        return os.path.join(self.cache, ".build-id", build_id[:2], build_id[2:] + ".debug")

    def fetch(self, build_id: str) -> str | None:
        """The debug file for `build_id` (from the cache, or fetched into it); None, with
        the reasons in `problems`, when no server has a good one."""
        path = self.cached_path(build_id)
        if os.path.isfile(path):
            return path
        for url in self.urls:
            got = self._fetch_one(url.rstrip("/"), build_id, path)
            if got:
                return got
        return None

    def _fetch_one(self, base: str, build_id: str, path: str) -> str | None:
        url = f"{base}/buildid/{build_id}/debuginfo"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as exc:
            self.problems.append(f"debuginfod cache {self.cache}: {exc.strerror}")
            return None
        fd, tmp = tempfile.mkstemp(prefix=".fetch-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as out:
                req = urllib.request.Request(url, headers={"User-Agent": "qtrace"})
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                    size = 0
                    while chunk := resp.read(1 << 20):
                        size += len(chunk)
                        if size > MAX_BYTES:
                            raise ValueError(f"larger than {MAX_BYTES >> 20} MB")
                        out.write(chunk)
            try:
                got = read_build_id(tmp, display=url)
            except ElfError as exc:
                raise ValueError(str(exc).replace(url + ": ", "")) from None
            if got != build_id:
                raise ValueError(f"build-id {got} is not the one asked for ({build_id})")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            return path
        except urllib.error.HTTPError as exc:
            self.problems.append(f"debuginfod {base}: {exc.code} {exc.reason} for {build_id}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            why = getattr(exc, "reason", None) or exc
            self.problems.append(f"debuginfod {base}: {why}: rejected")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return None
