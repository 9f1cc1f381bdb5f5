#!/usr/bin/env bash
# Installs what the `oci` runtime needs on Debian (run as root): runc, iptables, fuse3, libfuse2 and python3 from the
# system's own release, and a CRIU that works on the running kernel. Idempotent; a second run
# only re-checks (well under a second) and touches no network.
#
#   scripts/install-oci.sh            install or verify
#   scripts/install-oci.sh --force    re-download and re-unpack the private CRIU
#
# CRIU: the distribution's criu is used when it is already installed, is >= 3.17 (>= 4.2 on
# Linux >= 6.16, where older ones cannot dump TCP sockets) and passes
# `criu check`. Otherwise (Debian 12 on Linux >= 6.x: criu 3.17.1 fails `criu check`) CRIU
# >= 4.2 is taken from Debian unstable WITHOUT changing the system's apt configuration: a
# private sources.list, lists and cache directory under $PICO_OCI_ROOT/apt, `apt-get download`
# of criu, libcompel1 and their library dependencies (libc6 included), `dpkg -x` into
# $PICO_OCI_ROOT/criu, and a wrapper that runs criu through that prefix's own loader.
#
# Layout (PICO_OCI_ROOT defaults to /opt/picocenter; outside the repository, so every clone and
# CI run on the machine shares one install):
#   $PICO_OCI_ROOT/bin/criu     the wrapper: the ONE path the worker and runc --criu use
#   $PICO_OCI_ROOT/criu/        the unpacked prefix (usr/sbin/criu, usr/lib/x86_64-linux-gnu/…)
#   $PICO_OCI_ROOT/apt/         private sources.list, lists/, cache/, debs/
#   $PICO_OCI_ROOT/criu.stamp   what the wrapper runs (source and version)
#
# Environment: PICO_OCI_ROOT (above); PICO_DEBIAN_MIRROR overrides the mirror URI otherwise read
# from /etc/apt/sources.list(.d).
set -euo pipefail

ROOT=${PICO_OCI_ROOT:-/opt/picocenter}
WRAPPER=$ROOT/bin/criu
PREFIX=$ROOT/criu
APTDIR=$ROOT/apt
STAMP=$ROOT/criu.stamp
MIN_DISTRO=3.17   # oldest CRIU whose `criu check` we trust as-is
MIN_PRIVATE=4.2   # 4.1.x cannot dump TCP sockets on Linux >= 6.16 (SO_PASSCRED)
ARCH_LIB=usr/lib/x86_64-linux-gnu
FORCE=0
[[ ${1:-} == --force ]] && FORCE=1

