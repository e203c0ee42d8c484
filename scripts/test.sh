#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint, the unit tests on Debian 12's
# Python packages, then everything (unit tests on gcc-built ELF fixtures, integration tests
# on real QEMU/KVM VMs, the Debian package under a real systemd).  Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Every scenario also runs on an upstream QEMU (built once from Debian trixie's source
# package, cached under /var/cache/qtrace/qemu; ~3 minutes the first time).
if qemu10=$(bash scripts/build-qemu.sh); then
  export QTRACE_UPSTREAM_QEMU=$qemu10
else
  echo "test: the upstream QEMU build failed: its scenarios skip (and fail under CI)" >&2
fi
# ...and once more with --enable-trace-backends=dtrace, for the USDT source of events.
bash scripts/build-qemu.sh --dtrace >/dev/null \
  || echo "test: the dtrace QEMU build failed: its tests skip (and fail under CI)" >&2
.venv/bin/ruff check .
# The unit tests once more on Debian 12's own Python packages (what the .deb runs on).
bash scripts/test-debian-deps.sh -q
# The package on Debian 12 and 13, each booted on its own kernel under TCG
# (tests/integration/test_debian_hosts.py, scripts/debian-vm.sh): ~25 min warm, ~35 cold.
# QTRACE_DEBIAN_VM=0 leaves that tier out of a local run.
export QTRACE_DEBIAN_VM=${QTRACE_DEBIAN_VM:-1}
exec .venv/bin/python -m pytest -ra "$@"
