"""Daemon configuration: a TOML file (/etc/qtrace/qtrace.toml, systemd/qtrace.toml in the
source, documents every key; qtrace.toml(5)), flags win.

Every key is checked at start: its type and range, with an error that names the key, the
value and what is expected.  Unknown keys are warned about (a typo must not stop a fleet
upgrade), and `qprobe daemon --check-config` says all of it without attaching anything.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field, replace

from qtrace_bpf import procfs
from qtrace_bpf.errors import QtraceError
from qtrace_bpf.exporters.webconfig import WebConfig, load_web_config, parse_web_config
from qtrace_bpf.logfmt import LOG_FORMATS, LOG_LEVELS
from qtrace_bpf.program.kernel_hook import MODES
from qtrace_bpf.symbols.debugfiles import DEFAULT_DEBUG_ROOTS

DEFAULT_PORT = 10471  # outside 9100-9999, which Prometheus' exporter registry has allocated
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"


@dataclass(frozen=True)
class Config:
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)  # one or more HOST:PORT
    telemetry_path: str = "/metrics"
    log_level: str = "info"
    log_format: str = "logfmt"
    kernel_hook: str = "auto"
    debug_roots: tuple[str, ...] = DEFAULT_DEBUG_ROOTS
    # debuginfod servers for stripped binaries' debug files ("" / empty: DEBUGINFOD_URLS)
    debuginfod_urls: tuple[str, ...] = ()
    debuginfo_cache: str = "/var/cache/qtrace/debuginfo"
    debuginfod_allow_http: bool = False  # plain http lets anyone on the path pick the file
    debuginfo_cache_max_mb: int = 2048  # the cache's quota; least recently used files go
    # Owners whose files may be probed (and whose directories may hold them): a file any
    # other user could write is never parsed nor probed
    trusted_uids: tuple[int, ...] = (0,)
    # One binary's symbol resolution, in a child process: wall seconds, then MiB of
    # address space (a parser bomb fails there, not in the daemon)
    resolve_timeout: float = 20.0
    resolve_memory_max_mb: int = 1024
    # Attached at start, before any VM exists, so a VM started later is traced from exec.
    qemu_binaries: tuple[str, ...] = ("/usr/bin/qemu-system-*", "/usr/libexec/qemu-kvm",
                                      "/usr/local/bin/qemu-system-*")
    grace_period: float = 300.0  # seconds a VM's series outlive the VM
    rescan_interval: float = 30.0  # safety net behind exec/exit discovery
    max_vms: int = 1024  # VMs tracked at once; more are refused (and counted)
    max_vcpus_per_vm: int = 64  # with max_vms, sizes the BPF maps at load
    max_connections: int = 1024  # HTTP connections at once; the longest idle makes room
    web_config_file: str = ""  # Prometheus exporter-toolkit web config (YAML)
    # Maps and probe links pinned here survive a restart ("" = no pins: a restart is a gap)
    bpf_pin_root: str = "/sys/fs/bpf/qtrace"
    # Where the host's processes are read (a container that traces its host mounts the
    # host's /proc elsewhere: proc_root = "/host/proc", --path.procfs)
    proc_root: str = "/proc"
    # KubeVirt names a VM's domain NAMESPACE_NAME: qtrace_vm_info then carries namespace and
    # name labels, as kubevirt_vmi_* do (on for a cluster's nodes, off for a plain host)
    kubevirt_names: bool = False
    keep_on_exit: bool = True  # SIGTERM keeps the pins (restart, upgrade); false removes all
    web: WebConfig = field(default_factory=WebConfig)  # TLS and basic auth, from either

    @property
    def host_ports(self) -> list[tuple[str, int]]:
        return [parse_listen(a) for a in self.listen]

    @property
    def host_port(self) -> tuple[str, int]:
        return self.host_ports[0]


def parse_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT' or ':PORT' (all addresses, v4 and v6) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or \
            (":" in host and not bracketed):  # an IPv6 address needs brackets
        raise QtraceError(f"listen address {value!r}: expected HOST:PORT, [IPV6]:PORT or "
                          f":PORT (e.g. 127.0.0.1:{DEFAULT_PORT}, [::]:{DEFAULT_PORT})")
    return (host[1:-1] if bracketed else host) or "::", int(port)


def _number(key: str, value: object, *, integer: bool, lo: float, hi: float) -> float | int:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            (integer and not isinstance(value, int)):
        raise QtraceError(f"{key} = {value!r}: expected {kind} from {lo:g} to {hi:g}")
    if not lo <= value <= hi:
        raise QtraceError(f"{key} = {value!r}: out of range, expected {lo:g} to {hi:g}")
    return value


def _strings(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QtraceError(f"{key} = {value!r}: expected a list of strings, e.g. "
                          f'{key} = ["{value if isinstance(value, str) else "..."}"]')
    return tuple(value)


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise QtraceError(f"{key} = {value!r}: expected one of {', '.join(choices)}")
    return str(value)


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise QtraceError(f"{key} = {value!r}: expected true or false")
    return value


def _uids(key: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32 for v in value):
        raise QtraceError(f"{key} = {value!r}: expected a non-empty list of uids, e.g. "
                          f"{key} = [0]")
    return tuple(value)


def _listen(key: str, value: object) -> tuple[str, ...]:
    """One address or a list of them (node_exporter's repeatable --web.listen-address)."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list | tuple) or not values or \
            not all(isinstance(v, str) for v in values):
        raise QtraceError(f"{key} = {value!r}: expected HOST:PORT or a list of them")
    for v in values:
        parse_listen(v)
    return tuple(dict.fromkeys(values))


def _path(key: str, value: object) -> str:
    path = _string(key, value)
    if not path.startswith("/") or path in ("/", "/-/healthy", "/-/ready") or " " in path:
        raise QtraceError(f"{key} = {value!r}: expected a path such as /metrics (not /, "
                          "/-/healthy or /-/ready)")
    return path


def _proc_root(key: str, value: object) -> str:
    problem = procfs.problem(_string(key, value))
    if problem:
        raise QtraceError(f"{key} = {value!r}: {problem}")
    return value


def _string(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise QtraceError(f"{key} = {value!r}: expected a string")
    return value


# key -> how its value is checked (and converted)
_KEYS = {
    "listen": _listen,
    "telemetry_path": _path,
    "log_level": lambda k, v: _choice(k, v, LOG_LEVELS),
    "log_format": lambda k, v: _choice(k, v, LOG_FORMATS),
    "kernel_hook": lambda k, v: _choice(k, v, ("auto", *MODES)),
    "debug_roots": _strings,
    "debuginfod_urls": _strings,
    "debuginfo_cache": _string,
    "debuginfod_allow_http": lambda k, v: _bool(k, v),
    "debuginfo_cache_max_mb": lambda k, v: _number(k, v, integer=True, lo=1, hi=1 << 20),
    "trusted_uids": lambda k, v: _uids(k, v),
    "resolve_timeout": lambda k, v: float(_number(k, v, integer=False, lo=1, hi=3600)),
    "resolve_memory_max_mb": lambda k, v: _number(k, v, integer=True, lo=128, hi=1 << 20),
    "qemu_binaries": _strings,
    "grace_period": lambda k, v: float(_number(k, v, integer=False, lo=0, hi=30 * 86400)),
    "rescan_interval": lambda k, v: float(_number(k, v, integer=False, lo=0.5, hi=3600)),
    "max_vms": lambda k, v: _number(k, v, integer=True, lo=1, hi=65536),
    "max_vcpus_per_vm": lambda k, v: _number(k, v, integer=True, lo=1, hi=4096),
    "max_connections": lambda k, v: _number(k, v, integer=True, lo=16, hi=65536),
    "web_config_file": _string,
    "bpf_pin_root": _string,
    "proc_root": _proc_root,
    "kubevirt_names": lambda k, v: _bool(k, v),
    "keep_on_exit": lambda k, v: _bool(k, v),
}
_WEB_KEYS = ("tls", "basic_auth_users")  # TOML spelling of the web config's two parts


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, [*_KEYS, *_WEB_KEYS], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else \
        f" (known: {', '.join(sorted((*_KEYS, *_WEB_KEYS)))})"


def load_config(path: str | None, **overrides: object) -> Config:
    """Defaults, then the file, then non-None overrides (command-line flags)."""
    data: dict = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise QtraceError(f"config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise QtraceError(f"config {path}: not valid TOML: {exc}") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    where = f"config {path}" if path else "config"
    values: dict = {}
    errors = []  # all of them, at once: an operator fixes a file in one go
    for key, value in data.items():
        if key in _WEB_KEYS:
            continue
        check = _KEYS.get(key)
        if check is None:
            errors.append(f"unknown key {key!r}{_did_you_mean(key)}")
            continue
        try:
            values[key] = check(key, value)
        except QtraceError as exc:
            errors.append(str(exc))
    web_file = values.get("web_config_file", "")
    if web_file and any(k in data for k in _WEB_KEYS):
        errors.append("web_config_file and [tls]/[basic_auth_users] both set: keep one")
    try:
        if web_file:
            values["web"] = load_web_config(web_file)
        elif any(k in data for k in _WEB_KEYS):
            values["web"] = parse_web_config(
                {"tls_server_config": data.get("tls") or {},
                 "basic_auth_users": data.get("basic_auth_users") or {}}, where)
    except QtraceError as exc:
        errors.append(str(exc).removeprefix(f"{where}: "))
    if errors:
        raise QtraceError(f"{where}: " + "; ".join(errors) if len(errors) == 1 else
                          f"{where}: {len(errors)} errors:\n  " + "\n  ".join(errors))
    return replace(Config(), **values)
