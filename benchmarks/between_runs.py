"""The headline figures of several whole runs of the suite side by side, and how far apart
they land: what one run's min–max cannot show (the machine's state drifting between runs,
a kernel build or a neighbour changing)."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.harness import BASELINE, Table
from benchmarks.sections.reset import RUNNING, STOPPED

FLOOR = "floor (empty BPF)"
Tables = list[tuple[str, Table]]


def _find(tables: Tables, section: str, start: str = "") -> Table | None:
    return next((t for s, t in tables if s == section and t.title.startswith(start)), None)


def _ratio(t: Table, row: str, other: str, col: int) -> float | None:
    if row not in t.rows or other not in t.rows or t.added(other, col) <= 0:
        return None
    return t.added(row, col) / t.added(other, col)


def _percent(t: Table, row: str, col: int) -> float | None:
    if row not in t.rows or BASELINE not in t.rows:
        return None
    return t.added(row, col) / t.median(BASELINE, col) * 100


def _bpf_ratio(t: Table) -> float | None:
    if FLOOR not in t.rows or "qtrace daemon" not in t.rows:
        return None
    return t.median("qtrace daemon", 0) / t.median(FLOOR, 0)


def _worst_uprobe(t: Table) -> float | None:
    got = [r for i in range(len(t.columns)) if (r := _ratio(t, "qtrace", FLOOR, i)) is not None]
    return max(got) if got else None


# (figure, unit, section, title prefix, how to read it from that table)
FIGURES: list[tuple[str, str, str, str, Callable[[Table], float | None]]] = [
    ("BPF run time per traced ioctl, qtrace ÷ floor", "×", "ioctl", "BPF programs", _bpf_ratio),
    ("ioctl path KVM_SET_REGS, qtrace's added ÷ floor's", "×", "ioctl", "KVM ioctl",
     lambda t: _ratio(t, "qtrace daemon", FLOOR, 2)),
    ("bystander ioctl, qtrace's added ÷ floor's", "×", "bystanders", "",
     lambda t: _ratio(t, "qtrace daemon", FLOOR, 1)),
    ("uprobe path, qtrace's added ÷ floor's (worst column)", "×", "uprobes", "Uprobe path",
     _worst_uprobe),
    ("system_reset traced, added", "%", "vm", "", lambda t: _percent(t, "qtrace daemon", 1)),
    ("device_add traced, added", "%", "vm", "", lambda t: _percent(t, "qtrace daemon", 2)),
    ("system_reset: the probes (daemon stopped), added", "%", "reset", "",
     lambda t: _percent(t, STOPPED, 0)),
    ("system_reset: the daemon running, added", "%", "reset", "",
     lambda t: _percent(t, RUNNING, 0)),
    ("daemon idle CPU, 30 VMs", "% of a core", "daemon", "The daemon at rest",
     lambda t: t.median("30 VMs", 0) if "30 VMs" in t.rows else None),
    ("daemon RSS, 30 VMs", "MB", "daemon", "The daemon at rest",
     lambda t: t.median("30 VMs", 2) if "30 VMs" in t.rows else None),
]


def figures(tables: Tables) -> dict[str, tuple[float, str]]:
    """Every headline figure this run has: name -> (value, unit)."""
    out = {}
    for name, unit, section, start, read in FIGURES:
        t = _find(tables, section, start)
        value = read(t) if t is not None else None
        if value is not None:
            out[name] = (value, unit)
    return out


def between_runs(runs: list[Tables]) -> list[str]:
    """A markdown table: each figure in every run, and the spread between the runs."""
    per_run = [figures(r) for r in runs]
    names = [n for n, *_ in FIGURES if any(n in f for f in per_run)]
    if len(runs) < 2 or not names:
        return []
    head = " | ".join(f"run {i + 1}" for i in range(len(runs)))
    lines = [f"| figure | {head} | spread between runs (max − min) |",
             "|---|" + "---|" * len(runs) + "---|"]
    for name in names:
        got = [f[name][0] for f in per_run if name in f]
        unit = next(f[name][1] for f in per_run if name in f)
        cells = " | ".join(f"{f[name][0]:.3g}" if name in f else "—" for f in per_run)
        spread = max(got) - min(got)
        lines.append(f"| {name} ({unit}) | {cells} | {spread:.3g} |")
    return lines
