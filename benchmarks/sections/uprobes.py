"""The uprobe path: a probed function's cost per call, and where each catalog function's
probe sits in every QEMU binary."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import Ctx, Table, build, run_shuffled, timed_config
from benchmarks.tracers import (
    Bpftrace,
    Floor,
    Gdb,
    QtraceUprobes,
    Tracer,
    run_workload,
)

UPROBE_FNS = ("f_push", "f_endbr64", "f_xor", "f_test", "f_lea", "f_mov", "f_sub_rsp", "g_usdt")


def uprobe_path(ctx: Ctx) -> tuple[Table, Table]:
    exe = build("uprobe_targets", ctx.tmp)
    from qtrace_bpf.symbols import elfsym

    res = elfsym.resolve(exe, UPROBE_FNS)
    site = res.usdt["bench:hit"][0].offset  # g_usdt is probed at its USDT site, not its entry
    offsets = tuple(res.found[fn][0].offset for fn in UPROBE_FNS[:-1]) + (site,)
    cols = tuple(f"{fn} [{res.found[fn][0].first_insn}]" for fn in UPROBE_FNS[:-1]) + (
        "USDT site [nop]",)
    t = Table("Uprobe path: ns per call of a function probed at its first instruction",
              cols, "ns")
    n = ctx.n(100_000)
    tracers: list[Tracer] = [Floor(offsets), QtraceUprobes(offsets), Bpftrace(
        "uprobe:EXE:f_* { @[probe] = count(); } usdt:EXE:bench:hit { @[probe] = count(); }")]
    configs = {tr.name: timed_config(tr, lambda tr: run_workload(exe, n, tr)) for tr in tracers}
    gdb = Gdb(UPROBE_FNS)
    configs[gdb.name] = timed_config(gdb, lambda tr: run_workload(exe, max(20, n // 500), tr))
    run_shuffled(t, configs, ctx.reps, baseline=lambda: run_workload(exe, n, Tracer()))
    t.notes.append(f"gdb runs {max(20, n // 500)} calls per function (each hit stops the "
                   "process), the others " + f"{n:,}")
    t.notes.append("floor: an empty program; qtrace: its catalog `mark` handler (count + "
                   "ring-buffer event), the process tracked; both on uprobe_multi links, as "
                   "the daemon attaches; bpftrace: perf-event uprobes, a count per probe; "
                   "gdb: a breakpoint at each function (the USDT one: its entry)")
    from qtrace_bpf.contract.catalog import load_catalog
    from qtrace_bpf.symbols.binaries import plan_probes, resolve

    cat = load_catalog()
    bins = qemu_binaries()
    classes = Table("First instruction of every probed function, per QEMU binary, and where "
                    "the entry probe sits when that one is single-stepped (uprobe cost class: "
                    "emulated is cheap, single-stepped ~10x dearer)",
                    tuple(binary_name(b) for b in bins), "")
    for col, binary in enumerate(bins):
        for att in plan_probes(cat, resolve(cat, binary, binary)):
            row = classes.text.setdefault(att.probe.event, ["—"] * len(bins))
            if att.symbol is not None and att.entry_offset(False) != att.symbol.offset:
                row[col] = (f"`{att.symbol.first_insn}`, probed at +{att.symbol.entry_at} "
                            f"`{att.symbol.entry_insn}`: emulated")
            elif att.symbol is not None:
                row[col] = (f"`{att.symbol.first_insn}` "
                            f"{'emulated' if att.symbol.emulated else 'single-stepped'}")
            elif att.usdt_sites:
                row[col] = f"USDT `nop` emulated ({att.usdt})"
            elif att.inlined_offsets:
                row[col] = "inlined instances"
    return t, classes


def binary_name(path: str) -> str:
    return "Debian 7.2" if path.startswith("/usr/") else Path(path).parent.parent.name


def qemu_binaries() -> list[str]:
    import glob

    return ["/usr/bin/qemu-system-x86_64",
            *sorted(glob.glob("/var/cache/qtrace/qemu/*/bin/qemu-system-x86_64"))]
