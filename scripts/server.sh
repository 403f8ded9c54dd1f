#!/usr/bin/env bash
# Start, stop or inspect the backends and the gateway in the background.
#   ./scripts/server.sh start [--config host.yaml]     # waits until a backend is healthy
#   ./scripts/server.sh status | stop | restart
# A llama-server built by bootstrap.sh (in the venv's bin/) is used when present; otherwise the
# CPU server from the xllamacpp wheel. Models live in TF_MODELS.
set -euo pipefail
action="${1:-start}"
case "$action" in
  start|stop|restart|status) shift || true ;;
  -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
  -*) action=start ;;  # flags only: `start` is the default action
  *) echo "usage: $0 start|stop|restart|status [--config FILE]" >&2; exit 2 ;;
esac
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/setup.sh"  # a symlink to the script works too
ensure_venv cpu
export PATH="$TF_VENV/bin:$PATH"  # so the llamacpp backend finds a bootstrapped llama-server
exec "$TF_VENV/bin/tensorforge" server "$action" "$@"
