"""qprobe daemon: its flags (node_exporter's spellings: --web.listen-address, repeatable;
--web.telemetry-path; --log.level; --log.format), the config they override, and the start.
The older --listen and --log-level still work, with a deprecation line."""

from __future__ import annotations

import sys

import click

from qtrace_bpf.errors import QtraceError
from qtrace_bpf.logfmt import LOG_FORMATS, LOG_LEVELS
from qtrace_bpf.program.kernel_hook import MODES

HOOK_CHOICE = click.Choice(["auto", *MODES])


@click.command()
@click.option("--web.listen-address", "listen_addresses", multiple=True, metavar="HOST:PORT",
              help="Serve metrics here; repeat for several: 127.0.0.1:10471, [::1]:10471, "
                   "or :10471 for every IPv4 and IPv6 address (default: the config's "
                   "`listen`, else 0.0.0.0:10471).")
@click.option("--web.systemd-socket", "systemd_socket", is_flag=True,
              help="Serve on the sockets systemd passes (socket activation: a .socket "
                   "unit's ListenStream=) instead of binding the listen addresses.")
@click.option("--web.telemetry-path", "telemetry_path", default=None, metavar="PATH",
              help="Path of the metrics (default /metrics).")
@click.option("--web.config.file", "web_config_file", type=click.Path(dir_okay=False),
              default=None, help="Prometheus exporter-toolkit web config (YAML: "
                                 "tls_server_config, basic_auth_users), as node_exporter takes.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config file (the package installs /etc/qtrace/qtrace.toml).")
@click.option("--path.procfs", "proc_root", default=None, metavar="DIR",
              help="Where the host's processes are read (default: the config's proc_root, "
                   "else /proc).  In a container without hostPID, mount the host's /proc "
                   "(e.g. at /host/proc) and name it here.")
@click.option("--hook", type=HOOK_CHOICE, default=None,
              help="Kernel hook on KVM ioctls (default: the config's, else auto).")
@click.option("--log.level", "log_level", type=click.Choice(LOG_LEVELS), default=None,
              help="Log verbosity (logs go to stderr: the journal).")
@click.option("--log.format", "log_format", type=click.Choice(LOG_FORMATS), default=None,
              help="logfmt (default) or json, one object a line.")
@click.option("--listen", "old_listen", default=None, hidden=True)
@click.option("--log-level", "old_log_level", type=click.Choice(LOG_LEVELS), default=None,
              hidden=True)
@click.option("--check-config", is_flag=True,
              help="Check the config and web config (types, ranges, certificates, bcrypt "
                   "hashes), print what was found, exit 0 or 1; attaches nothing.")
def daemon(listen_addresses: tuple[str, ...], systemd_socket: bool, telemetry_path: str | None,
           web_config_file: str | None, config_path: str | None, proc_root: str | None,
           hook: str | None,
           log_level: str | None, log_format: str | None, old_listen: str | None,
           old_log_level: str | None, check_config: bool) -> None:
    """Trace every QEMU on this host and serve Prometheus metrics.

    \b
    Attaches to the host's QEMU binaries at start, tracks each QEMU process
    from its exec (its boot is counted from the first state write), forgets
    VMs a grace period after they quit, and serves /metrics:
      qtrace_kvm_state_writes_total{vm,vcpu,ioctl,phase}
      qtrace_lifecycle_events_total{vm,event}
      qtrace_vm_resets_total{vm,cause}
      qtrace_kvm_ioctl_errors_total{vm,ioctl}
      qtrace_vm_info{vm,pid,uuid,qemu_version,build_id,namespace,name}
    plus self-metrics (probes attached/missing, kernel hook, events lost, ...),
    a landing page at / and /-/healthy.

    \b
    Examples:
      qprobe daemon --config /etc/qtrace/qtrace.toml
      qprobe daemon --web.listen-address=:10471 --web.config.file=/etc/qtrace/web.yml
      qprobe daemon --web.listen-address=[::1]:10471 --web.listen-address=127.0.0.1:10471
      qprobe daemon --config /etc/qtrace/qtrace.toml --check-config
    """
    from qtrace_bpf.commands.config import load_config

    for old, new in ((old_listen, "--web.listen-address"), (old_log_level, "--log.level")):
        if old is not None:
            click.echo(f"qprobe: deprecated flag: use {new} (the old spelling still works)",
                       err=True)
    listen = list(listen_addresses) or ([old_listen] if old_listen else None)
    overrides = dict(listen=listen, kernel_hook=hook, log_level=log_level or old_log_level,
                     log_format=log_format, telemetry_path=telemetry_path,
                     web_config_file=web_config_file, proc_root=proc_root)
    if check_config:
        try:
            cfg = load_config(config_path, **overrides)
        except QtraceError as exc:
            click.echo(f"qprobe: config error: {exc}", err=True)
            sys.exit(1)
        auth = f", basic auth for {len(cfg.web.users)} user(s)" if cfg.web.users else ""
        for warning in cfg.web.warnings:
            click.echo(f"qprobe: web config: {warning}", err=True)
        scheme = "https" if cfg.web.tls else "http"
        click.echo(f"config OK: listen {', '.join(cfg.listen)} ({scheme}{auth}), "
                   f"max_vms {cfg.max_vms}, kernel hook {cfg.kernel_hook}"
                   + (f", processes from {cfg.proc_root}" if cfg.proc_root != "/proc" else ""))
        sys.exit(0)
    from qtrace_bpf.commands.daemon import run_daemon

    sys.exit(run_daemon(load_config(config_path, **overrides), systemd_socket=systemd_socket))


