"""The benchmark method, said once: repetitions, shuffled configurations, the untraced
baseline again between configurations, medians with their spread, ratios to the floor.

Why: absolute times on these shared 2-core VMs drift 2x between runs; only comparisons made
within one run, configuration next to configuration, mean anything.
"""

from __future__ import annotations

import random
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.tracers import Tracer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE = "untraced"


@dataclass
class Ctx:
    """What every section is given: repetitions, a scale for N (smoke runs), a temp dir,
    and the kernel hook qtrace takes here."""

    reps: int
    scale: float
    tmp: Path
    hook: str

    def n(self, full: int) -> int:
        return max(100, int(full * self.scale))


def timed_config(tracer: Tracer, run: Callable[[Tracer], list[float]]) \
        -> Callable[[], list[float]]:
    """A configuration: start the tracer, run the workload under it, stop the tracer."""
    def go():
        tracer.start()
        try:
            return run(tracer)
        finally:
            tracer.stop()
    return go


def build(name: str, out: Path) -> str:
    """Compile benchmarks/c/NAME.c with gcc -O2; returns the executable's path."""
    exe = out / name
    if not exe.exists():
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(HERE / "c" / f"{name}.c")],
                       check=True)
    return str(exe)


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.values), max(self.values)) if self.values else (float("nan"),) * 2

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.spread[0], "max": self.spread[1],
                "n": len(self.values), "values": self.values}


@dataclass
class Table:
    """rows (configurations) x columns (what was timed) of repeated measurements."""

    title: str
    columns: Sequence[str]
    unit: str
    rows: dict[str, list[Cell]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # row -> per column, each repetition's value minus the baseline measured just before it
    paired: dict[str, list[Cell]] = field(default_factory=dict)
    text: dict[str, list[str]] = field(default_factory=dict)  # a listing instead of numbers

    def add(self, row: str, values: Sequence[float]) -> None:
        cells = self.rows.setdefault(row, [Cell() for _ in self.columns])
        for cell, v in zip(cells, values, strict=True):
            cell.values.append(v)

    def add_paired(self, row: str, values: Sequence[float], base: Sequence[float]) -> None:
        self.add(row, values)
        cells = self.paired.setdefault(row, [Cell() for _ in self.columns])
        for cell, v, b in zip(cells, values, base, strict=True):
            cell.values.append(v - b)

    def median(self, row: str, col: int) -> float:
        return self.rows[row][col].median

    def added(self, row: str, col: int) -> float:
        """What the configuration adds: the median of its paired differences with the
        baseline run just before it (robust to the machine drifting during the run)."""
        if row in self.paired:
            return self.paired[row][col].median
        return self.median(row, col) - self.median(BASELINE, col)

    @classmethod
    def from_dict(cls, d: dict) -> Table:
        """A table back from results.json (to re-render the report without re-measuring)."""
        t = cls(d["title"], d["columns"], d["unit"], notes=d["notes"], text=d.get("text", {}))
        t.rows = {r: [Cell(list(c["values"])) for c in cs] for r, cs in d["rows"].items()}
        t.paired = {r: [Cell(list(c["values"])) for c in cs] for r, cs in d["added"].items()}
        return t

    def as_dict(self) -> dict:
        return {"title": self.title, "unit": self.unit, "columns": list(self.columns),
                "rows": {r: [c.as_dict() for c in cells] for r, cells in self.rows.items()},
                "added": {r: [c.as_dict() for c in cells] for r, cells in self.paired.items()},
                "text": self.text, "notes": self.notes}


def run_shuffled(table: Table, configs: dict[str, Callable[[], Sequence[float]]], reps: int,
                 baseline: Callable[[], Sequence[float]] | None = None, seed: int = 0) -> None:
    """Each repetition runs every configuration once, in a new random order, with the
    baseline measured before each (so a drift of the machine shows in the baseline too)."""
    rng = random.Random(seed)
    names = list(configs)
    for _ in range(reps):
        rng.shuffle(names)
        for name in names:
            if baseline is None:
                table.add(name, configs[name]())
                continue
            base = baseline()
            table.add(BASELINE, base)
            table.add_paired(name, configs[name](), base)


def fmt(v: float, unit: str) -> str:
    if v != v:  # nan
        return "—"
    if unit == "ns":
        return f"{v:,.0f}"
    if unit == "s":
        return f"{v:.3f}"
    if unit == "ms":
        return f"{v:.1f}"
    if abs(v) < 1:
        return f"{v:.3f}"
    return f"{v:,.1f}"


def markdown(t: Table, ratio_to: str | None = None, added: bool = True) -> str:
    """Median (min–max) per cell; `+added` over the baseline; `×` of the added cost over
    that of `ratio_to` (the floor)."""
    if not t.rows:  # a listing, not measurements
        head = ["", *t.columns]
        lines = [f"### {t.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join([k, *v]) + " |" for k, v in t.text.items()]
        return "\n".join([*lines, "", *(f"- {n}" for n in t.notes)]) + "\n"
    head = ["configuration", *t.columns]
    out = [f"### {t.title}", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
    for row, cells in t.rows.items():
        parts = [row]
        for i, c in enumerate(cells):
            lo, hi = c.spread
            text = f"{fmt(c.median, t.unit)} ({fmt(lo, t.unit)}–{fmt(hi, t.unit)})"
            if added and BASELINE in t.rows and row != BASELINE:
                add = t.added(row, i)
                text += f" +{fmt(add, t.unit)}" if add >= 0 else f" {fmt(add, t.unit)}"
                if ratio_to and ratio_to in t.rows and row != ratio_to:
                    floor = t.added(ratio_to, i)
                    if floor > 0 and add > 0:
                        text += f" ({add / floor:.2f}× floor)"
            parts.append(text)
        out.append("| " + " | ".join(parts) + " |")
    out.append("")
    reps = max(len(c.values) for r, cs in t.rows.items() for c in cs if r != BASELINE or
               len(t.rows) == 1)
    out.append((f"Unit: {t.unit}; " if t.unit else "") + f"median (min–max) of {reps} "
               "repetitions" + ("; `+x` = the median of each repetition's difference with the "
                                "`untraced` run just before it." if added and BASELINE in t.rows
                                else "."))
    out += [f"- {n}" for n in t.notes]
    return "\n".join(out) + "\n"
