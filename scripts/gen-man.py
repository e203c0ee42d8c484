#!/usr/bin/env python3
"""Man pages from click's own help: qprobe(1) and qprobe-COMMAND(1) for each subcommand.

    python3 scripts/gen-man.py OUTDIR      (debian/rules runs it at package build)

Why generated: the help text is the one source; a man page typed by hand would drift.
"""

from __future__ import annotations

import gzip
import inspect
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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
    print(f"gen-man: {len(pages)} pages in {out}")


if __name__ == "__main__":
    main_(sys.argv[1])
