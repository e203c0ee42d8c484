"""Debug files by build-id from debuginfod servers: fetched once, verified, cached.

Why: distributions strip QEMU; the static functions of the catalog (kvm_apic_reset,
kvm_arch_set_tsc_khz) are only in its debug file.  Debian, Fedora and Ubuntu run
debuginfod servers that hand it out by build-id.  Servers come from DEBUGINFOD_URLS (the
variable elfutils, gdb and perf read) or the daemon's `debuginfod_urls`.

A server is not trusted to answer the right question, nor the network to carry it: only
https URLs are used unless the operator allows plain http, a fetch has one deadline for
the whole download, and a file is kept only if it is an x86-64 ELF whose build-id is the
one asked for (the resolver then also checks that its sections lie where the binary's do).
The cache has a size quota (oldest files go first); half-written downloads of a killed
fetch are removed whenever the cache is opened.  The cache is laid out as a debug root
(<cache>/.build-id/xx/rest.debug), so a fetched file is found offline ever after.
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from qtrace_bpf.errors import ElfError
from qtrace_bpf.symbols.elf import read_build_id

DEFAULT_CACHE = "/var/cache/qtrace/debuginfo"
MAX_BYTES = 4 << 30  # an upper bound on a sane debug file (QEMU's is ~200 MB)


DEFAULT_QUOTA = 2 << 30
TEMP_PREFIX = ".fetch-"


@dataclass
class Debuginfod:
    urls: tuple[str, ...] = ()
    cache: str = DEFAULT_CACHE
    timeout: float = 30.0  # one read
    deadline: float = 120.0  # one whole download
    allow_http: bool = False  # plain http: anyone on the path chooses the debug file
    quota: int = DEFAULT_QUOTA  # bytes the cache may hold
    problems: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls, urls: tuple[str, ...] = (), cache: str | None = None,
                 allow_http: bool = False, quota: int = DEFAULT_QUOTA) -> Debuginfod:
        """Configured URLs, else DEBUGINFOD_URLS (space-separated, as elfutils reads it).
        QTRACE_DEBUGINFOD_ALLOW_HTTP=1 allows plain http where no config says so (watch,
        symbols: an engineer's local server)."""
        env = tuple(os.environ.get("DEBUGINFOD_URLS", "").split())
        return cls(urls=tuple(urls) or env,
                   cache=cache or os.environ.get("QTRACE_DEBUGINFO_CACHE") or DEFAULT_CACHE,
                   allow_http=allow_http or
                   os.environ.get("QTRACE_DEBUGINFOD_ALLOW_HTTP") == "1", quota=quota)

    def remove_partial(self) -> list[str]:
        """Downloads a killed fetch left half-written (called at start)."""
        gone = []
        for dirpath, _dirs, files in os.walk(self.cache):
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    path = os.path.join(dirpath, name)
                    try:
                        os.unlink(path)
                        gone.append(path)
                    except OSError:
                        pass
        return gone

    def _make_room(self, incoming: int) -> None:
        """Evict the least recently used debug files until `incoming` bytes fit."""
        files = []
        for dirpath, _dirs, names in os.walk(self.cache):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                files.append((max(st.st_atime, st.st_mtime), st.st_size, path))
        used = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if used + incoming <= self.quota:
                break
            try:
                os.unlink(path)
                used -= size
            except OSError:
                pass

    def cached_path(self, build_id: str) -> str:
        return os.path.join(self.cache, ".build-id", build_id[:2], build_id[2:] + ".debug")

    def fetch(self, build_id: str) -> str | None:
        """The debug file for `build_id` (from the cache, or fetched into it); None, with
        the reasons in `problems`, when no server has a good one."""
        path = self.cached_path(build_id)
        if os.path.isfile(path):
            return path
        for url in self.urls:
            if not url.startswith("https://") and not (self.allow_http and
                                                       url.startswith("http://")):
                self.problems.append(f"debuginfod {url}: not https (set debuginfod_allow_http "
                                     "= true to use plain http): skipped")
                continue
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
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=os.path.dirname(path))
        limit = min(MAX_BYTES, self.quota)
        ends = time.monotonic() + self.deadline
        try:
            with os.fdopen(fd, "wb") as out:
                req = urllib.request.Request(url, headers={"User-Agent": "qtrace"})
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                    size = 0
                    while chunk := resp.read(1 << 20):
                        size += len(chunk)
                        if size > limit:
                            raise ValueError(f"larger than {limit >> 20} MiB (the cache quota "
                                             "or the largest sane debug file)")
                        if time.monotonic() > ends:
                            raise ValueError(f"download took longer than {self.deadline:g}s")
                        out.write(chunk)
            try:
                got = read_build_id(tmp, display=url)
            except ElfError as exc:
                raise ValueError(str(exc).replace(url + ": ", "")) from None
            if got != build_id:
                raise ValueError(f"build-id {got} is not the one asked for ({build_id})")
            self._make_room(size)
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
