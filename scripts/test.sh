#!/usr/bin/env bash
# Everything CI checks: lint, then the test suite (unit, integration against the real
# llama.cpp server, real systemd, Prometheus, PostgreSQL and Nix evaluation where present).
#   ./scripts/test.sh            all tests
#   ./scripts/test.sh -k gateway pytest arguments pass through
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/setup.sh"  # a symlink to the script works too
ensure_venv cpu,test
ensure_debian nix-bin systemd-container prometheus postgresql iproute2 shellcheck nats-server chromium
cd "$TF_ROOT"
"$TF_VENV/bin/ruff" check reconciler tests bench
exec "$TF_PY" -m pytest "$@"
