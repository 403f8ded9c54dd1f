# shellcheck shell=bash
# Shared setup for the pipeline scripts: a project venv and, when asked, Debian tools.
# Sourced, not run. Quick when nothing changed: pip runs only when pyproject.toml or
# constraints.txt did.

TF_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TF_VENV="${TF_VENV:-$TF_ROOT/.venv}"
TF_PY="$TF_VENV/bin/python"
# The versions the suite was tested with (pyproject.toml only bounds them).
TF_CONSTRAINTS="$TF_ROOT/constraints.txt"

tf_log() { printf '[tensorforge] %s\n' "$*" >&2; }

# ensure_venv EXTRAS: create .venv and install the package with the given extras
# ("cpu", "cpu,analyze,postgres,test"), pinned by constraints.txt, unless the same
# pyproject.toml and constraints were installed with them before.
ensure_venv() {
  local extras="$1"
  local stamp
  stamp="$TF_VENV/.tensorforge-$(echo "$extras" | tr ',' '-')"
  local want
  want="$(cat "$TF_ROOT/pyproject.toml" "$TF_CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
  if [ ! -x "$TF_PY" ]; then
    tf_log "creating $TF_VENV"
    python3 -m venv "$TF_VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    tf_log "installing tensorforge[$extras] into $TF_VENV (first run takes a minute or two)"
    local log="$TF_VENV/pip-install.log"
    if ! { "$TF_PY" -m pip install --disable-pip-version-check --upgrade pip &&
           "$TF_PY" -m pip install --disable-pip-version-check -c "$TF_CONSTRAINTS" -e "${TF_ROOT}[${extras}]"; } >"$log" 2>&1; then
      tail -n 30 "$log" >&2
      tf_log "pip install failed; full log in $log"
      return 1
    fi
    echo "$want" > "$stamp"
  fi
}

# ensure_debian PACKAGE...: install missing Debian packages (root only; skipped elsewhere).
# TF_SKIP_WHY says what doing without them means for the caller.
ensure_debian() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    tf_log "not root or no apt-get: not installing ${missing[*]} (${TF_SKIP_WHY:-tests that need them will skip})"
    return 0
  fi
  tf_log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  # No daemons started by the package scripts: tests start what they need themselves. An
  # existing policy (container images ship one) is put back afterwards, whatever happens.
  local policy=/usr/sbin/policy-rc.d saved=""
  if [ -e "$policy" ]; then saved="$(mktemp)" && cp -p "$policy" "$saved"; fi
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
  local status=0
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
  if [ -n "$saved" ]; then mv "$saved" "$policy"; else rm -f "$policy"; fi
  return "$status"
}
