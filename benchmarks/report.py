"""BENCHMARKS.md from one run of suite.py: the machine, the method, every table, and the
headline ratios checked against the targets (each miss with the reason the data gives)."""

from __future__ import annotations

from benchmarks.between_runs import between_runs
from benchmarks.harness import BASELINE, Table, markdown
from benchmarks.sections.reset import RUNNING, STOPPED

FLOOR = "floor (empty BPF)"


RULE = ("How the headline judges a target, the same for every line: a figure's interval is "
        "the min–max of its repetitions (of its paired differences with the untraced baseline "
        "where it has them; a ratio's runs from the low end of one to the high end of the "
        "other). With n repetitions that interval holds the true median with probability "
        "1 − 2^(1−n) (94% for 5). The target is **met** when the whole interval is within it, "
        "**missed** when the whole interval is beyond it, and **not resolved** when the "
        "interval straddles it: this run cannot tell, and the line says by how much.")


def interval(t: Table, row: str, col: int) -> tuple[float, float]:
    """Where this run places the row's figure: the min–max of its paired differences (of
    its values if it has none)."""
    return (t.paired.get(row) or t.rows[row])[col].spread


def judge(lo: float, hi: float, target: float, unit: str = "", at_least: bool = False) -> str:
    """The one rule (RULE): the figure must stay ≤ target (≥ with at_least)."""
    inside, beyond = (lo >= target, hi < target) if at_least else (hi <= target, lo > target)
    if inside:
        return "met"
    if beyond:
        return "missed"
    return f"not resolved: this run places it at {lo:.3g}–{hi:.3g}{unit}"


def ratio_interval(t: Table, row: str, other: str, col: int) -> tuple[float, float]:
    (alo, ahi), (blo, bhi) = interval(t, row, col), interval(t, other, col)
    return (alo / bhi if bhi > 0 else float("-inf"), ahi / blo if blo > 0 else float("inf"))


def ratio_verdict(t: Table, row: str, other: str, col: int, target: float
                  ) -> tuple[float, str] | None:
    """row's added cost over other's, and the rule's word for ratio ≤ target."""
    a, b = t.added(row, col), t.added(other, col)
    if b <= 0:
        return None
    return a / b, judge(*ratio_interval(t, row, other, col), target, "×")


def many_times(t: Table, dear: str, cheap: str, target: float) -> str:
    """`dear`'s added cost over `cheap`'s, per column, each judged ≥ target."""
    parts = [f"{c} **{t.added(dear, i) / t.added(cheap, i):,.0f}×** ("
             f"{judge(*ratio_interval(t, dear, cheap, i), target, '×', at_least=True)})"
             for i, c in enumerate(t.columns) if t.added(cheap, i) > 0]
    return "; ".join(parts) + f" (target ≥ {target:.0f}×)"


def breakdown(t: Table) -> list[str]:
    """A traced reset's added time, split into the probes and the daemon's reaction: rows
    that add up to the running daemon's +x by construction."""
    base = t.median(BASELINE, 0)
    total, probes = t.added(RUNNING, 0), t.added(STOPPED, 0)
    (tlo, thi), (plo, phi) = interval(t, RUNNING, 0), interval(t, STOPPED, 0)
    lo, hi = tlo / base * 100, thi / base * 100
    return [f"- system_reset of a 2-vCPU guest, {t.added(RUNNING, 1):.0f} uprobe hits and "
            f"{t.added(RUNNING, 2):.1f} daemon context switches per reset: traced adds "
            f"{total:+.3f} ms to {base:.3f} ms ({total / base * 100:+.1f}%; target within 5%: "
            f"{judge(lo, hi, 5.0, '%')}). Where it goes:", "",
            "  | part of the added time | ms per reset | this run's interval |", "  |---|---|---|",
            f"  | the probes, in the kernel (the daemon SIGSTOPped) | {probes:+.3f} | "
            f"{plo:+.3f} – {phi:+.3f} |",
            f"  | the daemon's reaction (running − stopped) | {total - probes:+.3f} | "
            f"{tlo - phi:+.3f} – {thi - plo:+.3f} |",
            f"  | **total, the daemon running** | **{total:+.3f}** | {tlo:+.3f} – {thi:+.3f} |",
            ""]


def _find(tables: list[tuple[str, Table]], section: str, start: str = "") -> Table | None:
    return next((t for s, t in tables if s == section and t.title.startswith(start)), None)


