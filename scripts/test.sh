#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint, unit tests on gcc-built ELF
# fixtures, and integration tests on real QEMU/KVM VMs.  Extra args go to pytest.
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
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -ra "$@"
