#!/usr/bin/env bash
# The benchmark suite: qtrace side by side with the floor (empty BPF programs), bpftrace,
# strace, perf trace and gdb, on the KVM ioctl path, bystanders, the uprobe path, a real VM,
# the daemon, symbol resolution and placement.  Writes BENCHMARKS.md and
# benchmarks/results.json: three whole runs (~45 minutes), the report showing how far apart
# their headline figures land; --runs 1 for one.  Not part of the tests (a smoke run is).
#
#   bash scripts/bench.sh                 # after scripts/setup.sh (the README's set-up)
#   bash scripts/bench.sh --only ioctl    # one section
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/apt-ensure.sh
apt_ensure bpftrace strace gdb linux-perf systemtap-sdt-dev
[ -x .venv/bin/python ] || bash scripts/setup.sh
bash scripts/build-qemu.sh >/dev/null  # the full-DWARF build: resolution, first instructions
bash scripts/build-qemu.sh --dtrace >/dev/null  # its USDT sites
exec .venv/bin/python -m benchmarks.suite --runs 3 "$@"