def headline(tables: list[tuple[str, Table]]) -> list[str]:
    """One line per target: the measured figure, met or not, and why not."""
    out: list[str] = []
    io = _find(tables, "ioctl", "KVM ioctl")
    if io is not None:
        for col, name in ((2, "KVM_SET_REGS"), (1, "KVM_SET_MSRS")):
            floor = io.added(FLOOR, col) if FLOOR in io.rows else None
            ours = io.added("qtrace daemon", col) if "qtrace daemon" in io.rows else None
            bt = io.added("bpftrace", col) if "bpftrace" in io.rows else None
            if floor is not None and floor <= 0 and ours is not None:
                out.append(f"- ioctl path ({name}): the floor's added cost is within this "
                           f"run's noise ({floor:+,.0f} ns); qtrace adds {ours:+,.0f} ns")
            elif floor and ours is not None:
                r, word = ratio_verdict(io, "qtrace daemon", FLOOR, col, 1.2)
                out.append(f"- ioctl path ({name}, a state write): qtrace adds {ours:,.0f} ns, "
                           f"the floor {floor:,.0f} ns: **{r:.2f}× the floor** (target ≤ 1.2×: "
                           f"{word})")
            if bt is not None and ours is not None:
                (qlo, qhi), (blo, bhi) = (interval(io, "qtrace daemon", col),
                                          interval(io, "bpftrace", col))
                word = judge(qlo - bhi, qhi - blo, 0.0, " ns over bpftrace")
                out.append(f"- same counting as bpftrace ({name}, wall time): qtrace "
                           f"{ours:+,.0f} ns vs bpftrace {bt:+,.0f} ns (target ≤ bpftrace: "
                           f"{word})")
            break
        strace = "strace -f -e trace=ioctl"
        if strace in io.rows and "qtrace daemon" in io.rows:
            out.append("- strace's added cost over qtrace's: " +
                       many_times(io, strace, "qtrace daemon", 100))
        cols = [(c, io.added("qtrace daemon", i), io.added("bpftrace", i))
                for i, c in enumerate(io.columns)
                if "qtrace daemon" in io.rows and "bpftrace" in io.rows]
        if cols:
            out.append("- per column, qtrace daemon vs bpftrace added: " + "; ".join(
                f"{c} {q:+,.0f} vs {b:+,.0f} ns" for c, q, b in cols))
    own = _find(tables, "ioctl", "BPF programs")
    if own is not None and FLOOR in own.rows and "qtrace daemon" in own.rows:
        q, f = own.median("qtrace daemon", 0), own.median(FLOOR, 0)
        (qlo, qhi), (flo, fhi) = interval(own, "qtrace daemon", 0), interval(own, FLOOR, 0)
        word = judge(qlo / fhi, qhi / flo, 1.2, "×")
        line = (f"- **BPF run time per traced ioctl** (bpf_stats, the steadiest figure): "
                f"qtrace {q:,.0f} ns, the floor's empty programs {f:,.0f} ns "
                f"(**{q / f:.2f}×** the floor; target ≤ 1.2×: {word})")
        if "bpftrace" in own.rows:
            b = own.median("bpftrace", 0)
            blo, bhi = interval(own, "bpftrace", 0)
            line += (f", bpftrace {b:,.0f} ns (target ≤ bpftrace: "
                     f"{judge(qlo - bhi, qhi - blo, 0.0, ' ns over bpftrace')})")
        if not word.startswith("met"):
            line += (f". Where the {q - f:,.0f} ns over the floor go: the map work a counted "
                     "write needs (the process and ioctl filters, the vCPU by fd, the put "
                     "level, the in-flight entry between enter and exit, the counter)")
        out.insert(0, line)
    up = _find(tables, "uprobes", "Uprobe path")
    if up is not None and FLOOR in up.rows and "qtrace" in up.rows:
        judged = [(ratio_verdict(up, "qtrace", FLOOR, i, 1.2), c)
                  for i, c in enumerate(up.columns)]
        judged = [(rv, c) for rv, c in judged if rv is not None]
        if judged:
            (worst, word), col = max(judged, key=lambda j: j[0][0])
            out.append(f"- uprobe path: qtrace's handler ≤ {worst:.2f}× the floor's added "
                       f"cost (worst: {col}; target ≤ 1.2×: {word}); per column: " +
                       "; ".join(f"{c} {r:.2f}× ({w})" for (r, w), c in judged))
        if "gdb breakpoints" in up.rows:
            out.append("- gdb breakpoints' added cost per hit over qtrace's: " +
                       many_times(up, "gdb breakpoints", "qtrace", 100))
    vm = _find(tables, "vm")
    if vm is not None and "qtrace daemon" in vm.rows:
        for col in (1, 2):
            base, add = vm.median(BASELINE, col), vm.added("qtrace daemon", col)
            lo, hi = (v / base * 100 for v in interval(vm, "qtrace daemon", col))
            out.append(f"- {vm.columns[col]}: traced adds {add:+.2f} ms to {base:.2f} ms "
                       f"untraced ({add / base * 100:+.1f}%, paired medians; target within 5%: "
                       f"{judge(lo, hi, 5.0, '%')})")
    parts = _find(tables, "reset")
    if parts is not None and {RUNNING, STOPPED} <= set(parts.rows):
        out.extend(breakdown(parts))
    rest = _find(tables, "daemon", "The daemon at rest")
    if rest is not None:
        for row in rest.rows:
            cpu, rss = rest.median(row, 0), rest.median(row, 2)
            out.append(f"- daemon with {row}: {cpu:.3f}% of a core idle, {rss:.1f} MB RSS "
                       f"(targets ≤ 0.1%, ≤ 60 MB: {judge(*interval(rest, row, 0), 0.1, '%')}, "
                       f"{judge(*interval(rest, row, 2), 60, ' MB')})")
    scrape = _find(tables, "daemon", "/metrics at scale")
    if scrape is not None:
        for row in scrape.rows:
            s, mine, theirs = (scrape.median(row, i) for i in range(3))
            p99 = scrape.median(row, 4)
            out.append(f"- /metrics, {s:,.0f} series: qtrace renders in {mine:.1f} ms, "
                       f"prometheus_client in {theirs:.1f} ms; 20 scrapers p99 {p99:.1f} ms")
    res = _find(tables, "resolution")
    if res is not None:
        for row in res.rows:
            if "debuginfod" in row:
                out.append(f"- resolution through debuginfod (stripped binary, 45 MB debug file "
                           f"fetched on loopback): {res.median(row, 0):.2f} s cold, "
                           f"{res.median(row, 1):.2f} s from qtrace's cache, "
                           f"{res.median(row, 2):.0f} MB")
                continue
            if "dtrace" in row or row.startswith("Debian"):
                continue
            w, m = res.median(row, 0), res.median(row, 2)
            out.append(f"- full-DWARF resolution ({row}): {w:.2f} s, {m:.0f} MB (targets ≤ 2 s, "
                       f"≤ 200 MB: {judge(*interval(res, row, 0), 2, ' s')}, "
                       f"{judge(*interval(res, row, 2), 200, ' MB')})")
    return out


