"""The one logging interface every layer takes: a callable `log(msg, level=..., **fields)`.

The daemon passes a logfmt/json writer (logfmt.py), watch a stderr printer, tests a list's
append; a part that is given none logs nothing (null_log).  Imports nothing, so the lowest
layers may use it.
"""

from __future__ import annotations

from typing import Protocol


class Log(Protocol):
    def __call__(self, msg: str, /, **fields: object) -> None:
        """msg: what happened; fields: key=value context, `level` among them (default info)."""


def null_log(msg: str, /, **fields: object) -> None:
    """A Log for callers that want no lines (one-shot helpers, tests)."""
