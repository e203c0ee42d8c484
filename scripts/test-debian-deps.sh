#!/usr/bin/env bash
# The unit tests (tests/unit: every test there is root-free, no BPF, no KVM) on exactly
# Debian 12's Python packages, nothing upgraded from PyPI: the floors in pyproject.toml are
# what the code really runs with (the .deb depends on these).  They run as user nobody, which
# proves the folder's promise: a test there that needed root would fail.  Extra args go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/apt-ensure.sh
apt_ensure python3-venv python3-bpfcc python3-pyelftools python3-prometheus-client \
  python3-click python3-bcrypt python3-yaml python3-pytest python3-hypothesis \
  python3-pytest-timeout
venv=.venv-debian
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
# qtrace itself only: its dependencies are the distribution's (setuptools too: no isolation)
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
want = {"pyelftools": "0.29", "prometheus-client": "0.16.0", "click": "8.1.3",
        "bcrypt": "3.2.2", "PyYAML": "6.0"}
got = {name: md.version(name) for name in want}
bad = {n: v for n, v in got.items() if v != want[n]}
assert not bad, f"not Debian 12's versions: {bad} (something upgraded them from PyPI)"
print("test-debian-deps: " + ", ".join(f"{n} {v}" for n, v in got.items()))
PY
as_user=()
if [ "$(id -u)" = 0 ]; then
  home=$(mktemp -d /tmp/qtrace-unit-home.XXXXXX)
  chown 65534:65534 "$home"
  trap 'rm -rf "$home"' EXIT
  as_user=(setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all
           env HOME="$home" HYPOTHESIS_STORAGE_DIRECTORY="$home/hypothesis")
fi
"${as_user[@]}" "$venv/bin/python" -m pytest -ra -p no:cacheprovider tests/unit "$@"