def render_report(meta: dict, tables: list[tuple[str, Table]],
                  runs: list[list[tuple[str, Table]]] | None = None) -> str:
    """tables: the run shown in full (the last); runs: every run, for the spread between."""
    spread = between_runs(runs or [])
    lines = ["# Benchmarks", "",
             "Generated by `bash scripts/bench.sh` (benchmarks/suite.py); raw numbers in "
             "`benchmarks/results.json`. Absolute times on shared 2-core VMs drift by 2× "
             "between runs: read the ratios, measured side by side in one run.", "",
             f"## Headline (run {len(runs or [1])} of {len(runs or [1])})", "",
             *headline(tables), ""]
    if spread:
        lines += ["## Between runs", "",
                  f"The suite ran {len(runs or [])} times, one after the other on this machine. "
                  "Each run's headline figure, and how far apart the runs put it: a verdict "
                  "above holds for its own run; a spread wider than a figure's distance to "
                  "its target means another run could give another word.", "", *spread, ""]
    lines += ["## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "## Method", "",
              "Each cell is the median of the repetitions with its (min–max). In every "
              "repetition the configurations run in a new random order, and the untraced "
              "baseline is measured again just before each one; `+x` is the median of a "
              "configuration's differences with those paired baselines, and `(n× floor)` its "
              "added cost over the floor's (empty BPF programs on the same hooks, attached "
              "the same way). Workloads are small C programs (`benchmarks/c/`) that wait "
              "until the tracer is attached before timing.", "", RULE, ""]
    where = f"kernel {meta.get('kernel', '?')}, kernel hook {meta.get('kernel_hook', '?')}"
    for _section, t in tables:
        ratio = FLOOR if FLOOR in t.rows else None
        lines.append(markdown(t, ratio_to=ratio, added=BASELINE in t.rows))
        lines.append(f"Ran on {where}.\n")
    return "\n".join(lines) + "\n"