say() { echo "install-oci: $*" >&2; }
die() { say "error: $*"; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

[[ $(id -u) -eq 0 ]] || die "run as root (apt-get, and runc/CRIU need root anyway)"
[[ $(uname -m) == x86_64 ]] || die "only x86_64 is supported (the private CRIU is amd64)"

# --- 1. runc, iptables, fuse3, libfuse2 from the system's own release -------------------------------------
need=()
have runc || need+=(runc)
# CRIU locks a container's network namespace with iptables-restore while it dumps.
have iptables-restore || need+=(iptables)
have fusermount3 || need+=(fuse3)
# fuse-native's prebuilt binary (the FUSE image directory of a lazy restore) links libfuse.so.2.
ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2 ' || need+=(libfuse2)
# The lazy-pages relay (worker/oci/lazy-relay.py) passes userfaultfds between two CRIU processes.
have python3 || need+=(python3)
if ((${#need[@]})); then
  have apt-get || die "missing ${need[*]} and no apt-get: install them with the system's package manager"
  say "installing ${need[*]} from the system's release"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- 2. CRIU ------------------------------------------------------------------------------------

# Prints `criu check`'s verdict and returns its status. The rlimit error line is printed on every
# run where CRIU lacks CAP_SYS_RESOURCE and means nothing; warnings are left out for brevity.
criu_check() {
  local out rc=0
  out=$("$@" check 2>&1) || rc=$?
  grep -v -e '^Warn ' -e 'RLIMIT_NOFILE' <<<"$out" | sed 's/^/    /' >&2 || true
  return $rc
}

criu_version() { "$@" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1; }

version_ge() { dpkg --compare-versions "$1" ge "$2"; }

write_wrapper() { # $1: the exec line's command words, already quoted
  mkdir -p "$ROOT/bin"
  local tmp
  tmp=$(mktemp "$ROOT/bin/.criu.XXXXXX")
  printf '#!/bin/sh\n# Written by scripts/install-oci.sh; runc runs it as `runc --criu %s`.\nexec %s "$@"\n' "$WRAPPER" "$1" >"$tmp"
  chmod 755 "$tmp"
  mv -f "$tmp" "$WRAPPER" # atomic: a reader sees the old wrapper or the new one, never half
}

# Quick path: the wrapper from an earlier run still passes `criu check`.
if ((FORCE == 0)) && [[ -x $WRAPPER && -f $STAMP ]]; then
  say "checking $WRAPPER ($(cat "$STAMP")): \`criu check\` says"
  if criu_check "$WRAPPER"; then
    say "criu ready: $WRAPPER"
    exit 0
  fi
  say "the installed criu no longer passes \`criu check\`; reinstalling"
fi

# A distribution criu that already passes its own check is preferred over a private one. On
# Linux >= 6.16, criu < 4.2 passes `criu check` yet cannot dump TCP sockets: not good enough.
min_distro=$MIN_DISTRO
version_ge "$(uname -r | cut -d- -f1)" 6.16 && min_distro=$MIN_PRIVATE
if ((FORCE == 0)) && distro=$(command -v criu) && [[ $distro != "$WRAPPER" ]]; then
  v=$(criu_version "$distro")
  if [[ -n $v ]] && ! version_ge "$v" "$min_distro"; then
    say "the distribution's criu $v at $distro is older than $min_distro on Linux $(uname -r); installing a private CRIU"
  elif [[ -n $v ]]; then
    say "found the distribution's criu $v at $distro; running \`criu check\`:"
    if criu_check "$distro"; then
      write_wrapper "$distro"
      echo "distro $v $distro" >"$STAMP"
      say "criu ready: $WRAPPER -> $distro"
      exit 0
    fi
    say "the distribution's criu $v fails \`criu check\`; installing a private CRIU instead"
  fi
fi

# The Debian mirror this machine already uses: the first non-security Debian entry in
# /etc/apt/sources.list(.d), one-line or deb822 format. Prints "URI<TAB>KEYRING" (keyring may be
# empty).
find_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    # deb [opts] URI SUITE COMPONENTS…
    awk '$1 == "deb" {
           kr = ""; i = 2
           if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) { if ($i ~ /signed-by=/) kr = $i; i++ }
                             if ($i ~ /signed-by=/) kr = $i; i++ }
           uri = $i; suite = $(i + 1)
           gsub(/.*signed-by=|[\[\]]/, "", kr)
           if (uri ~ /debian/ && uri !~ /security/ && suite !~ /security/) { print uri "\t" kr; exit }
         }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    # Paragraphs of "Key: value" lines separated by blank lines.
    awk 'function flush() { if (uris ~ /debian/ && uris !~ /security/ && suites !~ /security/ && types ~ /(^| )deb( |$)/) { split(uris, u, " "); print u[1] "\t" kr; found = 1 }
                            uris = suites = types = kr = "" }
         /^[ \t]*$/ { flush(); if (found) exit; next }
         /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
         /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
         /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
         /^Signed-By:/ { sub(/^Signed-By:[ \t]*/, ""); kr = $0 }
         END { if (!found) flush() }' "$f"
  done
}

if [[ -n ${PICO_DEBIAN_MIRROR:-} ]]; then
  mirror=$PICO_DEBIAN_MIRROR keyring=
else
  IFS=$'\t' read -r mirror keyring < <(find_mirror | head -n1) || true
