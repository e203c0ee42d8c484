"""The benchmark suite (scripts/bench.sh; `python -m benchmarks.suite`): qtrace side by side
with the floor and the tools operators use instead, one module per section under sections/,
the method in harness.py, the tracers compared in tracers.py, BENCHMARKS.md from report.py."""
