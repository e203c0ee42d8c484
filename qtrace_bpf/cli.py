"""qprobe: the command line (click). User mistakes end in one line on stderr, never a traceback."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys

import click

from qtrace_bpf import procfs, version_text
from qtrace_bpf.errors import QtraceError
from qtrace_bpf.log import null_log
from qtrace_bpf.program import kernel_hook
from qtrace_bpf.symbols.debugfiles import DEFAULT_DEBUG_ROOTS

HOOK_CHOICE = click.Choice(["auto", *kernel_hook.MODES])


class _Group(click.Group):
    """Turn QtraceError into `qprobe: error: ...` and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QtraceError as exc:
            click.echo(f"qprobe: error: {exc}", err=True)
            if os.environ.get("NOTIFY_SOCKET"):  # under systemd: `systemctl status` says why
                from qtrace_bpf.commands.service import Notifier

                Notifier(null_log).send(f"STATUS=qprobe: error: {exc}"[:2000])
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=lambda ctx, _p, v: v and not ctx.resilient_parsing and
              (click.echo(version_text()), ctx.exit()),
              help="Show the version, revision, branch, build date and runtime, and exit.")
def main() -> None:
    """Trace when and why QEMU writes vCPU state into KVM.

    \b
    Uprobes on QEMU's lifecycle functions (boot, reset, CPU hotplug, incoming
    migration) attribute every KVM state-writing ioctl (KVM_SET_SREGS2,
    KVM_SET_LAPIC, KVM_SET_MSRS, KVM_SET_TSC_KHZ, ...) to a vCPU and a phase.

    \b
    Start here:
      qprobe doctor                 what this host supports
      qprobe symbols --pid PID      what resolves in that QEMU
      qprobe watch PID              live view of one VM (Ctrl-C ends, prints a summary)
      qprobe watch --vm NAME        the same, by VM name
      qprobe watch PID --json       one JSON object per line
      qprobe demo                   a throwaway VM, traced (from a source checkout)
      qprobe daemon --config F      every VM on the host, as Prometheus metrics
      qprobe cleanup                remove the maps and probes a daemon left pinned
    """


@main.command()
@click.argument("pid", type=int, required=False)
@click.option("--vm", "vm_name", metavar="NAME",
              help="Watch the QEMU whose VM name is NAME (-name guest=NAME, the libvirt "
                   "domain name; the daemon's `vm` label) instead of giving its PID.")
@click.option("--vcpu", "vcpus", type=click.IntRange(min=0), multiple=True, metavar="N",
              help="Show only state writes of vCPU N (repeatable); lifecycle events still "
                   "show.")
@click.option("--ioctl", "ioctls", multiple=True, metavar="NAME",
              help="Show only writes of this ioctl (repeatable; KVM_SET_TSC_KHZ or "
                   "set_tsc_khz); hides lifecycle events.")
@click.option("--phase", "phases", multiple=True, metavar="PHASE",
              help="Show only events of this phase (repeatable): boot, reset, hotplug, "
                   "migration, runtime.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line on stdout (last one: kind=summary); "
                   "diagnostics on stderr.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Stop after this many seconds (default: until Ctrl-C, "
                                      "SIGTERM or the QEMU process exits).")
@click.option("--hook", type=HOOK_CHOICE, default="auto", show_default=True,
              help="Kernel hook on KVM ioctls; auto tries fentry, kprobe, then the "
                   "syscalls:sys_enter_ioctl tracepoint.")
@click.option("--debug-root", "debug_roots", multiple=True, metavar="DIR",
              help="Where separate debug files live (repeatable; default /usr/lib/debug).")