fi
[[ -n ${mirror:-} ]] || die "no Debian mirror in /etc/apt/sources.list(.d); set PICO_DEBIAN_MIRROR=http://… (a Debian mirror) or install a criu that passes \`criu check\`"
# A Signed-By that is inline key material (deb822 allows it) is not a path: use apt's defaults.
[[ -n ${keyring:-} && -f $keyring ]] || keyring=
say "reading Debian unstable's index from $mirror (private apt state in $APTDIR)"

mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/debs"
echo "deb ${keyring:+[signed-by=$keyring] }$mirror unstable main" >"$APTDIR/sources.list"
# Every path apt writes is private: the system's sources, lists and package caches stay as they
# were. dpkg's status file is only read (to print "Installed:"), never written: nothing is
# installed, only downloaded and unpacked.
APT=(-o Dir::Etc::SourceList="$APTDIR/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o Dir::State::Lists="$APTDIR/lists" -o Dir::Cache="$APTDIR/cache"
  -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
  -o APT::Sandbox::User=root)
apt-get "${APT[@]}" -qq update

candidate=$(apt-cache "${APT[@]}" show --no-all-versions criu 2>/dev/null | sed -n 's/^Version: *//p' | head -n1)
[[ -n $candidate ]] || die "criu is not in Debian unstable's index at $mirror"
version_ge "$candidate" "$MIN_PRIVATE" || die "Debian unstable has criu $candidate; need >= $MIN_PRIVATE"

# criu, libcompel1 and everything they depend on, recursively. In unstable this closure is only
# shared-library packages (libc6, libgcc-s1, gnutls, nftables…); a virtual package (<name>) has
# no file of its own and is skipped. The ldd check below is what proves the closure complete.
mapfile -t pkgs < <(apt-cache "${APT[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
  --no-breaks --no-replaces --no-enhances criu libcompel1 | grep -v -e '^ ' -e '^<' | sort -u)
say "downloading criu $candidate and ${#pkgs[@]} packages: ${pkgs[*]}"
rm -f "$APTDIR"/debs/*.deb
(cd "$APTDIR/debs" && apt-get "${APT[@]}" -qq download "${pkgs[@]}")

# Unpack beside the live prefix and swap it in whole, so a failed run never leaves a prefix
# that is half one version and half another.
rm -rf "$PREFIX.new"
mkdir -p "$PREFIX.new"
for deb in "$APTDIR"/debs/*.deb; do dpkg -x "$deb" "$PREFIX.new"; done

loader=$PREFIX.new/$ARCH_LIB/ld-linux-x86-64.so.2
[[ -x $loader && -x $PREFIX.new/usr/sbin/criu ]] || die "unpacked prefix has no loader or criu binary"
libs=$("$loader" --library-path "$PREFIX.new/$ARCH_LIB" --list "$PREFIX.new/usr/sbin/criu")
if grep -q 'not found' <<<"$libs"; then
  die "criu's libraries are incomplete:"$'\n'"$(grep 'not found' <<<"$libs")"
fi
# Every library must come from the prefix; one from the system would be a libc mismatch waiting.
if grep '=>' <<<"$libs" | grep -v -e "=> $PREFIX.new/" -e 'linux-vdso' >&2; then
  die "the libraries above resolve outside $PREFIX.new"
fi

rm -rf "$PREFIX.old"
if [[ -e $PREFIX ]]; then mv "$PREFIX" "$PREFIX.old"; fi
mv "$PREFIX.new" "$PREFIX"
rm -rf "$PREFIX.old"

write_wrapper "$PREFIX/$ARCH_LIB/ld-linux-x86-64.so.2 --library-path $PREFIX/$ARCH_LIB $PREFIX/usr/sbin/criu"
say "running \`$WRAPPER check\`:"
if ! criu_check "$WRAPPER"; then
  rm -f "$STAMP"
  die "criu $candidate unpacked to $PREFIX but fails \`criu check\` (above)"
fi
echo "private $(criu_version "$WRAPPER") from $mirror unstable" >"$STAMP"
say "criu ready: $WRAPPER ($(cat "$STAMP"))"
