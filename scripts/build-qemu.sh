#!/usr/bin/env bash
# Build upstream QEMU from Debian trixie's source package, once, and cache it.
#
# Why: Debian bookworm ships QEMU 7.2 (stripped); the field runs 9.x/10.x, often unstripped
# or with debug info.  Tests and benchmarks run the same scenarios on this build too.
#
#   bash scripts/build-qemu.sh            # prints the path of qemu-system-x86_64 on stdout
#   bash scripts/build-qemu.sh --dtrace   # the same with --enable-trace-backends=dtrace:
#                                         # static (USDT) probes, as RHEL builds QEMU
#   QTRACE_QEMU_VERSION=1:10.0.13+ds-0+deb13u1 bash scripts/build-qemu.sh
#
# The host's apt configuration is not touched: the trixie deb-src index lives in the cache
# (signed by Debian's archive keyring, so apt verifies every file it fetches).  Cache:
# $QTRACE_QEMU_CACHE (default /var/cache/qtrace/qemu)/<version>/bin/qemu-system-x86_64.
# Firmware comes from Debian's seabios/qemu-system-data: run it with
#   -L /usr/share/seabios -L /usr/share/qemu
set -euo pipefail
say() { printf 'build-qemu: %s\n' "$*" >&2; }

want=${QTRACE_QEMU_VERSION:-1:10.0.13+ds-0+deb13u1}
cache=${QTRACE_QEMU_CACHE:-/var/cache/qtrace/qemu}
variant=""; trace_opts=()
if [ "${1:-}" = "--dtrace" ]; then
  variant="-dtrace"; trace_opts=(--enable-trace-backends=dtrace)
fi
safe=${want//:/_}$variant
out=$cache/$safe
bin=$out/bin/qemu-system-x86_64

if [ -x "$bin" ] && [ -e "$out/.done" ]; then
  echo "$bin"; exit 0
fi
if [ "$(id -u)" != 0 ]; then say "must run as root (apt build dependencies)"; exit 1; fi

DEPS=(dpkg-dev ninja-build flex bison pkgconf libglib2.0-dev libpixman-1-dev zlib1g-dev
      python3-venv libfdt-dev seabios qemu-system-data)
[ -n "$variant" ] && DEPS+=(systemtap-sdt-dev)  # dtrace(1) and <sys/sdt.h>
. "$(dirname "$0")/apt-ensure.sh"
apt_ensure "${DEPS[@]}"

apt_dir=$cache/apt
mkdir -p "$apt_dir/etc" "$apt_dir/lists/partial" "$apt_dir/archives/partial"
cat > "$apt_dir/etc/trixie-src.sources" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie trixie-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
APT=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt_dir/etc"
     -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -q)
say "fetching trixie's source index"
apt-get "${APT[@]}" update >/dev/null
versions=$(apt-cache "${APT[@]}" showsrc qemu | sed -n 's/^Version: //p' | sort -uV)
have=$(tail -n1 <<<"$versions")
version=$want
if ! grep -qxF "$want" <<<"$versions"; then
  # Debian keeps only the newest point release of a suite; say so and build that one.
  say "qemu $want is no longer in trixie; building $have instead"
  version=$have; safe=${version//:/_}$variant; out=$cache/$safe; bin=$out/bin/qemu-system-x86_64
  if [ -x "$bin" ] && [ -e "$out/.done" ]; then echo "$bin"; exit 0; fi
fi

src=$out/src
rm -rf "$src"; mkdir -p "$src"
say "apt-get source qemu=$version"
(cd "$src" && apt-get "${APT[@]}" source "qemu=$version" >/dev/null)
tree=$(find "$src" -mindepth 1 -maxdepth 1 -type d -name 'qemu-*' | head -n1)

# QEMU 10 needs meson >= 1.5 (bookworm has 1.0): take it from PyPI in a venv of its own.
venv=$cache/venv
if [ ! -x "$venv/bin/meson" ]; then
  say "meson from PyPI into $venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'meson>=1.5,<2'
fi

build=$tree/build
mkdir -p "$build"
say "configure (x86_64-softmmu, kvm, no tcg); build log: $build/build.log"
(cd "$build" && PATH=$venv/bin:$PATH ../configure --python="$venv/bin/python3" \
   --target-list=x86_64-softmmu --enable-kvm --disable-tcg --disable-docs --disable-werror --disable-download --disable-install-blobs \
   "${trace_opts[@]}" --prefix="$out" >"$build/build.log" 2>&1) || { tail -n 30 "$build/build.log" >&2; exit 1; }
start=$(date +%s)
say "ninja qemu-system-x86_64 ($(nproc) cores; a few minutes)"
(cd "$build" && PATH=$venv/bin:$PATH ninja qemu-system-x86_64 >>"$build/build.log" 2>&1) \
  || { tail -n 30 "$build/build.log" >&2; exit 1; }
mkdir -p "$out/bin"
install -m 0755 "$build/qemu-system-x86_64" "$bin"
printf 'version=%s\nbuilt=%s\nseconds=%s\n' "$version" "$(date -u +%FT%TZ)" \
  "$(( $(date +%s) - start ))" > "$out/.done"
rm -rf "$src"   # 1+ GB of objects; the binary (with its full DWARF) is what is kept
say "built $("$bin" --version | head -n1) in $(( $(date +%s) - start )) s"
echo "$bin"
