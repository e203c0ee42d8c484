"""The exposition formats, written directly: per-VM families are ~42 series per vCPU, and
building a prometheus_client Metric and Sample object per series made scrapes of 10k series
cost 100 ms.  Here a family is a dict of label tuples -> value, rendered with one format
string per sample.  qtrace's few self-metrics still go through prometheus_client.

Both formats Prometheus negotiates: text 0.0.4 and OpenMetrics 1.0.0 (the default of a
Prometheus server), gzip when asked for.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def choose_format(accept: str | None) -> str:
    """OpenMetrics when the client lists it (Prometheus does), else text 0.0.4."""
    for part in (accept or "").split(","):
        media = part.split(";", 1)[0].strip()
        if media == "application/openmetrics-text":
            return OPENMETRICS
    return TEXT


def _escape_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


@dataclass(frozen=True)
class Histogram:
    """One histogram series: cumulative counts per upper bound (the last one +Inf), and
    the sum of the observations."""

    buckets: tuple[tuple[float, int], ...]
    sum: float

    @property
    def count(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0


@dataclass
class Family:
    name: str  # without _total
    help: str
    kind: str  # "counter" | "gauge" | "histogram" (samples are then Histogram values)
    labels: tuple[str, ...]
    samples: dict[tuple[str, ...], float | Histogram] = field(default_factory=dict)


def _number(value: float) -> int | float:
    return value if isinstance(value, int) else (
        int(value) if float(value).is_integer() else value)


def le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def render(families: Iterable[Family], fmt: str) -> str:
    out: list[str] = []
    om = fmt == OPENMETRICS
    pairs: dict[tuple[str, str], str] = {}  # (label, value) -> 'label="escaped"': few distinct

    def pair(nv: tuple[str, str]) -> str:
        text = pairs.get(nv)
        if text is None:
            text = pairs[nv] = f'{nv[0]}="{_escape_value(nv[1])}"'
        return text

    for fam in families:
        sample = fam.name + ("_total" if fam.kind == "counter" else "")
        head = fam.name if om else sample
        out.append(f"# HELP {head} {_escape_help(fam.help)}\n# TYPE {head} {fam.kind}\n")
        names = fam.labels
        if fam.kind == "histogram":
            for values, h in fam.samples.items():
                labels = ",".join(map(pair, zip(names, values, strict=True)))
                sep = "," if labels else ""
                for bound, n in h.buckets:
                    out.append(f'{fam.name}_bucket{{{labels}{sep}le="{le(bound)}"}} {n}\n')
                out.append(f"{fam.name}_count{{{labels}}} {h.count}\n"
                           f"{fam.name}_sum{{{labels}}} {_number(h.sum)}\n")
            continue
        for values, value in fam.samples.items():
            num = _number(value)
            if names:
                labels = ",".join(map(pair, zip(names, values, strict=True)))
                out.append(f"{sample}{{{labels}}} {num}\n")
            else:
                out.append(f"{sample} {num}\n")
    return "".join(out)


class SharedRender:
    """Scrapes that arrive together share one render: the first renders, the others wait for
    it and take its result if it started less than `window` seconds ago."""

    def __init__(self, render: Callable[[str], bytes], window: float = 0.25):
        self._render = render
        self.window = window
        self._locks = {TEXT: threading.Lock(), OPENMETRICS: threading.Lock()}
        self._plain: dict[str, tuple[bytes, float]] = {}
        self._gzipped: dict[str, bytes] = {}
        self.renders = 0

    def get(self, fmt: str, gzipped: bool) -> bytes:
        with self._locks[fmt]:
            now = time.monotonic()
            plain, started = self._plain.get(fmt, (b"", float("-inf")))
            if now - started >= self.window:
                plain = self._render(fmt)
                self._plain[fmt] = (plain, now)
                self._gzipped.pop(fmt, None)
                self.renders += 1
            if not gzipped:
                return plain
            if fmt not in self._gzipped:
                self._gzipped[fmt] = gzip.compress(plain, compresslevel=1)
            return self._gzipped[fmt]
