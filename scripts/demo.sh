#!/usr/bin/env bash
# Set up (idempotent) and run the demo: a throwaway QEMU/KVM VM traced live while it
# boots, gets a hot-added vCPU and is reset over QMP.  Extra args go to `qprobe demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/qprobe demo "$@"
