# Sourced by the set-up scripts: apt_ensure PKG... installs what is not installed yet
# (quick when all is there: dpkg is asked, apt is not run).
apt_ensure() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    printf '%s: installing: %s\n' "$(basename "$0" .sh)" "${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
