#!/usr/bin/env bash
# Install and start what the test suite needs; idempotent, and quick when everything is there.
#
# 1. Debian packages that are missing: docker.io, openssh-server, debootstrap, iproute2,
#    chromium and chromium-driver.
# 2. A Docker engine: the one that answers, or a dockerd started by scripts/engine.sh.
# 3. A base image for the role images: the default one, or the offline one built once.
# The project virtualenv is made by the Makefile before this runs (`make deps`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

declare -A PACKAGE_OF=(
  [dockerd]=docker.io [docker]=docker.io [/usr/sbin/sshd]=openssh-server
  [debootstrap]=debootstrap [ip]=iproute2 [nsenter]=util-linux
  [chromium]=chromium [chromedriver]=chromium-driver  # the dashboard's browser tests
)

missing_packages() {
  local cmd
  for cmd in "${!PACKAGE_OF[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || echo "${PACKAGE_OF[$cmd]}"
  done | sort -u
}

install_packages() {
  local packages
  mapfile -t packages < <(missing_packages)
  [ ${#packages[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "bootstrap: missing ${packages[*]} and no apt-get here; install them by hand" >&2
    exit 1
  fi
  echo "bootstrap: installing ${packages[*]}" >&2
  # Keep the packages' init scripts from starting a system dockerd/containerd: this kit starts
  # its own engines, and a system containerd would capture the test bed's engines.
  local policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${packages[@]}" >/dev/null
}

install_packages
scripts/engine.sh start
"$(dirname "$PY")/deployctl" base-image --if-needed >/dev/null
