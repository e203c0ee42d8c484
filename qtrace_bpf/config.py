"""Daemon configuration: a TOML file (systemd/qtrace.toml documents every key), flags win."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace

from .elfsym import DEFAULT_DEBUG_ROOTS
from .errors import QtraceError
from .hooks import MODES

DEFAULT_PORT = 10471  # outside 9100-9999, which Prometheus' exporter registry has allocated
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"


@dataclass(frozen=True)
class Config:
    listen: str = DEFAULT_LISTEN
    log_level: str = "info"
    kernel_hook: str = "auto"
    debug_roots: tuple[str, ...] = DEFAULT_DEBUG_ROOTS
    # Attached at start, before any VM exists, so a VM started later is traced from exec.
    qemu_binaries: tuple[str, ...] = ("/usr/bin/qemu-system-*", "/usr/libexec/qemu-kvm",
                                      "/usr/local/bin/qemu-system-*")
    grace_period: float = 300.0  # seconds a VM's series outlive the VM
    rescan_interval: float = 30.0  # safety net behind exec/exit discovery
    max_vms: int = 1024  # VMs tracked at once; more are refused (and counted)
    max_vcpus_per_vm: int = 64  # with max_vms, sizes the BPF maps at load
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Prometheus web-config style: user -> bcrypt hash
    basic_auth_users: dict[str, str] = field(default_factory=dict)

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise QtraceError(f"listen address {value!r}: expected HOST:PORT (e.g. 127.0.0.1:"
                          f"{DEFAULT_PORT})")
    return host.strip("[]") or "0.0.0.0", int(port)


def load_config(path: str | None, **overrides: object) -> Config:
    """Defaults, then the file, then non-None overrides (command-line flags)."""
    cfg = Config()
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise QtraceError(f"config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise QtraceError(f"config {path}: not valid TOML: {exc}") from None
        tls = data.pop("tls", {}) or {}
        for key, value in tls.items():
            data[f"tls_{key}"] = value
        known = {f.name for f in fields(Config)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QtraceError(f"config {path}: unknown key(s): {', '.join(unknown)}")
        for key in ("debug_roots", "qemu_binaries"):
            if key in data:
                data[key] = tuple(data[key])
        try:
            cfg = replace(cfg, **data)
        except TypeError as exc:
            raise QtraceError(f"config {path}: {exc}") from None
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    parse_listen(cfg.listen)
    if cfg.kernel_hook not in ("auto", *MODES):
        raise QtraceError(f"kernel_hook {cfg.kernel_hook!r}: one of auto, {', '.join(MODES)}")
    if bool(cfg.tls_cert_file) != bool(cfg.tls_key_file):
        raise QtraceError("tls: cert_file and key_file go together")
    return cfg
