"""The short-lived loader: BCC compiles probes/qtrace.bpf.c, loads it, and pins its maps,
its uprobe handlers and its kernel-hook links under one layout directory, says on stdout
what it built (JSON), and exits.

Why a separate process: the long-lived daemon must hold no compiler (libLLVM, libclang and
libbcc are ~60 MB, used once).  A daemon start whose pins match this build (same sources,
map sizes, catalog; the hook asked for) compiles nothing; any other start runs this again.
Pins go with a reboot, so a new kernel always loads afresh.

    python -m qtrace_bpf.program.loader --pin-dir DIR [--hook auto] [--max-vms N] [--max-vcpus N]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field

from qtrace_bpf import procfs
from qtrace_bpf.bpf import bpfsys
from qtrace_bpf.bpf.pins import PinDir, remove_pins
from qtrace_bpf.contract import abi
from qtrace_bpf.contract.catalog import Catalog, bpf_source, load_catalog
from qtrace_bpf.errors import QtraceError
from qtrace_bpf.log import Log
from qtrace_bpf.program import bcc_compile, kernel_hook

HANDLER_KINDS = ("entry", "return", "blind")


def layout_name(catalog: Catalog, max_vms: int, max_vcpus: int) -> str:
    """What the pinned bytes mean: the header's ABI, the map sizes, the catalog's slots
    (they key lifecycle counts and name link pins)."""
    slots = "".join(f"{p.slot}:{p.event}:{p.action};" for p in catalog.probes)
    digest = hashlib.sha256(slots.encode()).hexdigest()[:8]
    return f"v{abi.QTRACE_ABI_VERSION}-{max_vms}x{max_vcpus}-{digest}"



@dataclass
class Manifest:
    """What a load pinned, and what identifies it.  bpffs holds no plain files (and no '.'
    in names): the loader says this on stdout, and a later start reads it back from the
    name of the directory that holds the pinned handlers, progs/<identity>-<hook>-<bcc>."""

    identity: str  # sources, sizes, catalog: equal identity, equal program
    hook: str  # the kernel hook chosen
    uprobes: str  # "multi" or "perf": how the uprobe handlers were loaded (bcc_compile.py)
    bcc: str = ""
    refusals: dict[str, str] = field(default_factory=dict)  # hooks refused, and why
    links: list[str] = field(default_factory=list)  # kernel-hook links pinned under links/
    replaced: list[str] = field(default_factory=list)  # link pins of another program

    @property
    def dirname(self) -> str:
        return (f"{self.identity}-{self.hook}-{self.uprobes}-"
                f"{self.bcc.replace('.', '_') or 'bcc'}")

    @classmethod
    def from_dir(cls, pin_dir: str, name: str) -> Manifest | None:
        parts = name.split("-", 3)
        if len(parts) != 4:
            return None
        links_dir = os.path.join(pin_dir, "links")
        links = sorted(n for n in os.listdir(links_dir) if not n.startswith("u-")) \
            if os.path.isdir(links_dir) else []
        return cls(parts[0], parts[1], parts[2], parts[3].replace("_", "."), links=links)


def identity(catalog: Catalog, max_vms: int, max_vcpus: int) -> str:
    """Everything the compiled bytes depend on but the hook (chosen at load)."""
    h = hashlib.sha256()
    for name in ("qtrace.bpf.c", abi.HEADER, "fentry_check.bpf.c"):
        h.update(bpf_source(name).encode())
    h.update(f"{max_vms}x{max_vcpus};{procfs.pid_namespace()};".encode())
    h.update("".join(f"{p.slot}:{p.action};" for p in catalog.probes).encode())
    return h.hexdigest()[:16]


def handlers(catalog: Catalog) -> list[str]:
    """The uprobe handlers the daemon attaches with: one set per catalog slot."""
    return [f"qt_{kind}_{p.slot}" for p in catalog.probes for kind in HANDLER_KINDS]


def hooked(hook: str, links: list[str]) -> bool:
    """Are the link pins of the kernel hook and of discovery all there?"""
    have = set(links)
    if not {"tp-sched_process_exec", "tp-sched_process_exit"} <= have:
        return False
    if hook == "tracepoint":
        return {"tp-sys_enter_ioctl", "tp-sys_exit_ioctl"} <= have
    if hook == "kprobe":
        return {f"{k}-{fn}" for fn in kernel_hook.KVM_FUNCS for k in ("k", "kr")} <= have
    return {f"f-{k}_{fn}" for fn in kernel_hook.KVM_FUNCS for k in ("fe", "fx")} <= have


def find(pin_dir: str, catalog: Catalog, want: str, hook: str | None) -> Manifest | None:
    """The pinned program of this build, complete, if there is one."""
    progs = os.path.join(pin_dir, "progs")
    names = os.listdir(progs) if os.path.isdir(progs) else []
    for name in names:
        m = Manifest.from_dir(pin_dir, name)
        if m is None or m.identity != want or hook not in (None, "", "auto", m.hook) or \
                m.uprobes != bcc_compile.uprobe_mode():
            continue
        have = set(os.listdir(os.path.join(progs, name)))
        if set(handlers(catalog)) <= have and hooked(m.hook, m.links):
            return m
    return None


def load(pin_dir: str, hook: str | None, max_vms: int, max_vcpus: int,
         log: Log) -> Manifest:
    """Compile, load, pin (this process ends right after)."""
    from qtrace_bpf.program.compiled import QtraceProgram  # BCC: only here, never in the daemon

    catalog = load_catalog()
    pins = PinDir(pin_dir)
    progs = os.path.join(pin_dir, "progs")
    loading_dir = os.path.join(progs, "loading")  # renamed once whole
    for name in os.listdir(progs) if os.path.isdir(progs) else []:
        remove_pins(os.path.join(progs, name))  # another build's handlers, or half a load
    prog = QtraceProgram(catalog, hook=hook, log=log, discovery=True, max_vms=max_vms,
                         max_vcpus=max_vcpus, pins=pins)
    try:
        for name in os.listdir(pins.links):  # another hook's links: one hook at a time
            if not name.startswith("u-") and name not in prog.hook_links:
                pins.unpin(name)
                pins.replaced.append(name)
        os.makedirs(loading_dir)
        for name in handlers(catalog):
            bpfsys.pin(prog.prog_fd(name), os.path.join(loading_dir, name))
        manifest = Manifest(identity(catalog, max_vms, max_vcpus), prog.hook_mode,
                            prog.uprobes, prog.bcc_version, prog.refusals, prog.hook_links,
                            list(pins.replaced))
        os.rename(loading_dir, os.path.join(progs, manifest.dirname))
        return manifest
    finally:
        prog.close(keep_pins=True)


def ensure(pin_dir: str, hook: str | None, max_vms: int, max_vcpus: int,
           log: Log) -> tuple[Manifest, bool]:
    """The pins of this build: found as they are, or made by a loader process.
    Returns (manifest, True when the loader ran)."""
    catalog = load_catalog()
    want = identity(catalog, max_vms, max_vcpus)
    found = find(pin_dir, catalog, want, hook)
    if found is not None:
        return found, False
    log("running the BPF loader", reason="no complete program of this build pinned")
    argv = [sys.executable, "-m", "qtrace_bpf.program.loader", "--pin-dir", pin_dir,
            "--hook", hook or "auto", "--max-vms", str(max_vms), "--max-vcpus", str(max_vcpus),
            "--proc-root", procfs.root(),
            "--log-level", logging.getLevelName(logging.getLogger("qtrace").getEffectiveLevel()),
            "--log-format", "json" if any(getattr(h.formatter, "as_json", False)
                                          for h in logging.getLogger().handlers) else "logfmt"]
    # its own session: a terminal's Ctrl-C must not stop it halfway through pinning
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        answer = {"error": done.stdout.strip()}
    if done.returncode != 0 or "error" in answer:
        raise QtraceError(answer.get("error") or f"the BPF loader failed ({done.returncode})")
    return Manifest(**answer), True


def prepare(pin_root: str, hook: str | None, max_vms: int, max_vcpus: int, owner: str | None,
            log: Log) -> Manifest:
    """The unit's privileged step before the daemon starts (ExecStartPre=+): load and pin
    the program of this config, then hand every pin to the daemon's user.  Loading needs
    what the daemon does not keep: KVM's BTF object for fentry (CAP_SYS_ADMIN), and perf
    events where kernel.perf_event_paranoid is 3 (Debian's default)."""
    import pwd

    layout = layout_name(load_catalog(), max_vms, max_vcpus)
    made, compiled = ensure(os.path.join(pin_root, layout), hook, max_vms, max_vcpus, log)
    if owner:
        try:
            user = pwd.getpwnam(owner)
        except KeyError:
            raise QtraceError(f"no such user {owner!r}") from None
        for dirpath, dirs, files in os.walk(pin_root):
            for name in [*dirs, *files]:
                os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)
        os.chown(pin_root, user.pw_uid, user.pw_gid)
    log("BPF program pinned", dir=os.path.join(pin_root, layout), hook=made.hook,
        uprobes=made.uprobes, program="compiled" if compiled else "reused", owner=owner)
    return made


def main(argv: list[str] | None = None) -> int:
    from qtrace_bpf.logfmt import logger_fn, setup

    ap = argparse.ArgumentParser(prog="qtrace-loader", description=__doc__)
    ap.add_argument("--pin-dir", required=True)
    ap.add_argument("--hook", default="auto")
    ap.add_argument("--max-vms", type=int, default=1024)
    ap.add_argument("--max-vcpus", type=int, default=64)
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--log-format", default="logfmt", choices=("logfmt", "json"))
    ap.add_argument("--proc-root", default=procfs.DEFAULT)
    args = ap.parse_args(argv)
    setup(args.log_level, args.log_format)
    log = logger_fn(logging.getLogger("qtrace"))
    try:
        procfs.use(args.proc_root)
        with bcc_compile.signals_held():  # a signal must not leave half a pin directory
            made = load(args.pin_dir, args.hook, args.max_vms, args.max_vcpus, log)
    except QtraceError as exc:
        print(json.dumps({"error": str(exc)}))  # stdout: for the daemon
        return 2
    print(json.dumps(dataclasses.asdict(made)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
