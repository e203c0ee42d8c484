#!/usr/bin/env bash
# Install the qtrace daemon as a systemd service from this checkout (root):
#   sudo bash scripts/install-service.sh              then: systemctl enable --now qtrace
#   sudo bash scripts/install-service.sh --uninstall  stop, remove the unit and every pin
# Keep the checkout outside /home and /root: the unit runs with ProtectHome=yes.
set -euo pipefail
cd "$(dirname "$0")/.."
qprobe="$(pwd)/.venv/bin/qprobe"
if [ "${1:-}" = "--uninstall" ]; then
  systemctl disable --now qtrace 2>/dev/null || true
  rm -f /etc/systemd/system/qtrace.service
  systemctl daemon-reload 2>/dev/null || true
  # pinned maps and probe links would otherwise go on counting with no daemon
  "$qprobe" cleanup --config /etc/qtrace/qtrace.toml 2>/dev/null || "$qprobe" cleanup
  echo "uninstalled (config kept in /etc/qtrace)"
  exit 0
fi
bash scripts/setup.sh
install -d -m 0755 /etc/qtrace
[ -e /etc/qtrace/qtrace.toml ] || install -m 0644 systemd/qtrace.toml /etc/qtrace/qtrace.toml
sed "s#@QPROBE@#${qprobe}#" systemd/qtrace.service > /etc/systemd/system/qtrace.service
systemctl daemon-reload 2>/dev/null || echo "install-service: systemd is not running here" >&2
echo "installed /etc/systemd/system/qtrace.service (ExecStart=${qprobe})"