def watch(pid: int | None, vm_name: str | None, vcpus: tuple[int, ...], ioctls: tuple[str, ...],
          phases: tuple[str, ...], as_json: bool, duration: float | None, hook: str,
          debug_roots: tuple[str, ...]) -> None:
    """Trace one QEMU process (PID, or --vm NAME) and print its vCPU state writes.

    Each KVM state write shows its vCPU, its lifecycle phase (boot, reset with
    its cause, hotplug, migration, runtime) and, where QEMU wrote them, the
    decoded APIC base, TSC frequency and TSC MSRs, with whether they changed.
    A write outside the phases the catalog expects it in is marked UNEXPECTED;
    the end of a reset, hotplug or incoming migration prints how long it took.
    --vcpu/--ioctl/--phase choose what is printed; the summary counts every
    write.  Ends at --duration, Ctrl-C, SIGTERM or when QEMU exits; all probes
    are detached on every exit path.

    \b
    Examples:
      qprobe watch 4242
      qprobe watch --vm web1 --ioctl KVM_SET_TSC_KHZ
      qprobe watch --vm web1 --vcpu 1 --phase hotplug --phase reset
      qprobe watch 4242 --json --duration 60 > writes.jsonl
    """
    from qtrace_bpf.commands.watch import run_watch
    from qtrace_bpf.commands.watch_filter import EventFilter
    from qtrace_bpf.vms.targets import pid_of_vm

    if (pid is None) == (vm_name is None):
        raise click.UsageError("give either PID or --vm NAME")
    show = EventFilter.parse(vcpus, ioctls, phases)
    if vm_name is not None:
        pid = pid_of_vm(vm_name)
    assert pid is not None
    roots = debug_roots or DEFAULT_DEBUG_ROOTS
    sys.exit(run_watch(pid, as_json=as_json, duration=duration,
                       hook=None if hook == "auto" else hook, debug_roots=roots, show=show))


@main.command()
@click.argument("binary", required=False, type=click.Path(dir_okay=False, readable=False))
@click.option("--pid", type=int, default=None, help="Resolve the binary a running QEMU maps "
                                                    "(works when it was replaced on disk).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--debug-root", "debug_roots", multiple=True, metavar="DIR",
              help="Where separate debug files live (repeatable; default /usr/lib/debug).")
