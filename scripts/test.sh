#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint, unit tests on gcc-built ELF
# fixtures, and integration tests on real QEMU/KVM VMs.  Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -ra "$@"
