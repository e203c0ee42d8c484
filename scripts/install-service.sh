#!/usr/bin/env bash
# Install the qtrace daemon as a systemd service from this checkout (root):
#   sudo bash scripts/install-service.sh      then: systemctl enable --now qtrace
# Keep the checkout outside /home and /root: the unit runs with ProtectHome=yes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
qprobe="$(pwd)/.venv/bin/qprobe"
install -d -m 0755 /etc/qtrace
[ -e /etc/qtrace/qtrace.toml ] || install -m 0644 systemd/qtrace.toml /etc/qtrace/qtrace.toml
sed "s#@QPROBE@#${qprobe}#" systemd/qtrace.service > /etc/systemd/system/qtrace.service
systemctl daemon-reload 2>/dev/null || echo "install-service: systemd is not running here" >&2
echo "installed /etc/systemd/system/qtrace.service (ExecStart=${qprobe})"