def symbols(binary: str | None, pid: int | None, as_json: bool,
            debug_roots: tuple[str, ...]) -> None:
    """Show how each catalog event resolves in a QEMU BINARY (or --pid PID).

    For each event: the function used, where the symbol came from (.symtab,
    .dynsym, .gnu_debugdata, build-id or debuglink debug file), its address,
    file offset, size, first instruction, inlining, and what is missing.

    \b
    Examples:
      qprobe symbols /usr/bin/qemu-system-x86_64
      qprobe symbols --pid 4242 --json
      qprobe symbols ./qemu-system-x86_64 --debug-root /srv/debug
    """
    from qtrace_bpf.commands.symbols import run_symbols

    if (binary is None) == (pid is None):
        raise click.UsageError("give either BINARY or --pid PID")
    run_symbols(binary, pid, as_json, debug_roots or DEFAULT_DEBUG_ROOTS)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """What this host supports and which kernel hook qprobe will use.

    Checks root/capabilities, BCC, kernel headers, BTF, tracefs and uprobes,
    /dev/kvm and QEMU, then loads the program to find the kernel hook that
    works here (fentry, kprobe, syscall tracepoints) and says why the others
    do not.  Exit 0 when qprobe can trace.

    \b
    Examples:
      qprobe doctor
      qprobe doctor --json
    """
    from qtrace_bpf.commands.doctor import run_doctor

    report = run_doctor()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        from qtrace_bpf.commands.doctor import render_doctor

        click.echo(render_doctor(report))
    sys.exit(0 if report["ready"] else 1)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config file (the daemon's): pin root, hook, map sizes.")
@click.option("--owner", default=None, metavar="USER",
              help="Hand the pins to USER afterwards (the daemon's user).")
def load(config_path: str | None, owner: str | None) -> None:
    """Load and pin the daemon's BPF program, then exit.

    \b
    The packaged unit runs this as root before the daemon starts, so that
    the long-running daemon needs fewer privileges: fentry on a KVM module
    and perf events under kernel.perf_event_paranoid=3 need CAP_SYS_ADMIN,
    once, to load.  Pins that match this build are reused (nothing compiled).

    \b
    Example:
      qprobe load --config /etc/qtrace/qtrace.toml --owner qtrace
    """
    from qtrace_bpf.commands.config import load_config
    from qtrace_bpf.logfmt import logger_fn, setup
    from qtrace_bpf.program.loader import prepare

    cfg = load_config(config_path)
    setup(cfg.log_level, cfg.log_format)
    procfs.use(cfg.proc_root)  # the program reports pids as that proc numbers them
    from qtrace_bpf.bpf.pins import is_bpffs

    if not cfg.bpf_pin_root or not is_bpffs(cfg.bpf_pin_root):
        # not an error: the daemon then loads the program in its own process
        why = "empty" if not cfg.bpf_pin_root else "not on a bpf filesystem"
        click.echo(f"qprobe load: nothing to do: pinning is off (bpf_pin_root = "
                   f"{cfg.bpf_pin_root!r} is {why})", err=True)
        return
    prepare(cfg.bpf_pin_root, cfg.kernel_hook, cfg.max_vms, cfg.max_vcpus_per_vm, owner,
            logger_fn(logging.getLogger("qtrace")))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config file: its bpf_pin_root is what is removed.")
@click.option("--pin-root", default=None, metavar="DIR",
              help="Remove the pins under DIR (default: the config's bpf_pin_root, "
                   "/sys/fs/bpf/qtrace).")
def cleanup(config_path: str | None, pin_root: str | None) -> None:
    """Remove every pinned map and probe a daemon left behind.

    A daemon stopped with keep_on_exit = true (the default) leaves its BPF maps
    and probe links pinned, so the kernel goes on counting and the next daemon
    continues.  This removes them: the probes detach and the counts go, as soon
    as no daemon holds them (stop the daemon first).

    \b
    Examples:
      qprobe cleanup
      qprobe cleanup --config /etc/qtrace/qtrace.toml
    """
    from qtrace_bpf.bpf.pins import remove_pins
    from qtrace_bpf.commands.config import load_config

    root = pin_root or load_config(config_path).bpf_pin_root
    if not root or not os.path.exists(root):
        click.echo(f"nothing pinned under {root or '(pinning off)'}")
        return
    removed = remove_pins(root)
    click.echo(f"removed {len(removed)} pins under {root}")


@click.command()
@click.option("--duration", type=float, default=None, metavar="SECONDS",
              help="Stop tracing after this long (default: when the demo's steps are done).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of the live view.")
def demo(duration: float | None, as_json: bool) -> None:
    """Start a throwaway QEMU/KVM VM and trace it live.

    The VM starts paused in --preconfig, so its boot is traced in full; then
    the demo creates the machine, runs it, hot-adds a vCPU, resets it over QMP
    and quits it. Needs /dev/kvm and qemu-system-x86_64.

    \b
    Examples:
      qprobe demo
      qprobe demo --json
    """
    try:
        from qtrace_bpf.commands.demo import run_demo
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("qemu"):
            raise
        raise QtraceError("the demo drives QEMU over QMP with qemu.qmp, which is not installed "
                          "(not in Debian): .venv/bin/pip install qemu.qmp, or run "
                          "`bash scripts/demo.sh` from a source checkout") from None
    sys.exit(run_demo(duration=duration, as_json=as_json))


# The Debian package leaves the demo out (its QMP client is not in Debian): no command
# that could only fail there.
if importlib.util.find_spec(f"{__package__}.commands.demo") is not None:
    main.add_command(demo)


from qtrace_bpf.commands.daemon_flags import daemon  # noqa: E402  (registered after main exists)

main.add_command(daemon)

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="qprobe")
