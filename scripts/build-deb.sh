#!/usr/bin/env bash
# Build the Debian packages with dpkg-buildpackage on Debian 12 (build dependencies from
# Debian only): the source package (.dsc, .tar.xz) and qtrace_<version>_all.deb, with their
# .changes and .buildinfo, all in dist/.  The last line printed is the .deb; install it with
#   apt install ./dist/qtrace_*_all.deb
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/apt-ensure.sh
apt_ensure dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all \
  python3-setuptools python3-click python3-pyelftools python3-prometheus-client \
  python3-bcrypt python3-yaml
# one version: qtrace_bpf/__init__.py; debian/changelog must say the same
ver=$(sed -n 's/^__version__ = "\(.*\)".*/\1/p' qtrace_bpf/__init__.py)
deb=$(dpkg-parsechangelog -S Version)
if [ "$ver" != "$deb" ]; then
  echo "build-deb: qtrace_bpf/__init__.py says $ver, debian/changelog $deb" >&2; exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src="$work/qtrace-$ver"
mkdir -p "$src"
# the tracked files only (no venvs, no caches), and the revision they are
git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$src"
rev=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || rev="$rev-dirty"
branch=$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo unknown)
built=$(git log -1 --format=%cd --date=format:%Y%m%d-%H:%M:%S 2>/dev/null || echo unknown)
printf 'REVISION = "%s"\nBRANCH = "%s"\nBUILD_DATE = "%s"\n' "$rev" "$branch" "$built" \
  > "$src/qtrace_bpf/_revision.py"
# Debian's own python3 (not one a developer put first on PATH)
(cd "$src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc >"$work/build.log" 2>&1) || {
  tail -40 "$work/build.log" >&2; echo "build-deb: dpkg-buildpackage failed" >&2; exit 1; }
mkdir -p dist
rm -f dist/qtrace_"$ver"[._]*
mv "$work"/qtrace_"$ver"[._]* dist/
echo "dist/qtrace_${ver}_all.deb"
