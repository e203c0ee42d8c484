"""QEMU-side numbers that decoders need, by QEMU version where they could differ."""

from __future__ import annotations

# ShutdownCause (include/sysemu/runstate.h / qapi run-state.json): unchanged 7.2 -> 10.2.
_CAUSES_7_2 = (
    "none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal",
    "host-ui", "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset",
    "snapshot-load",
)
_BY_MAJOR = {7: _CAUSES_7_2, 8: _CAUSES_7_2, 9: _CAUSES_7_2, 10: _CAUSES_7_2}
PUT_LEVELS = {1: "runtime", 2: "reset", 3: "full"}


def shutdown_causes(qemu_version: str | None) -> tuple[str, ...]:
    """The ShutdownCause names for this QEMU (the 7.2 list where the version is unknown)."""
    try:
        major = int((qemu_version or "").split(".", 1)[0])
    except ValueError:
        major = 0
    return _BY_MAJOR.get(major, _CAUSES_7_2)


def cause_name(value: int, qemu_version: str | None = None) -> str:
    names = shutdown_causes(qemu_version)
    return names[value] if 0 <= value < len(names) else f"cause-{value}"
