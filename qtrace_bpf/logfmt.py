"""Log lines an operator can grep and a machine can parse: logfmt, with journald priorities.

VM names and command lines come from tenants' tooling: every value is quoted when it holds
anything but plain characters, so a name with spaces, `=`, quotes or newlines cannot forge a
field or a line.  Under systemd (JOURNAL_STREAM set) each line starts with `<N>`, the
priority journald reads (SyslogLevelPrefix=yes, the default).
"""

from __future__ import annotations

import json
import logging
import os
import re

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")
_PLAIN = re.compile(r"^[A-Za-z0-9_.:/@+,~%-]+$")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def quote(value: object) -> str:
    """A logfmt value: bare when plain, else double-quoted with escapes."""
    text = str(value)
    if _PLAIN.match(text):
        return text
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif not ch.isprintable():
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def kv(**fields: object) -> str:
    """' key=value ...' for the fields that are not None."""
    return "".join(f" {k}={quote(v)}" for k, v in fields.items() if v is not None)


class Formatter(logging.Formatter):
    """level=info msg="..." key=value ...; fields come in `extra={"fields": {...}}`.
    as_json: one JSON object a line instead ({"level", "msg", fields...}), as
    --log.format=json asks (node_exporter's flag); the journal prefix stays."""

    def __init__(self, journal: bool | None = None, as_json: bool = False) -> None:
        super().__init__()
        self.journal = bool(os.environ.get("JOURNAL_STREAM")) if journal is None else journal
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {}) or {}
        if record.exc_info:
            fields = {**fields, "error": self.formatException(record.exc_info)}
        if self.as_json:
            line = json.dumps({"level": record.levelname.lower(), "msg": record.getMessage(),
                               **{k: v if isinstance(v, int | float | bool) else str(v)
                                  for k, v in fields.items() if v is not None}})
        else:
            line = f"level={record.levelname.lower()} msg={quote(record.getMessage())}" \
                   f"{kv(**fields)}"
        if self.journal:
            line = f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def setup(level: str, fmt: str = "logfmt") -> None:
    """stderr (the journal under systemd), logfmt or JSON: the daemon, `qprobe load` and
    the loader child all log the same way."""
    handler = logging.StreamHandler()
    handler.setFormatter(Formatter(as_json=fmt == "json"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def logger_fn(logger: logging.Logger, level: int = logging.INFO):
    """log(msg, **fields) for the layers below the daemon (they never import logging)."""

    def log(msg: str, **fields: object) -> None:
        lvl = fields.pop("level", None)
        lvl = logging.getLevelName(str(lvl).upper()) if lvl is not None else level
        logger.log(lvl, msg, extra={"fields": fields})

    return log


class RateLimited:
    """One line per kind per interval, saying how many were not logged in between: an error
    that repeats (EMFILE at every accept, a /proc that cannot be read) must not flood the
    journal, nor hide how often it happened (`counts` feeds a self-metric)."""

    def __init__(self, log, interval: float = 60.0, clock=None) -> None:
        import time

        self.log = log
        self.interval = interval
        self.clock = clock or time.monotonic
        self.counts: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, kind: str, msg: str, **fields: object) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = self.clock()
        if kind in self._last and now - self._last[kind] < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        self.log(msg, level=fields.pop("level", "warning"), kind=kind,
                 repeated=held or None, **fields)
