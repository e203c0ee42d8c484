"""Symbol resolution in a short-lived child process, bounded in memory, CPU and time.

Why: parsing a binary (ELF, notes, MiniDebugInfo, DWARF) runs pyelftools and xz over bytes
that whoever built the file chose.  A decompression bomb or an endless DIE walk must cost
one failed resolution, not the daemon (an OOM kill under MemoryMax, then the same file again
after the restart: a crash loop that counts no VM).  The child inherits the already opened,
already trusted file (its number in QTRACE_RESOLVE_FD), sets its own rlimits before it
reads a byte, and answers one JSON object on stdout.

    python -m qtrace_bpf.symbols.resolver  (request on stdin, the binary's fd in QTRACE_RESOLVE_FD)
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from qtrace_bpf.errors import ElfError
from qtrace_bpf.symbols.binfile import BinaryFile
from qtrace_bpf.symbols.debuginfod import Debuginfod


@dataclass(frozen=True)
class Limits:
    """What one resolution may take: wall seconds (the child is killed after), CPU seconds
    and address space (RLIMIT_CPU, RLIMIT_AS: the child fails cleanly at either)."""

    seconds: float = 60.0
    cpu_seconds: int = 60
    memory_bytes: int = 1 << 30


DEFAULT_LIMITS = Limits()


def resolve_isolated(bf: BinaryFile, names: tuple[str, ...], debug_roots: tuple[str, ...],
                     debuginfod: Debuginfod | None, limits: Limits = DEFAULT_LIMITS,
                     tick: Callable[[], None] | None = None):
    """The Resolution of `bf`, computed by a child; ElfError on any failure of the child
    (its message, or what killed it).  tick: called about once a second while waiting (the
    daemon's liveness beat)."""
    request = {"names": list(names), "debug_roots": list(debug_roots), "display": bf.display,
               "cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_bytes,
               "debuginfod": None if debuginfod is None else {
                   "urls": list(debuginfod.urls), "cache": debuginfod.cache,
                   "timeout": debuginfod.timeout, "deadline": debuginfod.deadline,
                   "allow_http": debuginfod.allow_http, "quota": debuginfod.quota}}
    child = subprocess.Popen(
        [sys.executable, "-m", "qtrace_bpf.symbols.resolver"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=(bf.fd,),
        start_new_session=True, env={**os.environ, "QTRACE_RESOLVE_FD": str(bf.fd)})
    deadline = time.monotonic() + limits.seconds
    data = json.dumps(request)
    while True:
        try:
            out, err = child.communicate(data, timeout=min(1.0, max(0.05, deadline -
                                                                    time.monotonic())))
            break
        except subprocess.TimeoutExpired:
            data = None
            if tick is not None:
                tick()
            if time.monotonic() >= deadline:
                child.kill()
                child.communicate()
                raise ElfError(f"{bf.display}: resolution took longer than "
                               f"{limits.seconds:g}s: stopped") from None
    try:
        answer = json.loads(out)
    except ValueError:
        answer = {}
    if child.returncode != 0 or "resolution" not in answer:
        why = answer.get("error") or _death(child.returncode, err, limits)
        raise ElfError(why if why.startswith(bf.display) else f"{bf.display}: {why}")
    return from_dict(answer["resolution"])


def from_dict(d: dict):
    """The Resolution the child sent (dataclasses.asdict of it, through JSON)."""
    from qtrace_bpf.symbols import elf as elfio
    from qtrace_bpf.symbols.elfsym import Missing, Resolution, Symbol

    return Resolution(**{
        **d,
        "found": {n: [Symbol(**s) for s in syms] for n, syms in d["found"].items()},
        "missing": {n: Missing(**m) for n, m in d["missing"].items()},
        "loads": [tuple(x) for x in d["loads"]],
        "usdt": {n: [elfio.UsdtSite(**u) for u in sites] for n, sites in d["usdt"].items()},
    })


def _death(code: int | None, err: str, limits: Limits) -> str:
    """Why a child ended without an answer, in words an operator can act on."""
    tail = (err or "").strip().splitlines()[-1:] or [""]
    if code is not None and code < 0:
        import signal

        name = signal.Signals(-code).name
        if name == "SIGXCPU":
            return f"parsing used more than {limits.cpu_seconds}s of CPU: stopped"
        return f"the resolver was killed ({name}; memory limit {limits.memory_bytes >> 20} MiB?)"
    if "MemoryError" in tail[0]:
        return f"parsing needed more than {limits.memory_bytes >> 20} MiB: stopped"
    return (f"the resolver failed (exit {code}; limits {limits.memory_bytes >> 20} MiB, "
            f"{limits.cpu_seconds}s CPU): {tail[0][:300]}")


def main() -> int:
    req = json.loads(sys.stdin.read())
    resource.setrlimit(resource.RLIMIT_AS, (req["memory_bytes"], req["memory_bytes"]))
    cpu = int(req["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    from qtrace_bpf.symbols import elfsym

    fd = int(os.environ["QTRACE_RESOLVE_FD"])
    d = req["debuginfod"]
    debuginfod = None if d is None else Debuginfod(
        urls=tuple(d["urls"]), cache=d["cache"], timeout=d["timeout"], deadline=d["deadline"],
        allow_http=d["allow_http"], quota=d["quota"])
    names = tuple(req["names"])
    try:
        res = elfsym.resolve(f"/proc/self/fd/{fd}", names, debug_roots=tuple(req["debug_roots"]),
                             display=req["display"], inline_names=names, debuginfod=debuginfod)
    except MemoryError:
        print(json.dumps({"error": f"{req['display']}: parsing needed more than "
                          f"{req['memory_bytes'] >> 20} MiB: stopped"}))
        return 3
    except ElfError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps({"resolution": dataclasses.asdict(res)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
