#!/usr/bin/env bash
# Installs everything Picocenter needs on Debian/Ubuntu (run as root): the npm packages, and
# the reference tools the tests and benchmarks use. Idempotent and quick when all is present.
#   scripts/install.sh          runtime + test tools
#   scripts/install.sh --bench  also the benchmark references (nginx, Knot, dnsperf, wrk)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have dig || need+=(dnsutils)
have ip || need+=(iproute2)
have curl || need+=(curl)
if [[ "${1:-}" == "--bench" ]]; then
  have dnsperf || need+=(dnsperf)
  have wrk || need+=(wrk)
  have nginx || need+=(nginx-light)
  have knotd || need+=(knot)
fi
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "picocenter: missing ${need[*]}; run scripts/install.sh as root or install them" >&2
    exit 1
  fi
  echo "picocenter: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# runc, iptables, fuse3 and a CRIU that works on this kernel (the oci runtime and its tests).
if [[ $(id -u) -eq 0 ]]; then
  bash scripts/install-oci.sh
else
  echo "picocenter: not root: skipping scripts/install-oci.sh (the oci runtime needs it)" >&2
fi

# npm ci only when the lockfile changed since the last install.
stamp=node_modules/.picocenter-lock
if [[ ! -f $stamp ]] || ! cmp -s package-lock.json "$stamp"; then
  npm ci --no-audit --no-fund --loglevel=error
  cp package-lock.json "$stamp"
fi
