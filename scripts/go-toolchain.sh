# Sourced by scripts/build-oracle.sh and scripts/build-kube.sh (which define
# `die`): the Go toolchain they build with, and the disk-space check.

# Sets `go` to a Go >= 1.26 binary (/usr/local/go/bin/go or go in PATH), or
# dies. The modules built need "go 1.26.0", and the builds set
# GOTOOLCHAIN=local, which forbids fetching a newer toolchain.
find_go() {
  local g v
  go=""
  for g in /usr/local/go/bin/go "$(command -v go 2>/dev/null || true)"; do
    [ -n "$g" ] && [ -x "$g" ] || continue
    v=$("$g" env GOVERSION 2>/dev/null) || continue
    v=${v#go}
    if [ "$(printf '%s\n' 1.26 "$v" | sort -V | head -1)" = 1.26 ]; then
      go=$g
      return 0
    fi
  done
  die "Go >= 1.26 not found (looked at /usr/local/go/bin/go and PATH)"
}

need_space() { # dir megabytes
  local avail
  mkdir -p "$1" || die "cannot create $1"
  avail=$(df -Pm "$1" | awk 'NR==2 {print $4}')
  [ "$avail" -ge "$2" ] || die "not enough disk space in $1: ${avail} MB free, need ${2} MB"
}
