"""`qprobe symbols`: how each catalog event resolves in one QEMU binary, and what is missing."""

from __future__ import annotations

import json
import os

import click

from qtrace_bpf.contract.catalog import load_catalog
from qtrace_bpf.errors import QtraceError
from qtrace_bpf.symbols import binaries
from qtrace_bpf.symbols.binaries import clone_losses, plan_probes
from qtrace_bpf.symbols.debuginfod import Debuginfod
from qtrace_bpf.vms import targets


def symbols_report(binary: str | None, pid: int | None,
                   debug_roots: tuple[str, ...]) -> dict:
    catalog = load_catalog()
    if pid is not None:
        t = targets.open_target(pid)
        path, display = t.exe_path, t.exe
    else:
        assert binary is not None
        try:
            os.stat(binary)
        except FileNotFoundError:
            raise QtraceError(f"{binary}: no such file") from None
        except PermissionError:
            raise QtraceError(f"{binary}: permission denied") from None
        path = display = binary
    res = binaries.resolve(catalog, path, display, debug_roots, Debuginfod.from_env())
    events = []
    for att in plan_probes(catalog, res):
        row: dict = {"event": att.probe.event, "resolved": att.ok,
                     "functions": list(att.probe.functions)}
        if att.symbol is not None:
            s = att.symbol
            row.update(function=att.function, symbol=s.name, source=s.source,
                       address=f"{s.vaddr:#x}", offset=f"{s.offset:#x}", size=s.size,
                       binding=s.binding, first_insn=s.first_insn, emulated=s.emulated,
                       args_read=att.trust_args, lost=att.lost_detail, notes=att.notes)
            at = att.entry_offset(False) - s.offset
            if at:  # the entry probe sits on a later, emulated instruction (first_insn.py)
                row.update(probed_at=f"+{at}", probed_insn=s.entry_insn)
        elif att.usdt_sites:
            site = att.usdt_sites[0]
            row.update(function=att.function, symbol=f"{att.usdt} ({len(att.usdt_sites)} site(s))",
                       source="usdt", address=f"{site.vaddr:#x}", offset=f"{site.offset:#x}",
                       size=0, binding="-", first_insn="nop", emulated=True, args_read=False,
                       semaphore=f"{site.semaphore:#x}" if site.semaphore else None,
                       lost=[], notes=att.notes)
        elif att.ok:
            row.update(function=att.function, symbol=f"{att.function} (inlined)",
                       source="DWARF inlined", address="-", offset="-", size=0,
                       binding="-", first_insn="-", emulated=None, args_read=False,
                       lost=clone_losses(att.probe), notes=att.notes)
        else:
            row["missing"] = att.reason
        fn = att.function or att.probe.functions[0]
        if res.inlined.get(fn):
            row["inlined"] = True
            row["inlined_at"] = [f"{a:#x}" for a in res.inlined[fn]]
            row["inlined_probed"] = [f"{o:#x}" for o in att.inlined_offsets]
        elif fn in att.probe.inlined:
            row["inlined"] = True
        else:
            row["inlined"] = False if res.dwarf else None  # None: not verifiable
        events.append(row)
    return {
        "binary": res.path, "deleted": display.endswith(" (deleted)"),
        "build_id": res.build_id, "qemu_version": res.qemu_version, "elf_type": res.elf_type,
        "sources": res.sources, "dwarf": res.dwarf, "notes": res.debug_hint, "events": events,
    }


def run_symbols(binary: str | None, pid: int | None, as_json: bool,
                debug_roots: tuple[str, ...]) -> None:
    report = symbols_report(binary, pid, debug_roots)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['binary']}{' (deleted)' if report['deleted'] else ''}: "
               f"{report['elf_type']}, QEMU {report['qemu_version'] or '?'}, "
               f"build-id {report['build_id'] or '-'}")
    click.echo(f"symbol sources: {', '.join(report['sources']) or 'none'}"
               f"{'; DWARF present' if report['dwarf'] else ''}")
    if report["notes"]:
        click.echo(f"notes: {report['notes']}")
    for row in report["events"]:
        if row["resolved"]:
            inl = {True: " INLINED-SOMEWHERE", False: "", None: ""}[row["inlined"]]
            click.echo(f"  ok       {row['event']:<16} {row['symbol']:<34} {row['source']:<14} "
                       f"addr {row['address']} off {row['offset']} size {row['size']} "
                       f"[{row['first_insn']}"
                       + (f" -> {row['probed_at']} {row['probed_insn']}" if "probed_at" in row
                          else "") + f"]{inl}")
            for note in row["notes"]:
                click.echo(f"           {'':<16} note: {note}")
        else:
            click.echo(f"  MISSING  {row['event']:<16} {row['missing']}")
