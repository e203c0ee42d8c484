#!/usr/bin/env python3
"""Man pages from click's own help: qprobe(1) and qprobe-COMMAND(1) for each subcommand,
and qtrace.toml(5) from the commented config the package installs.

    python3 scripts/gen-man.py OUTDIR      (debian/rules runs it at package build; OUTDIR is
                                            man1, and qtrace.toml.5.gz goes to ../man5)

Why generated: the help text is the one source; a man page typed by hand would drift.
"""

from __future__ import annotations

import gzip
import inspect
import sys
from pathlib import Path

import click

# the tree's package, unless PYTHONPATH names another (the .deb's: it has no demo)
sys.path.append(str(Path(__file__).resolve().parent.parent))
from qtrace_bpf import __version__  # noqa: E402
from qtrace_bpf.cli import main  # noqa: E402


def roff(text: str) -> str:
    """Plain help text as roff: escapes, and click's \\b blocks kept as they are."""
    out, keep = [], False
    for line in text.splitlines():
        line = line.replace("\\", "\\e").replace("-", "\\-")
        if line.startswith(("'", ".")):
            line = "\\&" + line
        if line.strip() == "\b":  # click: the next paragraph is kept as it is
            out.append(".nf")
            keep = True
            continue
        if not line.strip():
            if keep:
                out.append(".fi")
                keep = False
            out.append(".PP")
            continue
        out.append(line)
    if keep:
        out.append(".fi")
    return "\n".join(out)


def page(cmd: click.Command, name: str, parent: click.Context | None) -> str:
    ctx = click.Context(cmd, info_name=name, parent=parent)
    title = name.replace(" ", "-")
    summary = cmd.get_short_help_str(limit=80)
    lines = [f'.TH {title.upper()} 1 "" "qtrace {__version__}" "User Commands"',
             ".SH NAME", f"{title} \\- {roff(summary)}",
             ".SH SYNOPSIS", f".B {name}", roff(" ".join(cmd.collect_usage_pieces(ctx))),
             ".SH DESCRIPTION", roff(inspect.cleandoc(cmd.help or ""))]
    params = [p for p in cmd.get_params(ctx) if isinstance(p, click.Option)]
    if params:
        lines.append(".SH OPTIONS")
        for p in params:
            record = p.get_help_record(ctx)
            if record:
                lines += [".TP", f".B {roff(record[0])}", roff(record[1])]
    if isinstance(cmd, click.Group):
        lines.append(".SH COMMANDS")
        for sub in cmd.list_commands(ctx):
            lines += [".TP", f".B {sub}", roff(cmd.get_command(ctx, sub).get_short_help_str(80)),
                      f"See \\fB{title}\\-{sub}\\fR(1)."]
    else:
        lines += [".SH SEE ALSO", "\\fBqprobe\\fR(1)"]
    return "\n".join(lines) + "\n"


def toml_page() -> str:
    """qtrace.toml(5): the shipped file is the reference (every key, commented)."""
    text = (Path(__file__).resolve().parent.parent / "systemd" / "qtrace.toml").read_text()
    lines = [f'.TH QTRACE.TOML 5 "" "qtrace {__version__}" "File Formats"',
             ".SH NAME", "qtrace.toml \\- configuration of the qtrace daemon",
             ".SH SYNOPSIS", "/etc/qtrace/qtrace.toml",
             ".SH DESCRIPTION",
             roff("The daemon (qprobe daemon --config FILE) reads this TOML file at start; "
                  "command-line flags win over it. Every key is checked (type, range); "
                  "unknown keys are reported with the nearest known one. "
                  "qprobe daemon --config FILE --check-config checks a file without "
                  "attaching anything. The installed file, below, names every key with its "
                  "default and what it does."),
             ".SH THE FILE", ".nf", roff(text).replace(".PP", ""), ".fi",
             ".SH SEE ALSO", "\\fBqprobe\\-daemon\\fR(1), \\fBqprobe\\-load\\fR(1)"]
    return "\n".join(lines) + "\n"


def main_(outdir: str) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    root = click.Context(main, info_name="qprobe")
    pages = {"qprobe": page(main, "qprobe", None)}
    for name in main.list_commands(root):
        pages[f"qprobe-{name}"] = page(main.get_command(root, name), f"qprobe {name}", root)
    for name, text in pages.items():
        with gzip.GzipFile(out / f"{name}.1.gz", "wb", mtime=0) as f:
            f.write(text.encode())
    man5 = out.parent / "man5"
    man5.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(man5 / "qtrace.toml.5.gz", "wb", mtime=0) as f:
        f.write(toml_page().encode())
    print(f"gen-man: {len(pages)} pages in {out}, qtrace.toml(5) in {man5}")


if __name__ == "__main__":
    main_(sys.argv[1])
